import Crypto
import Foundation
import NIOCore
import P2PTesting
import Testing
@testable import P2PKernel

@Suite("Session packets and crypto")
struct SessionCodecTests {
    @Test("every session packet round-trips, and each is the size docs/WIRE.md gives")
    func roundTrips() throws {
        let init1 = HandshakeInit(networkID: 7, ephemeral: [UInt8](repeating: 1, count: 32), initiatorIndex: 99, responderHint: Number160(hashing: "b"))
        let response = HandshakeResponse(initiatorIndex: 99, responderIndex: 5, ephemeral: [UInt8](repeating: 2, count: 32),
                                         identity: [UInt8](repeating: 3, count: 32), signature: [UInt8](repeating: 4, count: 64))
        let finish = HandshakeFinish(responderIndex: 5, initiatorIndex: 99, ephemeral: [UInt8](repeating: 1, count: 32),
                                     identity: [UInt8](repeating: 6, count: 32), signature: [UInt8](repeating: 7, count: 64), counter: 3)
        #expect(SessionCodec.encode(init1).count == SessionWire.initBytes)
        #expect(try SessionCodec.decode(SessionCodec.encode(init1)) == .handshakeInit(init1))
        #expect(SessionCodec.encode(response).count == SessionWire.responseBytes)
        #expect(try SessionCodec.decode(SessionCodec.encode(response)) == .handshakeResponse(response))
        let finishBytes = SessionCodec.encode(finish) + [UInt8](repeating: 0, count: 16)
        #expect(try SessionCodec.decode(finishBytes) == .handshakeFinish(finish, bodyOffset: SessionWire.finishHeaderBytes))
        let sealed = SessionCodec.encode(SealedHeader(receiverIndex: 1, counter: 2)) + [UInt8](repeating: 0, count: 16)
        #expect(try SessionCodec.decode(sealed) == .sealed(SealedHeader(receiverIndex: 1, counter: 2)))
        #expect(try SessionCodec.decode(SessionCodec.encodeSessionUnknown(index: 8)) == .sessionUnknown(index: 8))
        #expect(try SessionCodec.decode(SessionCodec.encodeRefused(.notThisPeer, initiatorIndex: 9)) == .refused(.notThisPeer, initiatorIndex: 9))
        // An INIT is never smaller than what answering it sends back.
        #expect(SessionWire.initBytes >= SessionWire.responseBytes)
    }

    @Test("every truncation and every flipped byte of each packet is a typed error or a packet, never a crash")
    func malformed() throws {
        let packets: [[UInt8]] = [
            SessionCodec.encode(HandshakeInit(networkID: 1, ephemeral: [UInt8](repeating: 1, count: 32), initiatorIndex: 1, responderHint: .zero)),
            SessionCodec.encode(HandshakeResponse(initiatorIndex: 1, responderIndex: 2, ephemeral: [UInt8](repeating: 2, count: 32),
                                                  identity: [UInt8](repeating: 3, count: 32), signature: [UInt8](repeating: 4, count: 64))),
            SessionCodec.encode(SealedHeader(receiverIndex: 1, counter: 2)) + [UInt8](repeating: 0, count: 16),  // the smallest: an empty body
            SessionCodec.encodeRefused(.insecurePeer, initiatorIndex: 3),
        ]
        var errors = 0
        for p in packets {
            for n in 0..<p.count {
                do { _ = try SessionCodec.decode(Array(p.prefix(n))) } catch { errors += 1 }
            }
            for i in p.indices {
                var q = p
                q[i] ^= 0xFF
                _ = try? SessionCodec.decode(q)
            }
        }
        #expect(errors == packets.map(\.count).reduce(0, +))
        // Non-zero INIT padding and an unknown refusal reason are refused.
        var padded = packets[0]
        padded[padded.count - 1] = 1
        #expect(throws: WireError.self) { try SessionCodec.decode(padded) }
        var reason = packets[3]
        reason[1] = 200
        #expect(throws: WireError.self) { try SessionCodec.decode(reason) }
    }

    @Test("the replay window accepts each counter once, tolerates reordering within 64, refuses older")
    func replayWindow() {
        var w = ReplayWindow()
        for c: UInt64 in [0, 2, 1, 5, 3] {
            #expect(w.canAccept(c))
            w.mark(c)
        }
        for c: UInt64 in [0, 1, 2, 3, 5] { #expect(!w.canAccept(c)) }
        #expect(w.canAccept(4))
        w.mark(200)
        #expect(!w.canAccept(4))  // now older than the window
        #expect(w.canAccept(137) && !w.canAccept(136))
        #expect(!w.canAccept(.max))
    }

    @Test("sealed packets are standard AES-256-GCM: swift-crypto's public API opens what the session seals")
    func interoperable() throws {
        let keyBytes = (0..<32).map { UInt8($0) }
        let key = keyBytes.withUnsafeBytes { SessionKey($0) }
        var plain = ByteBufferAllocator().buffer(capacity: 64)
        plain.writeString("attack at dawn")
        var session = Session(localIndex: 1, remoteIndex: 2, remoteID: .zero, sendKey: key, receiveKey: key, lastUsed: 0)
        var out = ByteBufferAllocator().buffer(capacity: 64)
        #expect(session.seal(plain, transport: .tcp, into: &out))
        let packet = Array(out.readableBytesView)
        let header = Array(packet[..<SessionWire.sealedHeaderBytes])
        let nonce: [UInt8] = [1, 0, 0, 0] + [UInt8](repeating: 0, count: 8)  // TCP, counter 0
        let box = try AES.GCM.SealedBox(nonce: AES.GCM.Nonce(data: nonce),
                                        ciphertext: packet[SessionWire.sealedHeaderBytes..<(packet.count - 16)], tag: packet.suffix(16))
        let opened = try AES.GCM.open(box, using: SymmetricKey(data: keyBytes), authenticating: header)
        #expect(String(decoding: opened, as: UTF8.self) == "attack at dawn")
        // The other way, and a flipped bit or the other transport fails to open.
        let receiver = Session(localIndex: 2, remoteIndex: 1, remoteID: .zero, sendKey: key, receiveKey: key, lastUsed: 0)
        var window = ReplayWindow()
        var into = [UInt8](repeating: 0, count: 64)
        let n = try packet.withUnsafeBytes { raw in
            try into.withUnsafeMutableBytes { try receiver.open(raw, headerBytes: SessionWire.sealedHeaderBytes, counter: 0, transport: .tcp, window: &window, into: $0) }
        }
        #expect(String(decoding: into.prefix(n), as: UTF8.self) == "attack at dawn")
        var tampered = packet
        tampered[SessionWire.sealedHeaderBytes] ^= 1
        let fresh = Session(localIndex: 2, remoteIndex: 1, remoteID: .zero, sendKey: key, receiveKey: key, lastUsed: 0)
        for (bytes, transport) in [(tampered, TransportKind.tcp), (packet, .udp)] {
            var freshWindow = ReplayWindow()
            #expect(throws: OpenError.authenticationFailed) {
                try bytes.withUnsafeBytes { raw in
                    try into.withUnsafeMutableBytes {
                        try fresh.open(raw, headerBytes: SessionWire.sealedHeaderBytes, counter: 0, transport: transport, window: &freshWindow, into: $0)
                    }
                }
            }
        }
        // Opened once, the same packet is a replay.
        #expect(throws: OpenError.replayed) {
            try packet.withUnsafeBytes { raw in
                try into.withUnsafeMutableBytes { try receiver.open(raw, headerBytes: SessionWire.sealedHeaderBytes, counter: 0, transport: .tcp, window: &window, into: $0) }
            }
        }
    }

    @Test("a handshake between two key pairs gives both sides matching keys and proves both ids")
    func handshakeProvesIDs() throws {
        let a = PeerKeyPair(), b = PeerKeyPair()
        let responder = HandshakeResponder(identity: b, network: 1, random: RandomSource())
        let initiator = InitiatorHandshake(network: 1, index: 11, expected: b.peerID, random: RandomSource())
        guard case .handshakeInit(let i) = try SessionCodec.decode(initiator.initPacket) else { Issue.record("no INIT"); return }
        let r = try responder.respond(to: i, from: .loopback, now: 1)
        let (mine, finishPrefix) = try initiator.complete(r, network: 1, identity: a, now: 0)
        #expect(mine.remoteID == b.peerID)
        let prefix = finishPrefix + [UInt8](repeating: 0, count: 8 + 16)
        guard case .handshakeFinish(let f, _) = try SessionCodec.decode(prefix) else { Issue.record("no FINISH"); return }
        let theirs = try responder.accept(f, from: .loopback, now: 1, seconds: 0)
        #expect(theirs.remoteID == a.peerID)
        #expect(mine.sendKey == theirs.receiveKey && mine.receiveKey == theirs.sendKey)
        // Another id expected, another source IP, another network, or a stale epoch: refused.
        let wrong = InitiatorHandshake(network: 1, index: 12, expected: Number160(hashing: "someone"), random: RandomSource())
        #expect(throws: HandshakeError.self) { _ = try wrong.complete(r, network: 1, identity: a, now: 0) }
        #expect(throws: HandshakeError.staleCookie) { _ = try responder.accept(f, from: .v4(0x0A00_0001), now: 1, seconds: 0) }
        #expect(throws: HandshakeError.staleCookie) {
            _ = try responder.accept(f, from: .loopback, now: 1 + 3 * HandshakeResponder.epochNanoseconds, seconds: 0)
        }
        #expect(throws: HandshakeError.badSignature) { _ = try initiator.complete(r, network: 2, identity: a, now: 0) }
    }
}

@Suite("Session table")
struct SessionTableTests {
    func session(_ index: UInt64, peer: Number160, lastUsed: UInt32 = 0) -> Session {
        let key = [UInt8](repeating: 1, count: 32).withUnsafeBytes { SessionKey($0) }
        return Session(localIndex: index, remoteIndex: index, remoteID: peer, sendKey: key, receiveKey: key, lastUsed: lastUsed)
    }

    @Test("the slot index agrees with a dictionary through 20,000 random inserts and removals")
    func slotIndexModel() {
        var rng = SplitMix64(seed: 7)
        var keys: [UInt64] = []
        var index = SlotIndex()
        for step in 0..<20_000 {
            if keys.isEmpty || rng.next() % 3 != 0 {
                var k = rng.next()
                // Colliding low bits and equal top bits, to exercise probing and tags.
                if step % 5 == 0, let other = keys.last { k = (other & 0xFFFF_0000_0000_00FF) | (k & 0x0000_FFFF_FFFF_FF00) }
                guard !keys.contains(k) else { continue }
                keys.append(k)
                index.set(k, to: keys.count - 1) { keys[$0] }
            } else {
                let victim = Int(rng.next() % UInt64(keys.count))
                let gone = keys[victim]
                index.remove(gone, slot: victim) { keys[$0] }
                let last = keys.count - 1
                if victim != last {
                    keys[victim] = keys[last]
                    index.move(keys[victim], from: last, to: victim)
                }
                keys.removeLast()
                #expect(index.find(gone) { keys[$0] } == nil)
            }
            if step % 997 == 0 {
                for (i, k) in keys.enumerated() { #expect(index.find(k) { keys[$0] } == i) }
            }
        }
        #expect(index.count == keys.count)
        for (i, k) in keys.enumerated() { #expect(index.find(k) { keys[$0] } == i) }
    }

    @Test("a peer keeps its newest session for sending and one older for packets in flight; the least recently used goes first")
    func newestAndLRU() {
        var table = SessionTable(capacity: 3)
        let a = Number160(hashing: "a"), b = Number160(hashing: "b"), c = Number160(hashing: "c")
        table.insert(session(1, peer: a, lastUsed: 10))
        table.insert(session(2, peer: a, lastUsed: 11))
        #expect(table.slot(peer: a).map { table[$0].localIndex } == 2)
        #expect(table.slot(index: 1) != nil)
        table.insert(session(3, peer: a, lastUsed: 12))  // the oldest of a's three goes
        #expect(table.slot(index: 1) == nil && table.slot(index: 2) != nil)
        table.insert(session(4, peer: b, lastUsed: 5))   // now full: a's two and b's
        #expect(table.count == 3 && table.slot(index: 2) != nil)
        table.insert(session(5, peer: c, lastUsed: 20))  // full: the least recently used, b's, goes
        #expect(table.count == 3 && table.slot(peer: b) == nil)
        if let s = table.slot(index: 3) { table.remove(slot: s) }
        // a's newest is gone: its older session is the one to send in again.
        #expect(table.slot(peer: a).map { table[$0].localIndex } == 2)
        #expect(table.slot(peer: c).map { table[$0].localIndex } == 5)
    }
}

@Suite("Key files")
struct KeyFileTests {
    @Test("a written key reads back with the same id; the file is 0600 and never overwritten")
    func roundTrip() throws {
        let path = temporaryPath("node.key")
        let pair = PeerKeyPair()
        try pair.write(toFile: path)
        #expect(try PeerKeyPair(contentsOfFile: path).peerID == pair.peerID)
        let mode = try #require(try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int)
        #expect(mode == 0o600)
        #expect(throws: KeyFileError.exists(path)) { try PeerKeyPair().write(toFile: path) }
        #expect(try PeerKeyPair(contentsOfFile: path).peerID == pair.peerID)
    }

    @Test("missing, world-readable, truncated and garbage key files are typed errors")
    func badFiles() throws {
        #expect(throws: KeyFileError.notFound("/nonexistent/key")) { try PeerKeyPair(contentsOfFile: "/nonexistent/key") }
        let open = temporaryPath("open.key")
        try PeerKeyPair().write(toFile: open)
        chmod(open, 0o644)
        #expect { try PeerKeyPair(contentsOfFile: open) } throws: { error in
            guard case KeyFileError.tooOpen = error else { return false }
            return "\(error)".contains("chmod 600")
        }
        for (name, text) in [("short", "swiftp2p-ed25519-private-key\nabcd\n"), ("nohex", "swiftp2p-ed25519-private-key\n" + String(repeating: "zz", count: 32)),
                             ("header", "ssh-rsa AAAA\n"), ("empty", "")] {
            let path = temporaryPath(name)
            FileManager.default.createFile(atPath: path, contents: Data(text.utf8), attributes: [.posixPermissions: 0o600])
            #expect { try PeerKeyPair(contentsOfFile: path) } throws: { error in
                guard case KeyFileError.malformed = error else { return false }
                return true
            }
        }
    }
}

/// A path in a fresh temporary directory.
private func temporaryPath(_ name: String) -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("p2p-test-\(UInt64.random(in: 0...UInt64.max))")
    try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir.appendingPathComponent(name).path
}
