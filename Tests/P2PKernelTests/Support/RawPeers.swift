import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
@testable import P2PKernel

/// A UDP socket on loopback that sends any bytes and hands over whatever arrives.
final class RawSocket: @unchecked Sendable {
    let channel: any Channel
    let port: UInt16
    private let inbox: Inbox

    /// Datagrams received and not yet taken, and tasks waiting for more.
    final class Inbox: @unchecked Sendable {
        struct State {
            var queue: [(SocketAddress, [UInt8])] = []
            var arrivals = 0
            var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
            var nextWaiter = 0
        }
        let state = NIOLockedValueBox(State())

        func arrived(_ from: SocketAddress, _ bytes: [UInt8]) {
            let waiting = state.withLockedValue { s in
                s.queue.append((from, bytes))
                s.arrivals += 1
                defer { s.waiters.removeAll() }
                return Array(s.waiters.values)
            }
            for w in waiting { w.resume() }
        }
    }

    private final class Collector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = AddressedEnvelope<ByteBuffer>
        let inbox: Inbox
        init(_ inbox: Inbox) { self.inbox = inbox }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let e = unwrapInboundIn(data)
            inbox.arrived(e.remoteAddress, Array(e.data.readableBytesView))
        }
    }

    init() async throws {
        let inbox = Inbox()
        self.inbox = inbox
        channel = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(Collector(inbox)) } }
            .bind(host: "127.0.0.1", port: 0).get()
        port = UInt16(channel.localAddress?.port ?? 0)
    }

    var address: PeerSocketAddress { PeerSocketAddress(ip: .loopback, port: port) }

    func send(_ bytes: [UInt8], to target: PeerSocketAddress) async throws {
        var buffer = channel.allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        try await channel.writeAndFlush(AddressedEnvelope(remoteAddress: target.udpSocketAddress, data: buffer)).get()
    }

    /// Takes the first datagram received that satisfies `match` (earlier ones that do not stay
    /// queued), waiting up to `timeout` (generous: the machine may be busy); nil if none came.
    func next(within timeout: Duration = .seconds(10), where match: @escaping @Sendable ([UInt8]) -> Bool = { _ in true }) async -> [UInt8]? {
        let deadline = NIODeadline.now() + .nanoseconds(timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000)
        while true {
            let (found, seen): ([UInt8]?, Int) = inbox.state.withLockedValue { s in
                guard let i = s.queue.firstIndex(where: { match($0.1) }) else { return (nil, s.arrivals) }
                return (s.queue.remove(at: i).1, s.arrivals)
            }
            if let found { return found }
            guard NIODeadline.now() < deadline else { return nil }
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let id: Int? = inbox.state.withLockedValue { s in
                    guard s.arrivals == seen else { return nil }  // something came meanwhile: look again
                    s.nextWaiter += 1
                    s.waiters[s.nextWaiter] = c
                    return s.nextWaiter
                }
                guard let id else { return c.resume() }
                channel.eventLoop.scheduleTask(deadline: deadline) { [inbox] in
                    inbox.state.withLockedValue { $0.waiters.removeValue(forKey: id) }?.resume()
                }
            }
        }
    }

    func close() async { try? await channel.close() }
}

/// A peer with a valid identity of its own that speaks the session protocol by hand, from a raw
/// socket, using the kernel's own handshake and sealing code: it can then say anything a real
/// peer could, and things no honest one would.
final class HostilePeer: @unchecked Sendable {
    let keys: PeerKeyPair
    let socket: RawSocket
    let network: UInt32
    var id: Number160 { keys.peerID }
    private let state = NIOLockedValueBox<(session: Session, finish: [UInt8]?)?>(nil)

    init(keys: PeerKeyPair = PeerKeyPair(), network: UInt32 = 1) async throws {
        self.keys = keys
        self.network = network
        self.socket = try await RawSocket()
    }

    /// How this peer presents itself: its socket, with the ports it announces.
    var address: PeerAddress { PeerAddress(id: id, socket: socket.address) }

    /// Runs INIT and RESPONSE with the node at `target`; the session is then ready to seal in
    /// (its first packets carry the FINISH).
    func handshake(with target: PeerSocketAddress, expecting: Number160 = .zero) async throws {
        let index = UInt64.random(in: 1...UInt64.max)
        let initiator = InitiatorHandshake(network: network, index: index, expected: expecting)
        try await socket.send(initiator.initPacket, to: target)
        guard let bytes = await socket.next(where: { $0.first == PacketKind.handshakeResponse.rawValue }),
              case .handshakeResponse(let r) = try SessionCodec.decode(bytes) else {
            throw RPCError.timeout(peer: "\(target)", milliseconds: 10_000)
        }
        let (session, prefix) = try initiator.complete(r, network: network, identity: keys, now: 0)
        state.withLockedValue { $0 = (session, prefix) }
    }

    /// A message as this peer would send it, claiming whatever sender it likes.
    func message(id messageID: UInt32 = .random(in: 1...UInt32.max), type: MessageType = .request, command: String, claiming sender: Number160? = nil,
                 recipient: Number160 = .zero, payload: [Payload] = []) -> Message {
        Message(networkID: network, id: messageID, type: type, command: CommandID.derive(from: command),
                sender: PeerAddress(id: sender ?? id, socket: socket.address), recipientID: recipient, payload: payload)
    }

    /// The message sealed in this peer's session (a FINISH until the node has answered in it).
    func seal(_ m: Message) throws -> [UInt8] {
        var plain = ByteBufferAllocator().buffer(capacity: 0)
        plain.writeBytes(try WireCodec.encode(m))
        return try state.withLockedValue { s in
            guard var (session, finish) = s else { throw RPCError.shutDown }
            var out = ByteBufferAllocator().buffer(capacity: Session.sealedSize(plain.readableBytes, finish: finish != nil))
            guard session.seal(plain, transport: .udp, finishPrefix: finish, into: &out) else { throw RPCError.shutDown }
            s = (session, finish)
            return Array(out.readableBytesView)
        }
    }

    /// Opens a sealed packet from the node; nil if it is not one or does not open.
    func open(_ bytes: [UInt8]) -> Message? {
        guard case .sealed(let h)? = try? SessionCodec.decode(bytes) else { return nil }
        return state.withLockedValue { s -> Message? in
            guard var (session, _) = s else { return nil }
            var plain = [UInt8](repeating: 0, count: bytes.count)
            var window = session.udpWindow
            let length = bytes.withUnsafeBytes { raw in
                plain.withUnsafeMutableBytes {
                    try? session.open(raw, headerBytes: SessionWire.sealedHeaderBytes, counter: h.counter, transport: .udp, window: &window, into: $0)
                }
            }
            guard let length else { return nil }
            session.udpWindow = window
            s = (session, nil)  // the node answered in the session: no more FINISH
            return try? WireCodec.decode(Array(plain.prefix(length)), senderIP: .loopback)
        }
    }

    /// Seals and sends; with `awaitReply`, the node's sealed answer to it.
    @discardableResult
    func send(_ m: Message, to target: PeerSocketAddress, awaitReply: Bool = false, within: Duration = .seconds(10)) async throws -> Message? {
        try await socket.send(try seal(m), to: target)
        guard awaitReply else { return nil }
        let deadline = ContinuousClock.now + within
        while ContinuousClock.now < deadline {
            guard let bytes = await socket.next(within: deadline - ContinuousClock.now, where: { $0.first == PacketKind.sealed.rawValue }) else { return nil }
            if let reply = open(bytes), reply.id == m.id { return reply }
        }
        return nil
    }

    func close() async { await socket.close() }
}

/// A UDP man in the middle: a client sends to `address`, the relay forwards to the target and
/// the target's answers back. Every datagram is recorded, and `policy` may drop or repeat it.
final class UDPRelay: @unchecked Sendable {
    enum Direction: Sendable { case toTarget, toClient }
    enum Action: Sendable { case forward, drop, duplicate }

    let front: any Channel
    let back: any Channel
    let target: SocketAddress
    let recorded = NIOLockedValueBox<[(Direction, [UInt8])]>([])
    private let client = NIOLockedValueBox<SocketAddress?>(nil)

    private final class Handler: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = AddressedEnvelope<ByteBuffer>
        let onRead: @Sendable (SocketAddress, ByteBuffer) -> Void
        init(_ onRead: @escaping @Sendable (SocketAddress, ByteBuffer) -> Void) { self.onRead = onRead }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let e = unwrapInboundIn(data)
            onRead(e.remoteAddress, e.data)
        }
    }

    init(to target: PeerSocketAddress, policy: @escaping @Sendable (Direction, [UInt8]) -> Action = { _, _ in .forward }) async throws {
        self.target = target.udpSocketAddress
        let box = NIOLockedValueBox<(any Channel, any Channel)?>(nil)
        let recorded = self.recorded, client = self.client, targetAddress = self.target
        @Sendable func forward(_ direction: Direction, _ data: ByteBuffer) {
            let bytes = Array(data.readableBytesView)
            recorded.withLockedValue { $0.append((direction, bytes)) }
            guard let (front, back) = box.withLockedValue({ $0 }) else { return }
            let action = policy(direction, bytes)
            guard action != .drop else { return }
            let (channel, to): (any Channel, SocketAddress?) = direction == .toTarget ? (back, targetAddress) : (front, client.withLockedValue { $0 })
            guard let to else { return }
            for _ in 0..<(action == .duplicate ? 2 : 1) { channel.writeAndFlush(AddressedEnvelope(remoteAddress: to, data: data), promise: nil) }
        }
        front = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture {
                try ch.pipeline.syncOperations.addHandler(Handler { from, data in
                    client.withLockedValue { $0 = from }
                    forward(.toTarget, data)
                })
            } }
            .bind(host: "127.0.0.1", port: 0).get()
        back = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture {
                try ch.pipeline.syncOperations.addHandler(Handler { _, data in forward(.toClient, data) })
            } }
            .bind(host: "127.0.0.1", port: 0).get()
        box.withLockedValue { $0 = (front, back) }
    }

    /// Where clients send.
    var address: PeerSocketAddress { PeerSocketAddress(ip: .loopback, port: UInt16(front.localAddress?.port ?? 0)) }

    /// Sends a recorded datagram to the target again, from the relay's side facing it.
    func replay(_ bytes: [UInt8]) async throws {
        var buffer = back.allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        try await back.writeAndFlush(AddressedEnvelope(remoteAddress: target, data: buffer)).get()
    }

    func close() async {
        try? await front.close()
        try? await back.close()
    }
}

/// A command that counts how often it ran and echoes its bytes.
final class CountingEcho: CommandHandler, @unchecked Sendable {
    let name = "test.count"
    let calls = NIOLockedValueBox(0)
    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        calls.withLockedValue { $0 += 1 }
        return .reply(Reply(payload: request.payload))
    }
}

extension Node {
    /// Runs `body` on the node's event loop (tests reading loop-confined state).
    func onLoop<T: Sendable>(_ body: @escaping @Sendable () -> T) async throws -> T {
        try await eventLoop.submit(body).get()
    }
}
