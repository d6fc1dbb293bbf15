import NIOCore
import Testing
@testable import P2PKernel

/// Relays on loopback, in-process: a node that takes relays is reached only through them (its
/// address says so), by requests over UDP and TCP, and keeps being reached when one relay goes.
@Suite("Relays", .serialized)
struct RelayTests {
    /// `n` nodes joined to the first.
    static func network(_ n: Int) async throws -> [Node] {
        var nodes: [Node] = []
        for i in 0..<n {
            let node = try await loopbackNode(timeout: .seconds(2))
            if i > 0 { try await node.bootstrap(to: nodes[0].address.socket) }
            nodes.append(node)
        }
        return nodes
    }

    static func forwarded(_ relays: ArraySlice<Node>, for peer: Number160) async throws -> UInt32 {
        var n: UInt32 = 0
        for r in relays { n += try await r.eventLoop.submit { r.kernel.relay.relayServed[peer]?.nextToken ?? 0 }.get() }
        return n
    }

    @Test("a relayed node answers through its relays over UDP and TCP; a newcomer's lookup finds it and reaches it through them")
    func throughRelays() async throws {
        let nodes = try await RelayTests.network(5)
        var cfg = NATConfig()
        cfg.relays = 3
        let u = try await loopbackNode(timeout: .seconds(2)) { $0.nat(cfg) }
        defer { Task { for n in nodes + [u] { try? await n.shutdown() } } }
        try await u.bootstrap(to: nodes[0].address.socket)
        let relays = await u.nat.useRelays()
        #expect(relays.count == 3, "\(relays)")
        let me = u.address
        #expect(me.flags.contains(.relayed) && me.relays.count == 3, "\(me)")
        let relayNodes = ArraySlice(nodes.filter { n in relays.contains { $0.id == n.peerID } })
        guard let a = nodes.first(where: { n in !relays.contains { $0.id == n.peerID } }) else {
            Issue.record("every node is a relay")
            return
        }
        // A (not a relay) knows U's record with relays and reaches it through them.
        var before = try await RelayTests.forwarded(relayNodes, for: u.peerID)
        let ping = try await a.request(to: me, command: a.kernel.commands.ping).get()
        #expect(ping.type == .ok && ping.sender.id == u.peerID)
        #expect(try await a.eventLoop.submit { a.kernel.paths.relayRoutes[u.peerID]?.relays.count }.get() == 3)
        var after = try await RelayTests.forwarded(relayNodes, for: u.peerID)
        #expect(after > before, "the UDP ping did not go through a relay")
        // A can be reached, so U connected back to it: A now reaches U over that connection.
        let deadline = ContinuousClock.now + .seconds(20)
        while ContinuousClock.now < deadline, try await a.eventLoop.submit({ a.kernel.paths.directPaths[u.peerID] == nil }).get() {
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(try await a.eventLoop.submit { a.kernel.paths.directPaths[u.peerID] != nil }.get(), "no reverse connection")
        before = try await RelayTests.forwarded(relayNodes, for: u.peerID)
        let direct = try await a.request(to: me, command: a.kernel.commands.ping).get()
        #expect(direct.sender.id == u.peerID)
        #expect(try await RelayTests.forwarded(relayNodes, for: u.peerID) == before, "went through a relay despite the reverse connection")
        // A firewalled peer (U cannot connect back to it) keeps using the relays, over UDP and TCP.
        let f = try await loopbackNode(timeout: .seconds(2)) { $0.flags([.firewalledUDP, .firewalledTCP]) }
        defer { Task { try? await f.shutdown() } }
        for transport in [TransportChoice.udp, .tcp] {
            before = try await RelayTests.forwarded(relayNodes, for: u.peerID)
            let r = try await f.request(to: me, command: f.kernel.commands.ping, transport: transport).get()
            #expect(r.type == .ok && r.sender.id == u.peerID)
            after = try await RelayTests.forwarded(relayNodes, for: u.peerID)
            #expect(after > before, "the \(transport) ping did not go through a relay")
        }
        // A newcomer finds U by a lookup (the peers it asks list U with its relays) and reaches it.
        let c = try await loopbackNode(timeout: .seconds(2))
        defer { Task { try? await c.shutdown() } }
        try await c.bootstrap(to: a.address.socket)
        let found = try await c.closestPeers(to: u.peerID)
        #expect(found.peers.first?.id == u.peerID, "\(found.peers)")
        #expect(found.peers.first?.flags.contains(.relayed) == true)
        if let record = found.peers.first {
            let reply = try await c.request(to: record, command: c.kernel.commands.ping).get()
            #expect(reply.sender.id == u.peerID)
        }
    }

    @Test("a relay that shuts down is replaced, and requests through it go through another")
    func relayLost() async throws {
        let nodes = try await RelayTests.network(6)
        var cfg = NATConfig()
        cfg.relays = 3
        cfg.minimumRelays = 1
        let u = try await loopbackNode(timeout: .seconds(2)) { $0.nat(cfg) }
        defer { Task { for n in nodes + [u] { try? await n.shutdown() } } }
        try await u.bootstrap(to: nodes[0].address.socket)
        let relays = await u.nat.useRelays()
        #expect(relays.count == 3)
        guard let gone = nodes.first(where: { n in relays.contains { $0.id == n.peerID } && n !== nodes[0] }) else {
            Issue.record("no relay to stop")
            return
        }
        try await gone.shutdown()
        let deadline = ContinuousClock.now + .seconds(20)
        while ContinuousClock.now < deadline, u.nat.relays.contains(where: { $0.id == gone.peerID }) || u.nat.relays.count < 3 {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(u.nat.relays.count == 3 && !u.nat.relays.contains { $0.id == gone.peerID }, "\(u.nat.relays)")
        #expect(!u.address.relays.contains(gone.address.socket), "\(u.address)")
    }

    @Test("a relay serves few peers of one network and a bounded number in all")
    func relayBounds() async throws {
        let relay = try await loopbackNode { $0.configure { $0.limits.maxRelayedPeers = 6 } }
        let other = try await loopbackNode()
        defer { Task { try? await relay.shutdown(); try? await other.shutdown() } }
        // Any open connection stands in for the links; the address each peer came from is what counts.
        let link = try await relay.kernel.connections.connection(to: other.address.socket).get()
        let refusals = try await relay.eventLoop.submit { () -> [String?] in
            var out: [String?] = []
            for i in 0..<7 {
                let ip = IPAddress.v4(i < 5 ? 0x0A01_0200 | UInt32(i + 1) : 0x0A01_0300 | UInt32(i + 1))
                let id = Number160.random()
                let refusal = relay.kernel.relay.relayRefusal(for: id, ip: ip)
                out.append(refusal)
                if refusal == nil {
                    relay.kernel.relay.relayServed[id] = RelayServed(link: link, returns: [nil], allowance: 0, stamp: 0, ip: ip)
                }
            }
            return out
        }.get()
        // Four from 10.1.2.0/24, the fifth refused; two more from 10.1.3.0/24 fill the six places.
        #expect(refusals[0..<4].allSatisfy { $0 == nil })
        #expect(refusals[4]?.contains("network") == true, "\(refusals)")
        #expect(refusals[5] == nil && refusals[6] == nil, "\(refusals)")
        let full = try await relay.eventLoop.submit { relay.kernel.relay.relayRefusal(for: .random(), ip: .v4(0x0A01_0401)) }.get()
        #expect(full?.contains("6 peers") == true, "\(String(describing: full))")
        try await relay.eventLoop.submit { relay.kernel.relay.relayServed.removeAll() }.get()

        // Connections back to peers that wrote through a relay aim where the relay says: a few a
        // minute in all, however many ids ask (only loopback addresses here, where nothing listens).
        let limit = relay.config.limits.reverseConnectionsPerMinute
        let tried = try await relay.eventLoop.submit { () -> Int in
            relay.kernel.relay.relayLinks[ObjectIdentifier(link)] = other.peerID
            let source = Endpoint(ip: .loopback, port: 9)
            for i in 0..<(limit + 20) {
                let sender = PeerAddress(id: .random(), socket: PeerSocketAddress(ip: .v4(0x7F00_0002 + UInt32(i)), port: 9))
                relay.kernel.relay.considerReverseConnection(to: sender, origin: .link(link, token: 0, kind: .udp, source: source))
            }
            relay.kernel.relay.relayLinks.removeAll()
            return relay.kernel.relay.reverseTried.count
        }.get()
        #expect(tried == limit)
    }

    @Test("hostile relay packets over real sockets: wrapped packets for peers not relayed, link packets off a link, relay answers from a non-relay, stale tokens, truncated headers — all dropped, nothing forwarded, the relay keeps serving")
    func hostileRelayPackets() async throws {
        let nodes = try await RelayTests.network(4)
        var cfg = NATConfig()
        cfg.relays = 2
        cfg.minimumRelays = 1
        let u = try await loopbackNode(timeout: .seconds(2)) { $0.nat(cfg).flags([.firewalledUDP, .firewalledTCP]) }
        defer { Task { for n in nodes + [u] { try? await n.shutdown() } } }
        try await u.bootstrap(to: nodes[0].address.socket)
        #expect(await u.nat.useRelays().count == 2)
        let relays = nodes.filter { n in u.address.relays.contains(n.address.socket) }
        guard let r = relays.first, let a = nodes.first(where: { n in !relays.contains { $0 === n } }) else {
            Issue.record("no relay or no sender")
            return
        }
        // A learns U's relays by reaching it through them.
        #expect(try await a.request(to: u.address, command: a.kernel.commands.ping).get().type == .ok)
        let raw = try await RawSocket()
        defer { Task { await raw.close() } }
        let stranger = Number160.random()
        func drops(_ n: Node) -> Int { n.droppedMessages }
        let served = { try await r.eventLoop.submit { r.kernel.relay.relayServed[u.peerID]?.nextToken ?? 0 }.get() }
        let tokensBefore = try await served()
        let (rBefore, uBefore, aBefore) = (drops(r), drops(u), drops(a))
        let garbage = [UInt8](repeating: 0xAB, count: 40)
        // To the relay: for a peer it does not relay; a link answer over UDP; truncated.
        try await raw.send([RelayPacket.toRelay] + stranger.bytes + garbage, to: r.address.socket)
        try await raw.send([RelayPacket.fromClient, 0, 0, 0, 1] + garbage, to: r.address.socket)
        try await raw.send([RelayPacket.toRelay, 1, 2, 3], to: r.address.socket)
        // To U: a "delivery" that did not come down one of its links.
        try await raw.send([RelayPacket.toClient, 0, 0, 0, 0, 0, 4, 127, 0, 0, 1, 0x0F, 0xA0] + garbage, to: u.address.socket)
        // To A: an answer "from U" sent by something that is not one of U's relays; a bad IP family.
        try await raw.send([RelayPacket.fromRelay] + u.peerID.bytes + [4, 127, 0, 0, 1] + garbage, to: a.address.socket)
        try await raw.send([RelayPacket.fromRelay] + u.peerID.bytes + [9] + garbage, to: a.address.socket)
        try await HolePunchTests.waitFor("the drops to be counted", seconds: 10) {
            drops(r) >= rBefore + 3 && drops(u) >= uBefore + 1 && drops(a) >= aBefore + 2
        }
        #expect(try await served() == tokensBefore, "the relay forwarded something")
        // A stale token from U itself, on its own link: one ring turn old, refused.
        let stale = try await r.eventLoop.submit { () -> Bool in
            guard let s = r.kernel.relay.relayServed[u.peerID] else { return false }
            let remote = s.link.remote
            let before = r.droppedMessages
            var b = ByteBufferAllocator().buffer(capacity: 16)
            b.writeInteger(RelayPacket.fromClient)
            b.writeInteger(s.nextToken &- UInt32(s.returns.count) &- 1)
            b.writeBytes(garbage)
            r.kernel.relay.received(.fromClient, b, remote: remote, origin: .tcp(s.link))
            return r.droppedMessages == before + 1
        }.get()
        #expect(stale, "a stale token was answered")
        // And the relay still serves U.
        let after = try await a.request(to: u.address, command: a.kernel.commands.ping, transport: .udp).get()
        #expect(after.type == .ok && after.sender.id == u.peerID)
    }
}
