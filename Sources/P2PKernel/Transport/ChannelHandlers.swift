import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Hands every datagram of one socket to the transport. Holds the transport strongly until the
/// channel closes.
final class UDPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    let socket: ChannelDatagramSocket
    let transport: SocketTransport

    init(socket: ChannelDatagramSocket, transport: SocketTransport) {
        self.socket = socket
        self.transport = transport
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        transport.deliver(datagram: envelope.data, from: envelope.remoteAddress, on: socket)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A UDP socket reports ICMP errors and the like here; the affected request times out on
        // its own, and the socket stays open for everyone else.
        transport.logger.trace("udp error", metadata: ["error": "\(error)"])
    }
}

/// Pauses accepting connections for a moment when `accept` fails for lack of descriptors or
/// memory, instead of trying again at once.
///
/// NIO's own `AcceptBackoffHandler` is not enough on Linux: after such an error the listening
/// socket stays registered for readability, so level-triggered epoll wakes the loop again at once
/// and it spins a core. Turning `autoRead` off unregisters the socket until the pause ends.
final class AcceptThrottle: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = any Channel
    typealias InboundOut = any Channel
    let pause: TimeAmount
    private var paused = false

    init(pause: TimeAmount) { self.pause = pause }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.fireChannelRead(data)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let io = error as? IOError, [EMFILE, ENFILE, ENOBUFS, ENOMEM].contains(io.errnoCode) else {
            context.fireErrorCaught(error)
            return
        }
        guard !paused, let options = context.channel.syncOptions else { return }
        paused = true
        try? options.setOption(.autoRead, value: false)
        let channel = context.channel
        context.eventLoop.scheduleTask(in: pause) { [self] in
            paused = false
            try? channel.syncOptions?.setOption(.autoRead, value: true)
        }
    }
}

/// Hands every TCP frame to the transport; closes the connection when it has been idle too long
/// or broke a framing bound. On inbound connections it stops reading while the peer does not read
/// its replies, and starts again once the replies drain.
final class TCPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let connection: ChannelConnection
    let transport: SocketTransport
    let inbound: Bool

    init(connection: ChannelConnection, transport: SocketTransport, inbound: Bool) {
        self.connection = connection
        self.transport = transport
        self.inbound = inbound
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        transport.deliver(frame: unwrapInboundIn(data), on: connection)
    }

    /// Closes the connection if it stays unable to take writes this long (set while paused).
    private var stalled: Scheduled<Void>?

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if inbound {
            let writable = context.channel.isWritable
            context.channel.setOption(.autoRead, value: writable).whenFailure { _ in }
            stalled?.cancel()
            stalled = nil
            if writable {
                // Frames held back while paused are still buffered in the decoder: a read of
                // nothing runs its loop again.
                context.pipeline.fireChannelRead(NIOAny(context.channel.allocator.buffer(capacity: 0)))
            } else {
                // A peer that does not read its replies for long is gone or hostile: close.
                let channel = context.channel
                stalled = context.eventLoop.scheduleTask(in: TimeAmount(transport.stalledWriteTimeout)) {
                    channel.close(promise: nil)
                }
            }
        }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        stalled?.cancel()
        stalled = nil
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            // A direct path to a relayed peer is kept (pinged); any other idle connection closes.
            transport.idle(connection)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        transport.logger.debug("closing tcp connection", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }
}

/// Length-prefixed frames of at most `max` bytes (a longer one closes the connection): for the
/// few small unauthenticated exchanges of NAT traversal.
struct SmallFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer
    let max: Int
    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        guard length <= max else { throw RPCError.malformedReply("frame of \(length) bytes, more than \(max)") }
        guard buffer.readableBytes >= 4 + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 4)
        guard let frame = buffer.readSlice(length: Int(length)) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(frame))
        return .continue
    }
}

/// Hands each inbound frame to a closure.
final class FrameCatcher: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let onFrame: @Sendable (ByteBuffer) -> Void
    init(_ onFrame: @escaping @Sendable (ByteBuffer) -> Void) { self.onFrame = onFrame }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { onFrame(unwrapInboundIn(data)) }
    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}
