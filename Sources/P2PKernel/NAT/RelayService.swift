import NIOCore

/// Relay packets (docs/WIRE.md). A peer U that cannot be reached keeps an authenticated TCP
/// connection — its link — to each of its relays R. Another peer A reaches U through R; what
/// travels inside is A's and U's own session packet, which R forwards without reading (the
/// session is end to end: R can drop or delay, never read or forge).
/// ```
///  A → R   0x8A ‖ U id (20) ‖ packet                       UDP datagram or TCP frame
///  R → U   0x8B ‖ token u32 ‖ transport u8 ‖ A's address ‖ packet      frame on U's link
///  U → R   0x8C ‖ token u32 ‖ packet                                   frame on U's link
///  R → A   0x8D ‖ U id (20) ‖ U's IP ‖ packet              the way A's packet came
/// ```
/// An address is `4 ‖ IPv4 ‖ port` or `6 ‖ IPv6 ‖ port`, an IP the same without the port. The
/// token names the way back to A in a ring of `NodeLimits.relayReturnSlots` per served peer, so
/// U can only answer peers that wrote to it recently and never names a destination itself.
enum RelayPacket {
    static let toRelay = PacketKind.toRelay.rawValue
    static let toClient = PacketKind.toClient.rawValue
    static let fromClient = PacketKind.fromClient.rawValue
    static let fromRelay = PacketKind.fromRelay.rawValue

    static func write(_ ip: IPAddress, into b: inout ByteBuffer) {
        switch ip {
        case .v4(let v):
            b.writeInteger(UInt8(4))
            b.writeInteger(v)
        case .v6(let hi, let lo):
            b.writeInteger(UInt8(6))
            b.writeInteger(hi)
            b.writeInteger(lo)
        }
    }

    static func readIP(_ b: inout ByteBuffer) -> IPAddress? {
        switch b.readInteger(as: UInt8.self) {
        case 4: return b.readInteger(as: UInt32.self).map { .v4($0) }
        case 6:
            guard let hi = b.readInteger(as: UInt64.self), let lo = b.readInteger(as: UInt64.self) else { return nil }
            return .v6(hi, lo)
        default: return nil
        }
    }

    static func readID(_ b: inout ByteBuffer) -> Number160? {
        b.readBytes(length: 20).flatMap { Number160(bytes: $0) }
    }

    /// `packet` (its frame length stripped when `framed`) behind `header`; framed again for TCP.
    static func wrap(_ packet: ByteBuffer, framed: Bool, tcp: Bool, header: (inout ByteBuffer) -> Void) -> ByteBuffer {
        var inner = packet
        if framed { inner.moveReaderIndex(forwardBy: min(4, inner.readableBytes)) }
        var out = ByteBufferAllocator().buffer(capacity: inner.readableBytes + 64)
        if tcp { out.writeInteger(UInt32(0)) }
        let start = out.writerIndex
        header(&out)
        out.writeImmutableBuffer(inner)
        if tcp { out.setInteger(UInt32(out.writerIndex - start), at: out.readerIndex) }
        return out
    }
}

/// A peer this node relays for (the relay side).
struct RelayServed {
    let link: any PeerConnection
    /// The way back to each peer that wrote to it recently, by token (a ring).
    var returns: [ReturnPath?]
    var nextToken: UInt32 = 0
    /// Bytes it may still move this second (both directions), and when that was last topped up.
    var allowance: Double
    var stamp: UInt64
    var ip: IPAddress
}

enum ReturnPath {
    case udp(Endpoint)
    case tcp(any PeerConnection)
}

/// Relays on both sides: serving peers that cannot be reached (their links, return tokens, byte
/// rates), and, as a relayed peer, the links to our own relays and the connections we open back
/// to peers that write through them. Confined to the node's event loop.
final class RelayService: KernelPart, @unchecked Sendable {
    private var link = KernelLink()
    @inline(__always) var kernel: Kernel { link.value }
    func attach(_ kernel: Kernel) { link.set(kernel) }

    /// Relay side: the peers we relay for, and which link belongs to whom.
    var relayServed: [Number160: RelayServed] = [:]
    var relayLinkOwners: [ObjectIdentifier: Number160] = [:]
    /// Relayed side: our links to our relays (connection → relay id), and when we last
    /// connected back to a peer that wrote through them.
    var relayLinks: [ObjectIdentifier: Number160] = [:]
    var reverseTried: [Number160: UInt32] = [:]

    func received(_ kind: PacketKind, _ buffer: ByteBuffer, remote: Endpoint, origin: Origin) {
        var b = buffer
        b.moveReaderIndex(forwardBy: 1)
        switch kind {
        case .toRelay: relayForward(&b, remote: remote, origin: origin)
        case .toClient: relayDeliverToUs(&b, remote: remote, origin: origin)
        case .fromClient: relayReturn(&b, origin: origin)
        case .fromRelay: relayArrived(&b, remote: remote, origin: origin)
        default: countDrop("packet kind \(kind) from \(remote) is no relay packet")
        }
    }

    /// Relay side: A's packet for a peer we serve goes down that peer's link with a return token.
    private func relayForward(_ b: inout ByteBuffer, remote: Endpoint, origin: Origin) {
        guard let target = RelayPacket.readID(&b), var served = relayServed[target] else {
            return countDrop("relay packet from \(remote) for a peer we do not relay")
        }
        let back: ReturnPath
        switch origin {
        case .udp(let a): back = .udp(a)
        case .tcp(let c): back = .tcp(c)
        default: return countDrop("relay packet from \(remote) nested in a relayed one")
        }
        let ip = remote.ip
        guard spend(b.readableBytes, on: &served) else {
            relayServed[target] = served
            return countDrop("relay packet for \(target): over its byte rate")
        }
        let token = served.nextToken
        served.nextToken &+= 1
        served.returns[Int(token) % served.returns.count] = back
        relayServed[target] = served
        let port = remote.port
        let out = RelayPacket.wrap(b, framed: false, tcp: true) { o in
            o.writeInteger(RelayPacket.toClient)
            o.writeInteger(token)
            o.writeInteger(UInt8(origin.kind == .udp ? 0 : 1))
            RelayPacket.write(ip, into: &o)
            o.writeInteger(port)
        }
        kernel.rpc.writeReply(out, on: served.link)
    }

    /// Relay side: the served peer answers along a token.
    private func relayReturn(_ b: inout ByteBuffer, origin: Origin) {
        guard case .tcp(let link) = origin, let owner = relayLinkOwners[ObjectIdentifier(link)], var served = relayServed[owner],
              served.link === link, let token = b.readInteger(as: UInt32.self) else {
            return countDrop("relay answer not on a link we serve")
        }
        let slot = Int(token) % served.returns.count
        // A token older than one ring turn names a slot reused since: refused.
        guard served.nextToken &- token <= UInt32(served.returns.count), served.nextToken != token, let back = served.returns[slot] else {
            relayServed[owner] = served
            return countDrop("relay answer with a stale token")
        }
        guard spend(b.readableBytes, on: &served) else {
            relayServed[owner] = served
            return countDrop("relay answer from \(owner): over its byte rate")
        }
        relayServed[owner] = served
        switch back {
        case .udp(let a):
            let out = RelayPacket.wrap(b, framed: false, tcp: false) { o in
                o.writeInteger(RelayPacket.fromRelay)
                o.writeBytes(owner.bytes)
                RelayPacket.write(served.ip, into: &o)
            }
            transport.mainSocket?.send(out, to: a, promise: nil)
        case .tcp(let c):
            guard c.isActive else { return }
            let out = RelayPacket.wrap(b, framed: false, tcp: true) { o in
                o.writeInteger(RelayPacket.fromRelay)
                o.writeBytes(owner.bytes)
                RelayPacket.write(served.ip, into: &o)
            }
            kernel.rpc.writeReply(out, on: c)
        }
    }

    /// Takes `bytes` from a served peer's allowance (`relayBytesPerSecond`, burst of `relayBurstBytes`).
    private func spend(_ bytes: Int, on served: inout RelayServed) -> Bool {
        let now = clock.uptimeNanoseconds
        let limits = config.limits
        served.allowance = min(Double(limits.relayBurstBytes),
                               served.allowance + Double(now &- served.stamp) / 1e9 * Double(limits.relayBytesPerSecond))
        served.stamp = now
        guard served.allowance >= Double(bytes) else { return false }
        served.allowance -= Double(bytes)
        return true
    }

    /// Relayed side: a packet through one of our relays, from the peer it names.
    private func relayDeliverToUs(_ b: inout ByteBuffer, remote: Endpoint, origin: Origin) {
        guard case .tcp(let link) = origin, relayLinks[ObjectIdentifier(link)] != nil else {
            return countDrop("relay delivery from \(remote), not one of our relays")
        }
        guard let token = b.readInteger(as: UInt32.self), let kind = b.readInteger(as: UInt8.self), kind <= 1,
              let ip = RelayPacket.readIP(&b), let port = b.readInteger(as: UInt16.self) else {
            return countDrop("malformed relay delivery from \(remote)")
        }
        let source = Endpoint(ip: ip, port: port)
        kernel.receivedInner(b, remote: source, origin: .link(link, token: token, kind: kind == 0 ? .udp : .tcp, source: source))
    }

    /// Sending side: an answer from a relayed peer through one of the relays it announced.
    private func relayArrived(_ b: inout ByteBuffer, remote: Endpoint, origin: Origin) {
        guard let peer = RelayPacket.readID(&b), let ip = RelayPacket.readIP(&b), let route = kernel.paths.relayRoutes[peer] else {
            return countDrop("relayed packet from \(remote) for a peer we know no relays of")
        }
        let via: RelayVia
        let fromIP = remote.ip, fromPort = remote.port
        switch origin {
        case .udp(let a):
            guard route.relays.contains(where: { $0.ip == fromIP && $0.udpPort == fromPort }) else {
                return countDrop("relayed packet from \(remote), not a relay of \(peer)")
            }
            via = .udp(a)
        case .tcp(let c):
            guard route.relays.contains(where: { $0.ip == fromIP && $0.tcpPort == fromPort }) else {
                return countDrop("relayed packet from \(remote), not a relay of \(peer)")
            }
            via = .tcp(c)
        default:
            return countDrop("relayed packet nested in a relayed one")
        }
        kernel.receivedInner(b, remote: Endpoint(ip: ip, port: 0), origin: .relayed(peer, via))
    }

    /// Starts relaying for `peer` over `link` (its authenticated connection to us).
    func serveRelay(for peer: PeerAddress, link: any PeerConnection) -> Reply {
        let limits = config.limits
        let ip = link.remote.ip
        if let refusal = relayRefusal(for: peer.id, ip: ip) { return .error(.denied, refusal) }
        if let old = relayServed[peer.id], old.link !== link {
            relayLinkOwners[ObjectIdentifier(old.link)] = nil
        }
        relayServed[peer.id] = RelayServed(link: link, returns: Array(repeating: nil, count: max(1, limits.relayReturnSlots)),
                                           allowance: Double(limits.relayBurstBytes), stamp: clock.uptimeNanoseconds, ip: ip)
        relayLinkOwners[ObjectIdentifier(link)] = peer.id
        link.closeFuture.whenComplete { [self] _ in
            relayLinkOwners[ObjectIdentifier(link)] = nil
            if let s = relayServed[peer.id], s.link === link { relayServed[peer.id] = nil }
        }
        return Reply(payload: [.integer(Int64(limits.relayBytesPerSecond))])
    }

    /// Why a new peer at `ip` is not relayed for (nil: it is): `maxRelayedPeers` in all, and
    /// `maxRelayedPeersPerIPGroup` from one /24 or /48 (ids cost nothing; loopback is exempt).
    /// A peer already served may always renew its link.
    func relayRefusal(for peer: Number160, ip: IPAddress) -> String? {
        guard relayServed[peer] == nil else { return nil }
        let limits = config.limits
        guard relayServed.count < limits.maxRelayedPeers else { return "busy: relaying for \(limits.maxRelayedPeers) peers already" }
        if let group = ip.sybilGroup, relayServed.values.count(where: { $0.ip.sybilGroup == group }) >= limits.maxRelayedPeersPerIPGroup {
            return "busy: relaying for \(limits.maxRelayedPeersPerIPGroup) peers of \(ip)'s network already"
        }
        return nil
    }

    /// Relayed side: `channel` is a link to our relay `relay`; it stays open (pinned in the pool).
    func adoptRelayLink(_ link: any PeerConnection, relay: PeerAddress) {
        relayLinks[ObjectIdentifier(link)] = relay.id
        kernel.connections.pinned.insert(PeerSocketAddress(ip: relay.ip, tcpPort: relay.tcpPort, udpPort: 0))
        link.closeFuture.whenComplete { [self] _ in
            relayLinks[ObjectIdentifier(link)] = nil
            kernel.connections.pinned.remove(PeerSocketAddress(ip: relay.ip, tcpPort: relay.tcpPort, udpPort: 0))
        }
    }

    /// Relayed side: stops using a link (the relay is being replaced).
    func dropRelayLink(to relay: PeerAddress) {
        let key = PeerSocketAddress(ip: relay.ip, tcpPort: relay.tcpPort, udpPort: 0)
        kernel.connections.pinned.remove(key)
        for (id, owner) in relayLinks where owner == relay.id { relayLinks[id] = nil }
        kernel.connections.pool[key]?.whenSuccess { $0.close() }
    }

    /// A relayed peer that connected to us directly (over TCP, in a session that proved its id):
    /// we reach it over that connection while it lasts, instead of through its relays.
    func noteDirectPath(_ peer: Number160, origin: Origin) {
        guard !kernel.paths.relayRoutes.isEmpty, case .tcp(let connection) = origin, kernel.paths.relayRoutes[peer] != nil,
              kernel.paths.directPaths[peer].map({ $0 !== connection }) ?? true else { return }
        kernel.paths.installDirectPath(peer, connection: connection)
        let remote = "\(connection.remote)"
        if let nonce = kernel.punch.punchByPeer[peer], let p = kernel.punch.punches[nonce], p.wantsTCP, !p.tcpDone {
            // The peer's SYN got to our listener during a punch: this connection is the punched path.
            kernel.punch.punches[nonce]?.tcpDone = true
            kernel.punch.announcePath(DirectPath(peer: peer, transport: .tcp, method: .holePunch, remote: remote, milliseconds: kernel.punch.ms(since: p.created)))
            kernel.punch.finishIfDone(nonce)
        } else {
            kernel.punch.announcePath(DirectPath(peer: peer, transport: .tcp, method: .reverseConnection, remote: remote, milliseconds: 0))
        }
    }

    /// Relayed side: a peer that can be reached wrote to us through a relay; we connect to it
    /// ourselves (outbound passes our NAT) so it can use that connection instead. Once per peer
    /// a minute, `NodeLimits.reverseConnectionsPerMinute` in all.
    func considerReverseConnection(to sender: PeerAddress, origin: Origin) {
        guard case .link = origin, sender.isContactable, !sender.flags.contains(.relayed),
              sender.flags.isDisjoint(with: [.firewalledTCP]), !relayLinks.isEmpty else { return }
        // The sender's address is what the relay says it is: a hostile relay (or a peer with many
        // ids behind it) could aim these connections anywhere, so they are few a minute in all.
        let now = coarseSeconds
        if let last = reverseTried[sender.id], now &- last < 60 { return }
        reverseTried = reverseTried.filter { now &- $0.value < 60 }
        guard reverseTried.count < config.limits.reverseConnectionsPerMinute else { return }
        reverseTried[sender.id] = now
        let ping = kernelCommands.ping
        kernel.rpc.requestOnLoop(target: sender.socket, expectedID: sender.id, command: ping, payload: [], transport: .tcp, timeout: nil).whenComplete { [self] result in
            if case .success = result {
                logger.info("direct connection to \(sender.id) (reverse connection)")
                kernel.connections.pinned.insert(PeerSocketAddress(ip: sender.ip, tcpPort: sender.tcpPort, udpPort: 0))
            }
        }
    }
}

extension KernelCommands {
    public static let relay = "kernel.relay"

    /// "Relay for me": from a peer over TCP, in a session that proved its id. The connection it
    /// came on becomes the peer's link; the reply carries the byte rate this relay allows it.
    /// Refused in insecure mode (nobody proved who asks) and beyond `NodeLimits.maxRelayedPeers`.
    struct RelayRequest: CommandHandler {
        let name = KernelCommands.relay
        func handle(_ request: Message, context: CommandContext) -> CommandResult {
            let node = context.node
            guard node.kernel.sessions.enabled else { return .reply(.error(.denied, "this node relays only for peers that prove their id")) }
            guard let link = context.connection else { return .reply(.error(.badRequest, "ask for a relay over TCP: the connection becomes the link")) }
            guard request.sender.id != node.peerID else { return .reply(.error(.badRequest, "a peer cannot relay for itself")) }
            return .reply(node.kernel.relay.serveRelay(for: request.sender, link: link))
        }
    }
}
