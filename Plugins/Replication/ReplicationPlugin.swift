import NIOConcurrencyHelpers
import NIOCore
import P2PDHT
import P2PKernel
import P2PStorage

/// Replication as a plugin: installs a `ReplicationPolicy` and, for indirect replication, the
/// `replication.offer` command through which a responsible peer asks which keys a replica lacks.
/// Needs a storage backend (the DHT plugin's), installed before it.
public struct ReplicationPlugin: Plugin {
    public let name = "replication"
    public let version = "1.0.0"
    /// Indirect replication (the responsible peers keep the copies), if chosen.
    public let indirect: IndirectReplication?
    /// Direct replication (the owner republishes), if chosen.
    public let direct: DirectReplication?

    /// Indirect replication (n-root, factor 6, every 60 s by default).
    public init(_ policy: IndirectReplication = IndirectReplication()) {
        indirect = policy
        direct = nil
    }

    /// Direct replication: publish through `direct.publish`.
    public init(direct: DirectReplication) {
        indirect = nil
        self.direct = direct
    }

    public func install(into registry: PluginRegistry) throws {
        if let indirect {
            try registry.register(command: ReplicationOfferCommand(policy: indirect))
            try registry.register(command: ReplicationPushCommand(policy: indirect))
            registry.add(replicationPolicy: indirect)
        }
        if let direct { registry.add(replicationPolicy: direct) }
    }

    /// Reports what replication sent: counters (`p2p_replication_…_total`, beside the kernel's
    /// per-command message counts of `replication.offer` and `replication.push`) and a status section.
    public func start(node: Node) async throws {
        if let indirect {
            if let metrics = node.metrics {
                let offers = metrics.counter("p2p_replication_offers_total")
                let keys = metrics.counter("p2p_replication_keys_offered_total")
                let values = metrics.counter("p2p_replication_values_sent_total")
                let bytes = metrics.counter("p2p_replication_bytes_sent_total")
                let failed = metrics.counter("p2p_replication_failures_total")
                let last = NIOLockedValueBox(ReplicationStats())
                metrics.addSampler {
                    let now = indirect.stats
                    let before = last.withLockedValue { old in
                        defer { old = now }
                        return old
                    }
                    offers.increment(by: Int64(max(0, now.offers - before.offers)))
                    keys.increment(by: Int64(max(0, now.keysOffered - before.keysOffered)))
                    values.increment(by: Int64(max(0, now.valuesSent - before.valuesSent)))
                    bytes.increment(by: Int64(max(0, now.bytesSent - before.bytesSent)))
                    failed.increment(by: Int64(max(0, (now.failedOffers + now.failedPuts) - (before.failedOffers + before.failedPuts))))
                }
            }
            node.registry.addStatus("replication") {
                let s = indirect.stats
                return [("policy", "indirect"), ("rounds", "\(s.rounds)"), ("offers", "\(s.offers)"), ("values sent", "\(s.valuesSent)"),
                        ("bytes sent", "\(s.bytesSent)"), ("failed", "\(s.failedOffers + s.failedPuts)")]
            }
        }
        if let direct {
            node.registry.addStatus("replication") {
                let s = direct.sent
                return [("policy", "direct"), ("puts sent", "\(s.puts)"), ("removes sent", "\(s.removes)")]
            }
        }
    }
}

/// Answers an offer of keys with those this peer lacks and has not removed lately.
///
/// Request: `keys640` (at most `maxKeys`, all of one location). Reply: `keys640` of the keys
/// wanted. An offer costs one lookup per key; a larger one is refused as a bad request.
struct ReplicationOfferCommand: CommandHandler {
    static let commandName = "replication.offer"
    let name = ReplicationOfferCommand.commandName
    let policy: IndirectReplication
    /// Keys one offer may carry (as many as one storage request names).
    static let maxKeys = 1_000

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        guard case .keys640(let keys)? = request.payload.first else { return .reply(.error(.badRequest, "an offer is one keys640 section")) }
        guard keys.count <= Self.maxKeys else { return .reply(.error(.badRequest, "an offer of \(keys.count) keys, over \(Self.maxKeys)")) }
        guard let location = keys.first?.location, keys.allSatisfy({ $0.location == location }) else {
            return .reply(Reply(payload: [.keys640([])]))
        }
        guard let backend = context.node.registry.storageBackend else { return .reply(.error(.denied, "no storage here")) }
        let held: Set<Number640>
        let now = context.node.clock.uptimeNanoseconds
        if case .digest(let d)? = try? backend.execute(.digest(.keys(keys)), now: now) {
            held = Set(d.keys)
        } else {
            held = []
        }
        let wanted = keys.filter { !held.contains($0) && !policy.isTombstoned($0, now: now) }
        return .reply(Reply(payload: [.keys640(wanted)]))
    }
}

/// Stores the values a responsible peer pushes after an offer: a put in the `dht.storage`
/// encoding, less any key removed here lately (so a replica already on its way cannot undo a
/// remove), handed to this node's own `dht.storage` command — the same admission, domain and
/// replica rules, interceptors, protection and events as any put.
struct ReplicationPushCommand: CommandHandler {
    static let commandName = "replication.push"
    static let storageCommand = DHTPlugin.storageCommand
    let name = ReplicationPushCommand.commandName
    let policy: IndirectReplication

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        let node = context.node
        guard let storage = node.registry.commands.handler(for: Self.storageCommand) else {
            return .reply(.error(.denied, "no dht.storage command here"))
        }
        guard case .put(let entries, let mode)? = try? StorageCodec.decodeSignedRequest(request.payload, maxEntries: node.storage.limits.maxEntriesPerRequest).request else {
            return .reply(.error(.badRequest, "a push is one put of at most \(node.storage.limits.maxEntriesPerRequest) values"))
        }
        let now = node.clock.uptimeNanoseconds
        let kept = entries.filter { !policy.isTombstoned($0.key, now: now) }
        guard !kept.isEmpty else { return .reply(Reply(payload: StorageCodec.encode(.statuses([:])))) }
        var forwarded = request
        forwarded.payload = StorageCodec.encode(.put(kept, mode: mode.subtracting(.protectDomain)))
        return storage.handle(forwarded, context: context)
    }
}
