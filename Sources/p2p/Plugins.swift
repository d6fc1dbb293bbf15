import P2PDHT
import P2PEvaluation
import P2PKernel
import P2PMessaging
import P2PPeerVote
import P2PStorage
import P2PTracker

/// The built-in plugins by the names `--plugins` takes.
enum BuiltInPlugins {
    static let names = ["dht", "messaging", "evaluation", "peervote", "tracker"]

    /// The plugins for a node that serves others.
    static func make(_ names: [String], peerID: @escaping @Sendable () -> String, backend: (any StorageBackend)? = nil) throws -> [any Plugin] {
        try names.map { name -> any Plugin in
            switch name {
            case "dht": backend.map { DHTPlugin(backend: $0) } ?? DHTPlugin()
            case "messaging": MessagingPlugin(raw: EchoReply(peerID: peerID))
            case "evaluation": EvaluationPlugin()
            case "peervote": PeerVotePlugin()
            case "tracker": TrackerPlugin()
            default: throw CLIError.usage("unknown plugin '\(name)' (built-in: \(Self.names.joined(separator: ", ")))")
            }
        }
    }

    /// The plugins of a short-lived client: it reads and writes but stores nothing for others.
    static var client: [any Plugin] { [DHTPlugin(acceptsReplicas: false), EvaluationPlugin(), MessagingPlugin(), TrackerPlugin()] }
}

/// What `p2p node` answers to raw direct messages and routed sends: the text back, signed with
/// the peer's id so the sender sees who answered.
struct EchoReply: RawReplyHandler {
    let peerID: @Sendable () -> String
    func reply(to bytes: [UInt8], from sender: PeerAddress) async throws -> [UInt8] {
        Array("\(peerID()) got: ".utf8) + bytes
    }
}
