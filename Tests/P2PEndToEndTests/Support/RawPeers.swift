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
