import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
@testable import P2PKernel

/// A peer with valid identities of its own that speaks the session protocol by hand from one raw
/// UDP socket, built from the kernel's own handshake and sealing code: it can say anything a real
/// peer could, and things no honest one would.
///
/// It initiates handshakes (as any of its identities) and answers them (as the identity an INIT
/// asks for), opens what arrives, hands requests to `serve`'s handler and replies to waiting
/// `send(…, awaitReply:)` calls. Everything runs on its channel's event loop under one lock.
final class HostilePeer: @unchecked Sendable {
    let network: UInt32
    let channel: any Channel
    /// The first identity: the one used unless another is named.
    let keys: PeerKeyPair
    var id: Number160 { keys.peerID }
    var socket: HostilePeer { self }

    typealias Handler = @Sendable (_ request: Message, _ as: Number160) -> [Payload]?

    private struct Live {
        var session: Session
        var finish: [UInt8]?
        let identity: Number160
        let remote: SocketAddress
    }
    private struct State {
        var identities: [Number160: PeerKeyPair] = [:]
        var order: [Number160] = []
        var replyPorts: (UInt16, UInt16)?
        var responders: [Number160: HandshakeResponder] = [:]
        var sessions: [UInt64: Live] = [:]
        var byIdentity: [Number160: UInt64] = [:]
        var initiating: [UInt64: (InitiatorHandshake, PeerKeyPair, CheckedContinuation<UInt64?, Never>)] = [:]
        var replies: [UInt32: CheckedContinuation<Message?, Never>] = [:]
        var handler: Handler?
        var raw: [[UInt8]] = []
        var handshakesAnswered = 0
    }
    private let state = NIOLockedValueBox(State())

    private final class Inbound: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = AddressedEnvelope<ByteBuffer>
        weak var peer: HostilePeer?
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let e = unwrapInboundIn(data)
            peer?.received(Array(e.data.readableBytesView), from: e.remoteAddress)
        }
    }

    /// On loopback, or on a socket already bound elsewhere (a network namespace).
    init(keys: PeerKeyPair = PeerKeyPair(), network: UInt32 = 1, boundSocket: NIOBSDSocket.Handle? = nil) async throws {
        self.keys = keys
        self.network = network
        let inbound = Inbound()
        let bootstrap = DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(inbound) } }
        if let boundSocket {
            channel = try await bootstrap.withBoundSocket(boundSocket).get()
        } else {
            channel = try await bootstrap.bind(host: "127.0.0.1", port: 0).get()
        }
        inbound.peer = self
        addIdentity(keys)
    }

    @discardableResult
    func addIdentity(_ k: PeerKeyPair) -> Number160 {
        state.withLockedValue { s in
            if s.identities[k.peerID] == nil { s.order.append(k.peerID) }
            s.identities[k.peerID] = k
            s.responders[k.peerID] = HandshakeResponder(identity: k, network: network, random: RandomSource())
        }
        return k.peerID
    }

    /// Every identity, the first one first.
    var allIdentities: [Number160] { state.withLockedValue { $0.order } }

    /// Ports the replies' headers announce instead of the socket's (0 for the port-0 attacks).
    var replyPorts: (tcp: UInt16, udp: UInt16)? {
        get { state.withLockedValue { $0.replyPorts.map { (tcp: $0.0, udp: $0.1) } } }
        set { state.withLockedValue { $0.replyPorts = newValue.map { ($0.tcp, $0.udp) } } }
    }

    var identityCount: Int { state.withLockedValue { $0.identities.count } }
    var handshakesAnswered: Int { state.withLockedValue { $0.handshakesAnswered } }

    /// Where this peer listens, and how it presents itself.
    var address: PeerSocketAddress {
        let a = channel.localAddress
        return PeerSocketAddress(ip: a.flatMap(IPAddress.init) ?? .loopback, port: UInt16(a?.port ?? 0))
    }
    var peerAddress: PeerAddress { PeerAddress(id: id, socket: address) }

    /// Answers requests from now on: `handler` gives a reply payload (nil: no reply).
    func serve(_ handler: @escaping Handler) {
        state.withLockedValue { $0.handler = handler }
    }

    // MARK: sending

    func send(_ bytes: [UInt8], to target: PeerSocketAddress) async throws {
        var buffer = channel.allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        try await channel.writeAndFlush(AddressedEnvelope(remoteAddress: target.udpSocketAddress, data: buffer)).get()
    }

    /// Runs INIT and RESPONSE with the node at `target` as `identity`; afterwards messages to it
    /// are sealed in that session.
    func handshake(with target: PeerSocketAddress, expecting: Number160 = .zero, as identity: Number160? = nil,
                   within timeout: Duration = .seconds(10)) async throws {
        let who = identity ?? id
        guard let k = state.withLockedValue({ $0.identities[who] }) else { throw RPCError.shutDown }
        let index = UInt64.random(in: 1...UInt64.max)
        let initiator = InitiatorHandshake(network: network, index: index, expected: expecting, random: RandomSource())
        let done: UInt64? = await withCheckedContinuation { c in
            state.withLockedValue { $0.initiating[index] = (initiator, k, c) }
            channel.eventLoop.scheduleTask(in: HostilePeer.nanoseconds(timeout)) { [state] in
                state.withLockedValue { $0.initiating.removeValue(forKey: index) }?.2.resume(returning: nil)
            }
            Task { try? await self.send(initiator.initPacket, to: target) }
        }
        guard done != nil else { throw RPCError.timeout(peer: "\(target)", milliseconds: Int(timeout.components.seconds) * 1000) }
    }

    /// A message as this peer would send it, claiming whatever sender it likes.
    func message(id messageID: UInt32 = .random(in: 1...UInt32.max), type: MessageType = .request, command: String, claiming sender: Number160? = nil,
                 as identity: Number160? = nil, ports: (tcp: UInt16, udp: UInt16)? = nil, recipient: Number160 = .zero, payload: [Payload] = []) -> Message {
        let a = address
        let socket = ports.map { PeerSocketAddress(ip: a.ip, tcpPort: $0.tcp, udpPort: $0.udp) } ?? a
        return Message(networkID: network, id: messageID, type: type, command: CommandID.derive(from: command),
                       sender: PeerAddress(id: sender ?? identity ?? id, socket: socket), recipientID: recipient, payload: payload)
    }

    /// The message sealed in the session of `identity` (the one it claims, unless named), for
    /// `transport` (a TCP frame body is the same packet, behind its length).
    func seal(_ m: Message, as identity: Number160? = nil, transport: TransportKind = .udp) throws -> [UInt8] {
        var plain = ByteBufferAllocator().buffer(capacity: 0)
        plain.writeBytes(try WireCodec.encode(m))
        let who = identity ?? (state.withLockedValue { $0.byIdentity[m.sender.id] } != nil ? m.sender.id : id)
        return try state.withLockedValue { s in
            guard let index = s.byIdentity[who], var live = s.sessions[index] else { throw RPCError.shutDown }
            var out = ByteBufferAllocator().buffer(capacity: Session.sealedSize(plain.readableBytes, finish: live.finish != nil))
            guard live.session.seal(plain, transport: transport, finishPrefix: live.finish, into: &out) else { throw RPCError.shutDown }
            s.sessions[index] = live
            return Array(out.readableBytesView)
        }
    }

    /// Seals and sends; with `awaitReply`, the node's answer (nil if none came in time).
    @discardableResult
    func send(_ m: Message, to target: PeerSocketAddress, as identity: Number160? = nil, awaitReply: Bool = false,
              within timeout: Duration = .seconds(10)) async throws -> Message? {
        let packet = try seal(m, as: identity)
        guard awaitReply else {
            try await send(packet, to: target)
            return nil
        }
        return await withCheckedContinuation { (c: CheckedContinuation<Message?, Never>) in
            state.withLockedValue { $0.replies[m.id] = c }
            channel.eventLoop.scheduleTask(in: HostilePeer.nanoseconds(timeout)) { [state] in
                state.withLockedValue { $0.replies.removeValue(forKey: m.id) }?.resume(returning: nil)
            }
            Task { try? await self.send(packet, to: target) }
        }
    }

    /// Raw datagrams received that were not session traffic this peer understood.
    var rawReceived: [[UInt8]] { state.withLockedValue { $0.raw } }

    /// The next raw datagram received (taken from the queue), waiting up to `within`.
    func nextRaw(within timeout: Duration = .seconds(10)) async -> [UInt8]? {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let first = state.withLockedValue({ s -> [UInt8]? in s.raw.isEmpty ? nil : s.raw.removeFirst() }) { return first }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return nil
    }

    func close() async { try? await channel.close() }

    static func nanoseconds(_ d: Duration) -> TimeAmount {
        .nanoseconds(d.components.seconds * 1_000_000_000 + d.components.attoseconds / 1_000_000_000)
    }

    // MARK: receiving (on the channel's event loop)

    private func received(_ bytes: [UInt8], from remote: SocketAddress) {
        guard let first = bytes.first, first != PacketKind.plaintext.rawValue, let packet = try? SessionCodec.decode(bytes) else {
            state.withLockedValue { if $0.raw.count < 10_000 { $0.raw.append(bytes) } }
            return
        }
        switch packet {
        case .handshakeInit(let i):
            let response: [UInt8]? = state.withLockedValue { s in
                let who = i.responderHint == .zero ? id : i.responderHint
                guard let responder = s.responders[who], let r = try? responder.respond(to: i, from: IPAddress(remote) ?? .loopback, now: NIODeadline.now().uptimeNanoseconds) else { return nil }
                s.handshakesAnswered += 1
                return SessionCodec.encode(r)
            }
            if let response { reply(response, to: remote) }
        case .handshakeResponse(let r):
            let done: (CheckedContinuation<UInt64?, Never>)? = state.withLockedValue { s in
                guard let (initiator, k, c) = s.initiating.removeValue(forKey: r.initiatorIndex),
                      let (session, prefix) = try? initiator.complete(r, network: network, identity: k, now: 0) else { return nil }
                s.sessions[session.localIndex] = Live(session: session, finish: prefix, identity: k.peerID, remote: remote)
                s.byIdentity[k.peerID] = session.localIndex
                c.resume(returning: session.localIndex)
                return nil
            }
            _ = done
        case .handshakeFinish(let f, let offset):
            let opened: (Message, Number160, UInt64)? = state.withLockedValue { s in
                if s.sessions[f.responderIndex] == nil {
                    for (who, responder) in s.responders {
                        guard let session = try? responder.accept(f, from: IPAddress(remote) ?? .loopback, now: NIODeadline.now().uptimeNanoseconds, seconds: 0) else { continue }
                        s.sessions[session.localIndex] = Live(session: session, finish: nil, identity: who, remote: remote)
                        break
                    }
                }
                return open(&s, bytes, index: f.responderIndex, headerBytes: offset, counter: f.counter)
            }
            if let (m, who, index) = opened { handle(m, as: who, index: index, from: remote) }
        case .sealed(let h):
            let opened = state.withLockedValue { s in open(&s, bytes, index: h.receiverIndex, headerBytes: SessionWire.sealedHeaderBytes, counter: h.counter) }
            if let (m, who, index) = opened { handle(m, as: who, index: index, from: remote) }
        case .sessionUnknown, .refused:
            state.withLockedValue { if $0.raw.count < 10_000 { $0.raw.append(bytes) } }
        }
    }

    private func open(_ s: inout State, _ bytes: [UInt8], index: UInt64, headerBytes: Int, counter: UInt64) -> (Message, Number160, UInt64)? {
        guard var live = s.sessions[index] else { return nil }
        var out = [UInt8](repeating: 0, count: bytes.count)
        var window = live.session.udpWindow
        let session = live.session
        let n = bytes.withUnsafeBytes { raw in
            out.withUnsafeMutableBytes { try? session.open(raw, headerBytes: headerBytes, counter: counter, transport: .udp, window: &window, into: $0) }
        }
        live.session.udpWindow = window
        guard let n, let m = try? WireCodec.decode(Array(out.prefix(n)), senderIP: .loopback) else { return nil }
        if headerBytes == SessionWire.sealedHeaderBytes { live.finish = nil }
        s.sessions[index] = live
        return (m, live.identity, index)
    }

    private func handle(_ m: Message, as who: Number160, index: UInt64, from remote: SocketAddress) {
        if m.type.isReply {
            state.withLockedValue { $0.replies.removeValue(forKey: m.id) }?.resume(returning: m)
            return
        }
        guard m.type == .request, let handler = state.withLockedValue({ $0.handler }), let payload = handler(m, who) else { return }
        let a = address
        let ports = state.withLockedValue { $0.replyPorts }
        let socket = ports.map { PeerSocketAddress(ip: a.ip, tcpPort: $0.0, udpPort: $0.1) } ?? a
        let answer = Message(networkID: network, id: m.id, type: .ok, command: m.command, sender: PeerAddress(id: who, socket: socket),
                             recipientID: m.sender.id, payload: payload)
        guard let plain = try? WireCodec.encode(answer) else { return }
        let packet: [UInt8]? = state.withLockedValue { s in
            guard var live = s.sessions[index] else { return nil }
            var buffer = ByteBufferAllocator().buffer(capacity: plain.count)
            buffer.writeBytes(plain)
            var out = ByteBufferAllocator().buffer(capacity: plain.count + 200)
            guard live.session.seal(buffer, transport: .udp, finishPrefix: live.finish, into: &out) else { return nil }
            s.sessions[index] = live
            return Array(out.readableBytesView)
        }
        if let packet { reply(packet, to: remote) }
    }

    private func reply(_ bytes: [UInt8], to remote: SocketAddress) {
        var buffer = channel.allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        channel.writeAndFlush(AddressedEnvelope(remoteAddress: remote, data: buffer), promise: nil)
    }
}
