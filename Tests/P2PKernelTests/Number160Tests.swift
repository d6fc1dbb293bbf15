import P2PTesting
import Testing
@testable import P2PKernel

@Suite("Number160")
struct Number160Tests {
    var rng = SplitMix64(seed: 0x5EED)

    @Test("XOR distance is zero to itself, symmetric, and its own inverse")
    mutating func xorProperties() {
        for _ in 0..<1000 {
            let a = Number160.random(using: &rng), b = Number160.random(using: &rng)
            #expect(a ^ a == .zero)
            #expect(a ^ b == b ^ a)
            #expect((a ^ b) ^ b == a)
            #expect(a ^ .zero == a)
        }
    }

    @Test("ordering matches the big-endian bytes")
    mutating func orderingMatchesBytes() {
        for _ in 0..<1000 {
            let a = Number160.random(using: &rng), b = Number160.random(using: &rng)
            #expect((a < b) == a.bytes.lexicographicallyPrecedes(b.bytes))
            #expect(Number160(bytes: a.bytes) == a)
        }
    }

    @Test("bit length is the position of the highest set bit")
    func bitLength() {
        #expect(Number160.zero.bitLength == 0)
        #expect(Number160(1).bitLength == 1)
        #expect(Number160.max.bitLength == 160)
        for i in 0..<160 {
            let n = Number160(1).shiftedLeft(i)
            #expect(n.bitLength == i + 1)
            #expect(n.bit(i))
        }
    }

    @Test("hex in and out round trip, with and without 0x")
    mutating func hexRoundTrip() throws {
        for _ in 0..<200 {
            let a = Number160.random(using: &rng)
            #expect(try Number160(hex: a.description) == a)
            #expect(try Number160(hex: a.hexString) == a)
        }
        #expect(try Number160(hex: "0x1f") == Number160(31))
        #expect(try Number160(hex: "0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF") == .max)
    }

    @Test("bad hex is a typed error")
    func badHex() {
        #expect(throws: Number160.ParseError.empty) { try Number160(hex: "0x") }
        #expect(throws: Number160.ParseError.tooLong(41)) { try Number160(hex: String(repeating: "1", count: 41)) }
        #expect(throws: Number160.ParseError.notHex("g")) { try Number160(hex: "12g4") }
    }

    @Test("hashing a string is SHA-1 of its UTF-8 bytes, as TomP2P's createHash")
    func sha1OfString() {
        #expect(Number160(hashing: "hello").hexString == "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d")
        #expect(Number160(hashing: "").hexString == "da39a3ee5e6b4b0d3255bfef95601890afd80709")
    }

    @Test("a peer id is SHA-1 of the Ed25519 public key, and signatures verify")
    func peerKeys() throws {
        let keys = PeerKeyPair()
        #expect(keys.publicKey.count == 32)
        #expect(keys.peerID == Number160(sha1Of: keys.publicKey))
        let signature = try keys.sign(Array("message".utf8))
        #expect(PeerKeyPair.verify(signature: signature, of: Array("message".utf8), publicKey: keys.publicKey))
        #expect(!PeerKeyPair.verify(signature: signature, of: Array("massage".utf8), publicKey: keys.publicKey))
    }

    @Test("Number640 orders by location, domain, content, version")
    mutating func number640Order() {
        let l = Number160.random(using: &rng)
        let a = Number640(location: l, domain: Number160(1))
        let b = Number640(location: l, domain: Number160(1), content: Number160(1))
        let c = Number640(location: l, domain: Number160(2))
        #expect(a < b && b < c)
        #expect(Number640.zero < a && c < Number640.max)
    }

    @Test("addresses parse as HOST:PORT and bad ones are typed errors")
    func addresses() throws {
        #expect(try PeerSocketAddress(parsing: "127.0.0.1:4000") == PeerSocketAddress(ip: .loopback, port: 4000))
        #expect(try PeerSocketAddress(parsing: "localhost:5") == PeerSocketAddress(ip: .loopback, port: 5))
        #expect(try PeerSocketAddress(parsing: "[::1]:80").ip == .v6(0, 1))
        #expect(throws: AddressParseError.malformed("nope")) { try PeerSocketAddress(parsing: "nope") }
        #expect(throws: AddressParseError.badPort("70000")) { try PeerSocketAddress(parsing: "1.2.3.4:70000") }
        #expect(throws: AddressParseError.badHost("1.2.3")) { try PeerSocketAddress(parsing: "1.2.3:80") }
        #expect(IPAddress("::ffff:1.2.3.4") == nil)
        #expect(IPAddress("fe80::1:2")?.description == "fe80:0:0:0:0:0:1:2")
    }
}

