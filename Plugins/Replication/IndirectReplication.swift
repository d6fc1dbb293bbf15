import DequeModule
import NIOConcurrencyHelpers
import NIOCore
import P2PKernel
import P2PStorage

/// Indirect replication: the peers responsible for a location keep its replica set filled.
///
/// ```
///  event (data stored, peer joined or left, timer) ─ locations to look at ─ one worker
///     for each location: targets (Responsibility) ─ replication.offer: the keys held here
///                                                 ─ the target answers which it lacks
///                                                 ─ dht.storage put of just those values
/// ```
/// Only missing keys are sent (an offer is the key list, so unchanged data is never re-sent) and
/// a replica never overwrites what a peer holds. A key removed here by a remove request is not
/// taken back from an offer for `tombstoneLifetime` (TomP2P #129: removed data came back).
/// Traffic to each peer is bounded by `maxBytesPerPeerPerSecond`; what does not fit is sent on a
/// later round.
///
/// ```swift
/// let node = try await Node.builder().plugin(DHTPlugin()).plugin(ReplicationPlugin(.indirect())).start()
/// ```
public final class IndirectReplication: ReplicationPolicy, Sendable {
    public let name = "replication.indirect"
    public let mode: ReplicationMode
    /// Copies of a location, this peer's included (TomP2P's default is 6).
    public let factor: Int
    /// How often every location this peer is responsible for is checked (60 s).
    public let interval: Duration
    /// Bytes of values sent to one peer per second, at most (1 MiB).
    public let maxBytesPerPeerPerSecond: Int
    /// How long a removed key is refused from offers (10 minutes).
    public let tombstoneLifetime: Duration
    /// Removed keys remembered, at most (65,536; the oldest are forgotten first).
    public let maxTombstones: Int

    public var timerInterval: Duration? { interval }

    private struct State {
        var dirty: Set<Number160> = []
        var everything = false
        /// A peer left: copies held outside a replica set are handed in too (its root may have
        /// been the one that left).
        var handIn = false
        /// Changes per location (stores and removes here), and what each peer was last brought
        /// up to: (location's generation, round) by peer and location.
        var generations: [Number160: UInt64] = [:]
        var synced: [SyncKey: (generation: UInt64, round: Int)] = [:]
        var round = 0
        var newPeers: [PeerAddress] = []
        var working = false
        var tombstones: [Number640: UInt64] = [:]
        var tombstoneOrder = Deque<(key: Number640, at: UInt64)>()
        var budget: [Number160: (second: UInt64, bytes: Int)] = [:]
        var stats = ReplicationStats()
    }
    private let state = NIOLockedValueBox(State())

    public init(mode: ReplicationMode = .nRoot, factor: Int = 6, interval: Duration = .seconds(60),
                maxBytesPerPeerPerSecond: Int = 1 << 20, tombstoneLifetime: Duration = .seconds(600), maxTombstones: Int = 65_536) {
        self.mode = mode
        self.factor = max(1, factor)
        self.interval = interval
        self.maxBytesPerPeerPerSecond = maxBytesPerPeerPerSecond
        self.tombstoneLifetime = tombstoneLifetime
        self.maxTombstones = maxTombstones
    }

    /// What this peer has sent so far.
    public var stats: ReplicationStats { state.withLockedValue { $0.stats } }

    /// A removal is remembered at once, before any replica in flight can land.
    public func record(_ event: ReplicationEvent, context: ReplicationContext) {
        guard case .dataRemoved(let keys) = event else { return }
        let until = context.node.clock.uptimeNanoseconds + UInt64(tombstoneLifetime.components.seconds) * 1_000_000_000
        state.withLockedValue { s in
            for k in keys {
                s.tombstones[k] = until
                s.tombstoneOrder.append((k, until))
            }
            while s.tombstones.count > maxTombstones, !s.tombstoneOrder.isEmpty {
                let oldest = s.tombstoneOrder.removeFirst()
                if s.tombstones[oldest.key] == oldest.at { s.tombstones[oldest.key] = nil }
            }
            if s.tombstoneOrder.count > 2 * maxTombstones { s.tombstoneOrder = Deque(s.tombstoneOrder.filter { s.tombstones[$0.key] == $0.at }) }
        }
    }

    public func handle(_ event: ReplicationEvent, context: ReplicationContext) async {
        let start: Bool = state.withLockedValue { s in
            switch event {
            case .dataInserted(let keys):
                // Change counts only tell "changed since the last sync"; forgetting them all
                // (past a bound) just means one more offer per pair.
                if s.generations.count > Self.maxRemembered { s.generations.removeAll(keepingCapacity: true) }
                for l in Set(keys.map(\.location)) {
                    s.dirty.insert(l)
                    s.generations[l, default: 0] += 1
                }
            case .dataRemoved:
                return false
            case .peerInserted(let p):
                if s.newPeers.count < 1_024 { s.newPeers.append(p) } else { s.everything = true }
            case .timer:
                s.round += 1
                s.stats.rounds += 1
                s.everything = true
            case .peerRemoved:
                s.everything = true
                s.handIn = true
            }
            guard !s.working else { return false }
            s.working = true
            return true
        }
        guard start else { return }
        await work(context.node)
    }

    /// Whether a key was removed here lately (an offer of it is not taken).
    func isTombstoned(_ key: Number640, now: UInt64) -> Bool {
        state.withLockedValue { s in
            guard let until = s.tombstones[key] else { return false }
            if until > now { return true }
            s.tombstones[key] = nil
            return false
        }
    }

    /// Drains what events asked for, one location at a time, until nothing is left.
    private func work(_ node: Node) async {
        while true {
            let (inserted, everything, handIn, newPeers): (Set<Number160>, Bool, Bool, [PeerAddress]) = state.withLockedValue { s in
                defer {
                    s.dirty = []
                    s.everything = false
                    s.handIn = false
                    s.newPeers = []
                }
                if s.dirty.isEmpty, !s.everything, s.newPeers.isEmpty { s.working = false }
                return (s.dirty, s.everything, s.handIn, s.newPeers)
            }
            if inserted.isEmpty, !everything, newPeers.isEmpty { return }
            var locations = Array(inserted)
            if everything { locations = Array(Set(node.registry.storageBackend?.storedLocations() ?? []).union(inserted)) }
            // (A pass over an empty store still ends here: the next turn of the loop finds
            // nothing pending and clears `working`; returning here left it set for good and
            // stopped replication on a node whose first timer came before its first value.)
            guard await node.isRunning else {
                state.withLockedValue { $0.working = false }
                return
            }
            let fresh = Set(newPeers.map(\.id))
            let stored = newPeers.isEmpty ? [] : (node.registry.storageBackend?.storedLocations() ?? [])
            // A peer that joined gets at once what it is now a replica (or the root) of.
            for location in stored {
                await syncAll(location, to: plan(node, location).targets.filter { fresh.contains($0.id) }, spares: [], node: node)
            }
            for location in locations {
                // A copy stored here that this peer is not responsible for is handed in when it
                // arrives and when a peer leaves; the timer serves the responsible peers only.
                let (responsible, targets, spares) = plan(node, location)
                guard handIn || inserted.contains(location) || responsible else { continue }
                await syncAll(location, to: targets, spares: spares, node: node)
            }
        }
    }

    /// Syncs a location to its targets at once (a dead target costs one timeout, not one each).
    /// A target that does not answer the offer is replaced by the next closest spare, so a
    /// replica set whose members died keeps its copies before the peer map has noticed (which
    /// takes `offlineAfterFailures` failed requests).
    private func syncAll(_ location: Number160, to targets: [PeerAddress], spares: [PeerAddress], node: Node) async {
        var wave = targets
        var spares = spares[...]
        while !wave.isEmpty {
            let missed = await withTaskGroup(of: Bool.self) { group in
                for t in wave { group.addTask { await self.sync(location, to: t, node: node) } }
                var missed = 0
                for await reached in group where !reached { missed += 1 }
                return missed
            }
            wave = Array(spares.prefix(missed))
            spares = spares.dropFirst(wave.count)
        }
    }

    /// Whether this peer is responsible for a location, whom it copies it to, and the next
    /// closest peers that stand in for targets that do not answer (one look at the peer map).
    private func plan(_ node: Node, _ location: Number160) -> (responsible: Bool, targets: [PeerAddress], spares: [PeerAddress]) {
        let known = node.peerMap.closest(to: location, count: 2 * factor + 1)
        let ids = Array(known.prefix(factor + 1).map(\.id))
        let responsible = Responsibility.isResponsible(mode, for: location, me: node.peerID, peers: ids, factor: factor)
        let targets = Responsibility.targets(mode, for: location, me: node.peerID, peers: ids, factor: factor)
        let chosen = known.filter { targets.contains($0.id) }
        // The next closest known peers, in order. A peer copying to the whole set (n-root, or
        // a 0-root root) may use them all; a 0-root hand-in to a root that does not answer
        // goes to the next root candidate only.
        let spares = known.filter { !targets.contains($0.id) }
        return (responsible, chosen, responsible || mode == .nRoot ? Array(spares) : Array(spares.prefix(1)))
    }

    /// Locations and (peer, location) pairs remembered at most (200,000 each).
    static let maxRemembered = 200_000

    /// Rounds after which a peer already brought up to date is offered a location again (it may
    /// have lost data without changing its id).
    static let reofferRounds = 2

    /// Offers one location's keys to a peer, then sends the values it lacks — unless the peer
    /// was brought up to date with this location as it is now, fewer than `reofferRounds` ago.
    /// Returns whether the peer answered (false only when an offer went unanswered).
    @discardableResult
    private func sync(_ location: Number160, to peer: PeerAddress, node: Node) async -> Bool {
        guard let backend = node.registry.storageBackend else { return true }
        let memo = SyncKey(peer: peer.id, location: location)
        let (generation, upToDate): (UInt64, Bool) = state.withLockedValue { s in
            let g = s.generations[location] ?? 0
            guard let last = s.synced[memo] else { return (g, false) }
            return (g, last.generation == g && s.round - last.round < Self.reofferRounds)
        }
        // A peer that has missed a request lately (a maintenance ping, say) is offered again
        // at once: if it is dead, the offer fails and a spare takes its place.
        guard !upToDate || (node.peerMap.failureCount(peer.id) ?? 0) > 0 else { return true }
        var query: StorageQuery? = .range(from: Number640(location: location),
                                          to: Number640(location: location, domain: .max, content: .max, version: .max),
                                          limit: .max, descending: false)
        var pages = 0
        while let q = query, pages < 64 {
            pages += 1
            guard case .values(let values, let resume)? = try? backend.execute(.get(q), now: node.clock.uptimeNanoseconds), !values.isEmpty else { return true }
            query = resume.flatMap { q.resuming(after: $0) }
            let keys = values.keys.sorted()
            guard let reply = try? await node.request(to: peer, command: ReplicationOfferCommand.commandName, payload: [.keys640(keys)]),
                  case .keys640(let wanted)? = reply.payload.first else {
                state.withLockedValue { $0.stats.failedOffers += 1 }
                return false
            }
            state.withLockedValue {
                $0.stats.offers += 1
                $0.stats.keysOffered += keys.count
            }
            var batch: [Number640: StoredValue] = [:]
            var batchBytes = 0
            for key in wanted.prefix(keys.count) {
                guard var v = values[key] else { continue }
                // An unsigned value goes with the time it has left; a signed one with the TTL
                // its signature covers.
                if v.signature == nil, let left = v.remainingSeconds { v.ttlSeconds = left }
                v.remainingSeconds = nil
                let size = v.value.count + 200
                if batchBytes + size > 2 << 20, !batch.isEmpty {
                    guard await send(batch, bytes: batchBytes, to: peer, node: node) else { return true }
                    batch = [:]
                    batchBytes = 0
                }
                batch[key] = v
                batchBytes += size
            }
            if !batch.isEmpty { guard await send(batch, bytes: batchBytes, to: peer, node: node) else { return true } }
        }
        guard query == nil else { return true }
        state.withLockedValue { s in
            if s.synced.count >= Self.maxRemembered { s.synced.removeAll(keepingCapacity: true) }
            s.synced[memo] = (generation, s.round)
        }
        return true
    }

    /// Sends values as a plain put, within the peer's byte budget; false when over it.
    private func send(_ values: [Number640: StoredValue], bytes: Int, to peer: PeerAddress, node: Node) async -> Bool {
        let second = node.clock.uptimeNanoseconds / 1_000_000_000
        let allowed: Bool = state.withLockedValue { s in
            var b = s.budget[peer.id] ?? (second, 0)
            if b.second != second { b = (second, 0) }
            guard b.bytes + bytes <= maxBytesPerPeerPerSecond || b.bytes == 0 else {
                s.stats.deferred += 1
                return false
            }
            b.bytes += bytes
            if s.budget.count > 4_096 { s.budget = s.budget.filter { $0.value.second == second } }
            s.budget[peer.id] = b
            return true
        }
        guard allowed else { return false }
        let payload = StorageCodec.encode(.put(values, mode: .overwrite))
        let reply = try? await node.request(to: peer, command: ReplicationPushCommand.commandName, payload: payload)
        let ok = reply.map { !StorageCodec.isRefusal($0.payload) } ?? false
        state.withLockedValue { s in
            if ok {
                s.stats.valuesSent += values.count
                s.stats.bytesSent += bytes
            } else {
                s.stats.failedPuts += 1
            }
        }
        return ok
    }
}

/// A peer and a location (what a sync brought up to date).
struct SyncKey: Hashable {
    let peer: Number160
    let location: Number160
}

/// What a replication policy sent.
public struct ReplicationStats: Sendable, Hashable {
    /// Timer rounds seen.
    public var rounds = 0
    public var offers = 0
    /// Keys named in offers (80 bytes each on the wire).
    public var keysOffered = 0
    public var failedOffers = 0
    public var valuesSent = 0
    public var bytesSent = 0
    public var failedPuts = 0
    /// Sends put off because a peer's byte budget for the second was spent.
    public var deferred = 0
}
