import P2PDHT
import P2PKernel
import P2PTesting
import Testing
import P2PTestSupport

@Suite("DHT", .serialized)
struct DHTTests {
    @Test("10 peers: peer 3 stores \"hallo\", peer 7 gets \"hallo\"")
    func halloAcrossPeers() async throws {
        let net = try await testnet(10, routing: .bootstrap)
        let k = key("greeting")
        let put = try await net.nodes[3].dht.put(k, Array("hallo".utf8))
        #expect(put.isSuccess)
        #expect(put.statuses.count == DHTOptions.defaultReplicaSet, "a write goes to the whole replica set")
        let got = try await net.nodes[7].dht.get(k)
        #expect(text(got.value) == "hallo")
        await net.shutdown()
    }

    @Test("two adds under one key from different peers: get-all returns both")
    func addsFromTwoPeers() async throws {
        let net = try await testnet(20)
        let location = Number160(hashing: "songs")
        let (k1, r1) = try await net.nodes[1].dht.add(location: location, Array("first".utf8))
        let (k2, r2) = try await net.nodes[2].dht.add(location: location, Array("second".utf8))
        #expect(r1.isSuccess && r2.isSuccess)
        #expect(k1 != k2)
        #expect(k1.content == Number160(sha1Of: Array("first".utf8)))
        let all = try await net.nodes[9].dht.get(.all(location: location))
        #expect(Set(all.entries.values.map { String(decoding: $0, as: UTF8.self) }) == ["first", "second"])
        // In list mode equal values are kept apart.
        _ = try await net.nodes[3].dht.add(location: location, Array("first".utf8), list: true)
        #expect(try await net.nodes[4].dht.get(.all(location: location)).entries.count == 3)
        await net.shutdown()
    }

    @Test("in a 1,000-peer network a put to a replica set of 3 lands on exactly the 3 closest peers, and 1,000 gets from 1,000 peers find it")
    func thousandPeers() async throws {
        let net = try await testnet(1000)
        let k = key("the answer")
        let writer = net.nodes[500]
        let put = try await writer.dht.put(k, Array("42".utf8), options: DHTOptions(replicaSet: 3))
        #expect(put.isSuccess)
        let closest = net.trueClosest(to: k.location, count: 4)
        let byID = Dictionary(uniqueKeysWithValues: net.nodes.map { ($0.peerID, $0) })
        for id in closest.prefix(3) { #expect(try holds(try #require(byID[id]), k), "closest peer \(id) lacks the value") }
        #expect(try !holds(try #require(byID[closest[3]]), k), "the 4th closest peer holds it")
        #expect(try net.nodes.filter { try holds($0, k) }.count == 3)

        let found = try await withThrowingTaskGroup(of: Bool.self) { group in
            var next = 0, ok = 0
            while next < 32 { let n = net.nodes[next]; next += 1; group.addTask { text(try await n.dht.get(k).value) == "42" } }
            while let r = try await group.next() {
                if r { ok += 1 }
                if next < net.nodes.count { let n = net.nodes[next]; next += 1; group.addTask { text(try await n.dht.get(k).value) == "42" } }
            }
            return ok
        }
        #expect(found == 1000)
        await net.shutdown()
    }

    @Test("with one replica, puts and gets work from every peer, the holder itself included")
    func singleReplica() async throws {
        let net = try await testnet(12)
        let one = DHTOptions(replicas: 1, replicaSet: 1)
        for (i, node) in net.nodes.enumerated() {
            let k = key("single \(i)")
            #expect(try await node.dht.put(k, Array("v\(i)".utf8), options: one).isSuccess)
            let holder = try #require(try net.nodes.first { try holds($0, k) })
            #expect(text(try await holder.dht.get(k, options: one).value) == "v\(i)")
            #expect(text(try await net.nodes[(i + 5) % 12].dht.get(k, options: one).value) == "v\(i)")
            #expect(try net.nodes.filter { try holds($0, k) }.count == 1)
        }
        await net.shutdown()
    }

    @Test("remove, then get returns nothing; remove can return what it removed")
    func removeThenGet() async throws {
        let net = try await testnet(12)
        let k = key("ephemeral")
        try await net.nodes[0].dht.put(k, Array("x".utf8))
        #expect(text(try await net.nodes[5].dht.get(k).value) == "x")
        let removed = try await net.nodes[6].dht.remove(.keys([k]), returnValues: true)
        #expect(text(removed.entries[k]) == "x")
        #expect(try await net.nodes[7].dht.get(k).isEmpty)
        #expect(try net.nodes.allSatisfy { try !holds($0, k) })
        await net.shutdown()
    }

    @Test("a value with a TTL of 1 s is gone after 3 s")
    func ttlExpires() async throws {
        let net = try await testnet(8)
        let k = key("short-lived")
        try await net.nodes[1].dht.put(k, Array("soon gone".utf8), options: DHTOptions(ttl: .seconds(1)))
        #expect(text(try await net.nodes[2].dht.get(k).value) == "soon gone")
        try await Task.sleep(for: .seconds(3))
        #expect(try await net.nodes[3].dht.get(k).isEmpty)
        // Swept from memory too, not only hidden.
        #expect(try net.nodes.allSatisfy { try !holds($0, k) })
        await net.shutdown()
    }

    @Test("an idle node's storage sleeps while nothing expires, and a value put then is swept soon after its TTL (virtual time)")
    func sweepsWhenDue() async throws {
        let net = SimulatedNetwork(seed: 5, conditions: LinkConditions(latency: .constant(.milliseconds(20))))
        defer { net.stop() }
        try await net.run {
            let t = try await Testnet.start(peers: 10, routing: .perfect, network: net, plugins: { _ in [DHTPlugin()] })
            let clock = NodeClock(loop: net.loop)
            // Ten idle minutes: a sweep every second would be 6,000 jobs on the loop; waking
            // once a minute at most, 100.
            let before = net.loop.jobsRun
            try await clock.sleep(for: .seconds(600))
            #expect(net.loop.jobsRun - before <= 200)
            // A write brings the sleeping sweep forward: gone from every backend, not only hidden.
            let k = key("short-lived")
            try await t.nodes[1].dht.put(k, Array("v".utf8), options: DHTOptions(ttl: .seconds(20)))
            #expect(try t.nodes.contains { try holds($0, k) })
            try await clock.sleep(for: .seconds(22))
            #expect(try t.nodes.allSatisfy { try !holds($0, k) })
            await t.shutdown()
        }
    }

    @Test("putMeta changes the TTL without resending the value")
    func putMetaChangesTTL() async throws {
        let net = try await testnet(8)
        let k = key("meta")
        try await net.nodes[1].dht.put(k, Array("v".utf8), options: DHTOptions(ttl: .seconds(1)))
        let meta = try await net.nodes[2].dht.putMeta([k], ttl: nil)
        #expect(meta.isSuccess)
        try await Task.sleep(for: .milliseconds(2_200))
        #expect(text(try await net.nodes[3].dht.get(k).value) == "v")
        await net.shutdown()
    }

    @Test("putIfAbsent on an existing key reports failed-not-absent and keeps the value")
    func putIfAbsent() async throws {
        let net = try await testnet(8)
        let k = key("unique")
        #expect(try await net.nodes[1].dht.putIfAbsent(k, Array("one".utf8)).status(of: k) == .ok)
        let second = try await net.nodes[2].dht.putIfAbsent(k, Array("two".utf8))
        #expect(second.status(of: k) == .failedNotAbsent)
        #expect(!second.isSuccess)
        #expect(text(try await net.nodes[3].dht.get(k).value) == "one")
        await net.shutdown()
    }

    @Test("a version fork is reported, and getLatest returns the heads")
    func versionFork() async throws {
        let net = try await testnet(8)
        let base = key("document")
        let v1 = Number640(location: base.location, domain: base.domain, content: .zero, version: Number160(1))
        let v2 = Number640(location: base.location, domain: base.domain, content: .zero, version: Number160(2))
        let v3 = Number640(location: base.location, domain: base.domain, content: .zero, version: Number160(3))
        #expect(try await net.nodes[1].dht.put(v1, Array("v1".utf8)).status(of: v1) == .ok)
        #expect(try await net.nodes[2].dht.put(v2, Array("v2".utf8), basedOn: [Number160(1)]).status(of: v2) == .ok)
        #expect(Set(try await net.nodes[3].dht.getLatest(location: base.location).entries.keys) == [v2])
        // v3 is also based on v1 only: it does not supersede v2, so the item forks.
        let fork = try await net.nodes[4].dht.put(v3, Array("v3".utf8), basedOn: [Number160(1)])
        #expect(fork.status(of: v3) == .versionFork)
        #expect(Set(try await net.nodes[5].dht.getLatest(location: base.location).entries.keys) == [v2, v3])
        await net.shutdown()
    }

    @Test("a prepared put is invisible until confirmed")
    func twoPhasePut() async throws {
        let net = try await testnet(8)
        let k = key("two-phase")
        #expect(try await net.nodes[1].dht.prepare(k, Array("draft".utf8)).isSuccess)
        #expect(try await net.nodes[2].dht.get(k).isEmpty)
        #expect(try await net.nodes[3].dht.confirm([k]).isSuccess)
        #expect(text(try await net.nodes[2].dht.get(k).value) == "draft")
        await net.shutdown()
    }

    @Test("digest and range results match what was stored")
    func digestAndRange() async throws {
        let net = try await testnet(10)
        let location = Number160(hashing: "catalogue")
        var entries: [Number640: StoredValue] = [:]
        for i in 0..<10 {
            entries[Number640(location: location, content: Number160(UInt32(i)))] = StoredValue(Array("item \(i)".utf8), basedOn: i > 0 ? [Number160(UInt32(i - 1))] : [])
        }
        #expect(try await net.nodes[1].dht.put(entries).isSuccess)
        let keys = entries.keys.sorted()
        let digest = try await net.nodes[2].dht.digest(.all(location: location))
        #expect(digest.count == 10)
        for (k, v) in entries { #expect(digest[k] == v.basedOn) }
        let up = try await net.nodes[3].dht.get(.range(from: keys[2], to: keys[7], limit: 3, descending: false))
        #expect(up.entries.keys.sorted() == Array(keys[2...4]))
        let down = try await net.nodes[4].dht.get(.range(from: keys[2], to: keys[7], limit: 3, descending: true))
        #expect(down.entries.keys.sorted() == Array(keys[5...7]))
        #expect(text(down.entries[keys[7]]) == "item 7")
        let some = try await net.nodes[5].dht.get(.keys([keys[0], keys[9]]))
        #expect(Set(some.entries.keys) == [keys[0], keys[9]])
        await net.shutdown()
    }

    @Test("PeerVote: 50 peers each vote 1 on one key and a get returns 50")
    func fiftyVotes() async throws {
        let net = try await testnet(50)
        let ballot = key("ballot", domain: PeerVotePluginDomain.vote)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for node in net.nodes {
                group.addTask {
                    let r = try await node.dht.put(ballot, Array("1".utf8))
                    #expect(r.isSuccess)
                }
            }
            try await group.waitForAll()
        }
        #expect(text(try await net.nodes[0].dht.get(ballot).value) == "50")
        // A put outside the vote domain still overwrites.
        let plain = key("ballot")
        try await net.nodes[1].dht.put(plain, Array("1".utf8))
        try await net.nodes[2].dht.put(plain, Array("1".utf8))
        #expect(text(try await net.nodes[3].dht.get(plain).value) == "1")
        await net.shutdown()
    }

    @Test("majority vote ignores a minority of peers that answer with different data")
    func majorityVote() async throws {
        let net = try await testnet(30)
        let k = key("contested")
        let five = DHTOptions(replicas: 5)
        try await net.nodes[0].dht.put(k, Array("truth".utf8), options: five)
        // Two of the holders are corrupted directly in their own storage: other bytes under the
        // same version (a peer answering with a newer version than the truth would win: only
        // signed data is safe from that).
        let holders = try net.nodes.filter { try holds($0, k) }
        #expect(holders.count == DHTOptions.defaultReplicaSet)
        for bad in holders.prefix(2) {
            let store = try #require(bad.registry.storageBackend as? MemoryStorage)
            var state = store.snapshot()
            let held = try #require(state.entries[k] ?? nil)
            var lie = held
            lie.stored.value = Array("lies".utf8)
            state.entries[k] = lie
            store.restore(state, now: StoragePipeline.now())
        }
        let reader = try #require(net.nodes.first { n in !holders.contains { $0 === n } })
        let got = try await reader.dht.get(k, options: five)
        #expect(Set(got.perPeer.values.compactMap { text($0[k]?.value) }) == ["truth", "lies"])
        #expect(text(got.value) == "truth")
        var first = five
        first.evaluation = "union"
        #expect(text(try await reader.dht.get(k, options: first).value) == "truth")
        await net.shutdown()
    }

    @Test("a routed send reaches the peers closest to the key and their replies are evaluated")
    func routedSend() async throws {
        let net = try await testnet(15)
        var options = DHTOptions()
        options.evaluation = "first"
        let result = try await net.nodes[2].dht.send(to: Number160(hashing: "anyone"), Array("ping".utf8), options: options)
        #expect(result.replies.count == 3)
        #expect(text(result.reply) == "echo:ping")
        await net.shutdown()
    }
}

/// The vote domain, spelled once for the tests.
enum PeerVotePluginDomain {
    static let vote = Number160(hashing: "vote")
}
