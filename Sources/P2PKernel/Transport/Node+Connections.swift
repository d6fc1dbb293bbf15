import NIOCore

/// TCP connection bookkeeping of a node: inbound admission by count and source, the budget of
/// bytes in partial frames, and closing connections that never authenticate.
extension Node {
    /// Sets up a new TCP connection's pipeline; an inbound one over a bound is refused (closed).
    func configureTCP(_ ch: any Channel, inbound: Bool) -> EventLoopFuture<Void> {
        ch.eventLoop.makeCompletedFuture {
            if inbound { try admit(ch) }
            let ops = ch.pipeline.syncOperations
            try ops.addHandler(IdleStateHandler(allTimeout: TimeAmount(config.tcpIdleTimeout)))
            try ops.addHandler(ByteToMessageHandler(FrameDecoder(node: self, pauseWhenUnwritable: inbound),
                                                    maximumBufferSize: FrameDecoder.maxFrameBytes + 4 + (256 << 10)))
            try ops.addHandler(TCPHandler(node: self, inbound: inbound))
        }
    }

    /// Admits an inbound connection within `maxInboundTCP` in all and `maxInboundTCPPerIP` per
    /// source IP (loopback exempt), and gives it `requestTimeout` to send something that
    /// authenticates (a valid sealed packet, or in insecure mode a valid message) before it is closed.
    private func admit(_ ch: any Channel) throws {
        let limits = config.limits
        guard running, inboundConnections.count < limits.maxInboundTCP else {
            throw RPCError.busy("more than \(limits.maxInboundTCP) inbound TCP connections")
        }
        let ip = ch.remoteAddress.flatMap(IPAddress.init)
        let key = ip.flatMap { $0.isLoopback ? nil : SourceKey.of($0, port: 0) }
        if let key {
            let n = inboundPerIP[key] ?? 0
            guard n < limits.maxInboundTCPPerIP else {
                    throw RPCError.busy("more than \(limits.maxInboundTCPPerIP) inbound TCP connections from \(ip.map { "\($0)" } ?? "?")")
            }
            inboundPerIP[key] = n + 1
        }
        let id = ObjectIdentifier(ch)
        inboundConnections[id] = ch
        let deadline = eventLoop.scheduleTask(in: TimeAmount(config.requestTimeout)) { [self] in
            if !authenticatedConnections.contains(id) { ch.close(promise: nil) }
        }
        ch.closeFuture.whenComplete { [self] _ in
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
        if case .tcp(let ch) = origin {
            let id = ObjectIdentifier(ch)
            if inboundConnections[id] != nil { authenticatedConnections.insert(id) }
        }
    }

    /// Takes `bytes` from the budget of bytes in partial frames; false when they do not fit.
    func reserveFrameBytes(_ bytes: Int) -> Bool {
        guard partialFrameBytes + bytes <= config.limits.maxPartialFrameBytes else { return false }
        partialFrameBytes += bytes
        return true
    }

    func releaseFrameBytes(_ bytes: Int) {
        partialFrameBytes = max(0, partialFrameBytes - bytes)
    }

    /// Closes a TCP connection that sent something undecodable or unauthentic: unlike a datagram,
    /// a stream cannot be resynchronised, and a broken or hostile peer should not keep the slot.
    func closeIfStream(_ origin: Origin) {
        if case .tcp(let ch) = origin { ch.close(promise: nil) }
    }
}
