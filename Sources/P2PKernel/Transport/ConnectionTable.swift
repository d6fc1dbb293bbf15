import NIOCore

/// The node's TCP connections: the pool of outbound ones (opened on first use, reused, the
/// oldest unpinned one closed past `maxTCPConnections`), and inbound admission by count and
/// source, with a deadline to authenticate. Confined to the node's event loop.
final class ConnectionTable: KernelPart, @unchecked Sendable {
    private var link = KernelLink()
    @inline(__always) var kernel: Kernel { link.value }
    func attach(_ kernel: Kernel) { link.set(kernel) }

    var pool: [PeerSocketAddress: EventLoopFuture<any PeerConnection>] = [:]
    var poolOrder: [PeerSocketAddress] = []
    /// Pool keys whose connections are never evicted (links to our relays, reverse connections).
    var pinned: Set<PeerSocketAddress> = []
    var inbound: [ObjectIdentifier: any PeerConnection] = [:]
    var inboundPerIP: [UInt64: Int] = [:]
    var authenticatedConnections: Set<ObjectIdentifier> = []
    /// Inbound connections not yet authenticated, oldest first: when every slot is taken, the
    /// oldest of them gives its place to a newcomer, so strangers holding idle connections
    /// cannot lock peers (or a probe-back sent to test our reachability) out of TCP.
    var unauthenticatedOrder: [ObjectIdentifier] = []

    /// The connection to use for `peer`: one it opened to us (a reverse connection), the pooled
    /// one to its relay when it is relayed, else the pooled one to `target`.
    func connection(to target: PeerSocketAddress, peer: Number160) -> EventLoopFuture<any PeerConnection> {
        if !kernel.paths.directPaths.isEmpty, peer != .zero, let direct = kernel.paths.directPaths[peer] { return eventLoop.makeSucceededFuture(direct) }
        return connection(to: kernel.paths.routedTarget(target, expected: peer))
    }

    /// A pooled connection to the peer's TCP port, opened on first use and reused after.
    func connection(to target: PeerSocketAddress) -> EventLoopFuture<any PeerConnection> {
        let key = PeerSocketAddress(ip: target.ip, tcpPort: target.tcpPort, udpPort: 0)
        if let existing = pool[key] { return existing }
        if let problem = kernel.paths.unsendable(target, .tcp) { return eventLoop.makeFailedFuture(RPCError.invalidAddress(problem)) }
        // The oldest unpinned connection makes room (links to our relays are pinned).
        if pool.count >= config.maxTCPConnections, let at = poolOrder.firstIndex(where: { !pinned.contains($0) }) {
            let oldest = poolOrder.remove(at: at)
            pool.removeValue(forKey: oldest)?.whenSuccess { $0.close() }
        }
        let future = transport.connect(to: target.tcpEndpoint, timeout: TimeAmount(kernel.requestTimeout), fromListenPort: false, raw: nil)
        pool[key] = future
        poolOrder.append(key)
        future.whenComplete { [self] result in
            switch result {
            case .failure:
                forget(key, future)
            case .success(let c):
                c.closeFuture.whenComplete { [self] _ in
                    forget(key, future)
                    kernel.rpc.failRequests(on: ObjectIdentifier(c), target: target)
                }
            }
        }
        return future
    }

    private func forget(_ key: PeerSocketAddress, _ future: EventLoopFuture<any PeerConnection>) {
        if let current = pool[key], current === future {
            pool[key] = nil
            poolOrder.removeAll { $0 == key }
        }
    }

    /// Admits an inbound connection within `maxInboundTCP` in all and `maxInboundTCPPerIP` per
    /// source IP (loopback exempt), and gives it `requestTimeout` to send something that
    /// authenticates (a valid sealed packet, or in insecure mode a valid message) before it is closed.
    func admit(_ connection: any PeerConnection) throws {
        let limits = kernel.limits
        guard running else { throw RPCError.shutDown }
        let ip = connection.remote.ip
        let key = ip.isLoopback ? nil : SourceKey.of(ip, port: 0)
        if let key, (inboundPerIP[key] ?? 0) >= limits.maxInboundTCPPerIP {
            throw RPCError.busy("more than \(limits.maxInboundTCPPerIP) inbound TCP connections from \(ip)")
        }
        if inbound.count >= limits.maxInboundTCP {
            // Full: the oldest connection that has not authenticated yet makes room; when every
            // slot holds an authenticated peer, the newcomer is refused.
            unauthenticatedOrder.removeAll { inbound[$0] == nil || authenticatedConnections.contains($0) }
            guard !unauthenticatedOrder.isEmpty, let oldest = inbound[unauthenticatedOrder.removeFirst()] else {
                throw RPCError.busy("more than \(limits.maxInboundTCP) inbound TCP connections")
            }
            release(ObjectIdentifier(oldest), ip: oldest.remote.ip)
            oldest.close()
        }
        if let key { inboundPerIP[key, default: 0] += 1 }
        if unauthenticatedOrder.count >= 2 * limits.maxInboundTCP {
            unauthenticatedOrder.removeAll { inbound[$0] == nil || authenticatedConnections.contains($0) }
        }
        let id = ObjectIdentifier(connection)
        inbound[id] = connection
        unauthenticatedOrder.append(id)
        let deadline = eventLoop.scheduleTask(in: TimeAmount(kernel.requestTimeout)) { [self] in
            if !authenticatedConnections.contains(id) { connection.close() }
        }
        connection.closeFuture.whenComplete { [self] _ in
            eventLoop.execute { [self] in
                deadline.cancel()
                release(id, ip: ip)
            }
        }
    }

    /// Gives back an inbound connection's slot (once: an evicted connection's slot is released
    /// when it is evicted, not again when its close completes).
    private func release(_ id: ObjectIdentifier, ip: IPAddress) {
        guard inbound.removeValue(forKey: id) != nil else { return }
        authenticatedConnections.remove(id)
        if let key = ip.isLoopback ? nil : SourceKey.of(ip, port: 0), let n = inboundPerIP[key] {
            inboundPerIP[key] = n > 1 ? n - 1 : nil
        }
    }

    /// Records that an inbound connection delivered an authenticated message.
    func authenticated(_ origin: Origin) {
        if case .tcp(let c) = origin {
            let id = ObjectIdentifier(c)
            if inbound[id] != nil { authenticatedConnections.insert(id) }
        }
    }

    /// Closes a TCP connection that sent something undecodable or unauthentic: unlike a datagram,
    /// a stream cannot be resynchronised, and a broken or hostile peer should not keep the slot.
    func closeIfStream(_ origin: Origin) {
        if case .tcp(let c) = origin { c.close() }
    }

    /// Closes every connection (shutdown), the pooled ones in the order they were opened.
    func closeAll() {
        for key in poolOrder { pool[key]?.whenSuccess { $0.close() } }
        pool.removeAll()
        poolOrder.removeAll()
        for c in inbound.values.sorted(by: { "\($0.remote)" < "\($1.remote)" }) { c.close() }
    }
}
