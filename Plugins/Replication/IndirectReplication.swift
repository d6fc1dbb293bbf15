import DequeModule
import NIOConcurrencyHelpers
import NIOCore
import P2PKernel
import P2PStorage

/// Indirect replication: the peers responsible for a location keep its replica set filled and
/// up to date.
///
/// ```
///  event (data stored, peer joined or left, timer) ─ locations to look at ─ one worker
///     for each location: targets (Responsibility) ─ replication.offer: (key, stamp, digest) held here
///                                                 ─ the target answers which it lacks or holds older,
///                                                   and pushes back what it holds newer
///                                                 ─ replication.push (a put) of just those entries
/// ```
/// Anti-entropy compares versions, not key lists: an entry whose stamp is newer than the copy a
/// peer holds is sent, an older one is never sent, and removals (tombstones) travel like values,
/// so an update or a remove reaches every replica and nothing removed comes back. Traffic to each
/// peer is bounded by `maxBytesPerPeerPerSecond`; what does not fit is sent on a later round.
///
/// ```swift
/// let node = try await Node.builder().plugin(DHTPlugin()).plugin(ReplicationPlugin(.indirect())).start()
/// ```
public final class IndirectReplication: ReplicationPolicy, Sendable {
    public let name = "replication.indirect"
    public let mode: ReplicationMode
    /// Copies of a location, this peer's included (TomP2P's default is 6): also how many peers
    /// a DHT write goes to.
    public let factor: Int
    /// How often every location this peer is responsible for is checked (60 s).
    public let interval: Duration
    /// Bytes of values sent to one peer per second, at most (1 MiB).
    public let maxBytesPerPeerPerSecond: Int

    public var timerInterval: Duration? { interval }
    public var replicaSetSize: Int? { factor }

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
        var budget: [Number160: (second: UInt64, bytes: Int)] = [:]
        /// Lookups of locations held outside this peer's neighbourhood: when, and the peers found.
        var lookups: [Number160: (at: UInt64, peers: [PeerAddress])] = [:]
        var stats = ReplicationStats()
    }
    private let state = NIOLockedValueBox(State())

    public init(mode: ReplicationMode = .nRoot, factor: Int = 6, interval: Duration = .seconds(60),
                maxBytesPerPeerPerSecond: Int = 1 << 20) {
        self.mode = mode
        self.factor = max(1, factor)
        self.interval = interval
        self.maxBytesPerPeerPerSecond = maxBytesPerPeerPerSecond
    }

    /// What this peer has sent so far.
    public var stats: ReplicationStats { state.withLockedValue { $0.stats } }

    public func handle(_ event: ReplicationEvent, context: ReplicationContext) async {
        let start: Bool = state.withLockedValue { s in
            switch event {
            case .dataInserted(let keys), .dataRemoved(let keys):
                // Change counts only tell "changed since the last sync"; forgetting them all
                // (past a bound) just means one more offer per pair.
                if s.generations.count > Self.maxRemembered { s.generations.removeAll(keepingCapacity: true) }
                for l in Set(keys.map(\.location)) {
                    s.dirty.insert(l)
                    s.generations[l, default: 0] += 1
                }
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
                // arrives and when a peer leaves; the timer serves the responsible peers only. A
                // write reaches the whole set by itself: of a set's members, only the closest
                // checks the others at once (a write that missed one is repaired then, not at the
                // next timer), so a write costs a set one round of offers, not one per member.
                let fresh = inserted.contains(location)
                // The map alone decides only for a location within this peer's neighbourhood;
                // a copy held further away is placed by a lookup (`trustedPlan`).
                let mapped = knowsNeighbourhood(node, location)
                let byMap = plan(node, location).responsible
                if mapped, !handIn, !fresh, !byMap { continue }
                // A copy this peer would hand in (and then forget) is placed by a lookup of its
                // location whatever the map says: the map may still hold the freshly dead, and
                // forgetting a copy on their account would lose one the set needs.
                let (responsible, targets, spares, rank) = await trustedPlan(node, location, mapped: mapped && byMap)
                guard handIn || fresh || responsible else { continue }
                if fresh, !everything, !handIn, responsible, !isRoot(node, location) { continue }
                guard !responsible, mode == .nRoot, let backend = node.registry.storageBackend else {
                    _ = await syncAll(location, to: targets, spares: spares, node: node)
                    continue
                }
                // A copy outside the set: handed in, then forgotten once every member of the set
                // holds it — unless this peer is among the `factor + handOverMargin` closest,
                // so that views that differ by a peer or two do not hand a copy back and forth
                // (a peer that far refuses offers of the location: `wantsCopies`).
                let held = Self.allVersions(backend, location, now: node.clock.uptimeNanoseconds)
                let complete = await syncAll(location, to: targets, spares: spares, node: node)
                if complete >= factor, rank >= factor + Self.handOverMargin {
                    let n = backend.evict(held, now: node.clock.uptimeNanoseconds)
                    state.withLockedValue { $0.stats.handedOver += n }
                }
            }
        }
    }

    /// Syncs a location to its targets at once (a dead target costs one timeout, not one each).
    /// A target that does not answer the offer is replaced by the next closest spare, so a
    /// replica set whose members died keeps its copies before the peer map has noticed (which
    /// takes `offlineAfterFailures` failed requests).
    /// Returns how many peers were brought fully up to date.
    @discardableResult
    private func syncAll(_ location: Number160, to targets: [PeerAddress], spares: [PeerAddress], node: Node) async -> Int {
        var wave = targets
        var spares = spares[...]
        var complete = 0
        while !wave.isEmpty {
            let (missed, done) = await withTaskGroup(of: SyncOutcome.self) { group in
                for t in wave { group.addTask { await self.sync(location, to: t, node: node) } }
                var missed = 0, done = 0
                for await outcome in group {
                    switch outcome {
                    case .unreachable: missed += 1
                    case .complete: done += 1
                    case .partial: break
                    }
                }
                return (missed, done)
            }
            complete += done
            wave = Array(spares.prefix(missed))
            spares = spares.dropFirst(wave.count)
        }
        return complete
    }

    /// Whether this peer's map can tell a location's replica set: the location lies closer to
    /// this peer than its (2·factor+1)-th closest known peer does — the neighbourhood a Kademlia
    /// map knows (nearly) whole. Further away, the map holds a few peers of the region only, and
    /// "the closest I know" would be far from the closest there are.
    func knowsNeighbourhood(_ node: Node, _ location: Number160) -> Bool {
        let mine = node.peerMap.closest(to: node.peerID, count: 2 * factor + 1)
        guard mine.count == 2 * factor + 1, let edge = mine.last else { return true }
        return (node.peerID ^ location) < (node.peerID ^ edge.id)
    }

    /// Whether this peer should take copies of a location offered to it: unless it knows the
    /// location's neighbourhood and is not among the `factor + handOverMargin` closest there.
    /// A peer that knows fewer than 2·factor+1 peers (a small overlay) takes every copy; one
    /// that does not know the location's neighbourhood too. The threshold is the hand-over rank
    /// plus 2: a peer forgets its copy from `factor + handOverMargin` on, and declines one only
    /// from 2 ranks further — so two views must differ by 3 ranks or more before a copy goes
    /// back and forth — and a peer whose map still holds a few of the freshly dead closer to
    /// the location (not yet known to be dead) does not decline what the set needs.
    func wantsCopies(of location: Number160, node: Node) -> Bool {
        guard knowsNeighbourhood(node, location), node.peerMap.counts.verified >= 2 * factor + 1 else { return true }
        return liveRank(of: node.peerID, in: location, among: node.peerMap.closest(to: location, count: 2 * factor + 1), node: node)
            < factor + Self.handOverMargin + 2
    }

    /// Peers of `known` closer to the location than `me`, not counting those that missed a
    /// request lately (likely dead: a rank inflated by the dead would refuse copies the set needs).
    private func liveRank(of me: Number160, in location: Number160, among known: [PeerAddress], node: Node) -> Int {
        known.filter { $0.id != me && location.isCloser($0.id, than: me) && (node.peerMap.failureCount($0.id) ?? 0) == 0 }.count
    }

    /// `plan` from the map where it knows the location's neighbourhood, else from a lookup of
    /// the location (its live closest peers; kept for `lookupLifetime`); and this peer's rank
    /// among them (0: closest).
    private func trustedPlan(_ node: Node, _ location: Number160, mapped: Bool) async
        -> (responsible: Bool, targets: [PeerAddress], spares: [PeerAddress], rank: Int) {
        let me = node.peerID
        let known: [PeerAddress]
        if mapped {
            known = node.peerMap.closest(to: location, count: 2 * factor + 1)
        } else {
            let now = node.clock.uptimeNanoseconds
            let cached: [PeerAddress]? = state.withLockedValue { s in
                guard let c = s.lookups[location], now &- c.at < Self.lookupLifetime else { return nil }
                return c.peers
            }
            if let cached {
                known = cached
            } else {
                let found = (try? await node.closestPeers(to: location))?.peers ?? []
                state.withLockedValue { s in
                    if s.lookups.count >= Self.maxRemembered { s.lookups.removeAll(keepingCapacity: true) }
                    s.lookups[location] = (now, found)
                    s.stats.lookups += 1
                }
                known = found
            }
        }
        let others = known.filter { $0.id != me }
        let ids = Array(others.prefix(factor + 1).map(\.id))
        let responsible = Responsibility.isResponsible(mode, for: location, me: me, peers: ids, factor: factor)
        let targets = Responsibility.targets(mode, for: location, me: me, peers: ids, factor: factor)
        let chosen = others.filter { targets.contains($0.id) }
        let spares = others.filter { !targets.contains($0.id) }
        let rank = liveRank(of: me, in: location, among: others, node: node)
        return (responsible, chosen, responsible || mode == .nRoot ? spares : Array(spares.prefix(1)), rank)
    }

    /// How long a lookup of a location held outside this peer's neighbourhood is used (30 s).
    static let lookupLifetime: UInt64 = 30_000_000_000

    /// Ranks beyond the set within which a copy is kept after it was handed in (2).
    static let handOverMargin = 2

    /// Every version a location holds here (at most `maxPagesPerSync` pages).
    static func allVersions(_ backend: any StorageBackend, _ location: Number160, now: UInt64) -> [EntryVersion] {
        var out: [EntryVersion] = []
        var after: Number640?
        for _ in 0..<maxPagesPerSync {
            let (page, more) = backend.versions(at: location, after: after, limit: ReplicationOfferCommand.maxKeys, now: now)
            out += page
            guard more, let last = page.last else { break }
            after = last.key
        }
        return out
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

    /// Whether this peer is the closest it knows to a location (the set's root).
    private func isRoot(_ node: Node, _ location: Number160) -> Bool {
        guard let closest = node.peerMap.closest(to: location, count: 1).first else { return true }
        return location.isCloser(node.peerID, than: closest.id)
    }

    /// Locations and (peer, location) pairs remembered at most (200,000 each).
    static let maxRemembered = 200_000

    /// Rounds after which a peer already brought up to date is offered a location again (it may
    /// have lost data without changing its id).
    static let reofferRounds = 2

    /// Offers one location's versions to a peer, then sends the entries it lacks or holds older
    /// (the peer pushes back what it holds newer) — unless the peer was brought up to date with
    /// this location as it is now, fewer than `reofferRounds` ago. Returns whether the peer
    /// answered (false only when an offer went unanswered).
    private func sync(_ location: Number160, to peer: PeerAddress, node: Node) async -> SyncOutcome {
        guard let backend = node.registry.storageBackend else { return .complete }
        let memo = SyncKey(peer: peer.id, location: location)
        let (generation, upToDate): (UInt64, Bool) = state.withLockedValue { s in
            let g = s.generations[location] ?? 0
            guard let last = s.synced[memo] else { return (g, false) }
            return (g, last.generation == g && s.round - last.round < Self.reofferRounds)
        }
        // A peer that has missed a request lately (a maintenance ping, say) is offered again
        // at once: if it is dead, the offer fails and a spare takes its place.
        guard !upToDate || (node.peerMap.failureCount(peer.id) ?? 0) > 0 else { return .complete }
        var after: Number640?
        var pages = 0
        var complete = false
        var declined = false
        while pages < Self.maxPagesPerSync {
            pages += 1
            let (versions, more) = backend.versions(at: location, after: after, limit: ReplicationOfferCommand.maxKeys, now: node.clock.uptimeNanoseconds)
            guard let last = versions.last else {
                complete = true
                break
            }
            after = last.key
            guard let reply = try? await node.request(to: peer, command: ReplicationOfferCommand.commandName,
                                                      payload: ReplicationOfferCommand.encode(versions)),
                  case .keys640(let wanted)? = reply.payload.first else {
                state.withLockedValue { $0.stats.failedOffers += 1 }
                return .unreachable
            }
            state.withLockedValue {
                $0.stats.offers += 1
                $0.stats.keysOffered += versions.count
            }
            let offered = Set(versions.map(\.key))
            let entries = backend.replicaEntries(wanted.filter { offered.contains($0) }, now: node.clock.uptimeNanoseconds)
            guard await push(entries, to: peer, node: node) else { return .partial }
            // It declined copies (it is no replica by its view): not brought up to date.
            if reply.payload.count > 1, case .integer(1) = reply.payload[1] { declined = true }
            if !more {
                complete = true
                break
            }
        }
        guard complete, !declined else { return .partial }
        state.withLockedValue { s in
            if s.synced.count >= Self.maxRemembered { s.synced.removeAll(keepingCapacity: true) }
            s.synced[memo] = (generation, s.round)
        }
        return .complete
    }

    /// What a sync of one location to one peer came to.
    enum SyncOutcome {
        /// The offer went unanswered.
        case unreachable
        /// The peer holds every version offered (or newer).
        case complete
        /// Answered, but not everything reached it (over the byte budget, a push failed, too many pages).
        case partial
    }

    /// Pages of `ReplicationOfferCommand.maxKeys` entries one sync of a location offers (64: a
    /// location holds at most `MemoryStorage.Limits.maxEntriesPerLocation` entries by default).
    static let maxPagesPerSync = 64

    /// Sends entries in puts of at most 2 MiB each, within the peer's byte budget; false when
    /// the budget is spent (the rest waits for a later round).
    func push(_ entries: [Number640: StoredValue], to peer: PeerAddress, node: Node) async -> Bool {
        var batch: [Number640: StoredValue] = [:]
        var batchBytes = 0
        for (key, v) in entries.sorted(by: { $0.key < $1.key }) {
            var v = v
            v.remainingSeconds = nil
            let size = v.value.count + 200
            if batchBytes + size > 2 << 20, !batch.isEmpty {
                guard await send(batch, bytes: batchBytes, to: peer, node: node) else { return false }
                batch = [:]
                batchBytes = 0
            }
            batch[key] = v
            batchBytes += size
        }
        if !batch.isEmpty { return await send(batch, bytes: batchBytes, to: peer, node: node) }
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
        // A put is all or nothing: a key the peer refuses (a protected entry whose version here
        // is not signed by its owner) is left out and the rest sent again, a few times at most.
        var values = values
        var ok = false
        for _ in 0..<4 where !values.isEmpty {
            let reply = try? await node.request(to: peer, command: ReplicationPushCommand.commandName,
                                                payload: StorageCodec.encode(.put(values, mode: .overwrite)))
            guard let reply else { break }
            guard StorageCodec.isRefusal(reply.payload) else {
                ok = true
                break
            }
            guard case .failure(.protected(let key, _, _)) = Result(catching: { () throws(StorageError) in try StorageCodec.decodeResult(reply.payload) }),
                  values.removeValue(forKey: key) != nil else { break }
        }
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
    /// Entries forgotten here after they were handed in to a replica set this peer is not part of.
    public var handedOver = 0
    /// Lookups of locations held outside this peer's neighbourhood (to find their replica sets).
    public var lookups = 0

    public init() {}
}
