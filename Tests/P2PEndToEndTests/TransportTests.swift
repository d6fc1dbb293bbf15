import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
@testable import P2PKernel

/// Starts a node on loopback with quick timeouts for tests.
func loopbackNode(timeout: Duration = .milliseconds(600), network: UInt32 = 1,
                  _ extra: (NodeBuilder) -> NodeBuilder = { $0 }) async throws -> Node {
    try await extra(Node.builder().host("127.0.0.1").port(0).networkID(network).requestTimeout(timeout).maintenance(nil)).start()
}

/// A peer that never answers: its UDP port stays bound (so no other node in this process can be
/// given it while the test runs) and nothing listens on TCP at that port (connections are refused).
/// A shut-down node's port would not do: parallel tests start many nodes and one may get it.
final class SilentPeer: Sendable {
    let channel: any Channel
    let address: PeerAddress

    init() async throws {
        channel = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: 0).get()
        let port = UInt16(channel.localAddress?.port ?? 0)
        address = PeerAddress(id: .random(), socket: PeerSocketAddress(ip: .loopback, port: port))
    }

    func close() async { try? await channel.close() }
}

/// Answers with as many bytes as the request's integer asks for: bigger than a datagram forces
/// the UDP → TCP retry.
struct Blob: CommandHandler {
    let name = "test.blob"
    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        let n = Int(request.firstInteger ?? 0)
        return .reply(Reply(payload: [.bytes(Array(repeating: 7, count: n))]))
    }
}

/// Answers 20 s later: a live peer that does not answer in time.
struct Stall: CommandHandler {
    let name = "test.stall"
    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        .future(context.node.eventLoop.scheduleTask(in: .seconds(20)) { Reply() }.futureResult)
    }
}

@Suite("Transport and RPC", .serialized)
struct TransportTests {
    @Test("ping over UDP and over TCP reaches the peer and learns its id")
    func pingBothTransports() async throws {
        let a = try await loopbackNode(), b = try await loopbackNode()
        let overUDP = try await a.ping(b.address.socket, over: .udp)
        let overTCP = try await a.ping(b.address.socket, over: .tcp)
        #expect(overUDP.id == b.peerID)
        #expect(overTCP.id == b.peerID)
        // Both sides now know each other first-hand.
        #expect(a.peerMap.verifiedPeer(b.peerID) != nil)
        #expect(b.peerMap.verifiedPeer(a.peerID) != nil)
        await a.shutdown(); await b.shutdown()
    }

    @Test("UDP and TCP share one port")
    func samePort() async throws {
        let a = try await loopbackNode()
        #expect(a.address.udpPort == a.address.tcpPort)
        #expect(a.address.udpPort != 0)
        await a.shutdown()
    }

    @Test("a request to a silent port fails with a timeout error within its bound")
    func closedPortTimesOut() async throws {
        let silent = try await SilentPeer()
        let closed = silent.address.socket
        let a = try await loopbackNode(timeout: .milliseconds(400))
        let clock = ContinuousClock()
        let start = clock.now
        await #expect {
            try await a.ping(closed, over: .udp)
        } throws: { error in
            guard case RPCError.timeout(_, let ms) = error else { return false }
            return ms == 400
        }
        let took = clock.now - start
        #expect(took >= .milliseconds(400))
        #expect(took < .milliseconds(1400))
        // Over TCP the refused connection is reported at once, not as a timeout.
        await #expect {
            try await a.ping(closed, over: .tcp)
        } throws: { error in
            if case RPCError.unreachable = error { return true } else { return false }
        }
        await a.shutdown()
        await silent.close()
    }

    @Test("a prompt request gives a measured peer up after a few of its round trips; a peer never measured gets the full timeout")
    func promptRequests() async throws {
        let b = try await loopbackNode(timeout: .seconds(6)) { $0.command(Stall()) }
        let a = try await loopbackNode(timeout: .seconds(6))
        let silent = try await SilentPeer()
        for _ in 0..<8 { _ = try await a.request(to: b.address, command: a.kernel.commands.ping, transport: .udp).get() }
        let stall = CommandID.derive(from: Stall().name)
        // Loopback answers in well under the 200 ms floor, so five round trips are about 1 s;
        // a busy machine may stretch them, never past the request timeout.
        let expected = try await a.eventLoop.submit { a.kernel.rpc.promptTimeout(b.peerID, atLeast: .seconds(1), roundTrips: 5) }.get()
        #expect(expected >= .seconds(1) && expected < .seconds(6))
        let expectedMs = Int(expected.components.seconds * 1_000 + expected.components.attoseconds / 1_000_000_000_000_000)
        await #expect {
            _ = try await a.requestPromptly(to: b.address, command: stall).get()
        } throws: { error in
            guard case RPCError.timeout(_, let ms) = error else { return false }
            return ms == expectedMs
        }
        await #expect {
            _ = try await a.requestPromptly(to: silent.address, command: stall).get()
        } throws: { error in
            guard case RPCError.timeout(_, let ms) = error else { return false }
            return ms == 6_000
        }
        await silent.close()
        await a.shutdown(); await b.shutdown()
    }

    @Test("a node's timers run on its loop once each; a cancelled one never runs; none after the node stops")
    func nodeTimers() async throws {
        let a = try await loopbackNode()
        let ran = NIOLockedValueBox<[String]>([])
        try await a.eventLoop.submit {
            a.scheduleTimer(in: .milliseconds(30)) { ran.withLockedValue { $0.append("kept") } }
            let dropped = a.scheduleTimer(in: .milliseconds(10)) { ran.withLockedValue { $0.append("cancelled") } }
            a.cancelTimer(dropped)
            a.scheduleTimer(in: .seconds(600)) { ran.withLockedValue { $0.append("after stop") } }
        }.get()
        var waited = 0
        while ran.withLockedValue({ $0.isEmpty }), waited < 6_000 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        await a.shutdown()
        #expect(ran.withLockedValue { $0 } == ["kept"])
        #expect(try await a.eventLoop.submit { a.kernel.timers.count }.get() == 0)
    }

    @Test("messages of another network are dropped")
    func otherNetworkDropped() async throws {
        let a = try await loopbackNode(timeout: .milliseconds(300), network: 1)
        let b = try await loopbackNode(network: 2)
        await #expect(throws: RPCError.self) { try await a.ping(b.address.socket) }
        #expect(b.droppedMessages >= 1)
        #expect(b.peerMap.counts.verified == 0)
        await a.shutdown(); await b.shutdown()
    }

    @Test("a command the peer lacks gets a clear unknown-command reply")
    func unknownCommand() async throws {
        let a = try await loopbackNode(), b = try await loopbackNode()
        let peer = try await a.ping(b.address.socket)
        await #expect {
            try await a.request(to: peer, command: "no.such.command")
        } throws: { error in
            guard case RPCError.unknownCommand(let reason) = error else { return false }
            return reason.contains("no handler")
        }
        await a.shutdown(); await b.shutdown()
    }

    @Test("a reply too large for a datagram is fetched again over TCP")
    func udpReplyTooLargeFallsBackToTCP() async throws {
        let a = try await loopbackNode()
        let b = try await loopbackNode { $0.command(Blob()) }
        let peer = try await a.ping(b.address.socket)
        let small = try await a.request(to: peer, command: "test.blob", payload: [.integer(100)], transport: .udp)
        #expect(small.firstBytes?.count == 100)
        let large = try await a.request(to: peer, command: "test.blob", payload: [.integer(200_000)], transport: .udp)
        #expect(large.firstBytes?.count == 200_000)
        await a.shutdown(); await b.shutdown()
    }

    @Test("registering a duplicate command name is refused")
    func duplicateCommand() throws {
        let registry = CommandRegistry()
        try registry.register(Blob())
        #expect(throws: RegistryError.duplicateName("test.blob")) { try registry.register(Blob()) }
        #expect(CommandID.derive(from: "kernel.ping") == CommandID.derive(from: "kernel.ping"))
    }

    @Test("binding a port in use is a clear error")
    func portInUse() async throws {
        let a = try await loopbackNode()
        await #expect {
            try await Node.builder().host("127.0.0.1").port(a.address.udpPort).start()
        } throws: { error in
            guard case NodeStartError.bindFailed(_, let port, _) = error else { return false }
            return port == a.address.udpPort
        }
        await a.shutdown()
    }

    @Test("a UDP socket that closes under a running node is bound again on the same port")
    func udpRebind() async throws {
        let a = try await loopbackNode(timeout: .seconds(5)), b = try await loopbackNode(timeout: .seconds(5))
        let port = b.address.udpPort
        let peer = try await a.ping(b.address.socket)
        // What SwiftNIO does after a send error it deems fatal (EINVAL, EPERM, ENETUNREACH…).
        try await b.onLoop { (b.kernel.transport as? SocketTransport)?.mainChannel }?.close()
        var rebinds = 0
        for _ in 0..<500 where rebinds == 0 {
            rebinds = try await b.onLoop { b.kernel.transport.rebinds }
            if rebinds == 0 { try await Task.sleep(for: .milliseconds(10)) }
        }
        #expect(rebinds == 1)
        #expect(try await b.onLoop { (b.kernel.transport as? SocketTransport)?.mainChannel?.localAddress?.port } == Int(port))
        let again = try await a.request(to: peer, command: KernelCommands.ping)
        #expect(again.type == .ok)
        await a.shutdown(); await b.shutdown()
    }

    @Test("too many requests in flight fail fast instead of queueing")
    func boundedInFlight() async throws {
        let silent = try await SilentPeer()
        let closed = silent.address.socket
        let a = try await loopbackNode(timeout: .milliseconds(300)) { $0.configure { $0.maxInFlight = 2 } }
        let f1 = a.request(to: closed, command: 1), f2 = a.request(to: closed, command: 1)
        await #expect(throws: RPCError.tooManyInFlight(limit: 2)) { try await a.request(to: closed, command: 1).get() }
        _ = try? await f1.get(); _ = try? await f2.get()
        await a.shutdown()
        await silent.close()
    }
}

/// A hostile TCP peer: accepts, reads the first bytes, and hangs up without answering.
final class HangUpOnRead: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.close(promise: nil)
    }
}

@Suite("Transport failures")
struct TransportFailureTests {
    @Test("a TCP request fails at once, not by timeout, when the peer hangs up")
    func hangUpFailsRequest() async throws {
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(HangUpOnRead()) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let port = UInt16(server.localAddress?.port ?? 0)
        let a = try await loopbackNode(timeout: .seconds(30))
        await #expect {
            try await a.request(to: PeerSocketAddress(ip: .loopback, port: port), command: 1, transport: .tcp).get()
        } throws: { error in
            guard case RPCError.unreachable(_, let reason) = error else { return false }
            return reason.contains("connection closed")
        }
        await a.shutdown()
        try await server.close()
    }
}
