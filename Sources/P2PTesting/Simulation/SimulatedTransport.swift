import NIOCore
import P2PKernel

/// A node's transport on the simulated network: its datagram socket and listener on one port of
/// its host, extra sockets on ephemeral ports, and connections that carry whole frames, in order,
/// after the link's delay. Everything runs on the simulation's loop.
final class SimulatedTransport: PeerTransport, @unchecked Sendable {
    unowned let network: SimulatedNetwork
    let host: SimHost
    let port: UInt16 = 4000
    /// The node's kernel, held while the transport is open (a running node stays alive).
    private var events: (any TransportEvents)?
    private var main: SimDatagramSocket?
    private var extras: [UInt16: SimDatagramSocket] = [:]
    /// Open connections by when they were opened (closed in that order: the run repeats).
    private var connections: [UInt64: SimConnection] = [:]
    private var nextEphemeral: UInt16 = 49_152
    private(set) var listening = false
    /// Connections idle this long are reported (the node closes or keeps them).
    var idleTimeout: UInt64 = 30_000_000_000

    init(network: SimulatedNetwork, host: SimHost) {
        self.network = network
        self.host = host
    }

    var loop: SimulatedEventLoop { network.loop }

    func start(events: any TransportEvents) -> EventLoopFuture<Void> {
        loop.submit { [self] in
            self.events = events
            if let old = host.transport, old !== self, old.listening {
                throw NodeStartError.bindFailed(host: "\(host.ip)", port: port, reason: "address in use (simulated)")
            }
            main = SimDatagramSocket(transport: self, port: port)
            listening = true
            host.transport = self
        }
    }

    var mainSocket: (any DatagramSocket)? { main }
    var boundPort: UInt16 { port }
    var isIPv4: Bool { true }
    var rebinds: Int { 0 }
    var localAddresses: Set<IPAddress> { [host.ip] }
    var hasGateway: Bool { false }

    func openDatagramSocket() -> EventLoopFuture<any DatagramSocket> {
        loop.submit { [self] in
            guard listening else { throw RPCError.shutDown }
            let p = ephemeralPort()
            let socket = SimDatagramSocket(transport: self, port: p)
            extras[p] = socket
            return socket
        }
    }

    private func ephemeralPort() -> UInt16 {
        repeat {
            nextEphemeral = nextEphemeral >= 65_000 ? 49_152 : nextEphemeral + 1
        } while extras[nextEphemeral] != nil
        return nextEphemeral
    }

    func connect(to remote: Endpoint, timeout: TimeAmount, fromListenPort: Bool, raw: RawFrames?) -> EventLoopFuture<any PeerConnection> {
        let promise = loop.makePromise(of: (any PeerConnection).self)
        loop.execute { [self] in
            guard listening else { return promise.fail(RPCError.shutDown) }
            let local = fromListenPort ? port : ephemeralPort()
            network.connect(from: self, port: local, to: remote, raw: raw, promise: promise)
            // A SYN that nothing answers: the connect times out.
            let deadline = loop.scheduleTask(in: timeout) {
                promise.fail(RPCError.timeout(peer: "\(remote)", milliseconds: Int(timeout.nanoseconds / 1_000_000)))
            }
            promise.futureResult.whenComplete { _ in deadline.cancel() }
        }
        return promise.futureResult
    }

    func close() -> EventLoopFuture<Void> {
        loop.submit { [self] in
            listening = false
            main = nil
            extras.removeAll()
            let open = connections.keys.sorted().compactMap { connections[$0] }
            connections.removeAll()
            for c in open { c.close() }
            detach()
        }
    }

    /// Lets go of the node (its transport is gone): on close, and when the network stops.
    func detach() {
        listening = false
        if host.transport === self { host.transport = nil }
        events?.transportClosed()
        events = nil
    }

    // MARK: from the network

    func deliver(_ datagram: ByteBuffer, port: UInt16, from source: Endpoint) {
        guard listening, let events else { return }
        if port == self.port, let main {
            events.received(datagram: datagram, from: source, on: main)
        } else if let socket = extras[port] {
            events.received(datagram: datagram, from: source, on: socket)
        }
    }

    /// The server end of a new connection: admitted by the node, or closed.
    func accepted(_ connection: SimConnection) {
        guard listening, let events else { return connection.close() }
        do {
            try events.admit(connection)
        } catch {
            return connection.close()
        }
        opened(connection)
    }

    func opened(_ connection: SimConnection) {
        connections[connection.id] = connection
        connection.armIdle(idleTimeout)
    }

    func closed(_ connection: SimConnection) {
        connections[connection.id] = nil
    }

    func frame(_ frame: ByteBuffer, on connection: SimConnection) {
        if let raw = connection.raw {
            guard frame.readableBytes <= raw.maxFrame else { return connection.close() }
            raw.onFrame(frame)
        } else {
            events?.received(frame: frame, on: connection)
        }
    }

    func idle(_ connection: SimConnection) {
        events?.idle(connection)
    }

    func closeSocket(_ socket: SimDatagramSocket) {
        if let s = extras[socket.localPort], s === socket { extras[socket.localPort] = nil }
    }
}

/// A socket of a simulated host.
final class SimDatagramSocket: DatagramSocket, @unchecked Sendable {
    unowned let transport: SimulatedTransport
    let localPort: UInt16
    private var open = true

    init(transport: SimulatedTransport, port: UInt16) {
        self.transport = transport
        self.localPort = port
    }

    func send(_ datagram: ByteBuffer, to remote: Endpoint, promise: EventLoopPromise<Void>?) {
        guard open, transport.listening else {
            promise?.fail(RPCError.shutDown)
            return
        }
        transport.network.send(datagram, from: transport.host, port: localPort, to: remote)
        promise?.succeed(())
    }

    func close() {
        open = false
        transport.closeSocket(self)
    }
}

/// One end of a simulated connection: frames go to the other end after the link's delay, in
/// order; closing reaches the other end after the same delay, behind the frames already sent.
final class SimConnection: PeerConnection, @unchecked Sendable {
    unowned let transport: SimulatedTransport
    let remote: Endpoint
    let raw: RawFrames?
    /// The host at the other end (for delays and reachability).
    let peerHost: SimHost
    var peer: SimConnection?
    /// Frames to this end arrive no earlier than this (virtual nanoseconds): order is kept.
    var notBefore: UInt64 = 0
    private var active = true
    private let closed: EventLoopPromise<Void>
    /// Unique in the network, in the order connections were made.
    let id: UInt64
    private var lastActivity: UInt64 = 0

    init(transport: SimulatedTransport, remote: Endpoint, raw: RawFrames?, peerHost: SimHost) {
        self.transport = transport
        self.remote = remote
        self.raw = raw
        self.peerHost = peerHost
        self.closed = transport.loop.makePromise(of: Void.self)
        self.id = transport.network.nextConnectionID()
        self.lastActivity = transport.loop.nowNanoseconds
    }

    var isActive: Bool { active }
    var queuedBytes: Int { 0 }
    var closeFuture: EventLoopFuture<Void> { closed.futureResult }

    func write(_ frame: ByteBuffer, promise: EventLoopPromise<Void>?) {
        guard active, let peer else {
            promise?.fail(RPCError.shutDown)
            return
        }
        let network = transport.network
        lastActivity = transport.loop.nowNanoseconds
        promise?.succeed(())
        guard network.canReach(transport.host, peerHost) else { return }
        // Split into frames (a write may carry several); a malformed one breaks the connection.
        var rest = frame
        var frames: [ByteBuffer] = []
        while rest.readableBytes > 0 {
            guard let length = rest.readInteger(as: UInt32.self), let slice = rest.readSlice(length: Int(length)) else {
                return close()
            }
            frames.append(slice)
        }
        let at = max(transport.loop.nowNanoseconds + network.frameDelay(transport.host, peerHost), peer.notBefore)
        peer.notBefore = at
        transport.loop.schedule(afterNanoseconds: at - transport.loop.nowNanoseconds) { [peer] in
            for f in frames { peer.arrived(f) }
        }
    }

    private func arrived(_ frame: ByteBuffer) {
        guard active else { return }
        lastActivity = transport.loop.nowNanoseconds
        transport.frame(frame, on: self)
    }

    func close() {
        guard active else { return }
        active = false
        transport.closed(self)
        closed.succeed(())
        guard let peer else { return }
        self.peer = nil
        let loop = transport.loop
        let at = max(loop.nowNanoseconds + transport.network.oneWay(transport.host, peerHost), peer.notBefore)
        loop.schedule(afterNanoseconds: at - loop.nowNanoseconds) { peer.close() }
    }

    /// Reports the connection to its node when it carried nothing for `timeout`; checks again
    /// after each quiet period.
    func armIdle(_ timeout: UInt64) {
        let loop = transport.loop
        let due = lastActivity + timeout
        loop.schedule(afterNanoseconds: due > loop.nowNanoseconds ? due - loop.nowNanoseconds : timeout) { [weak self] in
            guard let self, self.active else { return }
            if loop.nowNanoseconds &- self.lastActivity >= timeout {
                self.lastActivity = loop.nowNanoseconds
                self.transport.idle(self)
            }
            self.armIdle(timeout)
        }
    }
}
