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
    static let toRelay: UInt8 = 0x8A
    static let toClient: UInt8 = 0x8B
    static let fromClient: UInt8 = 0x8C
    static let fromRelay: UInt8 = 0x8D

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

/// A relayed peer as we know it: where its relays are, and which one we use now.
struct RelayRoute {
    var relays: [PeerSocketAddress]
    var next: Int
    var current: PeerSocketAddress? { relays.isEmpty ? nil : relays[next % relays.count] }
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

extension Node {
    // MARK: routing to relayed peers (the sending side)

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
                if relayRoutes.count >= config.limits.maxRelayRoutes, let victim = relayRoutes.keys.randomElement(using: &rng) {
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

    /// Where bytes for `expected` at `target` go: its relay when it is relayed and we hold no
    /// direct connection to it, else `target`.
    func routedTarget(_ target: PeerSocketAddress, expected: Number160) -> PeerSocketAddress {
        // Most nodes know no relayed peer: the empty table answers before any id is hashed.
        guard !relayRoutes.isEmpty, expected != .zero, let relay = relayRoutes[expected]?.current, directPaths[expected] == nil else { return target }
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
            writeReply(out, on: connection)
        case .udp, .tcp:
            return
        }
    }

    // MARK: receiving

    func receivedRelayPacket(_ kind: UInt8, _ buffer: ByteBuffer, remote: Endpoint, origin: Origin) {
        var b = buffer
        b.moveReaderIndex(forwardBy: 1)
        switch kind {
        case RelayPacket.toRelay: relayForward(&b, remote: remote, origin: origin)
        case RelayPacket.toClient: relayDeliverToUs(&b, remote: remote, origin: origin)
        case RelayPacket.fromClient: relayReturn(&b, origin: origin)
        case RelayPacket.fromRelay: relayArrived(&b, remote: remote, origin: origin)
        default: countDrop("relay packet kind \(kind) from \(remote)")
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
        writeReply(out, on: served.link)
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
            writeReply(out, on: c)
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
        receivedInner(b, ip: ip, remote: source, origin: .link(link, token: token, kind: kind == 0 ? .udp : .tcp, source: source))
    }

    /// Sending side: an answer from a relayed peer through one of the relays it announced.
    private func relayArrived(_ b: inout ByteBuffer, remote: Endpoint, origin: Origin) {
        guard let peer = RelayPacket.readID(&b), let ip = RelayPacket.readIP(&b), let route = relayRoutes[peer] else {
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
        receivedInner(b, ip: ip, remote: Endpoint(ip: ip, port: 0), origin: .relayed(peer, via))
    }

    /// A packet that came wrapped: a plain or session packet, never another wrapper.
    private func receivedInner(_ buffer: ByteBuffer, ip: IPAddress, remote: Endpoint, origin: Origin) {
        guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return }
        if first == PacketKind.plaintext.rawValue {
            receivedPlaintext(buffer, ip: ip, remote: remote, origin: origin)
        } else if first >= ProbePacket.kind {
            countDrop("packet kind \(first) inside a relayed one")
        } else if sessionsEnabled {
            receivedSessionPacket(buffer, ip: ip, remote: remote, origin: origin)
        } else {
            refuseHandshake(buffer, remote: remote, origin: origin)
        }
    }

    // MARK: serving as a relay

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

    /// Relayed side: `channel` is a link to our relay `relay`; it stays open (pinned).
    func adoptRelayLink(_ link: any PeerConnection, relay: PeerAddress) {
        relayLinks[ObjectIdentifier(link)] = relay.id
        pinned.insert(PeerSocketAddress(ip: relay.ip, tcpPort: relay.tcpPort, udpPort: 0))
        link.closeFuture.whenComplete { [self] _ in
            relayLinks[ObjectIdentifier(link)] = nil
            pinned.remove(PeerSocketAddress(ip: relay.ip, tcpPort: relay.tcpPort, udpPort: 0))
        }
    }

    /// Relayed side: stops using a link (the relay is being replaced).
    func dropRelayLink(to relay: PeerAddress) {
        let key = PeerSocketAddress(ip: relay.ip, tcpPort: relay.tcpPort, udpPort: 0)
        pinned.remove(key)
        for (id, owner) in relayLinks where owner == relay.id { relayLinks[id] = nil }
        pool[key]?.whenSuccess { $0.close() }
    }

    // MARK: reverse connections

    /// A relayed peer that connected to us directly (over TCP, in a session that proved its id):
    /// we reach it over that connection while it lasts, instead of through its relays.
    func noteDirectPath(_ peer: Number160, origin: Origin) {
        guard !relayRoutes.isEmpty, case .tcp(let connection) = origin, relayRoutes[peer] != nil,
              directPaths[peer].map({ $0 !== connection }) ?? true else { return }
        installDirectPath(peer, connection: connection)
        let remote = "\(connection.remote)"
        if let nonce = punchByPeer[peer], let p = punches[nonce], p.wantsTCP, !p.tcpDone {
            // The peer's SYN got to our listener during a punch: this connection is the punched path.
            punches[nonce]?.tcpDone = true
            announcePath(DirectPath(peer: peer, transport: .tcp, method: .holePunch, remote: remote, milliseconds: ms(since: p.created)))
            finishIfDone(nonce)
        } else {
            announcePath(DirectPath(peer: peer, transport: .tcp, method: .reverseConnection, remote: remote, milliseconds: 0))
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
        request(to: sender.socket, expectedID: sender.id, command: ping, transport: .tcp).whenComplete { [self] result in
            if case .success = result {
                logger.info("direct connection to \(sender.id) (reverse connection)")
                pinned.insert(PeerSocketAddress(ip: sender.ip, tcpPort: sender.tcpPort, udpPort: 0))
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
            guard node.sessionsEnabled else { return .reply(.error(.denied, "this node relays only for peers that prove their id")) }
            guard let link = context.connection else { return .reply(.error(.badRequest, "ask for a relay over TCP: the connection becomes the link")) }
            guard request.sender.id != node.peerID else { return .reply(.error(.badRequest, "a peer cannot relay for itself")) }
            return .reply(node.serveRelay(for: request.sender, link: link))
        }
    }
}
