import NIOConcurrencyHelpers
import Testing
import P2PKernel
import P2PTesting

/// Counts the requests it carries out, by message id.
private struct Counter: CommandHandler {
    let name = "test.count"
    let seen: NIOLockedValueBox<[UInt32]>
    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        seen.withLockedValue { $0.append(request.id) }
        return .reply(Reply())
    }
}

/// Records who asked and the message id of every request it carries out.
private struct SenderCounter: CommandHandler {
    let name = "test.count"
    let seen: NIOLockedValueBox<[String]>
    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        seen.withLockedValue { $0.append("\(request.sender.id.hexString)/\(request.id)") }
        return .reply(Reply())
    }
}

/// The real kernel on the simulated network: no sockets, no sleeps, virtual time.
@Suite("Simulated network")
struct SimulationTests {
    /// Ids, lookup results, message counts and virtual times of one small run.
    private func course(seed: UInt64, loss: Double) async throws -> [String] {
        let net = SimulatedNetwork(seed: seed, conditions: LinkConditions(latency: .world, loss: loss, jitter: .milliseconds(5)))
        defer { net.stop() }
        return try await net.run {
            let t = try await Testnet.start(peers: 80, joinConcurrency: 8, network: net)
            var out = t.nodes.map { "\($0.peerID)" }
            for i in 0..<30 {
                let key = Number160(hashing: "key \(i)")
                let r = try await t.nodes[(i * 7) % 80].closestPeers(to: key)
                out.append("\(r.peers.map(\.id)) \(r.messages) \(r.hops) \(net.elapsed)")
            }
            out.append("\(net.stats)")
            return out
        }
    }

    @Test("two runs of one seed take the same course, to the message and the virtual nanosecond; another seed another")
    func determinism() async throws {
        let a = try await course(seed: 11, loss: 0.05)
        let b = try await course(seed: 11, loss: 0.05)
        let c = try await course(seed: 12, loss: 0.05)
        #expect(a == b)
        #expect(a != c)
    }

    @Test("a lookup that waits out a request timeout costs virtual time, not wall time")
    func virtualTime() async throws {
        let net = SimulatedNetwork(seed: 3, conditions: LinkConditions(latency: .constant(.milliseconds(100))))
        defer { net.stop() }
        let wall = ContinuousClock.now
        let elapsed = try await net.run {
            let t = try await Testnet.start(peers: 30, network: net)
            // A peer everyone knows goes silent: asking it costs a whole request timeout (2 s).
            let quiet = t.nodes[5]
            let ip = try #require(IPAddress(quiet.config.host))
            net.disconnect(try #require(net.host(at: ip)))
            let before = net.elapsed
            _ = try? await t.nodes[1].ping(quiet.address.socket)
            return net.elapsed - before
        }
        #expect(elapsed >= .seconds(2))
        // Two virtual seconds passed; the machine spent far less (generous for a busy machine).
        #expect(ContinuousClock.now - wall < .seconds(60))
    }

    @Test("a lookup whose closest known peers all died since still finds the living closest (only referred peers that fail count against maxFailures)")
    func closestKnownDead() async throws {
        let net = SimulatedNetwork(seed: 7, conditions: LinkConditions(latency: .constant(.milliseconds(20))))
        defer { net.stop() }
        try await net.run {
            let t = try await Testnet.start(peers: 150, network: net)
            let asker = t.nodes[0]
            let key = Number160(hashing: "a neighbourhood that died")
            // Every peer a lookup from the asker starts with (the 40 closest it knows) vanishes
            // without a word: more than `maxFailures` (20) of them.
            let dead = asker.peerMap.closest(to: key, count: 40, includeOverflow: true)
            try #require(dead.count == 40 && asker.peerMap.counts.verified > 50, "the asker knows too few peers")
            for p in dead { net.disconnect(try #require(net.host(at: p.socket.ip))) }
            let r = try await asker.closestPeers(to: key)
            let deadIDs = Set(dead.map(\.id))
            let living = t.nodes.map(\.peerID).filter { !deadIDs.contains($0) && $0 != asker.peerID }
            let trueClosest = Set(living.sorted { key.isCloser($0, than: $1) }.prefix(6))
            #expect(r.peers.count == 20, "\(r.peers.count) peers, stopped by \(r.stop), \(r.failures) failures")
            #expect(Set(r.peers.prefix(6).map(\.id)) == trueClosest)
        }
    }

    @Test("a subnet's places in a lookup go to its closest peers, not its first: a client that knows only its seed finds the seed's neighbour on the same /24")
    func groupPlacesGoToClosest() async throws {
        let net = SimulatedNetwork(seed: 11, conditions: LinkConditions(latency: .constant(.milliseconds(20))))
        defer { net.stop() }
        try await net.run {
            let t = try await Testnet.start(peers: 20, network: net)
            let seed = t.nodes[0]
            let ip = try #require(IPAddress(seed.config.host))
            let host = try #require(net.host(at: ip))
            // A second peer on the seed's subnet (as in a lab, or two servers of one operator).
            let twin = try await net.node(on: net.addHost(onSubnetOf: host)).start()
            try await twin.bootstrap(to: seed.address.socket)
            #expect(seed.peerMap.contains(twin.peerID))
            // A one-shot client: it knows the seed only, and looks up the twin's id with one
            // place per subnet (what the DHT's puts, gets and sends use).
            let client = try await net.node().flags([.firewalledUDP, .firewalledTCP]).start()
            try await client.bootstrap(to: [seed.address.socket], fill: false)
            var routing = client.config.routing
            routing.maxPerIPGroup = 1
            let r = try await client.closestPeers(to: twin.peerID, config: routing)
            #expect(r.peers.first?.id == twin.peerID, "\(r.peers.map(\.socket))")
            #expect(r.peers.filter { $0.ip.sybilGroup == seed.address.ip.sybilGroup }.count == 1, "one place for the subnet: \(r.peers.map(\.socket))")
            for n in [twin, client] { await n.shutdown() }
        }
    }

    @Test("a lookup whose only known peer answers slowly (after two suspicion times, within the request timeout) waits for it instead of ending with nobody")
    func slowOnlyPeer() async throws {
        let net = SimulatedNetwork(seed: 12, conditions: LinkConditions(latency: .constant(.milliseconds(10))))
        defer { net.stop() }
        try await net.run {
            let t = try await Testnet.start(peers: 10, network: net)
            let client = try await net.node().flags([.firewalledUDP, .firewalledTCP]).start()
            try await client.bootstrap(to: [t.nodes[0].address.socket], fill: false)
            // The network slows down (a busy seed, a congested link): round trips of 1 s, where
            // the client measured 20 ms and so suspects a peer after its 200-ms floor.
            net.conditions = LinkConditions(latency: .constant(.milliseconds(500)))
            let r = try await client.closestPeers(to: Number160(hashing: "anywhere"))
            #expect(!r.peers.isEmpty, "stopped by \(r.stop) after \(r.messages) messages, \(r.failures) failures")
            await client.shutdown()
        }
    }

    @Test("a client joined through a seed that still calls itself firewalled (just started, its NAT ladder unfinished) looks up through that seed")
    func firewalledSeed() async throws {
        let net = SimulatedNetwork(seed: 13, conditions: LinkConditions(latency: .constant(.milliseconds(10))))
        defer { net.stop() }
        try await net.run {
            let t = try await Testnet.start(peers: 10, network: net)
            let seed = try await net.node().flags([.firewalledUDP, .firewalledTCP]).start()
            try await seed.bootstrap(to: t.nodes[0].address.socket)
            let client = try await net.node().flags([.firewalledUDP, .firewalledTCP]).start()
            try await client.bootstrap(to: [seed.address.socket], fill: false)
            #expect(client.peerMap.counts.verified == 0, "a firewalled seed stays out of the map")
            let key = Number160(hashing: "through the seed")
            let r = try await client.closestPeers(to: key)
            #expect(r.peers.count >= 6, "stopped by \(r.stop) with \(r.peers.count) peers")
            #expect(r.peers.first?.id == t.trueClosest(to: key, count: 1).first)
            for n in [seed, client] { await n.shutdown() }
        }
    }

    @Test("with 20 % of datagrams lost, lookups in 300 peers still find the true closest")
    func lossyLookups() async throws {
        let net = SimulatedNetwork(seed: 21, conditions: LinkConditions(latency: .uniform(.milliseconds(20), .milliseconds(200)), loss: 0.2))
        defer { net.stop() }
        let recalls = try await net.run {
            let t = try await Testnet.start(peers: 300, network: net)
            var rng = RandomSource(seed: 4).generator
            var out: [Double] = []
            for _ in 0..<50 {
                let asker = t.nodes[Int(rng.next() % 300)]
                let key = Number160.random(using: &rng)
                let r = try await asker.closestPeers(to: key)
                out.append(t.recall(of: r, key: key, asker: asker.peerID))
            }
            return out
        }
        let mean = recalls.reduce(0, +) / Double(recalls.count)
        // A request is sent again after about a round trip, at doubling intervals, so most
        // exchanges get through; but a true closest peer whose exchange still fails is left out
        // of the result, and one that fails three times leaves the maps (0.85 at this seed; it
        // was 0.74 with a fixed one-second resend). Lookups that hold up under loss: issue #22.
        #expect(mean >= 0.8, "mean recall \(mean) under 20 % loss")
        #expect(net.stats.datagramsLost > 0)
    }

    @Test("a partition keeps each side routing among itself, and after it heals the halves find each other again")
    func partitionHeals() async throws {
        let net = SimulatedNetwork(seed: 31, conditions: LinkConditions(latency: .constant(.milliseconds(40))))
        defer { net.stop() }
        let (during, after) = try await net.run {
            let t = try await Testnet.start(peers: 200, network: net)
            let hosts = t.nodes.map { net.host(at: IPAddress($0.config.host)!)! }
            let sideA = Set(t.nodes.prefix(100).map(\.peerID))
            net.partition([Array(hosts.prefix(100)), Array(hosts.dropFirst(100))])
            var rng = RandomSource(seed: 9).generator
            var during: [Double] = []
            for _ in 0..<30 {
                let asker = t.nodes[Int(rng.next() % 100)]
                let key = Number160.random(using: &rng)
                let r = try await asker.closestPeers(to: key)
                let truth = sideA.filter { $0 != asker.peerID }.sorted { ($0 ^ key) < ($1 ^ key) }.prefix(20)
                during.append(Double(r.peers.filter { truth.contains($0.id) }.count) / 20)
            }
            net.heal()
            // Peers that timed out across the split were dropped from the maps; lookups after
            // healing meet them again through peers that kept them.
            for n in t.nodes { _ = try? await n.refreshBuckets() }
            var after: [Double] = []
            for _ in 0..<30 {
                let asker = t.nodes[Int(rng.next() % 200)]
                let key = Number160.random(using: &rng)
                let r = try await asker.closestPeers(to: key)
                after.append(t.recall(of: r, key: key, asker: asker.peerID))
            }
            return (during.reduce(0, +) / 30, after.reduce(0, +) / 30)
        }
        // Lookups right after the split still ask peers across it: each failure costs a timeout,
        // and `maxFailures` (20) ends some lookups before they converge on their own side
        // (0.85 at this seed). Making lookups converge among the living is issue #22's.
        #expect(during >= 0.8, "recall within one side during the partition: \(during)")
        #expect(after >= 0.95, "recall after healing: \(after)")
    }

    @Test("the status page's recent events name each peer that joined or left by its id's first 12 hex digits and its address")
    func statusEvents() async throws {
        let net = SimulatedNetwork(seed: 8, conditions: LinkConditions(latency: .constant(.milliseconds(10))))
        defer { net.stop() }
        let (events, peer) = try await net.run {
            let t = try await Testnet.start(peers: 4, network: net)
            let (a, b) = (t.nodes[0], t.nodes[3])
            _ = a.peerMap.peerFailed(b.peerID, reason: .quit)
            let events = try await a.status().events.map(\.text)
            await t.shutdown()
            return (events, "\(b.peerID.hexString.prefix(12)) at \(b.address.socket)")
        }
        #expect(events.contains("peer joined: \(peer)"), "\(events)")
        #expect(events.last == "peer left: \(peer) (quit)", "\(events)")
    }

    @Test("a request sent again because its reply was lost is carried out once, and answered again")
    func requestsRunOnce() async throws {
        // 30 % of datagrams lost: many replies are lost and their requests sent again.
        let net = SimulatedNetwork(seed: 17, conditions: LinkConditions(latency: .constant(.milliseconds(60)), loss: 0.3))
        defer { net.stop() }
        let seen = NIOLockedValueBox([UInt32]())
        let (answered, resent) = try await net.run {
            let server = try await net.node().command(Counter(seen: seen)).start()
            let client = try await net.node().requestTimeout(.seconds(5)).start()
            var answered = 0
            for _ in 0..<200 {
                if let r = try? await client.request(to: server.address.socket, expectedID: server.peerID, command: CommandID.derive(from: "test.count"),
                                                     transport: .udp).get(), r.type == .ok { answered += 1 }
            }
            return (answered, net.stats.datagramsLost)
        }
        let ids = seen.withLockedValue { $0 }
        #expect(resent > 50, "too little was lost to test anything")
        #expect(Set(ids).count == ids.count, "\(ids.count - Set(ids).count) requests were carried out twice")
        #expect(answered >= 190, "only \(answered) of 200 answered")
    }

    @Test("sixty peers asking one peer at once, their replies lost and requests sent again: each request is carried out once")
    func burstRunsOnce() async throws {
        // 60 requesters at once: more than a small ring of recent requests holds (16 did not).
        let net = SimulatedNetwork(seed: 23, conditions: LinkConditions(latency: .constant(.milliseconds(80)), loss: 0.3))
        defer { net.stop() }
        let seen = NIOLockedValueBox([String]())
        let (answered, lost) = try await net.run {
            let server = try await net.node().command(SenderCounter(seen: seen)).start()
            var clients: [Node] = []
            for _ in 0..<60 { clients.append(try await net.node().requestTimeout(.seconds(5)).start()) }
            let answered = await withTaskGroup(of: Int.self) { group in
                for client in clients {
                    group.addTask {
                        var ok = 0
                        for _ in 0..<4 {
                            if let r = try? await client.request(to: server.address.socket, expectedID: server.peerID,
                                                                 command: CommandID.derive(from: "test.count"), transport: .udp).get(),
                               r.type == .ok { ok += 1 }
                        }
                        return ok
                    }
                }
                return await group.reduce(0, +)
            }
            return (answered, net.stats.datagramsLost)
        }
        let runs = seen.withLockedValue { $0 }
        #expect(lost > 50, "too little was lost to test anything")
        #expect(Set(runs).count == runs.count, "\(runs.count - Set(runs).count) requests were carried out twice")
        #expect(answered >= 228, "only \(answered) of 240 answered")
    }

    @Test("a neighbour that vanished without a word is dropped within seconds by the neighbour watch; at 2 % loss, no living neighbour is dropped in five minutes")
    func neighbourWatch() async throws {
        let net = SimulatedNetwork(seed: 61, conditions: LinkConditions(latency: .uniform(.milliseconds(20), .milliseconds(120)), loss: 0.02))
        defer { net.stop() }
        try await net.run {
            let t = try await Testnet.start(peers: 40, network: net, configure: { _, c in
                c.maintenanceInterval = .seconds(1)
                c.watchedNeighbours = 12
            })
            let watcher = t.nodes[0]
            let clock = NodeClock(loop: net.loop)
            var dropped: [Number160] = []
            let near = watcher.peerMap.closest(to: watcher.peerID, count: 12).map(\.id)
            try #require(near.count == 12)
            // Five minutes of 2 % loss: every watched neighbour is alive, none may go.
            for _ in 0..<300 {
                try await clock.sleep(for: .seconds(1))
                for id in near where !watcher.peerMap.contains(id) && !dropped.contains(id) { dropped.append(id) }
            }
            #expect(dropped.isEmpty, "\(dropped.count) living neighbours dropped")
            // The closest neighbour vanishes: gone from the map within 10 s (the routine check
            // of a peer up for five minutes comes after minutes).
            let victim = try #require(t.nodes.first { $0.peerID == near[0] })
            net.disconnect(try #require(net.host(at: victim.address.socket.ip)))
            let start = net.elapsed
            while watcher.peerMap.contains(victim.peerID), net.elapsed - start < .seconds(60) {
                try await clock.sleep(for: .milliseconds(100))
            }
            #expect(!watcher.peerMap.contains(victim.peerID))
            #expect(net.elapsed - start <= .seconds(10), "dropped after \(net.elapsed - start)")
        }
    }
}
