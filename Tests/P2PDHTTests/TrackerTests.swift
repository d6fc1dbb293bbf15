import NIOCore
import P2PKernel
import P2PTesting
import P2PTracker
import Testing
import P2PTestSupport

/// Waits for `condition` (polled; 30 s at most).
private func eventually(_ seconds: Int = 30, _ condition: () async throws -> Bool) async throws -> Bool {
    let clock = ContinuousClock()
    let start = clock.now
    while try await !condition() {
        guard clock.now - start < .seconds(seconds) else { return false }
        try await Task.sleep(for: .milliseconds(100))
    }
    return true
}

private func peer(_ n: UInt32, port: UInt16 = 4000) -> PeerAddress {
    PeerAddress(id: Number160(hashing: "peer \(n)"), socket: PeerSocketAddress(ip: .loopback, port: port))
}

@Suite("Tracker store and filter")
struct TrackerStoreTests {
    let s: UInt64 = 1_000_000_000

    @Test("an entry lives a TTL after its last add; a key lives while any entry does (its list does not vanish a TTL after creation)")
    func ttlAndRefresh() {
        let store = TrackerStore()
        let key = Number160(hashing: "swarm")
        #expect(store.add(key: key, peer: peer(1), attachment: [], firstHand: true, now: 0) == .added)
        #expect(store.add(key: key, peer: peer(2), attachment: [], firstHand: true, now: 0) == .added)
        // Peer 1 re-adds at 45 s, 90 s, 135 s; peer 2 never does.
        for t: UInt64 in [45, 90, 135] { #expect(store.add(key: key, peer: peer(1), attachment: [], firstHand: true, now: t * s) == .refreshed) }
        #expect(store.count(key: key, now: 59 * s) == 2)
        #expect(store.count(key: key, now: 61 * s) == 1)
        #expect(store.list(key: key, limit: 35, now: 150 * s).peers.map(\.id) == [peer(1).id])
        #expect(store.sweep(now: 150 * s) == 1)
        #expect(store.keys == [key])
        // Without a further refresh it goes, and the key with it.
        #expect(store.count(key: key, now: 196 * s) == 0)
        #expect(store.sweep(now: 196 * s) == 1)
        #expect(store.keys.isEmpty && store.entryCount == 0)
    }

    @Test("a re-add replaces the attachment; an entry heard of by exchange never replaces a first-hand one")
    func attachmentReplaced() {
        let store = TrackerStore()
        let key = Number160(hashing: "swarm")
        _ = store.add(key: key, peer: peer(1), attachment: Array("old".utf8), firstHand: true, now: 0)
        _ = store.add(key: key, peer: peer(1), attachment: Array("new".utf8), firstHand: true, now: s)
        #expect(store.list(key: key, limit: 35, now: 2 * s).peers.first?.attachment == Array("new".utf8))
        _ = store.add(key: key, peer: peer(1, port: 9), attachment: Array("forged".utf8), firstHand: false, now: 3 * s)
        let entry = store.list(key: key, limit: 35, now: 4 * s).peers.first
        #expect(entry?.attachment == Array("new".utf8))
        #expect(entry?.peer.socket.udpPort == 4000)
    }

    @Test("bounds: attachment size, peers per key, keys per peer, keys; a peer found offline is held off, then accepted again")
    func bounds() {
        var config = TrackerConfig()
        config.maxEntriesPerKey = 3
        config.maxKeysPerPeer = 2
        config.maxKeys = 4
        config.failedHoldOff = .seconds(300)
        let store = TrackerStore(config: config)
        let key = Number160(hashing: "k")
        guard case .denied = store.add(key: key, peer: peer(1), attachment: [UInt8](repeating: 1, count: 1_025), firstHand: true, now: 0) else {
            Issue.record("a 1,025-byte attachment was taken"); return
        }
        for i: UInt32 in 1...3 { #expect(store.add(key: key, peer: peer(i), attachment: [], firstHand: true, now: 0) == .added) }
        guard case .denied = store.add(key: key, peer: peer(4), attachment: [], firstHand: true, now: 0) else { Issue.record("a 4th peer under a key of 3"); return }
        #expect(store.add(key: Number160(hashing: "k2"), peer: peer(1), attachment: [], firstHand: true, now: 0) == .added)
        guard case .denied = store.add(key: Number160(hashing: "k3"), peer: peer(1), attachment: [], firstHand: true, now: 0) else { Issue.record("a 3rd key for one peer"); return }
        for k in ["k3", "k4"] { #expect(store.add(key: Number160(hashing: k), peer: peer(9), attachment: [], firstHand: true, now: 0) == .added) }
        guard case .denied = store.add(key: Number160(hashing: "k5"), peer: peer(8), attachment: [], firstHand: true, now: 0) else { Issue.record("a 5th key of 4"); return }
        // Attachments in all: at most `maxTotalAttachmentBytes`, also when one grows on a re-add.
        var small = TrackerConfig()
        small.maxTotalAttachmentBytes = 2_000
        let tight = TrackerStore(config: small)
        #expect(tight.add(key: key, peer: peer(1), attachment: [UInt8](repeating: 1, count: 1_000), firstHand: true, now: 0) == .added)
        #expect(tight.add(key: key, peer: peer(2), attachment: [UInt8](repeating: 1, count: 900), firstHand: true, now: 0) == .added)
        guard case .denied = tight.add(key: key, peer: peer(3), attachment: [UInt8](repeating: 1, count: 101), firstHand: true, now: 0) else { Issue.record("over the total"); return }
        guard case .denied = tight.add(key: key, peer: peer(2), attachment: [UInt8](repeating: 1, count: 1_001), firstHand: true, now: 0) else { Issue.record("grown over the total"); return }
        #expect(tight.add(key: key, peer: peer(3), attachment: [UInt8](repeating: 1, count: 100), firstHand: true, now: 0) == .added)
        tight.remove(peer: peer(1).id, holdOff: false)
        #expect(tight.sweep(now: 61 * s) == 2)
        #expect(tight.attachmentBytes == 0)

        // A full key: a peer's own add evicts an entry only heard of by exchange, never a first-hand one.
        var three = TrackerConfig()
        three.maxEntriesPerKey = 2
        let small2 = TrackerStore(config: three)
        #expect(small2.add(key: key, peer: peer(1), attachment: [], firstHand: true, now: 0) == .added)
        #expect(small2.add(key: key, peer: peer(2), attachment: [9], firstHand: false, now: 0) == .added)
        #expect(small2.add(key: key, peer: peer(3), attachment: [], firstHand: true, now: 0) == .added)
        #expect(Set(small2.list(key: key, limit: 35, now: 1).peers.map(\.id)) == [peer(1).id, peer(3).id])
        guard case .denied = small2.add(key: key, peer: peer(4), attachment: [], firstHand: true, now: 0) else { Issue.record("evicted a first-hand entry"); return }
        #expect(small2.entryCount == 2 && small2.attachmentBytes == 0)

        store.remove(peer: peer(1).id, holdOff: true, now: 10 * s)
        #expect(store.count(key: key, now: 10 * s) == 2)
        guard case .denied(let why) = store.add(key: key, peer: peer(1), attachment: [], firstHand: true, now: 20 * s) else { Issue.record("re-added while held off"); return }
        #expect(why.contains("held off"))
        #expect(store.add(key: key, peer: peer(1), attachment: [], firstHand: true, now: 311 * s) == .added)
    }

    @Test("known-peers filter: every inserted id is in it, few others are; bad wire forms are typed errors")
    func filter() throws {
        var rng = SplitMix64(seed: 7)
        let inserted = (0..<300).map { _ in Number160.random(using: &rng) }
        let filter = KnownPeersFilter(inserted)
        #expect(inserted.allSatisfy(filter.contains))
        let others = (0..<20_000).map { _ in Number160.random(using: &rng) }
        let falsePositives = others.filter(filter.contains).count
        #expect(falsePositives < 100, "\(falsePositives) false positives of 20,000 at 300 ids")
        let decoded = try KnownPeersFilter(decoding: filter.encoded)
        #expect(inserted.allSatisfy(decoded.contains))
        #expect(throws: TrackerError.self) { try KnownPeersFilter(decoding: [5]) }
        #expect(throws: TrackerError.self) { try KnownPeersFilter(decoding: [0, 1, 2]) }
        #expect(throws: TrackerError.self) { try KnownPeersFilter(decoding: [17, 1, 2]) }
        #expect(throws: TrackerError.self) { try KnownPeersFilter(decoding: [3] + [UInt8](repeating: 0, count: 8_193)) }
    }
}

@Suite("Tracker", .serialized)
struct TrackerTests {
    static func net(_ n: Int, config: TrackerConfig = TrackerConfig()) async throws -> Testnet {
        raiseOpenFileLimit()
        return try await Testnet.start(peers: n, routing: .perfect, plugins: { _ in [TrackerPlugin(config: config)] })
    }

    static func service(_ node: Node) -> TrackerService? { node.registry.plugin(TrackerPlugin.self)?.service }

    @Test("500 peers: an add reaches the 20 closest; a get from another peer lists the adder; three adders are all listed; a re-add replaces the attachment")
    func fiveHundred() async throws {
        let net = try await Self.net(500)
        let key = Number160.random()
        let added = try await net.nodes[300].tracker.add(key, attachment: Array("first".utf8))
        #expect(added.accepted.count == 20, "trackers: \(added.accepted.count), refused \(added.denied), failed \(added.failed)")
        let closest = Set(net.trueClosest(to: key, count: 20))
        #expect(Set(added.accepted.map(\.id)) == closest)
        let got = try await net.nodes[301].tracker.get(key)
        #expect(got.peers.map(\.id) == [net.nodes[300].peerID])
        #expect(got.peers.first?.attachment == Array("first".utf8))
        #expect(got.trackers.count == 3)

        // Three adders under another key (TomP2P's testTracker3).
        let key3 = Number160.random()
        for i in [300, 301, 302] { try await net.nodes[i].tracker.add(key3) }
        let three = try await net.nodes[299].tracker.get(key3)
        #expect(Set(three.peers.map(\.id)) == Set([300, 301, 302].map { net.nodes[$0].peerID }))
        #expect(three.listed == 3)

        // A re-add replaces the attachment on every tracker (TomP2P kept the old one).
        try await net.nodes[300].tracker.add(key, attachment: Array("second".utf8))
        for asker in [5, 77, 420] {
            let again = try await net.nodes[asker].tracker.get(key)
            #expect(again.peers.map(\.attachment) == [Array("second".utf8)])
        }
        await net.shutdown()
    }

    @Test("300 adders under one key: a get with the first get's known-peers filter returns only peers the first did not, and repeated gets find all 300")
    func knownPeersFilter() async throws {
        let net = try await Self.net(400)
        let key = Number160.random()
        let adders = Array(net.nodes[50..<350])
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = 0
            func add() { let n = adders[next]; next += 1; group.addTask { try await n.tracker.add(key) } }
            while next < min(32, adders.count) { add() }
            while try await group.next() != nil { if next < adders.count { add() } }
        }
        let asker = net.nodes[10]
        let first = try await asker.tracker.get(key)
        #expect(first.listed == 300)
        #expect(first.peers.count >= 35 && first.peers.count <= 105)
        let second = try await asker.tracker.get(key, known: first.known)
        let firstIDs = Set(first.peers.map(\.id))
        let secondIDs = Set(second.peers.map(\.id))
        #expect(!secondIDs.isEmpty)
        #expect(firstIDs.isDisjoint(with: secondIDs), "the second get returned \(firstIDs.intersection(secondIDs).count) peers the first already had")
        // Without the filter a get mostly repeats itself (35 random of 300 per tracker); with it, it moves on.
        var all = firstIDs.union(secondIDs)
        var known = second.known
        var gets = 2
        for _ in 0..<20 where all.count < 300 {
            let more = try await asker.tracker.get(key, known: known)
            known = more.known
            all.formUnion(more.peers.map(\.id))
            gets += 1
        }
        print("tracker: \(gets) gets with the known-peers filter found \(all.count) of 300 adders (first \(firstIDs.count), second \(secondIDs.count) more)")
        let expected = Set(adders.map(\.peerID))
        #expect(all.isSubset(of: expected))
        #expect(all.count >= 297, "found \(all.count) of 300 (a Bloom false positive may hide a few)")
        await net.shutdown()
    }

    @Test("an entry expires a TTL after its add without refresh, and survives many TTLs when announced (re-added at 0.75 × TTL)")
    func ttlOverTheNetwork() async throws {
        var config = TrackerConfig()
        config.ttl = .seconds(3)
        let net = try await Self.net(8, config: config)
        let (once, announced) = (Number160(hashing: "once"), Number160(hashing: "announced"))
        try await net.nodes[1].tracker.add(once)
        let announcement = try await net.nodes[2].tracker.announce(announced)
        #expect(try await net.nodes[5].tracker.get(once).peers.map(\.id) == [net.nodes[1].peerID])
        #expect(try await eventually { try await net.nodes[5].tracker.get(once).peers.isEmpty })
        // Three refreshes (past two TTLs), then right after the next one: listed everywhere.
        #expect(try await eventually { announcement.refreshes >= 3 })
        let r = announcement.refreshes
        #expect(try await eventually { announcement.refreshes > r })
        for node in net.nodes {
            #expect(Self.service(node)?.store.count(key: announced) == 1)
        }
        #expect(try await net.nodes[6].tracker.get(announced).peers.map(\.id) == [net.nodes[2].peerID])
        await announcement.stop()
        #expect(try await eventually { try await net.nodes[6].tracker.get(announced).peers.isEmpty })
        await net.shutdown()
    }

    @Test("a peer its trackers found offline cannot re-add itself there until the hold-off ends; a quitting peer's entries go at once")
    func heldOffAfterFailure() async throws {
        var config = TrackerConfig()
        config.failedHoldOff = .seconds(3)
        let settings = config
        let keyPair = PeerKeyPair()
        raiseOpenFileLimit()
        let net = try await Testnet.start(peers: 5, routing: .perfect, plugins: { _ in [TrackerPlugin(config: settings)] }, configure: { i, c in
            if i == 4 { c.keyPair = keyPair }
        })
        let key = Number160(hashing: "held off")
        let x = net.nodes[4]
        try await x.tracker.add(key)
        let trackers = Array(net.nodes[0..<4])
        #expect(trackers.allSatisfy { Self.service($0)?.store.count(key: key) == 1 })
        await x.shutdown(announce: false)
        // Its requests fail: what the peer map counts, and then reports offline.
        for t in trackers { for _ in 0..<3 { _ = t.peerMap.peerFailed(x.peerID) } }
        #expect(trackers.allSatisfy { Self.service($0)?.store.count(key: key) == 0 })
        // The same identity comes back at once, at a new port: every tracker refuses it for now.
        let back = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).keyPair(keyPair).plugins([TrackerPlugin(config: config)]).start()
        for t in trackers { back.peerMap.peerFound(t.address, verified: true) }
        let refused = try await back.tracker.add(key)
        #expect(Set(refused.denied.keys) == Set(trackers.map(\.peerID)), "refused by \(refused.denied.count) of 4")
        #expect(refused.denied.values.allSatisfy { $0.contains("held off") })
        #expect(refused.accepted.map(\.id) == [back.peerID])
        // After the hold-off (3 s here; 300 s by default) they take it again.
        #expect(try await eventually { (try? await back.tracker.add(key).accepted.count) == 5 })

        // A peer that quits is taken off the lists at once.
        await back.shutdown()
        #expect(try await eventually { trackers.allSatisfy { Self.service($0)?.store.count(key: key) == 0 } })
        await net.shutdown()
    }

    @Test("peer exchange: a tracker pushes entries to another tracker of the key, which lists only peers proven at their address")
    func exchange() async throws {
        var config = TrackerConfig()
        config.pexInterval = .milliseconds(300)
        let net = try await Self.net(6, config: config)
        let key = Number160(hashing: "pex")
        let (t, other) = (net.nodes[0], net.nodes[1])
        let listed = net.nodes[2]
        _ = Self.service(t)?.store.add(key: key, peer: listed.address, attachment: Array("a".utf8), firstHand: true)
        // Pushed by the timer to the others (each holds the key as one of the closest six).
        #expect(try await eventually { Self.service(other)?.store.count(key: key) == 1 })
        #expect(try await other.tracker.get(key).peers.map(\.attachment) == [Array("a".utf8)])

        // A pushed entry for a peer this node knows is listed at the address it verified, not
        // the one written in the push.
        let moved = PeerAddress(id: net.nodes[4].peerID, socket: PeerSocketAddress(ip: .loopback, port: 9))
        _ = try await net.nodes[3].request(to: other.address, command: "tracker.pex", payload: [.keys([key])] + [.peers([moved]), .bytes(TrackerTestCodec.records([(moved, 60)]))])
        let listedThere = Self.service(other)?.store.list(key: key, limit: 35).peers.first { $0.id == moved.id }
        #expect(listedThere?.peer.socket == net.nodes[4].address.socket)

        // A hostile tracker pushes ids nobody runs: pinged, never listed.
        let hostile = net.nodes[3]
        let fake = (0..<10).map { i in
            PeerAddress(id: Number160(hashing: "fake \(i)"), socket: PeerSocketAddress(ip: .loopback, port: listed.address.udpPort))
        }
        let records = TrackerTestCodec.records(fake.map { ($0, 60) })
        let reply = try await hostile.request(to: other.address, command: "tracker.pex", payload: [.keys([key]), .peers(fake), .bytes(records)])
        #expect(reply.firstInteger == 0)
        #expect(try await eventually { (Self.service(other)?.stats.verificationsFailed ?? 0) >= 10 })
        let fakeIDs = Set(fake.map(\.id))
        #expect(Self.service(other)?.store.list(key: key, limit: 35).peers.allSatisfy { !fakeIDs.contains($0.id) } == true)
        await net.shutdown()
    }

    @Test("hostile requests get typed refusals: two keys, oversized attachment, bad filter, broken records, too many peers, an exchange flood, an unreachable adder")
    func hostile() async throws {
        var config = TrackerConfig()
        config.pexPerPeerPerMinute = 5
        let net = try await Self.net(3, config: config)
        let (attacker, victim) = (net.nodes[0], net.nodes[1].address)
        let key = Number160(hashing: "k")
        func refused(_ command: String, _ payload: [Payload], _ type: MessageType = .badRequest) async throws {
            let reply = try await attacker.request(to: victim, command: CommandID.derive(from: command), payload: payload).get()
            #expect(reply.type == type, "\(command): \(reply.type) \(reply.firstBytes.map { String(decoding: $0, as: UTF8.self) } ?? "")")
        }
        try await refused("tracker.add", [.keys([key, key]), .bytes([]), .bytes([])])
        try await refused("tracker.add", [.keys([key]), .bytes([UInt8](repeating: 0, count: 1_025)), .bytes([])])
        try await refused("tracker.add", [.keys([key]), .bytes([]), .bytes([0, 0])])
        try await refused("tracker.get", [.keys([key]), .bytes([40] + [UInt8](repeating: 0, count: 8))])
        try await refused("tracker.get", [.keys([])])
        let one = [PeerAddress(id: .random(), socket: PeerSocketAddress(ip: .loopback, port: 4000))]
        try await refused("tracker.pex", [.keys([key]), .peers(one), .bytes([0, 60, 0, 9, 1])])
        try await refused("tracker.pex", [.keys([key]), .peers(one), .bytes(TrackerTestCodec.records([(one[0], 60)]) + [0])])
        let many = (0..<36).map { _ in PeerAddress(id: .random(), socket: PeerSocketAddress(ip: .loopback, port: 4000)) }
        try await refused("tracker.pex", [.keys([key]), .peers(many), .bytes(TrackerTestCodec.records(many.map { ($0, 60) }))])
        // Five exchange messages a minute from one peer (three were spent above), then refused.
        _ = try await attacker.request(to: victim, command: CommandID.derive(from: "tracker.pex"), payload: [.keys([key]), .peers([]), .bytes([])]).get()
        _ = try await attacker.request(to: victim, command: CommandID.derive(from: "tracker.pex"), payload: [.keys([key]), .peers([]), .bytes([])]).get()
        try await refused("tracker.pex", [.keys([key]), .peers([]), .bytes([])], .denied)
        #expect(Self.service(net.nodes[1])?.store.entryCount == 0)

        // A firewalled peer without relays would be listed for nobody to reach.
        let hidden = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).flags([.firewalledUDP, .firewalledTCP]).plugins([TrackerPlugin()]).start()
        let reply = try await hidden.request(to: victim, command: CommandID.derive(from: "tracker.add"), payload: [.keys([key]), .bytes([]), .bytes([])]).get()
        #expect(reply.type == .denied)
        #expect(Self.service(net.nodes[1])?.store.entryCount == 0)
        await hidden.shutdown()
        await net.shutdown()
    }
}

/// The records section as a peer sends it (seconds, length, attachment per peer).
enum TrackerTestCodec {
    static func records(_ entries: [(PeerAddress, UInt16)]) -> [UInt8] {
        entries.flatMap { _, seconds in [UInt8(seconds >> 8), UInt8(seconds & 0xFF), 0, 0] }
    }
}
