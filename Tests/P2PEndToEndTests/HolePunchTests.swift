import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
@testable import P2PKernel

/// Hole punching on loopback, in-process: nodes that take relays and are told their NAT class
/// (loopback has no NAT; the lab's cases 5 and 6 punch through real ones) agree a punch through
/// the relays, find each other's PUNCH packets, prove the path with a ping, and then skip the
/// relays. And what a hostile peer can make a node do with `kernel.punch`.
@Suite("Hole punching", .serialized)
struct HolePunchTests {
    static func config(budget: Duration = .seconds(2)) -> NATConfig {
        var cfg = NATConfig()
        cfg.relays = 2
        cfg.minimumRelays = 1
        cfg.punchBudget = budget
        cfg.birthdaySockets = 16
        // Loopback delivers the symmetric side's packets without any NAT in the way; few
        // random ports are sprayed (they are this host's).
        cfg.birthdayProbes = 20
        return cfg
    }

    /// A node behind a NAT of `type` (as far as it knows), relayed through peers of `network`.
    static func natted(_ type: NATType, _ network: [Node], config: NATConfig = HolePunchTests.config(),
                       limits: (inout NodeLimits) -> Void = { _ in }) async throws -> Node {
        // Firewalled from the start, as `p2p node` behind a NAT: no peer records its bare address
        // (on loopback, unlike behind a NAT, a datagram sent there would arrive).
        let u = try await loopbackNode(timeout: .seconds(2)) {
            $0.nat(config).flags([.firewalledUDP, .firewalledTCP]).configure { limits(&$0.limits) }
        }
        try await u.bootstrap(to: network[0].address.socket)
        let relays = await u.nat.useRelays()
        #expect(relays.count == 2, "\(relays)")
        await u.nat.assume(type, external: u.address.socket)
        return u
    }

    static func paths(_ n: Node, to peer: Number160) async throws -> (udp: Bool, tcp: Bool) {
        try await n.eventLoop.submit { (n.kernel.paths.udpPaths[peer] != nil, n.kernel.paths.directPaths[peer] != nil) }.get()
    }

    static func waitFor(_ what: String, seconds: Double = 20, _ condition: () async throws -> Bool) async throws {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while ContinuousClock.now < deadline {
            if try await condition() { return }
            try await Task.sleep(for: .milliseconds(10))
        }
        Issue.record("timed out waiting for \(what)")
    }

    @Test("two relayed nodes behind consistent NATs punch UDP and TCP paths through their relays; their traffic then skips the relays")
    func consistentPair() async throws {
        let nodes = try await RelayTests.network(4)
        let a = try await HolePunchTests.natted(.portPreserving, nodes)
        // Subscribed before b exists: b's own start-up (its bootstrap, a's maintenance) may talk
        // to a through the relays and so begin the punch before the test's first ping.
        let events = NIOLockedValueBox<[DirectPath]>([])
        a.registry.subscribe { if case .directPath(let p) = $0 { events.withLockedValue { $0.append(p) } } }
        let b = try await HolePunchTests.natted(.consistent, nodes)
        defer { Task { for n in nodes + [a, b] { try? await n.shutdown() } } }
        #expect(b.address.flags.isSuperset(of: [.relayed, .punchable]), "\(b.address)")
        // One exchange through b's relays starts it.
        let first = try await a.request(to: b.address, command: a.kernel.commands.ping).get()
        #expect(first.type == .ok)
        try await HolePunchTests.waitFor("both paths on both sides") {
            let (x, y) = try await HolePunchTests.paths(a, to: b.peerID), (z, w) = try await HolePunchTests.paths(b, to: a.peerID)
            return x && y && z && w
        }
        try await HolePunchTests.waitFor("two path events") { events.withLockedValue { $0.count } >= 2 }
        let seen = events.withLockedValue { $0 }
        #expect(Set(seen.map(\.transport)) == [.udp, .tcp], "\(seen)")
        #expect(seen.allSatisfy { $0.method == .holePunch && $0.peer == b.peerID }, "\(seen)")
        // Now neither transport goes through a relay of b's.
        let relays = ArraySlice(nodes.filter { n in b.address.relays.contains(n.address.socket) })
        #expect(relays.count == 2)
        let before = try await RelayTests.forwarded(relays, for: b.peerID)
        for transport in [TransportChoice.udp, .tcp] {
            let r = try await a.request(to: b.address, command: a.kernel.commands.ping, transport: transport).get()
            #expect(r.type == .ok && r.sender.id == b.peerID)
        }
        #expect(try await RelayTests.forwarded(relays, for: b.peerID) == before, "a ping went through a relay after the punch")
        // And the other way.
        let r = try await b.request(to: a.address, command: b.kernel.commands.ping, transport: .udp).get()
        #expect(r.type == .ok && r.sender.id == a.peerID)
        // The hole closes (a NAT forgot it; here a's path leads to a socket that never answers):
        // a request on it still gets its answer, through the relays, and the path is given up.
        let silent = try await SilentPeer()
        defer { silent.channel.close(promise: nil) }
        try await a.eventLoop.submit {
            if let p = a.kernel.paths.udpPaths[b.peerID] { a.kernel.paths.udpPaths[b.peerID] = UDPPath(socket: p.socket, address: silent.address.socket.udpEndpoint, heard: 0) }
        }.get()
        let viaRelays = try await a.request(to: b.address, command: a.kernel.commands.ping, transport: .udp, timeout: .seconds(6)).get()
        #expect(viaRelays.type == .ok && viaRelays.sender.id == b.peerID)
        #expect(try await HolePunchTests.paths(a, to: b.peerID).udp == false, "the dead path was kept")
    }

    @Test("one symmetric side: a UDP path by birthday probing from its many sockets, no TCP punch")
    func birthday() async throws {
        let nodes = try await RelayTests.network(4)
        let s = try await HolePunchTests.natted(.symmetric, nodes)
        let c = try await HolePunchTests.natted(.portPreserving, nodes)
        defer { Task { for n in nodes + [s, c] { try? await n.shutdown() } } }
        #expect(s.address.flags.contains(.symmetricNAT))
        _ = try await s.request(to: c.address, command: s.kernel.commands.ping).get()
        try await HolePunchTests.waitFor("UDP paths on both sides") {
            let x = try await HolePunchTests.paths(s, to: c.peerID).udp, y = try await HolePunchTests.paths(c, to: s.peerID).udp
            return x && y
        }
        // The symmetric side reaches c from one of its birthday sockets, not the node's own.
        let (viaBirthday, sockets) = try await s.eventLoop.submit { (s.kernel.paths.udpPaths[c.peerID]?.socket != nil, s.kernel.paths.punchSockets.count) }.get()
        #expect(viaBirthday && sockets == 1)
        let r = try await c.request(to: s.address, command: c.kernel.commands.ping, transport: .udp).get()
        #expect(r.type == .ok && r.sender.id == s.peerID)
        let r2 = try await s.request(to: c.address, command: s.kernel.commands.ping, transport: .udp).get()
        #expect(r2.type == .ok && r2.sender.id == c.peerID)
        // The punch ends; the other birthday sockets are closed, and no TCP path was tried.
        try await HolePunchTests.waitFor("the punch to end") { try await s.eventLoop.submit { s.kernel.punch.punches.isEmpty }.get() }
        #expect(try await s.eventLoop.submit { s.kernel.punch.punchDials }.get() == 0)
        #expect(try await HolePunchTests.paths(s, to: c.peerID).tcp == false)
    }

    @Test("behind two symmetric NATs nobody punches: no CONNECT, no packets")
    func bothSymmetric() async throws {
        let nodes = try await RelayTests.network(4)
        let a = try await HolePunchTests.natted(.symmetric, nodes)
        let b = try await HolePunchTests.natted(.symmetric, nodes)
        defer { Task { for n in nodes + [a, b] { try? await n.shutdown() } } }
        for transport in [TransportChoice.udp, .tcp] {
            let r = try await a.request(to: b.address, command: a.kernel.commands.ping, transport: transport).get()
            #expect(r.type == .ok)
        }
        // Punches begin (or not) before the reply is handed over: nothing began on either side.
        for n in [a, b] {
            let (punches, tried, sent) = try await n.eventLoop.submit { (n.kernel.punch.punches.count, n.kernel.punch.punchTried.count + n.kernel.punch.punchAnswered.count, n.kernel.punch.punchPacketsSent) }.get()
            #expect(punches == 0 && tried == 0 && sent == 0)
        }
    }

    @Test("kernel.punch from hostile peers: malformed terms refused, punches bounded at once, per minute and per peer; packets only to the asker's IP and bounded; a PUNCH from another IP is ignored")
    func hostilePeers() async throws {
        let nodes = try await RelayTests.network(3)
        let v = try await HolePunchTests.natted(.portPreserving, nodes, config: HolePunchTests.config(budget: .milliseconds(500))) {
            $0.maxPunchesInProgress = 3
            $0.punchesPerMinute = 5
            $0.punchesPerMinutePerIPGroup = 2
        }
        var hostile: [Node] = []
        // They say they are behind consistent NATs (a CONNECT must match its sender's flags).
        for _ in 0..<7 { hostile.append(try await loopbackNode(timeout: .seconds(2)) { $0.flags([.punchable]) }) }
        let plain = nodes[1]
        let everyone = nodes + hostile + [v]
        defer { Task { for n in everyone { try? await n.shutdown() } } }
        // Where the hostile side says its ports are: a socket of ours that counts what arrives.
        let counter = NIOLockedValueBox(0)
        let sink = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(Counter(counter)) } }
            .bind(host: "127.0.0.1", port: 0).get()
        defer { sink.close(promise: nil) }
        let port = Int64(sink.localAddress?.port ?? 0)
        let punch = CommandID.derive(from: KernelCommands.punch)
        func ask(_ h: Node, _ payload: [Payload], to target: PeerAddress = v.address) async throws -> Message {
            try await h.request(to: target, command: punch, payload: payload).get()
        }
        func connect(_ nonce: Int64, cls: Int64 = 1) -> [Payload] { [.integer(0), .integer(nonce), .integer(cls), .integer(port), .integer(port)] }

        // Malformed terms, an unknown phase, a node that is not relayed behind a classified NAT.
        for bad in [[], [.integer(7)], [.integer(0), .integer(0), .integer(1), .integer(port), .integer(port)], connect(1, cls: 3),
                    [.integer(0), .integer(2), .integer(1), .integer(0), .integer(port)], [.integer(0), .integer(3), .integer(1), .integer(70000), .integer(port)]] as [[Payload]] {
            #expect(try await ask(hostile[0], bad).type == .badRequest, "\(bad)")
        }
        #expect(try await ask(hostile[0], connect(4), to: plain.address).type == .denied)
        // Terms other than its flags announce (a "symmetric" asker whose flags say consistent:
        // a birthday the limits were not checked for).
        #expect(try await ask(hostile[6], connect(5, cls: 2)).type == .badRequest)
        // Many ids from one network: a bounded number of punches a minute with its /24 (loopback is exempt).
        let grouped = try await v.eventLoop.submit { () -> [String?] in
            v.kernel.punch.punchLog.removeAll()
            for _ in 0..<v.config.limits.punchesPerMinutePerIPGroup { v.kernel.punch.punchLog.append((v.kernel.coarseSeconds, IPAddress.v4(0x0A01_0201).sybilGroup ?? 0, .random())) }
            let out = [v.kernel.punch.punchRefusal(.random(), ip: .v4(0x0A01_0209), birthday: false), v.kernel.punch.punchRefusal(.random(), ip: .v4(0x0A01_0309), birthday: false)]
            v.kernel.punch.punchLog.removeAll()
            v.kernel.punch.punchAnswered.removeAll()
            return out
        }.get()
        #expect(grouped[0]?.contains("network") == true && grouped[1] == nil, "\(grouped)")
        #expect(try await plain.eventLoop.submit { plain.kernel.punch.punches.isEmpty }.get())
        // Three at once; the fourth asker waits for one to end.
        for (i, h) in hostile.prefix(3).enumerated() { #expect(try await ask(h, connect(Int64(100 + i))).type == .ok) }
        let busy = try await ask(hostile[3], connect(103))
        #expect(busy.type == .denied && RPCError.from(reply: busy).map { "\($0)".contains("in progress") } == true, "\(busy)")
        // The same asker again while its punch is pending, and a SYNC for another's nonce.
        #expect(try await ask(hostile[0], connect(200)).type == .denied)
        #expect(try await ask(hostile[1], [.integer(1), .integer(100)]).type == .notFound)
        // A PUNCH with a pending nonce from another IP (127.0.0.2) is no path.
        let stranger = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.2", port: 0).get()
        defer { stranger.close(promise: nil) }
        try await stranger.writeAndFlush(AddressedEnvelope(remoteAddress: v.address.socket.udpSocketAddress, data: PunchPacket.make(100, answer: false)))
        // hostile[0] fires its punch: v sends PUNCH packets to its IP at the claimed port, and
        // dials the claimed TCP port (nothing listens: refused, again every 100 ms), until the budget ends.
        #expect(try await ask(hostile[0], [.integer(1), .integer(100)]).type == .ok)
        try await HolePunchTests.waitFor("the punches to end") { try await v.eventLoop.submit { v.kernel.punch.punches.isEmpty }.get() }
        let (sent, dials, paths, dropped) = try await v.eventLoop.submit { (v.kernel.punch.punchPacketsSent, v.kernel.punch.punchDials, v.kernel.paths.udpPaths.count, v.droppedMessages) }.get()
        #expect(paths == 0, "a path from a stranger's packet")
        #expect(dropped > 0)
        // 500 ms at one PUNCH per 50 ms and one dial per 100 ms after a refusal, with slack for a busy machine.
        #expect(sent >= 1 && sent <= 12, "\(sent) PUNCH packets")
        #expect(counter.withLockedValue { $0 } == sent)
        #expect(dials >= 1 && dials <= 6, "\(dials) dials")
        // Five punches in the last minute: two more are answered, then none.
        #expect(try await ask(hostile[3], connect(300)).type == .ok)
        #expect(try await ask(hostile[4], connect(301)).type == .ok)
        let perMinute = try await ask(hostile[5], connect(302))
        #expect(perMinute.type == .denied && RPCError.from(reply: perMinute).map { "\($0)".contains("last minute") } == true, "\(perMinute)")
        // An asker whose punch ended is not answered again within a minute.
        try await HolePunchTests.waitFor("the punches to end") { try await v.eventLoop.submit { v.kernel.punch.punches.isEmpty }.get() }
        let again = try await ask(hostile[0], connect(400))
        #expect(again.type == .denied, "\(again)")
    }
}

/// Counts datagrams.
final class Counter: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    let count: NIOLockedValueBox<Int>
    init(_ count: NIOLockedValueBox<Int>) { self.count = count }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { count.withLockedValue { $0 += 1 } }
}
