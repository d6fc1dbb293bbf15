import P2PTesting
import Testing
@testable import P2PKernel

@Suite("Wire codec")
struct WireCodecTests {
    static let senderIP = IPAddress.v4(0x0A00_0001)

    static func peer(_ i: Int, v6: Bool = false, relays: Int = 0, flags: PeerFlags = []) -> PeerAddress {
        let ip: IPAddress = v6 ? .v6(0x2001_0db8_0000_0000, UInt64(i)) : .v4(0x7F00_0000 | UInt32(i & 0xFFFF))
        let relayList = (0..<relays).map { PeerSocketAddress(ip: $0 % 2 == 0 ? .v4(UInt32($0)) : .v6(.max, UInt64($0)), tcpPort: .max, udpPort: 0) }
        return PeerAddress(id: Number160(UInt32(i)).shiftedLeft(100), socket: PeerSocketAddress(ip: ip, tcpPort: UInt16(i & 0xFFFF), udpPort: .max), flags: flags, relays: relayList)
    }

    static func message(type: MessageType = .request, payload: [Payload] = [], signed: Bool = false) -> Message {
        // Every flag but `relayed`, which adds the relay list to the header (tested on its own).
        let sender = PeerAddress(id: .max, socket: PeerSocketAddress(ip: senderIP, tcpPort: .max, udpPort: 0), flags: PeerFlags.known.subtracting(.relayed))
        return Message(networkID: .max, id: .max, type: type, command: .max, sender: sender, recipientID: .zero,
                       payload: payload,
                       signature: signed ? MessageSignature(publicKey: .init(repeating: 0xAB, count: 32), signature: .init(repeating: 0xCD, count: 64)) : nil)
    }

    /// Every section kind, filled at its extremes.
    static let everySection: [Payload] = [
        .keys([.zero, .max, Number160(7)]),
        .keys640([.zero, .max]),
        .peers([peer(1), peer(2, v6: true), peer(3, relays: PeerAddress.maxRelays, flags: .known), peer(0xFFFF, v6: true, relays: 1)]),
        .bytes([]),
        .bytes([0, 255, 1]),
        .integer(.min),
        .integer(.max),
        .dataMap([DataEntry(key: .max, value: []), DataEntry(key: .zero, value: Array(repeating: 9, count: 300))]),
        .keys([]), .peers([]), .dataMap([]),
    ]

    @Test("every message type round trips with every section kind", arguments: MessageType.allCases)
    func roundTripEveryType(type: MessageType) throws {
        for signed in [false, true] {
            let m = Self.message(type: type, payload: Self.everySection, signed: signed)
            let bytes = try WireCodec.encode(m)
            #expect(bytes.count == WireCodec.encodedSize(m))
            #expect(try WireCodec.decode(bytes, senderIP: Self.senderIP) == m)
        }
    }

    @Test("a relayed sender's relays travel in the header; more than five are refused")
    func relayedSender() throws {
        var m = Self.message()
        let relays = [PeerSocketAddress(ip: .v4(0x0A00_0001), port: 4000), PeerSocketAddress(ip: .v6(0x2001_0db8_0000_0000, 1), tcpPort: 1, udpPort: 2)]
        m.sender = PeerAddress(id: m.sender.id, socket: m.sender.socket, flags: [.relayed, .firewalledUDP], relays: relays)
        let bytes = try WireCodec.encode(m)
        #expect(bytes.count == WireCodec.encodedSize(m))
        let back = try WireCodec.decode(bytes, senderIP: Self.senderIP)
        #expect(back.sender.relays == relays && back.sender.flags.contains(.relayed))
        // The relay count byte sits right after the recipient id (offset 58).
        var forged = bytes
        forged[58] = 6
        #expect(throws: WireError.self) { try WireCodec.decode(forged, senderIP: Self.senderIP) }
        // Without the relayed flag no relays are written.
        m.sender = PeerAddress(id: m.sender.id, socket: m.sender.socket, flags: [], relays: relays)
        #expect(try WireCodec.decode(try WireCodec.encode(m), senderIP: Self.senderIP).sender.relays.isEmpty)
    }

    @Test("header fields at their extremes round trip")
    func headerExtremes() throws {
        for value in [UInt32.zero, 1, .max] {
            var m = Self.message()
            m.networkID = value
            m.id = value
            m.command = UInt16(truncatingIfNeeded: value)
            m.recipientID = value == 0 ? .zero : .max
            m.sender.socket.tcpPort = UInt16(truncatingIfNeeded: value)
            m.sender.flags = value == 0 ? [] : .known
            #expect(try WireCodec.decode(try WireCodec.encode(m), senderIP: Self.senderIP) == m)
        }
    }

    @Test("the sender's IP comes from the socket, not from the message")
    func senderIPFromSocket() throws {
        let bytes = try WireCodec.encode(Self.message())
        let seen = IPAddress.v6(1, 2)
        #expect(try WireCodec.decode(bytes, senderIP: seen).sender.ip == seen)
    }

    @Test("largest sections at their limits round trip; one more is refused on both sides")
    func limits() throws {
        let keys = (0..<WireLimits.maxKeys).map { Number160(UInt32($0)) }
        let m = Self.message(payload: [.keys(keys)])
        #expect(try WireCodec.decode(try WireCodec.encode(m), senderIP: Self.senderIP) == m)
        #expect(throws: WireError.limitExceeded(what: "key count", value: WireLimits.maxKeys + 1, limit: WireLimits.maxKeys)) {
            try WireCodec.encode(Self.message(payload: [.keys(keys + [.zero])]))
        }
        let peers = (0..<WireLimits.maxPeers).map { Self.peer($0) }
        let p = Self.message(payload: [.peers(peers)])
        #expect(try WireCodec.decode(try WireCodec.encode(p), senderIP: Self.senderIP) == p)
        #expect(throws: WireError.self) { try WireCodec.encode(Self.message(payload: [.peers(peers + [Self.peer(1)])])) }
        let sections = Array(repeating: Payload.integer(1), count: WireLimits.maxSections + 1)
        #expect(throws: WireError.limitExceeded(what: "section count", value: WireLimits.maxSections + 1, limit: WireLimits.maxSections)) {
            try WireCodec.encode(Self.message(payload: sections))
        }
        let big = Self.message(payload: [.bytes(Array(repeating: 1, count: WireLimits.maxMessageBytes))])
        #expect(throws: WireError.self) { try WireCodec.encode(big) }
    }

    @Test("a message of another network is refused before its body is read")
    func wrongNetwork() throws {
        var m = Self.message()
        m.networkID = 7
        #expect(throws: WireError.wrongNetwork(got: 7, expected: 8)) {
            try WireCodec.decode(try WireCodec.encode(m), senderIP: Self.senderIP, networkID: 8)
        }
    }

    @Test("hostile lengths are refused without allocating what they claim")
    func hostileLengths() throws {
        var bytes = try WireCodec.encode(Self.message(payload: [.bytes([1, 2, 3])]))
        // The byte section's length field follows the header and the tag: claim 4 GiB.
        let at = WireLimits.headerBytes + 1
        bytes[at] = 0xFF; bytes[at + 1] = 0xFF; bytes[at + 2] = 0xFF; bytes[at + 3] = 0xFF
        #expect(throws: WireError.truncated(what: "byte section", needed: Int(UInt32.max), available: 3)) {
            try WireCodec.decode(bytes, senderIP: Self.senderIP)
        }
        var peers = try WireCodec.encode(Self.message(payload: [.peers([Self.peer(1)])]))
        peers[at] = 0x03; peers[at + 1] = 0xFF  // 1023 peers claimed, one present
        #expect(throws: WireError.self) { try WireCodec.decode(peers, senderIP: Self.senderIP) }
        var version = try WireCodec.encode(Self.message())
        version[0] = 9
        #expect(throws: WireError.unsupportedVersion(9)) { try WireCodec.decode(version, senderIP: Self.senderIP) }
        #expect(throws: WireError.self) { try WireCodec.decode([UInt8](), senderIP: Self.senderIP) }
        var extra = try WireCodec.encode(Self.message())
        extra.append(0)
        #expect(throws: WireError.trailingBytes(1)) { try WireCodec.decode(extra, senderIP: Self.senderIP) }
    }

    @Test("100,000 random mutations of valid messages decode to a typed error or a valid message")
    func mutations() throws {
        var rng = SplitMix64(seed: 0xF022)
        let seeds = try [
            WireCodec.encode(Self.message(payload: Self.everySection)),
            WireCodec.encode(Self.message(type: .ok, payload: [.peers((0..<20).map { Self.peer($0) })])),
            WireCodec.encode(Self.message(payload: [.keys([.max])], signed: true)),
            WireCodec.encode(Self.message(payload: [.dataMap([DataEntry(key: .max, value: [1, 2, 3])])])),
        ]
        var decoded = 0, refused = 0
        for i in 0..<100_000 {
            var bytes = seeds[i % seeds.count]
            switch rng.next() % 5 {
            case 0: // truncate
                bytes.removeLast(Int(rng.next() % UInt64(bytes.count)) + 1)
            case 1: // flip a few bytes
                for _ in 0..<(1 + rng.next() % 4) { bytes[Int(rng.next() % UInt64(bytes.count))] ^= UInt8(truncatingIfNeeded: rng.next() | 1) }
            case 2: // huge length field somewhere after the header
                let at = WireLimits.headerBytes + Int(rng.next() % UInt64(max(1, bytes.count - WireLimits.headerBytes - 4)))
                if at + 4 <= bytes.count { for k in 0..<4 { bytes[at + k] = 0xFF } }
            case 3: // insert random bytes
                let at = Int(rng.next() % UInt64(bytes.count))
                bytes.insert(contentsOf: (0..<(1 + rng.next() % 16)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }, at: at)
            default: // random garbage of similar length
                bytes = (0..<bytes.count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            }
            do {
                let m = try WireCodec.decode(bytes, senderIP: Self.senderIP)
                // Whatever decodes must be a valid message: it re-encodes to the same bytes.
                #expect(try WireCodec.encode(m) == bytes)
                decoded += 1
            } catch {
                refused += 1
            }
        }
        #expect(decoded + refused == 100_000)
        #expect(refused > 50_000)
    }
}
