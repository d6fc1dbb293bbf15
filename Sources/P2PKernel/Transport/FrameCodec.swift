import NIOCore

/// Splits a TCP byte stream into messages: each frame is a 4-byte big-endian length, then that
/// many bytes of one message. A length over `WireLimits.maxMessageBytes` closes the connection
/// before any of it is buffered.
struct FrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        guard length <= WireLimits.maxMessageBytes else {
            throw WireError.limitExceeded(what: "TCP frame bytes", value: Int(length), limit: WireLimits.maxMessageBytes)
        }
        guard buffer.readableBytes >= 4 + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 4)
        guard let frame = buffer.readSlice(length: Int(length)) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(frame))
        return .continue
    }
}

extension ByteBuffer {
    /// Writes an encoded message; with `framed`, preceded by its 4-byte length (TCP).
    mutating func writeMessage(_ m: Message, size: Int, framed: Bool) {
        if framed { writeInteger(UInt32(size)) }
        writeWithUnsafeMutableBytes(minimumWritableBytes: size) { raw in
            var w = ByteWriter(raw)
            WireCodec.write(m, into: &w)
            return w.offset
        }
    }
}
