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
/// sent a frame over the size limit.
final class TCPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let node: Node

    init(node: Node) { self.node = node }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let remote = context.remoteAddress else { return }
        node.received(unwrapInboundIn(data), from: remote, origin: .tcp(context.channel))
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
