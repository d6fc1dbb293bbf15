import Logging
import NIOConcurrencyHelpers
import NIOCore

/// A peer of the overlay: UDP and TCP on one port, a peer map, an RPC layer and iterative routing.
///
/// ```swift
/// let node = try await Node.builder().port(0).start()
/// try await node.bootstrap(to: PeerSocketAddress(ip: .loopback, port: 4000))
/// let result = try await node.closestPeers(to: Number160(hashing: "hello"))
/// await node.shutdown()
/// ```
///
/// Data flow of one message:
/// ```
///  UDP datagram ─┐                         ┌─ reply? ── pending[id] ── promise ── caller
///                ├─ WireCodec.decode ──────┤
///  TCP frame ────┘   (network id checked)  └─ request ─ registry[command] ── handler ── reply
/// ```
/// Everything on that path runs on the node's event loop; the state it touches (`pending`, the
/// TCP pool) is confined to that loop, and only the peer map is shared behind a lock. Bytes move
/// through the node's `PeerTransport`: real sockets, or the simulated network (P2PTesting), on
/// which the same code runs in virtual time.
public final class Node: @unchecked Sendable {
    public let config: NodeConfig
    /// This peer's id.
    public let peerID: Number160
    /// The key pair behind the id (signing comes in a later layer).
    public let keyPair: PeerKeyPair
    /// The loop every channel and callback of this node runs on.
    public let eventLoop: any EventLoop
    public let peerMap: PeerMap
    /// What plugins registered: commands, reply handlers, schemes, policies, and the state
    /// plugins share (storage keeps its backend and interceptors there).
    public let registry: PluginRegistry
    public let logger: Logger
    /// The node's counters and gauges, when `NodeConfig.metrics` names a factory.
    public let metrics: NodeMetrics?
    /// The latest events, for the status page.
    let events: EventLog
    /// This node as others reach it: its announced ports, flags and relays. It changes at run
    /// time (a port mapping, relays); read from any thread.
    public var address: PeerAddress { published.withLockedValue { $0 } }
    let published: NIOLockedValueBox<PeerAddress>
    /// The same, confined to the event loop: what every outgoing message header carries.
    var selfAddress: PeerAddress
    /// NAT traversal: reachability, port mappings (see `NATTraversal`).
    public let nat = NATTraversal()
    /// Probe-backs waiting for their nonce (see `ProbePacket`).
    var probes: [UInt64: ProbeWait] = [:]

    /// The node's time (virtual on the simulated network) and random numbers (seeded there).
    public let clock: NodeClock
    public let random: RandomSource
    /// How bytes move: sockets, or the simulated network.
    let transport: any PeerTransport

    // Confined to `eventLoop`:
    var pending: [UInt32: PendingRequest] = [:]
    /// Relayed peers: where their relays are (see `Relay.swift`).
    var relayRoutes: [Number160: RelayRoute] = [:]
    /// Connections relayed peers opened to us (reverse connections), used instead of their relays.
    var directPaths: [Number160: any PeerConnection] = [:]
    /// Punched UDP paths to relayed peers: the socket and the address their datagrams go to
    /// instead of their relays (see `HolePunch.swift`).
    var udpPaths: [Number160: UDPPath] = [:]
    /// Birthday sockets that became paths, by the remote address they serve: replies to a
    /// datagram from there leave on that socket, not the node's.
    var punchSockets: [Endpoint: any DatagramSocket] = [:]
    /// Punches in progress by nonce, which peer each is with, and when each peer was last punched to.
    var punches: [UInt64: Punch] = [:]
    var punchByPeer: [Number160: UInt64] = [:]
    var punchTried: [Number160: UInt32] = [:]
    var punchAnswered: [Number160: UInt32] = [:]
    /// Punches begun or answered in the last minute: when, and the other side's address group.
    var punchLog: [(at: UInt32, group: UInt64, peer: Number160)] = []
    /// PUNCH datagrams sent and TCP punch dials made, over the node's life.
    var punchPacketsSent = 0
    var punchDials = 0
    var pathKeepAlive: RepeatedTask?
    /// Pool keys whose connections are never evicted (links to our relays, reverse connections).
    var pinned: Set<PeerSocketAddress> = []
    /// Relay side: the peers we relay for, and which link belongs to whom.
    var relayServed: [Number160: RelayServed] = [:]
    var relayLinkOwners: [ObjectIdentifier: Number160] = [:]
    /// Relayed side: our links to our relays (connection → relay id), and when we last
    /// connected back to a peer that wrote through them.
    var relayLinks: [ObjectIdentifier: Number160] = [:]
    var reverseTried: [Number160: UInt32] = [:]
    var randomIDs: RandomPool
    /// The handshake responder; nil in insecure mode.
    let responder: HandshakeResponder?
    var sessions: SessionTable
    var handshakes: [UInt64: OutboundHandshake] = [:]
    var handshakeKeys: [HandshakeKey: UInt64] = [:]
    var handshakeBuckets: TokenBuckets
    var discoverBuckets: TokenBuckets
    var probeBuckets: TokenBuckets
    /// The smoothed round trip of UDP requests: when to send one again.
    var rtt = RTTEstimator()
    var handlersInFlight = 0
    var handlersPerPeer: [UInt64: Int] = [:]
    let refusalLog: LogBudget
    var pool: [PeerSocketAddress: EventLoopFuture<any PeerConnection>] = [:]
    var inboundConnections: [ObjectIdentifier: any PeerConnection] = [:]
    var inboundPerIP: [UInt64: Int] = [:]
    var authenticatedConnections: Set<ObjectIdentifier> = []
    /// Bytes announced by TCP frames still arriving, over all connections.
    package let partialFrames: PartialFrameBudget
    /// Uptime seconds: what sessions age by.
    var coarseSeconds: UInt32 { clock.seconds }
    var metricsTask: RepeatedTask?

    var poolOrder: [PeerSocketAddress] = []
    var running = true
    var stopping = false
    var maintenanceTask: RepeatedTask?
    var backgroundTasks: [RepeatedTask] = []
    let kernelCommands: KernelCommandIDs

    /// Optional plugins that failed to install, with why; the node runs without them.
    public var refusedPlugins: [(name: String, reason: String)] { refused.withLockedValue { $0 } }
    let refused = NIOLockedValueBox([(name: String, reason: String)]())

    /// Packets dropped: undecodable, unauthenticated, replayed, misdirected or over a rate
    /// (counted for operators and tests).
    public var droppedMessages: Int { droppedCount.withLockedValue { $0 } }
    let droppedCount = NIOLockedValueBox(0)

    /// Handshakes completed, as initiator and as responder.
    public var handshakesCompleted: Int { handshakeCount.withLockedValue { $0 } }
    let handshakeCount = NIOLockedValueBox(0)

    /// Exchanges refused because one side runs insecure mode and the other does not.
    public var securityRefusals: Int { securityRefusalCount.withLockedValue { $0 } }
    let securityRefusalCount = NIOLockedValueBox(0)

    init(config: NodeConfig, kernelCommands: KernelCommandIDs) {
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
        self.selfAddress = me
        self.published = NIOLockedValueBox(me)
        self.kernelCommands = kernelCommands
        self.randomIDs = RandomPool(random)
        self.responder = config.security == .authenticated ? HandshakeResponder(identity: keys, network: config.networkID, random: random) : nil
        self.sessions = SessionTable(capacity: config.limits.maxSessions)
        let limits = config.limits
        self.handshakeBuckets = TokenBuckets(rate: limits.handshakesPerSecond, burst: limits.handshakeBurst, slots: limits.rateLimitSlots, seed: random.next())
        self.discoverBuckets = TokenBuckets(rate: limits.discoversPerSecond, burst: limits.discoverBurst, slots: limits.rateLimitSlots, seed: random.next())
        self.probeBuckets = TokenBuckets(rate: limits.probesPerSecond, burst: limits.probeBurst, slots: limits.rateLimitSlots, seed: random.next())
        self.refusalLog = LogBudget(perSecond: 2, clock: clock)
        self.partialFrames = PartialFrameBudget(limit: limits.maxPartialFrameBytes)
        self.transport = config.makeTransport?(loop, config, logger)
            ?? SocketTransport(eventLoop: loop, host: config.host, port: config.port, idleTimeout: config.tcpIdleTimeout, limits: limits, logger: logger)
        nat.attach(self)
    }

    /// A builder with every default; see `NodeBuilder`.
    public static func builder() -> NodeBuilder { NodeBuilder() }

    static func start(config: NodeConfig, handlers: [any CommandHandler], plugins: [(plugin: any Plugin, optional: Bool)]) async throws -> Node {
        if config.security == .authenticated, let fixed = config.peerID, fixed != config.keyPair?.peerID {
            throw NodeStartError.unprovableID(fixed)
        }
        let kernel = KernelCommandIDs()
        let node = Node(config: config, kernelCommands: kernel)
        do {
            for h in KernelCommands.handlers + handlers { try node.registry.commands.register(h) }
        } catch {
            throw NodeStartError.registry(error)
        }
        for (plugin, optional) in plugins {
            do {
                try node.registry.install(plugin)
            } catch {
                let failure: PluginError = (error as? PluginError) ?? .installFailed(plugin: plugin.name, reason: "\(error)")
                guard optional else { throw NodeStartError.plugin(failure) }
                node.logger.error("plugin refused, running without it", metadata: ["plugin": "\(plugin.name)", "error": "\(failure)"])
                node.refused.withLockedValue { $0.append((plugin.name, "\(failure)")) }
            }
        }
        do {
            for d in try node.registry.resolveRequirements() {
                node.logger.info("installed a plugin's default", metadata: ["default": "\(d.installed)", "for": "\(d.for)", "need": "\(d.need)"])
            }
        } catch {
            throw NodeStartError.plugin(error)
        }
        do {
            try await node.transport.start(events: node).get()
        } catch let error as NodeStartError {
            throw error
        } catch {
            throw NodeStartError.bindFailed(host: config.host, port: config.port, reason: "\(error)")
        }
        try await node.eventLoop.submit {
            node.selfAddress.socket = PeerSocketAddress(ip: node.selfAddress.socket.ip, port: node.transport.boundPort)
            node.published.withLockedValue { $0 = node.selfAddress }
        }.get()
        node.connectEvents()
        for plugin in node.registry.plugins {
            do {
                try await plugin.start(node: node)
            } catch {
                await node.shutdown()
                throw NodeStartError.plugin(.installFailed(plugin: plugin.name, reason: "start failed: \(error)"))
            }
        }
        node.eventLoop.execute {
            if node.metrics != nil {
                node.metricsTask = node.eventLoop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { [weak node] _ in
                    guard let node else { return }
                    node.metrics?.sample(node)
                }
            }
            node.startMaintenance()
        }
        if config.nat.mode == .auto { node.nat.startAutomatic() }
        node.logger.debug("listening", metadata: ["address": "\(node.address.socket)"])
        return node
    }

    /// Forwards peer map changes to event subscribers and replication policies.
    private func connectEvents() {
        let registry = self.registry
        let policies = registry.replicationPolicies
        let log = events
        registry.subscribe { event in
            switch event {
            case .peerInserted(let p, let verified) where verified: log.add("peer joined: \(p.id.hexString.prefix(12)) at \(p.socket)")
            case .peerRemoved(let p, let reason): log.add("peer left: \(p.id.hexString.prefix(12)) at \(p.socket) (\(reason))")
            case .reachabilityChanged(let report): log.add(report.summary)
            case .directPath(let path): log.add("direct path: \(path)")
            default: break
            }
        }
        peerMap.onChange { [weak self] event in
            switch event {
            case .inserted(let p, let verified):
                registry.publish(.peerInserted(p, verified: verified))
                if verified, let self, !policies.isEmpty { self.replicate(.peerInserted(p)) }
            case .removed(let p, let reason):
                registry.publish(.peerRemoved(p, reason: reason))
                if let self, !policies.isEmpty { self.replicate(.peerRemoved(p)) }
            }
        }
    }

    /// Hands an event to every replication policy (off the event loop: policies may do I/O).
    public func replicate(_ event: ReplicationEvent) {
        let policies = registry.replicationPolicies
        guard !policies.isEmpty else { return }
        let context = ReplicationContext(node: self)
        for p in policies { p.record(event, context: context) }
        spawn {
            for p in policies { await p.handle(event, context: context) }
        }
    }

    /// Announces that this node leaves (a quit to every verified peer it has a session with),
    /// fails what is pending, and closes every socket. Safe to call more than once. With
    /// `announce: false` no quit is sent: the node vanishes as a crashed one would (for tests of
    /// churn).
    public func shutdown(announce: Bool = true) async {
        let first: Bool = (try? await eventLoop.submit { [self] in
            defer { stopping = true }
            return running && !stopping
        }.get()) ?? false
        if first {
            for plugin in registry.plugins.reversed() { await plugin.stop(node: self) }
            await nat.stop()
        }
        let closing: EventLoopFuture<Void> = eventLoop.flatSubmit { [self] in
            guard running else { return eventLoop.makeSucceededVoidFuture() }
            maintenanceTask?.cancel()
            maintenanceTask = nil
            metricsTask?.cancel()
            metricsTask = nil
            for t in backgroundTasks { t.cancel() }
            backgroundTasks.removeAll()
            var writes: [EventLoopFuture<Void>] = []
            // With sessions, quit goes to the peers we hold a session with: a peer we have no
            // session with has not talked to us lately, and a handshake per peer at exit would
            // cost more than the quit saves.
            for peer in peerMap.verifiedPeers where announce && (!sessionsEnabled || sessions.slot(peer: peer.id) != nil) {
                if let f = sendFireAndForget(to: peer, command: kernelCommands.quit) { writes.append(f) }
            }
            let grace = eventLoop.makePromise(of: Void.self)
            EventLoopFuture.andAllComplete(writes, on: eventLoop).cascade(to: grace)
            let limit = eventLoop.scheduleTask(in: TimeAmount(min(config.requestTimeout, .seconds(1)))) { grace.succeed(()) }
            return grace.futureResult.flatMap { [self] in
                limit.cancel()
                running = false
                let waiting = pending
                pending.removeAll()
                for (_, p) in waiting {
                    p.timer?.cancel()
                    p.promise.fail(RPCError.shutDown)
                }
                for index in Array(handshakes.keys) {
                    if let h = handshakes.removeValue(forKey: index) {
                        h.retransmit?.cancel()
                        h.expiry?.cancel()
                        for item in h.queue { item.written?.fail(RPCError.shutDown) }
                    }
                }
                handshakeKeys.removeAll()
                sessions.removeAll()
                for (_, w) in probes { w.promise.succeed(()) }
                probes.removeAll()
                endAllPunches()
                for (_, f) in pool { f.whenSuccess { $0.close() } }
                pool.removeAll()
                poolOrder.removeAll()
                for c in inboundConnections.values { c.close() }
                return transport.close()
            }
        }
        try? await closing.get()
    }

    /// Whether the node is still running (not shut down).
    public var isRunning: Bool {
        get async { (try? await eventLoop.submit { self.running }.get()) ?? false }
    }
}

extension TimeAmount {
    init(_ d: Duration) {
        let (s, a) = d.components
        self = .nanoseconds(s * 1_000_000_000 + a / 1_000_000_000)
    }
}
