import P2PAddress
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// The default gateway, read from the kernel's routing table (Linux: /proc/net/route).
public enum DefaultGateway {
    /// The IPv4 gateway of the default route, if there is one.
    public static func ipv4(routeTable path: String = "/proc/net/route") -> IPAddress? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n").dropFirst() {
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            // Iface Destination Gateway Flags …: destination 0 is the default route; fields are
            // little-endian hex.
            guard f.count > 3, f[1] == "00000000", let g = UInt32(f[2], radix: 16), g != 0 else { continue }
            return .v4(g.byteSwapped)
        }
        return nil
    }
}

/// A promise completed at most once, whichever of several racing events comes first (an answer,
/// a retransmitted answer, a deadline). NIO treats a second completion as a programming error.
package final class Once<Value: Sendable>: @unchecked Sendable {
    package let promise: EventLoopPromise<Value>
    private let done = NIOLockedValueBox(false)
    package init(_ promise: EventLoopPromise<Value>) { self.promise = promise }
    private func first() -> Bool { done.withLockedValue { d in defer { d = true }; return !d } }
    package func succeed(_ v: Value) { if first() { promise.succeed(v) } }
    package func fail(_ e: any Error) { if first() { promise.fail(e) } }
    package var futureResult: EventLoopFuture<Value> { promise.futureResult }
    /// A promise nobody completed (the connection failed before its deadline fired, say) fails
    /// here: SwiftNIO treats a dropped, unfulfilled promise as a bug.
    deinit { if first() { promise.fail(GatewayError.abandoned) } }
}

/// One request and its answer over UDP, retransmitted on a schedule (RFC 6886: 250 ms,
/// doubling), on its own ephemeral socket.
enum UDPExchange {
    private final class Catcher: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = AddressedEnvelope<ByteBuffer>
        let accept: @Sendable ([UInt8]) -> Bool
        let promise: Once<[UInt8]>
        init(accept: @escaping @Sendable ([UInt8]) -> Bool, promise: Once<[UInt8]>) {
            self.accept = accept
            self.promise = promise
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = Array(unwrapInboundIn(data).data.readableBytesView)
            if accept(bytes) { promise.succeed(bytes) }
        }
    }

    /// Sends `request` to `target` at each delay of `schedule` until an answer `accept` takes
    /// arrives; the last delay is the wait after the last send.
    static func run(_ request: [UInt8], to target: SocketAddress, on loop: any EventLoop, schedule: [TimeAmount],
                    accept: @escaping @Sendable ([UInt8]) -> Bool) async throws -> [UInt8] {
        let promise = Once(loop.makePromise(of: [UInt8].self))
        let channel = try await DatagramBootstrap(group: loop)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(Catcher(accept: accept, promise: promise)) } }
            .bind(host: "0.0.0.0", port: 0).get()
        defer { channel.close(promise: nil) }
        var tasks: [Scheduled<Void>] = []
        var at = TimeAmount.zero
        for delay in schedule {
            tasks.append(loop.scheduleTask(in: at) {
                var buffer = channel.allocator.buffer(capacity: request.count)
                buffer.writeBytes(request)
                channel.writeAndFlush(AddressedEnvelope(remoteAddress: target, data: buffer), promise: nil)
            })
            at = at + delay
        }
        tasks.append(loop.scheduleTask(in: at) { promise.fail(GatewayError.noAnswer(tries: schedule.count)) })
        defer { for t in tasks { t.cancel() } }
        return try await promise.futureResult.get()
    }
}

/// Maps the node's port on the default gateway with PCP, falling back to NAT-PMP when the
/// gateway only speaks that (it answers PCP with "unsupported version").
public struct GatewayMapper: Sendable {
    public let gateway: IPAddress
    /// This host's address toward the gateway (PCP puts it in every request).
    public let client: IPAddress
    let loop: any EventLoop
    /// 250 ms, 500 ms, 1 s: RFC 6886's schedule, cut to three tries (a LAN gateway answers in ~1 ms).
    static let schedule: [TimeAmount] = [.milliseconds(250), .milliseconds(500), .milliseconds(1000)]

    public init(gateway: IPAddress, client: IPAddress, loop: any EventLoop) {
        self.gateway = gateway
        self.client = client
        self.loop = loop
    }

    /// Which protocol mapped.
    public enum Via: String, Sendable { case pcp = "pcp", natPMP = "nat-pmp" }

    /// Maps `internalPort` (PCP first, NAT-PMP if the gateway does not speak PCP). A lifetime of
    /// 0 deletes the mapping.
    public func map(_ p: MappingProtocol, internalPort: UInt16, suggestedExternal: UInt16, lifetime: UInt32,
                    nonce: [UInt8]) async throws -> (GatewayMapping, Via) {
        let target = gateway.socketAddress(port: NATPMP.port)
        let pcp = PCP.mapRequest(p, internalPort: internalPort, suggestedExternal: suggestedExternal, lifetime: lifetime, client: client, nonce: nonce)
        do {
            let answer = try await UDPExchange.run(pcp, to: target, on: loop, schedule: GatewayMapper.schedule) { b in
                b.count >= 4 && (b[0] == 0 || (b[0] == PCP.version && b[1] == 0x81))
            }
            return (try PCP.parseMap(answer, expecting: p, nonce: nonce), .pcp)
        } catch GatewayError.natPMP(1), GatewayError.pcp(1) {
            // A NAT-PMP-only gateway: ask in its protocol.
        }
        let request = NATPMP.mapRequest(p, internalPort: internalPort, suggestedExternal: lifetime == 0 ? 0 : suggestedExternal, lifetime: lifetime)
        let answer = try await UDPExchange.run(request, to: target, on: loop, schedule: GatewayMapper.schedule) { b in
            b.count >= 4 && b[0] == 0 && b[1] == 128 + (p == .udp ? 1 : 2)
        }
        var mapping = try NATPMP.parseMap(answer, expecting: p)
        if lifetime > 0 { mapping.externalIP = try? await externalAddress() }
        return (mapping, .natPMP)
    }

    /// The gateway's external address (NAT-PMP opcode 0).
    public func externalAddress() async throws -> IPAddress {
        let answer = try await UDPExchange.run(NATPMP.externalAddressRequest(), to: gateway.socketAddress(port: NATPMP.port),
                                               on: loop, schedule: GatewayMapper.schedule) { b in b.count >= 4 && b[0] == 0 && b[1] == 128 }
        return try NATPMP.parseExternalAddress(answer).0
    }
}
