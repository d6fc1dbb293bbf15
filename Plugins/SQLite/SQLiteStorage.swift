import Dispatch
import Foundation
import GRDB
import NIOConcurrencyHelpers
import P2PKernel
import P2PStorage

/// A storage backend that keeps every value in a SQLite file and survives restarts and crashes.
///
/// Its semantics are the memory backend's, exactly: every request is carried out by a
/// `MemoryStorage` (TTL, versions, prepared values, signatures and protection, every limit), and
/// what the request changed (`StorageChanges`) is written to the file. A write is acknowledged
/// (by the storage pipeline, through `whenDurable`) only after its changes are committed; reads
/// are answered from memory at memory's speed. The file is read back whole at start.
///
/// ```
///  write ─ MemoryStorage (checks, applies) ─ changes ─┬─ queue ─ writer thread: one transaction
///                                                      │          for all queued, commit, fsync
///  ack  ◄──────────────────────────────── whenDurable ─┘◄─ committed
/// ```
/// Writes queued while a commit runs share the next one (group commit): a request's changes are
/// never split over two transactions, and one fsync covers many requests under load. A commit
/// that fails (a full disk) fails every write it held or that came after it, and memory is
/// read back from the file, so what is served is always what is on disk.
///
/// Values expire by the wall clock: a value with an hour left when the node stops has an hour
/// less when it starts again.
public final class SQLiteStorage: StorageBackend, @unchecked Sendable {
    public let name = "sqlite"
    public let database: SQLiteDatabase
    /// Carries out every request; holds what the file holds.
    public let memory: MemoryStorage

    private struct Failure {
        let from: UInt64
        let through: UInt64
        let error: StorageError
    }

    private struct Waiter {
        let since: UInt64
        let through: UInt64
        let done: @Sendable (StorageError?) -> Void
    }

    /// Commits, by sequence number: a write's changes get the next number.
    private struct State {
        var pending: [(seq: UInt64, changes: StorageChanges)] = []
        var assigned: UInt64 = 0
        /// Every write up to here is resolved: committed, or undone by a failure.
        var resolved: UInt64 = 0
        var failures: [Failure] = []
        /// Failures older than those kept end here: a waiter from before is failed to be safe.
        var forgottenThrough: UInt64 = 0
        var waiters: [Waiter] = []
        var scheduled = false
        /// Set when the file could not be read back after a failed commit: writes are refused.
        var broken: StorageError?
        var lastCleanup = 0 as Int64
        var closed = false
        var loaded = 0
        /// Bytes of changes queued or being committed.
        var pendingBytes = 0
    }

    private let lock = NIOLock()
    private var state = State()
    private let writerQueue = DispatchQueue(label: "p2p.sqlite.writer")

    /// Commits made, writes they carried, and commits that failed (for metrics and tests).
    public var commitCount: Int { counters.withLockedValue { $0.commits } }
    public var committedWrites: Int { counters.withLockedValue { $0.writes } }
    public var failedCommits: Int { counters.withLockedValue { $0.failed } }
    private let counters = NIOLockedValueBox((commits: 0, writes: 0, failed: 0))

    /// Most bytes of changes waiting for their commit (64 MiB): writes that come faster than the
    /// disk takes them are refused (`busy`) beyond it, instead of piling up in memory.
    public let maxPendingBytes: Int

    /// Opens the storage in `database`, reading back everything stored there.
    public init(database: SQLiteDatabase, limits: MemoryStorage.Limits = MemoryStorage.Limits(),
                protection: ProtectionPolicy = ProtectionPolicy(), maxPendingBytes: Int = 64 << 20) throws(SQLiteStorageError) {
        self.maxPendingBytes = max(1, maxPendingBytes)
        self.database = database
        self.memory = MemoryStorage(limits: limits, protection: protection)
        try load()
    }

    /// Opens (or creates) the file at `path`.
    public convenience init(path: String, sync: SQLiteDatabase.Sync = .full, limits: MemoryStorage.Limits = MemoryStorage.Limits(),
                            protection: ProtectionPolicy = ProtectionPolicy(), maxPendingBytes: Int = 64 << 20) throws(SQLiteStorageError) {
        try self.init(database: SQLiteDatabase(path: path, sync: sync), limits: limits, protection: protection, maxPendingBytes: maxPendingBytes)
    }

    /// Entries read back at start (or after a failed commit).
    public var loadedEntries: Int { lock.withLock { state.loaded } }

    // MARK: StorageBackend

    public func execute(_ request: StorageRequest, writer: SignerKey?, now: UInt64) throws(StorageError) -> StorageResult {
        guard request.isWrite else { return try memory.execute(request, writer: writer, now: now) }
        let outcome = lock.withLock { () -> Result<StorageResult, StorageError> in
            if let broken = state.broken { return .failure(broken) }
            if state.closed { return .failure(.backendFailed("storage \(database.path) is closed")) }
            if state.pendingBytes >= maxPendingBytes {
                return .failure(.busy("\(state.pendingBytes) bytes of writes wait for the disk (at most \(maxPendingBytes))"))
            }
            return Result { () throws(StorageError) -> StorageResult in
                let (result, changes) = try memory.executeRecording(request, writer: writer, now: now)
                if !changes.isEmpty {
                    state.assigned += 1
                    state.pending.append((state.assigned, changes))
                    state.pendingBytes += Self.size(changes)
                    scheduleLocked()
                }
                return result
            }
        }
        return try outcome.get()
    }

    public func sweepExpired(now: UInt64) -> Int {
        let removed = memory.sweepExpired(now: now)
        // The file forgets expired rows now and then (they are skipped when read back anyway).
        let wall = SQLiteDatabase.wallMillis()
        let due = lock.withLock { () -> Bool in
            guard !state.closed, wall - state.lastCleanup >= 60_000 else { return false }
            state.lastCleanup = wall
            return true
        }
        if due {
            writerQueue.async { [database] in
                _ = try? database.write { db in
                    try db.execute(sql: "DELETE FROM entries WHERE expires_at > 0 AND expires_at <= ?", arguments: [wall])
                }
            }
        }
        return removed
    }

    public func storedLocations() -> [Number160] { memory.storedLocations() }
    public func use(versions: VersionClock) { memory.use(versions: versions) }
    public func versions(at location: Number160, after: Number640?, limit: Int, now: UInt64) -> (versions: [EntryVersion], more: Bool) {
        memory.versions(at: location, after: after, limit: limit, now: now)
    }
    public func replicaEntries(_ keys: [Number640], now: UInt64) -> [Number640: StoredValue] { memory.replicaEntries(keys, now: now) }

    public func evict(_ versions: [EntryVersion], now: UInt64) -> Int {
        lock.withLock { () -> Int in
            guard state.broken == nil, !state.closed else { return 0 }
            let (n, changes) = memory.evictRecording(versions, now: now)
            if !changes.isEmpty {
                state.assigned += 1
                state.pending.append((state.assigned, changes))
                state.pendingBytes += Self.size(changes)
                scheduleLocked()
            }
            return n
        }
    }

    public var defersDurability: Bool { true }

    public var usage: StorageUsage? { memory.usage }
    public var nextExpiry: UInt64? { memory.nextExpiry }

    public func durabilityMark() -> UInt64 { lock.withLock { state.assigned } }

    public func whenDurable(since mark: UInt64, _ done: @escaping @Sendable (StorageError?) -> Void) {
        let now: StorageError?? = lock.withLock {
            let waiter = Waiter(since: mark, through: state.assigned, done: done)
            if waiter.through <= state.resolved { return .some(outcomeLocked(waiter)) }
            state.waiters.append(waiter)
            return .none
        }
        if case .some(let outcome) = now { done(outcome) }
    }

    /// Waits until every write carried out so far is committed (or failed).
    public func flush() {
        writerQueue.sync { drain() }
    }

    /// Commits what is queued, refuses writes from now on and closes the file (the node is
    /// stopping).
    public func close() {
        lock.withLock { state.closed = true }
        flush()
        writerQueue.sync { database.close() }
    }

    // MARK: committing

    private func scheduleLocked() {
        guard !state.scheduled else { return }
        state.scheduled = true
        writerQueue.async { self.drain() }
    }

    /// On the writer queue: commits everything queued in one transaction.
    private func drain() {
        let batch = lock.withLock { () -> [(seq: UInt64, changes: StorageChanges)] in
            state.scheduled = false
            defer { state.pending = [] }
            return state.pending
        }
        guard let last = batch.last?.seq else { return }
        let batchBytes = batch.reduce(0) { $0 + Self.size($1.changes) }
        let wallNow = SQLiteDatabase.wallMillis()
        let uptimeNow = StoragePipeline.now()
        var ready: [(Waiter, StorageError?)] = []
        do {
            try database.write { db in
                for item in batch { try Self.write(item.changes, to: db, wallNow: wallNow, uptimeNow: uptimeNow) }
            }
            counters.withLockedValue { $0.commits += 1; $0.writes += batch.count }
            ready = lock.withLock {
                state.resolved = max(state.resolved, last)
                state.pendingBytes -= batchBytes
                return readyLocked()
            }
        } catch {
            counters.withLockedValue { $0.failed += 1 }
            let failure = StorageError.backendFailed("\(error)")
            ready = lock.withLock {
                // Everything not on disk is undone: what was queued after this batch was carried
                // out on top of it. Memory is read back from the file.
                let from = state.resolved + 1
                state.pending = []
                state.pendingBytes = 0
                state.failures.append(Failure(from: from, through: state.assigned, error: failure))
                if state.failures.count > 64 { state.forgottenThrough = state.failures.removeFirst().through }
                state.resolved = state.assigned
                do throws(SQLiteStorageError) {
                    try loadLocked()
                } catch {
                    state.broken = .backendFailed("\(error); writes are refused until the node restarts")
                }
                return readyLocked()
            }
        }
        for (waiter, outcome) in ready { waiter.done(outcome) }
    }

    private func readyLocked() -> [(Waiter, StorageError?)] {
        var ready: [(Waiter, StorageError?)] = []
        var waiting: [Waiter] = []
        for w in state.waiters {
            if w.through <= state.resolved { ready.append((w, outcomeLocked(w))) } else { waiting.append(w) }
        }
        state.waiters = waiting
        return ready
    }

    /// A resolved waiter's outcome: failed when any write after its mark was undone.
    private func outcomeLocked(_ w: Waiter) -> StorageError? {
        if w.since < state.forgottenThrough { return .backendFailed("an earlier commit failed") }
        return state.failures.first { $0.through > w.since && $0.from <= w.through }?.error
    }

    // MARK: rows

    private static func write(_ changes: StorageChanges, to db: Database, wallNow: Int64, uptimeNow: UInt64) throws {
        for (key, entry) in changes.entries {
            let k = Self.bytes(key).data
            guard let e = entry else {
                try db.cachedStatement(sql: "DELETE FROM entries WHERE key = ?").execute(arguments: [k])
                continue
            }
            let v = e.stored
            var expires: Int64 = 0
            if e.expiresAt != 0 {
                let left = e.expiresAt > uptimeNow ? Int64((e.expiresAt - uptimeNow) / 1_000_000) : 0
                expires = max(1, wallNow + left)
            }
            try db.cachedStatement(sql: """
                INSERT OR REPLACE INTO entries (key, value, ttl, based_on, prepared, protect_entry, signer, signature, expires_at, writer,
                                                stamp, tombstone)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """).execute(arguments: [
                    k, v.value.data, Int64(v.ttlSeconds), v.basedOn.flatMap(\.bytes).data, v.prepared ? 1 : 0, v.protectEntry ? 1 : 0,
                    v.signature?.signer.bytes.data, v.signature?.signature.data, expires, e.writer?.bytes.data,
                    Int64(bitPattern: v.stamp), v.isTombstone ? 1 : 0,
                ])
        }
        for (item, owner) in changes.entryOwners {
            let k = Array(Self.bytes(item).prefix(60)).data
            if let owner {
                try db.cachedStatement(sql: "INSERT OR REPLACE INTO entry_owners (item, owner) VALUES (?, ?)").execute(arguments: [k, owner.bytes.data])
            } else {
                try db.cachedStatement(sql: "DELETE FROM entry_owners WHERE item = ?").execute(arguments: [k])
            }
        }
        for (domain, owner) in changes.domainOwners {
            let k = Array(Self.bytes(domain).prefix(40)).data
            if let owner {
                try db.cachedStatement(sql: "INSERT OR REPLACE INTO domain_owners (domain, owner) VALUES (?, ?)").execute(arguments: [k, owner.bytes.data])
            } else {
                try db.cachedStatement(sql: "DELETE FROM domain_owners WHERE domain = ?").execute(arguments: [k])
            }
        }
    }

    private func load() throws(SQLiteStorageError) {
        let r = lock.withLock { () -> Result<Void, SQLiteStorageError> in Result { () throws(SQLiteStorageError) in try loadLocked() } }
        try r.get()
    }

    /// Reads the whole file into memory. A row that cannot be what this build wrote is
    /// corruption: the file is refused, not repaired.
    private func loadLocked() throws(SQLiteStorageError) {
        let path = database.path
        let wallNow = SQLiteDatabase.wallMillis()
        let uptimeNow = StoragePipeline.now()
        let state = try database.read { db -> StorageChanges in
            var out = StorageChanges()
            let rows = try Row.fetchCursor(db, sql: """
                SELECT key, value, ttl, based_on, prepared, protect_entry, signer, signature, expires_at, writer, stamp, tombstone FROM entries
                """)
            var n = 0
            while let row = try rows.next() {
                n += 1
                guard let kb = row.blob(0), let key = Self.key(kb) else { throw SQLiteStorageError.corrupt(path: path, detail: "entry \(n): a key of the wrong size") }
                guard let value = row.blob(1) ?? (row.isNull(1) ? [] : nil), let ttl = row.int(2), let ttlSeconds = UInt32(exactly: ttl),
                      let basedBytes = row.blob(3) ?? (row.isNull(3) ? [] : nil), basedBytes.count % 20 == 0,
                      let prepared = row.int(4), let protect = row.int(5), let expires = row.int(8),
                      let stamp = row.int(10), let tombstone = row.int(11), tombstone == 0 || value.isEmpty else {
                    throw SQLiteStorageError.corrupt(path: path, detail: "entry \(n) at \(key): a column of the wrong type")
                }
                var signature: ValueSignature?
                if !row.isNull(6) || !row.isNull(7) {
                    guard let s = row.blob(6), let signer = SignerKey(bytes: s), let sig = row.blob(7), sig.count == 64 else {
                        throw SQLiteStorageError.corrupt(path: path, detail: "entry \(n) at \(key): a bad signature")
                    }
                    signature = ValueSignature(signer: signer, signature: sig)
                }
                var writer: SignerKey?
                if !row.isNull(9) {
                    guard let w = row.blob(9).flatMap(SignerKey.init(bytes:)) else {
                        throw SQLiteStorageError.corrupt(path: path, detail: "entry \(n) at \(key): a bad writer key")
                    }
                    writer = w
                }
                var expiresAt: UInt64 = 0
                if expires != 0 {
                    guard expires > wallNow else { continue }
                    // A TTL is at most UInt32.max seconds: a larger time left is a damaged row,
                    // capped rather than overflowing.
                    let leftMillis = min(UInt64(expires - wallNow), UInt64(UInt32.max) * 1000)
                    expiresAt = uptimeNow &+ leftMillis * 1_000_000
                }
                let basedOn = stride(from: 0, to: basedBytes.count, by: 20).compactMap { Number160(bytes: basedBytes[$0..<$0 + 20]) }
                var stored = StoredValue(value, ttlSeconds: ttlSeconds, basedOn: basedOn, prepared: prepared != 0, protectEntry: protect != 0,
                                         signature: signature)
                stored.remainingSeconds = nil
                stored.stamp = UInt64(bitPattern: stamp)
                stored.isTombstone = tombstone != 0
                out.entries[key] = StorageChanges.Entry(stored: stored, expiresAt: expiresAt, writer: writer)
            }
            for row in try Row.fetchAll(db, sql: "SELECT item, owner FROM entry_owners") {
                guard let i = row.blob(0), i.count == 60, let item = Self.key(i + [UInt8](repeating: 0, count: 20)),
                      let owner = row.blob(1).flatMap(SignerKey.init(bytes:)) else {
                    throw SQLiteStorageError.corrupt(path: path, detail: "an entry owner row of the wrong shape")
                }
                out.entryOwners[item] = owner
            }
            for row in try Row.fetchAll(db, sql: "SELECT domain, owner FROM domain_owners") {
                guard let d = row.blob(0), d.count == 40, let domain = Self.key(d + [UInt8](repeating: 0, count: 40)),
                      let owner = row.blob(1).flatMap(SignerKey.init(bytes:)) else {
                    throw SQLiteStorageError.corrupt(path: path, detail: "a domain owner row of the wrong shape")
                }
                out.domainOwners[domain] = owner
            }
            return out
        }
        memory.restore(state, now: uptimeNow)
        self.state.loaded = memory.entryCount
    }

    /// What a change set holds in memory, roughly: values, keys and bookkeeping.
    static func size(_ c: StorageChanges) -> Int {
        var n = 64
        for (_, e) in c.entries { n += 200 + (e?.stored.value.count ?? 0) + (e?.stored.basedOn.count ?? 0) * 20 }
        return n + (c.entryOwners.count + c.domainOwners.count) * 120
    }

    static func bytes(_ k: Number640) -> [UInt8] {
        k.location.bytes + k.domain.bytes + k.content.bytes + k.version.bytes
    }

    static func key(_ b: [UInt8]) -> Number640? {
        guard b.count == 80, let l = Number160(bytes: b[0..<20]), let d = Number160(bytes: b[20..<40]),
              let c = Number160(bytes: b[40..<60]), let v = Number160(bytes: b[60..<80]) else { return nil }
        return Number640(location: l, domain: d, content: c, version: v)
    }
}
