import Foundation
import NIOConcurrencyHelpers
import NIOCore
import P2PTesting
import Testing
@testable import P2PKernel

@Suite("Sessions", .serialized)
struct SessionTests {
    @Test("the first request to a peer handshakes once; later ones reuse the session")
    func oneHandshakePerPair() async throws {
        let a = try await loopbackNode(timeout: .seconds(5)), b = try await loopbackNode(timeout: .seconds(5))
        let peer = try await a.ping(b.address.socket)
        #expect(peer.id == b.peerID)
        for _ in 0..<5 { _ = try await a.request(to: peer, command: KernelCommands.ping) }
        _ = try await a.request(to: peer, command: KernelCommands.ping, transport: .tcp)  // TCP uses the same session
        #expect(a.handshakesCompleted == 1)
        #expect(b.handshakesCompleted == 1)
        await a.shutdown(); await b.shutdown()
    }

    @Test("a datagram captured on the wire carries none of the value's plaintext (and does without sessions)")
    func wireIsEncrypted() async throws {
        let secret = Array("the-secret-value-\(UInt64.random(in: 0...UInt64.max))".utf8)
        func capture(_ mode: SecurityMode) async throws -> [[UInt8]] {
            let echo = CountingEcho()
            let b = try await loopbackNode(timeout: .seconds(5)) { $0.security(mode).command(echo) }
            let relay = try await UDPRelay(to: b.address.socket)
            let a = try await loopbackNode(timeout: .seconds(5)) { $0.security(mode) }
            let peer = try await a.ping(relay.address)
            let reply = try await a.request(to: PeerAddress(id: peer.id, socket: relay.address), command: "test.count", payload: [.bytes(secret)])
            #expect(reply.firstBytes == secret)
            await a.shutdown(); await b.shutdown(); await relay.close()
            return relay.recorded.withLockedValue { $0.map(\.1) }
        }
        func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
            haystack.count >= needle.count && (0...(haystack.count - needle.count)).contains { Array(haystack[$0..<$0 + needle.count]) == needle }
        }
        let sealed = try await capture(.authenticated)
        #expect(sealed.count >= 4)
        #expect(!sealed.contains { contains($0, Array(secret.prefix(12))) })
        // The check can fail: without sessions the same exchange shows the value in the clear.
        let clear = try await capture(.insecure)
        #expect(clear.contains { contains($0, secret) })
    }

    @Test("a replayed datagram is dropped: the command runs once")
    func replayDropped() async throws {
        let echo = CountingEcho()
        let b = try await loopbackNode(timeout: .seconds(5)) { $0.command(echo) }
        let relay = try await UDPRelay(to: b.address.socket)
        let a = try await loopbackNode(timeout: .seconds(5))
        let peer = try await a.ping(relay.address)
        _ = try await a.request(to: PeerAddress(id: peer.id, socket: relay.address), command: "test.count", payload: [.bytes([1, 2, 3])])
        #expect(echo.calls.withLockedValue { $0 } == 1)
        let droppedBefore = b.droppedMessages
        let toB = relay.recorded.withLockedValue { $0.filter { $0.0 == .toTarget }.map(\.1) }
        for packet in toB { try await relay.replay(packet) }
        // Every replay is counted as dropped by b; none runs the command again.
        var waited = 0
        while b.droppedMessages < droppedBefore + toB.count - 1, waited < 500 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(b.droppedMessages >= droppedBefore + toB.count - 1)
        #expect(echo.calls.withLockedValue { $0 } == 1)
        await a.shutdown(); await b.shutdown(); await relay.close()
    }

    @Test("a peer restarted with the same key on the same port answers again within one request timeout")
    func restartedPeer() async throws {
        let keys = PeerKeyPair()
        var b = try await loopbackNode(timeout: .seconds(5)) { $0.keyPair(keys) }
        let port = b.address.udpPort
        let a = try await loopbackNode(timeout: .seconds(5))
        let peer = try await a.ping(b.address.socket)
        #expect(peer.id == keys.peerID)
        await b.shutdown()
        b = try await loopbackNode(timeout: .seconds(5)) { $0.keyPair(keys).port(port) }
        // a still holds the old session; the new b does not know it, says so, and they handshake again.
        let again = try await a.request(to: peer, command: KernelCommands.ping)
        #expect(again.type == .ok && again.sender.id == keys.peerID)
        #expect(a.handshakesCompleted == 2)
        await a.shutdown(); await b.shutdown()
    }

    @Test("the handshake survives the loss of its first INIT, RESPONSE and FINISH")
    func lossyHandshake() async throws {
        let b = try await loopbackNode(timeout: .seconds(8))
        let dropped = NIOLockedValueBox(Set<UInt8>())
        let relay = try await UDPRelay(to: b.address.socket) { _, bytes in
            guard let kind = bytes.first, [PacketKind.handshakeInit.rawValue, PacketKind.handshakeResponse.rawValue,
                                          PacketKind.handshakeFinish.rawValue].contains(kind) else { return .forward }
            return dropped.withLockedValue { $0.insert(kind).inserted } ? .drop : .forward
        }
        let a = try await loopbackNode(timeout: .seconds(8))
        let peer = try await a.ping(relay.address)
        #expect(peer.id == b.peerID)
        #expect(dropped.withLockedValue { $0.count } == 3)
        await a.shutdown(); await b.shutdown(); await relay.close()
    }

    @Test("duplicated datagrams in both directions change nothing")
    func duplicates() async throws {
        let echo = CountingEcho()
        let b = try await loopbackNode(timeout: .seconds(5)) { $0.command(echo) }
        let relay = try await UDPRelay(to: b.address.socket) { _, _ in .duplicate }
        let a = try await loopbackNode(timeout: .seconds(5))
        let peer = PeerAddress(id: try await a.ping(relay.address).id, socket: relay.address)
        for i in 0..<10 { _ = try await a.request(to: peer, command: "test.count", payload: [.integer(Int64(i))]) }
        #expect(echo.calls.withLockedValue { $0 } == 10)
        await a.shutdown(); await b.shutdown(); await relay.close()
    }

    @Test("a secure and an insecure node refuse each other with a clear error on both sides")
    func modesRefuseEachOther() async throws {
        let secure = try await loopbackNode(timeout: .seconds(5))
        let insecure = try await loopbackNode(timeout: .seconds(5)) { $0.security(.insecure) }
        await #expect { try await insecure.ping(secure.address.socket) } throws: { error in
            guard case RPCError.securityMismatch(_, let reason) = error else { return false }
            return reason.contains("requires authenticated sessions")
        }
        await #expect { try await secure.ping(insecure.address.socket) } throws: { error in
            guard case RPCError.securityMismatch(_, let reason) = error else { return false }
            return reason.contains("insecure")
        }
        // Each side also counted (and logged) the refusal it saw.
        #expect(secure.securityRefusals >= 2)
        #expect(insecure.securityRefusals >= 2)
        #expect(secure.peerMap.counts.verified == 0 && insecure.peerMap.counts.verified == 0)
        await secure.shutdown(); await insecure.shutdown()
    }

    @Test("a node with an id that is not SHA-1 of its key does not start in secure mode")
    func unprovableIDRefused() async throws {
        await #expect { try await Node.builder().host("127.0.0.1").peerID(Number160(hashing: "chosen")).start() } throws: { error in
            guard case NodeStartError.unprovableID = error else { return false }
            return "\(error)".contains("insecure")
        }
    }

    @Test("a peer that proves one key but claims another id is refused, and never enters the map")
    func claimedIDRefused() async throws {
        let victim = try await loopbackNode(timeout: .seconds(5))
        let hostile = try await HostilePeer()
        try await hostile.handshake(with: victim.address.socket)
        let claimed = Number160(hashing: "someone else")
        let reply = try await hostile.send(hostile.message(command: KernelCommands.ping, claiming: claimed), to: victim.address.socket,
                                           awaitReply: true, within: .seconds(1))
        #expect(reply == nil)
        #expect(!victim.peerMap.contains(claimed))
        #expect(!victim.peerMap.contains(hostile.id))
        // The same peer under its proven id is answered and known.
        let honest = try await hostile.send(hostile.message(command: KernelCommands.ping), to: victim.address.socket, awaitReply: true)
        #expect(honest?.type == .ok)
        #expect(victim.peerMap.verifiedPeer(hostile.id) != nil)
        // Asking for a specific id at an address where another key answers fails with a clear error.
        let other = try await loopbackNode(timeout: .seconds(5))
        await #expect { try await victim.request(to: PeerAddress(id: claimed, socket: other.address.socket), command: KernelCommands.ping) } throws: { error in
            guard case RPCError.identityMismatch(_, let expected, _) = error else { return false }
            return expected == claimed
        }
        #expect(!victim.peerMap.contains(claimed))
        await victim.shutdown(); await hostile.close(); await other.shutdown()
    }

    @Test("an unproven quit or address change is ignored")
    func unprovenQuitAndMove() async throws {
        let victim = try await loopbackNode(timeout: .seconds(5)), friend = try await loopbackNode(timeout: .seconds(5))
        _ = try await friend.ping(victim.address.socket)
        let before = try #require(victim.peerMap.verifiedPeer(friend.peerID))
        let hostile = try await HostilePeer()
        try await hostile.handshake(with: victim.address.socket)
        // In its own session, claiming to be the friend: a quit, and a ping from another address.
        try await hostile.send(hostile.message(type: .fireAndForget, command: KernelCommands.quit, claiming: friend.peerID), to: victim.address.socket)
        _ = try await hostile.send(hostile.message(command: KernelCommands.ping, claiming: friend.peerID), to: victim.address.socket,
                                   awaitReply: true, within: .seconds(1))
        // In the clear, claiming the same: refused outright.
        try await hostile.socket.send(try WireCodec.encode(hostile.message(type: .fireAndForget, command: KernelCommands.quit, claiming: friend.peerID)),
                                      to: victim.address.socket)
        // A proven quit of the hostile peer's own does work (the check can pass).
        _ = try await hostile.send(hostile.message(command: KernelCommands.ping), to: victim.address.socket, awaitReply: true)
        #expect(victim.peerMap.verifiedPeer(hostile.id) != nil)
        try await hostile.send(hostile.message(type: .fireAndForget, command: KernelCommands.quit), to: victim.address.socket)
        var waited = 0
        while victim.peerMap.contains(hostile.id), waited < 500 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(!victim.peerMap.contains(hostile.id))
        #expect(victim.peerMap.verifiedPeer(friend.peerID) == before)
        await victim.shutdown(); await friend.shutdown(); await hostile.close()
    }

    @Test("a forged reply (right message id, wrong source or session) is dropped, and lookups still find the true closest")
    func forgedRepliesDropped() async throws {
        let net = try await Testnet.start(peers: 40, configure: { _, c in c.requestTimeout = .seconds(5) })
        let victim = net.nodes[7]
        // A peer with a session of its own, which never asks anything (so it is no lookup target
        // of the victim: its answers to requests sent to it would be genuine answers).
        let hostile = try await HostilePeer()
        try await hostile.handshake(with: victim.address.socket)
        // A request to a peer that never answers stays pending: forge its reply every way.
        let silent = try await SilentPeer()
        let pendingPing = victim.request(to: silent.address, command: CommandID.derive(from: KernelCommands.ping))
        let ids = try await victim.onLoop { Array(victim.kernel.rpc.pending.keys) }
        let fakes = (0..<20).map { _ in PeerAddress(id: .random(), socket: hostile.socket.address) }
        for id in ids {
            // Its reply claims the silent peer, in the hostile peer's session: wrong session.
            try await hostile.send(hostile.message(id: id, type: .ok, command: KernelCommands.ping, claiming: silent.address.id,
                                                   recipient: victim.peerID), to: victim.address.socket)
            // Its reply under the hostile peer's own proven id: wrong peer, wrong source.
            try await hostile.send(hostile.message(id: id, type: .ok, command: KernelCommands.ping, recipient: victim.peerID,
                                                   payload: [.peers(fakes)]), to: victim.address.socket)
        }
        await #expect(throws: RPCError.self) { try await pendingPing.get() }
        // Lookups while the hostile peer answers every pending request of the victim with fakes.
        let stop = NIOLockedValueBox(false)
        let forger = Task {
            while !stop.withLockedValue({ $0 }) {
                let open = (try? await victim.onLoop { Array(victim.kernel.rpc.pending.keys) }) ?? []
                for id in open {
                    try? await hostile.send(hostile.message(id: id, type: .ok, command: KernelCommands.neighbors, recipient: victim.peerID,
                                                            payload: [.peers(fakes)]), to: victim.address.socket)
                }
                await Task.yield()
            }
        }
        for i in 0..<20 {
            let key = Number160(hashing: "forged \(i)")
            let result = try await victim.closestPeers(to: key)
            #expect(net.recall(of: result, key: key, asker: victim.peerID) == 1)
            #expect(!result.peers.contains { $0.socket == hostile.socket.address })
        }
        stop.withLockedValue { $0 = true }
        await forger.value
        #expect(victim.droppedMessages >= 2 * ids.count)
        #expect(!victim.peerMap.contains(hostile.id))
        await net.shutdown(); await hostile.close(); await silent.close()
    }

    @Test("the session table is bounded: beyond its capacity the least recently used peer handshakes again")
    func boundedSessions() async throws {
        let b = try await loopbackNode(timeout: .seconds(5)) { $0.configure { $0.limits.maxSessions = 4 } }
        var clients: [Node] = []
        for _ in 0..<8 {
            let c = try await loopbackNode(timeout: .seconds(5))
            _ = try await c.ping(b.address.socket)
            clients.append(c)
        }
        #expect(try await b.onLoop { b.kernel.sessions.table.count } == 4)
        // The first client's session was evicted; its next request still succeeds.
        let again = try await clients[0].request(to: PeerAddress(id: b.peerID, socket: b.address.socket), command: KernelCommands.ping)
        #expect(again.type == .ok)
        #expect(try await b.onLoop { b.kernel.sessions.table.count } == 4)
        for c in clients { await c.shutdown() }
        await b.shutdown()
    }

    @Test("no unauthenticated packet gets a reply larger than itself")
    func noAmplification() async throws {
        let secure = try await loopbackNode(timeout: .seconds(5))
        let insecure = try await loopbackNode(timeout: .seconds(5)) { $0.security(.insecure) }
        let raw = try await RawSocket()
        let initiator = InitiatorHandshake(network: 1, index: 42, expected: .zero, random: RandomSource())
        let plainPing = try WireCodec.encode(Message(networkID: 1, id: 7, type: .request, command: CommandID.derive(from: KernelCommands.ping),
                                                     sender: PeerAddress(id: .random(), socket: raw.address), recipientID: .zero))
        let unknownSession = SessionCodec.encode(SealedHeader(receiverIndex: 99, counter: 0)) + [UInt8](repeating: 0, count: 16)
        let cases: [([UInt8], PeerSocketAddress)] = [
            (initiator.initPacket, secure.address.socket), (plainPing, secure.address.socket), (unknownSession, secure.address.socket),
            (initiator.initPacket, insecure.address.socket),
        ]
        for (request, target) in cases {
            try await raw.send(request, to: target)
            let answer = try #require(await raw.next())
            #expect(answer.count <= request.count, "a \(request.count)-byte packet got a \(answer.count)-byte answer")
        }
        await secure.shutdown(); await insecure.shutdown(); await raw.close()
    }
}
