import NIOConcurrencyHelpers
import NIOCore

/// Probe-back: how a node learns whether an address of its own is reachable from outside.
///
/// The node asks a peer (`kernel.probe`, in a session) to have a nonce sent to the node's own
/// IP — the IP the request came from; only the ports are the requester's to name — over UDP and
/// over TCP. The asked peer hands the job to a third peer when it knows one on another address
/// (so the probe comes from a host the node did not contact), else sends it itself; either way
/// from ephemeral ports, never a listen port: a packet from an endpoint the node never sent to
/// passes a NAT only if the NAT forwards that port (AutoNAT v2's lesson: a dial-back from the
/// listen port could pass a hole the request itself opened). The nonce proves that what
/// arrived is the probe.
///
/// A PROBE packet is `0x87 ‖ u64 nonce` (9 bytes), one datagram or one TCP frame; it needs no session.
enum ProbePacket {
    static let kind = PacketKind.probe.rawValue
    static let bytes = 9

    static func encode(_ nonce: UInt64) -> [UInt8] {
        [kind] + (0..<8).map { UInt8(truncatingIfNeeded: nonce >> UInt64(56 - 8 * $0)) }
    }

    static func decode(_ b: ByteBuffer) -> UInt64? {
        guard b.readableBytes == bytes, b.getInteger(at: b.readerIndex, as: UInt8.self) == kind else { return nil }
        return b.getInteger(at: b.readerIndex + 1, as: UInt64.self)
    }
}

/// Observation over TCP: "from where do you see this connection?", asked on a connection the node
/// opens from its own listen port (so the answer is the NAT mapping of that port, which is what
/// a peer must dial to reach it, and what TCP hole punching dials).
///
/// OBSERVE is `0x88 ‖ u64 nonce` (9 bytes); the answer is `0x89 ‖ nonce ‖ u16 port ‖ u8 4|6 ‖
/// 4 or 16 bytes of IP`, one frame each, after which the answering side closes. TCP only: over
/// UDP an unauthenticated answer larger than its question could be aimed at a spoofed source.
enum ObservePacket {
    static let kind = PacketKind.observe.rawValue
    static let answerKind = PacketKind.observeAnswer.rawValue
    static let bytes = 9

    static func answer(nonce: UInt64, seen: Endpoint) -> ByteBuffer? {
        let ip = seen.ip, port = seen.port
        var b = ByteBufferAllocator().buffer(capacity: 4 + 28)
        let ipBytes: [UInt8]
        switch ip {
        case .v4(let v): ipBytes = (0..<4).map { UInt8(truncatingIfNeeded: v >> UInt32(24 - 8 * $0)) }
        case .v6(let hi, let lo): ipBytes = (0..<8).map { UInt8(truncatingIfNeeded: hi >> UInt64(56 - 8 * $0)) }
            + (0..<8).map { UInt8(truncatingIfNeeded: lo >> UInt64(56 - 8 * $0)) }
        }
        b.writeInteger(UInt32(1 + 8 + 2 + 1 + ipBytes.count))
        b.writeInteger(answerKind)
        b.writeInteger(nonce)
        b.writeInteger(UInt16(port))
        b.writeInteger(UInt8(ip.isV4 ? 4 : 6))
        b.writeBytes(ipBytes)
        return b
    }

    /// The observed address in an answer frame (without its length), if it answers `nonce`.
    static func parseAnswer(_ b: ByteBuffer, nonce: UInt64) -> PeerSocketAddress? {
        var b = b
        guard b.readInteger(as: UInt8.self) == answerKind, b.readInteger(as: UInt64.self) == nonce,
              let port = b.readInteger(as: UInt16.self), let family = b.readInteger(as: UInt8.self) else { return nil }
        switch family {
        case 4:
            guard b.readableBytes == 4, let v = b.readInteger(as: UInt32.self) else { return nil }
            return PeerSocketAddress(ip: .v4(v), tcpPort: port, udpPort: 0)
        case 6:
            guard b.readableBytes == 16, let hi = b.readInteger(as: UInt64.self), let lo = b.readInteger(as: UInt64.self) else { return nil }
            return PeerSocketAddress(ip: .v6(hi, lo), tcpPort: port, udpPort: 0)
        default:
            return nil
        }
    }
}

extension KernelCommands {
    public static let probe = "kernel.probe"
    public static let probeFor = "kernel.probe-for"
    public static let observe = "kernel.observe"

    /// "From where do you see this request?" Answers the UDP source of the request (a peer
    /// record with the requester's id, IP and source port). Over UDP only.
    struct Observe: CommandHandler {
        let name = KernelCommands.observe
        func handle(_ request: Message, context: CommandContext) -> CommandResult {
            guard context.transport == .udp else { return .reply(.error(.badRequest, "observe runs over UDP")) }
            let seen = PeerSocketAddress(ip: request.sender.ip, tcpPort: 0, udpPort: context.sourcePort)
            return .reply(Reply(payload: [.peers([PeerAddress(id: request.sender.id, socket: seen)])]))
        }
    }

    /// Probe-back for the requester (payload: integers nonce, UDP port, TCP port; a port of 0 is
    /// skipped). The probes go to the requester's own IP. A third peer sends them when this node
    /// knows one on another address that agrees (`kernel.probe-for`); else this node sends them.
    /// Reply: an integer (bit 0 UDP probe sent, bit 1 TCP) and the prober's record.
    /// Rate-limited per source (`NodeLimits.probesPerSecond`).
    struct Probe: CommandHandler {
        let name = KernelCommands.probe
        func handle(_ request: Message, context: CommandContext) -> CommandResult {
            let node = context.node
            guard let (nonce, udp, tcp) = Probe.ports(request.payload) else {
                return .reply(.error(.badRequest, "probe needs a nonce, a UDP port and a TCP port"))
            }
            let ip = request.sender.ip
            guard ip.isUnicast else { return .reply(.error(.badRequest, "\(ip) cannot be probed")) }
            guard node.kernel.prober.probeBuckets.allow(SourceKey.of(ip, port: context.sourcePort), nowNanoseconds: node.clock.uptimeNanoseconds) else {
                return .reply(.error(.denied, "busy: probe rate of this source"))
            }
            let target = PeerAddress(id: request.sender.id, socket: PeerSocketAddress(ip: ip, tcpPort: tcp, udpPort: udp))
            let me = node.kernel.me
            // A helper on another address than ours and the requester's (another /24 where
            // there is one), that we hold a session with: it is alive and proven.
            let helpers = node.peerMap.verifiedPeers.filter {
                $0.id != target.id && $0.ip != ip && $0.ip != me.ip && $0.isDirectlyReachable
                    && (!node.kernel.sessions.enabled || node.kernel.sessions.table.slot(peer: $0.id) != nil)
            }
            let helper = helpers.first { $0.ip.sybilGroup != ip.sybilGroup } ?? helpers.first
            let payload: [Payload] = [.integer(Int64(bitPattern: nonce)), .integer(Int64(udp)), .integer(Int64(tcp)), .peers([target])]
            let own: @Sendable () -> EventLoopFuture<Reply> = { node.kernel.prober.sendProbes(nonce: nonce, to: target.socket).map { Reply(payload: [.integer($0), .peers([me])]) } }
            guard let helper else { return .future(own()) }
            let delegated = node.kernel.rpc.requestOnLoop(target: helper.socket, expectedID: helper.id, command: CommandID.derive(from: KernelCommands.probeFor),
                                               payload: payload, transport: .udp, timeout: min(node.config.requestTimeout, .seconds(2)))
                .flatMap { reply -> EventLoopFuture<Reply> in
                    if reply.type == .ok, let bits = reply.firstInteger, bits != 0 {
                        return node.eventLoop.makeSucceededFuture(Reply(payload: [.integer(bits), .peers([reply.sender])]))
                    }
                    return own()
                }
                .flatMapError { _ in own() }
            return .future(delegated)
        }

        static func ports(_ payload: [Payload]) -> (UInt64, UInt16, UInt16)? {
            let ints = payload.compactMap { p -> Int64? in if case .integer(let v) = p { v } else { nil } }
            guard ints.count == 3, let udp = UInt16(exactly: ints[1]), let tcp = UInt16(exactly: ints[2]) else { return nil }
            return (UInt64(bitPattern: ints[0]), udp, tcp)
        }
    }

    /// A peer asks this node to send a probe-back for a third (payload: nonce, UDP port, TCP
    /// port, the target's record). Only from peers in our map, at the probe rate per source;
    /// what it can make us send is one 9-byte datagram and one connection with a 9-byte frame.
    struct ProbeFor: CommandHandler {
        let name = KernelCommands.probeFor
        func handle(_ request: Message, context: CommandContext) -> CommandResult {
            let node = context.node
            guard let (nonce, _, _) = Probe.ports(request.payload.filter { if case .integer = $0 { true } else { false } }),
                  let target = request.payload.lazy.compactMap({ p -> PeerAddress? in if case .peers(let v) = p { v.first } else { nil } }).first,
                  target.ip.isUnicast else {
                return .reply(.error(.badRequest, "probe-for needs a nonce, ports and a target"))
            }
            guard node.peerMap.contains(request.sender.id) else { return .reply(.error(.denied, "probe-for from a peer not in the map")) }
            guard node.kernel.prober.probeBuckets.allow(SourceKey.of(request.sender.ip, port: context.sourcePort), nowNanoseconds: node.clock.uptimeNanoseconds) else {
                return .reply(.error(.denied, "busy: probe rate of this source"))
            }
            return .future(node.kernel.prober.sendProbes(nonce: nonce, to: target.socket).map { Reply(payload: [.integer($0)]) })
        }
    }
}

/// Probe-backs and observations (see `ProbePacket`, `ObservePacket`): the probe-backs this node
/// waits for, the probes it sends for others, and their rate limits. Confined to the node's loop.
final class Prober: KernelPart, @unchecked Sendable {
    private var link = KernelLink()
    @inline(__always) var kernel: Kernel { link.value }
    func attach(_ kernel: Kernel) { link.set(kernel) }

    /// Probe-backs waiting for their nonce.
    var probes: [UInt64: ProbeWait] = [:]
    var discoverBuckets: TokenBuckets
    var probeBuckets: TokenBuckets

    init(limits: NodeLimits, random: RandomSource) {
        discoverBuckets = TokenBuckets(rate: limits.discoversPerSecond, burst: limits.discoverBurst, slots: limits.rateLimitSlots, seed: random.next())
        probeBuckets = TokenBuckets(rate: limits.probesPerSecond, burst: limits.probeBurst, slots: limits.rateLimitSlots, seed: random.next())
    }

    /// Ends every probe-back still waiting (shutdown).
    func closeAll() {
        for nonce in probes.keys.sorted() { probes[nonce]?.promise.succeed(()) }
        probes.removeAll()
    }

    /// Sends PROBE(nonce) to `target`'s UDP and TCP ports (0 skips one) from ephemeral ports;
    /// completes with bit 0 set if the datagram went out, bit 1 if the TCP frame was written.
    func sendProbes(nonce: UInt64, to target: PeerSocketAddress) -> EventLoopFuture<Int64> {
        let packet = ProbePacket.encode(nonce)
        var sent: [EventLoopFuture<Int64>] = []
        if target.udpPort != 0, target.ip.isUnicast {
            let address = target.udpEndpoint
            let loop = eventLoop
            sent.append(transport.openDatagramSocket().flatMap { socket in
                var b = ByteBufferAllocator().buffer(capacity: packet.count)
                b.writeBytes(packet)
                let written = loop.makePromise(of: Void.self)
                socket.send(b, to: address, promise: written)
                return written.futureResult.always { _ in socket.close() }
            }.map { 1 }.recover { _ in 0 })
        }
        if target.tcpPort != 0, target.ip.isUnicast {
            let timeout = TimeAmount(min(config.requestTimeout / 2, .seconds(1)))
            let loop = eventLoop
            let ignore = RawFrames(maxFrame: 64) { _ in }
            sent.append(transport.connect(to: target.tcpEndpoint, timeout: timeout, fromListenPort: false, raw: ignore).flatMap { c in
                var b = ByteBufferAllocator().buffer(capacity: packet.count + 4)
                b.writeInteger(UInt32(packet.count))
                b.writeBytes(packet)
                let written = loop.makePromise(of: Void.self)
                c.write(b, promise: written)
                return written.futureResult.always { _ in c.close() }
            }.map { 2 }.recover { _ in 0 })
        }
        return EventLoopFuture.whenAllSucceed(sent, on: eventLoop).map { $0.reduce(0, |) }
    }

    /// Whether `peer` (or a third peer it picks) can reach this node at `udpPort` and `tcpPort`
    /// of the IP it sees us from, unsolicited (see `ProbePacket`). The prober answers once it has
    /// sent the probes; they then get `grace` to arrive. `prober` is the peer that sent them.
    func probeBack(via peer: PeerAddress, udpPort: UInt16, tcpPort: UInt16,
                          grace: Duration = .milliseconds(400)) async throws -> (udp: Bool, tcp: Bool, prober: PeerAddress?) {
        let nonce = max(1, random.next())
        let seen = try await eventLoop.submit { [self] in
            let promise = eventLoop.makePromise(of: Void.self)
            probes[nonce] = ProbeWait(udp: udpPort == 0, tcp: tcpPort == 0, promise: promise)
            return promise.futureResult
        }.get()
        let finish = { [self] () async -> ProbeWait? in
            try? await eventLoop.submit { [self] in
                let w = probes.removeValue(forKey: nonce)
                w?.promise.succeed(())
                return w
            }.get()
        }
        let reply: Message
        do {
            reply = try await node.request(to: peer, command: CommandID.derive(from: KernelCommands.probe),
                                      payload: [.integer(Int64(bitPattern: nonce)), .integer(Int64(udpPort)), .integer(Int64(tcpPort))]).get()
        } catch {
            _ = await finish()
            throw error
        }
        if let error = RPCError.from(reply: reply) {
            _ = await finish()
            throw error
        }
        let late = eventLoop.scheduleTask(in: TimeAmount(grace)) { [self] in probes[nonce]?.promise.succeed(()) }
        try? await seen.get()
        late.cancel()
        let result = await finish()
        return (udpPort != 0 && result?.udp == true, tcpPort != 0 && result?.tcp == true, reply.firstPeers?.first)
    }

    /// Asks `peer` for the address it sees our UDP socket at.
    func observeUDP(via peer: PeerAddress, timeout: Duration? = nil) async throws -> PeerSocketAddress {
        let reply = try await node.request(to: peer, command: CommandID.derive(from: KernelCommands.observe), transport: .udp, timeout: timeout).get()
        if let error = RPCError.from(reply: reply) { throw error }
        guard let seen = reply.firstPeers?.first?.socket, seen.udpPort != 0 else {
            throw RPCError.malformedReply("observe reply without an address")
        }
        return seen
    }

    /// Asks the peer at `target` for the address it sees a TCP connection from our listen port
    /// at (see `ObservePacket`).
    func observeTCP(at target: PeerSocketAddress, timeout: Duration = .seconds(2)) async throws -> PeerSocketAddress {
        let nonce = max(1, random.next())
        let promise = Once(eventLoop.makePromise(of: PeerSocketAddress.self))
        let deadline = eventLoop.scheduleTask(in: TimeAmount(timeout)) {
            promise.fail(RPCError.timeout(peer: "\(target)", milliseconds: Int(timeout.components.seconds * 1000)))
        }
        defer { deadline.cancel() }
        let answers = RawFrames(maxFrame: 64) { frame in
            if let seen = ObservePacket.parseAnswer(frame, nonce: nonce) { promise.succeed(seen) } else {
                promise.fail(RPCError.malformedReply("observe answer"))
            }
        }
        let connection: any PeerConnection
        do {
            connection = try await eventLoop.flatSubmit { [self] in
                transport.connect(to: target.tcpEndpoint, timeout: TimeAmount(timeout), fromListenPort: true, raw: answers)
            }.get()
        } catch {
            throw RPCError.unreachable(peer: "\(target)", reason: "\(error)")
        }
        defer { connection.close() }
        var b = ByteBufferAllocator().buffer(capacity: 4 + ObservePacket.bytes)
        b.writeInteger(UInt32(ObservePacket.bytes))
        b.writeInteger(ObservePacket.kind)
        b.writeInteger(nonce)
        let written = eventLoop.makePromise(of: Void.self)
        connection.write(b, promise: written)
        try await written.futureResult.get()
        return try await promise.futureResult.get()
    }

    /// PROBE and OBSERVE packets (on the event loop); they need no session.
    func received(_ kind: PacketKind, _ buffer: ByteBuffer, remote: Endpoint, origin: Origin) {
        switch kind {
        case .probe:
            if let nonce = ProbePacket.decode(buffer), probes[nonce] != nil {
                if origin.kind == .udp { probes[nonce]?.udp = true } else { probes[nonce]?.tcp = true }
                if let w = probes[nonce], w.udp, w.tcp { w.promise.succeed(()) }
            } else {
                countDrop("probe from \(remote) with no probe-back waiting for it")
            }
            kernel.connections.closeIfStream(origin)
        case .observe:
            guard case .tcp(let connection) = origin, buffer.readableBytes == ObservePacket.bytes,
                  let nonce = buffer.getInteger(at: buffer.readerIndex + 1, as: UInt64.self),
                  let answer = ObservePacket.answer(nonce: nonce, seen: remote) else {
                countDrop("observe from \(remote) not on TCP or malformed")
                return kernel.connections.closeIfStream(origin)
            }
            let written = eventLoop.makePromise(of: Void.self)
            connection.write(answer, promise: written)
            written.futureResult.whenComplete { _ in connection.close() }
        default:
            countDrop("unexpected packet kind \(kind) from \(remote)")
            kernel.connections.closeIfStream(origin)
        }
    }
}

/// A probe-back waiting for its nonce: which transports have seen it.
struct ProbeWait {
    var udp: Bool
    var tcp: Bool
    let promise: EventLoopPromise<Void>
}

