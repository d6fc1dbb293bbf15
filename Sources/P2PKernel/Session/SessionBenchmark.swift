import NIOCore

/// Measurements of the session layer's own costs, in this process, on one core (for
/// `p2p bench session`): whole handshakes, and sealing plus opening one message.
public enum SessionBenchmark {
    /// Complete handshakes per second (both sides' work: INIT, RESPONSE, FINISH, keys), with the
    /// packets encoded and decoded as on the wire.
    public static func handshakesPerSecond(for duration: Duration) throws -> Double {
        let a = PeerKeyPair(), b = PeerKeyPair()
        let responder = HandshakeResponder(identity: b, network: 1, random: RandomSource())
        let clock = ContinuousClock()
        let start = clock.now
        var done = 0
        var index: UInt64 = 1
        repeat {
            index &+= 1
            let initiator = InitiatorHandshake(network: 1, index: index, expected: b.peerID, random: RandomSource())
            guard case .handshakeInit(let i) = try SessionCodec.decode(initiator.initPacket) else { throw HandshakeError.badKey }
            let response = SessionCodec.encode(try responder.respond(to: i, from: .loopback, now: 1))
            guard case .handshakeResponse(let r) = try SessionCodec.decode(response) else { throw HandshakeError.badKey }
            var (mine, prefix) = try initiator.complete(r, network: 1, identity: a, now: 0)
            var packet = ByteBufferAllocator().buffer(capacity: 256)
            guard mine.seal(ByteBuffer(), transport: .udp, finishPrefix: prefix, into: &packet) else { throw OpenError.authenticationFailed }
            let bytes = Array(packet.readableBytesView)
            guard case .handshakeFinish(let f, let offset) = try SessionCodec.decode(bytes) else { throw HandshakeError.badKey }
            var theirs = try responder.accept(f, from: .loopback, now: 1, seconds: 0)
            var out = [UInt8](repeating: 0, count: 64)
            _ = try bytes.withUnsafeBytes { raw in
                try out.withUnsafeMutableBytes {
                    try theirs.open(raw, headerBytes: offset, counter: f.counter, transport: .udp, window: &theirs.udpWindow, into: $0)
                }
            }
            done += 1
        } while clock.now - start < duration
        return Double(done) / (clock.now - start).seconds
    }

    /// Messages of `bytes` sealed and opened per second, and the bytes sealing adds to each.
    public static func sealOpenPerSecond(messageBytes bytes: Int, for duration: Duration) throws -> (perSecond: Double, overhead: Int) {
        let a = PeerKeyPair(), b = PeerKeyPair()
        let responder = HandshakeResponder(identity: b, network: 1, random: RandomSource())
        let initiator = InitiatorHandshake(network: 1, index: 7, expected: .zero, random: RandomSource())
        guard case .handshakeInit(let i) = try SessionCodec.decode(initiator.initPacket) else { throw HandshakeError.badKey }
        let r = try responder.respond(to: i, from: .loopback, now: 1)
        var (sender, prefix) = try initiator.complete(r, network: 1, identity: a, now: 0)
        var first = ByteBufferAllocator().buffer(capacity: 256)
        guard sender.seal(ByteBuffer(), transport: .udp, finishPrefix: prefix, into: &first) else { throw OpenError.authenticationFailed }
        let firstBytes = Array(first.readableBytesView)
        guard case .handshakeFinish(let f, _) = try SessionCodec.decode(firstBytes) else { throw HandshakeError.badKey }
        var receiver = try responder.accept(f, from: .loopback, now: 1, seconds: 0)
        var plain = ByteBufferAllocator().buffer(capacity: bytes)
        plain.writeRepeatingByte(0x5A, count: bytes)
        var opened = [UInt8](repeating: 0, count: bytes + 64)
        let clock = ContinuousClock()
        let start = clock.now
        var done = 0
        var overhead = 0
        repeat {
            for _ in 0..<1_000 {
                var out = ByteBufferAllocator().buffer(capacity: Session.sealedSize(bytes, finish: false))
                guard sender.seal(plain, transport: .udp, into: &out) else { throw OpenError.authenticationFailed }
                overhead = out.readableBytes - bytes
                let counter = out.getInteger(at: out.readerIndex + 9, as: UInt64.self) ?? 0
                let length = try out.withUnsafeReadableBytes { raw in
                    try opened.withUnsafeMutableBytes {
                        try receiver.open(raw, headerBytes: SessionWire.sealedHeaderBytes, counter: counter, transport: .udp,
                                          window: &receiver.udpWindow, into: $0)
                    }
                }
                guard length == bytes else { throw OpenError.authenticationFailed }
            }
            done += 1_000
        } while clock.now - start < duration
        return (Double(done) / (clock.now - start).seconds, overhead)
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
