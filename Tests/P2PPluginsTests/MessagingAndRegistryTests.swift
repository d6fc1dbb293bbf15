import NIOConcurrencyHelpers
import P2PDHT
import P2PEvaluation
import P2PKernel
import P2PMessaging
import P2PPeerVote
import P2PTesting
import Testing
import P2PTestSupport

@Suite("Messaging")
struct MessagingTests {
    /// Two peers whose requests wait 10 s: these tests check what messaging answers, and phase 1
    /// of the suite starts a hundred tests at once on two cores (a 2-s timeout failed there).
    private func patientPair() async throws -> Testnet {
        try await Testnet.start(peers: 2, routing: .perfect, plugins: { _ in builtIns() },
                                configure: { _, config in config.requestTimeout = .seconds(10) })
    }

    @Test("a direct message \"hello\" is answered \"world\", over TCP and over UDP")
    func helloWorld() async throws {
        let net = try await patientPair()
        let to = net.nodes[1].address
        let tcp: String = try await net.nodes[0].messaging.send("hello", to: to)
        #expect(tcp == "world")
        let udp: String = try await net.nodes[0].messaging.send("hello", to: to, transport: .udp)
        #expect(udp == "world")
        let raw = try await net.nodes[0].messaging.send(Array("abc".utf8), to: to)
        #expect(text(raw) == "echo:abc")
        await net.shutdown()
    }

    @Test("a peer without a handler answers with a clear error")
    func noHandler() async throws {
        let bare = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).plugin(MessagingPlugin()).start()
        let asker = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).plugin(MessagingPlugin()).start()
        await #expect {
            let _: String = try await asker.messaging.send("hello", to: bare.address)
        } throws: { e in
            guard case RPCError.denied(let reason) = e else { return false }
            return reason.contains("no object reply handler for 'String'")
        }
        await #expect {
            _ = try await asker.messaging.send([1, 2, 3], to: bare.address)
        } throws: { e in
            guard case RPCError.denied(let reason) = e else { return false }
            return reason.contains("no raw reply handler")
        }
        await bare.shutdown(); await asker.shutdown()
    }

    @Test("an object of the wrong shape is a bad request, and the peer keeps answering")
    func wrongShape() async throws {
        let net = try await patientPair()
        await #expect {
            let _: String = try await net.nodes[0].messaging.send(42, to: net.nodes[1].address, typeName: "String")
        } throws: { e in
            if case RPCError.badRequest(let r) = e { return r.contains("cannot decode") } else { return false }
        }
        let ok: String = try await net.nodes[0].messaging.send("hello", to: net.nodes[1].address)
        #expect(ok == "world")
        await net.shutdown()
    }
}

/// Records its lifecycle calls.
final class Journal: Sendable {
    let lines = NIOLockedValueBox([String]())
    func add(_ s: String) { lines.withLockedValue { $0.append(s) } }
    var all: [String] { lines.withLockedValue { $0 } }
}

struct Recorder: Plugin {
    let name: String
    let version = "0.1"
    let journal: Journal
    func install(into registry: PluginRegistry) throws { journal.add("install \(name)") }
    func start(node: Node) async throws { journal.add("start \(name)") }
    func stop(node: Node) async { journal.add("stop \(name)") }
}

struct Named: CommandHandler {
    let name: String
    func handle(_ request: Message, context: CommandContext) -> CommandResult { .reply(Reply()) }
}

struct TwoCommands: Plugin {
    let name = "two"
    let version = "1"
    func install(into registry: PluginRegistry) throws {
        try registry.register(command: Named(name: "two.a"))
        try registry.register(command: Named(name: "two.a"))
    }
}

/// Counts what a replication policy is told.
struct CountingPolicy: ReplicationPolicy {
    let name = "counting"
    let events: NIOLockedValueBox<[ReplicationEvent]>
    func handle(_ event: ReplicationEvent, context: ReplicationContext) async {
        events.withLockedValue { $0.append(event) }
    }
}

struct PolicyPlugin: Plugin {
    let name = "policy"
    let version = "1"
    let policy: CountingPolicy
    func install(into registry: PluginRegistry) throws { registry.add(replicationPolicy: policy) }
}

/// Uppercases values of one domain: an interceptor scoped to a domain.
struct Shout: StorageInterceptor {
    static let domain = Number160(hashing: "shout")
    let scope = InterceptorScope.domain(Shout.domain)
    func intercept(_ request: StorageRequest, context: StorageContext, next: StorageNext) async throws -> StorageResult {
        guard case .put(let entries, let mode) = request else { return try await next(request) }
        return try await next(.put(entries.mapValues { v in
            var v = v
            v.value = Array(String(decoding: v.value, as: UTF8.self).uppercased().utf8)
            return v
        }, mode: mode))
    }
}

struct ShoutPlugin: Plugin {
    let name = "shout"
    let version = "1"
    func install(into registry: PluginRegistry) throws { registry.add(interceptor: Shout()) }
}

@Suite("Registry", .serialized)
struct RegistryTests {
    @Test("plugins start in install order and stop in reverse")
    func lifecycleOrder() async throws {
        let journal = Journal()
        let node = try await Node.builder().host("127.0.0.1").port(0)
            .plugin(Recorder(name: "a", journal: journal)).plugin(Recorder(name: "b", journal: journal)).start()
        await node.shutdown()
        #expect(journal.all == ["install a", "install b", "start a", "start b", "stop b", "stop a"])
    }

    @Test("a duplicate plugin name or command is a clear error at install")
    func duplicates() async throws {
        let journal = Journal()
        await #expect {
            try await Node.builder().host("127.0.0.1").port(0)
                .plugin(Recorder(name: "a", journal: journal)).plugin(Recorder(name: "a", journal: journal)).start()
        } throws: { e in
            "\(e)".contains("a plugin named 'a' is already installed")
        }
        await #expect {
            try await Node.builder().host("127.0.0.1").port(0).plugin(TwoCommands()).start()
        } throws: { e in
            "\(e)".contains("'two.a' is already registered")
        }
        await #expect {
            try await Node.builder().host("127.0.0.1").port(0).plugin(DHTPlugin()).plugin(EvaluationPlugin()).plugin(EvaluationPlugin()).start()
        } throws: { e in
            "\(e)".contains("'evaluation' is already installed")
        }
    }

    @Test("a node with no plugins still routes and pings, and answers commands it lacks with unknown command")
    func bareNode() async throws {
        let bare = try await Testnet.start(peers: 20, routing: .bootstrap)
        let full = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).plugins(builtIns()).start()
        _ = try await full.bootstrap(to: bare.nodes[0].address.socket)
        #expect(try await bare.nodes[3].closestPeers(to: .random()).peers.count == 20)
        #expect(try await bare.nodes[4].ping(bare.nodes[5].address.socket).id == bare.nodes[5].peerID)
        await #expect {
            _ = try await full.request(to: bare.nodes[1].address, command: "dht.storage", payload: [.integer(2)])
        } throws: { e in
            if case RPCError.unknownCommand = e { true } else { false }
        }
        // A put from a full node finds no storage on bare peers: each reports the unknown command.
        let put = try await full.dht.put(key("nowhere"), [1])
        #expect(put.failures.values.contains { $0.contains("unknown command") })
        await full.shutdown()
        await bare.shutdown()
    }

    @Test("interceptors apply to their domain only; replication policies and subscribers hear events")
    func interceptorsAndEvents() async throws {
        let events = NIOLockedValueBox([ReplicationEvent]())
        let nodeEvents = NIOLockedValueBox([NodeEvent]())
        let net = try await Testnet.start(peers: 6, routing: .perfect, plugins: { _ in
            builtIns() + [ShoutPlugin(), PolicyPlugin(policy: CountingPolicy(events: events))]
        })
        net.nodes[0].registry.subscribe { e in nodeEvents.withLockedValue { $0.append(e) } }
        let loud = key("greeting", domain: Shout.domain)
        let quiet = key("greeting")
        try await net.nodes[1].dht.put(loud, Array("hello".utf8))
        try await net.nodes[1].dht.put(quiet, Array("hello".utf8))
        #expect(text(try await net.nodes[2].dht.get(loud).value) == "HELLO")
        #expect(text(try await net.nodes[2].dht.get(quiet).value) == "hello")
        let extra = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).start()
        _ = try await extra.ping(net.nodes[0].address.socket)
        // Policies hear events on a task of their own: wait (bounded) for the very ones asked about.
        let heard = { events.withLockedValue { e in
            e.contains(.dataInserted([loud])) && e.contains { if case .peerInserted(let p) = $0 { p.id == extra.peerID } else { false } }
        } }
        let deadline = ContinuousClock.now + .seconds(20)
        while !heard(), ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        #expect(events.withLockedValue { $0.contains(.dataInserted([loud])) })
        #expect(events.withLockedValue { $0.contains(.peerInserted(extra.address)) || $0.contains { if case .peerInserted(let p) = $0 { p.id == extra.peerID } else { false } } })
        #expect(nodeEvents.withLockedValue { $0.contains { if case .peerInserted(let p, _) = $0 { p.id == extra.peerID } else { false } } })
        await extra.shutdown()
        await net.shutdown()
    }
}

@Suite("Bad input", .serialized)
struct BadInputTests {
    @Test("a value over the size limit is refused with a typed reason, and stored data is unharmed")
    func tooLarge() async throws {
        var limits = MemoryStorage.Limits()
        limits.maxValueBytes = 1_000
        let bounded = limits
        let net = try await Testnet.start(peers: 6, routing: .perfect, plugins: { _ in builtIns(backend: MemoryStorage(limits: bounded)) })
        let k = key("bounded")
        try await net.nodes[0].dht.put(k, Array("small".utf8))
        let big = try await net.nodes[1].dht.put(k, Array(repeating: 7, count: 5_000))
        #expect(!big.isSuccess)
        #expect(big.failures.values.allSatisfy { $0.contains("value of 5000 bytes exceeds the 1000-byte limit") })
        // A refusal is an answer: the replica set refused, and no further peer was asked instead.
        #expect(big.failures.count == DHTOptions.defaultReplicaSet)
        #expect(big.refusal == .valueTooLarge(bytes: 5_000, limit: 1_000))
        #expect(text(try await net.nodes[2].dht.get(k).value) == "small")
        await net.shutdown()
    }

    @Test("every entry counts its whole footprint: empty values, basedOn keys and entry counts are bounded, with typed reasons")
    func footprints() async throws {
        var limits = MemoryStorage.Limits()
        limits.maxTotalBytes = 100 * MemoryStorage.entryOverhead + 1_000
        limits.maxEntries = 150
        limits.maxBasedOn = 8
        limits.tombstoneLifetimeSeconds = 10
        let store = MemoryStorage(limits: limits)
        // Empty values are not free: each costs its overhead, and the byte limit stops the flood.
        var stored = 0
        var refusal: StorageError?
        for i in 0..<1_000 {
            do {
                _ = try store.execute(.put([key("empty \(i)"): StoredValue([])], mode: .overwrite), now: 1)
                stored += 1
            } catch {
                refusal = error
                break
            }
        }
        #expect(stored == limits.maxTotalBytes / MemoryStorage.entryOverhead, "\(stored) empty values stored")
        if case .storageFull? = refusal {} else { Issue.record("flood refused with \(String(describing: refusal))") }
        #expect(store.bytesStored <= limits.maxTotalBytes && store.entryCount == stored)
        // basedOn keys count, and more than the limit is refused outright.
        #expect(throws: StorageError.tooManyBasedOn(count: 9, limit: 8)) {
            try store.execute(.put([key("based"): StoredValue([1], basedOn: (0..<9).map { _ in .random() })], mode: .overwrite), now: 1)
        }
        let before = store.bytesStored
        // A removal costs what an empty value does until its lifetime is over, then nothing.
        _ = try store.execute(.remove(.keys([key("empty 0")]), returnValues: false), now: 1)
        #expect(store.bytesStored == before && store.entryCount == stored)
        #expect(store.sweepExpired(now: 1 + 11_000_000_000) == 1)
        #expect(store.bytesStored == before - MemoryStorage.entryOverhead && store.entryCount == stored - 1)
        _ = try store.execute(.put([key("based"): StoredValue([1], basedOn: (0..<2).map { _ in .random() })], mode: .overwrite), now: 1)
        #expect(store.bytesStored == before - MemoryStorage.entryOverhead + MemoryStorage.entryOverhead + 1 + 40)
        // The entry limit over all locations.
        var small = MemoryStorage.Limits()
        small.maxEntries = 3
        let few = MemoryStorage(limits: small)
        for i in 0..<3 { _ = try few.execute(.put([key("n\(i)"): StoredValue([1])], mode: .overwrite), now: 1) }
        #expect(throws: StorageError.entryLimit(limit: 3)) { try few.execute(.put([key("n3"): StoredValue([1])], mode: .overwrite), now: 1) }
        // Overwriting an entry held is not a new one.
        _ = try few.execute(.put([key("n0"): StoredValue([2])], mode: .overwrite), now: 1)
        // Over the network the reason arrives typed.
        let bounded = limits
        let net = try await Testnet.start(peers: 5, routing: .perfect, plugins: { _ in builtIns(backend: MemoryStorage(limits: bounded)) })
        let r = try await net.nodes[0].dht.put([key("v"): StoredValue([1], basedOn: (0..<9).map { _ in .random() })])
        #expect(!r.isSuccess && r.failures.values.allSatisfy { $0.contains("based on 9 versions, over the limit of 8") }, "\(r.failures)")
        try await net.nodes[0].dht.put(key("v"), Array("fine".utf8))
        #expect(text(try await net.nodes[3].dht.get(key("v")).value) == "fine")
        await net.shutdown()
    }

    @Test("one put of 9,000 versions of one item: forks found per item (not by scanning the location per version), getLatest right")
    func manyVersions() throws {
        let store = MemoryStorage()
        let loc = Number160(hashing: "versions")
        func v(_ i: Int, content: Number160 = .zero) -> Number640 { Number640(location: loc, domain: .zero, content: content, version: Number160(UInt32(i + 1))) }
        // A chain: each version based on the one before it, all in one request, beside another
        // item with many versions of its own.
        var entries: [Number640: StoredValue] = [:]
        for i in 0..<9_000 { entries[v(i)] = StoredValue([UInt8(i & 0xFF)], basedOn: i == 0 ? [] : [Number160(UInt32(i))]) }
        let other = Number160(hashing: "other item")
        for i in 0..<900 { entries[v(i, content: other)] = StoredValue([1]) }
        guard case .statuses(let s, _) = try store.execute(.put(entries, mode: .overwrite), now: 1) else {
            Issue.record("no statuses")
            return
        }
        // The chain never forks; the other item's versions are unrelated, so every one after the first forks.
        #expect((0..<9_000).allSatisfy { s[v($0)] == .ok })
        #expect(s[v(0, content: other)] == .ok && (1..<900).allSatisfy { s[v($0, content: other)] == .versionFork })
        guard case .values(let latest, _) = try store.execute(.get(.latest(location: loc, domain: .zero, content: .zero)), now: 1) else {
            Issue.record("no values")
            return
        }
        #expect(Array(latest.keys) == [v(8_999)])
        // A version based on an old one forks the chain; removing the head makes its parent a head again.
        guard case .statuses(let fork, _) = try store.execute(.put([v(9_000): StoredValue([0], basedOn: [Number160(5)])], mode: .overwrite), now: 1) else { return }
        #expect(fork[v(9_000)] == .versionFork)
        _ = try store.execute(.remove(.keys([v(9_000), v(8_999)]), returnValues: false), now: 1)
        guard case .values(let after, _) = try store.execute(.get(.latest(location: loc, domain: .zero, content: .zero)), now: 1) else { return }
        #expect(Array(after.keys) == [v(8_998)])
    }

    @Test("an item's heads follow overwrites that rewire basedOn, prepared versions and their confirms, and removals")
    func headsIndex() throws {
        let store = MemoryStorage()
        let loc = Number160(hashing: "heads")
        func v(_ i: UInt32) -> Number640 { Number640(location: loc, version: Number160(i)) }
        func heads() throws -> [Number640] {
            guard case .values(let h, _) = try store.execute(.get(.latest(location: loc, domain: .zero, content: .zero)), now: 1) else { return [] }
            return h.keys.sorted()
        }
        func put(_ k: Number640, basedOn: [UInt32], prepared: Bool = false) throws -> StorageStatus? {
            guard case .statuses(let s, _) = try store.execute(.put([k: StoredValue([1], basedOn: basedOn.map { Number160($0) }, prepared: prepared)], mode: .overwrite), now: 1) else { return nil }
            return s[k]
        }
        // 1 ← 2 ← 3
        #expect(try put(v(1), basedOn: []) == .ok)
        #expect(try put(v(2), basedOn: [1]) == .ok)
        #expect(try put(v(3), basedOn: [2]) == .ok)
        #expect(try heads() == [v(3)])
        // 3 rewired onto 1: 2 and 3 are both heads, and the overwrite itself was no fork (3 was
        // the only head).
        #expect(try put(v(3), basedOn: [1]) == .ok)
        #expect(try heads() == [v(2), v(3)])
        // A prepared 4 based on both is invisible and changes nothing until confirmed; a put based
        // on 2 alone forks (3 is another head).
        #expect(try put(v(4), basedOn: [2, 3], prepared: true) == .ok)
        #expect(try heads() == [v(2), v(3)])
        _ = try store.execute(.confirm([v(4)]), now: 1)
        #expect(try heads() == [v(4)])
        #expect(try put(v(5), basedOn: [2]) == .versionFork)
        #expect(try heads() == [v(4), v(5)])
        // Removing 4 and 5 makes 2 and 3 heads again; removing 3 leaves 2.
        _ = try store.execute(.remove(.keys([v(4), v(5)]), returnValues: false), now: 1)
        #expect(try heads() == [v(2), v(3)])
        _ = try store.execute(.remove(.keys([v(3)]), returnValues: false), now: 1)
        #expect(try heads() == [v(2)])
        // A version based on itself and on one never stored is a head beside 2, and forks (2 is
        // a head it is not based on).
        #expect(try put(v(6), basedOn: [6, 99]) == .versionFork)
        #expect(try heads() == [v(2), v(6)])
    }

    @Test("a request for a domain a peer does not serve is denied with the domain named")
    func unknownDomain() async throws {
        let served = Number160(hashing: "served")
        let net = try await Testnet.start(peers: 5, routing: .perfect, plugins: { _ in builtIns(domains: [served]) })
        let ok = try await net.nodes[0].dht.put(key("a", domain: served), [1])
        #expect(ok.isSuccess)
        let other = Number160(hashing: "other")
        let refused = try await net.nodes[0].dht.put(key("a", domain: other), [1])
        #expect(refused.failures.values.allSatisfy { $0.contains("domain \(other) is not served") })
        await net.shutdown()
    }

    @Test("a malformed storage request from a remote peer gets a bad-request reply and harms nothing")
    func malformedStorageRequest() async throws {
        let net = try await testnet(3)
        let k = key("safe")
        try await net.nodes[0].dht.put(k, Array("kept".utf8))
        let target = net.nodes[1].address
        let bad: [[Payload]] = [
            [],
            [.integer(99)],
            [.integer(1)],
            [.integer(1), .dataMap([DataEntry(key: k, value: [0, 0])])],
            [.integer(1), .dataMap([DataEntry(key: k, value: [0, 0, 0, 0, 0, 0xFF, 0xFF])])],
            [.integer(2 | 1 << 16), .keys640([k])],
            [.integer(6), .keys640([k]), .integer(-1)],
            [.bytes([1, 2, 3])],
        ]
        for payload in bad {
            let reply = try await net.nodes[2].request(to: target, command: CommandID.derive(from: "dht.storage"), payload: payload).get()
            #expect(reply.type == .badRequest, "payload \(payload) got \(reply.type)")
        }
        #expect(text(try await net.nodes[2].dht.get(k).value) == "kept")
        #expect(try await net.nodes[2].ping(target.socket).id == target.id)
        await net.shutdown()
    }

    @Test("an unknown evaluation scheme is a clear error listing the registered ones")
    func unknownScheme() async throws {
        let net = try await testnet(3)
        var options = DHTOptions()
        options.evaluation = "telepathy"
        await #expect {
            _ = try await net.nodes[0].dht.get(key("x"), options: options)
        } throws: { e in
            "\(e)".contains("no evaluation scheme named 'telepathy' (registered: first, latest, majority, union)")
        }
        await net.shutdown()
    }

    @Test("a non-integer vote is refused and the count is unharmed")
    func badVote() async throws {
        let net = try await testnet(5)
        let ballot = key("ballot", domain: PeerVotePlugin.domain)
        try await net.nodes[0].dht.put(ballot, Array("2".utf8))
        let bad = try await net.nodes[1].dht.put(ballot, Array("lots".utf8))
        #expect(!bad.isSuccess)
        #expect(bad.failures.values.contains { $0.contains("a vote must be a decimal integer") })
        #expect(text(try await net.nodes[2].dht.get(ballot).value) == "2")
        await net.shutdown()
    }
}
