import NIOCore

/// One iterative lookup: asks the closest unasked peers for their neighbors of `key`, α at a time,
/// until the k closest peers it knows have all answered or a cap is reached.
///
/// Confined to the node's event loop: every reply callback runs there, so the state needs no lock.
final class IterativeLookup: @unchecked Sendable {
    /// `slow`: asked, no answer within the node's suspicion time (`RPCEngine.suspectAfter`): the
    /// lookup goes on without it (its slot is free, it no longer counts among the closest), and
    /// takes its answer should it still come.
    private enum State: UInt8 { case new, inFlight, slow, answered, failed }
    private struct Candidate {
        let distance: Number160
        let peer: PeerAddress
        var state: State
        let depth: Int
        /// Learned from a reply rather than known first-hand from our own map.
        let referred: Bool
    }

    private let node: Node
    private let key: Number160
    private let config: RoutingConfig
    private let question: RoutingQuestion?
    private let request: [Payload]
    private var answers: [RoutingAnswer] = []
    private let promise: EventLoopPromise<RoutingResult>
    private var candidates: [Candidate] = []
    private var seen: Set<Number160> = []
    private var inFlight = 0
    /// Requests suspected (`slow`) and still within their grace (one more suspicion time).
    private var waitingForSlow = 0
    private var messages = 0
    private var answered = 0
    private var failures = 0
    private var referredFailures = 0
    private var noNewInfo = 0
    private var directHits = 0
    private var referredContacts = 0
    /// Candidates per IP group (non-loopback groups only).
    private var groups: [UInt64: Int] = [:]
    private var finished = false
    /// Whether the whole map was drawn on after the closest known peers all failed.
    private var widened = false

    init(node: Node, key: Number160, config: RoutingConfig, question: RoutingQuestion? = nil, initialHits: Int = 0) {
        self.node = node
        self.key = key
        self.config = config
        self.question = question
        self.directHits = initialHits
        if let question {
            request = [.keys([key]), .integer(Int64(question.id))] + question.payload
        } else {
            request = [.keys([key])]
        }
        self.promise = node.eventLoop.makePromise()
    }

    /// Starts from the closest peers in the local map (verified and overflow).
    func start() -> EventLoopFuture<RoutingResult> {
        node.eventLoop.assertInEventLoop()
        seen.insert(node.peerID)
        for p in node.peerMap.closest(to: key, count: config.resultSize * 2, includeOverflow: true) {
            _ = insert(p, depth: 1, referred: false)
        }
        // An empty map: the seed we joined through, which answered us whatever its flags say.
        if candidates.isEmpty, let seed = node.kernel.seed {
            _ = insert(seed, depth: 1, referred: false)
        }
        if candidates.isEmpty {
            finish(.noPeers)
        } else {
            step()
        }
        return promise.futureResult
    }

    /// Inserts a candidate in distance order; returns its position, or nil if known or dropped.
    private func insert(_ peer: PeerAddress, depth: Int, referred: Bool) -> Int? {
        if let g = peer.ip.sybilGroup, (groups[g] ?? 0) >= config.maxPerIPGroup {
            // The group's places go to its closest peers, not its first: a peer of the group
            // closer than the farthest one held, and that one not waiting for a reply, takes
            // its place. (A client that knows only its seed must still find the seed's
            // neighbour on the same subnet — the very peer whose id it looks up.) Contacts stay
            // bounded: each new referred peer counts against `maxReferredContacts`.
            guard !seen.contains(peer.id), let far = candidates.lastIndex(where: { $0.peer.ip.sybilGroup == g }),
                  candidates[far].state != .inFlight, candidates[far].state != .slow, (peer.id ^ key) < candidates[far].distance else { return nil }
            candidates.remove(at: far)
            groups[g, default: 1] -= 1
        }
        guard seen.insert(peer.id).inserted else { return nil }
        if let g = peer.ip.sybilGroup { groups[g, default: 0] += 1 }
        let d = peer.id ^ key
        var lo = 0, hi = candidates.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if candidates[mid].distance < d { lo = mid + 1 } else { hi = mid }
        }
        if lo >= config.maxCandidates { return nil }
        candidates.insert(Candidate(distance: d, peer: peer, state: .new, depth: depth, referred: referred), at: lo)
        if candidates.count > config.maxCandidates {
            // Never drop a request in flight: its reply still has to find its entry.
            if let last = candidates.lastIndex(where: { $0.state != .inFlight }), last > lo { candidates.remove(at: last) }
        }
        return lo
    }

    private func step() {
        guard !finished else { return }
        if directHits >= config.maxDirectHits { return finish(.maxDirectHits) }
        if noNewInfo >= config.maxNoNewInfo { return finish(.maxNoNewInfo) }
        // (Only referred peers that fail count here: they are what a hostile referrer can
        // multiply. Peers from our own map are at most `maxCandidates`, and giving up on them
        // would return nobody — a reader whose map still holds the freshly dead would find no
        // replica at all.)
        if referredFailures >= config.maxFailures { return finish(.maxFailures) }
        if answered >= config.maxSuccess { return finish(.maxSuccess) }
        var live = 0
        var i = 0
        // `ask` may complete inline (a request refused at once) and re-enter `step`; stop here if
        // that finished the lookup.
        while !finished, i < candidates.count, live < config.resultSize, inFlight < config.parallel {
            if candidates[i].state == .failed || candidates[i].state == .slow {
                i += 1
                continue
            }
            live += 1
            if candidates[i].state == .new {
                if candidates[i].referred {
                    guard referredContacts < config.maxReferredContacts else {
                        if inFlight == 0 { finish(.maxReferredContacts) }
                        return
                    }
                    referredContacts += 1
                }
                ask(i)
            }
            i += 1
        }
        // Converged once nothing is in flight and no suspected peer is within its grace — unless
        // nobody answered: then the rest of our map is tried once (the closest known may all
        // have died since we last heard from them).
        if inFlight == 0, waitingForSlow == 0, !finished {
            if answered == 0, !widened {
                widened = true
                var added = false
                for p in node.peerMap.closest(to: key, count: config.maxCandidates, includeOverflow: true) {
                    if insert(p, depth: 1, referred: false) != nil { added = true }
                }
                if added { return step() }
            }
            finish(.converged)
        }
    }

    private func ask(_ index: Int) {
        candidates[index].state = .inFlight
        inFlight += 1
        messages += 1
        let peer = candidates[index].peer
        let depth = candidates[index].depth
        let referred = candidates[index].referred
        node.kernel.paths.learnRoute(peer)
        let suspectAfter = node.kernel.rpc.retryAfter(peer.id)
        let timers = node.kernel.timers
        let suspect = timers.schedule(in: suspectAfter) { [self] in
            guard !finished, state(of: peer.id) == .inFlight else { return }
            mark(peer.id, .slow)
            inFlight -= 1
            waitingForSlow += 1
            // It may still answer within one more suspicion time; the lookup ends without it after
            // — unless nobody has answered yet: then it is all the lookup has (a busy seed, the
            // only peer a one-shot client knows), and its reply is waited for, up to the
            // request's own timeout, checking again each suspicion time.
            giveUpWhenOthersAnswered(peer.id, after: suspectAfter)
            step()
        }
        node.kernel.rpc.requestOnLoop(target: peer.socket, expectedID: peer.id, command: node.kernel.commands.neighbors,
                           payload: request, transport: .auto, timeout: nil)
            .whenComplete { [self] result in
                timers.cancel(suspect)
                switch state(of: peer.id) {
                case .slow: waitingForSlow -= 1
                case .failed: break  // given up on after its grace: already counted out
                default: inFlight -= 1
                }
                guard !finished else { return }
                switch result {
                case .success(let reply) where reply.type == .ok:
                    mark(peer.id, .answered)
                    answered += 1
                    if let question {
                        if reply.payload.count > 1, case .integer(let q) = reply.payload[1], q == Int64(question.id) {
                            let answer = Array(reply.payload.dropFirst(2))
                            let hit = question.isHit(answer)
                            answers.append(RoutingAnswer(peer: reply.sender, payload: answer, isHit: hit))
                            if hit { directHits += 1 }
                        }
                    } else if peer.id == key {
                        directHits += 1
                    }
                    var improved = false
                    // A peer this node found dead (and banned) is not asked again on another's word.
                    for p in reply.firstPeers ?? [] where p.socket.isValidPeerRecord && p.isContactable && !node.peerMap.isBanned(p.id) {
                        if let at = insert(p, depth: depth + 1, referred: true), at < config.resultSize { improved = true }
                    }
                    noNewInfo = improved ? 0 : noNewInfo + 1
                default:
                    mark(peer.id, .failed)
                    failures += 1
                    if referred { referredFailures += 1 }
                }
                step()
            }
    }

    private func giveUpWhenOthersAnswered(_ id: Number160, after delay: TimeAmount) {
        node.kernel.timers.schedule(in: delay) { [self] in
            guard !finished, state(of: id) == .slow else { return }
            guard answered > 0 else { return giveUpWhenOthersAnswered(id, after: delay) }
            waitingForSlow -= 1
            mark(id, .failed)
            step()
        }
    }

    private func state(of id: Number160) -> State? {
        let d = id ^ key
        var lo = 0, hi = candidates.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if candidates[mid].distance < d { lo = mid + 1 } else { hi = mid }
        }
        return lo < candidates.count && candidates[lo].distance == d ? candidates[lo].state : nil
    }

    private func mark(_ id: Number160, _ state: State) {
        let d = id ^ key
        // Candidates are sorted by distance, so binary search finds the entry.
        var lo = 0, hi = candidates.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if candidates[mid].distance < d { lo = mid + 1 } else { hi = mid }
        }
        if lo < candidates.count, candidates[lo].distance == d { candidates[lo].state = state }
    }

    private func finish(_ reason: RoutingResult.StopReason) {
        guard !finished else { return }
        finished = true
        var peers: [PeerAddress] = []
        var hops = 0
        for c in candidates where c.state == .answered {
            peers.append(c.peer)
            hops = max(hops, c.depth)
            if peers.count == config.resultSize { break }
        }
        promise.succeed(RoutingResult(peers: peers, hops: hops, messages: messages, failures: failures, stop: reason, answers: answers))
    }
}
