import Testing
@testable import P2PKernel
import P2PTesting

/// NAT traversal on the simulated network: peers behind simulated NATs (mapping and filtering as
/// RFC 4787 names them) run the real ladder — observe, classify, probe back, relays — and punch
/// through each other's NATs, in virtual time. The NAT lab (namespaces, nftables, miniupnpd)
/// keeps the same cases on a real kernel's NAT.
@Suite("NAT traversal on the simulated network")
struct SimulatedNATTests {
    static func natConfig() -> NATConfig {
        var cfg = NATConfig()
        cfg.relays = 3
        cfg.minimumRelays = 2
        return cfg
    }

    /// `public` reachable peers, then one peer behind a NAT of each given mapping, each run
    /// through the ladder.
    static func setUp(_ net: SimulatedNetwork, public count: Int, behind mappings: [SimNAT.Mapping])
        async throws -> (publicPeers: [Node], natted: [Node], reports: [ReachabilityReport]) {
        let t = try await Testnet.start(peers: count, network: net)
        var natted: [Node] = []
        var reports: [ReachabilityReport] = []
        for mapping in mappings {
            let nat = net.addNAT(mapping: mapping)
            // Firewalled from the start, as `p2p node` behind a NAT.
            let n = try await net.node(behind: nat).requestTimeout(.seconds(2)).nat(natConfig())
                .flags([.firewalledUDP, .firewalledTCP]).start()
            try await n.bootstrap(to: t.nodes[0].address.socket)
            reports.append(try await n.nat.makeReachable())
            natted.append(n)
        }
        return (t.nodes, natted, reports)
    }

    /// Waits up to `seconds` of virtual time for `condition`.
    static func eventually(_ net: SimulatedNetwork, seconds: Int = 30, _ condition: () async throws -> Bool) async throws -> Bool {
        let clock = NodeClock(loop: net.loop)
        for _ in 0..<(seconds * 10) {
            if try await condition() { return true }
            try await clock.sleep(for: .milliseconds(100))
        }
        return try await condition()
    }

    static func paths(_ n: Node, to peer: Number160) async throws -> (udp: Bool, tcp: Bool) {
        try await n.eventLoop.submit { (n.kernel.paths.udpPaths[peer] != nil, n.kernel.paths.directPaths[peer] != nil) }.get()
    }

    @Test("behind port-preserving NATs: the ladder classifies the NAT, finds no direct way in, takes relays; two such peers punch UDP and TCP paths and then skip their relays")
    func consistentPunch() async throws {
        let net = SimulatedNetwork(seed: 41, conditions: LinkConditions(latency: .uniform(.milliseconds(20), .milliseconds(120))))
        defer { net.stop() }
        try await net.run {
            let (publicPeers, natted, reports) = try await SimulatedNATTests.setUp(net, public: 30, behind: [.portPreserving, .portPreserving])
            for r in reports {
                #expect(r.natType == .portPreserving, "\(r.summary)")
                #expect(r.reachable && r.method == .relay && r.relays.count == 3, "\(r.summary)")
            }
            let (a, b) = (natted[0], natted[1])
            #expect(a.address.flags.contains(.relayed) && a.address.flags.contains(.punchable))
            // b reaches a through a's relays; that exchange starts the punch.
            let first = try await b.request(to: a.address, command: b.kernel.commands.ping).get()
            #expect(first.type == .ok && first.sender.id == a.peerID)
            let punched = try await SimulatedNATTests.eventually(net) {
                let x = try await SimulatedNATTests.paths(a, to: b.peerID), y = try await SimulatedNATTests.paths(b, to: a.peerID)
                return x.udp && y.udp && (x.tcp || y.tcp)
            }
            #expect(punched, "no direct paths after 30 s")
            // Now a datagram to a goes straight through both NATs, not through a relay.
            let relays = try await a.eventLoop.submit { a.nat.relays }.get()
            let forwarded = { () async throws -> UInt32 in
                var n: UInt32 = 0
                for r in relays {
                    guard let relay = publicPeers.first(where: { $0.peerID == r.id }) else { continue }
                    n += try await relay.eventLoop.submit { relay.kernel.relay.relayServed[a.peerID]?.nextToken ?? 0 }.get()
                }
                return n
            }
            let before = try await forwarded()
            let direct = try await b.request(to: a.address, command: b.kernel.commands.ping, transport: .udp).get()
            #expect(direct.type == .ok && direct.sender.id == a.peerID)
            #expect(try await forwarded() == before, "the ping went through a relay despite the punched path")
        }
    }

    @Test("a relayed peer (port-preserving NAT, no mapping service) is found by its id from a public peer as soon as it is relayed, and answers itself within 3 s of virtual time — 100 seeds", arguments: 1...100)
    func relayedPeerIsFound(seed: UInt64) async throws {
        let net = SimulatedNetwork(seed: 700 + seed, conditions: LinkConditions(latency: .uniform(.milliseconds(20), .milliseconds(120))))
        defer { net.stop() }
        try await net.run {
            let (publicPeers, natted, reports) = try await SimulatedNATTests.setUp(net, public: 30, behind: [.portPreserving])
            let u = natted[0]
            #expect(reports[0].method == .relay, "\(reports[0].summary)")
            // A public peer that never spoke with it looks its id up.
            let asker = try #require(publicPeers.last { p in !reports[0].relays.contains { $0.id == p.peerID } })
            let relayedAt = net.elapsed
            let found = try await asker.closestPeers(to: u.peerID)
            #expect(found.peers.first?.id == u.peerID, "the lookup of its id ended at \(found.peers.first.map { "\($0.id)" } ?? "nobody")")
            if let record = found.peers.first, record.id == u.peerID {
                let reply = try await asker.request(to: record, command: asker.kernel.commands.ping).get()
                #expect(reply.sender.id == u.peerID)
                // Virtual time: the same on every run of a seed, however busy the machine.
                #expect(net.elapsed - relayedAt <= .seconds(3), "answered \(net.elapsed - relayedAt) after it was relayed")
            }
        }
    }

    @Test("one symmetric NAT: a UDP path by birthday probing through both NATs, TCP stays relayed; two symmetric NATs: nobody punches")
    func symmetricPunch() async throws {
        let net = SimulatedNetwork(seed: 43, conditions: LinkConditions(latency: .uniform(.milliseconds(20), .milliseconds(120))))
        defer { net.stop() }
        try await net.run {
            let (_, natted, reports) = try await SimulatedNATTests.setUp(net, public: 30, behind: [.symmetric, .portPreserving, .symmetric])
            #expect(reports.map(\.natType) == [.symmetric, .portPreserving, .symmetric], "\(reports.map(\.summary))")
            let (s, c, s2) = (natted[0], natted[1], natted[2])
            _ = try await s.request(to: c.address, command: s.kernel.commands.ping).get()
            let punched = try await SimulatedNATTests.eventually(net) {
                let x = try await SimulatedNATTests.paths(s, to: c.peerID), y = try await SimulatedNATTests.paths(c, to: s.peerID)
                return x.udp && y.udp
            }
            #expect(punched, "no UDP path by birthday probing")
            #expect(try await SimulatedNATTests.paths(s, to: c.peerID).tcp == false)
            // Two symmetric sides: relayed both ways, and no punch begins.
            let r = try await s2.request(to: s.address, command: s2.kernel.commands.ping).get()
            #expect(r.type == .ok && r.sender.id == s.peerID)
            try await NodeClock(loop: net.loop).sleep(for: .seconds(5))
            #expect(try await s2.eventLoop.submit { s2.kernel.punch.punchPacketsSent + s2.kernel.punch.punches.count }.get() == 0)
            let none = try await SimulatedNATTests.paths(s2, to: s.peerID)
            #expect(!none.udp && !none.tcp)
        }
    }

    @Test("a relay that dies while a request to its peer is on the way: the request is sent again through another relay and answered")
    func relayDiesMidRequest() async throws {
        let net = SimulatedNetwork(seed: 47, conditions: LinkConditions(latency: .constant(.milliseconds(80))))
        defer { net.stop() }
        try await net.run {
            var cfg = SimulatedNATTests.natConfig()
            cfg.holePunching = false
            let t = try await Testnet.start(peers: 20, network: net)
            let u = try await net.node(behind: net.addNAT(mapping: .symmetric)).requestTimeout(.seconds(3)).nat(cfg)
                .flags([.firewalledUDP, .firewalledTCP]).start()
            try await u.bootstrap(to: t.nodes[0].address.socket)
            let report = try await u.nat.makeReachable()
            #expect(report.method == .relay && report.relays.count == 3, "\(report.summary)")
            guard let a = t.nodes.first(where: { n in !report.relays.contains { $0.id == n.peerID } }) else {
                Issue.record("every peer is a relay")
                return
            }
            for round in 0..<3 {
                // The request leaves for the relay a uses now; that relay vanishes at once.
                let sent = a.request(to: u.address, command: a.kernel.commands.ping, transport: .udp)
                let relay = try await a.eventLoop.submit { a.kernel.paths.relayRoutes[u.peerID]?.current }.get()
                let dead = try #require(relay.flatMap { net.host(at: $0.ip) })
                net.disconnect(dead)
                let reply = try await sent.get()
                #expect(reply.type == .ok && reply.sender.id == u.peerID, "round \(round)")
                net.reconnect(dead)
            }
        }
    }

    @Test("peers that join together through one seed meet one another once they are routable, long before the periodic neighbourhood refresh")
    func jointJoinersMeet() async throws {
        let net = SimulatedNetwork(seed: 53, conditions: LinkConditions(latency: .uniform(.milliseconds(20), .milliseconds(120))))
        defer { net.stop() }
        try await net.run {
            var cfg = NATConfig()
            cfg.mode = .auto
            let seed = try await net.node().nat(cfg).start()
            // Ten peers started at once, each firewalled until its ladder says otherwise (as
            // `p2p node` with --bootstrap), each joining through the seed: none is in the seed's
            // map yet while the others join, so their joins meet only the seed.
            var joiners: [Node] = []
            for _ in 0..<10 { joiners.append(try await net.node().nat(cfg).flags([.firewalledUDP, .firewalledTCP]).start()) }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for n in joiners { group.addTask { _ = try await n.bootstrap(to: seed.address.socket) } }
                try await group.waitForAll()
            }
            let everyone = Set(([seed] + joiners).map(\.peerID))
            func missing(_ n: Node) -> Int { everyone.subtracting([n.peerID]).subtracting(n.peerMap.verifiedPeers.map(\.id)).count }
            // Well within the periodic refresh (60 s): every peer knows every other one.
            let met = try await SimulatedNATTests.eventually(net, seconds: 20) { joiners.allSatisfy { missing($0) == 0 } }
            #expect(met, "peers missing from joiners' maps: \(joiners.map(missing))")
            #expect(joiners.allSatisfy { $0.nat.report?.method == .direct }, "\(joiners.map { $0.nat.report?.summary ?? "no verdict" })")
            for n in [seed] + joiners { await n.shutdown() }
        }
    }

    @Test("a ladder whose probers all fail to answer gives no verdict: a reachable peer stays reachable and takes no relays")
    func probersThatDoNotAnswer() async throws {
        let net = SimulatedNetwork(seed: 59, conditions: LinkConditions(latency: .uniform(.milliseconds(20), .milliseconds(120))))
        defer { net.stop() }
        try await net.run {
            // Two peers that answer one probe-back request each, then refuse every other (as if
            // swamped, or gone between the observation and the probe).
            let t = try await Testnet.start(peers: 2, network: net, configure: { _, c in
                c.limits.probesPerSecond = 0
                c.limits.probeBurst = 1
            })
            let n = try await net.node().requestTimeout(.seconds(2)).nat(SimulatedNATTests.natConfig()).start()
            try await n.bootstrap(to: t.nodes[0].address.socket)
            let first = try await n.nat.makeReachable()
            #expect(first.method == .direct, "\(first.summary)")
            await #expect(throws: NATError.noProbeAnswer) { try await n.nat.makeReachable() }
            let me = n.address
            #expect(me.flags.isDisjoint(with: [.firewalledUDP, .firewalledTCP, .relayed]), "flags \(me.flags)")
            #expect(me.relays.isEmpty)
            #expect(n.nat.report?.method == .direct)
            await n.shutdown()
            await t.shutdown()
        }
    }
}
