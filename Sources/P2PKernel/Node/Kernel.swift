import Logging
import NIOConcurrencyHelpers
import NIOCore

/// The parts of one node, wired together. Each part owns its state and is confined to the
/// node's event loop; they call each other directly (no actor hop per message):
/// ```
///  transport ─▶ Kernel.received ─┬─ PacketKind.plaintext ─────────────── RPCEngine.receivedPlaintext
///  (sockets or simulated)        ├─ session packets ── SessionLayer ──── RPCEngine.dispatch ── handlers
///                                ├─ relay packets ──── RelayService ───── (inner packet) ─ again
///                                ├─ probe / observe ── Prober
///                                └─ punch ──────────── HolePuncher ───── PathTable.install…
///  RPCEngine.request ─ PathTable.path ─ SessionLayer.seal ─ PathTable.send ─ transport
/// ```
/// `PathTable` alone decides how a peer is reached (plain, relayed, direct TCP, punched UDP);
/// the NAT parts install paths into it. The `Node` is a thin front over this.
final class Kernel: TransportEvents, @unchecked Sendable {
    private unowned(unsafe) var owner: Node?
    /// The node, held while it runs: a running node lives as long as its transport holds this
    /// kernel (as a socket keeps its handler), whoever else lets go of it. Let go when it stops.
    private var runner: Node?
    /// The node this kernel runs (set once, before anything runs).
    @inline(__always) var node: Node {
        guard let owner else { preconditionFailure("the kernel is used before its node is set") }
        return owner
    }
    let transport: any PeerTransport
    let connections: ConnectionTable
    let paths: PathTable
    let sessions: SessionLayer
    let rpc: RPCEngine
    let relay: RelayService
    let punch: HolePuncher
    let prober: Prober
    let commands = KernelCommandIDs()
    /// Request, lookup and handshake timers: one heap, one loop task armed (see `KernelTimers`).
    let timers: KernelTimers
    /// Bytes announced by TCP frames still arriving, over all connections.
    package let partialFrames: PartialFrameBudget
    /// What the per-message path reads of the configuration, copied once: `config` is read
    /// through the node, and that copies the whole struct — every reference in it retained and
    /// released — for one field.
    let networkID: UInt32
    package let limits: NodeLimits
    let requestTimeout: Duration
    let udpRetryAfter: Duration
    let maxInFlight: Int
    /// The node's id, clock, routing table and registry, read on every message.
    let peerID: Number160
    let clock: NodeClock
    let peerMap: PeerMap
    let registry: PluginRegistry

    // Confined to the event loop:
    /// This node as its messages announce it (`Node.address` is the same, readable anywhere).
    var me: PeerAddress
    var running = true
    var stopping = false
    var maintenanceTask: RepeatedTask?
    var refreshTask: Scheduled<Void>?
    /// Counts the refresh chains `becameRoutable` replaced (see there).
    var refreshChain = 0
    /// Watched neighbours and when each was last pinged (uptime ns): see `watchNeighbours`.
    var watched: [Number160: UInt64] = [:]
    /// The seed this node joined through, as it answered. A lookup whose map offers nobody
    /// starts there: a seed that has just started may still call itself firewalled (its NAT
    /// ladder has not finished), which keeps it out of our map, yet it answered us.
    var seed: PeerAddress?
    var metricsTask: RepeatedTask?

    init(config: NodeConfig, loop: any EventLoop, clock: NodeClock, random: RandomSource, keyPair: PeerKeyPair, logger: Logger, me: PeerAddress,
         peerMap: PeerMap, registry: PluginRegistry) {
        self.me = me
        peerID = me.id
        self.clock = clock
        self.peerMap = peerMap
        self.registry = registry
        networkID = config.networkID
        limits = config.limits
        requestTimeout = config.requestTimeout
        udpRetryAfter = config.udpRetryAfter
        maxInFlight = config.maxInFlight
        self.partialFrames = PartialFrameBudget(limit: config.limits.maxPartialFrameBytes)
        self.transport = config.makeTransport?(loop, config, logger)
            ?? SocketTransport(eventLoop: loop, host: config.host, port: config.port, idleTimeout: config.tcpIdleTimeout,
                               limits: config.limits, logger: logger)
        timers = KernelTimers(loop: loop)
        connections = ConnectionTable()
        paths = PathTable()
        sessions = SessionLayer(config: config, keyPair: keyPair, random: random, clock: clock)
        rpc = RPCEngine(random: random, limits: config.limits)
        relay = RelayService()
        punch = HolePuncher()
        prober = Prober(limits: config.limits, random: random)
    }

    /// Binds the kernel and its parts to their node; they reach each other through the kernel.
    func attach(_ node: Node) {
        owner = node
        for part in [connections, paths, sessions, rpc, relay, punch, prober] as [any KernelPart] { part.attach(self) }
    }

    @inline(__always) var config: NodeConfig { node.config }
    @inline(__always) var logger: Logger { node.logger }
    @inline(__always) var eventLoop: any EventLoop { node.eventLoop }

    /// Uptime seconds: what sessions and rate windows age by.
    @inline(__always) var coarseSeconds: UInt32 { clock.seconds }

    /// Counts a dropped packet and says why at trace level.
    func countDrop(_ why: @autoclosure () -> String) {
        node.counters.withLockedValue { $0.dropped += 1 }
        node.metrics?.dropped.increment()
        node.logger.trace("dropped", metadata: ["why": "\(why())"])
    }

    /// Makes `me` the announced address (on the loop) and publishes it for readers anywhere.
    func announce(_ address: PeerAddress) {
        me = address
        node.published.withLockedValue { $0 = address }
    }

    // MARK: life

    /// Starts the transport and takes the port it bound as our announced port.
    func bind() async throws {
        do {
            try await transport.start(events: self).get()
        } catch let error as NodeStartError {
            throw error
        } catch {
            throw NodeStartError.bindFailed(host: config.host, port: config.port, reason: "\(error)")
        }
        try await eventLoop.submit { [self] in
            runner = node
            var address = me
            address.socket = PeerSocketAddress(ip: me.socket.ip, port: transport.boundPort)
            announce(address)
        }.get()
    }

    /// Metrics sampling (when the node records metrics) and maintenance:
    /// pings to the peers due for a check (by how long they have been up); a peer that fails often
    /// enough is removed by the RPC engine's failure accounting.
    func startTimers() {
        guard running else { return }
        if let metrics = node.metrics {
            // Holds the kernel until `stop` cancels it (a running node lives that long anyway): a
            // weak reference would give the kernel a side table, and every retain of it — one per
            // message — would take the slow path.
            metricsTask = eventLoop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { [self] _ in
                metrics.sample(node)
            }
        }
        guard let interval = config.maintenanceInterval else { return }
        let t = TimeAmount(interval)
        maintenanceTask = eventLoop.scheduleRepeatedTask(initialDelay: t, delay: t) { [self] _ in
            for peer in node.peerMap.dueForCheck(limit: config.maintenancePingsPerRound) {
                paths.learnRoute(peer)
                _ = rpc.requestOnLoop(target: peer.socket, expectedID: peer.id, command: commands.ping, payload: [], transport: .udp, timeout: nil)
            }
            watchNeighbours()
        }
        // The neighbourhood heals by itself: a lookup of our own id now and then meets again
        // the peers near us that a partition or a lossy minute made us (and them) drop —
        // nothing else would bring them back, since neither side contacts the other — and
        // peers that joined near us without asking us. Replication decides replica sets from
        // this neighbourhood, so a hole in it makes copies travel back and forth.
        guard let every = config.neighbourhoodRefresh, every > .zero else { return }
        scheduleRefresh(after: TimeAmount(min(every, Self.firstRefresh)))
    }

    /// Pings the `NodeConfig.watchedNeighbours` closest peers not pinged for
    /// `neighbourWatchInterval`; one that answers none of a ping's resends within
    /// `neighbourWatchTimeout` is dropped at once (the resends make a lost datagram no reason:
    /// at 2 % loss all of them are lost once in millions). On the loop.
    private func watchNeighbours() {
        guard config.watchedNeighbours > 0 else { watched.removeAll(); return }
        let now = clock.uptimeNanoseconds
        let every = UInt64(max(0, TimeAmount(config.neighbourWatchInterval).nanoseconds))
        let near = node.peerMap.closest(to: peerID, count: config.watchedNeighbours)
        // Only the current neighbours are remembered: the table stays as small as the watch.
        var next: [Number160: UInt64] = [:]
        for peer in near {
            if let last = watched[peer.id], now &- last < every {
                next[peer.id] = last
                continue
            }
            next[peer.id] = now
            paths.learnRoute(peer)
            rpc.requestOnLoop(target: peer.socket, expectedID: peer.id, command: commands.ping, payload: [], transport: .udp,
                              timeout: config.neighbourWatchTimeout).whenFailure { [self] error in
                guard running else { return }
                switch error {
                case RPCError.timeout, RPCError.unreachable: break
                default: return
                }
                // The engine counted one failure; a watched neighbour that let every resend go
                // unanswered is gone (removal bans it from hearsay for a while, not from coming
                // back by itself).
                for _ in 0..<config.peerMap.offlineAfterFailures {
                    if node.peerMap.peerFailed(peer.id) { break }
                }
            }
        }
        watched = next
    }

    /// The first look at our neighbourhood after the start, and again after one that changed it
    /// (doubling up to `NodeConfig.neighbourhoodRefresh`): peers that joined at the same moment
    /// through one seed each met only the seed; a lookup a moment later, through the seed that
    /// now knows them all, makes them meet (otherwise not before the next full period — and a
    /// node whose only peer then died stayed alone with clients asking it).
    static let firstRefresh = Duration.seconds(2)

    /// We have just become routable (a reachability verdict dropped our firewalled flags): we
    /// look ourselves up at once, so that the peers near us — which kept us out of their maps
    /// until now — take us in, and we meet those that became routable before us. On the loop.
    func becameRoutable() {
        guard running, config.neighbourhoodRefresh != nil else { return }
        refreshTask?.cancel()
        // A refresh lookup still running belongs to the chain replaced here: it must not
        // schedule another (two chains would refresh twice as often, for ever).
        refreshChain &+= 1
        scheduleRefresh(after: .zero)
    }

    /// Schedules the next neighbourhood refresh `delay` (±25 %, so that peers started together
    /// spread out) from now. On the loop.
    private func scheduleRefresh(after delay: TimeAmount) {
        guard running, let every = config.neighbourhoodRefresh else { return }
        var rng = node.random.generator
        let jitter = delay.nanoseconds / 4
        let at = TimeAmount.nanoseconds(delay.nanoseconds + Int64.random(in: -jitter...jitter, using: &rng))
        let chain = refreshChain
        refreshTask = eventLoop.scheduleTask(in: at) { [self] in
            guard running else { return }
            let period = TimeAmount(every)
            let k = config.routing.resultSize
            guard node.peerMap.counts.verified > 0 || seed != nil else { return scheduleRefresh(after: period) }
            let before = node.peerMap.closest(to: peerID, count: k).map(\.id)
            node.lookup(peerID).whenComplete { [self] _ in
                guard chain == refreshChain else { return }
                let after = node.peerMap.closest(to: peerID, count: k).map(\.id)
                // Changed: look again soon (twice the last wait); settled: the full period.
                scheduleRefresh(after: after != before ? min(period, max(TimeAmount(Self.firstRefresh), delay * 2)) : period)
            }
        }
    }

    /// Stops: quit to the peers we hold sessions with (unless `announce` is false: a crash),
    /// then fails what is pending and closes every part and the transport. On the loop.
    func stop(announce: Bool) -> EventLoopFuture<Void> {
        guard running else { return eventLoop.makeSucceededVoidFuture() }
        maintenanceTask?.cancel()
        maintenanceTask = nil
        refreshTask?.cancel()
        refreshTask = nil
        metricsTask?.cancel()
        metricsTask = nil
        var writes: [EventLoopFuture<Void>] = []
        // With sessions, quit goes to the peers we hold a session with: a peer we have no
        // session with has not talked to us lately, and a handshake per peer at exit would
        // cost more than the quit saves.
        for peer in node.peerMap.verifiedPeers where announce && (!sessions.enabled || sessions.table.slot(peer: peer.id) != nil) {
            if let f = rpc.sendFireAndForget(to: peer, command: commands.quit) { writes.append(f) }
        }
        let grace = eventLoop.makePromise(of: Void.self)
        EventLoopFuture.andAllComplete(writes, on: eventLoop).cascade(to: grace)
        let limit = eventLoop.scheduleTask(in: TimeAmount(min(requestTimeout, .seconds(1)))) { grace.succeed(()) }
        return grace.futureResult.flatMap { [self] in
            limit.cancel()
            running = false
            rpc.closeAll()
            sessions.closeAll()
            prober.closeAll()
            punch.endAllPunches()
            paths.closeAll()
            connections.closeAll()
            timers.stop()
            return transport.close()
        }
    }

    /// Forwards peer map changes to event subscribers (replication policies among them).
    func connectEvents() {
        let registry = node.registry, peerMap = node.peerMap
        let log = node.events
        registry.subscribe { event in
            switch event {
            case .peerInserted(let p, let verified) where verified: log.peerJoined(p)
            case .peerRemoved(let p, let reason): log.peerLeft(p, reason)
            case .reachabilityChanged(let report): log.add(report.summary)
            case .directPath(let path): log.add("direct path: \(path)")
            default: break
            }
        }
        peerMap.onChange { event in
            switch event {
            case .inserted(let p, let verified): registry.publish(.peerInserted(p, verified: verified))
            case .removed(let p, let reason): registry.publish(.peerRemoved(p, reason: reason))
            }
        }
    }

    // MARK: what the transport hands us

    package func received(datagram: ByteBuffer, from remote: Endpoint, on socket: any DatagramSocket) {
        if let main = transport.mainSocket, main === socket {
            received(datagram, from: remote, origin: .udp(remote))
        } else {
            punch.receivedOnPunchSocket(datagram, from: remote, socket: socket)
        }
    }

    package func received(frame: ByteBuffer, on connection: any PeerConnection) {
        received(frame, from: connection.remote, origin: .tcp(connection))
    }

    package func idle(_ connection: any PeerConnection) {
        paths.connectionIdle(connection)
    }

    package func admit(_ connection: any PeerConnection) throws {
        try connections.admit(connection)
    }


    package func transportClosed() {
        runner = nil
    }

    /// Every datagram and TCP frame starts here, on the node's event loop: its first byte says
    /// which part it is for.
    func received(_ buffer: ByteBuffer, from remote: Endpoint, origin: Origin) {
        guard running, let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return }
        guard let kind = PacketKind(rawValue: first) else {
            return sessions.enabled ? sessions.received(buffer, remote: remote, origin: origin)
                : sessions.refuseHandshake(buffer, remote: remote, origin: origin)
        }
        switch kind.layer {
        case .plaintext:
            rpc.receivedPlaintext(buffer, remote: remote, origin: origin)
        case .nat:
            prober.received(kind, buffer, remote: remote, origin: origin)
        case .relay:
            relay.received(kind, buffer, remote: remote, origin: origin)
        case .punch:
            guard case .udp = origin, let udp = transport.mainSocket else {
                countDrop("punch packet from \(remote) not over UDP")
                return connections.closeIfStream(origin)
            }
            punch.receivedPunch(buffer, from: remote, socket: udp)
        case .session:
            if sessions.enabled {
                sessions.received(buffer, remote: remote, origin: origin)
            } else {
                sessions.refuseHandshake(buffer, remote: remote, origin: origin)
            }
        }
    }

    /// A packet that came wrapped by a relay: a plain or session packet, never another wrapper.
    func receivedInner(_ buffer: ByteBuffer, remote: Endpoint, origin: Origin) {
        guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return }
        switch PacketKind(rawValue: first)?.layer {
        case .plaintext?:
            rpc.receivedPlaintext(buffer, remote: remote, origin: origin)
        case .nat?, .relay?, .punch?:
            countDrop("packet kind \(first) inside a relayed one")
        case .session?, nil:
            if sessions.enabled {
                sessions.received(buffer, remote: remote, origin: origin)
            } else {
                sessions.refuseHandshake(buffer, remote: remote, origin: origin)
            }
        }
    }
}

/// A part of the kernel: attached once to the kernel it belongs to, and reaching the node's
/// configuration, clock and the other parts through it.
protocol KernelPart: AnyObject {
    func attach(_ kernel: Kernel)
    var kernel: Kernel { get }
}

/// The accessors are always inlined: each is read on the per-message path, and a call would
/// return a copy of the whole `NodeConfig` (every reference in it retained and released) where
/// the caller wants one field.
extension KernelPart {
    @inline(__always) var node: Node { kernel.node }
    @inline(__always) var config: NodeConfig { kernel.node.config }
    @inline(__always) var logger: Logger { kernel.node.logger }
    @inline(__always) var clock: NodeClock { kernel.clock }
    @inline(__always) var random: RandomSource { kernel.node.random }
    @inline(__always) var eventLoop: any EventLoop { kernel.node.eventLoop }
    @inline(__always) var peerMap: PeerMap { kernel.peerMap }
    @inline(__always) var registry: PluginRegistry { kernel.registry }
    @inline(__always) var metrics: NodeMetrics? { kernel.node.metrics }
    @inline(__always) var peerID: Number160 { kernel.peerID }
    @inline(__always) var transport: any PeerTransport { kernel.transport }
    @inline(__always) var running: Bool { kernel.running }
    @inline(__always) var coarseSeconds: UInt32 { kernel.coarseSeconds }
    @inline(__always) var selfAddress: PeerAddress { kernel.me }
    @inline(__always) var kernelCommands: KernelCommandIDs { kernel.commands }
    @inline(__always) var networkID: UInt32 { kernel.networkID }
    @inline(__always) var limits: NodeLimits { kernel.limits }
    @inline(__always) func countDrop(_ why: @autoclosure () -> String) { kernel.countDrop(why()) }
}

/// Holds the kernel a part belongs to (set once, before the part runs).
struct KernelLink {
    private unowned(unsafe) var kernel: Kernel?
    @inline(__always) var value: Kernel {
        guard let kernel else { preconditionFailure("a kernel part used before it was attached") }
        return kernel
    }
    mutating func set(_ k: Kernel) { kernel = k }
}
