import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
@testable import P2PPortMapping
import P2PAddress

/// PCP falling back to NAT-PMP, against a gateway that speaks only NAT-PMP: a scripted responder
/// on a loopback address (miniupnpd, in the NAT lab, always speaks PCP as well). It answers PCP
/// with "unsupported version" as RFC 6887 §9 has a NAT-PMP server do, drops the first mapping
/// request it gets (RFC 6886's retransmission must recover), and can refuse, garble or stay silent.
@Suite("Gateway fallback to NAT-PMP", .serialized)
struct GatewayFallbackTests {
    enum Behaviour: Sendable { case natPMPOnly, refuse, garble, silent }

    /// A NAT-PMP-only gateway on 127.0.0.9:5351; records the version byte of every request.
    final class FakeGateway: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = AddressedEnvelope<ByteBuffer>
        let behaviour: Behaviour
        let seen = NIOLockedValueBox<[UInt8]>([])
        private var droppedOne = false
        init(_ behaviour: Behaviour) { self.behaviour = behaviour }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let envelope = unwrapInboundIn(data)
            let request = Array(envelope.data.readableBytesView)
            guard request.count >= 2 else { return }
            seen.withLockedValue { $0.append(request[0]) }
            var answer: [UInt8]
            switch (behaviour, request[0], request[1]) {
            case (.silent, _, _):
                return
            case (_, 2, let op):
                // PCP: "unsupported version", in NAT-PMP's format (version 0).
                answer = [0, 128 &+ op, 0, 1, 0, 0, 0, 42]
            case (.garble, 0, _):
                answer = [0, 99, 0]
            case (.refuse, 0, let op):
                answer = [0, 128 &+ op, 0, 2, 0, 0, 0, 42]
            case (_, 0, 0):
                answer = [0, 128, 0, 0, 0, 0, 0, 42, 203, 0, 113, 77]
            case (_, 0, let op) where (op == 1 || op == 2) && request.count >= 12:
                if !droppedOne {
                    droppedOne = true
                    return
                }
                // Internal port as asked, external port 40000 + op, the lifetime asked.
                answer = [0, 128 + op, 0, 0, 0, 0, 0, 42] + Array(request[4..<6]) + [0x9C, 0x40 + op] + Array(request[8..<12])
            default:
                return
            }
            var b = context.channel.allocator.buffer(capacity: answer.count)
            b.writeBytes(answer)
            context.writeAndFlush(wrapOutboundOut(AddressedEnvelope(remoteAddress: envelope.remoteAddress, data: b)), promise: nil)
        }
        typealias OutboundOut = AddressedEnvelope<ByteBuffer>
    }

    static func withGateway<T>(_ behaviour: Behaviour, _ body: (FakeGateway, GatewayMapper) async throws -> T) async throws -> T {
        let fake = FakeGateway(behaviour)
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let channel = try await DatagramBootstrap(group: loop)
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(fake) } }
            .bind(host: "127.0.0.9", port: Int(NATPMP.port)).get()
        defer { channel.close(promise: nil) }
        let mapper = GatewayMapper(gateway: .v4(0x7F00_0009), client: .loopback, loop: loop)
        return try await body(fake, mapper)
    }

    @Test("a NAT-PMP-only gateway: PCP is refused as an unsupported version, NAT-PMP maps, a lost request is sent again")
    func fallsBack() async throws {
        try await GatewayFallbackTests.withGateway(.natPMPOnly) { fake, mapper in
            let nonce = [UInt8](repeating: 7, count: 12)
            let (udp, via) = try await mapper.map(.udp, internalPort: 4000, suggestedExternal: 4000, lifetime: 7200, nonce: nonce)
            #expect(via == .natPMP)
            #expect(udp.internalPort == 4000 && udp.externalPort == 40001 && udp.lifetime == 7200, "\(udp)")
            #expect(udp.externalIP == .v4(0xCB00_714D), "the external address (opcode 0): \(String(describing: udp.externalIP))")
            let (tcp, _) = try await mapper.map(.tcp, internalPort: 4000, suggestedExternal: 40001, lifetime: 7200, nonce: nonce)
            #expect(tcp.externalPort == 40002)
            // PCP first, then NAT-PMP with the first mapping request lost and sent again.
            let versions = fake.seen.withLockedValue { $0 }
            #expect(versions.first == 2, "\(versions)")
            #expect(versions.filter { $0 == 0 }.count >= 3, "\(versions)")
        }
    }

    @Test("a gateway that refuses, garbles or says nothing: a typed error, no mapping")
    func failures() async throws {
        let nonce = [UInt8](repeating: 1, count: 12)
        try await GatewayFallbackTests.withGateway(.refuse) { _, mapper in
            await #expect(throws: GatewayError.natPMP(result: 2)) {
                try await mapper.map(.udp, internalPort: 4000, suggestedExternal: 4000, lifetime: 60, nonce: nonce)
            }
        }
        try await GatewayFallbackTests.withGateway(.garble) { _, mapper in
            // Garbage is not taken for an answer: the exchange runs out of tries.
            await #expect(throws: GatewayError.noAnswer(tries: GatewayMapper.schedule.count)) {
                try await mapper.map(.udp, internalPort: 4000, suggestedExternal: 4000, lifetime: 60, nonce: nonce)
            }
        }
        try await GatewayFallbackTests.withGateway(.silent) { fake, mapper in
            await #expect(throws: GatewayError.noAnswer(tries: GatewayMapper.schedule.count)) {
                try await mapper.map(.udp, internalPort: 4000, suggestedExternal: 4000, lifetime: 60, nonce: nonce)
            }
            // Three PCP tries, no fallback: a silent gateway is not a NAT-PMP-only one.
            #expect(fake.seen.withLockedValue { $0 } == [2, 2, 2])
        }
    }
}
