import Crypto
import Foundation
import GRDB
import P2PDHT
import P2PEvaluation
import P2PKernel
@testable import P2PSQLite
import P2PStorage
import P2PTesting
import Testing
import P2PTestSupport

/// A fresh folder under the system's temporary one, removed by `remove()`.
struct TempFolder {
    let path: String
    init() throws {
        path = NSTemporaryDirectory() + "p2p-sqlite-\(UInt64.random(in: 0...UInt64.max))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { path + "/" + name }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

private func fileBytes(_ path: String) -> [UInt8] {
    (try? [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))) ?? []
}

private func loc(_ text: String, domain: Number160 = .zero, content: Number160 = .zero, version: Number160 = .zero) -> Number640 {
    Number640(location: Number160(hashing: text), domain: domain, content: content, version: version)
}

/// The state of a backend, with expiry times rounded to whole seconds (a reopened store converts
/// them through the wall clock).
private func comparable(_ s: StorageChanges) -> [String] {
    var out: [String] = []
    for (k, e) in s.entries {
        guard let e else { continue }
        out.append("entry \(k) \(e.stored) writer \(e.writer?.id.description ?? "-") expires \(e.expiresAt == 0 ? "never" : "set")")
    }
    for (k, o) in s.entryOwners { out.append("item \(k) owner \(o?.id.description ?? "-")") }
    for (k, o) in s.domainOwners { out.append("domain \(k) owner \(o?.id.description ?? "-")") }
    return out.sorted()
}

@Suite("SQLite storage", .serialized)
struct SQLiteStorageTests {
    /// The requests of the parity test: versions and forks, a two-phase put, entry and domain
    /// protection, TTLs, putMeta, ifAbsent, removes, a domain handover and every kind of read.
    static func script(a: Curve25519.Signing.PrivateKey, b: Curve25519.Signing.PrivateKey) throws -> [(StorageRequest, SignerKey?)] {
        let A = SignerKey(a.publicKey), B = SignerKey(b.publicKey)
        let item = Number160(hashing: "item"), domain = Number160(hashing: "domain"), guarded = Number160(hashing: "guarded")
        let v1 = Number160(hashing: "v1"), v2 = Number160(hashing: "v2"), v3 = Number160(hashing: "v3"), v4 = Number160(hashing: "v4")
        let signedKey = loc("signed", content: item)
        var out: [(StorageRequest, SignerKey?)] = [
            (.put([loc("plain"): StoredValue(Array("a".utf8))], mode: .overwrite), nil),
            (.put([loc("ttl"): StoredValue(Array("b".utf8), ttlSeconds: 100)], mode: .overwrite), nil),
            (.put([loc("empty"): StoredValue([])], mode: .overwrite), nil),
            (.put([loc("v", content: item, version: v1): StoredValue(Array("1".utf8))], mode: .overwrite), nil),
            (.put([loc("v", content: item, version: v2): StoredValue(Array("2".utf8), basedOn: [v1])], mode: .overwrite), nil),
            // A fork: based on v1 while v2 is a head.
            (.put([loc("v", content: item, version: v3): StoredValue(Array("3".utf8), basedOn: [v1])], mode: .overwrite), nil),
            (.put([loc("v", content: item, version: v4): StoredValue(Array("4".utf8), basedOn: [v2, v3], prepared: true)], mode: .overwrite), nil),
            (.get(.latest(location: Number160(hashing: "v"), domain: .zero, content: item)), nil),
            (.confirm([loc("v", content: item, version: v4)]), nil),
            (.get(.latest(location: Number160(hashing: "v"), domain: .zero, content: item)), nil),
            (.put([signedKey: try StoredValue(Array("mine".utf8), protectEntry: true).signed(at: signedKey, by: a)], mode: .overwrite), A),
            // B may not overwrite A's protected entry.
            (.put([signedKey: try StoredValue(Array("theirs".utf8)).signed(at: signedKey, by: b)], mode: .overwrite), B),
            (.put([loc("guarded", domain: guarded): StoredValue(Array("g".utf8))], mode: [.protectDomain]), A),
            (.put([loc("guarded", domain: guarded, content: item): StoredValue(Array("h".utf8))], mode: .overwrite), nil),
            (.put([loc("plain"): StoredValue(Array("x".utf8))], mode: .ifAbsent), nil),
            (.putMeta([loc("ttl")], ttlSeconds: 200), nil),
            (.remove(.keys([loc("plain")]), returnValues: true), nil),
            (.remove(.keys([loc("nothing")]), returnValues: false), nil),
            (.transferDomain(location: Number160(hashing: "guarded"), domain: guarded, to: B), A),
            (.put([loc("guarded", domain: guarded, content: item): StoredValue(Array("h".utf8))], mode: .overwrite), B),
            (.put([loc("big"): StoredValue([UInt8](repeating: 1, count: 2_049))], mode: .overwrite), nil),
            (.digest(.all(location: Number160(hashing: "v"))), nil),
        ]
        for i in 0..<12 {
            out.append((.put([loc("many", domain: domain, content: Number160(hashing: "\(i)")): StoredValue(Array("\(i)".utf8), ttlSeconds: UInt32(i % 3))],
                             mode: .overwrite), A))
        }
        out.append((.get(.all(location: Number160(hashing: "many"), domain: domain)), nil))
        out.append((.remove(.range(from: loc("many", domain: domain), to: loc("many", domain: domain, content: .max, version: .max), limit: 4, descending: true),
                            returnValues: false), A))
        return out
    }

    static var limits: MemoryStorage.Limits {
        var l = MemoryStorage.Limits()
        l.maxValueBytes = 2_048
        l.maxEntries = 30
        l.maxBytesPerWriter = 20_000
        return l
    }

    @Test("every request answers as the memory backend does, and the file read back holds the same state, owners included")
    func parity() throws {
        let folder = try TempFolder()
        defer { folder.remove() }
        let a = Curve25519.Signing.PrivateKey(), b = Curve25519.Signing.PrivateKey()
        let memory = MemoryStorage(limits: Self.limits)
        var sqlite: SQLiteStorage? = try SQLiteStorage(path: folder.file("node.db"), limits: Self.limits)
        // Two clocks that read the same: both backends stamp unstamped writes alike.
        let wall = WriterProof.nowMillis()
        memory.use(versions: VersionClock(wallMillis: { wall }))
        sqlite?.use(versions: VersionClock(wallMillis: { wall }))
        var compared = 0, refused = 0
        for (request, writer) in try Self.script(a: a, b: b) {
            let now = StoragePipeline.now()
            let m = Result { () throws(StorageError) in try memory.execute(request, writer: writer, now: now) }
            let s = Result { () throws(StorageError) in try sqlite!.execute(request, writer: writer, now: now) }
            #expect(m == s, "\(request)")
            compared += 1
            if case .failure = m { refused += 1 }
        }
        // The script hits refusals too (protection, a too-large value, the entry limit).
        #expect(refused >= 3)
        #expect(compared > 30)
        sqlite?.flush()
        #expect(comparable(sqlite!.memory.snapshot()) == comparable(memory.snapshot()))
        let sizeBefore = memory.entryCount
        sqlite?.close()
        sqlite = nil
        let reopened = try SQLiteStorage(path: folder.file("node.db"), limits: Self.limits)
        // What expired meanwhile (TTL 1 and 2 s) may be gone; everything else is as it was.
        let live = memory.snapshot()
        var expected = StorageChanges()
        for (k, e) in live.entries where e?.expiresAt == 0 || (e?.stored.ttlSeconds ?? 0) >= 100 { expected.entries[k] = e }
        var got = StorageChanges()
        for (k, e) in reopened.memory.snapshot().entries where e?.expiresAt == 0 || (e?.stored.ttlSeconds ?? 0) >= 100 { got.entries[k] = e }
        expected.entryOwners = live.entryOwners
        expected.domainOwners = live.domainOwners
        let reopenedState = reopened.memory.snapshot()
        got.entryOwners = reopenedState.entryOwners
        got.domainOwners = reopenedState.domainOwners
        #expect(comparable(got) == comparable(expected))
        #expect(reopened.loadedEntries <= sizeBefore && reopened.loadedEntries >= expected.entries.count)
        // The owners act as before: B owns the handed-over domain, A the protected entry.
        let signedKey = loc("signed", content: Number160(hashing: "item"))
        #expect(reopened.memory.owner(ofEntry: signedKey) == SignerKey(a.publicKey))
        #expect(reopened.memory.owner(ofDomain: Number160(hashing: "guarded"), at: Number160(hashing: "guarded")) == SignerKey(b.publicKey))
        #expect(throws: StorageError.self) {
            try reopened.execute(.put([signedKey: try StoredValue(Array("x".utf8)).signed(at: signedKey, by: b)], mode: .overwrite),
                                 writer: SignerKey(b.publicKey), now: StoragePipeline.now())
        }
        // The per-writer quota counts what A wrote before the restart.
        #expect(reopened.memory.bytes(writtenBy: SignerKey(a.publicKey)) == memory.bytes(writtenBy: SignerKey(a.publicKey))
            || reopened.memory.bytes(writtenBy: SignerKey(a.publicKey)) < memory.bytes(writtenBy: SignerKey(a.publicKey)))
        reopened.close()
    }

    @Test("TTLs run on the wall clock across a restart: a 1-s value is gone after it, a 100-s value has at most 100 s left")
    func ttlAcrossRestart() async throws {
        let folder = try TempFolder()
        defer { folder.remove() }
        var store: SQLiteStorage? = try SQLiteStorage(path: folder.file("ttl.db"))
        _ = try store!.execute(.put([loc("short"): StoredValue(Array("s".utf8), ttlSeconds: 1),
                                     loc("long"): StoredValue(Array("l".utf8), ttlSeconds: 100)], mode: .overwrite), now: StoragePipeline.now())
        store?.close()
        store = nil
        try await Task.sleep(for: .milliseconds(1_500))
        let reopened = try SQLiteStorage(path: folder.file("ttl.db"))
        guard case .values(let v, _) = try reopened.execute(.get(.keys([loc("short"), loc("long")])), now: StoragePipeline.now()) else {
            Issue.record("not values")
            return
        }
        #expect(v[loc("short")] == nil)
        #expect(v[loc("long")]?.value == Array("l".utf8))
        #expect((v[loc("long")]?.remainingSeconds ?? 0) <= 100 && (v[loc("long")]?.remainingSeconds ?? 0) >= 90)
        reopened.close()
    }

    @Test("a put through the DHT is acknowledged only once its row is committed in the file")
    func acknowledgedMeansCommitted() async throws {
        let folder = try TempFolder()
        defer { folder.remove() }
        let store = try SQLiteStorage(path: folder.file("acked.db"))
        let net = try await Testnet.start(peers: 4, routing: .perfect, plugins: { i in
            i == 0 ? [DHTPlugin(backend: store), EvaluationPlugin()] : builtIns()
        })
        defer { Task { await net.shutdown() } }
        var acked = 0
        for i in 0..<40 {
            let k = loc("acked \(i)")
            var options = DHTOptions()
            options.replicas = 4
            let r = try await net.nodes[1].dht.put(k, Array("v\(i)".utf8), options: options)
            guard r.statuses.contains(where: { $0.key.id == net.nodes[0].peerID && $0.value[k] == .ok }) else { continue }
            // Read straight from the file, right after the acknowledgement.
            let rows = try store.database.read { db in
                try Int.fetchOne(db, sql: "SELECT count(*) FROM entries WHERE key = ?", arguments: [SQLiteStorage.bytes(k).data]) ?? 0
            }
            #expect(rows == 1, "put \(i) acknowledged by the SQLite peer but not in its file")
            acked += 1
        }
        #expect(acked == 40)
        #expect(store.commitCount >= 1 && store.committedWrites >= 40)
        await net.shutdown()
        store.close()
    }

    @Test("a commit that fails (the file cannot grow) fails its put with a typed error, undoes it in memory, and later puts work again")
    func failedCommitIsUndone() throws {
        let folder = try TempFolder()
        defer { folder.remove() }
        let store = try SQLiteStorage(path: folder.file("full.db"))
        // Cap the file at its current size plus a few pages: SQLite answers SQLITE_FULL.
        try store.database.write { db in
            let pages = try Int.fetchOne(db, sql: "PRAGMA page_count") ?? 0
            _ = try Int.fetchOne(db, sql: "PRAGMA max_page_count = \(pages + 8)")
        }
        var stored: [Number640] = []
        var failure: StorageError?
        for i in 0..<200 {
            let k = loc("fill \(i)")
            let mark = store.durabilityMark()
            _ = try store.execute(.put([k: StoredValue([UInt8](repeating: UInt8(i & 0xFF), count: 1_000))], mode: .overwrite), now: StoragePipeline.now())
            let outcome = Box<StorageError>()
            let done = DispatchSemaphore(value: 0)
            store.whenDurable(since: mark) { outcome.value = $0; done.signal() }
            done.wait()
            if let e = outcome.value {
                failure = e
                // Undone: memory was read back from the file, which does not hold it.
                #expect(try holdsKey(store, k) == false)
                break
            }
            stored.append(k)
        }
        guard case .backendFailed(let reason)? = failure else {
            Issue.record("no commit failed: \(String(describing: failure))")
            return
        }
        #expect(reason.contains("full"), "\(reason)")
        #expect(store.failedCommits == 1)
        #expect(!stored.isEmpty)
        for k in stored { #expect(try holdsKey(store, k)) }
        // Room again: puts are kept.
        try store.database.write { db in _ = try Int.fetchOne(db, sql: "PRAGMA max_page_count = 1000000") }
        let k = loc("after")
        let mark = store.durabilityMark()
        _ = try store.execute(.put([k: StoredValue(Array("ok".utf8))], mode: .overwrite), now: StoragePipeline.now())
        let outcome = Box<StorageError>()
        let done = DispatchSemaphore(value: 0)
        store.whenDurable(since: mark) { outcome.value = $0; done.signal() }
        done.wait()
        #expect(outcome.value == nil)
        #expect(try holdsKey(store, k))
        store.close()
    }

    @Test("writes that come faster than the disk takes them are refused (busy) past the pending bound, not queued without end")
    func pendingBound() throws {
        let folder = try TempFolder()
        defer { folder.remove() }
        let store = try SQLiteStorage(path: folder.file("slow.db"), maxPendingBytes: 10_000)
        // Hold the file: the writer thread's commit waits, as behind a slow disk.
        let held = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            try? store.database.write { _ in
                held.signal()
                release.wait()
            }
        }
        held.wait()
        var accepted = 0
        var busy: StorageError?
        for i in 0..<50 {
            do {
                _ = try store.execute(.put([loc("slow \(i)"): StoredValue([UInt8](repeating: 1, count: 1_000))], mode: .overwrite), now: StoragePipeline.now())
                accepted += 1
            } catch {
                busy = error
                break
            }
        }
        release.signal()
        guard case .busy? = busy else {
            Issue.record("no write was refused: \(String(describing: busy))")
            return
        }
        // About 10,000 bytes of changes at 1,200 each: the bound, plus the write that crossed it.
        #expect(accepted >= 5 && accepted <= 10, "\(accepted)")
        store.flush()
        _ = try store.execute(.put([loc("after"): StoredValue([1])], mode: .overwrite), now: StoragePipeline.now())
        store.flush()
        #expect(store.committedWrites == accepted + 1)
        store.close()
    }

    @Test("files that are not this node's storage are refused with a typed error and left byte for byte as they were")
    func badFiles() throws {
        let folder = try TempFolder()
        defer { folder.remove() }
        // Not a database at all.
        let garbage = folder.file("garbage.db")
        let noise = (0..<8_192).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ 7) }
        FileManager.default.createFile(atPath: garbage, contents: Data(noise))
        #expect(throws: SQLiteStorageError.notADatabase(path: garbage)) { try SQLiteStorage(path: garbage) }
        let garbageKept = fileBytes(garbage) == noise
        #expect(garbageKept)
        // Another application's database.
        let foreign = folder.file("foreign.db")
        do {
            let q = try DatabaseQueue(path: foreign)
            try q.write { db in try db.execute(sql: "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER); INSERT INTO accounts VALUES (1, 100)") }
            try q.close()
        }
        let foreignBytes = fileBytes(foreign)
        #expect {
            try SQLiteStorage(path: foreign)
        } throws: { e in
            if case .foreignDatabase = e as? SQLiteStorageError { return true }
            return false
        }
        let foreignKept = fileBytes(foreign) == foreignBytes
        #expect(foreignKept)
        // Written by a newer layout.
        let newer = folder.file("newer.db")
        do {
            let s = try SQLiteStorage(path: newer)
            s.close()
            let q = try DatabaseQueue(path: newer)
            try q.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA user_version = 99") }
            try q.close()
        }
        #expect(throws: SQLiteStorageError.newerLayout(path: newer, version: 99)) { try SQLiteStorage(path: newer) }
        // A real storage file with a damaged page.
        let damaged = folder.file("damaged.db")
        do {
            let s = try SQLiteStorage(path: damaged)
            for i in 0..<300 { _ = try s.execute(.put([loc("d\(i)"): StoredValue([UInt8](repeating: 7, count: 200))], mode: .overwrite), now: StoragePipeline.now()) }
            s.close()
        }
        var bytes = fileBytes(damaged)
        #expect(bytes.count > 16 * 4096)
        for i in (4 * 4096)..<(4 * 4096 + 4096) { bytes[i] = UInt8(truncatingIfNeeded: i &* 37) }
        try Data(bytes).write(to: URL(fileURLWithPath: damaged))
        #expect {
            try SQLiteStorage(path: damaged)
        } throws: { e in
            switch e as? SQLiteStorageError {
            case .corrupt?, .notADatabase?: return true
            default: return false
            }
        }
        let damagedKept = fileBytes(damaged) == bytes
        #expect(damagedKept)
        // A folder, a missing folder.
        #expect(throws: SQLiteStorageError.self) { try SQLiteStorage(path: folder.path) }
        #expect(throws: SQLiteStorageError.self) { try SQLiteStorage(path: folder.file("no/such/folder.db")) }
    }

    @Test("a file held open by one storage is refused to a second (two nodes never write one file)")
    func inUse() throws {
        let folder = try TempFolder()
        defer { folder.remove() }
        let first = try SQLiteStorage(path: folder.file("shared.db"))
        _ = try first.execute(.put([loc("x"): StoredValue([1])], mode: .overwrite), now: StoragePipeline.now())
        first.flush()
        #expect(throws: SQLiteStorageError.inUse(path: folder.file("shared.db"))) { try SQLiteStorage(path: folder.file("shared.db")) }
        first.close()
        let second = try SQLiteStorage(path: folder.file("shared.db"))
        #expect(second.loadedEntries == 1)
        second.close()
    }

    @Test("the routing table is saved and a restarted node rejoins through it with no bootstrap address; nobody answering is a typed error")
    func rejoinFromSavedTable() async throws {
        let folder = try TempFolder()
        defer { folder.remove() }
        let net = try await Testnet.start(peers: 30, routing: .bootstrap)
        defer { Task { await net.shutdown() } }
        let path = folder.file("peers.db")
        do {
            let database = try SQLiteDatabase(path: path)
            let plugin = SQLitePlugin(database: database)
            let node = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).plugin(plugin).start()
            try await node.bootstrap(to: net.nodes[0].address.socket)
            #expect(node.peerMap.counts.verified >= 10)
            await node.shutdown()
            #expect(try plugin.savedPeers().count >= 10)
            database.close()
        }
        let database = try SQLiteDatabase(path: path)
        let plugin = SQLitePlugin(database: database)
        let saved = try plugin.savedPeers()
        #expect(saved.allSatisfy { p in net.nodes.contains { $0.peerID == p.id } })
        let node = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).plugin(plugin).start()
        let clock = ContinuousClock()
        let start = clock.now
        let r = try await node.rejoin(from: saved)
        let took = clock.now - start
        print("rejoin from \(saved.count) saved peers: \(took), \(r.verifiedPeers) verified peers")
        #expect(r.verifiedPeers >= 10)
        #expect(net.nodes.contains { $0.peerID == r.seed.id })
        await node.shutdown()
        database.close()
        // Nobody answers: every saved peer is gone.
        await net.shutdown()
        let lonely = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).requestTimeout(.milliseconds(500)).start()
        await #expect(throws: RejoinError.self) { try await lonely.rejoin(from: saved) }
        await lonely.shutdown()
    }
}

/// A value set from another thread and read after a semaphore.
final class Box<T>: @unchecked Sendable {
    var value: T?
}

private func holdsKey(_ store: SQLiteStorage, _ k: Number640) throws -> Bool {
    guard case .values(let v, _) = try store.execute(.get(.keys([k])), now: StoragePipeline.now()) else { return false }
    return v[k] != nil
}
