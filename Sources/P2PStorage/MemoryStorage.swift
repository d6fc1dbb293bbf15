import HeapModule
import NIOConcurrencyHelpers
import P2PKernel

/// The default storage backend: values in memory, bounded in value size, total bytes, entries
/// (per location and overall), basedOn keys, result bytes and optionally bytes per writer; with
/// TTL expiry by a heap, versions, two-phase puts, and TomP2P's protection (`ProtectionPolicy`).
public final class MemoryStorage: StorageBackend, @unchecked Sendable {
    /// The bounds of one peer's storage.
    public struct Limits: Sendable {
        /// Largest single value (1 MiB): a value is sent whole in one message.
        public var maxValueBytes = 1 << 20
        /// All entries together (256 MiB), each counted whole: its value, its key, the versions
        /// it is based on, its signature and the bookkeeping around it (`MemoryStorage.footprint`,
        /// calibrated against resident memory),
        /// so that a million empty values or megabytes of basedOn keys count as what they cost.
        public var maxTotalBytes = 256 << 20
        /// Most values under one location (10,000; removals are bounded by `maxEntries` and
        /// `maxTotalBytes` instead): bounds range queries and one location's cost.
        public var maxEntriesPerLocation = 10_000
        /// Most entries over all locations (500,000).
        public var maxEntries = 500_000
        /// Most versions one value may be based on (64): each is a key kept and compared.
        public var maxBasedOn = 64
        /// Most bytes one answer carries (2 MiB, at least one value): a larger range, key list or
        /// remove-with-values stops there and says where to resume.
        public var maxResultBytes = 2 << 20
        /// Most entries one answer covers (1,000): a get, digest or remove over a larger range
        /// stops there (a get or remove says where to resume), so no single request holds the
        /// event loop for more than a few milliseconds.
        public var maxResultEntries = 1_000
        /// Most bytes (footprints) the values one writer key wrote may hold here; nil for no quota.
        /// Unsigned writes are not counted against any writer.
        public var maxBytesPerWriter: Int?
        /// Most expired entries one sweep removes (2,000, ~3 ms): a mass expiry is spread over
        /// several sweeps (expired values are invisible at once either way).
        public var maxSweptPerRound = 2_000
        /// How long a removal is kept after its stamp (24 hours): the longest a replica may be
        /// away (partitioned, or down with durable storage) and still have its older copies
        /// refused when it comes back. A removal counts against the bounds like a value.
        public var tombstoneLifetimeSeconds: UInt32 = 86_400
        public init() {}
    }

    /// What one entry costs beyond its value, basedOn keys and signature: the 80-byte key twice
    /// (dictionary and sorted list), the entry, the arrays' headers, its location's and item's
    /// bookkeeping and the dictionaries' slack — what `p2p sim --ops` measures as resident bytes
    /// per stored 100-byte entry (~920, value included).
    public static let entryOverhead = 800
    /// What a signature adds (its 96 bytes, their arrays, the owner's key): measured ~400.
    public static let signatureOverhead = 400

    /// Bytes an entry holding `v` counts against `Limits.maxTotalBytes`.
    public static func footprint(_ v: StoredValue) -> Int {
        entryOverhead + v.value.count + v.basedOn.count * 20 + (v.signature == nil ? 0 : signatureOverhead)
    }

    struct Entry {
        var stored: StoredValue
        /// Uptime nanoseconds at which it expires; 0 never.
        var expiresAt: UInt64
        /// Who wrote it (the request's proven writer), for the per-writer quota.
        var writer: SignerKey?

        func visible(at now: UInt64) -> Bool { !stored.prepared && !stored.isTombstone && (expiresAt == 0 || expiresAt > now) }
        /// Not expired (a removal included: it still decides the key's order).
        func live(at now: UInt64) -> Bool { expiresAt == 0 || expiresAt > now }
        /// Holds a value, confirmed or not (not a removal), not expired.
        func present(at now: UInt64) -> Bool { !stored.isTombstone && live(at: now) }
    }

    /// An item: the versions under one location, domain and content.
    struct Item: Hashable {
        let domain: Number160
        let content: Number160
        init(_ key: Number640) {
            domain = key.domain
            content = key.content
        }
    }

    /// The versions of one item and which of them are heads, kept up to date as versions come
    /// and go, so that fork detection and getLatest cost O(basedOn) per version, never a scan of
    /// the item. A version counts once it is stored and confirmed (not prepared); an expired
    /// version counts until the sweep removes it (readers filter heads by visibility). Which
    /// versions exist is the location's entries; the index keeps only their number, the heads
    /// and how many counted versions are based on each version (absent: none).
    struct VersionIndex {
        private(set) var count = 0
        /// Of `count`, the removals (tombstones).
        private(set) var removals = 0
        private(set) var heads: Set<Number160> = []
        private var refs: [Number160: Int] = [:]

        var isEmpty: Bool { count == 0 }
        /// Whether any version is a value (not a removal).
        var hasValues: Bool { count > removals }

        mutating func insert(_ version: Number160, basedOn: [Number160], prepared: Bool, removal: Bool = false) {
            count += 1
            if removal { removals += 1 }
            if !prepared { counted(version, basedOn: basedOn) }
        }

        /// Takes a version out; returns the versions no counted version is based on any more:
        /// the caller makes those that are stored and confirmed heads (`promote`).
        mutating func remove(_ version: Number160, basedOn: [Number160], prepared: Bool, removal: Bool = false) -> [Number160] {
            count -= 1
            if removal { removals -= 1 }
            guard !prepared else { return [] }
            heads.remove(version)
            var freed: [Number160] = []
            for b in Self.distinct(basedOn) where b != version {
                let left = (refs[b] ?? 1) - 1
                refs[b] = left > 0 ? left : nil
                if left <= 0 { freed.append(b) }
            }
            return freed
        }

        /// A prepared version confirmed: it counts from now on.
        mutating func confirm(_ version: Number160, basedOn: [Number160]) { counted(version, basedOn: basedOn) }

        /// A stored, confirmed version that nothing is based on any more becomes a head.
        mutating func promote(_ version: Number160) {
            if refs[version] == nil { heads.insert(version) }
        }

        /// basedOn without repeats (most values have none or one: no set is built for those).
        static func distinct(_ basedOn: [Number160]) -> [Number160] {
            basedOn.count < 2 ? basedOn : Array(Set(basedOn))
        }

        private mutating func counted(_ version: Number160, basedOn: [Number160]) {
            for b in Self.distinct(basedOn) where b != version {
                refs[b, default: 0] += 1
                if refs[b] == 1 { heads.remove(b) }
            }
            if refs[version] == nil { heads.insert(version) }
        }
    }

    /// Takes an entry's version out of its item's index, making the versions it freed heads.
    private static func unindex(_ key: Number640, _ stored: StoredValue, in loc: inout Location) {
        let item = Item(key)
        guard let freed = loc.items[item]?.remove(key.version, basedOn: stored.basedOn, prepared: !stored.counts, removal: stored.isTombstone) else { return }
        for b in freed {
            let k = Number640(location: key.location, domain: key.domain, content: key.content, version: b)
            if let e = loc.entries[k], !e.stored.prepared { loc.items[item]?.promote(b) }
        }
    }

    /// One location's entries, with a sorted key list rebuilt only when a range query needs it,
    /// each item's versions (fork detection and getLatest look at one item, not the location),
    /// and who owns which item and domain.
    struct Location {
        var entries: [Number640: Entry] = [:]
        var sortedCache: [Number640]?
        var items: [Item: VersionIndex] = [:]
        var entryOwners: [Item: SignerKey] = [:]
        var domainOwners: [Number160: SignerKey] = [:]
        var domainCounts: [Number160: Int] = [:]

        /// Values held (removals not counted).
        var valueCount: Int { domainCounts.values.reduce(0, +) }

        mutating func sortedKeys() -> [Number640] {
            if let s = sortedCache { return s }
            let s = entries.keys.sorted()
            sortedCache = s
            return s
        }
    }

    /// When a value expires; stale once its entry changed (checked when it comes up).
    struct Expiry: Comparable {
        let at: UInt64
        let key: Number640
        static func < (a: Expiry, b: Expiry) -> Bool { a.at < b.at }
    }

    public let name = "memory"
    public let limits: Limits
    public let protection: ProtectionPolicy
    private let lock = NIOLock()
    /// Stamps unstamped writes, observes stored stamps, reads wall time (the node's, once the
    /// pipeline hands it over: `use(versions:)`).
    private var versions = VersionClock()
    private var locations: [Number160: Location] = [:]
    private var totalBytes = 0
    private var totalEntries = 0
    private var expiries = Heap<Expiry>()
    private var writerBytes: [SignerKey: Int] = [:]
    /// What the request being carried out touched, while `executeRecording` runs.
    private var touched: Touched?

    public init(limits: Limits = Limits(), protection: ProtectionPolicy = ProtectionPolicy()) {
        self.limits = limits
        self.protection = protection
    }

    /// Bytes held by all entries, each counted whole (`footprint`).
    public var bytesStored: Int { lock.withLock { totalBytes } }
    /// Entries held, including prepared and not yet swept expired ones.
    public var entryCount: Int { lock.withLock { totalEntries } }
    public var usage: StorageUsage? { lock.withLock { StorageUsage(entries: totalEntries, bytes: totalBytes) } }
    public var nextExpiry: UInt64? { lock.withLock { expiries.min?.at } }
    public func use(versions: VersionClock) { lock.withLock { self.versions = versions } }

    /// Bytes held for one writer key (its quota's use).
    public func bytes(writtenBy writer: SignerKey) -> Int { lock.withLock { writerBytes[writer] ?? 0 } }

    /// The owner of an entry (every version of location, domain, content), if protected.
    public func owner(ofEntry key: Number640) -> SignerKey? {
        lock.withLock { locations[key.location]?.entryOwners[Item(key)] }
    }

    /// The owner of a domain at a location, if protected.
    public func owner(ofDomain domain: Number160, at location: Number160) -> SignerKey? {
        lock.withLock { locations[location]?.domainOwners[domain] }
    }

    public func execute(_ request: StorageRequest, writer: SignerKey?, now: UInt64) throws(StorageError) -> StorageResult {
        let result = lock.withLock { () -> Result<StorageResult, StorageError> in
            Result { () throws(StorageError) -> StorageResult in try executeLocked(request, writer: writer, now: now) }
        }
        return try result.get()
    }

    /// As `execute`, and what the request changed, as the state after it (`StorageChanges`): for a
    /// backend that keeps this one's state somewhere durable (the SQLite plugin). A refused
    /// request changes nothing.
    public func executeRecording(_ request: StorageRequest, writer: SignerKey?, now: UInt64) throws(StorageError) -> (StorageResult, StorageChanges) {
        let result = lock.withLock { () -> Result<(StorageResult, StorageChanges), StorageError> in
            touched = Touched()
            defer { touched = nil }
            return Result { () throws(StorageError) -> (StorageResult, StorageChanges) in
                let r = try executeLocked(request, writer: writer, now: now)
                return (r, changesLocked())
            }
        }
        return try result.get()
    }

    /// Keys, items and domains a request touched.
    private struct Touched {
        var keys: Set<Number640> = []
        var items: Set<Number640> = []
        var domains: Set<Number640> = []
    }

    private func changesLocked() -> StorageChanges {
        var changes = StorageChanges()
        guard let touched else { return changes }
        for key in touched.keys {
            changes.entries[key] = .some(locations[key.location]?.entries[key].map {
                StorageChanges.Entry(stored: $0.stored, expiresAt: $0.expiresAt, writer: $0.writer)
            })
        }
        for item in touched.items {
            changes.entryOwners[item] = .some(locations[item.location]?.entryOwners[Item(item)])
        }
        for domain in touched.domains {
            changes.domainOwners[domain] = .some(locations[domain.location]?.domainOwners[domain.domain])
        }
        return changes
    }

    /// Everything stored, and every owner: what a durable backend writes when it starts anew.
    public func snapshot() -> StorageChanges {
        lock.withLock {
            var out = StorageChanges()
            for (location, loc) in locations {
                for (k, e) in loc.entries { out.entries[k] = StorageChanges.Entry(stored: e.stored, expiresAt: e.expiresAt, writer: e.writer) }
                for (item, owner) in loc.entryOwners { out.entryOwners[Number640(location: location, domain: item.domain, content: item.content)] = owner }
                for (d, owner) in loc.domainOwners { out.domainOwners[Number640(location: location, domain: d)] = owner }
            }
            return out
        }
    }

    /// Replaces everything held by `state` (the entries and owners a durable backend read back),
    /// rebuilding every index and total. No limit is checked: what was stored was admitted then.
    /// Owners of items or domains without an entry are dropped, as removing the last entry drops
    /// them. Entries already expired at `now` are skipped.
    public func restore(_ state: StorageChanges, now: UInt64) {
        lock.withLock {
            locations = [:]
            totalBytes = 0
            totalEntries = 0
            expiries = Heap()
            writerBytes = [:]
            for (key, e) in state.entries {
                guard let e, e.expiresAt == 0 || e.expiresAt > now else { continue }
                var loc = locations.removeValue(forKey: key.location) ?? Location()
                let entry = Entry(stored: e.stored, expiresAt: e.expiresAt, writer: e.writer)
                loc.entries[key] = entry
                if !e.stored.isTombstone { loc.domainCounts[key.domain, default: 0] += 1 }
                loc.items[Item(key), default: VersionIndex()].insert(key.version, basedOn: e.stored.basedOn, prepared: !e.stored.counts,
                                                                     removal: e.stored.isTombstone)
                locations[key.location] = loc
                remember(entry)
                versions.observe(e.stored.stamp)
                totalEntries += 1
                if entry.expiresAt != 0 { expiries.insert(Expiry(at: entry.expiresAt, key: key)) }
            }
            for (item, owner) in state.entryOwners {
                guard let owner, locations[item.location]?.items[Item(item)]?.hasValues == true else { continue }
                locations[item.location]?.entryOwners[Item(item)] = owner
            }
            for (domain, owner) in state.domainOwners {
                guard let owner, locations[domain.location]?.domainCounts[domain.domain] != nil else { continue }
                locations[domain.location]?.domainOwners[domain.domain] = owner
            }
        }
    }

    private func executeLocked(_ request: StorageRequest, writer: SignerKey?, now: UInt64) throws(StorageError) -> StorageResult {
        switch request {
        case .put(let entries, let mode):
            return .statuses(try put(entries, mode: mode, writer: writer, now: now))
        case .get(let query):
            var out: [Number640: StoredValue] = [:]
            var bytes = 0
            let matched = page(resolve(query, now: now, visibleOnly: true, cap: limits.maxResultEntries + 1))
            var resume = matched.resume, last: Number640?
            for key in matched.keys {
                guard let e = locations[key.location]?.entries[key] else { continue }
                bytes += 100 + e.stored.value.count + e.stored.basedOn.count * 20
                if bytes > limits.maxResultBytes, last != nil {
                    resume = last
                    break
                }
                out[key] = answer(e, now: now)
                last = key
            }
            return .values(out, resumeAfter: resume)
        case .digest(let query):
            var out: [Number640: [Number160]] = [:]
            var bytes = 0
            for key in page(resolve(query, now: now, visibleOnly: true, cap: limits.maxResultEntries + 1)).keys {
                guard let e = locations[key.location]?.entries[key] else { continue }
                bytes += 100 + e.stored.basedOn.count * 20
                if bytes > limits.maxResultBytes { break }
                out[key] = e.stored.basedOn
            }
            return .digest(out)
        case .remove(let query, let returnValues):
            var (keys, resume) = page(resolve(query, now: now, visibleOnly: false, cap: limits.maxResultEntries + 1))
            // Only the owners may remove: one refused key refuses the whole request.
            for key in keys {
                guard let loc = locations[key.location] else { continue }
                if let denial = protection.checkDomain(owner: loc.domainOwners[key.domain], writer: writer, key: key)
                    ?? protection.checkEntry(owner: loc.entryOwners[Item(key)], writer: writer, key: key) {
                    throw denial
                }
            }
            if returnValues {
                var bytes = 0
                for (i, key) in keys.enumerated() {
                    bytes += 100 + (locations[key.location]?.entries[key]?.stored.value.count ?? 0)
                    if bytes > limits.maxResultBytes, i > 0 {
                        resume = keys[i - 1]
                        keys = Array(keys[..<i])
                        break
                    }
                }
            }
            var values: [Number640: StoredValue] = [:]
            var statuses: [Number640: StorageStatus] = [:]
            if case .keys(let asked) = query { for k in asked where resume.map({ k <= $0 }) ?? true { statuses[k] = .notFound } }
            for key in keys {
                guard let e = tombstone(key, writer: writer, now: now) else { continue }
                statuses[key] = .ok
                if returnValues { values[key] = answer(e, now: now) }
            }
            return returnValues ? .values(values, resumeAfter: resume) : .statuses(statuses, resumeAfter: resume)
        case .confirm(let keys):
            for key in keys {
                guard let loc = locations[key.location], loc.entries[key] != nil else { continue }
                if let denial = protection.checkDomain(owner: loc.domainOwners[key.domain], writer: writer, key: key)
                    ?? protection.checkEntry(owner: loc.entryOwners[Item(key)], writer: writer, key: key) {
                    throw denial
                }
            }
            var statuses: [Number640: StorageStatus] = [:]
            for key in keys {
                if let e = locations[key.location]?.entries[key], e.present(at: now) {
                    locations[key.location]?.entries[key]?.stored.prepared = false
                    touched?.keys.insert(key)
                    if e.stored.prepared { locations[key.location]?.items[Item(key)]?.confirm(key.version, basedOn: e.stored.basedOn) }
                    statuses[key] = .ok
                } else {
                    statuses[key] = .notFound
                }
            }
            return .statuses(statuses)
        case .putMeta(let keys, let ttl, let signatures):
            return .statuses(try putMeta(keys, ttl: ttl, signatures: signatures, writer: writer, now: now))
        case .transferDomain(let location, let domain, let to):
            let key = Number640(location: location, domain: domain)
            guard let owner = locations[location]?.domainOwners[domain] else {
                throw .denied("domain \(domain) at \(location) is not protected: protect it with a signed put first")
            }
            if let denial = protection.checkDomain(owner: owner, writer: writer, key: key) { throw denial }
            locations[location]?.domainOwners[domain] = to
            touched?.domains.insert(key)
            return .statuses([key: .ok])
        }
    }

    /// A stored value as it goes out: with the whole seconds it has left, rounded up.
    private func answer(_ e: Entry, now: UInt64) -> StoredValue {
        var v = e.stored
        if e.expiresAt != 0 {
            let left = e.expiresAt > now ? e.expiresAt - now : 0
            v.remainingSeconds = UInt32(clamping: max(1, (left + 999_999_999) / 1_000_000_000))
        }
        return v
    }

    static func expiry(_ ttl: UInt32, now: UInt64) -> UInt64 {
        ttl == 0 ? 0 : now &+ UInt64(ttl) * 1_000_000_000
    }

    /// When an entry stored now expires: a stamped value `ttlSeconds` after its stamp, a removal
    /// `tombstoneLifetimeSeconds` after its stamp — the same instant on every replica, however
    /// late a copy arrives (never later than its whole lifetime from now); an unstamped value
    /// `ttlSeconds` from now. Already past: `now` (invisible at once, swept soon).
    private func expiry(of v: StoredValue, now: UInt64) -> UInt64 {
        let life = UInt64(v.isTombstone ? max(1, limits.tombstoneLifetimeSeconds) : v.ttlSeconds)
        guard life > 0 else { return 0 }
        guard v.stamp != 0 else { return now &+ life * 1_000_000_000 }
        let end = VersionStamp.millis(v.stamp) &+ life * 1_000
        let wall = versions.wallMillis
        guard end > wall else { return max(now, 1) }
        return now &+ min(life * 1_000_000_000, (end - wall) * 1_000_000)
    }

    /// Why a key of a put is not stored, when it is not: an older version than the one held
    /// (`superseded`; the same version again is `ok` and changes nothing), or a stamp from
    /// further ahead than this peer's clock accepts. Nil: it is stored.
    private func order(_ v: StoredValue, over old: Entry?, now: UInt64) -> StorageStatus? {
        if versions.isAhead(v.stamp) { return .stampAhead }
        guard let old, old.live(at: now) else { return nil }
        if v.supersedes(old.stored) { return nil }
        return v.isSameVersion(as: old.stored) ? .ok : .superseded
    }

    private func put(_ request: [Number640: StoredValue], mode: PutMode, writer: SignerKey?, now: UInt64) throws(StorageError) -> [Number640: StorageStatus] {
        // An unstamped value is stamped here: newer than anything this peer holds or has seen.
        var entries = request
        for (key, v) in request where v.stamp == 0 && v.signature == nil {
            entries[key]?.stamp = versions.next()
        }
        // Check every bound and every owner before changing anything: a refused request stores nothing.
        var added = 0
        var newEntries = 0
        var newPerLocation: [Number160: Int] = [:]
        var settled: [Number640: StorageStatus] = [:]
        // What the writer would hold: what it adds, less what it replaces of its own.
        var writerTotal = writer.map { writerBytes[$0] ?? 0 } ?? 0
        for (key, v) in entries {
            guard v.value.count <= limits.maxValueBytes else {
                throw .valueTooLarge(bytes: v.value.count, limit: limits.maxValueBytes)
            }
            guard v.basedOn.count <= limits.maxBasedOn else { throw .tooManyBasedOn(count: v.basedOn.count, limit: limits.maxBasedOn) }
            let loc = locations[key.location]
            let old = loc?.entries[key]
            if mode.contains(.ifAbsent), let old, old.present(at: now) { continue }
            // An interceptor's result replaces what is held at a stamp not older than it (the
            // pipeline stamps it so); anything else in the request keeps the order.
            let replacing = mode.contains(.replaceHeld) && !versions.isAhead(v.stamp) && v.stamp >= (old?.stored.stamp ?? 0)
            if !replacing, let status = order(v, over: old, now: now) {
                settled[key] = status
                continue
            }
            if let denial = protection.checkDomain(owner: loc?.domainOwners[key.domain], writer: writer, valueSigner: v.signature?.signer, key: key)
                ?? protection.checkEntry(owner: loc?.entryOwners[Item(key)], writer: writer, valueSigner: v.signature?.signer, key: key) {
                throw denial
            }
            added += Self.footprint(v) - (old.map { Self.footprint($0.stored) } ?? 0)
            writerTotal += Self.footprint(v) - (old.flatMap { $0.writer == writer ? Self.footprint($0.stored) : nil } ?? 0)
            if old == nil { newEntries += 1 }
            // A location's bound counts its values: removals cost bytes and entries overall, but
            // a location emptied by removes takes new values at once.
            if !v.isTombstone, old.map({ $0.stored.isTombstone }) ?? true { newPerLocation[key.location, default: 0] += 1 }
        }
        guard totalBytes + added <= limits.maxTotalBytes else {
            throw .storageFull(bytes: totalBytes + added, limit: limits.maxTotalBytes)
        }
        guard totalEntries + newEntries <= limits.maxEntries else { throw .entryLimit(limit: limits.maxEntries) }
        for (loc, n) in newPerLocation where (locations[loc]?.valueCount ?? 0) + n > limits.maxEntriesPerLocation {
            throw .tooManyEntries(location: loc, limit: limits.maxEntriesPerLocation)
        }
        if let quota = limits.maxBytesPerWriter, let writer, writerTotal > quota {
            throw .quotaExceeded(writer: writer, bytes: writerTotal, limit: quota)
        }
        var statuses = settled
        statuses.reserveCapacity(entries.count)
        // In key order, so one location's entries come together: it is taken out of the map
        // once, changed in place and put back once.
        var heldLocation: Number160?
        var loc = Location()
        for (key, v) in entries.sorted(by: { $0.key < $1.key }) where settled[key] == nil {
            if heldLocation != key.location {
                if let h = heldLocation { locations[h] = loc }
                loc = locations.removeValue(forKey: key.location) ?? Location()
                heldLocation = key.location
            }
            let existing = loc.entries[key]
            if mode.contains(.ifAbsent), let existing, existing.present(at: now) {
                statuses[key] = .failedNotAbsent
                continue
            }
            versions.observe(v.stamp)
            let item = Item(key)
            let fork = v.counts && Self.forks(key, basedOn: v.basedOn, loc: loc, now: now)
            if let existing { forget(existing) } else { totalEntries += 1 }
            touched?.keys.insert(key)
            touched?.items.insert(Number640(location: key.location, domain: key.domain, content: key.content))
            if mode.contains(.protectDomain) { touched?.domains.insert(Number640(location: key.location, domain: key.domain)) }
            let entry = Entry(stored: v, expiresAt: expiry(of: v, now: now), writer: writer)
            remember(entry)
            if existing == nil { loc.sortedCache = nil }
            // A domain counts its values, not its removals: one whose last value is removed
            // becomes unprotected (below), as an entry whose last version is removed does.
            let domainValues = (loc.domainCounts[key.domain] ?? 0) + (v.isTombstone ? 0 : 1) - (existing.map { $0.stored.isTombstone ? 0 : 1 } ?? 0)
            loc.domainCounts[key.domain] = domainValues > 0 ? domainValues : nil
            loc.entries[key] = entry
            if let existing { Self.unindex(key, existing.stored, in: &loc) }
            loc.items[item, default: VersionIndex()].insert(key.version, basedOn: v.basedOn, prepared: !v.counts, removal: v.isTombstone)
            let owner = loc.entryOwners[item]
            var newOwner = protection.entryOwner(after: owner, value: v, key: key)
            if loc.items[item]?.hasValues == false { newOwner = nil }
            if newOwner != owner { loc.entryOwners[item] = newOwner }
            if domainValues <= 0, loc.domainOwners[key.domain] != nil, !mode.contains(.protectDomain) {
                loc.domainOwners[key.domain] = nil
                touched?.domains.insert(Number640(location: key.location, domain: key.domain))
            }
            if mode.contains(.protectDomain) {
                loc.domainOwners[key.domain] = protection.domainOwner(after: loc.domainOwners[key.domain], writer: writer, key: key)
            }
            if entry.expiresAt != 0 { expiries.insert(Expiry(at: entry.expiresAt, key: key)) }
            statuses[key] = fork ? .versionFork : .ok
        }
        if let h = heldLocation { locations[h] = loc }
        return statuses
    }

    private func putMeta(_ keys: [Number640], ttl: UInt32, signatures: [Number640: ValueSignature], writer: SignerKey?,
                         now: UInt64) throws(StorageError) -> [Number640: StorageStatus] {
        // Everything is checked first: a putMeta that fails anywhere changes nothing (no owner moves).
        var updates: [Number640: StoredValue] = [:]
        var statuses: [Number640: StorageStatus] = [:]
        for key in keys {
            guard let loc = locations[key.location], let e = loc.entries[key], e.present(at: now) else {
                statuses[key] = .notFound
                continue
            }
            if let denial = protection.checkDomain(owner: loc.domainOwners[key.domain], writer: writer, key: key)
                ?? protection.checkEntry(owner: loc.entryOwners[Item(key)], writer: writer, key: key) {
                throw denial
            }
            var v = e.stored
            v.ttlSeconds = ttl
            // A stamped value lives its TTL after its stamp: an unsigned one's new TTL, counted
            // from now, becomes one counted from its stamp (a signed one's is signed as such).
            if signatures[key] == nil, v.signature == nil, ttl != 0, v.stamp != 0 {
                let wall = versions.wallMillis, written = VersionStamp.millis(v.stamp)
                v.ttlSeconds = UInt32(clamping: UInt64(ttl) + (wall > written ? (wall - written) / 1_000 : 0))
            }
            if let s = signatures[key] {
                v.signature = s
                guard v.verify(at: key) else { throw .badSignature(key) }
            } else if e.stored.signature != nil, ttl != e.stored.ttlSeconds {
                throw .denied("the value at \(key) is signed: a new TTL needs a new signature over it")
            }
            updates[key] = v
        }
        for (key, v) in updates {
            guard var loc = locations.removeValue(forKey: key.location), var e = loc.entries[key] else { continue }
            forget(e)
            e.stored = v
            e.expiresAt = expiry(of: v, now: now)
            remember(e)
            loc.entries[key] = e
            let item = Item(key)
            // A new signer takes over a protected entry.
            if loc.entryOwners[item] != nil, let signer = v.signature?.signer { loc.entryOwners[item] = signer }
            locations[key.location] = loc
            touched?.keys.insert(key)
            touched?.items.insert(Number640(location: key.location, domain: key.domain, content: key.content))
            if e.expiresAt != 0 { expiries.insert(Expiry(at: e.expiresAt, key: key)) }
            statuses[key] = .ok
        }
        return statuses
    }

    /// Counts an entry into the totals (bytes, its writer's quota).
    private func remember(_ e: Entry) {
        let f = Self.footprint(e.stored)
        totalBytes += f
        if let w = e.writer { writerBytes[w, default: 0] += f }
    }

    /// Takes an entry out of the totals.
    private func forget(_ e: Entry) {
        let f = Self.footprint(e.stored)
        totalBytes -= f
        if let w = e.writer {
            let left = (writerBytes[w] ?? 0) - f
            writerBytes[w] = left > 0 ? left : nil
        }
    }

    /// Visible versions of an item that no other stored version is based on, in order, at most
    /// `cap`: O(heads log heads) from the item's index, never a scan of its versions.
    private func heads(location: Number160, domain: Number160, content: Number160, now: UInt64, cap: Int = .max) -> [Number640] {
        let item = Number640(location: location, domain: domain, content: content)
        guard let loc = locations[location], let index = loc.items[Item(item)] else { return [] }
        var out: [Number640] = []
        for version in index.heads.sorted() {
            let key = Number640(location: location, domain: domain, content: content, version: version)
            guard loc.entries[key]?.visible(at: now) == true else { continue }
            out.append(key)
            if out.count >= cap { break }
        }
        return out
    }

    /// Heads looked at to decide a fork before calling it one (many heads are a fork anyway).
    static let forkCheckHeads = 64

    /// Whether storing `key` based on `basedOn` forks its item: another visible head exists that
    /// it is not based on.
    private static func forks(_ key: Number640, basedOn: [Number160], loc: Location, now: UInt64) -> Bool {
        guard let index = loc.items[Item(key)] else { return false }
        let covered = basedOn.count < 2 ? [] : Set(basedOn)
        func isCovered(_ head: Number160) -> Bool { basedOn.count < 2 ? basedOn.first == head : covered.contains(head) }
        var looked = 0
        for head in index.heads where head != key.version && !isCovered(head) {
            looked += 1
            if looked > forkCheckHeads { return true }
            if loc.entries[Number640(location: key.location, domain: key.domain, content: key.content, version: head)]?.visible(at: now) == true {
                return true
            }
        }
        return false
    }

    /// The first `maxResultEntries` of resolved keys, and the last of them when more were left.
    private func page(_ keys: [Number640]) -> (keys: [Number640], resume: Number640?) {
        guard keys.count > limits.maxResultEntries else { return (keys, nil) }
        let kept = Array(keys.prefix(limits.maxResultEntries))
        return (kept, kept.last)
    }

    /// The keys a query matches, in the order answered, at most `cap` of them. A range stays
    /// within one location (the pipeline refuses others), so it walks at most that location's
    /// sorted keys.
    private func resolve(_ query: StorageQuery, now: UInt64, visibleOnly: Bool, cap: Int) -> [Number640] {
        func ok(_ e: Entry) -> Bool { visibleOnly ? e.visible(at: now) : e.present(at: now) }
        switch query {
        case .keys(let keys):
            return Array(keys.filter { k in locations[k.location]?.entries[k].map(ok) ?? false }.sorted().prefix(cap))
        case .latest(let location, let domain, let content):
            return heads(location: location, domain: domain, content: content, now: now, cap: cap)
        case .range(let from, let to, let limit, let descending):
            guard from <= to, limit > 0, from.location == to.location, locations[from.location] != nil else { return [] }
            let keys = locations[from.location]?.sortedKeys() ?? []
            let lower = Self.firstIndex(in: keys, notBelow: from)
            var upper = Self.firstIndex(in: keys, notBelow: to)
            if upper < keys.count, keys[upper] == to { upper += 1 }
            guard lower < upper else { return [] }
            var out: [Number640] = []
            let span = keys[lower..<upper]
            let ordered: AnySequence<Number640> = descending ? AnySequence(span.reversed()) : AnySequence(span)
            for k in ordered {
                guard let e = locations[k.location]?.entries[k], ok(e) else { continue }
                out.append(k)
                if out.count >= min(limit, cap) { break }
            }
            return out
        }
    }

    private static func firstIndex(in keys: [Number640], notBelow key: Number640) -> Int {
        var lo = 0, hi = keys.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if keys[mid] < key { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// Replaces what a key holds by a removal stamped now (newer than it), kept for the tombstone
    /// lifetime and owned as the entry was; returns what it held.
    private func tombstone(_ key: Number640, writer: SignerKey?, now: UInt64) -> Entry? {
        guard var loc = locations.removeValue(forKey: key.location) else { return nil }
        defer { locations[key.location] = loc }
        guard let old = loc.entries[key] else { return nil }
        let removal = StoredValue.tombstone(stamp: max(versions.next(), old.stored.stamp &+ 1))
        forget(old)
        Self.unindex(key, old.stored, in: &loc)
        let entry = Entry(stored: removal, expiresAt: expiry(of: removal, now: now), writer: writer)
        remember(entry)
        loc.entries[key] = entry
        let item = Item(key)
        loc.items[item, default: VersionIndex()].insert(key.version, basedOn: [], prepared: true, removal: true)
        touched?.keys.insert(key)
        touched?.items.insert(Number640(location: key.location, domain: key.domain, content: key.content))
        touched?.domains.insert(Number640(location: key.location, domain: key.domain))
        // Removing an entry's last value clears its protection, and a domain's last value its
        // domain's; the removal stays to order later writes.
        if loc.items[item]?.hasValues == false { loc.entryOwners[item] = nil }
        if !old.stored.isTombstone {
            let left = (loc.domainCounts[key.domain] ?? 1) - 1
            loc.domainCounts[key.domain] = left > 0 ? left : nil
            if left <= 0 { loc.domainOwners[key.domain] = nil }
        }
        if entry.expiresAt != 0 { expiries.insert(Expiry(at: entry.expiresAt, key: key)) }
        return old
    }

    private func removeEntry(_ key: Number640) -> Entry? {
        guard var loc = locations.removeValue(forKey: key.location) else { return nil }
        defer { if !loc.entries.isEmpty { locations[key.location] = loc } }
        guard let e = loc.entries.removeValue(forKey: key) else { return nil }
        forget(e)
        touched?.keys.insert(key)
        touched?.items.insert(Number640(location: key.location, domain: key.domain, content: key.content))
        touched?.domains.insert(Number640(location: key.location, domain: key.domain))
        totalEntries -= 1
        loc.sortedCache = nil
        let item = Item(key)
        Self.unindex(key, e.stored, in: &loc)
        if loc.items[item]?.isEmpty == true {
            // Removing an entry's last version clears its protection.
            loc.items[item] = nil
            loc.entryOwners[item] = nil
        } else if loc.items[item]?.hasValues == false {
            loc.entryOwners[item] = nil
        }
        guard !e.stored.isTombstone else { return e }
        let left = (loc.domainCounts[key.domain] ?? 1) - 1
        loc.domainCounts[key.domain] = left > 0 ? left : nil
        // A protected domain that becomes empty becomes unprotected.
        if left <= 0 { loc.domainOwners[key.domain] = nil }
        return e
    }

    public func storedLocations() -> [Number160] {
        lock.withLock { Array(locations.keys) }
    }

    /// Confirmed values and removals of one location, not expired, in key order.
    public func versions(at location: Number160, after: Number640?, limit: Int, now: UInt64) -> (versions: [EntryVersion], more: Bool) {
        lock.withLock {
            guard var loc = locations.removeValue(forKey: location) else { return ([], false) }
            defer { locations[location] = loc }
            let keys = loc.sortedKeys()
            var i = after.map { Self.firstIndex(in: keys, notBelow: $0) } ?? 0
            if let after, i < keys.count, keys[i] == after { i += 1 }
            var out: [EntryVersion] = []
            out.reserveCapacity(min(limit, keys.count - i))
            while i < keys.count, out.count < limit {
                if let e = loc.entries[keys[i]], e.live(at: now), !e.stored.prepared {
                    out.append(EntryVersion(key: keys[i], e.stored))
                }
                i += 1
            }
            return (out, i < keys.count)
        }
    }

    public func evict(_ versions: [EntryVersion], now: UInt64) -> Int {
        lock.withLock { evictLocked(versions) }
    }

    /// As `evict`, and what it changed (for a durable backend).
    public func evictRecording(_ versions: [EntryVersion], now: UInt64) -> (Int, StorageChanges) {
        lock.withLock {
            touched = Touched()
            defer { touched = nil }
            let n = evictLocked(versions)
            return (n, changesLocked())
        }
    }

    private func evictLocked(_ versions: [EntryVersion]) -> Int {
        var n = 0
        for v in versions {
            guard let e = locations[v.key.location]?.entries[v.key], e.stored.stamp == v.stamp, e.stored.isTombstone == v.isTombstone,
                  !e.stored.prepared else { continue }
            _ = removeEntry(v.key)
            n += 1
        }
        return n
    }

    /// Confirmed values and removals under `keys`, as stored (no remaining time).
    public func replicaEntries(_ keys: [Number640], now: UInt64) -> [Number640: StoredValue] {
        lock.withLock {
            var out: [Number640: StoredValue] = [:]
            for k in keys {
                guard let e = locations[k.location]?.entries[k], e.live(at: now), !e.stored.prepared else { continue }
                out[k] = e.stored
            }
            return out
        }
    }

    public func sweepExpired(now: UInt64) -> Int {
        lock.withLock {
            var removed = 0
            while removed < limits.maxSweptPerRound, let next = expiries.min, next.at <= now {
                _ = expiries.removeMin()
                // Stale when the entry was removed, overwritten or given a new TTL since.
                guard let e = locations[next.key.location]?.entries[next.key], e.expiresAt == next.at else { continue }
                _ = removeEntry(next.key)
                removed += 1
            }
            // Stale nodes left by overwrites and putMeta: rebuild when they outnumber live ones.
            if expiries.count > 2 * totalEntries + 1_024 {
                var live: [Expiry] = []
                for (_, loc) in locations { for (k, e) in loc.entries where e.expiresAt != 0 { live.append(Expiry(at: e.expiresAt, key: k)) } }
                expiries = Heap(live)
            }
            return removed
        }
    }
}

extension StoredValue {
    /// Whether the version counts in its item's heads: confirmed, and not a removal.
    var counts: Bool { !prepared && !isTombstone }
}
