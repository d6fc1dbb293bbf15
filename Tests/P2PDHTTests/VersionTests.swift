import Crypto
import P2PDHT
import P2PKernel
import P2PReplication
import P2PTesting
import Testing
import P2PTestSupport

/// The version order on every replica: what a replay, a stranger's re-put, an update after
/// deaths and a remove can and cannot do.
@Suite("Versions", .serialized)
struct VersionTests {
    typealias Key = Curve25519.Signing.PrivateKey

    /// The value a replica holds under `k` (removals included), straight from its storage.
    static func held(_ node: Node, _ k: Number640) -> StoredValue? {
        node.registry.storageBackend?.replicaEntries([k], now: node.clock.uptimeNanoseconds)[k]
    }

    @Test("the owner's older signed version, replayed after the update (as a put without proof and as a push), is refused by every replica: the rollback needs no proof memory")
    func rollbackRefused() async throws {
        let net = try await Testnet.start(peers: 8, routing: .perfect, plugins: { _ in
            builtIns() + [ReplicationPlugin(IndirectReplication(interval: .seconds(3_600)))]
        })
        let owner = Key()
        let k = key("rollback")
        let options = DHTOptions(signer: owner, protect: .entry)
        let v1 = try StoredValue(Array("v1".utf8), protectEntry: true, stamp: net.nodes[0].storage.versions.next()).signed(at: k, by: owner)
        #expect(try await net.nodes[0].dht.put([k: v1], options: options).isSuccess)
        #expect(try await net.nodes[0].dht.put(k, Array("v2".utf8), options: options).isSuccess)
        let replicas = try SecurityTests.replicas(net, k)
        let attacker = try #require(net.nodes.first { n in !replicas.contains { $0 === n } })
        for r in replicas {
            // The old signed value again, with no writer proof at all (the value's own signature
            // is the owner's, so protection lets it through; the order does not).
            let put = try await attacker.request(to: r.address, command: "dht.storage", payload: StorageCodec.encode(.put([k: v1], mode: .overwrite)))
            #expect(try StorageCodec.decodeResult(put.payload) == .statuses([k: .superseded]))
            let push = try await attacker.request(to: r.address, command: "replication.push", payload: StorageCodec.encode(.put([k: v1], mode: .overwrite)))
            #expect(try StorageCodec.decodeResult(push.payload) == .statuses([k: .superseded]))
            #expect(Self.held(r, k)?.value == Array("v2".utf8))
        }
        #expect(text(try await attacker.dht.get(k).value) == "v2")
        await net.shutdown()
    }

    @Test("a removed signed, protected entry is not put back by a stranger re-sending the signed value it saw; the removal stays on every replica")
    func removedStaysRemoved() async throws {
        let net = try await testnet(8)
        let owner = Key()
        let k = key("resurrection")
        let options = DHTOptions(signer: owner, protect: .entry)
        #expect(try await net.nodes[0].dht.put(k, Array("secret".utf8), options: options).isSuccess)
        let seen = try #require(await net.nodes[3].dht.get(k).perPeer.values.compactMap { $0[k] }.first)
        #expect(seen.verify(at: k))
        let removed = try await net.nodes[0].dht.remove(.keys([k]), options: DHTOptions(signer: owner))
        #expect(removed.refusal == nil)
        let stranger = net.nodes[5]
        let again = try await stranger.dht.put([k: seen])
        #expect(!again.isSuccess)
        #expect(again.status(of: k) == .superseded)
        for r in try SecurityTests.replicas(net, k) {
            let h = try #require(Self.held(r, k))
            #expect(h.isTombstone, "replica \(r.peerID) holds \(h)")
            #expect(h.signature?.signer == SignerKey(owner.publicKey), "the removal is the owner's, signed")
        }
        #expect(try await stranger.dht.get(k).isEmpty)
        await net.shutdown()
    }

    @Test("hostile versions: an unsigned \"newer\" version served by a corrupted replica of a protected entry is not believed by readers; a stranger's removal of a protected entry is refused by push; an offer claiming old versions of everything draws nothing to a stranger")
    func hostileVersions() async throws {
        let policies = (0..<8).map { _ in IndirectReplication(interval: .seconds(3_600)) }
        let net = try await Testnet.start(peers: 8, routing: .perfect, plugins: { i in builtIns() + [ReplicationPlugin(policies[i])] })
        let owner = Key()
        let k = key("guarded")
        #expect(try await net.nodes[0].dht.put(k, Array("genuine".utf8), options: DHTOptions(signer: owner, protect: .entry)).isSuccess)
        let replicas = try SecurityTests.replicas(net, k)
        // One replica is made to hold (and serve) an unsigned version with a far newer stamp.
        let liar = replicas[0]
        let store = try SecurityTests.memory(liar)
        var state = store.snapshot()
        var forged = try #require(state.entries[k] ?? nil)
        forged.stored = StoredValue(Array("forged".utf8), stamp: liar.storage.versions.next() + (1 << 30))
        state.entries[k] = forged
        store.restore(state, now: StoragePipeline.now())
        let reader = try #require(net.nodes.first { n in !replicas.contains { $0 === n } })
        for _ in 0..<3 { #expect(text(try await reader.dht.get(k).value) == "genuine") }
        // The honest replicas were not "repaired" with the forgery.
        for r in replicas.dropFirst() { #expect(Self.held(r, k)?.value == Array("genuine".utf8)) }

        // A stranger pushes an unsigned removal of the protected entry: refused, naming the owner.
        let stranger = reader
        let removal = StorageCodec.encode(.put([k: .tombstone(stamp: stranger.storage.versions.next())], mode: .overwrite))
        let pushed = try await stranger.request(to: replicas[1].address, command: "replication.push", payload: removal)
        #expect(throws: StorageError.self) { try StorageCodec.decodeResult(pushed.payload) }
        #expect(Self.held(replicas[1], k)?.value == Array("genuine".utf8))

        await net.shutdown()
    }

    @Test("an offer claiming old versions of everything draws nothing to a stranger; the same offer from a peer near the location is answered with the newer entries")
    func offersDrawNothingToStrangers() async throws {
        let policies = (0..<24).map { _ in IndirectReplication(interval: .seconds(3_600)) }
        let net = try await Testnet.start(peers: 24, routing: .perfect, plugins: { i in builtIns() + [ReplicationPlugin(policies[i])] })
        let location = Number160(hashing: "hoard")
        let keys = (0..<50).map { Number640(location: location, content: Number160(UInt32($0))) }
        #expect(try await net.nodes[1].dht.put(Dictionary(uniqueKeysWithValues: keys.map { ($0, StoredValue(Array("x".utf8))) })).isSuccess)
        let holder = try #require(net.nodes.first { (try? holds($0, keys[0])) == true })
        let holderPolicy = try #require(net.nodes.firstIndex { $0 === holder }.map { policies[$0] })
        let near = Set(holder.peerMap.closest(to: location, count: 2 * 6 + 1).map(\.id))
        let outsider = try #require(net.nodes.first { n in !near.contains(n.peerID) && n !== holder })
        let insider = try #require(net.nodes.first { n in near.contains(n.peerID) && n !== holder })
        var bytes: [UInt8] = []
        for _ in keys { bytes += [0, 0, 0, 0, 0, 0, 0, 1, 0] + [UInt8](repeating: 0, count: 8) }
        let before = holderPolicy.stats.valuesSent
        let fromOutsider = try await outsider.request(to: holder.address, command: "replication.offer", payload: [.keys640(keys), .bytes(bytes)])
        #expect(fromOutsider.payload.first == .keys640([]), "it holds newer versions of all: it wants none")
        _ = try await insider.request(to: holder.address, command: "replication.offer", payload: [.keys640(keys), .bytes(bytes)])
        let clock = ContinuousClock()
        let start = clock.now
        while holderPolicy.stats.valuesSent < before + keys.count, clock.now - start < .seconds(30) { try await Task.sleep(for: .milliseconds(50)) }
        #expect(holderPolicy.stats.valuesSent == before + keys.count, "the near peer got the newer entries, the stranger nothing")
        await net.shutdown()
    }

    @Test("a signed value cannot outlive the expiry its owner signed: re-sent by a stranger before it expires, it still expires on time everywhere")
    func signedExpiryHolds() async throws {
        let net = try await testnet(8)
        let owner = Key()
        let k = key("short-lived")
        #expect(try await net.nodes[0].dht.put(k, Array("soon gone".utf8), options: DHTOptions(ttl: .seconds(2), signer: owner)).isSuccess)
        let seen = try #require(await net.nodes[4].dht.get(k).perPeer.values.compactMap { $0[k] }.first)
        var resent = seen
        resent.remainingSeconds = nil
        // The same version again: taken as what is held (ok), its expiry unchanged.
        #expect(try await net.nodes[6].dht.put([k: resent]).isSuccess)
        let signedEnd = VersionStamp.millis(seen.stamp) + 2_000
        let clock = ContinuousClock()
        let start = clock.now
        while WriterProof.nowMillis() < signedEnd + 200, clock.now - start < .seconds(30) { try await Task.sleep(for: .milliseconds(100)) }
        // Another re-send after the signed expiry is stored invisible, not brought back to life.
        _ = try await net.nodes[6].dht.put([k: resent])
        for n in net.nodes { #expect(try !holds(n, k), "peer \(n.peerID) still serves the value past its signed expiry") }
        #expect(try await net.nodes[2].dht.get(k).isEmpty)
        await net.shutdown()
    }

    @Test("12 peers, factor 6 on the simulated network: a key overwritten through another peer, then the 5 peers closest to it cut off — a survivor reads the newest value; removed, then the closest cut off, it reads nothing")
    func updateSurvivesDeaths() async throws {
        let net = SimulatedNetwork(seed: 22, conditions: LinkConditions(latency: .constant(.milliseconds(20))))
        defer { net.stop() }
        try await net.run {
            let t = try await Testnet.start(peers: 12, routing: .perfect, network: net, plugins: { _ in
                builtIns() + [ReplicationPlugin(IndirectReplication(factor: 6, interval: .seconds(1)))]
            })
            let clock = NodeClock(loop: net.loop)
            let k = key("overwritten")
            #expect(try await t.nodes[0].dht.put(k, Array("v1".utf8)).isSuccess)
            try await clock.sleep(for: .seconds(6))
            let update = try await t.nodes[1].dht.put(k, Array("v2".utf8))
            #expect(update.acknowledged >= update.quorum)
            try await clock.sleep(for: .seconds(8))
            let closest = t.trueClosest(to: k.location, count: 5)
            let byID = Dictionary(uniqueKeysWithValues: t.nodes.map { ($0.peerID, $0) })
            for id in closest { if let n = byID[id], let h = net.host(at: n.address.ip) { net.disconnect(h) } }
            let survivor = try #require(t.nodes.first { !closest.contains($0.peerID) })
            let got = try await survivor.dht.get(k)
            #expect(text(got.value) == "v2", "\(got.perPeer.mapValues { $0.mapValues { text($0.value) } }) \(got.outcomes.compactMap(\.failure))")

            let r = Number640(location: Number160(hashing: "removed"))
            #expect(try await t.nodes[2].dht.put(r, Array("x".utf8)).isSuccess)
            try await clock.sleep(for: .seconds(6))
            #expect(try await t.nodes[3].dht.remove(.keys([r])).refusal == nil)
            let near = t.trueClosest(to: r.location, count: 3).filter { id in !closest.contains(id) }
            for id in near { if let n = byID[id], let h = net.host(at: n.address.ip) { net.disconnect(h) } }
            let reader = try #require(t.nodes.first { !closest.contains($0.peerID) && !near.contains($0.peerID) })
            #expect(try await reader.dht.get(r).isEmpty, "a removed value came back")
            await t.shutdown()
        }
    }
}

/// Peers that left without a word must not stall the commands of those that stayed.
@Suite("Dead peers", .serialized)
struct DeadPeerTests {
    @Test("12 peers on loopback, 5 of them gone without a word (their ids still in every map): a put, a get, a lookup and a routed send through a survivor each complete, a silent peer costing a suspicion time (a measured round trip's retransmission time), not a request timeout")
    func deadPeersDoNotStall() async throws {
        let net = try await Testnet.start(peers: 12, routing: .perfect, plugins: { _ in builtIns() })
        let dead = Array(net.nodes.suffix(5))
        for n in dead { await n.shutdown(announce: false) }
        let survivor = net.nodes[0]
        #expect(survivor.peerMap.counts.verified >= 11, "the survivor's map still holds the dead")
        let clock = ContinuousClock()
        var timings: [String: Duration] = [:]
        for i in 0..<5 {
            let k = key("after the deaths \(i)")
            var start = clock.now
            let put = try await survivor.dht.put(k, Array("alive \(i)".utf8))
            timings["put \(i)"] = clock.now - start
            #expect(put.isSuccess, "\(put.failures)")
            start = clock.now
            #expect(text(try await survivor.dht.get(k).value) == "alive \(i)")
            timings["get \(i)"] = clock.now - start
            start = clock.now
            let found = try await survivor.closestPeers(to: Number160(hashing: "somewhere \(i)"))
            timings["lookup \(i)"] = clock.now - start
            #expect(found.peers.count >= 6, "the other living peers, and no dead one")
            #expect(found.peers.allSatisfy { p in !dead.contains { $0.peerID == p.id } })
            start = clock.now
            let sent = try await survivor.dht.send(to: Number160(hashing: "call \(i)"), Array("ping".utf8))
            timings["send \(i)"] = clock.now - start
            #expect(!sent.replies.isEmpty)
        }
        // No timing is asserted (the machine may be busy); the figures are what the issue reports.
        print("dead peers (5 of 12): " + timings.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        await net.shutdown()
    }
}
