import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

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
/// TCP pool) is confined to that loop, and only the peer map is shared behind a lock.
public final class Node: @unchecked Sendable {
    public let config: NodeConfig
    /// This peer's id.
    public let peerID: Number160
    /// The key pair behind the id (signing comes in a later layer).
    public let keyPair: PeerKeyPair
    /// The loop every channel and callback of this node runs on.
    public let eventLoop: any EventLoop
    public let peerMap: PeerMap
    /// What plugins registered: commands, storage, interceptors, handlers, schemes, policies.
    public let registry: PluginRegistry
    /// Storage requests through interceptors to the backend.
    public let storage: StoragePipeline
    public let logger: Logger
    /// This node as others reach it (its bound address and announced flags).
    public private(set) var address: PeerAddress

    // Confined to `eventLoop`:
    var udpChannel: (any Channel)?
    var tcpServer: (any Channel)?
    var pending: [UInt32: PendingRequest] = [:]
    var nextMessageID: UInt32
    var pool: [PeerSocketAddress: EventLoopFuture<any Channel>] = [:]
    var poolOrder: [PeerSocketAddress] = []
    var running = true
    var stopping = false
    var maintenanceTask: RepeatedTask?
    var backgroundTasks: [RepeatedTask] = []
    let kernelCommands: KernelCommandIDs

    /// Optional plugins that failed to install, with why; the node runs without them.
    public var refusedPlugins: [(name: String, reason: String)] { refused.withLockedValue { $0 } }
    let refused = NIOLockedValueBox([(name: String, reason: String)]())

    /// Messages dropped because they did not decode (counted for operators and tests).
    public var droppedMessages: Int { droppedCount.withLockedValue { $0 } }
    let droppedCount = NIOLockedValueBox(0)

    init(config: NodeConfig, kernelCommands: KernelCommandIDs) {
        self.config = config
        let keys = config.keyPair ?? PeerKeyPair()
        self.keyPair = keys
        self.peerID = config.peerID ?? keys.peerID
        self.eventLoop = config.eventLoopGroup.next()
        self.peerMap = PeerMap(selfID: peerID, config: config.peerMap)
        self.registry = PluginRegistry()
        self.storage = StoragePipeline(registry: registry)
        var logger = config.logger
        logger[metadataKey: "peer"] = "\(peerID.hexString.prefix(8))"
        self.logger = logger
        self.address = PeerAddress(id: peerID, socket: PeerSocketAddress(ip: IPAddress(config.host) ?? .v4(0), port: config.port), flags: config.flags)
        self.nextMessageID = UInt32.random(in: 0...UInt32.max)
        self.kernelCommands = kernelCommands
    }

    /// A builder with every default; see `NodeBuilder`.
    public static func builder() -> NodeBuilder { NodeBuilder() }

    static func start(config: NodeConfig, handlers: [any CommandHandler], plugins: [(plugin: any Plugin, optional: Bool)]) async throws -> Node {
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
        try await node.bind()
        node.connectEvents()
        for plugin in node.registry.plugins {
            do {
                try await plugin.start(node: node)
            } catch {
                await node.shutdown()
                throw NodeStartError.plugin(.installFailed(plugin: plugin.name, reason: "start failed: \(error)"))
            }
        }
        node.eventLoop.execute { node.startMaintenance() }
        node.logger.debug("listening", metadata: ["address": "\(node.address.socket)"])
        return node
    }

    /// Forwards peer map changes to event subscribers and replication policies.
    private func connectEvents() {
        let registry = self.registry
        let policies = registry.replicationPolicies
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
        Task {
            for p in policies { await p.handle(event, context: context) }
        }
    }

    /// Binds UDP, then TCP on the port UDP got. With port 0 a port free for UDP may be taken for
    /// TCP, so that case retries with another port a few times.
    private func bind() async throws {
        let attempts = config.port == 0 ? 8 : 1
        var lastError: (any Error)?
        for _ in 0..<attempts {
            let udp: any Channel
            do {
                udp = try await DatagramBootstrap(group: eventLoop)
                    .channelOption(.maxMessagesPerRead, value: 16)
                    .channelInitializer { [self] ch in
                        ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(UDPHandler(node: self)) }
                    }
                    .bind(host: config.host, port: Int(config.port)).get()
            } catch {
                throw NodeStartError.bindFailed(host: config.host, port: config.port, reason: "\(error)")
            }
            let port = UInt16(udp.localAddress?.port ?? 0)
            do {
                let tcp = try await ServerBootstrap(group: eventLoop)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .serverChannelOption(.backlog, value: 256)
                    .childChannelInitializer { [self] ch in self.configureTCP(ch) }
                    .bind(host: config.host, port: Int(port)).get()
                try await eventLoop.submit { [self] in
                    udpChannel = udp
                    tcpServer = tcp
                    address.socket = PeerSocketAddress(ip: address.socket.ip, port: port)
                }.get()
                return
            } catch {
                lastError = error
                try? await udp.close()
            }
        }
        throw NodeStartError.bindFailed(host: config.host, port: config.port, reason: "\(lastError.map { "\($0)" } ?? "unknown")")
    }

    func configureTCP(_ ch: any Channel) -> EventLoopFuture<Void> {
        ch.eventLoop.makeCompletedFuture {
            let ops = ch.pipeline.syncOperations
            try ops.addHandler(IdleStateHandler(allTimeout: TimeAmount(config.tcpIdleTimeout)))
            try ops.addHandler(ByteToMessageHandler(FrameDecoder()))
            try ops.addHandler(TCPHandler(node: self))
        }
    }

    /// Announces that this node leaves (a quit to every verified peer), fails what is pending,
    /// and closes every socket. Safe to call more than once.
    public func shutdown() async {
        let first: Bool = (try? await eventLoop.submit { [self] in
            defer { stopping = true }
            return running && !stopping
        }.get()) ?? false
        if first {
            for plugin in registry.plugins.reversed() { await plugin.stop(node: self) }
        }
        let closing: EventLoopFuture<Void> = eventLoop.flatSubmit { [self] in
            guard running else { return eventLoop.makeSucceededVoidFuture() }
            maintenanceTask?.cancel()
            maintenanceTask = nil
            for t in backgroundTasks { t.cancel() }
            backgroundTasks.removeAll()
            var writes: [EventLoopFuture<Void>] = []
            for peer in peerMap.verifiedPeers {
                if let f = sendFireAndForget(to: peer, command: kernelCommands.quit) { writes.append(f) }
            }
            running = false
            let waiting = pending
            pending.removeAll()
            for (_, p) in waiting {
                p.timer?.cancel()
                p.promise.fail(RPCError.shutDown)
            }
            return EventLoopFuture.whenAllComplete(writes, on: eventLoop).flatMap { [self] _ in
                var closes: [EventLoopFuture<Void>] = []
                for (_, f) in pool { closes.append(f.flatMap { $0.close() }.recover { _ in }) }
                pool.removeAll()
                poolOrder.removeAll()
                if let tcpServer { closes.append(tcpServer.close().recover { _ in }) }
                if let udpChannel { closes.append(udpChannel.close().recover { _ in }) }
                return EventLoopFuture.andAllComplete(closes, on: eventLoop)
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
