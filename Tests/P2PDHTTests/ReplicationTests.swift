import Crypto
import NIOCore
import P2PDHT
import P2PEvaluation
import P2PKernel
import P2PReplication
import P2PStorage
import P2PTesting
import Testing
import P2PTestSupport

@Suite("Replication", .serialized)
struct ReplicationTests {
    @Test("responsibility: the replica set is the factor closest (self included); 0-root: only the closest copies, n-root: every member does")
    func responsibility() {
        let (a, b, c, d) = (Number160(0x0a), Number160(0x0b), Number160(0x0c), Number160(0x0d))
        // Key a with b, c, d known: by XOR a 0, b 1, c 6, d 7.
        #expect(Responsibility.replicaSet(of: a, me: a, peers: [d, c, b], factor: 3) == [a, b, c])
        #expect(Responsibility.isResponsible(.zeroRoot, for: a, me: a, peers: [b, c, d], factor: 3))
        #expect(!Responsibility.isResponsible(.zeroRoot, for: a, me: b, peers: [a, c, d], factor: 3))
        #expect(Responsibility.isResponsible(.nRoot, for: a, me: b, peers: [a, c, d], factor: 3))
        #expect(!Responsibility.isResponsible(.nRoot, for: a, me: d, peers: [a, b, c], factor: 3))
        #expect(Responsibility.targets(.zeroRoot, for: a, me: a, peers: [b, c, d], factor: 3) == [b, c])
        // Not responsible: 0-root hands its copy to the root, n-root to the replica set.
        #expect(Responsibility.targets(.zeroRoot, for: a, me: d, peers: [a, b, c], factor: 3) == [a])
        #expect(Responsibility.targets(.nRoot, for: a, me: d, peers: [a, b, c], factor: 3) == [a, b, c])
        // Factor 1: nobody else holds it.
        #expect(Responsibility.targets(.nRoot, for: b, me: b, peers: [a, c, d], factor: 1).isEmpty)
        // Key b with a alone known (the "+b" step of TomP2P's tables, seen from a): a is not the
        // root of b at factor 1 and hands its copy to b; at factor 2 it is a replica in n-root.
        #expect(Responsibility.targets(.zeroRoot, for: b, me: a, peers: [b], factor: 1) == [b])
        #expect(Responsibility.isResponsible(.nRoot, for: b, me: a, peers: [b], factor: 2))
    }

    static func holders(_ nodes: [Node], _ key: Number640) -> [Node] {
        nodes.filter { n in
            guard case .values(let v, _)? = try? n.registry.storageBackend?.execute(.get(.keys([key])), now: StoragePipeline.now()) else { return false }
            return !v.isEmpty
        }
    }

    @Test("11 peers, factor 6, 1 s interval: five of the six holders vanish without a word, and the six closest survivors come to hold the value")
    func consistency() async throws {
        let net = try await Testnet.start(peers: 11, routing: .perfect, plugins: { _ in
            builtIns() + [ReplicationPlugin(IndirectReplication(mode: .nRoot, factor: 6, interval: .seconds(1)))]
        }, configure: { _, c in
            c.requestTimeout = .seconds(1)
            // As a running node does: peers are pinged now and then, so the dead are noticed.
            c.maintenanceInterval = .seconds(1)
        })
        let key = Number640(location: .max)
        #expect(try await net.nodes[5].dht.put(key, Array("survives".utf8), options: DHTOptions(replicas: 6)).isSuccess)
        let first = Self.holders(net.nodes, key)
        #expect(first.count >= 6)
        // Five holders other than the writer vanish (no quit).
        let dead = Array(first.filter { $0 !== net.nodes[5] }.prefix(5))
        for n in dead { await n.shutdown(announce: false) }
        let alive = net.nodes.filter { n in !dead.contains { $0 === n } }
        let closest = Set(net.trueClosest(to: key.location, count: 11).filter { id in alive.contains { $0.peerID == id } }.prefix(6))
        let clock = ContinuousClock()
        let start = clock.now
        var holding: Set<Number160> = []
        while clock.now - start < .seconds(60) {
            holding = Set(Self.holders(alive, key).map(\.peerID))
            if closest.isSubset(of: holding) { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(closest.isSubset(of: holding), "the six closest survivors: \(closest.count), holding: \(holding.intersection(closest).count)")
        print("replication: the six closest survivors held the value after \(clock.now - start)")
        await net.shutdown()
    }

    @Test("peers whose timers ran while they stored nothing still replicate what arrives later")
    func emptyRoundsThenData() async throws {
        let policies = (0..<8).map { _ in IndirectReplication(mode: .nRoot, factor: 4, interval: .milliseconds(200)) }
        let net = try await Testnet.start(peers: 8, routing: .perfect, plugins: { i in builtIns() + [ReplicationPlugin(policies[i])] })
        #expect(try await Self.eventually { policies.allSatisfy { $0.stats.rounds >= 3 } })
        // Stored on one peer only; replication must bring it to the four closest.
        let key = Number640(location: Number160(hashing: "late"))
        #expect(try await net.nodes[0].dht.put(key, [3], options: DHTOptions(replicas: 1)).isSuccess)
        let closest = Set(net.trueClosest(to: key.location, count: 4))
        #expect(try await Self.eventually { Set(Self.holders(net.nodes, key).map(\.peerID)).isSuperset(of: closest) })
        await net.shutdown()
    }

    @Test("peers that take no replicas (one without the replication plugin, one without storage) are passed over, not suspected dead: the closest peers that store hold the data, and no offer counts as failed")
    func peersThatTakeNoReplicas() async throws {
        let policies = (0..<9).map { _ in IndirectReplication(mode: .nRoot, factor: 3, interval: .milliseconds(300)) }
        let net = try await Testnet.start(peers: 9, routing: .perfect, plugins: { i in
            switch i {
            // A routing-only node: its storage command refuses writes; no replication command.
            case 0: [DHTPlugin(acceptsReplicas: false), EvaluationPlugin()]
            // Replication without any storage: it answers offers "no storage here".
            case 1: [ReplicationPlugin(policies[i]), EvaluationPlugin()]
            default: builtIns() + [ReplicationPlugin(policies[i])]
            }
        }, configure: { _, c in c.requestTimeout = .seconds(5) })
        let storing = Array(net.nodes[2...])
        // Each key sits on a peer that stores nothing: it is the closest there, yet no replica.
        for (i, n) in net.nodes.prefix(2).enumerated() {
            let key = Number640(location: n.peerID)
            _ = try await storing[i].dht.put(key, [UInt8(i)], options: DHTOptions(replicas: 1))
            let closest = Set(storing.map(\.peerID).sorted { key.location.isCloser($0, than: $1) }.prefix(3))
            #expect(try await Self.eventually { Set(Self.holders(storing, key).map(\.peerID)).isSuperset(of: closest) }, "key \(i)")
        }
        let running = policies[2...]  // (node 0 runs no policy; node 1 has nothing to replicate)
        let rounds = running.map(\.stats.rounds)
        #expect(try await Self.eventually { zip(running, rounds).allSatisfy { $0.stats.rounds >= $1 + 3 } })
        let refused = running.reduce(0) { $0 + $1.stats.refusedOffers }, failed = running.reduce(0) { $0 + $1.stats.failedOffers }
        #expect(refused > 0 && failed == 0, "refused \(refused), failed \(failed)")
        await net.shutdown()
    }

    @Test("a removed value is not brought back by replication")
    func removedStaysRemoved() async throws {
        let policies = (0..<8).map { _ in IndirectReplication(mode: .nRoot, factor: 4, interval: .seconds(1)) }
        let net = try await Testnet.start(peers: 8, routing: .perfect, plugins: { i in builtIns() + [ReplicationPlugin(policies[i])] })
        let key = Number640(location: Number160(hashing: "gone"))
        #expect(try await net.nodes[0].dht.put(key, [1], options: DHTOptions(replicas: 4)).isSuccess)
        // Wait until the replicas hold it, then remove it from all but one holder, as a remove
        // that missed a peer would.
        let clock = ContinuousClock()
        let start = clock.now
        while Self.holders(net.nodes, key).count < 4, clock.now - start < .seconds(30) { try await Task.sleep(for: .milliseconds(100)) }
        let holders = Self.holders(net.nodes, key)
        #expect(holders.count >= 4)
        for h in holders.dropFirst() {
            // As the DHT does after a remove: the policies learn it before anything else lands.
            h.replicate(.dataRemoved([key]))
            _ = try await h.storage.execute(.remove(.keys([key]), returnValues: false), sender: nil, node: h)
        }
        // After the remaining holder has offered it three more times, the removed copies are
        // still gone (each offer was answered "not wanted").
        let keeper = try #require(holders.first)
        let policy = try #require(net.nodes.firstIndex { $0 === keeper }.map { policies[$0] })
        let offered = policy.stats.offers
        let wait = clock.now
        while policy.stats.offers < offered + 3, clock.now - wait < .seconds(30) { try await Task.sleep(for: .milliseconds(100)) }
        #expect(policy.stats.offers >= offered + 3)
        // The removals are newer than the copy the remaining holder kept: anti-entropy carries
        // them to it (the offers push them back), and no peer holds the value any more.
        #expect(Self.holders(net.nodes, key).isEmpty)
        await net.shutdown()
    }

    @Test("a location of many keys is compared by its summary: unchanged, no key list travels; a newer version on one replica reaches the others; a malformed summary is refused")
    func summaries() async throws {
        let policies = (0..<4).map { _ in IndirectReplication(mode: .nRoot, factor: 3, interval: .seconds(1)) }
        let net = try await Testnet.start(peers: 4, routing: .perfect, plugins: { i in builtIns() + [ReplicationPlugin(policies[i])] })
        let location = Number160(hashing: "many keys")
        let keys = (0..<10).map { Number640(location: location, content: Number160(UInt32($0))) }
        for k in keys { #expect(try await net.nodes[0].dht.put(k, [1], options: DHTOptions(replicas: 3)).isSuccess) }
        #expect(try await Self.eventually { keys.allSatisfy { Self.holders(net.nodes, $0).count >= 3 } })
        // Rounds go on; once every pair has been brought up to date, only summaries travel.
        #expect(try await Self.eventually { policies.reduce(0) { $0 + $1.stats.summaries } >= 12 })
        let offered = policies.reduce(0) { $0 + $1.stats.keysOffered }
        let summaries = policies.reduce(0) { $0 + $1.stats.summaries }
        #expect(try await Self.eventually { policies.reduce(0) { $0 + $1.stats.summaries } >= summaries + 12 })
        // (Unless a request went unanswered — on a busy machine — and the fourth peer stood in
        // as a spare: it lacked the location, so its summary differed and the list was offered.)
        let keysSince = policies.reduce(0) { $0 + $1.stats.keysOffered } - offered
        let failed = policies.reduce(0) { $0 + $1.stats.failedOffers }
        #expect(keysSince == 0 || failed > 0, "\(keysSince) keys offered, \(failed) offers failed")
        // One replica takes a newer version of one key (stamped by it, now): the summaries
        // differ, the versions are offered, and every holder comes to hold the newer one.
        let holder = try #require(Self.holders(net.nodes, keys[3]).first)
        _ = try await holder.storage.execute(.put([keys[3]: StoredValue([2])], mode: .overwrite), sender: nil, node: holder)
        #expect(try await Self.eventually {
            net.nodes.allSatisfy { n in
                guard case .values(let v, _)? = try? n.registry.storageBackend?.execute(.get(.keys([keys[3]])), now: StoragePipeline.now()),
                      let got = v[keys[3]] else { return true }
                return got.value == [2]
            }
        })
        #expect(policies.reduce(0) { $0 + $1.stats.keysOffered } > offered)
        // A summary of the wrong size is a bad request.
        await #expect(throws: RPCError.self) {
            try await net.nodes[1].request(to: net.nodes[2].address, command: "replication.summary", payload: [.bytes([1, 2, 3])])
        }
        await net.shutdown()
    }

    static func node(_ policy: IndirectReplication) async throws -> Node {
        try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).requestTimeout(.seconds(2))
            .plugins(builtIns() + [ReplicationPlugin(policy)]).start()
    }

    /// Waits until `condition` holds (deadline 30 s); whether it did.
    static func eventually(_ condition: () -> Bool) async throws -> Bool {
        let clock = ContinuousClock()
        let start = clock.now
        while !condition() {
            guard clock.now - start < .seconds(30) else { return false }
            try await Task.sleep(for: .milliseconds(50))
        }
        return true
    }

    @Test("a peer that joins closest to a stored location receives its data at once, not at the next timer (which is an hour away)")
    func joinerReceivesAtOnce() async throws {
        let net = try await Testnet.start(peers: 6, routing: .perfect, plugins: { _ in
            builtIns() + [ReplicationPlugin(IndirectReplication(mode: .nRoot, factor: 3, interval: .seconds(3_600)))]
        })
        let newcomer = try await Self.node(IndirectReplication(mode: .nRoot, factor: 3, interval: .seconds(3_600)))
        // The data lives at the newcomer's own id: once it joins it is the closest peer there.
        let key = Number640(location: newcomer.peerID)
        #expect(try await net.nodes[0].dht.put(key, Array("yours".utf8), options: DHTOptions(replicas: 3)).isSuccess)
        #expect(Self.holders([newcomer], key).isEmpty)
        try await newcomer.bootstrap(to: net.nodes[0].address.socket)
        #expect(try await Self.eventually { !Self.holders([newcomer], key).isEmpty })
        await newcomer.shutdown()
        await net.shutdown()
    }

    @Test("TomP2P's responsibility walk (a stores, b, c, d join one by one, then leave one by one), factors 1-3, 0-root and n-root: after every step the f closest live peers hold the data", arguments: [ReplicationMode.zeroRoot, .nRoot], [1, 2, 3])
    func responsibilityWalk(mode: ReplicationMode, factor: Int) async throws {
        let policies = (0..<4).map { _ in IndirectReplication(mode: mode, factor: factor, interval: .seconds(1)) }
        let peers = try await policies.asyncMap { try await Self.node($0) }
        let a = peers[0]
        let key = Number640(location: Number160(hashing: "walk \(mode) \(factor)"))
        #expect(try await a.dht.put(key, [1], options: DHTOptions(replicas: 1)).isSuccess)
        var live = [a]
        func state() -> String {
            let ids = Set(Responsibility.replicaSet(of: key.location, me: a.peerID, peers: live.map(\.peerID), factor: factor))
            let held = Set(Self.holders(live, key).map(\.peerID))
            return peers.indices.map { i in
                let p = peers[i], s = policies[i].stats
                return "\(i)\(live.contains { $0 === p } ? "" : " (gone)")\(ids.contains(p.peerID) ? " in set" : "")\(held.contains(p.peerID) ? " holds" : ""): offers \(s.offers) failed \(s.failedOffers) sent \(s.valuesSent)"
            }.joined(separator: "; ")
        }
        func closestHold() -> Bool {
            let ids = Set(Responsibility.replicaSet(of: key.location, me: a.peerID, peers: live.map(\.peerID), factor: factor))
            return Set(Self.holders(live, key).map(\.peerID)).isSuperset(of: ids)
        }
        for joiner in peers.dropFirst() {
            // Made known first-hand to every live peer (in 0-root only the root copies, so it
            // must know the peers it copies to; TomP2P's test counts a's notifications instead).
            for p in live { _ = try await joiner.ping(p.address.socket) }
            live.append(joiner)
            #expect(try await Self.eventually(closestHold), "after +\(live.count - 1): \(mode) f=\(factor): \(state())")
        }
        for leaver in peers.dropFirst() {
            await leaver.shutdown()
            live.removeAll { $0 === leaver }
            #expect(try await Self.eventually(closestHold), "after a leave, \(live.count) live: \(mode) f=\(factor): \(state())")
        }
        for p in peers { await p.shutdown() }
    }
}

@Suite("Replication under attack", .serialized)
struct ReplicationHostileTests {
    @Test("offers and pushes from a hostile peer: oversized ones are refused, mixed locations get nothing, a push cannot revive a removed key or overwrite a protected entry")
    func hostileOffersAndPushes() async throws {
        let policies = (0..<4).map { _ in IndirectReplication(mode: .nRoot, factor: 3, interval: .seconds(3_600)) }
        let net = try await Testnet.start(peers: 4, routing: .perfect, plugins: { i in builtIns() + [ReplicationPlugin(policies[i])] })
        let (attacker, target) = (net.nodes[0], net.nodes[1])
        let location = Number160(hashing: "contested")
        let keys = (0..<1_001).map { Number640(location: location, content: Number160(UInt32($0))) }
        /// An offer of `keys`, each claimed at `stamp` (a value with digest 0, or a removal).
        func offer(_ keys: [Number640], stamp: UInt64 = 1, removal: Bool = false) -> [Payload] {
            var bytes: [UInt8] = []
            for _ in keys { bytes += (0..<8).reversed().map { UInt8(truncatingIfNeeded: stamp >> UInt64($0 * 8)) } + [removal ? 1 : 0] + [UInt8](repeating: 0, count: 8) }
            return [.keys640(keys), .bytes(bytes)]
        }
        await #expect(throws: RPCError.self) {
            try await attacker.request(to: target.address, command: "replication.offer", payload: offer(keys))
        }
        // Versions that do not match the keys, or a flag that means nothing: refused.
        await #expect(throws: RPCError.self) {
            try await attacker.request(to: target.address, command: "replication.offer", payload: [.keys640(Array(keys.prefix(2))), .bytes([1, 2, 3])])
        }
        await #expect(throws: RPCError.self) {
            var bad = offer([keys[0]])
            bad[1] = .bytes([UInt8](repeating: 0, count: 8) + [7] + [UInt8](repeating: 0, count: 8))
            return try await attacker.request(to: target.address, command: "replication.offer", payload: bad)
        }
        let mixed = try await attacker.request(to: target.address, command: "replication.offer",
                                               payload: offer([keys[0], Number640(location: Number160(hashing: "elsewhere"))]))
        #expect(mixed.payload.first == .keys640([]))
        let wanted = try await attacker.request(to: target.address, command: "replication.offer", payload: offer(Array(keys.prefix(3))))
        #expect(wanted.payload.first == .keys640(Array(keys.prefix(3))))
        var many: [Number640: StoredValue] = [:]
        for k in keys { many[k] = StoredValue([1]) }
        await #expect(throws: RPCError.self) {
            try await attacker.request(to: target.address, command: "replication.push", payload: StorageCodec.encode(.put(many, mode: .overwrite)))
        }
        // A key removed on the target is not taken back, by offer or by push, in any version
        // older than the removal.
        let removed = keys[5]
        let old = target.storage.versions.next()
        _ = try await target.storage.execute(.put([removed: StoredValue([8], stamp: old)], mode: .overwrite), sender: nil, node: target)
        _ = try await target.storage.execute(.remove(.keys([removed]), returnValues: false), sender: nil, node: target)
        let afterRemove = try await attacker.request(to: target.address, command: "replication.offer", payload: offer([removed], stamp: old))
        #expect(afterRemove.payload.first == .keys640([]))
        let push = try await attacker.request(to: target.address, command: "replication.push",
                                              payload: StorageCodec.encode(.put([removed: StoredValue([9], stamp: old)], mode: .overwrite)))
        #expect(try StorageCodec.decodeResult(push.payload) == .statuses([removed: .superseded]))
        #expect(ReplicationTests.holders([target], removed).isEmpty)
        // A stamp from the future (to pin a key against every later write) is refused.
        let ahead = VersionStamp.at(millis: target.storage.versions.wallMillis + 3_600_000)
        let pinned = try await attacker.request(to: target.address, command: "replication.push",
                                                payload: StorageCodec.encode(.put([keys[6]: StoredValue([6], stamp: ahead)], mode: .overwrite)))
        #expect(try StorageCodec.decodeResult(pinned.payload) == .statuses([keys[6]: .stampAhead]))
        #expect(ReplicationTests.holders([target], keys[6]).isEmpty)
        // A protected entry is not overwritten by a push from someone else.
        let owner = Curve25519.Signing.PrivateKey()
        let entry = keys[7]
        #expect(try await net.nodes[2].dht.put(entry, Array("mine".utf8), options: DHTOptions(replicas: 4, signer: owner, protect: .entry)).isSuccess)
        let reply = try await attacker.request(to: target.address, command: "replication.push",
                                               payload: StorageCodec.encode(.put([entry: StoredValue(Array("yours".utf8))], mode: .overwrite)))
        #expect(StorageCodec.isRefusal(reply.payload))
        guard case .values(let v, _)? = try? target.registry.storageBackend?.execute(.get(.keys([entry])), now: StoragePipeline.now()) else {
            Issue.record("the entry is gone")
            return
        }
        #expect(v[entry]?.value == Array("mine".utf8))
        await net.shutdown()
    }
}

@Suite("Direct replication", .serialized)
struct DirectReplicationTests {
    @Test("the owner republishes a value with a 3 s TTL every second: it outlives its TTL; cancelled, it expires everywhere; removed, it is removed again each interval")
    func republish() async throws {
        let direct = DirectReplication(tick: .milliseconds(200), removeRepeats: 3)
        let net = try await Testnet.start(peers: 6, routing: .perfect, plugins: { i in
            builtIns() + (i == 0 ? [ReplicationPlugin(direct: direct)] : [])
        })
        let owner = net.nodes[0]
        let key = Number640(location: Number160(hashing: "refreshed"))
        #expect(try await direct.publish(key, Array("alive".utf8), ttl: .seconds(3), every: .seconds(1), options: DHTOptions(replicas: 3), on: owner).isSuccess)
        await #expect(throws: DirectReplication.PublishError.intervalNotBelowTTL) {
            try await direct.publish(key, [1], ttl: .seconds(1), every: .seconds(2), on: owner)
        }
        // Six refreshes a second apart: twice the TTL has passed since the first put.
        #expect(try await ReplicationTests.eventually { direct.sent.puts >= 7 })
        #expect(ReplicationTests.holders(net.nodes, key).count >= 3)
        #expect(text(try await net.nodes[4].dht.get(key).value) == "alive")
        // Cancelled: no more puts, and the copies lapse by their TTL.
        direct.cancel(key)
        let putsAtCancel = direct.sent.puts
        #expect(direct.published.isEmpty)
        #expect(try await ReplicationTests.eventually { ReplicationTests.holders(net.nodes, key).isEmpty })
        // (A tick already under way when it was cancelled may have sent one more.)
        #expect(direct.sent.puts <= putsAtCancel + 1)
        #expect((try await net.nodes[4].dht.get(key)).isEmpty)

        // Published again, then removed: the remove goes out now and twice more.
        let other = Number640(location: Number160(hashing: "removed"))
        #expect(try await direct.publish(other, [7], ttl: .seconds(60), every: .seconds(1), options: DHTOptions(replicas: 3), on: owner).isSuccess)
        #expect(try await ReplicationTests.eventually { !ReplicationTests.holders(net.nodes, other).isEmpty })
        try await direct.remove(other, on: owner)
        #expect(try await ReplicationTests.eventually { direct.sent.removes >= 3 })
        #expect(ReplicationTests.holders(net.nodes, other).isEmpty)
        #expect(direct.published.isEmpty)
        await net.shutdown()
    }
}

extension Sequence {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var out: [T] = []
        for e in self { out.append(try await transform(e)) }
        return out
    }
}
