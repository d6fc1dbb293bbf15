import NIOConcurrencyHelpers
import NIOCore
import P2PKernel

/// The tracker: peers list themselves under a key (with an optional attachment), and anyone can
/// ask who is listed. Entries live on the `replicas` (20) peers closest to the key, expire after
/// a TTL (60 s) unless re-added, and trackers of one key exchange entries now and then (PEX).
///
/// ```swift
/// let node = try await Node.builder().plugin(TrackerPlugin()).start()
/// let announcement = try await node.tracker.announce(key, attachment: Array("seeding".utf8))
/// let swarm = try await node.tracker.get(key)
/// ```
///
/// One instance per node: it holds that node's tracker store.
public struct TrackerPlugin: Plugin {
    public let name = "tracker"
    public let version = "1.0.0"
    public let service: TrackerService

    public init(config: TrackerConfig = TrackerConfig()) {
        service = TrackerService(config: config)
    }

    public var config: TrackerConfig { service.config }
    public var store: TrackerStore { service.store }

    public func install(into registry: PluginRegistry) throws {
        try registry.register(command: TrackerAddCommand(service: service))
        try registry.register(command: TrackerGetCommand(service: service))
        try registry.register(command: TrackerPEXCommand(service: service))
        try registry.register(question: TrackerDigestQuestion(service: service))
        let service = self.service
        registry.subscribe { event in
            guard case .peerRemoved(let peer, let reason) = event else { return }
            switch reason {
            case .offline: service.store.remove(peer: peer.id, holdOff: true)
            case .quit: service.store.remove(peer: peer.id, holdOff: false)
            case .unreachable, .disconnected: break
            }
        }
    }

    public func start(node: Node) async throws {
        service.start(node: node)
    }

    public func stop(node: Node) async {
        await service.stop()
    }
}

/// What a tracker has done so far.
public struct TrackerStats: Sendable, Equatable {
    public var addsAccepted = 0
    public var addsDenied = 0
    public var gets = 0
    public var pexSent = 0
    public var pexReceived = 0
    public var pexRefused = 0
    public var pexEntriesTaken = 0
    public var verificationsPassed = 0
    public var verificationsFailed = 0
}

/// A node's tracker: its store, its exchange rounds, the peers heard of waiting to be checked,
/// and its running announcements.
public final class TrackerService: Sendable {
    public let config: TrackerConfig
    public let store: TrackerStore

    private struct Pending {
        var key: Number160
        var peer: TrackerPeer
        var seconds: UInt16
    }

    private struct State {
        var node: Node?
        var timers: [RepeatedTask] = []
        var announcements: [ObjectIdentifier: TrackerAnnouncement] = [:]
        var pexCounts: [Number160: Int] = [:]
        var pexWindow: UInt64 = 0
        var pending: [Number160: Pending] = [:]
        var verifying = 0
        var stopped = false
        var stats = TrackerStats()
    }
    private let state = NIOLockedValueBox(State())

    init(config: TrackerConfig) {
        self.config = config
        store = TrackerStore(config: config)
    }

    public var stats: TrackerStats { state.withLockedValue { $0.stats } }
    func count(_ body: (inout TrackerStats) -> Void) { state.withLockedValue { body(&$0.stats) } }

    func start(node: Node) {
        state.withLockedValue { s in s.node = node }
        store.attach(clock: node.clock, random: node.random) { [weak self] in self?.wake() }
        wake()
    }

    /// Starts the sweep and exchange timers unless they run: they run while the store holds
    /// something and stop after a sweep leaves it empty (a node tracking nothing does not wake).
    func wake() {
        state.withLockedValue { s in
            guard let node = s.node, !s.stopped, s.timers.isEmpty, !store.isEmpty else { return }
            let sweepEvery = max(Duration.seconds(1), config.ttl / 4)
            let pexEvery = max(Duration.milliseconds(100), config.pexInterval)
            let sweep = node.eventLoop.scheduleRepeatedTask(initialDelay: .nanoseconds(sweepEvery.nanoseconds), delay: .nanoseconds(sweepEvery.nanoseconds)) { [self] _ in
                store.sweep()
                sleepIfEmpty()
            }
            let pex = node.eventLoop.scheduleRepeatedTask(initialDelay: .nanoseconds(pexEvery.nanoseconds), delay: .nanoseconds(pexEvery.nanoseconds)) { [self] _ in
                exchange(node)
            }
            s.timers = [sweep, pex]
        }
    }

    /// Stops the timers when the store holds nothing (the next add wakes them).
    private func sleepIfEmpty() {
        let timers = state.withLockedValue { s -> [RepeatedTask] in
            guard store.isEmpty else { return [] }
            defer { s.timers = [] }
            return s.timers
        }
        for t in timers { t.cancel() }
    }

    func stop() async {
        let (timers, announcements) = state.withLockedValue { s in
            defer { s.timers = []; s.announcements = [:]; s.node = nil; s.pending = [:]; s.stopped = true }
            return (s.timers, Array(s.announcements.values))
        }
        for t in timers { t.cancel() }
        for a in announcements { await a.stop() }
    }

    func register(_ a: TrackerAnnouncement) -> Bool {
        state.withLockedValue { s in
            guard s.node != nil else { return false }
            s.announcements[ObjectIdentifier(a)] = a
            return true
        }
    }

    func unregister(_ a: TrackerAnnouncement) {
        _ = state.withLockedValue { $0.announcements.removeValue(forKey: ObjectIdentifier(a)) }
    }

    // MARK: peer exchange

    /// Whether this node is among the `replicas` closest to `key` that it knows of.
    func isResponsible(for key: Number160, node: Node, window: Int? = nil) -> Bool {
        let n = window ?? config.replicas
        let closest = node.peerMap.closest(to: key, count: n)
        guard closest.count >= n, let last = closest.last else { return true }
        return key.isCloser(node.peerID, than: last.id)
    }

    /// One exchange round: for a few keys, push some entries to one other tracker of the key.
    func exchange(_ node: Node) {
        var rng = node.random.generator
        let keys = store.keys.shuffled(using: &rng).prefix(config.pexKeysPerRound)
        for key in keys {
            let others = node.peerMap.closest(to: key, count: config.replicas).filter { $0.id != node.peerID }
            guard let to = others.randomElement(using: &rng) else { continue }
            let entries = store.sample(key: key, limit: config.maxPeersPerMessage).filter { $0.0.id != to.id }
            guard !entries.isEmpty else { continue }
            count { $0.pexSent += 1 }
            _ = node.request(to: to, command: TrackerPEXCommand.id, payload: [.keys([key])] + TrackerCodec.encode(entries))
        }
    }

    /// Whether `sender` may deliver another exchange message this minute.
    func allowExchange(from sender: Number160) -> Bool {
        let minute = store.now / 60_000_000_000
        return state.withLockedValue { s in
            if s.pexWindow != minute {
                s.pexWindow = minute
                s.pexCounts.removeAll(keepingCapacity: true)
            }
            // A full table refuses newcomers until the minute ends (it never grows past 4,096).
            guard s.pexCounts[sender] != nil || s.pexCounts.count < 4_096 else { return false }
            let n = s.pexCounts[sender, default: 0]
            guard n < config.pexPerPeerPerMinute else { return false }
            s.pexCounts[sender] = n + 1
            return true
        }
    }

    /// Takes entries another tracker sent: peers this node has verified at that address are listed
    /// at once; others are pinged first (a tracker never lists an id nobody proved at its address).
    func take(_ entries: [(TrackerPeer, seconds: UInt16)], key: Number160, node: Node) -> Int {
        var taken = 0
        var queued = false
        for (entry, seconds) in entries {
            guard seconds > 0, entry.peer.socket.isValidPeerRecord, entry.id != node.peerID, !store.isHeldOff(entry.id) else { continue }
            if let known = node.peerMap.verifiedPeer(entry.id), known.ip == entry.peer.ip {
                // Listed at the address this node verified, not the one the sender wrote.
                if case .denied = store.add(key: key, peer: known, attachment: entry.attachment, firstHand: false, ttl: .seconds(Int64(seconds))) {
                    continue
                }
                taken += 1
                continue
            }
            guard entry.peer.isDirectlyReachable, entry.peer.relays.isEmpty else { continue }
            let added = state.withLockedValue { s in
                guard !s.stopped, s.pending[entry.id] == nil, s.pending.count < config.maxPendingVerifications else { return false }
                s.pending[entry.id] = Pending(key: key, peer: entry, seconds: seconds)
                return true
            }
            queued = queued || added
        }
        if queued { verifyPending(node) }
        return taken
    }

    /// Pings waiting peers, `maxVerificationsInFlight` at a time; one that answers with its id at
    /// the address it was listed at is listed.
    private func verifyPending(_ node: Node) {
        let batch: [Pending] = state.withLockedValue { s in
            var out: [Pending] = []
            while !s.stopped, s.verifying < config.maxVerificationsInFlight, let (id, p) = s.pending.first {
                s.pending[id] = nil
                s.verifying += 1
                out.append(p)
            }
            return out
        }
        for p in batch {
            let queuedAt = node.clock.now
            node.spawn { [self] in
                let ok = (try? await node.ping(p.peer.peer.socket))?.id == p.peer.id
                state.withLockedValue { s in
                    s.verifying -= 1
                    if ok { s.stats.verificationsPassed += 1 } else { s.stats.verificationsFailed += 1 }
                }
                if ok {
                    let spent = (node.clock.now - queuedAt).nanoseconds / 1_000_000_000
                    let left = max(0, Int64(p.seconds) - spent)
                    if left > 0 { _ = store.add(key: p.key, peer: p.peer.peer, attachment: p.peer.attachment, firstHand: false, ttl: .seconds(left)) }
                }
                verifyPending(node)
            }
        }
    }
}

// MARK: commands

/// `tracker.add`: lists the sender (as this node sees it) under a key with its attachment, and
/// answers with other peers listed there (less those in the sender's filter).
struct TrackerAddCommand: CommandHandler {
    static let commandName = "tracker.add"
    static let id = CommandID.derive(from: commandName)
    let name = TrackerAddCommand.commandName
    let service: TrackerService

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        let config = service.config
        do {
            let key = try TrackerCodec.key(request)
            let bytes = TrackerCodec.byteSections(request.payload)
            guard let attachment = bytes.first else { throw TrackerError.badRequest("an attachment section expected (empty for none)") }
            guard attachment.count <= config.maxAttachmentBytes else {
                throw TrackerError.badRequest("an attachment of \(attachment.count) bytes, over \(config.maxAttachmentBytes)")
            }
            let known = try TrackerCodec.filter(bytes.dropFirst().first)
            guard context.sender.socket.isValidPeerRecord else {
                return .reply(.error(.badRequest, "the sender's address \(context.sender.socket) cannot be listed"))
            }
            // Keys far from this node are not its to track (a peer cannot fill it with keys it
            // would never be asked about); twice the replica window leaves room for other views.
            guard service.isResponsible(for: key, node: context.node, window: 2 * config.replicas) else {
                service.count { $0.addsDenied += 1 }
                return .reply(.error(.denied, "not among the \(2 * config.replicas) closest to \(key) here"))
            }
            guard context.sender.isContactable else {
                service.count { $0.addsDenied += 1 }
                return .reply(.error(.denied, "\(context.sender.id) is not reachable by others (firewalled, no relays): listing it would help nobody"))
            }
            if case .denied(let why) = service.store.add(key: key, peer: context.sender, attachment: attachment, firstHand: true) {
                service.count { $0.addsDenied += 1 }
                return .reply(.error(.denied, why))
            }
            service.count { $0.addsAccepted += 1 }
            let others = service.store.list(key: key, known: known, limit: config.maxPeersPerMessage + 1).peers
                .filter { $0.id != context.sender.id }.prefix(config.maxPeersPerMessage)
            return .reply(Reply(payload: TrackerCodec.encode(others.map { ($0, seconds: 0) })))
        } catch {
            return .reply(.error(.badRequest, "\(error)"))
        }
    }
}

/// `tracker.get`: up to 35 peers listed under a key, picked at random among those not in the
/// asker's known-peers filter, and how many are listed in all.
struct TrackerGetCommand: CommandHandler {
    static let commandName = "tracker.get"
    static let id = CommandID.derive(from: commandName)
    let name = TrackerGetCommand.commandName
    let service: TrackerService

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        do {
            let key = try TrackerCodec.key(request)
            let known = try TrackerCodec.filter(TrackerCodec.byteSections(request.payload).first)
            service.count { $0.gets += 1 }
            let (peers, total) = service.store.list(key: key, known: known, limit: service.config.maxPeersPerMessage)
            return .reply(Reply(payload: TrackerCodec.encode(peers.map { ($0, seconds: 0) }) + [.integer(Int64(total))]))
        } catch {
            return .reply(.error(.badRequest, "\(error)"))
        }
    }
}

/// `tracker.pex`: entries another tracker of the key pushes. Taken only by a node among the
/// key's closest (as far as it knows), at most `pexPerPeerPerMinute` messages per sender,
/// never over a first-hand entry, and only for peers verified at their address.
struct TrackerPEXCommand: CommandHandler {
    static let commandName = "tracker.pex"
    static let id = CommandID.derive(from: commandName)
    let name = TrackerPEXCommand.commandName
    let service: TrackerService

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        let config = service.config
        guard service.allowExchange(from: context.sender.id) else {
            service.count { $0.pexRefused += 1 }
            return .reply(.error(.denied, "over \(config.pexPerPeerPerMinute) exchange messages this minute"))
        }
        do {
            let key = try TrackerCodec.key(request)
            let entries = try TrackerCodec.decode(request.payload, maxPeers: config.maxPeersPerMessage, maxAttachment: config.maxAttachmentBytes)
            guard service.isResponsible(for: key, node: context.node) else {
                service.count { $0.pexRefused += 1 }
                return .reply(.error(.denied, "not among the \(config.replicas) closest to \(key) here"))
            }
            let taken = service.take(entries, key: key, node: context.node)
            service.count { $0.pexReceived += 1; $0.pexEntriesTaken += taken }
            return .reply(Reply(payload: [.integer(Int64(taken))]))
        } catch {
            service.count { $0.pexRefused += 1 }
            return .reply(.error(.badRequest, "\(error)"))
        }
    }
}

/// Answers, inside a lookup, how many live entries this node holds for the key; a non-zero count
/// is a direct hit, so a get asks only trackers that have something.
struct TrackerDigestQuestion: RoutingQuestionHandler {
    static let handlerName = "tracker.digest"
    let name = TrackerDigestQuestion.handlerName
    let service: TrackerService

    func answer(_ question: [Payload], key: Number160, context: CommandContext) -> [Payload]? {
        [.integer(Int64(service.store.count(key: key)))]
    }

    static func isHit(_ answer: [Payload]) -> Bool {
        for p in answer { if case .integer(let n) = p { return n > 0 } }
        return false
    }
}
