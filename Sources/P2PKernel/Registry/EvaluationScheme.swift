/// What one peer answered to a get or a routed send (a send's reply sits under key `.zero`).
public struct PeerAnswer: Sendable, Hashable {
    public var peer: PeerAddress
    public var entries: [Number640: [UInt8]]
    public init(peer: PeerAddress, entries: [Number640: [UInt8]]) {
        self.peer = peer
        self.entries = entries
    }
}

/// Turns the answers of several peers into one (majority vote, union, latest version, first
/// answer …). Chosen per request by name.
public protocol EvaluationScheme: Sendable {
    var name: String { get }
    func evaluate(_ answers: [PeerAnswer]) -> [Number640: [UInt8]]
}

/// Reacts to what happens to data and peers: direct replication (the owner refreshes) and
/// indirect replication (a responsible peer copies to the others) are implementations of this.
public protocol ReplicationPolicy: Sendable {
    var name: String { get }
    /// How often the node sends `.timer`; nil for never.
    var timerInterval: Duration? { get }
    func handle(_ event: ReplicationEvent, context: ReplicationContext) async
    /// Called synchronously, before `handle`, where the event happens (for what must be known at
    /// once, such as a removal that a replica in flight must not undo).
    func record(_ event: ReplicationEvent, context: ReplicationContext)
}

extension ReplicationPolicy {
    public var timerInterval: Duration? { nil }
    public func record(_ event: ReplicationEvent, context: ReplicationContext) {}
}

/// What a replication policy is told.
public enum ReplicationEvent: Sendable, Hashable {
    /// Values were stored on this peer (from a put by anyone).
    case dataInserted([Number640])
    /// Values were removed from this peer by a remove request (not by expiry): replication must
    /// not bring them back.
    case dataRemoved([Number640])
    case peerInserted(PeerAddress)
    case peerRemoved(PeerAddress)
    case timer
}

/// What a replication policy may use.
public struct ReplicationContext: Sendable {
    public let node: Node
}
