import NIOConcurrencyHelpers
import Testing
@testable import P2PKernel
import P2PTesting

/// The overlay's routing on the simulated network: the real kernel, no sockets, virtual time.
@Suite("Overlay")
struct NetworkTests {
    /// Runs `body` on a fresh simulated network (constant 20 ms round trips unless given).
    static func simulate<T: Sendable>(seed: UInt64, _ conditions: LinkConditions = LinkConditions(latency: .constant(.milliseconds(20))),
                                      _ body: @escaping @Sendable (SimulatedNetwork) async throws -> T) async throws -> T {
        let net = SimulatedNetwork(seed: seed, conditions: conditions)
        defer { net.stop() }
        return try await net.run { try await body(net) }
    }

    @Test("200 peers bootstrap through one seed and all know the network")
    func bootstrap200() async throws {
        try await NetworkTests.simulate(seed: 200) { sim in
            let net = try await Testnet.start(peers: 200, network: sim)
            for node in net.nodes {
                #expect(node.peerMap.counts.verified >= 20, "peer \(node.peerID) knows too few peers")
            }
            // The seed heard from every joiner first-hand.
            #expect(net.nodes[0].peerMap.counts.verified + net.nodes[0].peerMap.counts.overflow >= 60)
        }
    }

    @Test("in a 500-peer network every lookup finds >= 95% of the true 20 closest, median 100%")
    func recall500() async throws {
        try await NetworkTests.simulate(seed: 500, LinkConditions(latency: .world)) { sim in
            let net = try await Testnet.start(peers: 500, network: sim)
            var rng = SplitMix64(seed: 500)
            var recalls: [Double] = []
            for _ in 0..<100 {
                let asker = net.nodes[Int(rng.next() % 500)]
                let key = Number160.random(using: &rng)
                let result = try await asker.closestPeers(to: key)
                #expect(result.peers.count == 20)
                recalls.append(net.recall(of: result, key: key, asker: asker.peerID))
            }
            recalls.sort()
            #expect(recalls.first ?? 0 >= 0.95)
            #expect(recalls[recalls.count / 2] == 1.0)
        }
    }

    @Test("a lookup for a peer's own id puts that peer first")
    func lookupFindsExactPeer() async throws {
        try await NetworkTests.simulate(seed: 50) { sim in
            let net = try await Testnet.start(peers: 50, routing: .perfect, network: sim)
            let target = net.nodes[17].peerID
            let result = try await net.nodes[3].closestPeers(to: target)
            #expect(result.peers.first?.id == target)
            #expect(result.stop == .converged)
        }
    }

    @Test("a peer that quits is removed at once from the maps of the neighbours it talked to")
    func quitRemovesAtOnce() async throws {
        try await NetworkTests.simulate(seed: 10) { sim in
            let net = try await Testnet.start(peers: 10, routing: .perfect, network: sim)
            let leaving = net.nodes[5]
            // Quit goes to the peers the leaving node has a session with: here, everyone it pinged.
            for n in net.nodes where n !== leaving { _ = try await leaving.ping(n.address.socket) }
            let removed = NIOLockedValueBox([Number160]())
            for n in net.nodes where n !== leaving {
                n.peerMap.onChange { event in
                    if case .removed(let p, .quit) = event { removed.withLockedValue { $0.append(p.id) } }
                }
            }
            await leaving.shutdown()
            // One one-way delay later every quit has landed.
            try await NodeClock(loop: sim.loop).sleep(for: .milliseconds(50))
            let seen = removed.withLockedValue { $0 }
            #expect(seen.count == 9)
            #expect(seen.allSatisfy { $0 == leaving.peerID })
            for n in net.nodes where n !== leaving {
                #expect(!n.peerMap.contains(leaving.peerID))
            }
        }
    }

    @Test("three failures in a row mark a peer offline")
    func threeFailuresOffline() async throws {
        try await NetworkTests.simulate(seed: 3) { sim in
            // A host nothing runs on: requests to it time out (in virtual time).
            let dead = PeerAddress(id: Number160(hashing: "gone"), socket: PeerSocketAddress(ip: sim.addHost().ip, port: 4000))
            let a = try await sim.node().requestTimeout(.milliseconds(200)).start()
            a.peerMap.peerFound(dead, verified: true)
            let events = NIOLockedValueBox([PeerMapEvent]())
            a.peerMap.onChange { e in events.withLockedValue { $0.append(e) } }
            for attempt in 1...3 {
                await #expect(throws: RPCError.self) { try await a.request(to: dead, command: KernelCommands.ping) }
                if attempt < 3 {
                    #expect(a.peerMap.failureCount(dead.id) == attempt)
                }
            }
            #expect(!a.peerMap.contains(dead.id))
            #expect(a.peerMap.isBanned(dead.id))
            #expect(events.withLockedValue { $0 } == [.removed(dead, reason: .offline)])
            // While banned, hearsay does not bring it back.
            #expect(!a.peerMap.peerFound(dead, verified: false))
        }
    }

    @Test("discover reports a public peer as reachable at the address it was seen from")
    func discoverReachable() async throws {
        try await NetworkTests.simulate(seed: 4) { sim in
            let a = try await sim.node().start(), b = try await sim.node().start()
            let result = try await a.discover(via: b.address.socket)
            #expect(result.udpReachable && result.tcpReachable)
            #expect(result.observed.ip == IPAddress(a.config.host))
            #expect(result.observed.udpPort == a.address.udpPort)
            #expect(result.reachability == .reachable)
        }
    }

    @Test("maintenance pings peers that are due and drops the dead ones")
    func maintenanceDropsDeadPeers() async throws {
        try await NetworkTests.simulate(seed: 5) { sim in
            let dead = PeerAddress(id: Number160(hashing: "gone"), socket: PeerSocketAddress(ip: sim.addHost().ip, port: 4000))
            var cfg = PeerMapConfig()
            cfg.checkIntervals = [.milliseconds(1)]
            let a = try await sim.node().requestTimeout(.milliseconds(100)).peerMap(cfg).maintenance(.milliseconds(50)).start()
            a.peerMap.peerFound(dead, verified: true)
            let clock = NodeClock(loop: sim.loop)
            for _ in 0..<100 where a.peerMap.contains(dead.id) { try await clock.sleep(for: .milliseconds(20)) }
            #expect(!a.peerMap.contains(dead.id))
        }
    }
}

@Suite("Peer map")
struct PeerMapTests {
    @Test("verified peers fill buckets up to k; the rest wait in overflow")
    func bucketsBounded() {
        let me = Number160.zero
        let map = PeerMap(selfID: me)
        // All of these land in the top bucket (bit 159 set).
        for i in 0..<40 {
            let id = Number160(high: 1 << 63, middle: 0, low: UInt32(i))
            map.peerFound(PeerAddress(id: id, socket: PeerSocketAddress(ip: .loopback, port: UInt16(1000 + i))), verified: true)
        }
        #expect(map.counts.verified == 20)
        #expect(map.counts.overflow == 5)
        #expect(map.bucketIndex(of: Number160(high: 1 << 63, middle: 0, low: 0)) == 159)
        #expect(map.bucketIndex(of: Number160(1)) == 0)
        #expect(map.bucketIndex(of: me) == nil)
    }

    @Test("buckets near our own id and far from it: occupancy per bucket, closest in XOR order across them, maintenance reaches every one")
    func bucketsNearAndFar() {
        var rng = SplitMix64(seed: 4)
        let me = Number160.random(using: &rng)
        let map = PeerMap(selfID: me, config: { var c = PeerMapConfig(); c.checkIntervals = [.zero]; return c }())
        // One peer in each of buckets 0, 1, 40, 100 and 159 (the distance's highest bit), 30 more at random.
        let near = [Number160(1), Number160(2), Number160(high: 0, middle: 1 << 8, low: 0), Number160(high: 1 << 4, middle: 0, low: 0), Number160(high: 1 << 63, middle: 0, low: 0)]
        for (i, d) in near.enumerated() {
            #expect(map.peerFound(PeerAddress(id: me ^ d, socket: PeerSocketAddress(ip: .loopback, port: UInt16(100 + i))), verified: true))
        }
        for i in 0..<30 { map.peerFound(PeerAddress(id: .random(using: &rng), socket: PeerSocketAddress(ip: .loopback, port: UInt16(200 + i))), verified: true) }
        let occupancy = map.bucketOccupancy
        #expect(occupancy.count == 160)
        #expect(occupancy.reduce(0, +) == map.counts.verified)
        #expect(occupancy[0] == 1 && occupancy[1] == 1 && occupancy[40] == 1 && occupancy[100] == 1)
        #expect(Set(map.verifiedPeers.map(\.id)).count == map.counts.verified)
        for key in [me, me ^ Number160(3), Number160.random(using: &rng)] {
            let expected = map.verifiedPeers.map(\.id).sorted { ($0 ^ key) < ($1 ^ key) }.prefix(8)
            #expect(map.closest(to: key, count: 8).map(\.id) == Array(expected))
        }
        #expect(Set(map.dueForCheck(limit: 1_000).map(\.id)) == Set(map.verifiedPeers.map(\.id)))
    }

    @Test("closest returns peers in XOR order")
    func closestInOrder() {
        var rng = SplitMix64(seed: 9)
        let map = PeerMap(selfID: .random(using: &rng))
        var ids: [Number160] = []
        for i in 0..<300 {
            let id = Number160.random(using: &rng)
            if map.peerFound(PeerAddress(id: id, socket: PeerSocketAddress(ip: .loopback, port: UInt16(i + 1))), verified: true) { ids.append(id) }
        }
        let key = Number160.random(using: &rng)
        let verified = Set(map.verifiedPeers.map(\.id))
        let expected = verified.sorted { ($0 ^ key) < ($1 ^ key) }.prefix(20)
        #expect(map.closest(to: key, count: 20).map(\.id) == Array(expected))
    }

    @Test("one /24 holds at most 2 places per bucket and 8 in the map; other subnets and loopback are not limited; leaving frees the place")
    func ipGroupLimits() throws {
        let map = PeerMap(selfID: .zero)
        func top(_ i: Int) -> Number160 { Number160(high: 1 << 63, middle: UInt64(i), low: 0) }        // bucket 159
        func ip(_ subnet: UInt32, _ host: UInt32) -> IPAddress { .v4(0x0A00_0000 | subnet << 8 | host) }  // 10.0.subnet.host
        var accepted = 0
        for i in 0..<10 {
            if map.peerFound(PeerAddress(id: top(i), socket: PeerSocketAddress(ip: ip(1, UInt32(i + 1)), port: 4000)), verified: true) { accepted += 1 }
        }
        #expect(accepted == 2)
        // The same /24 across many buckets: 8 in all.
        for bit in 100..<130 {
            let id = Number160(high: 0, middle: 1 << UInt64(bit - 97), low: UInt32(bit))  // a bucket each
            _ = map.peerFound(PeerAddress(id: id, socket: PeerSocketAddress(ip: ip(1, 200), port: UInt16(5000 + bit))), verified: true)
        }
        let fromSubnet = map.verifiedPeers.filter { $0.ip.sybilGroup == ip(1, 1).sybilGroup }.count + map.counts.overflow
        #expect(fromSubnet <= 8)
        #expect(map.refusedByIPGroupCount > 0)
        // Another /24 and loopback still get in.
        #expect(map.peerFound(PeerAddress(id: top(50), socket: PeerSocketAddress(ip: ip(2, 1), port: 4000)), verified: true))
        for i in 60..<70 { _ = map.peerFound(PeerAddress(id: top(i), socket: PeerSocketAddress(ip: .loopback, port: UInt16(4000 + i))), verified: true) }
        #expect(map.verifiedPeers.filter { $0.ip.isLoopback }.count == 10)
        // A subnet peer that leaves frees its place for another of the same subnet.
        let first = try #require(map.verifiedPeers.first { $0.ip.sybilGroup == ip(1, 1).sybilGroup && $0.id.high == 1 << 63 })
        map.peerFailed(first.id, reason: .quit)
        #expect(map.peerFound(PeerAddress(id: top(99), socket: PeerSocketAddress(ip: ip(1, 99), port: 4000)), verified: true))
        // And a known peer cannot move into a subnet that is full.
        let other = PeerAddress(id: top(50), socket: PeerSocketAddress(ip: ip(1, 77), port: 4000))
        map.peerFound(other, verified: true)
        #expect(map.verifiedPeer(top(50))?.ip == ip(2, 1))
    }
}
