import Logging
import NIOCore
import NIOPosix

/// The transport on real sockets: one UDP socket and one TCP listener on the same port
/// (SwiftNIO), outbound connections, and the extra sockets NAT traversal asks for.
///
/// ```
///  UDP socket ─ UDPHandler ───────────────────────────────────────────┐
///  TCP conn.  ─ IdleStateHandler ─ FrameDecoder ─ TCPHandler ─────────┼─▶ TransportEvents (the node)
///  extra UDP  ─ UDPHandler (birthday sockets, probes) ────────────────┘
/// ```
/// SwiftNIO closes a UDP socket on most send errors (a route gone, a firewall's EPERM); a node
/// without its UDP socket is out of the overlay while looking alive, so the main socket is bound
/// again on the same port whenever it closes while the node runs.
package final class SocketTransport: PeerTransport, @unchecked Sendable {
    let eventLoop: any EventLoop
    let host: String
    let port: UInt16
    let idleTimeout: Duration
    let logger: Logger
    let waterMark: ChannelOptions.Types.WriteBufferWaterMark
    /// The node's kernel, held while the transport is open (a running node stays alive).
    private var events: (any TransportEvents)?

    // Confined to `eventLoop`:
    private var udp: ChannelDatagramSocket?
    private var listener: (any Channel)?
    private var extras: [ObjectIdentifier: ChannelDatagramSocket] = [:]
    private var connections: [ObjectIdentifier: ChannelConnection] = [:]
    private var stopping = false
    package private(set) var boundPort: UInt16 = 0
    package private(set) var isIPv4 = true
    package private(set) var rebinds = 0

    package init(eventLoop: any EventLoop, host: String, port: UInt16, idleTimeout: Duration, limits: NodeLimits, logger: Logger) {
        self.eventLoop = eventLoop
        self.host = host
        self.port = port
        self.idleTimeout = idleTimeout
        self.logger = logger
        self.waterMark = .init(low: limits.tcpWriteLowWater, high: max(limits.tcpWriteLowWater + 1, limits.tcpWriteHighWater))
    }

    package var mainSocket: (any DatagramSocket)? { udp }

    /// The main UDP socket's channel (tests close it under the node).
    var mainChannel: (any Channel)? { udp?.channel }

    package var localAddresses: Set<IPAddress> { NATTraversal.localAddresses() }

    package var hasGateway: Bool { true }

    /// Binds UDP, then TCP on the port UDP got. With port 0 a port free for UDP may be taken for
    /// TCP, so that case retries with another port a few times.
    package func start(events: any TransportEvents) -> EventLoopFuture<Void> {
        self.events = events
        return eventLoop.makeFutureWithTask { [self] in try await bind(attempts: port == 0 ? 8 : 1) }
    }

    private func bind(attempts: Int) async throws {
        var lastError: (any Error)?
        for _ in 0..<attempts {
            let socket: ChannelDatagramSocket
            do {
                socket = try await bindUDP(port: port).get()
            } catch {
                throw NodeStartError.bindFailed(host: host, port: port, reason: "\(error)")
            }
            let bound = socket.localPort
            do {
                let tcp = try await ServerBootstrap(group: eventLoop)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    // So that a dialing socket can bind this port too: the TCP observation and
                    // hole punching go out from the port NATs saw (Linux needs SO_REUSEPORT on
                    // both sockets). UDP, bound first without it, keeps the port ours.
                    .serverChannelOption(NATTraversal.reusePort, value: 1)
                    .serverChannelOption(.backlog, value: 256)
                    // At the file-descriptor limit accept() fails at once, again and again: pause
                    // accepting for a moment instead of spinning a core.
                    .serverChannelInitializer { ch in
                        ch.eventLoop.makeCompletedFuture {
                            try ch.pipeline.syncOperations.addHandler(AcceptThrottle(pause: .milliseconds(250)))
                        }
                    }
                    .childChannelOption(.writeBufferWaterMark, value: waterMark)
                    .childChannelInitializer { [self] ch in configure(ch, inbound: true, remote: nil, raw: nil).map { _ in } }
                    .bind(host: host, port: Int(bound)).get()
                try await eventLoop.submit { [self] in
                    udp = socket
                    isIPv4 = socket.channel.localAddress?.protocol != .inet6
                    listener = tcp
                    boundPort = bound
                    watch(socket)
                }.get()
                return
            } catch {
                lastError = error
                socket.close()
            }
        }
        throw NodeStartError.bindFailed(host: host, port: port, reason: "\(lastError.map { "\($0)" } ?? "unknown")")
    }

    private func bindUDP(port: UInt16, host bindHost: String? = nil) -> EventLoopFuture<ChannelDatagramSocket> {
        let box = DatagramBox()
        return DatagramBootstrap(group: eventLoop)
            .channelOption(.maxMessagesPerRead, value: 16)
            .channelInitializer { [self] ch in
                ch.eventLoop.makeCompletedFuture {
                    let socket = ChannelDatagramSocket(channel: ch)
                    box.socket = socket
                    try ch.pipeline.syncOperations.addHandler(UDPHandler(socket: socket, transport: self))
                }
            }
            .bind(host: bindHost ?? host, port: Int(port))
            .flatMapThrowing { _ in
                guard let socket = box.socket else { throw RPCError.shutDown }
                socket.localPort = UInt16(socket.channel.localAddress?.port ?? 0)
                return socket
            }
    }

    private func watch(_ socket: ChannelDatagramSocket) {
        socket.channel.closeFuture.whenComplete { [self] _ in
            eventLoop.execute { [self] in
                guard !stopping, udp === socket else { return }
                udp = nil
                logger.error("UDP socket closed unexpectedly; binding it again", metadata: ["port": "\(boundPort)"])
                rebind(attempt: 1)
            }
        }
    }

    private func rebind(attempt: Int) {
        guard !stopping else { return }
        bindUDP(port: boundPort).whenComplete { [self] result in
            switch result {
            case .success(let socket):
                guard !stopping else { return socket.close() }
                udp = socket
                rebinds += 1
                watch(socket)
            case .failure(let error):
                logger.error("binding UDP again failed", metadata: ["attempt": "\(attempt)", "error": "\(error)"])
                eventLoop.scheduleTask(in: .milliseconds(Int64(min(5_000, 100 * attempt)))) { [self] in rebind(attempt: attempt + 1) }
            }
        }
    }

    package func openDatagramSocket() -> EventLoopFuture<any DatagramSocket> {
        guard !stopping else { return eventLoop.makeFailedFuture(RPCError.shutDown) }
        return bindUDP(port: 0, host: isIPv4 ? "0.0.0.0" : "::").map { [self] socket in
            extras[ObjectIdentifier(socket)] = socket
            socket.channel.closeFuture.whenComplete { [self] _ in extras[ObjectIdentifier(socket)] = nil }
            return socket
        }
    }

    package func connect(to remote: Endpoint, timeout: TimeAmount, fromListenPort: Bool, raw: RawFrames?) -> EventLoopFuture<any PeerConnection> {
        guard !stopping else { return eventLoop.makeFailedFuture(RPCError.shutDown) }
        let box = ConnectionBox()
        var bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(timeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.writeBufferWaterMark, value: waterMark)
        if fromListenPort {
            bootstrap = bootstrap.channelOption(.socketOption(.so_reuseaddr), value: 1).channelOption(NATTraversal.reusePort, value: 1)
            if let local = try? SocketAddress(ipAddress: remote.ip.isV4 ? "0.0.0.0" : "::", port: Int(boundPort)) {
                bootstrap = bootstrap.bind(to: local)
            }
        }
        return bootstrap
            .channelInitializer { [self] ch in configure(ch, inbound: false, remote: remote, raw: raw).map { box.connection = $0 } }
            .connect(to: remote.ip.socketAddress(port: remote.port))
            .flatMapThrowing { _ in
                guard let c = box.connection else { throw RPCError.shutDown }
                return c
            }
    }

    /// Sets up a new connection's pipeline; an inbound one the node does not admit is refused
    /// (closed). `remote`: where an outbound one is going (it is not connected yet here).
    private func configure(_ ch: any Channel, inbound: Bool, remote target: Endpoint?, raw: RawFrames?) -> EventLoopFuture<ChannelConnection> {
        ch.eventLoop.makeCompletedFuture { [self] in
            let remote = target ?? ch.remoteAddress.flatMap { a in IPAddress(a).map { Endpoint(ip: $0, port: UInt16(a.port ?? 0)) } } ?? Endpoint(ip: .v4(0), port: 0)
            let connection = ChannelConnection(channel: ch, remote: remote)
            guard let events else { throw RPCError.shutDown }
            if inbound { try events.admit(connection) }
            let ops = ch.pipeline.syncOperations
            if let raw {
                try ops.addHandler(ByteToMessageHandler(SmallFrameDecoder(max: raw.maxFrame)))
                try ops.addHandler(FrameCatcher(raw.onFrame))
            } else {
                try ops.addHandler(IdleStateHandler(allTimeout: TimeAmount(idleTimeout)))
                try ops.addHandler(ByteToMessageHandler(FrameDecoder(budget: events.partialFrames, deadline: events.limits.frameDeadline,
                                                                     pauseWhenUnwritable: inbound),
                                                        maximumBufferSize: FrameDecoder.maxFrameBytes + 4 + (256 << 10)))
                try ops.addHandler(TCPHandler(connection: connection, transport: self, inbound: inbound))
            }
            let id = ObjectIdentifier(connection)
            connections[id] = connection
            ch.closeFuture.whenComplete { [self] _ in connections[id] = nil }
            return connection
        }
    }

    package func close() -> EventLoopFuture<Void> {
        eventLoop.flatSubmit { [self] in
            stopping = true
            var closes: [EventLoopFuture<Void>] = []
            for c in connections.values { closes.append(c.channel.close().recover { _ in }) }
            for s in extras.values { closes.append(s.channel.close().recover { _ in }) }
            if let listener { closes.append(listener.close().recover { _ in }) }
            if let udp { closes.append(udp.channel.close().recover { _ in }) }
            connections.removeAll()
            extras.removeAll()
            return EventLoopFuture.andAllComplete(closes, on: eventLoop).always { [self] _ in
                events?.transportClosed()
                events = nil
            }
        }
    }

    // MARK: from the handlers

    func deliver(datagram: ByteBuffer, from address: SocketAddress, on socket: ChannelDatagramSocket) {
        guard let ip = IPAddress(address) else { return }
        events?.received(datagram: datagram, from: Endpoint(ip: ip, port: UInt16(address.port ?? 0)), on: socket)
    }

    func deliver(frame: ByteBuffer, on connection: ChannelConnection) {
        events?.received(frame: frame, on: connection)
    }

    func idle(_ connection: ChannelConnection) {
        events?.idle(connection)
    }

    var stalledWriteTimeout: Duration { events?.limits.stalledWriteTimeout ?? .seconds(10) }
}

/// A NIO UDP channel as a node's datagram socket.
final class ChannelDatagramSocket: DatagramSocket, @unchecked Sendable {
    let channel: any Channel
    var localPort: UInt16 = 0

    init(channel: any Channel) { self.channel = channel }

    func send(_ datagram: ByteBuffer, to remote: Endpoint, promise: EventLoopPromise<Void>?) {
        channel.writeAndFlush(AddressedEnvelope(remoteAddress: remote.ip.socketAddress(port: remote.port), data: datagram), promise: promise)
    }

    func close() { channel.close(promise: nil) }
}

/// A NIO TCP channel as a connection carrying frames.
final class ChannelConnection: PeerConnection, @unchecked Sendable {
    let channel: any Channel
    let remote: Endpoint

    init(channel: any Channel, remote: Endpoint) {
        self.channel = channel
        self.remote = remote
    }

    var isActive: Bool { channel.isActive }
    var queuedBytes: Int { (try? channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0 }
    var closeFuture: EventLoopFuture<Void> { channel.closeFuture }
    func write(_ frame: ByteBuffer, promise: EventLoopPromise<Void>?) { channel.writeAndFlush(frame, promise: promise) }
    func close() { channel.close(promise: nil) }
}

/// Carries what a channel initializer made out to the bootstrap's future.
private final class DatagramBox: @unchecked Sendable { var socket: ChannelDatagramSocket? }
private final class ConnectionBox: @unchecked Sendable { var connection: ChannelConnection? }
