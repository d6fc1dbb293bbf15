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

    /// Why a location is to be looked at (merged while it waits).
    struct Job {
        /// Data was stored or removed here.
        var fresh = false
        /// The timer, or a peer left: every location, responsible ones synced.
        var everything = false
        /// A peer left: copies held outside a replica set are handed in too (its root may have
        /// been the one that left).
        var handIn = false
    }

    private struct State {
        /// Locations waiting (not being looked at now), in order, with why.
        var queue: Deque<Number160> = []
        var jobs: [Number160: Job] = [:]
        /// Locations being looked at now (a job for one of them waits until it is done).
        var inFlight: Set<Number160> = []
        var workers = 0
        /// Changes per location (stores and removes here), and what each peer was last brought
        /// up to: (location's generation, round) by peer and location.
        var generations: [Number160: UInt64] = [:]
        var synced: [SyncKey: (generation: UInt64, round: Int)] = [:]
        var round = 0
        var newPeers: [PeerAddress] = []
        var budget: [Number160: (second: UInt64, bytes: Int)] = [:]
        /// Lookups of locations held outside this peer's neighbourhood: when, and the peers found.
        var lookups: [Number160: (at: UInt64, peers: [PeerAddress])] = [:]
        /// Peers whose offer went unanswered, and when: passed over for `silentFor` (a spare
        /// stands in) instead of costing every location one more timeout.
        var silent: [Number160: UInt64] = [:]
        /// Peers that answered an offer with "no such command here" or "no storage here" (a
        /// light client, a routing-only node), and when: passed over for `refusingFor`.
        var refusing: [Number160: UInt64] = [:]
        /// When each peer last answered an offer.
        var heard: [Number160: UInt64] = [:]
        /// When every location was last queued again because a peer fell silent.
        var requeuedAt: UInt64 = 0
        /// Peers that left the map (quit, or found dead), and when: a lookup kept from before
        /// is not trusted, nor a pair brought up to date before.
        var left: [Number160: UInt64] = [:]
        var stats = ReplicationStats()

        mutating func enqueue(_ location: Number160, _ change: (inout Job) -> Void) {
            if var job = jobs[location] {
                change(&job)
                jobs[location] = job
                return
            }
            var job = Job()
            change(&job)
            jobs[location] = job
            if !inFlight.contains(location) { queue.append(location) }
        }
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
        let node = context.node
        let now = node.clock.uptimeNanoseconds
        var stored: [Number160] = []
        switch event {
        case .timer, .peerRemoved: stored = node.registry.storageBackend?.storedLocations() ?? []
        default: break
        }
        let start: Int = state.withLockedValue { s in
            switch event {
            case .dataInserted(let keys), .dataRemoved(let keys):
                // Change counts only tell "changed since the last sync"; forgetting them all
                // (past a bound) just means one more offer per pair.
                if s.generations.count > Self.maxRemembered { s.generations.removeAll(keepingCapacity: true) }
                for l in Set(keys.map(\.location)) {
                    s.enqueue(l) { $0.fresh = true }
                    s.generations[l, default: 0] += 1
                }
            case .peerInserted(let p):
                // (Past the bound, the next timer round serves the rest.)
                if s.newPeers.count < 1_024 { s.newPeers.append(p) }
            case .timer:
                s.round += 1
                s.stats.rounds += 1
                for l in stored { s.enqueue(l) { $0.everything = true } }
            case .peerRemoved(let p):
                if s.left.count >= 4_096 { s.left.removeAll(keepingCapacity: true) }
                s.left[p.id] = now
                for l in stored {
                    s.enqueue(l) {
                        $0.everything = true
                        $0.handIn = true
                    }
                }
            }
            let waiting = s.queue.count + (s.newPeers.isEmpty ? 0 : 1)
            let more = max(0, min(Self.maxLocationsAtOnce - s.workers, waiting))
            s.workers += more
            return more
        }
        guard start > 0 else { return }
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<start { group.addTask { await self.work(node) } }
        }
    }

    /// One worker: looks at waiting locations one at a time until none is left. Up to
    /// `maxLocationsAtOnce` run at once, and a location waits for no other: one whose targets
    /// died waits out a timeout while the rest go on (a pass over all locations at once, each
    /// timer round waiting for the slowest, let a peer take longer to repair a location than a
    /// wave of churn lasts).
    private func work(_ node: Node) async {
        enum Next {
            case location(Number160, Job)
            case peers([PeerAddress])
        }
        while true {
            let running = await node.isRunning
            let next: Next? = state.withLockedValue { s in
                guard running else {
                    s.workers -= 1
                    s.queue.removeAll()
                    s.jobs.removeAll()
                    return nil
                }
                if !s.newPeers.isEmpty {
                    defer { s.newPeers = [] }
                    return .peers(s.newPeers)
                }
                guard let l = s.queue.popFirst(), let job = s.jobs.removeValue(forKey: l) else {
                    s.workers -= 1
                    return nil
                }
                s.inFlight.insert(l)
                return .location(l, job)
            }
            switch next {
            case nil:
                return
            case .peers(let newPeers):
                // A peer that joined gets at once what it is now a replica (or the root) of —
                // from the closest of the set's other members only: every member pushing the
                // same copy at once sent it up to five times (the timer repairs what that one
                // misses, and a member found dead makes the others look at once).
                let fresh = Set(newPeers.map(\.id))
                for location in node.registry.storageBackend?.storedLocations() ?? [] {
                    let members = plan(node, location).targets
                    let targets = members.filter { fresh.contains($0.id) }
                    guard !targets.isEmpty,
                          !members.contains(where: { !fresh.contains($0.id) && location.isCloser($0.id, than: node.peerID) }) else { continue }
                    await syncAll(location, to: targets, spares: [], node: node)
                }
            case .location(let location, let job):
                await visit(location, job: job, node: node)
                state.withLockedValue { s in
                    s.inFlight.remove(location)
                    if s.jobs[location] != nil { s.queue.append(location) }
                }
            }
        }
    }

    /// Locations synced at once (16).
    static let maxLocationsAtOnce = 16

    /// How long a peer whose offer went unanswered is passed over (10 s): it is likely dead,
    /// and a spare is offered the location at once; it is offered again after.
    static let silentFor: UInt64 = 10_000_000_000

    /// One location of a pass: synced to its set when this peer is responsible, handed in when
    /// it is not.
    private func visit(_ location: Number160, job: Job, node: Node) async {
        let (fresh, everything, handIn) = (job.fresh, job.everything, job.handIn)
        // A copy stored here that this peer is not responsible for is handed in when it
        // arrives and when a peer leaves; the timer serves the responsible peers only. A
        // write reaches the whole set by itself: of a set's members, only the closest
        // checks the others at once (a write that missed one is repaired then, not at the
        // next timer), so a write costs a set one round of offers, not one per member.
        // The map alone decides only for a location within this peer's neighbourhood;
        // a copy held further away is placed by a lookup (`trustedPlan`).
        let mapped = knowsNeighbourhood(node, location)
        let byMap = plan(node, location).responsible
        // On the timer, a copy outside the set is looked at only when the map puts it beyond
        // the hand-over rank (copies made while peers died land on spares, and nothing else
        // would ever hand them back once the dying stops).
        if mapped, !handIn, !fresh, !byMap,
           liveRank(of: node.peerID, in: location, among: node.peerMap.closest(to: location, count: 2 * factor + 1), node: node)
            < factor + Self.handOverMargin { return }
        // A copy this peer would hand in (and then forget) is placed by a lookup of its
        // location whatever the map says: the map may still hold the freshly dead, and
        // forgetting a copy on their account would lose one the set needs.
        let (responsible, targets, spares, rank) = await trustedPlan(node, location, mapped: mapped && byMap)
        // (On the timer, a copy outside the set is handed in too: see above.)
        if fresh, !everything, !handIn, responsible, !isRoot(node, location) { return }
        guard !responsible, mode == .nRoot, let backend = node.registry.storageBackend else {
            await syncAll(location, to: targets, spares: spares, node: node)
            return
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

    /// Syncs a location to its targets at once (a dead target costs one timeout, not one each).
    /// A target that does not answer the offer is replaced by the next closest spare the moment
    /// it is given up (not when the slowest of the others is), so a replica set whose members
    /// died keeps its copies before the peer map has noticed (which takes
    /// `offlineAfterFailures` failed requests); and a target the map already doubts — it missed
    /// a request lately — gets the next spare beside it from the start: while peers die, a
    /// repair that waits out each dead target's timeout in turn loses to the next death.
    /// (The spares are the next closest peers, within the hand-over rank: their copies stay
    /// until the set is whole again and closer peers push them out.)
    /// Returns how many peers were brought fully up to date.
    @discardableResult
    private func syncAll(_ location: Number160, to targets: [PeerAddress], spares: [PeerAddress], node: Node) async -> Int {
        let pool = NIOLockedValueBox(spares[...])
        @Sendable func nextSpare() -> PeerAddress? { pool.withLockedValue { $0.popFirst() } }
        return await withTaskGroup(of: Int.self) { group in
            for target in targets {
                if (node.peerMap.failureCount(target.id) ?? 0) > 0, let beside = nextSpare() {
                    group.addTask { await self.sync(location, to: beside, node: node) == .complete ? 1 : 0 }
                }
                group.addTask {
                    var peer: PeerAddress? = target
                    while let p = peer {
                        switch await self.sync(location, to: p, node: node) {
                        case .complete: return 1
                        case .partial: return 0
                        case .unreachable: peer = nextSpare()
                        }
                    }
                    return 0
                }
            }
            return await group.reduce(0, +)
        }
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
                guard let c = s.lookups[location], now &- c.at < Self.lookupLifetime,
                      !c.peers.contains(where: { s.left[$0.id].map { $0 >= c.at } ?? false }) else { return nil }
                return c.peers
            }
            if let cached {
                known = cached
            } else {
                let found = (try? await node.closestPeers(to: location))?.peers ?? []
                state.withLockedValue { s in
                    s.stats.lookups += 1
                    // A lookup nobody answered (a busy moment, a dead neighbourhood) is not kept:
                    // for its lifetime it would make this peer the location's only holder, and
                    // the copy would go nowhere. The map stands in for this pass.
                    guard !found.isEmpty else { return }
                    if s.lookups.count >= Self.maxRemembered { s.lookups.removeAll(keepingCapacity: true) }
                    s.lookups[location] = (now, found)
                }
                known = found.isEmpty ? node.peerMap.closest(to: location, count: 2 * factor + 1) : found
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
        let now = node.clock.uptimeNanoseconds
        // (One and a half intervals: the previous round's answer counts, so one offer a round
        // to each peer — of whichever location comes first — keeps every pair with it known alive.)
        let heardWithin = UInt64(Double(max(interval, .seconds(1)).components.seconds) * 1.5e9)
        let (generation, upToDate, silent): (UInt64, Bool, Bool) = state.withLockedValue { s in
            let g = s.generations[location] ?? 0
            let silent = s.silent[peer.id].map { now &- $0 < Self.silentFor } ?? false
                || s.refusing[peer.id].map { now &- $0 < Self.refusingFor } ?? false
            guard let last = s.synced[memo] else { return (g, false, silent) }
            // Up to date, and answered an offer (of any location) within the last interval: a
            // peer that died since is found by the first offer of a round, not after
            // `reofferRounds`, and replaced by a spare for every location at once.
            // (A peer that left the map since it last answered is not: it quit, or was found dead.)
            let alive = s.heard[peer.id].map { heard in now &- heard < heardWithin && (s.left[peer.id].map { $0 < heard } ?? true) } ?? false
            return (g, last.generation == g && s.round - last.round < Self.reofferRounds && alive, silent)
        }
        guard !silent else { return .unreachable }
        // A peer that has missed a request lately (a maintenance ping, say) is offered again
        // at once: if it is dead, the offer fails and a spare takes its place.
        guard !upToDate || (node.peerMap.failureCount(peer.id) ?? 0) > 0 else { return .complete }
        // A location of `summaryFrom` keys or more is first compared by its summary: an
        // unchanged one costs 32 bytes instead of 97 a key. (A smaller one is offered as its list
        // at once: about as small, and no second round trip when it differs.)
        let all = Self.allVersions(backend, location, now: now)
        if all.count >= Self.summaryFrom {
            let reply = try? await node.requestPromptly(to: peer, command: Self.summaryCommand,
                                                        payload: [.bytes(LocationSummary(all).encode(location: location))]).get()
            guard let reply, RPCError.from(reply: reply) == nil, case .integer(let differs)? = reply.payload.first else {
                await noteUnanswered(peer, reply: reply, node: node)
                return .unreachable
            }
            answered(peer, node: node, summary: true)
            if differs == 0 {
                remember(memo, generation)
                return .complete
            }
        }
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
            // Asked promptly (a few of the peer's round trips, at least 1 s): a replica that
            // died is replaced by a spare that much sooner, and a value whose holders die one
            // after the other is copied before the last goes.
            let reply = try? await node.requestPromptly(to: peer, command: Self.offerCommand,
                                                        payload: ReplicationOfferCommand.encode(versions)).get()
            guard let reply, RPCError.from(reply: reply) == nil, case .keys640(let wanted)? = reply.payload.first else {
                await noteUnanswered(peer, reply: reply, node: node)
                return .unreachable
            }
            answered(peer, node: node, keys: versions.count)
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
        remember(memo, generation)
        return .complete
    }

    /// A peer answered an offer (of `keys` keys) or a summary: it is alive.
    private func answered(_ peer: PeerAddress, node: Node, keys: Int = 0, summary: Bool = false) {
        let now = node.clock.uptimeNanoseconds
        state.withLockedValue { s in
            if summary { s.stats.summaries += 1 } else { s.stats.offers += 1 }
            s.stats.keysOffered += keys
            s.silent[peer.id] = nil
            if s.heard.count >= 4_096 { s.heard.removeAll(keepingCapacity: true) }
            s.heard[peer.id] = now
        }
    }

    /// A peer was brought up to date with a location at its current generation.
    private func remember(_ memo: SyncKey, _ generation: UInt64) {
        state.withLockedValue { s in
            if s.synced.count >= Self.maxRemembered { s.synced.removeAll(keepingCapacity: true) }
            s.synced[memo] = (generation, s.round)
        }
    }

    /// Keys from which a location is compared by its summary first (4).
    static let summaryFrom = 4
    static let summaryCommand = CommandID.derive(from: ReplicationSummaryCommand.commandName)

    static let offerCommand = CommandID.derive(from: ReplicationOfferCommand.commandName)

    /// How long a peer that takes no replicas is passed over (10 minutes): it may load the
    /// plugin or storage later (a restart with other parts), and then counts again.
    static let refusingFor: UInt64 = 600_000_000_000

    /// An offer or summary got no usable answer. A peer that says it has no replication command
    /// or no storage is no replica: passed over (a spare takes its place) without suspecting it
    /// dead. Anything else — no reply, another error — is silence (`noteSilent`). An offer that
    /// failed because this node is stopping says nothing about the peer.
    private func noteUnanswered(_ peer: PeerAddress, reply: Message?, node: Node) async {
        guard await node.isRunning else { return }
        if let reply, reply.type == .unknownCommand || reply.type == .denied {
            let now = node.clock.uptimeNanoseconds
            state.withLockedValue { s in
                s.stats.refusedOffers += 1
                if s.refusing.count >= 4_096 { s.refusing = s.refusing.filter { now &- $0.value < Self.refusingFor } }
                s.refusing[peer.id] = now
            }
            return
        }
        noteSilent(peer, node: node)
    }

    /// An offer to `peer` went unanswered: it is passed over for `silentFor`, and — the first
    /// time — every location held here is looked at again, so that those it was a target of
    /// get a spare now rather than at the next round.
    private func noteSilent(_ peer: PeerAddress, node: Node) {
        let now = node.clock.uptimeNanoseconds
        let requeue = state.withLockedValue { s in
            s.stats.failedOffers += 1
            if s.silent.count >= 4_096 { s.silent = s.silent.filter { now &- $0.value < Self.silentFor } }
            let was = s.silent[peer.id].map { now &- $0 < Self.silentFor } ?? false
            s.silent[peer.id] = now
            // However many peers fall silent at once, every location is looked at again once per
            // half interval at most (a busy overlay must not turn misses into a storm of offers).
            guard !was, now &- s.requeuedAt >= Self.nanoseconds(interval) / 2 else { return false }
            s.requeuedAt = now
            return true
        }
        guard requeue else { return }
        let stored = node.registry.storageBackend?.storedLocations() ?? []
        state.withLockedValue { s in
            for l in stored { s.enqueue(l) { $0.everything = true } }
        }
    }

    private static func nanoseconds(_ d: Duration) -> UInt64 {
        UInt64(max(0, d.components.seconds)) * 1_000_000_000 + UInt64(max(0, d.components.attoseconds) / 1_000_000_000)
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
    /// Locations compared by their summary (32 bytes each on the wire).
    public var summaries = 0
    /// Keys named in offers (97 bytes each on the wire: the key and its version).
    public var keysOffered = 0
    /// Offers and summaries that got no answer (the peer is passed over for a while).
    public var failedOffers = 0
    /// Offers answered "no replication here" (unknown command, no storage): a peer that takes
    /// no replicas, passed over for 10 minutes.
    public var refusedOffers = 0
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
