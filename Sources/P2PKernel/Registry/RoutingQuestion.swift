/// Answers a plugin's question carried inside a routing step, so an operation can finish inside
/// the lookup instead of after it (Kademlia's FIND_VALUE; TomP2P's digests during routing).
///
/// Runs on the event loop for every neighbors request that carries its question: it must be
/// fast and must not block. Return nil when the answer needs more than a quick local look (the
/// asker then asks the usual way after the lookup).
public protocol RoutingQuestionHandler: Sendable {
    /// Unique name; the 16-bit id travelling in the request is derived from it.
    var name: String { get }
    func answer(_ question: [Payload], key: Number160, context: CommandContext) -> [Payload]?
}

/// A question to carry in every request of one lookup.
public struct RoutingQuestion: Sendable {
    /// The wire id of the handler (`CommandID.derive(from: handler.name)`).
    public let id: UInt16
    public let payload: [Payload]
    /// Whether an answer is a direct hit (the peer has what was asked); `maxDirectHits` counts these.
    public let isHit: @Sendable ([Payload]) -> Bool

    public init(handlerName: String, payload: [Payload], isHit: @escaping @Sendable ([Payload]) -> Bool) {
        self.id = CommandID.derive(from: handlerName)
        self.payload = payload
        self.isHit = isHit
    }
}

/// One peer's answer to a routing question.
public struct RoutingAnswer: Sendable {
    public let peer: PeerAddress
    public let payload: [Payload]
    public let isHit: Bool
}
