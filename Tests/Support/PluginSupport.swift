/// Helpers the plugin, DHT and storage test targets share (a target of its own: test targets
/// cannot import each other).
import P2PDHT
import P2PEvaluation
import P2PKernel
import P2PMessaging
import P2PPeerVote
import P2PStorage
import P2PTesting

/// Answers "hello" with "world".
public struct Greeter: ObjectReplyHandler {
    public init() {}
    public func reply(to request: String, from sender: PeerAddress) async throws -> String {
        request == "hello" ? "world" : "what?"
    }
}

/// Echoes bytes back with a prefix.
public struct Echo: RawReplyHandler {
    public init() {}
    public func reply(to bytes: [UInt8], from sender: PeerAddress) async throws -> [UInt8] {
        Array("echo:".utf8) + bytes
    }
}

/// Every built-in plugin, as `p2p node` installs them.
public func builtIns(backend: MemoryStorage = MemoryStorage(), domains: Set<Number160>? = nil) -> [any Plugin] {
    [DHTPlugin(backend: backend, domains: domains), MessagingPlugin(raw: Echo(), objects: Greeter()), EvaluationPlugin(), PeerVotePlugin()]
}

public func testnet(_ n: Int, routing: Testnet.Routing = .perfect) async throws -> Testnet {
    try await Testnet.start(peers: n, routing: routing, plugins: { _ in builtIns() })
}

public func key(_ text: String, domain: Number160 = .zero) -> Number640 {
    Number640(location: Number160(hashing: text), domain: domain)
}

public func text(_ bytes: [UInt8]?) -> String? { bytes.map { String(decoding: $0, as: UTF8.self) } }

/// Whether this peer's own storage holds the key (read straight from its backend).
public func holds(_ node: Node, _ k: Number640) throws -> Bool {
    guard let backend = node.registry.storageBackend,
          case .values(let v, _) = try backend.execute(.get(.keys([k])), now: node.clock.uptimeNanoseconds) else { return false }
    return v[k] != nil
}

