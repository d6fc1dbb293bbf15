import NIOCore

/// What the node's transport hands it (see `TransportEvents`), and connection bookkeeping:
/// inbound admission by count and source, and closing connections that never authenticate.
extension Node: TransportEvents {
    package func received(datagram: ByteBuffer, from remote: Endpoint, on socket: any DatagramSocket) {
        if let main = transport.mainSocket, main === socket {
            received(datagram, from: remote, origin: .udp(remote))
        } else {
            receivedOnPunchSocket(datagram, from: remote, socket: socket)
        }
    }

    package func received(frame: ByteBuffer, on connection: any PeerConnection) {
        received(frame, from: connection.remote, origin: .tcp(connection))
    }

    package func idle(_ connection: any PeerConnection) {
        connectionIdle(connection)
    }

    package var limits: NodeLimits { config.limits }

    /// Admits an inbound connection within `maxInboundTCP` in all and `maxInboundTCPPerIP` per
    /// source IP (loopback exempt), and gives it `requestTimeout` to send something that
    /// authenticates (a valid sealed packet, or in insecure mode a valid message) before it is closed.
    package func admit(_ connection: any PeerConnection) throws {
        let limits = config.limits
        guard running, inboundConnections.count < limits.maxInboundTCP else {
            throw RPCError.busy("more than \(limits.maxInboundTCP) inbound TCP connections")
        }
        let ip = connection.remote.ip
        let key = ip.isLoopback ? nil : SourceKey.of(ip, port: 0)
        if let key {
            let n = inboundPerIP[key] ?? 0
            guard n < limits.maxInboundTCPPerIP else {
                throw RPCError.busy("more than \(limits.maxInboundTCPPerIP) inbound TCP connections from \(ip)")
            }
            inboundPerIP[key] = n + 1
        }
        let id = ObjectIdentifier(connection)
        inboundConnections[id] = connection
        let deadline = eventLoop.scheduleTask(in: TimeAmount(config.requestTimeout)) { [self] in
            if !authenticatedConnections.contains(id) { connection.close() }
        }
        connection.closeFuture.whenComplete { [self] _ in
            eventLoop.execute { [self] in
                deadline.cancel()
                inboundConnections[id] = nil
                authenticatedConnections.remove(id)
                if let key, let n = inboundPerIP[key] { inboundPerIP[key] = n > 1 ? n - 1 : nil }
            }
        }
    }

    /// Records that an inbound connection delivered an authenticated message.
    func authenticated(_ origin: Origin) {
        if case .tcp(let c) = origin {
            let id = ObjectIdentifier(c)
            if inboundConnections[id] != nil { authenticatedConnections.insert(id) }
        }
    }

    /// Closes a TCP connection that sent something undecodable or unauthentic: unlike a datagram,
    /// a stream cannot be resynchronised, and a broken or hostile peer should not keep the slot.
    func closeIfStream(_ origin: Origin) {
        if case .tcp(let c) = origin { c.close() }
    }
}
