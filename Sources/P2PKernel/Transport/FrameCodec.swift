import NIOCore

/// Splits a TCP byte stream into packets: each frame is a 4-byte big-endian length, then that
/// many bytes of one packet.
///
/// A frame still arriving holds its announced length against the node's budget of bytes in
/// partial frames (`NodeLimits.maxPartialFrameBytes`, over all connections) and must complete
/// within `NodeLimits.frameDeadline`; a length over the limit, an exhausted budget or a missed
/// deadline closes the connection. On inbound connections, frames are not handed on while the
/// connection cannot take more writes (the peer is not reading its replies): back-pressure.
struct FrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer

    /// The largest frame: a maximum-size message sealed in a FINISH.
    static let maxFrameBytes = WireLimits.maxMessageBytes + SessionWire.finishHeaderBytes + SessionWire.tagBytes

    let budget: PartialFrameBudget
    let frameDeadline: Duration
    let pauseWhenUnwritable: Bool
    /// Budget held for the frame in progress.
    private var reserved = 0
    private var deadline: Scheduled<Void>?

    init(budget: PartialFrameBudget, deadline: Duration, pauseWhenUnwritable: Bool) {
        self.budget = budget
        self.frameDeadline = deadline
        self.pauseWhenUnwritable = pauseWhenUnwritable
    }

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        if pauseWhenUnwritable, !context.channel.isWritable { return .needMoreData }
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        guard length <= FrameDecoder.maxFrameBytes else {
            throw WireError.limitExceeded(what: "TCP frame bytes", value: Int(length), limit: FrameDecoder.maxFrameBytes)
        }
        let total = 4 + Int(length)
        guard buffer.readableBytes >= total else {
            if reserved == 0 {
                guard budget.reserve(total) else {
                    throw WireError.limitExceeded(what: "bytes held in partial TCP frames", value: budget.held + total, limit: budget.limit)
                }
                reserved = total
                let channel = context.channel
                deadline = context.eventLoop.scheduleTask(in: TimeAmount(frameDeadline)) {
                    channel.close(promise: nil)
                }
            }
            return .needMoreData
        }
        release()
        buffer.moveReaderIndex(forwardBy: 4)
        guard let frame = buffer.readSlice(length: Int(length)) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(frame))
        return .continue
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        release()
        return .needMoreData
    }

    mutating func decoderRemoved(context: ChannelHandlerContext) {
        release()
    }

    private mutating func release() {
        if reserved > 0 {
            budget.release(reserved)
            reserved = 0
        }
        deadline?.cancel()
        deadline = nil
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
