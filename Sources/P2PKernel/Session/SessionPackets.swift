/// Why a peer refused a handshake.
public enum RefusalReason: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// The peer runs without sessions (insecure mode).
    case insecurePeer = 1
    /// The peer speaks another handshake version.
    case unsupportedVersion = 2
    /// The peer is on another network id.
    case otherNetwork = 3
    /// The initiator asked for a peer id that is not the responder's.
    case notThisPeer = 4

    public var description: String {
        switch self {
        case .insecurePeer: "the peer runs without authenticated sessions (insecure mode)"
        case .unsupportedVersion: "the peer speaks another handshake version"
        case .otherNetwork: "the peer is on another network"
        case .notThisPeer: "the peer at this address has another id"
        }
    }
}

/// Sizes and versions of the session layer's packets; docs/WIRE.md lays them out byte by byte.
public enum SessionWire {
    /// The handshake version this build speaks.
    public static let handshakeVersion: UInt8 = 1
    /// INIT is padded to this size, more than RESPONSE, so that answering an unauthenticated
    /// INIT never sends more bytes than it received (no amplification).
    public static let initBytes = 160
    /// RESPONSE's size.
    public static let responseBytes = 146
    /// FINISH's header, up to and including the counter of the sealed message it carries.
    public static let finishHeaderBytes = 154
    /// A sealed packet's header: kind, receiver index, counter.
    public static let sealedHeaderBytes = 17
    /// The AEAD tag after every sealed body.
    public static let tagBytes = 16
    /// SESSION_UNKNOWN's size.
    public static let sessionUnknownBytes = 9
    /// REFUSED's size.
    public static let refusedBytes = 10
    /// Bytes a sealed message adds to the plaintext message it carries.
    public static let sealedOverhead = sealedHeaderBytes + tagBytes
    /// Largest datagram the session layer sends: a UDP-sized message in a FINISH.
    public static let maxDatagramBytes = WireLimits.udpPayloadLimit + finishHeaderBytes + tagBytes
}

/// INIT: initiator → responder.
public struct HandshakeInit: Equatable, Sendable {
    public var networkID: UInt32
    /// X25519 public key, 32 bytes.
    public var ephemeral: [UInt8]
    /// Where the responder addresses sealed packets to the initiator.
    public var initiatorIndex: UInt64
    /// The peer id the initiator expects to reach; zero when it does not know (a ping to an
    /// address). A responder with another id refuses at once.
    public var responderHint: Number160

    public init(networkID: UInt32, ephemeral: [UInt8], initiatorIndex: UInt64, responderHint: Number160) {
        self.networkID = networkID
        self.ephemeral = ephemeral
        self.initiatorIndex = initiatorIndex
        self.responderHint = responderHint
    }
}

/// RESPONSE: responder → initiator.
public struct HandshakeResponse: Equatable, Sendable {
    public var initiatorIndex: UInt64
    /// Where the initiator addresses sealed packets to the responder.
    public var responderIndex: UInt64
    /// X25519 public key, 32 bytes.
    public var ephemeral: [UInt8]
    /// The responder's Ed25519 public key, 32 bytes; its SHA-1 is the responder's peer id.
    public var identity: [UInt8]
    /// Ed25519 signature over the transcript hash T1, 64 bytes.
    public var signature: [UInt8]

    public init(initiatorIndex: UInt64, responderIndex: UInt64, ephemeral: [UInt8], identity: [UInt8], signature: [UInt8]) {
        self.initiatorIndex = initiatorIndex
        self.responderIndex = responderIndex
        self.ephemeral = ephemeral
        self.identity = identity
        self.signature = signature
    }
}

/// FINISH's header: initiator → responder; a sealed body follows it.
public struct HandshakeFinish: Equatable, Sendable {
    public var responderIndex: UInt64
    public var initiatorIndex: UInt64
    /// The initiator's X25519 public key again (the responder keeps no state between INIT and
    /// FINISH: it derives its own ephemeral key again from this one).
    public var ephemeral: [UInt8]
    /// The initiator's Ed25519 public key, 32 bytes.
    public var identity: [UInt8]
    /// Ed25519 signature over the transcript hash T2, 64 bytes.
    public var signature: [UInt8]
    /// The counter (nonce) of the sealed body.
    public var counter: UInt64

    public init(responderIndex: UInt64, initiatorIndex: UInt64, ephemeral: [UInt8], identity: [UInt8],
                signature: [UInt8], counter: UInt64) {
        self.responderIndex = responderIndex
        self.initiatorIndex = initiatorIndex
        self.ephemeral = ephemeral
        self.identity = identity
        self.signature = signature
        self.counter = counter
    }
}

/// A sealed packet's header.
public struct SealedHeader: Equatable, Sendable {
    public var receiverIndex: UInt64
    public var counter: UInt64
    public init(receiverIndex: UInt64, counter: UInt64) {
        self.receiverIndex = receiverIndex
        self.counter = counter
    }
}

/// Any packet of the session layer, decoded (the sealed bodies stay bytes: opening them needs keys).
public enum SessionPacket: Equatable, Sendable {
    case handshakeInit(HandshakeInit)
    case handshakeResponse(HandshakeResponse)
    /// The header, and where the sealed body (ciphertext and tag) starts.
    case handshakeFinish(HandshakeFinish, bodyOffset: Int)
    case sealed(SealedHeader)
    case sessionUnknown(index: UInt64)
    case refused(RefusalReason, initiatorIndex: UInt64)
}

/// Encodes and decodes the session layer's packets (docs/WIRE.md). Decoding checks every length
/// against the bytes present, so arbitrary input yields a `WireError` or a packet, never a trap.
public enum SessionCodec {
    /// Decodes the header part of any session packet. A plaintext message (first byte 1) is not a
    /// session packet and is refused with `unsupportedVersion`; callers look at the first byte
    /// before calling this.
    public static func decode(_ bytes: UnsafeRawBufferPointer) throws(WireError) -> SessionPacket {
        var r = ByteReader(bytes)
        let first = try r.u8("packet kind")
        guard let kind = PacketKind(rawValue: first), kind.layer == .session else { throw .unsupportedVersion(first) }
        switch kind {
        case .handshakeInit:
            guard bytes.count == SessionWire.initBytes else {
                throw .limitExceeded(what: "INIT bytes (must be exactly \(SessionWire.initBytes))", value: bytes.count, limit: SessionWire.initBytes)
            }
            try version(&r)
            let network = try r.u32("network id")
            let ephemeral = try r.bytes(32, "ephemeral key")
            let index = try r.u64("initiator index")
            let hint = try r.number160("responder hint")
            // The padding is zeros: one encoding per packet, like every message.
            while r.remaining > 0 {
                let b = try r.u8("padding")
                guard b == 0 else { throw .reservedBits(what: "INIT padding", value: b) }
            }
            return .handshakeInit(HandshakeInit(networkID: network, ephemeral: ephemeral, initiatorIndex: index, responderHint: hint))
        case .handshakeResponse:
            guard bytes.count == SessionWire.responseBytes else {
                throw .limitExceeded(what: "RESPONSE bytes (must be exactly \(SessionWire.responseBytes))", value: bytes.count, limit: SessionWire.responseBytes)
            }
            try version(&r)
            let i = try r.u64("initiator index")
            let j = try r.u64("responder index")
            return .handshakeResponse(HandshakeResponse(initiatorIndex: i, responderIndex: j, ephemeral: try r.bytes(32, "ephemeral key"),
                                                        identity: try r.bytes(32, "identity key"), signature: try r.bytes(64, "signature")))
        case .handshakeFinish:
            guard bytes.count >= SessionWire.finishHeaderBytes + SessionWire.tagBytes else {
                throw .truncated(what: "FINISH", needed: SessionWire.finishHeaderBytes + SessionWire.tagBytes, available: bytes.count)
            }
            try version(&r)
            let j = try r.u64("responder index")
            let i = try r.u64("initiator index")
            let finish = HandshakeFinish(responderIndex: j, initiatorIndex: i, ephemeral: try r.bytes(32, "ephemeral key"),
                                         identity: try r.bytes(32, "identity key"), signature: try r.bytes(64, "signature"),
                                         counter: try r.u64("counter"))
            return .handshakeFinish(finish, bodyOffset: r.offset)
        case .sealed:
            guard bytes.count >= SessionWire.sealedOverhead else {
                throw .truncated(what: "sealed packet", needed: SessionWire.sealedOverhead, available: bytes.count)
            }
            return .sealed(SealedHeader(receiverIndex: try r.u64("receiver index"), counter: try r.u64("counter")))
        case .sessionUnknown:
            guard bytes.count == SessionWire.sessionUnknownBytes else {
                throw .limitExceeded(what: "SESSION_UNKNOWN bytes", value: bytes.count, limit: SessionWire.sessionUnknownBytes)
            }
            return .sessionUnknown(index: try r.u64("index"))
        case .refused:
            guard bytes.count == SessionWire.refusedBytes else {
                throw .limitExceeded(what: "REFUSED bytes", value: bytes.count, limit: SessionWire.refusedBytes)
            }
            let raw = try r.u8("refusal reason")
            guard let reason = RefusalReason(rawValue: raw) else { throw .unknownMessageType(raw) }
            return .refused(reason, initiatorIndex: try r.u64("initiator index"))
        case .plaintext, .probe, .observe, .observeAnswer, .toRelay, .toClient, .fromClient, .fromRelay, .punch:
            throw .unsupportedVersion(first)
        }
    }

    /// Decodes from an array (tests and tools).
    public static func decode(_ bytes: [UInt8]) throws(WireError) -> SessionPacket {
        let result = bytes.withUnsafeBytes { raw in Result { () throws(WireError) -> SessionPacket in try decode(raw) } }
        return try result.get()
    }

    private static func version(_ r: inout ByteReader) throws(WireError) {
        let v = try r.u8("handshake version")
        guard v == SessionWire.handshakeVersion else { throw .unsupportedVersion(v) }
    }

    // MARK: encoding

    /// INIT, padded with zeros to `SessionWire.initBytes`.
    public static func encode(_ p: HandshakeInit) -> [UInt8] {
        build(SessionWire.initBytes) { w in
            w.u8(PacketKind.handshakeInit.rawValue)
            w.u8(SessionWire.handshakeVersion)
            w.u32(p.networkID)
            w.fixed(p.ephemeral, 32)
            w.u64(p.initiatorIndex)
            w.number160(p.responderHint)
            while w.offset < SessionWire.initBytes { w.u8(0) }
        }
    }

    public static func encode(_ p: HandshakeResponse) -> [UInt8] {
        build(SessionWire.responseBytes) { w in
            w.u8(PacketKind.handshakeResponse.rawValue)
            w.u8(SessionWire.handshakeVersion)
            w.u64(p.initiatorIndex)
            w.u64(p.responderIndex)
            w.fixed(p.ephemeral, 32)
            w.fixed(p.identity, 32)
            w.fixed(p.signature, 64)
        }
    }

    /// FINISH's header (the sealed body is appended by the session).
    public static func encode(_ p: HandshakeFinish) -> [UInt8] {
        build(SessionWire.finishHeaderBytes) { w in
            w.u8(PacketKind.handshakeFinish.rawValue)
            w.u8(SessionWire.handshakeVersion)
            w.u64(p.responderIndex)
            w.u64(p.initiatorIndex)
            w.fixed(p.ephemeral, 32)
            w.fixed(p.identity, 32)
            w.fixed(p.signature, 64)
            w.u64(p.counter)
        }
    }

    public static func encode(_ h: SealedHeader) -> [UInt8] {
        build(SessionWire.sealedHeaderBytes) { w in
            w.u8(PacketKind.sealed.rawValue)
            w.u64(h.receiverIndex)
            w.u64(h.counter)
        }
    }

    public static func encodeSessionUnknown(index: UInt64) -> [UInt8] {
        build(SessionWire.sessionUnknownBytes) { w in
            w.u8(PacketKind.sessionUnknown.rawValue)
            w.u64(index)
        }
    }

    public static func encodeRefused(_ reason: RefusalReason, initiatorIndex: UInt64) -> [UInt8] {
        build(SessionWire.refusedBytes) { w in
            w.u8(PacketKind.refused.rawValue)
            w.u8(reason.rawValue)
            w.u64(initiatorIndex)
        }
    }

    private static func build(_ size: Int, _ body: (inout ByteWriter) -> Void) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: size) { buffer, count in
            var w = ByteWriter(UnsafeMutableRawBufferPointer(buffer))
            body(&w)
            count = w.offset
        }
    }
}

extension ByteWriter {
    /// Writes exactly `count` bytes: the array's, cut or zero-filled to size (keys and signatures
    /// are fixed-size fields; a wrong-sized one is a programming error caught by the tests).
    mutating func fixed(_ v: [UInt8], _ count: Int) {
        for i in 0..<count { u8(i < v.count ? v[i] : 0) }
    }
}
