/// Encodes and decodes messages in the byte layout of docs/WIRE.md.
///
/// Decoding is bounds-checked at every read and every count is checked against both its named
/// limit in `WireLimits` and the bytes actually left before anything is allocated, so arbitrary
/// input yields a `WireError` or a valid message, never a trap.
public enum WireCodec {
    // MARK: encoding

    /// The exact number of bytes `encode` produces.
    public static func encodedSize(_ m: Message) -> Int {
        var n = WireLimits.headerBytes
        if m.sender.flags.contains(.relayed) {
            n += 1
            for r in m.sender.relays { n += socketSize(r) }
        }
        for p in m.payload { n += sectionSize(p) }
        if m.signature != nil { n += WireLimits.signatureTrailerBytes }
        return n
    }

    static func sectionSize(_ p: Payload) -> Int {
        switch p {
        case .keys(let v): return 1 + 2 + v.count * 20
        case .keys640(let v): return 1 + 2 + v.count * 80
        case .peers(let v):
            var n = 3
            for a in v { n += peerSize(a) }
            return n
        case .bytes(let v): return 1 + 4 + v.count
        case .integer: return 1 + 8
        case .dataMap(let v):
            var n = 1 + 4
            for e in v { n += 80 + 4 + e.value.count }
            return n
        }
    }

    static func socketSize(_ s: PeerSocketAddress) -> Int {
        (s.ip.isV4 ? 5 : 17) + 4
    }

    static func peerSize(_ a: PeerAddress) -> Int {
        var n = 20 + socketSize(a.socket) + 2
        for r in a.relays { n += socketSize(r) }
        return n
    }

    /// Checks every count against its limit and returns the encoded size; `encode` calls it, so an
    /// oversized message is an error, never a frame the peer will refuse.
    @discardableResult
    public static func validate(_ m: Message) throws(WireError) -> Int {
        guard m.payload.count <= WireLimits.maxSections else {
            throw .limitExceeded(what: "section count", value: m.payload.count, limit: WireLimits.maxSections)
        }
        guard m.flags.contains(.signed) == (m.signature != nil) else {
            throw .reservedBits(what: "message flags (signed flag without signature or the reverse)", value: m.flags.rawValue)
        }
        guard m.flags.isSubset(of: .known) else { throw .reservedBits(what: "message flags", value: m.flags.rawValue) }
        guard m.sender.flags.isSubset(of: .known) else { throw .reservedBits(what: "sender flags", value: m.sender.flags.rawValue) }
        if let s = m.signature {
            guard s.publicKey.count == 32 else { throw .limitExceeded(what: "public key bytes", value: s.publicKey.count, limit: 32) }
            guard s.signature.count == 64 else { throw .limitExceeded(what: "signature bytes", value: s.signature.count, limit: 64) }
        }
        for p in m.payload {
            switch p {
            case .keys(let v) where v.count > WireLimits.maxKeys:
                throw .limitExceeded(what: "key count", value: v.count, limit: WireLimits.maxKeys)
            case .keys640(let v) where v.count > WireLimits.maxKeys:
                throw .limitExceeded(what: "key count", value: v.count, limit: WireLimits.maxKeys)
            case .peers(let v):
                guard v.count <= WireLimits.maxPeers else {
                    throw .limitExceeded(what: "peer count", value: v.count, limit: WireLimits.maxPeers)
                }
                for a in v where !a.flags.isSubset(of: .known) {
                    throw .reservedBits(what: "peer flags", value: a.flags.rawValue)
                }
            case .dataMap(let v) where v.count > WireLimits.maxMapEntries:
                throw .limitExceeded(what: "map entries", value: v.count, limit: WireLimits.maxMapEntries)
            default: break
            }
        }
        let size = encodedSize(m)
        guard size <= WireLimits.maxMessageBytes else {
            throw .limitExceeded(what: "message bytes", value: size, limit: WireLimits.maxMessageBytes)
        }
        return size
    }

    /// Encodes a message into a new array of exactly `encodedSize(m)` bytes.
    public static func encode(_ m: Message) throws(WireError) -> [UInt8] {
        let size = try validate(m)
        return [UInt8](unsafeUninitializedCapacity: size) { buffer, count in
            var w = ByteWriter(UnsafeMutableRawBufferPointer(buffer))
            write(m, into: &w)
            count = w.offset
        }
    }

    /// Writes a validated message into `w`, which has room for `encodedSize(m)` bytes.
    static func write(_ m: Message, into w: inout ByteWriter) {
        w.u8(WireLimits.version)
        w.u32(m.networkID)
        w.u32(m.id)
        w.u8(m.type.rawValue)
        w.u16(m.command)
        w.u8(m.flags.rawValue)
        w.number160(m.sender.id)
        w.u16(m.sender.tcpPort)
        w.u16(m.sender.udpPort)
        w.u8(m.sender.flags.rawValue)
        w.number160(m.recipientID)
        if m.sender.flags.contains(.relayed) {
            w.u8(UInt8(m.sender.relays.count))
            for r in m.sender.relays { w.socket(r) }
        }
        w.u8(UInt8(m.payload.count))
        for p in m.payload {
            w.u8(p.tag)
            switch p {
            case .keys(let v):
                w.u16(UInt16(v.count))
                for k in v { w.number160(k) }
            case .keys640(let v):
                w.u16(UInt16(v.count))
                for k in v { w.number640(k) }
            case .peers(let v):
                w.u16(UInt16(v.count))
                for a in v {
                    w.number160(a.id)
                    w.socket(a.socket)
                    w.u8(a.flags.rawValue)
                    w.u8(UInt8(a.relays.count))
                    for r in a.relays { w.socket(r) }
                }
            case .bytes(let v):
                w.u32(UInt32(v.count))
                w.bytes(v)
            case .integer(let v):
                w.u64(UInt64(bitPattern: v))
            case .dataMap(let v):
                w.u32(UInt32(v.count))
                for e in v {
                    w.number640(e.key)
                    w.u32(UInt32(e.value.count))
                    w.bytes(e.value)
                }
            }
        }
        if let s = m.signature {
            w.bytes(s.publicKey)
            w.bytes(s.signature)
        }
    }

    // MARK: decoding

    /// Decodes one whole message.
    ///
    /// - Parameters:
    ///   - bytes: exactly one message (one datagram, or one TCP frame without its length prefix).
    ///   - senderIP: the IP the socket reports for the sender; it becomes `message.sender.ip`.
    ///   - networkID: when given, a message of another network is refused before its body is read.
    public static func decode(_ bytes: UnsafeRawBufferPointer, senderIP: IPAddress, networkID: UInt32? = nil) throws(WireError) -> Message {
        guard bytes.count <= WireLimits.maxMessageBytes else {
            throw .limitExceeded(what: "message bytes", value: bytes.count, limit: WireLimits.maxMessageBytes)
        }
        var r = ByteReader(bytes)
        guard r.remaining >= WireLimits.headerBytes else {
            throw .truncated(what: "header", needed: WireLimits.headerBytes, available: r.remaining)
        }
        let version = try r.u8("version")
        guard version == WireLimits.version else { throw .unsupportedVersion(version) }
        let network = try r.u32("network id")
        if let networkID, network != networkID { throw .wrongNetwork(got: network, expected: networkID) }
        let id = try r.u32("message id")
        let rawType = try r.u8("type")
        guard let type = MessageType(rawValue: rawType) else { throw .unknownMessageType(rawType) }
        let command = try r.u16("command")
        let flags = MessageFlags(rawValue: try r.u8("flags"))
        guard flags.isSubset(of: .known) else { throw .reservedBits(what: "message flags", value: flags.rawValue) }
        let senderID = try r.number160("sender id")
        let tcp = try r.u16("sender tcp port")
        let udp = try r.u16("sender udp port")
        let senderFlags = PeerFlags(rawValue: try r.u8("sender flags"))
        guard senderFlags.isSubset(of: .known) else { throw .reservedBits(what: "sender flags", value: senderFlags.rawValue) }
        let recipient = try r.number160("recipient id")
        // A relayed sender lists its relays after the header (where others reach it).
        var senderRelays: [PeerSocketAddress] = []
        if senderFlags.contains(.relayed) {
            let count = Int(try r.u8("sender relay count"))
            guard count <= PeerAddress.maxRelays else {
                throw .limitExceeded(what: "sender relay count", value: count, limit: PeerAddress.maxRelays)
            }
            for _ in 0..<count { senderRelays.append(try r.socket()) }
        }
        let sectionCount = Int(try r.u8("section count"))
        guard sectionCount <= WireLimits.maxSections else {
            throw .limitExceeded(what: "section count", value: sectionCount, limit: WireLimits.maxSections)
        }
        var end = bytes.count
        if flags.contains(.signed) {
            guard end - r.offset >= WireLimits.signatureTrailerBytes else {
                throw .truncated(what: "signature trailer", needed: WireLimits.signatureTrailerBytes, available: end - r.offset)
            }
            end -= WireLimits.signatureTrailerBytes
        }
        r.limit = end
        var payload: [Payload] = []
        payload.reserveCapacity(sectionCount)
        for _ in 0..<sectionCount {
            payload.append(try readSection(&r))
        }
        guard r.remaining == 0 else { throw .trailingBytes(r.remaining) }
        var signature: MessageSignature?
        if flags.contains(.signed) {
            r.limit = bytes.count
            let key = try r.bytes(32, "public key")
            let sig = try r.bytes(64, "signature")
            signature = MessageSignature(publicKey: key, signature: sig)
        }
        let sender = PeerAddress(id: senderID, socket: PeerSocketAddress(ip: senderIP, tcpPort: tcp, udpPort: udp), flags: senderFlags,
                                 relays: senderRelays)
        var m = Message(networkID: network, id: id, type: type, command: command, sender: sender, recipientID: recipient, payload: payload, signature: signature)
        m.flags = flags
        return m
    }

    /// Decodes from an array (convenience for tests and tools).
    public static func decode(_ bytes: [UInt8], senderIP: IPAddress, networkID: UInt32? = nil) throws(WireError) -> Message {
        let result = bytes.withUnsafeBytes { raw in
            Result { () throws(WireError) -> Message in try decode(raw, senderIP: senderIP, networkID: networkID) }
        }
        return try result.get()
    }

    static func readSection(_ r: inout ByteReader) throws(WireError) -> Payload {
        let tag = try r.u8("section tag")
        switch tag {
        case 1:
            let n = Int(try r.u16("key count"))
            try r.require(n, elementSize: 20, what: "keys")
            var keys = [Number160]()
            keys.reserveCapacity(n)
            for _ in 0..<n { keys.append(try r.number160("key")) }
            return .keys(keys)
        case 2:
            let n = Int(try r.u16("key count"))
            try r.require(n, elementSize: 80, what: "640-bit keys")
            var keys = [Number640]()
            keys.reserveCapacity(n)
            for _ in 0..<n { keys.append(try r.number640()) }
            return .keys640(keys)
        case 3:
            let n = Int(try r.u16("peer count"))
            guard n <= WireLimits.maxPeers else { throw .limitExceeded(what: "peer count", value: n, limit: WireLimits.maxPeers) }
            // The smallest peer entry: id, IPv4 socket, flags, relay count.
            try r.require(n, elementSize: 20 + 9 + 2, what: "peers")
            var peers = [PeerAddress]()
            peers.reserveCapacity(n)
            for _ in 0..<n { peers.append(try r.peer()) }
            return .peers(peers)
        case 4:
            let n = Int(try r.u32("byte count"))
            return .bytes(try r.bytes(n, "byte section"))
        case 5:
            return .integer(Int64(bitPattern: try r.u64("integer")))
        case 6:
            let n = Int(try r.u32("map entry count"))
            guard n <= WireLimits.maxMapEntries else { throw .limitExceeded(what: "map entries", value: n, limit: WireLimits.maxMapEntries) }
            try r.require(n, elementSize: 84, what: "map entries")
            var entries = [DataEntry]()
            entries.reserveCapacity(n)
            for _ in 0..<n {
                let key = try r.number640()
                let len = Int(try r.u32("value length"))
                entries.append(DataEntry(key: key, value: try r.bytes(len, "value")))
            }
            return .dataMap(entries)
        default:
            throw .unknownSection(tag)
        }
    }
}

/// A cursor over input bytes; every read checks the bounds first.
struct ByteReader {
    let base: UnsafeRawBufferPointer
    var offset = 0
    var limit: Int

    init(_ base: UnsafeRawBufferPointer) {
        self.base = base
        self.limit = base.count
    }

    var remaining: Int { limit - offset }

    @inline(__always)
    mutating func take(_ n: Int, _ what: String) throws(WireError) -> Int {
        guard n >= 0, remaining >= n else { throw .truncated(what: what, needed: n, available: remaining) }
        let at = offset
        offset += n
        return at
    }

    /// Refuses a count whose elements cannot fit in what is left, before anything is allocated.
    mutating func require(_ count: Int, elementSize: Int, what: String) throws(WireError) {
        let need = count.multipliedReportingOverflow(by: elementSize)
        guard !need.overflow, need.partialValue <= remaining else {
            throw .truncated(what: what, needed: need.overflow ? Int.max : need.partialValue, available: remaining)
        }
    }

    @inline(__always) mutating func u8(_ what: String) throws(WireError) -> UInt8 {
        base[try take(1, what)]
    }
    @inline(__always) mutating func u16(_ what: String) throws(WireError) -> UInt16 {
        UInt16(bigEndian: base.loadUnaligned(fromByteOffset: try take(2, what), as: UInt16.self))
    }
    @inline(__always) mutating func u32(_ what: String) throws(WireError) -> UInt32 {
        UInt32(bigEndian: base.loadUnaligned(fromByteOffset: try take(4, what), as: UInt32.self))
    }
    @inline(__always) mutating func u64(_ what: String) throws(WireError) -> UInt64 {
        UInt64(bigEndian: base.loadUnaligned(fromByteOffset: try take(8, what), as: UInt64.self))
    }
    mutating func number160(_ what: String) throws(WireError) -> Number160 {
        let at = try take(20, what)
        return Number160(
            high: UInt64(bigEndian: base.loadUnaligned(fromByteOffset: at, as: UInt64.self)),
            middle: UInt64(bigEndian: base.loadUnaligned(fromByteOffset: at + 8, as: UInt64.self)),
            low: UInt32(bigEndian: base.loadUnaligned(fromByteOffset: at + 16, as: UInt32.self)))
    }
    mutating func number640() throws(WireError) -> Number640 {
        Number640(location: try number160("location"), domain: try number160("domain"),
                  content: try number160("content"), version: try number160("version"))
    }
    mutating func bytes(_ n: Int, _ what: String) throws(WireError) -> [UInt8] {
        let at = try take(n, what)
        return Array(UnsafeRawBufferPointer(rebasing: base[at..<at + n]))
    }
    mutating func socket() throws(WireError) -> PeerSocketAddress {
        let kind = try u8("ip kind")
        let ip: IPAddress
        switch kind {
        case 4: ip = .v4(try u32("ipv4"))
        case 6: ip = .v6(try u64("ipv6"), try u64("ipv6"))
        default: throw .unknownIPKind(kind)
        }
        return PeerSocketAddress(ip: ip, tcpPort: try u16("tcp port"), udpPort: try u16("udp port"))
    }
    mutating func peer() throws(WireError) -> PeerAddress {
        let id = try number160("peer id")
        let s = try socket()
        let flags = PeerFlags(rawValue: try u8("peer flags"))
        guard flags.isSubset(of: .known) else { throw .reservedBits(what: "peer flags", value: flags.rawValue) }
        let relayCount = Int(try u8("relay count"))
        guard relayCount <= PeerAddress.maxRelays else {
            throw .limitExceeded(what: "relay count", value: relayCount, limit: PeerAddress.maxRelays)
        }
        var relays: [PeerSocketAddress] = []
        if relayCount > 0 {
            relays.reserveCapacity(relayCount)
            for _ in 0..<relayCount { relays.append(try socket()) }
        }
        return PeerAddress(id: id, socket: s, flags: flags, relays: relays)
    }
}

/// Writes into a buffer sized beforehand by `WireCodec.encodedSize`.
struct ByteWriter {
    let base: UnsafeMutableRawBufferPointer
    var offset = 0

    init(_ base: UnsafeMutableRawBufferPointer) { self.base = base }

    @inline(__always) mutating func u8(_ v: UInt8) {
        base[offset] = v
        offset += 1
    }
    @inline(__always) mutating func u16(_ v: UInt16) {
        base.storeBytes(of: v.bigEndian, toByteOffset: offset, as: UInt16.self)
        offset += 2
    }
    @inline(__always) mutating func u32(_ v: UInt32) {
        base.storeBytes(of: v.bigEndian, toByteOffset: offset, as: UInt32.self)
        offset += 4
    }
    @inline(__always) mutating func u64(_ v: UInt64) {
        base.storeBytes(of: v.bigEndian, toByteOffset: offset, as: UInt64.self)
        offset += 8
    }
    @inline(__always) mutating func number160(_ v: Number160) {
        u64(v.high)
        u64(v.middle)
        u32(v.low)
    }
    mutating func number640(_ v: Number640) {
        number160(v.location)
        number160(v.domain)
        number160(v.content)
        number160(v.version)
    }
    mutating func bytes(_ v: [UInt8]) {
        v.withUnsafeBytes { src in
            UnsafeMutableRawBufferPointer(rebasing: base[offset..<offset + src.count]).copyMemory(from: src)
        }
        offset += v.count
    }
    mutating func socket(_ s: PeerSocketAddress) {
        switch s.ip {
        case .v4(let v):
            u8(4)
            u32(v)
        case .v6(let hi, let lo):
            u8(6)
            u64(hi)
            u64(lo)
        }
        u16(s.tcpPort)
        u16(s.udpPort)
    }
}
