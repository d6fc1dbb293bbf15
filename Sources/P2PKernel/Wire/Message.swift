/// What a message is: a request, a fire-and-forget notice, or one of the replies.
public enum MessageType: UInt8, Sendable, CaseIterable {
    /// Expects exactly one reply with the same message id.
    case request = 0
    /// Expects no reply.
    case fireAndForget = 1
    /// The request succeeded.
    case ok = 2
    /// The request was understood but what it asked for is not here.
    case notFound = 3
    /// The peer refuses the request.
    case denied = 4
    /// The peer failed while handling the request; a byte section may carry the reason.
    case exception = 5
    /// The peer has no handler for the command.
    case unknownCommand = 6
    /// The request was malformed for its command; a byte section may carry the reason.
    case badRequest = 7
    /// The reply does not fit one datagram: the requester sends the request again over TCP.
    case retryOverTCP = 8
    /// The peer only talks in authenticated sessions and refuses this plaintext request.
    case sessionRequired = 9

    /// Whether this type answers a request.
    public var isReply: Bool { rawValue >= MessageType.ok.rawValue }
}

/// Message-level flags.
public struct MessageFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// A 96-byte trailer (Ed25519 public key and signature) follows the sections.
    public static let signed = MessageFlags(rawValue: 1 << 0)
    /// Every flag this version defines.
    public static let known: MessageFlags = [.signed]
}

/// One entry of a key→data map section.
public struct DataEntry: Hashable, Sendable {
    public var key: Number640
    public var value: [UInt8]
    public init(key: Number640, value: [UInt8]) {
        self.key = key
        self.value = value
    }
}

/// A typed payload section.
public enum Payload: Hashable, Sendable {
    case keys([Number160])
    case keys640([Number640])
    case peers([PeerAddress])
    case bytes([UInt8])
    case integer(Int64)
    case dataMap([DataEntry])

    /// The wire tag of this section kind.
    public var tag: UInt8 {
        switch self {
        case .keys: 1
        case .keys640: 2
        case .peers: 3
        case .bytes: 4
        case .integer: 5
        case .dataMap: 6
        }
    }
}

/// An Ed25519 signature over a message, carried in the trailer (verification is a later layer's).
public struct MessageSignature: Hashable, Sendable {
    /// 32 bytes.
    public var publicKey: [UInt8]
    /// 64 bytes.
    public var signature: [UInt8]
    public init(publicKey: [UInt8], signature: [UInt8]) {
        self.publicKey = publicKey
        self.signature = signature
    }
}

/// A message on the wire: a fixed header and typed payload sections.
///
/// The sender's IP is not encoded: the receiver takes it from the socket, which is how a peer
/// learns the address others see it from. Only the sender's id, ports and flags travel.
public struct Message: Hashable, Sendable {
    public var networkID: UInt32
    public var id: UInt32
    public var type: MessageType
    public var command: UInt16
    public var flags: MessageFlags
    public var sender: PeerAddress
    public var recipientID: Number160
    public var payload: [Payload]
    /// Present exactly when `flags` contains `.signed`.
    public var signature: MessageSignature?

    public init(networkID: UInt32, id: UInt32, type: MessageType, command: UInt16, sender: PeerAddress,
                recipientID: Number160, payload: [Payload] = [], signature: MessageSignature? = nil) {
        self.networkID = networkID
        self.id = id
        self.type = type
        self.command = command
        self.flags = signature == nil ? [] : .signed
        self.sender = sender
        self.recipientID = recipientID
        self.payload = payload
        self.signature = signature
    }

    /// The first section of each kind, for handlers that expect one.
    public var firstKeys: [Number160]? {
        for p in payload { if case .keys(let v) = p { return v } }
        return nil
    }
    public var firstPeers: [PeerAddress]? {
        for p in payload { if case .peers(let v) = p { return v } }
        return nil
    }
    public var firstBytes: [UInt8]? {
        for p in payload { if case .bytes(let v) = p { return v } }
        return nil
    }
    public var firstInteger: Int64? {
        for p in payload { if case .integer(let v) = p { return v } }
        return nil
    }
}
