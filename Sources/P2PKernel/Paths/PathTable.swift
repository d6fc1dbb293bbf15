import NIOCore

/// How each peer is reached — the one place that decides. A peer is reached at its own address
/// (plain), through one of its relays (relayed: datagrams wrapped to the relay, frames on a
/// connection to it), over a connection it opened to us or that a punch made (direct TCP), or
/// over a punched UDP path (the address its datagrams come from, possibly on a birthday socket).
/// The NAT parts install paths here (`installDirectPath`, `installUDPPath`, `learnRoute`); the
/// RPC engine and the session layer send through it. Confined to the node's event loop.
///
/// ```
///  datagram for peer P:  punched UDP path? ── its socket → its address
///                        P relayed, no direct path? ── 0x8A ‖ P ‖ packet → P's current relay
///                        else ── P's address
///  frame for peer P:     direct connection to P? ── as it is
///                        else pooled connection to P's relay (0x8A-wrapped) or to P
/// ```
final class PathTable: KernelPart, @unchecked Sendable {
    private var link = KernelLink()
    @inline(__always) var kernel: Kernel { link.value }
    func attach(_ kernel: Kernel) { link.set(kernel) }

    /// Relayed peers: where their relays are.
    var relayRoutes: [Number160: RelayRoute] = [:]
    /// Connections relayed peers opened to us (reverse connections) or that a punch made, used
    /// instead of their relays.
    var directPaths: [Number160: any PeerConnection] = [:]
    /// Punched UDP paths: the socket and the address a peer's datagrams go to instead of its relays.
    var udpPaths: [Number160: UDPPath] = [:]
    /// Birthday sockets that became paths, by the remote address they serve: replies to a
    /// datagram from there leave on that socket, not the node's.
    var punchSockets: [Endpoint: any DatagramSocket] = [:]
    var pathKeepAlive: RepeatedTask?

    /// How a request of `size` bytes to `peer` (at `target`) travels: UDP when it fits a datagram
    /// (and `choice` allows), else TCP — a punched UDP path keeps UDP, a direct connection turns
    /// UDP into TCP — or why it cannot be sent.
    func path(to target: PeerSocketAddress, peer: Number160, size: Int, choice: TransportChoice) -> Result<TransportKind, RPCError> {
        let kind: TransportKind
        switch choice {
        case .auto: kind = size <= WireLimits.udpPayloadLimit ? .udp : .tcp
        case .udp:
            guard size <= WireLimits.udpPayloadLimit else {
                return .failure(.encoding(.limitExceeded(what: "UDP request bytes", value: size, limit: WireLimits.udpPayloadLimit)))
            }
            kind = .udp
        case .tcp: kind = .tcp
        }
        let punchedUDP = kind == .udp && !udpPaths.isEmpty && peer != .zero && udpPaths[peer] != nil
        let routed = !punchedUDP && !directPaths.isEmpty && peer != .zero && directPaths[peer] != nil ? TransportKind.tcp : kind
        if !punchedUDP, let problem = unsendable(routedTarget(target, expected: peer), routed) {
            return .failure(.invalidAddress(problem))
        }
        return .success(routed)
    }

    /// Remembers how to reach `peer` when it is relayed; forgets it when it no longer is.
    func learnRoute(_ peer: PeerAddress) {
        guard peer.id != peerID else { return }
        if peer.flags.contains(.relayed), !peer.relays.isEmpty {
            let relays = peer.relays.filter { unsendable($0, .udp) == nil && unsendable($0, .tcp) == nil }
            guard !relays.isEmpty else { return }
            if var r = relayRoutes[peer.id] {
                if r.relays != relays {
                    // Keep using the relay we use now if it is still listed.
                    let now = r.current
                    r.relays = relays
                    r.next = now.flatMap { relays.firstIndex(of: $0) } ?? 0
                    relayRoutes[peer.id] = r
                }
            } else {
                var rng = random.generator
                if relayRoutes.count >= limits.maxRelayRoutes, let victim = relayRoutes.keys.randomElement(using: &rng) {
                    relayRoutes[victim] = nil
                }
                relayRoutes[peer.id] = RelayRoute(relays: relays, next: Int.random(in: 0..<relays.count, using: &rng))
            }
        } else if relayRoutes[peer.id] != nil {
            relayRoutes[peer.id] = nil
            dropUDPPath(peer.id)
        }
    }

    /// Moves `peer`'s traffic to its next relay (one did not answer, or went away).
    func rotateRelay(for peer: Number160) {
        guard var r = relayRoutes[peer], r.relays.count > 1 else { return }
        r.next = (r.next + 1) % r.relays.count
        relayRoutes[peer] = r
    }

    /// Where bytes for `expected` at `target` go when no direct path carries them: its current
    /// relay when it is relayed, else `target`. (A direct TCP connection to a relayed peer carries
    /// frames only: its datagrams still go through a relay, or a punched UDP path.)
    func routedTarget(_ target: PeerSocketAddress, expected: Number160) -> PeerSocketAddress {
        // Most nodes know no relayed peer: the empty table answers before any id is hashed.
        guard !relayRoutes.isEmpty, expected != .zero, let relay = relayRoutes[expected]?.current else { return target }
        return relay
    }

    /// Sends a datagram for `peer`: to `target`, or wrapped to its relay.
    func emitUDP(_ packet: ByteBuffer, to target: PeerSocketAddress, peer: Number160, promise: EventLoopPromise<Void>?) {
        guard let udp = transport.mainSocket else {
            promise?.fail(RPCError.shutDown)
            return
        }
        if peer != .zero, !udpPaths.isEmpty, let path = udpPaths[peer] {
            (path.socket ?? udp).send(packet, to: path.address, promise: promise)
            return
        }
        let via = routedTarget(target, expected: peer)
        guard via != target else {
            udp.send(packet, to: target.udpEndpoint, promise: promise)
            return
        }
        let wrapped = RelayPacket.wrap(packet, framed: false, tcp: false) { b in
            b.writeInteger(RelayPacket.toRelay)
            b.writeBytes(peer.bytes)
        }
        udp.send(wrapped, to: via.udpEndpoint, promise: promise)
    }

    /// Writes a frame for `peer` on `channel`: as it is, or wrapped when the channel leads to
    /// the peer's relay rather than to the peer.
    func emitTCP(_ frame: ByteBuffer, on connection: any PeerConnection, peer: Number160, promise: EventLoopPromise<Void>?) {
        let direct = relayRoutes.isEmpty || peer == .zero || relayRoutes[peer] == nil || directPaths[peer].map { $0 === connection } == true
        guard !direct else {
            connection.write(frame, promise: promise)
            return
        }
        let wrapped = RelayPacket.wrap(frame, framed: true, tcp: true) { b in
            b.writeInteger(RelayPacket.toRelay)
            b.writeBytes(peer.bytes)
        }
        connection.write(wrapped, promise: promise)
    }

    /// Writes a packet back the way a relayed one came (`framed`: it carries a TCP length).
    func writeRelayed(_ packet: ByteBuffer, framed: Bool, origin: Origin) {
        switch origin {
        case .relayed(let peer, .udp(let relay)):
            let out = RelayPacket.wrap(packet, framed: framed, tcp: false) { b in
                b.writeInteger(RelayPacket.toRelay)
                b.writeBytes(peer.bytes)
            }
            transport.mainSocket?.send(out, to: relay, promise: nil)
        case .relayed(let peer, .tcp(let connection)):
            let out = RelayPacket.wrap(packet, framed: framed, tcp: true) { b in
                b.writeInteger(RelayPacket.toRelay)
                b.writeBytes(peer.bytes)
            }
            connection.write(out, promise: nil)
        case .link(let connection, let token, _, _):
            let out = RelayPacket.wrap(packet, framed: framed, tcp: true) { b in
                b.writeInteger(RelayPacket.fromClient)
                b.writeInteger(token)
            }
            kernel.rpc.writeReply(out, on: connection)
        case .udp, .tcp:
            return
        }
    }

    /// Makes `connection` the way to `peer` over TCP while it is open.
    func installDirectPath(_ peer: Number160, connection: any PeerConnection) {
        var rng = random.generator
        if directPaths[peer] == nil, directPaths.count >= limits.maxDirectPaths, let victim = directPaths.keys.randomElement(using: &rng) {
            directPaths[victim] = nil
        }
        directPaths[peer] = connection
        let target = PeerSocketAddress(ip: connection.remote.ip, tcpPort: connection.remote.port, udpPort: 0)
        connection.closeFuture.whenComplete { [self] _ in
            if let c = directPaths[peer], c === connection { directPaths[peer] = nil }
            // Requests waiting on it go through the peer's relays again (or fail if it has none).
            kernel.rpc.failRequests(on: ObjectIdentifier(connection), target: target)
        }
    }

    func installUDPPath(_ peer: Number160, socket: (any DatagramSocket)?, address: Endpoint) {
        if udpPaths[peer] != nil { dropUDPPath(peer) }
        var rng = random.generator
        if udpPaths.count >= limits.maxDirectPaths, let victim = udpPaths.keys.randomElement(using: &rng) { dropUDPPath(victim) }
        udpPaths[peer] = UDPPath(socket: socket, address: address, heard: coarseSeconds)
        if let socket { punchSockets[address] = socket }
        if pathKeepAlive == nil {
            let every = TimeAmount(config.nat.pathKeepAlive)
            pathKeepAlive = eventLoop.scheduleRepeatedTask(initialDelay: every, delay: every) { [self] _ in keepPathsAlive() }
        }
    }

    /// Forgets the UDP path to `peer` (when it still leads to `ifTo`, if given); its birthday
    /// socket closes.
    func dropUDPPath(_ peer: Number160, ifTo address: Endpoint? = nil) {
        guard let path = udpPaths[peer], address.map({ $0 == path.address }) ?? true else { return }
        udpPaths[peer] = nil
        if let socket = path.socket {
            if let s = punchSockets[path.address], s === socket { punchSockets[path.address] = nil }
            socket.close()
        }
        if udpPaths.isEmpty {
            pathKeepAlive?.cancel()
            pathKeepAlive = nil
        }
    }

    /// A datagram from `remote` over the UDP path to `peer`: the path is alive.
    func heardOverPath(_ peer: Number160, _ remote: Endpoint) {
        if let path = udpPaths[peer], path.address == remote { udpPaths[peer]?.heard = coarseSeconds }
    }

    /// Pings every punched UDP path (keeping the NAT mappings open); one whose ping fails is dropped.
    func keepPathsAlive() {
        for (peer, path) in udpPaths {
            let target = PeerSocketAddress(ip: path.address.ip, tcpPort: 0, udpPort: path.address.port)
            kernel.rpc.requestOnLoop(target: target, expectedID: peer, command: kernelCommands.ping, payload: [], transport: .udp, timeout: nil)
                .whenComplete { [self] result in
                    if case .success(let r) = result, r.type == .ok { return }
                    guard udpPaths[peer]?.address == path.address else { return }
                    logger.info("direct path to \(peer) over udp lost; its relays carry the traffic again")
                    dropUDPPath(peer, ifTo: path.address)
                }
        }
    }

    /// A TCP connection that went idle: a direct path is kept (pinged; closed if that fails),
    /// anything else closes.
    func connectionIdle(_ connection: any PeerConnection) {
        guard !directPaths.isEmpty, let peer = directPaths.first(where: { $0.value === connection })?.key else {
            return connection.close()
        }
        let target = PeerSocketAddress(ip: connection.remote.ip, tcpPort: connection.remote.port, udpPort: 0)
        kernel.rpc.requestOnLoop(target: target, expectedID: peer, command: kernelCommands.ping, payload: [], transport: .tcp, timeout: nil)
            .whenComplete { result in
                if case .success(let r) = result, r.type == .ok { return }
                connection.close()
            }
    }

    /// The socket a datagram to `remote` leaves on: a birthday socket that is the path to it, else ours.
    func udpSocket(to remote: Endpoint) -> (any DatagramSocket)? {
        if punchSockets.isEmpty { return transport.mainSocket }
        return punchSockets[remote] ?? transport.mainSocket
    }

    /// Why `target` cannot be sent to over `kind`, or nil. A peer can announce anything; sending
    /// to port 0, a broadcast or multicast address, or an address family our socket lacks fails
    /// in the kernel, and SwiftNIO closes a UDP socket on such an error.
    func unsendable(_ target: PeerSocketAddress, _ kind: TransportKind) -> String? {
        let port = kind == .udp ? target.udpPort : target.tcpPort
        if port == 0 { return "\(target): port 0" }
        if !target.ip.isUnicast { return "\(target): not a unicast address" }
        if !target.ip.isV4, transport.isIPv4 { return "\(target): IPv6, and this node listens on IPv4 only" }
        return nil
    }

    /// Drops every punched path and direct connection (shutdown).
    func closeAll() {
        for peer in Array(udpPaths.keys) { dropUDPPath(peer) }
        // Punched connections belong to no pool: closed here (inbound ones close with the rest).
        for c in directPaths.values { c.close() }
        directPaths.removeAll()
        pathKeepAlive?.cancel()
        pathKeepAlive = nil
    }
}

/// A relayed peer as we know it: where its relays are, and which one we use now.
struct RelayRoute {
    var relays: [PeerSocketAddress]
    var next: Int
    var current: PeerSocketAddress? { relays.isEmpty ? nil : relays[next % relays.count] }
}

/// A punched UDP path: the birthday socket it leaves on (nil: the node's own socket, whichever
/// that is now — it is bound again if it ever closes) and the peer's address.
struct UDPPath {
    let socket: (any DatagramSocket)?
    let address: Endpoint
    /// When a datagram last came from `address` (coarse seconds).
    var heard: UInt32
}

