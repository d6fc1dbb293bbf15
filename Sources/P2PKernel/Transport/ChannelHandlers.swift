import NIOCore

/// Hands every datagram to the node. Holds the node strongly until the channel closes.
final class UDPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    let node: Node

    init(node: Node) { self.node = node }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        node.received(envelope.data, from: envelope.remoteAddress, origin: .udp(envelope.remoteAddress))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A UDP socket reports ICMP errors and the like here; the affected request times out on
        // its own, and the socket stays open for everyone else.
        node.logger.trace("udp error", metadata: ["error": "\(error)"])
    }
}

/// Hands every TCP frame to the node; closes the connection when it has been idle too long or
/// broke a framing bound. On inbound connections it stops reading while the peer does not read
/// its replies, and starts again once the replies drain.
final class TCPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let node: Node
    let inbound: Bool

    init(node: Node, inbound: Bool) {
        self.node = node
        self.inbound = inbound
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let remote = context.remoteAddress else { return }
        node.received(unwrapInboundIn(data), from: remote, origin: .tcp(context.channel))
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if inbound {
            let writable = context.channel.isWritable
            context.channel.setOption(.autoRead, value: writable).whenFailure { _ in }
            // Frames held back while paused are still buffered in the decoder: a read of nothing
            // runs its loop again.
            if writable { context.pipeline.fireChannelRead(NIOAny(context.channel.allocator.buffer(capacity: 0))) }
        }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        node.logger.debug("closing tcp connection", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }
}
