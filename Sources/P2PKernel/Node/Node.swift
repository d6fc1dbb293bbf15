import Logging
import NIOConcurrencyHelpers
import NIOCore

/// A peer of the overlay: a thin front over its kernel (transport, paths, sessions, RPC, NAT
/// traversal: see `Kernel`), its peer map and its plugin registry.
///
/// ```swift
/// let node = try await Node.builder().port(0).start()
/// try await node.bootstrap(to: PeerSocketAddress(ip: .loopback, port: 4000))
/// let result = try await node.closestPeers(to: Number160(hashing: "hello"))
/// await node.shutdown()
/// ```
/// Every message is handled on the node's event loop; only the peer map is shared behind a lock.
/// Bytes move through the node's `PeerTransport`: real sockets, or the simulated network
/// (P2PTesting), on which the same code runs in virtual time.
public final class Node: @unchecked Sendable {
    public let config: NodeConfig
    /// This peer's id.
    public let peerID: Number160
    /// The key pair behind the id.
    public let keyPair: PeerKeyPair
    /// The loop every part and callback of this node runs on.
    public let eventLoop: any EventLoop
    /// The node's time (virtual on the simulated network) and random numbers (seeded there).
    public let clock: NodeClock
    public let random: RandomSource
    public let peerMap: PeerMap
    /// What plugins registered: commands, reply handlers, schemes, policies, and the state
    /// plugins share (storage keeps its backend and interceptors there).
    public let registry: PluginRegistry
    public let logger: Logger
    /// The node's counters and gauges, when `NodeConfig.metrics` names a factory.
    public let metrics: NodeMetrics?
    /// NAT traversal: reachability, port mappings, relays (see `NATTraversal`).
    public let nat = NATTraversal()
    /// The parts that move, seal, route and answer messages.
    let kernel: Kernel
    /// The latest events, for the status page.
    let events: EventLog
    /// This node as others reach it (set on the loop by the kernel; read from any thread).
    let published: NIOLockedValueBox<PeerAddress>
    /// What is counted for operators and tests, and the plugins that failed to install.
    let counters = NIOLockedValueBox(Counters())

    struct Counters {
        var dropped = 0
        var handshakes = 0
        var securityRefusals = 0
        var refusedPlugins: [(name: String, reason: String)] = []
    }

    init(config: NodeConfig) {
        self.config = config
        let random = config.randomSeed.map(RandomSource.init(seed:)) ?? RandomSource()
        self.random = random
        let keys = config.keyPair ?? PeerKeyPair(random: random)
        self.keyPair = keys
        self.peerID = config.security == .insecure ? (config.peerID ?? keys.peerID) : keys.peerID
        let loop = config.eventLoopGroup.next()
        self.eventLoop = loop
        let clock = NodeClock(loop: loop)
        self.clock = clock
        self.events = EventLog(clock: clock)
        self.peerMap = PeerMap(selfID: peerID, config: config.peerMap, clock: clock)
        self.registry = PluginRegistry()
        var logger = config.logger
        logger[metadataKey: "peer"] = "\(peerID.hexString.prefix(8))"
        self.logger = logger
        self.metrics = config.metrics.map(NodeMetrics.init(factory:))
        let me = PeerAddress(id: peerID, socket: PeerSocketAddress(ip: IPAddress(config.host) ?? .v4(0), port: config.port), flags: config.flags)
        self.published = NIOLockedValueBox(me)
        self.kernel = Kernel(config: config, loop: loop, clock: clock, random: random, keyPair: keys, logger: logger, me: me,
                             peerMap: peerMap, registry: registry)
        kernel.attach(self)
        nat.attach(self)
    }

    /// A builder with every default; see `NodeBuilder`.
    public static func builder() -> NodeBuilder { NodeBuilder() }

    static func start(config: NodeConfig, handlers: [any CommandHandler], plugins: [(plugin: any Plugin, optional: Bool)]) async throws -> Node {
        if config.security == .authenticated, let fixed = config.peerID, fixed != config.keyPair?.peerID {
            throw NodeStartError.unprovableID(fixed)
        }
        let node = Node(config: config)
        do {
            try await node.run(handlers: handlers, plugins: plugins)
        } catch {
            // The NAT part holds its node until shutdown; a node that never ran is let go here.
            node.nat.detach()
            throw error
        }
        return node
    }

    /// Registers the handlers and plugins, binds the transport and starts the plugins and timers.
    private func run(handlers: [any CommandHandler], plugins: [(plugin: any Plugin, optional: Bool)]) async throws {
        do {
            for h in KernelCommands.handlers + handlers { try registry.commands.register(h) }
        } catch {
            throw NodeStartError.registry(error)
        }
        for (plugin, optional) in plugins {
            do {
                try registry.install(plugin)
            } catch {
                let failure: PluginError = (error as? PluginError) ?? .installFailed(plugin: plugin.name, reason: "\(error)")
                guard optional else { throw NodeStartError.plugin(failure) }
                logger.error("plugin refused, running without it", metadata: ["plugin": "\(plugin.name)", "error": "\(failure)"])
                counters.withLockedValue { $0.refusedPlugins.append((plugin.name, "\(failure)")) }
            }
        }
        do {
            for d in try registry.resolveRequirements() {
                logger.info("installed a plugin's default", metadata: ["default": "\(d.installed)", "for": "\(d.for)", "need": "\(d.need)"])
            }
        } catch {
            throw NodeStartError.plugin(error)
        }
        try await kernel.bind()
        kernel.connectEvents()
        for plugin in registry.plugins {
            do {
                try await plugin.start(node: self)
            } catch {
                await shutdown()
                throw NodeStartError.plugin(.installFailed(plugin: plugin.name, reason: "start failed: \(error)"))
            }
        }
        eventLoop.execute { [kernel] in kernel.startTimers() }
        if config.nat.mode == .auto { nat.startAutomatic() }
        logger.debug("listening", metadata: ["address": "\(address.socket)"])
    }

    /// Announces that this node leaves (a quit to every verified peer it has a session with),
    /// fails what is pending, and closes every socket. Safe to call more than once. With
    /// `announce: false` no quit is sent: the node vanishes as a crashed one would (for tests of
    /// churn).
    public func shutdown(announce: Bool = true) async {
        let first: Bool = (try? await eventLoop.submit { [kernel] in
            defer { kernel.stopping = true }
            return kernel.running && !kernel.stopping
        }.get()) ?? false
        if first {
            for plugin in registry.plugins.reversed() { await plugin.stop(node: self) }
            await nat.stop()
        }
        try? await eventLoop.flatSubmit { [kernel] in kernel.stop(announce: announce) }.get()
        nat.detach()
    }

    /// Whether the node is still running (not shut down).
    public var isRunning: Bool {
        get async { (try? await eventLoop.submit { [kernel] in kernel.running }.get()) ?? false }
    }

    // MARK: what a node shows

    /// This node as others reach it: its announced ports, flags and relays. It changes at run
    /// time (a port mapping, relays); read from any thread.
    public var address: PeerAddress { published.withLockedValue { $0 } }

    /// Optional plugins that failed to install, with why; the node runs without them.
    public var refusedPlugins: [(name: String, reason: String)] { counters.withLockedValue { $0.refusedPlugins } }

    /// Packets dropped: undecodable, unauthenticated, replayed, misdirected or over a rate.
    public var droppedMessages: Int { counters.withLockedValue { $0.dropped } }

    /// Handshakes completed, as initiator and as responder.
    public var handshakesCompleted: Int { counters.withLockedValue { $0.handshakes } }

    /// How long a request may go unanswered before a caller suspects the peer and goes on
    /// without it (the request itself stays pending until its timeout): the retransmission time
    /// of the round trips this node measured, between 200 ms and `udpRetryAfter`. Read it on the
    /// node's event loop.
    public func suspectAfter() -> TimeAmount { kernel.rpc.suspectAfter() }

    /// Runs `action` on the node's event loop after `delay`, unless cancelled first: as
    /// `eventLoop.scheduleTask`, but cheap to cancel — the node's timers share one heap, where
    /// NIO's loop cancels a task by searching every task scheduled on the loop (hundreds of
    /// nodes on a few loops, each cancelling a timer per reply, drown in that search). For
    /// timers that are mostly cancelled: suspicion times, deadlines per request. Call it on the
    /// node's event loop; nothing runs once the node has stopped.
    @discardableResult
    public func scheduleTimer(in delay: TimeAmount, _ action: @escaping () -> Void) -> NodeTimer {
        eventLoop.assertInEventLoop()
        return NodeTimer(handle: kernel.timers.schedule(in: delay, action))
    }

    /// Cancels a timer of `scheduleTimer`; nothing happens if it ran or was cancelled. On the
    /// node's event loop.
    public func cancelTimer(_ timer: NodeTimer?) {
        eventLoop.assertInEventLoop()
        kernel.timers.cancel(timer?.handle)
    }

    /// Exchanges refused because one side runs insecure mode and the other does not.
    public var securityRefusals: Int { counters.withLockedValue { $0.securityRefusals } }

    /// Whether the node listens on loopback only (no gateway is ever asked for it).
    var boundToLoopback: Bool { IPAddress(config.host)?.isLoopback ?? false }

    /// What the node is doing now (read on its event loop).
    public func status() async throws -> NodeStatus {
        try await eventLoop.submit { [self] in NodeStatus(of: self) }.get()
    }

    /// Records a line in the node's recent events (shown on the status page).
    public func recordEvent(_ text: String) {
        events.add(text)
    }

    // MARK: tasks

    /// Starts `body` as a task of this node. On the simulated network it runs on the simulation's
    /// loop, in its order (so a run repeats from its seed); on sockets, as any task does. Plugins
    /// start their background work with this rather than `Task {}`.
    @discardableResult
    public func spawn(_ body: @escaping @Sendable () async -> Void) -> Task<Void, Never> {
        Task(executorPreference: clock.taskExecutor) { await body() }
    }

    /// A future completed by `body`, run as a task of this node (see `spawn`): how a handler on the
    /// event loop answers with async work.
    public func makeFutureWithTask<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) -> EventLoopFuture<T> {
        let promise = eventLoop.makePromise(of: T.self)
        Task(executorPreference: clock.taskExecutor) {
            do { promise.succeed(try await body()) } catch { promise.fail(error) }
        }
        return promise.futureResult
    }

    // MARK: requests

    /// Sends a request and completes with the peer's reply, whatever its type (`ok`, `notFound`,
    /// `denied` …); transport failures and timeouts fail the future with an `RPCError`.
    ///
    /// - Parameters:
    ///   - target: where to send it.
    ///   - expectedID: the peer id the reply must come from; `.zero` when not known yet.
    public func request(to target: PeerSocketAddress, expectedID: Number160 = .zero, command: UInt16,
                        payload: [Payload] = [], transport: TransportChoice = .auto,
                        timeout: Duration? = nil) -> EventLoopFuture<Message> {
        onLoop { [kernel] in
            kernel.rpc.requestOnLoop(target: target, expectedID: expectedID, command: command, payload: payload, transport: transport, timeout: timeout)
        }
    }

    /// `request` to a known peer: the reply must come from its id.
    public func request(to peer: PeerAddress, command: UInt16, payload: [Payload] = [],
                        transport: TransportChoice = .auto, timeout: Duration? = nil) -> EventLoopFuture<Message> {
        onLoop { [kernel] in
            kernel.paths.learnRoute(peer)
            return kernel.rpc.requestOnLoop(target: peer.socket, expectedID: peer.id, command: command, payload: payload, transport: transport, timeout: timeout)
        }
    }

    /// `request` to a known peer, given up after a few of the peer's own round trips: `roundTrips`
    /// times its retransmission time (its smoothed round trip plus four deviations, at least
    /// 200 ms), at least `atLeast`, at most the request timeout. For checks where learning soon
    /// that a peer is gone is worth more than a late answer — replication asking a replica
    /// whether it is up to date — and that are cheap to ask again. A peer this node never
    /// measured gets the full request timeout. The re-sends inside follow its round trip too.
    public func requestPromptly(to peer: PeerAddress, command: UInt16, payload: [Payload] = [],
                                atLeast: Duration = .seconds(1), roundTrips: Int = 5) -> EventLoopFuture<Message> {
        onLoop { [kernel] in
            kernel.paths.learnRoute(peer)
            let timeout = kernel.rpc.promptTimeout(peer.id, atLeast: atLeast, roundTrips: roundTrips)
            return kernel.rpc.requestOnLoop(target: peer.socket, expectedID: peer.id, command: command, payload: payload, transport: .auto, timeout: timeout)
        }
    }

    /// Sends a request by command name; the reply's type is checked (`ok` or the matching error).
    public func request(to peer: PeerAddress, command name: String, payload: [Payload] = [],
                        transport: TransportChoice = .auto) async throws -> Message {
        let reply = try await request(to: peer, command: CommandID.derive(from: name), payload: payload, transport: transport).get()
        if let error = RPCError.from(reply: reply) { throw error }
        return reply
    }

    /// Runs a command of this node's registry as if the request had come from this node itself,
    /// and returns the reply it would have sent (an `unknownCommand` reply when there is no handler).
    public func handleLocally(command: UInt16, payload: [Payload]) -> EventLoopFuture<Message> {
        let (network, me, sender) = (config.networkID, peerID, address)
        let request = Message(networkID: network, id: 0, type: .request, command: command, sender: sender, recipientID: me, payload: payload)
        let message: @Sendable (Reply) -> Message = { reply in
            Message(networkID: network, id: 0, type: reply.type, command: command, sender: sender, recipientID: me, payload: reply.payload)
        }
        guard let handler = registry.commands.handler(for: command) else {
            return eventLoop.makeSucceededFuture(message(.error(.unknownCommand, "no handler for command 0x\(String(command, radix: 16))")))
        }
        return onLoop { [self] in
            let context = CommandContext(node: self, sender: sender, transport: .udp, sourcePort: sender.udpPort)
            switch handler.handle(request, context: context) {
            case .reply(let r): return eventLoop.makeSucceededFuture(message(r))
            case .future(let f): return f.hop(to: eventLoop).map(message)
            }
        }
    }

    /// Pings an address and returns the peer that answered.
    public func ping(_ target: PeerSocketAddress, over transport: TransportKind = .udp) async throws -> PeerAddress {
        let reply = try await request(to: target, command: kernel.commands.ping, transport: transport == .udp ? .udp : .tcp).get()
        if let error = RPCError.from(reply: reply) { throw error }
        return reply.sender
    }

    /// Runs `body` on the event loop (at once when already there).
    private func onLoop<T: Sendable>(_ body: @escaping @Sendable () -> EventLoopFuture<T>) -> EventLoopFuture<T> {
        eventLoop.inEventLoop ? body() : eventLoop.flatSubmit(body)
    }

    // MARK: routing

    /// The k peers closest to `key` in the whole overlay, found by iterative lookup.
    public func closestPeers(to key: Number160, config: RoutingConfig? = nil) async throws -> RoutingResult {
        try await lookup(key, config: config).get()
    }

    /// The lookup as a future, for callers already on event loops (simulations, plugins).
    ///
    /// - Parameters:
    ///   - question: a plugin's question carried in every request; answers come back in
    ///     `RoutingResult.answers`, and hits count towards `maxDirectHits`.
    ///   - initialHits: hits already counted before the lookup (say, this node holds the data).
    public func lookup(_ key: Number160, config: RoutingConfig? = nil, question: RoutingQuestion? = nil,
                       initialHits: Int = 0) -> EventLoopFuture<RoutingResult> {
        let cfg = config ?? self.config.routing
        return onLoop { [self] in
            guard kernel.running else { return eventLoop.makeFailedFuture(RPCError.shutDown) }
            return IterativeLookup(node: self, key: key, config: cfg, question: question, initialHits: initialHits).start()
        }
    }

    /// Joins the overlay: pings the seeds until one answers, then looks up our own id, which fills
    /// our peer map and announces us to the peers closest to us.
    ///
    /// - Parameter fill: whether to fill the peer map (look up our own id, then one random id in
    ///   each empty far bucket). A peer that stays does; a one-shot client that asks one thing and
    ///   leaves need not: its command's lookup starts from the seed, and every lookup of the join
    ///   would only meet more of whatever dead peers the seed still names.
    @discardableResult
    public func bootstrap(to seeds: [PeerSocketAddress], fill: Bool = true) async throws -> BootstrapResult {
        var reasons: [String] = []
        for seed in seeds {
            do {
                let peer = try await ping(seed)
                try await eventLoop.submit { self.kernel.seed = peer }.get()
                guard fill else {
                    return BootstrapResult(seed: peer, lookup: nil, refreshLookups: 0, verifiedPeers: peerMap.counts.verified)
                }
                let lookup = try await closestPeers(to: peerID)
                let refreshed = try await refreshBuckets()
                let verified = peerMap.counts.verified
                // Joined, but nobody here can say how we are seen: taken as reachable for now.
                if verified == 0 { await nat.nobodyToAsk(self) }
                return BootstrapResult(seed: peer, lookup: lookup, refreshLookups: refreshed, verifiedPeers: verified)
            } catch {
                reasons.append("\(seed): \(error)")
            }
        }
        throw BootstrapError.noSeedAnswered(reasons)
    }

    /// Joins through one seed.
    @discardableResult
    public func bootstrap(to seed: PeerSocketAddress) async throws -> BootstrapResult {
        try await bootstrap(to: [seed])
    }

    /// Fills empty buckets farther than our nearest neighbour by looking up a random id in each.
    ///
    /// Looking up our own id only meets peers near us; without this, a peer can end up knowing
    /// nobody in the other half of the id space, and lookups from it for keys there converge on
    /// the wrong region (Kademlia's join does the same refresh). Returns how many lookups ran.
    @discardableResult
    public func refreshBuckets() async throws -> Int {
        let occupancy = peerMap.bucketOccupancy
        guard let nearest = occupancy.firstIndex(where: { $0 > 0 }) else { return 0 }
        var rng = random.generator
        var keys: [Number160] = []
        for bucket in stride(from: 159, to: nearest, by: -1) where occupancy[bucket] == 0 {
            keys.append(peerID ^ Number160.random(bitLength: bucket + 1, using: &rng))
        }
        guard !keys.isEmpty else { return 0 }
        var refresh = config.routing
        refresh.resultSize = min(refresh.resultSize, refresh.refreshResultSize)
        let lookups = keys.map { lookup($0, config: refresh) }
        _ = try await EventLoopFuture.whenAllComplete(lookups, on: eventLoop).get()
        return keys.count
    }

    // MARK: reachability

    /// Asks a peer how it sees us and to probe us back over UDP and TCP.
    public func discover(via peer: PeerSocketAddress) async throws -> DiscoverResult {
        let reply = try await request(to: peer, command: kernel.commands.discover, transport: .udp).get()
        if let error = RPCError.from(reply: reply) { throw error }
        guard let observed = reply.firstPeers?.first?.socket, let bits = reply.firstInteger else {
            throw RPCError.malformedReply("discover reply without observed address and probe result")
        }
        let udp = bits & 1 != 0, tcp = bits & 2 != 0
        let reachable = udp && tcp && observed.udpPort == address.udpPort
        let result = DiscoverResult(observed: observed, udpReachable: udp, tcpReachable: tcp,
                                    reachability: reachable ? .reachable : .behindNAT(outside: observed))
        registry.publish(.reachability(result))
        return result
    }

    /// Whether `peer` (or a third peer it picks) can reach this node at `udpPort` and `tcpPort`
    /// of the IP it sees us from, unsolicited (see `ProbePacket`). The prober answers once it has
    /// sent the probes; they then get `grace` to arrive. `prober` is the peer that sent them.
    public func probeBack(via peer: PeerAddress, udpPort: UInt16, tcpPort: UInt16,
                          grace: Duration = .milliseconds(400)) async throws -> (udp: Bool, tcp: Bool, prober: PeerAddress?) {
        try await kernel.prober.probeBack(via: peer, udpPort: udpPort, tcpPort: tcpPort, grace: grace)
    }

    /// Asks `peer` for the address it sees our UDP socket at.
    public func observeUDP(via peer: PeerAddress, timeout: Duration? = nil) async throws -> PeerSocketAddress {
        try await kernel.prober.observeUDP(via: peer, timeout: timeout)
    }

    /// Asks the peer at `target` for the address it sees a TCP connection from our listen port
    /// at (see `ObservePacket`).
    public func observeTCP(at target: PeerSocketAddress, timeout: Duration = .seconds(2)) async throws -> PeerSocketAddress {
        try await kernel.prober.observeTCP(at: target, timeout: timeout)
    }
}

/// A timer a node runs on its event loop (`Node.scheduleTimer`).
public struct NodeTimer: Hashable, Sendable {
    let handle: KernelTimers.Handle
}
