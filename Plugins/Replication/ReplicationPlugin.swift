import Crypto
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
            try registry.register(command: ReplicationSummaryCommand(policy: indirect))
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
                        ("bytes sent", "\(s.bytesSent)"), ("failed", "\(s.failedOffers + s.failedPuts)"),
                        ("refused (peers that take no replicas)", "\(s.refusedOffers)")]
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

/// Answers an offer of versions with the keys this peer lacks or holds older, and pushes back to
/// the offering peer what it holds newer.
///
/// Request: `keys640` (at most `maxKeys`, all of one location) and `bytes`: per key a 17-byte
/// version — u64 stamp, u8 flags (1: a removal), u64 digest of the bytes. Reply: `keys640` of the
/// keys wanted, then `integer(1)` when it declined copies of keys it does not hold (it knows it is
/// no replica of the location). An offer costs one lookup per key; a larger or malformed one is refused as a bad
/// request. What is pushed back goes within this peer's byte budget for the offering peer, so an
/// offer cannot make it send more than a sync would.
struct ReplicationOfferCommand: CommandHandler {
    static let commandName = "replication.offer"
    let name = ReplicationOfferCommand.commandName
    let policy: IndirectReplication
    /// Keys one offer may carry (as many as one storage request names).
    static let maxKeys = 1_000
    /// Bytes per offered version.
    static let versionBytes = 17

    static func encode(_ versions: [EntryVersion]) -> [Payload] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(versions.count * versionBytes)
        for v in versions {
            for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v.stamp >> UInt64(shift))) }
            bytes.append(v.isTombstone ? 1 : 0)
            for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v.digest >> UInt64(shift))) }
        }
        return [.keys640(versions.map(\.key)), .bytes(bytes)]
    }

    /// The offered versions; nil when the sections do not fit together.
    static func decode(_ payload: [Payload]) -> [EntryVersion]? {
        guard payload.count == 2, case .keys640(let keys) = payload[0], case .bytes(let b) = payload[1],
              b.count == keys.count * versionBytes else { return nil }
        var out: [EntryVersion] = []
        out.reserveCapacity(keys.count)
        for (i, key) in keys.enumerated() {
            let at = i * versionBytes
            guard b[at + 8] <= 1 else { return nil }
            let stamp = b[at..<at + 8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            let digest = b[at + 9..<at + 17].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            out.append(EntryVersion(key: key, stamp: stamp, isTombstone: b[at + 8] == 1, digest: digest))
        }
        return out
    }

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        guard case .keys640(let keys)? = request.payload.first else { return .reply(.error(.badRequest, "an offer is a keys640 and a bytes section")) }
        guard keys.count <= Self.maxKeys else { return .reply(.error(.badRequest, "an offer of \(keys.count) keys, over \(Self.maxKeys)")) }
        guard let offered = Self.decode(request.payload) else {
            return .reply(.error(.badRequest, "an offer needs \(Self.versionBytes) version bytes per key"))
        }
        guard let location = keys.first?.location, keys.allSatisfy({ $0.location == location }) else {
            return .reply(Reply(payload: [.keys640([])]))
        }
        let node = context.node
        guard let backend = node.registry.storageBackend else { return .reply(.error(.denied, "no storage here")) }
        // A peer that knows it is no replica of the location (beyond the set and its margin)
        // takes no new copy: it would hand it back and forget it.
        let wanting = policy.wantsCopies(of: location, node: node)
        let held = backend.replicaEntries(keys, now: node.clock.uptimeNanoseconds)
        var wanted: [Number640] = []
        var newer: [Number640: StoredValue] = [:]
        var declined = false
        for v in offered {
            guard let mine = held[v.key] else {
                if wanting { wanted.append(v.key) } else { declined = true }
                continue
            }
            let here = EntryVersion(key: v.key, mine)
            if v.supersedes(here) {
                // A newer version of what is held is always taken: it adds no copy.
                wanted.append(v.key)
            } else if here.supersedes(v) {
                newer[v.key] = mine
            }
        }
        // Pushed back only to a peer that may well be a replica of the location (among the
        // closest this peer knows): a stranger's offer cannot draw data out of it.
        if !newer.isEmpty, node.peerMap.closest(to: location, count: 2 * policy.factor + 1).contains(where: { $0.id == context.sender.id }) {
            let sender = context.sender
            let policy = self.policy
            let newer = newer
            node.spawn { _ = await policy.push(newer, to: sender, node: node) }
        }
        // Copies declined are said so (a second section, 1): the offering peer does not count
        // this peer as holding them.
        return .reply(Reply(payload: declined ? [.keys640(wanted), .integer(1)] : [.keys640(wanted)]))
    }
}

/// Stores the entries a responsible peer pushes after an offer: a put in the `dht.storage`
/// encoding, handed to this node's own `dht.storage` command — the same admission, domain and
/// replica rules, interceptors, protection, version order and events as any put (an entry older
/// than the one held here changes nothing, so a copy on its way cannot undo a newer write or a
/// remove).
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
        guard !entries.isEmpty else { return .reply(Reply(payload: StorageCodec.encode(.statuses([:])))) }
        var forwarded = request
        forwarded.payload = StorageCodec.encode(.put(entries, mode: mode.subtracting(.protectDomain)))
        return storage.handle(forwarded, context: context)
    }
}

/// A location's versions in 12 bytes: how many, and a hash of them all (key, stamp, removal
/// flag and digest of each, in key order). Two peers that hold the same versions of a location
/// have the same summary; an unchanged location costs one summary a sync instead of its list.
struct LocationSummary: Equatable {
    var count: UInt32
    var hash: UInt64

    init(_ versions: [EntryVersion]) {
        var sha = SHA256()
        for v in versions {
            for n in [v.key.location, v.key.domain, v.key.content, v.key.version] { sha.update(data: n.bytes) }
            var tail = [UInt8](repeating: 0, count: 17)
            for i in 0..<8 {
                tail[i] = UInt8(truncatingIfNeeded: v.stamp >> UInt64(56 - 8 * i))
                tail[9 + i] = UInt8(truncatingIfNeeded: v.digest >> UInt64(56 - 8 * i))
            }
            tail[8] = v.isTombstone ? 1 : 0
            sha.update(data: tail)
        }
        count = UInt32(clamping: versions.count)
        hash = sha.finalize().prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    }

    init(count: UInt32, hash: UInt64) {
        self.count = count
        self.hash = hash
    }

    /// Location (20 bytes), count (u32), hash (u64).
    static let encodedBytes = 32

    func encode(location: Number160) -> [UInt8] {
        var out = location.bytes
        for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: count >> UInt32(24 - 8 * i))) }
        for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: hash >> UInt64(56 - 8 * i))) }
        return out
    }

    static func decode(_ b: [UInt8]) -> (Number160, LocationSummary)? {
        guard b.count == encodedBytes, let location = Number160(bytes: Array(b[0..<20])) else { return nil }
        let count = b[20..<24].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        let hash = b[24..<32].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        return (location, LocationSummary(count: count, hash: hash))
    }
}

/// Answers a location's summary: 0 when this peer holds the same versions, 1 when they differ
/// (the offering peer then offers the versions page by page).
///
/// Request: `bytes` — location, count, hash (`LocationSummary`). Reply: `integer(0)` or
/// `integer(1)`. Computing a summary reads every version of the location here (up to
/// `maxPagesPerSync` pages), so it is done only for a peer among the closest this peer knows to
/// the location — a replica; anyone else is told "different" at once and pays for its own
/// offers, page by page, as before.
struct ReplicationSummaryCommand: CommandHandler {
    static let commandName = "replication.summary"
    let name = ReplicationSummaryCommand.commandName
    let policy: IndirectReplication

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        guard request.payload.count == 1, case .bytes(let b) = request.payload[0], let (location, theirs) = LocationSummary.decode(b) else {
            return .reply(.error(.badRequest, "a summary is \(LocationSummary.encodedBytes) bytes: location, count, hash"))
        }
        let node = context.node
        guard let backend = node.registry.storageBackend,
              node.peerMap.closest(to: location, count: 2 * policy.factor + 1).contains(where: { $0.id == context.sender.id }) else {
            return .reply(Reply(payload: [.integer(1)]))
        }
        let mine = LocationSummary(IndirectReplication.allVersions(backend, location, now: node.clock.uptimeNanoseconds))
        return .reply(Reply(payload: [.integer(mine == theirs ? 0 : 1)]))
    }
}
