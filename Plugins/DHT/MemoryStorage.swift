import NIOConcurrencyHelpers
import P2PKernel

/// The default storage backend: values in memory, bounded in value size, total bytes and
/// entries per location, with TTL expiry, versions and two-phase puts.
public final class MemoryStorage: StorageBackend, @unchecked Sendable {
    /// The bounds of one peer's storage.
    public struct Limits: Sendable {
        /// Largest single value (1 MiB): a value is sent whole in one message.
        public var maxValueBytes = 1 << 20
        /// All entries together (256 MiB), each counted whole: its value, its key, the versions
        /// it is based on and the bookkeeping around it (`MemoryStorage.footprint`), so that a
        /// million empty values or megabytes of basedOn keys count as what they cost.
        public var maxTotalBytes = 256 << 20
        /// Most entries under one location (10,000): bounds range queries and one location's cost.
        public var maxEntriesPerLocation = 10_000
        /// Most entries over all locations (500,000).
        public var maxEntries = 500_000
        /// Most versions one value may be based on (64): each is a key kept and compared.
        public var maxBasedOn = 64
        public init() {}
    }

    /// What one entry costs beyond its value and basedOn keys: the 80-byte key twice (dictionary
    /// and sorted list), the entry, the arrays' headers and the dictionaries' slack — about what
    /// a million empty values measured (~450 bytes each).
    public static let entryOverhead = 400

    /// Bytes an entry holding `v` counts against `Limits.maxTotalBytes`.
    public static func footprint(_ v: StoredValue) -> Int {
        entryOverhead + v.value.count + v.basedOn.count * 20
    }

    struct Entry {
        var stored: StoredValue
        /// Uptime nanoseconds at which it expires; 0 never.
        var expiresAt: UInt64

        func visible(at now: UInt64) -> Bool { !stored.prepared && (expiresAt == 0 || expiresAt > now) }
        func live(at now: UInt64) -> Bool { expiresAt == 0 || expiresAt > now }
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

    /// One location's entries, with a sorted key list rebuilt only when a range query needs it,
    /// and each item's versions (fork detection and getLatest look at one item, not the location).
    struct Location {
        var entries: [Number640: Entry] = [:]
        var sortedCache: [Number640]?
        var items: [Item: Set<Number160>] = [:]

        mutating func sortedKeys() -> [Number640] {
            if let s = sortedCache { return s }
            let s = entries.keys.sorted()
            sortedCache = s
            return s
        }
    }

    public let name = "memory"
    public let limits: Limits
    private let lock = NIOLock()
    private var locations: [Number160: Location] = [:]
    private var totalBytes = 0
    private var totalEntries = 0

    public init(limits: Limits = Limits()) {
        self.limits = limits
    }

    /// Bytes held by all entries, each counted whole (`footprint`).
    public var bytesStored: Int { lock.withLock { totalBytes } }
    /// Entries held, including prepared and not yet swept expired ones.
    public var entryCount: Int { lock.withLock { totalEntries } }

    public func execute(_ request: StorageRequest, now: UInt64) throws(StorageError) -> StorageResult {
        let result = lock.withLock { () -> Result<StorageResult, StorageError> in
            Result { () throws(StorageError) -> StorageResult in try executeLocked(request, now: now) }
        }
        return try result.get()
    }

    private func executeLocked(_ request: StorageRequest, now: UInt64) throws(StorageError) -> StorageResult {
        switch request {
        case .put(let entries, let mode):
            return .statuses(try put(entries, mode: mode, now: now))
        case .get(let query):
            var out: [Number640: StoredValue] = [:]
            for key in resolve(query, now: now, visibleOnly: true) {
                if let e = locations[key.location]?.entries[key] { out[key] = e.stored }
            }
            return .values(out)
        case .digest(let query):
            var out: [Number640: [Number160]] = [:]
            for key in resolve(query, now: now, visibleOnly: true) {
                if let e = locations[key.location]?.entries[key] { out[key] = e.stored.basedOn }
            }
            return .digest(out)
        case .remove(let query, let returnValues):
            let keys = resolve(query, now: now, visibleOnly: false)
            var values: [Number640: StoredValue] = [:]
            var statuses: [Number640: StorageStatus] = [:]
            if case .keys(let asked) = query { for k in asked { statuses[k] = .notFound } }
            for key in keys {
                guard let e = removeEntry(key) else { continue }
                statuses[key] = .ok
                if returnValues { values[key] = e.stored }
            }
            return returnValues ? .values(values) : .statuses(statuses)
        case .confirm(let keys):
            var statuses: [Number640: StorageStatus] = [:]
            for key in keys {
                if let e = locations[key.location]?.entries[key], e.live(at: now) {
                    locations[key.location]?.entries[key]?.stored.prepared = false
                    statuses[key] = .ok
                } else {
                    statuses[key] = .notFound
                }
            }
            return .statuses(statuses)
        case .putMeta(let keys, let ttl):
            var statuses: [Number640: StorageStatus] = [:]
            for key in keys {
                if let e = locations[key.location]?.entries[key], e.live(at: now) {
                    locations[key.location]?.entries[key]?.stored.ttlSeconds = ttl
                    locations[key.location]?.entries[key]?.expiresAt = Self.expiry(ttl, now: now)
                    statuses[key] = .ok
                } else {
                    statuses[key] = .notFound
                }
            }
            return .statuses(statuses)
        }
    }

    static func expiry(_ ttl: UInt32, now: UInt64) -> UInt64 {
        ttl == 0 ? 0 : now &+ UInt64(ttl) * 1_000_000_000
    }

    private func put(_ entries: [Number640: StoredValue], mode: PutMode, now: UInt64) throws(StorageError) -> [Number640: StorageStatus] {
        // Check every bound before changing anything: a refused request stores nothing.
        var added = 0
        var newEntries = 0
        var newPerLocation: [Number160: Int] = [:]
        for (key, v) in entries {
            guard v.value.count <= limits.maxValueBytes else {
                throw .valueTooLarge(bytes: v.value.count, limit: limits.maxValueBytes)
            }
            guard v.basedOn.count <= limits.maxBasedOn else { throw .tooManyBasedOn(count: v.basedOn.count, limit: limits.maxBasedOn) }
            let old = locations[key.location]?.entries[key]
            added += Self.footprint(v) - (old.map { Self.footprint($0.stored) } ?? 0)
            if old == nil {
                newPerLocation[key.location, default: 0] += 1
                newEntries += 1
            }
        }
        guard totalBytes + added <= limits.maxTotalBytes else {
            throw .storageFull(bytes: totalBytes + added, limit: limits.maxTotalBytes)
        }
        guard totalEntries + newEntries <= limits.maxEntries else { throw .entryLimit(limit: limits.maxEntries) }
        for (loc, n) in newPerLocation where (locations[loc]?.entries.count ?? 0) + n > limits.maxEntriesPerLocation {
            throw .tooManyEntries(location: loc, limit: limits.maxEntriesPerLocation)
        }
        var statuses: [Number640: StorageStatus] = [:]
        // Each item's heads, found once per put and carried along as its versions are stored: a
        // put of many versions costs O(n + versions × basedOn), not a scan per version.
        var headsOf: [Number160: [Item: Set<Number160>]] = [:]
        for (key, v) in entries.sorted(by: { $0.key < $1.key }) {
            let existing = locations[key.location]?.entries[key]
            if mode == .ifAbsent, let existing, existing.live(at: now) {
                statuses[key] = .failedNotAbsent
                continue
            }
            let item = Item(key)
            var heads = headsOf[key.location]?[item]
                ?? Set(self.heads(location: key.location, domain: key.domain, content: key.content, now: now).map(\.version))
            // It forks when another head exists that it is not based on.
            let others = heads.count - (heads.contains(key.version) ? 1 : 0)
            let covered = Set(v.basedOn).count { $0 != key.version && heads.contains($0) }
            let fork = others > covered
            if existing != nil {
                // An overwrite may change what the old version was based on: look again next time.
                headsOf[key.location]?[item] = nil
            } else if !v.prepared {
                heads.insert(key.version)
                heads.subtract(v.basedOn)
                headsOf[key.location, default: [:]][item] = heads
            }
            totalBytes += Self.footprint(v) - (existing.map { Self.footprint($0.stored) } ?? 0)
            if existing == nil {
                totalEntries += 1
                locations[key.location, default: Location()].sortedCache = nil
            }
            locations[key.location, default: Location()].entries[key] = Entry(stored: v, expiresAt: Self.expiry(v.ttlSeconds, now: now))
            locations[key.location, default: Location()].items[item, default: []].insert(key.version)
            statuses[key] = fork ? .versionFork : .ok
        }
        return statuses
    }

    /// Visible versions of an item that no other visible version is based on: O(versions of the
    /// item × basedOn), never a scan of the location.
    private func heads(location: Number160, domain: Number160, content: Number160, now: UInt64) -> [Number640] {
        guard let loc = locations[location], let versions = loc.items[Item(Number640(location: location, domain: domain, content: content))] else { return [] }
        var visible: [Number640] = []
        var referenced = Set<Number160>()
        for version in versions {
            let key = Number640(location: location, domain: domain, content: content, version: version)
            guard let e = loc.entries[key], e.visible(at: now) else { continue }
            visible.append(key)
            referenced.formUnion(e.stored.basedOn)
        }
        return visible.filter { !referenced.contains($0.version) }.sorted()
    }

    private func resolve(_ query: StorageQuery, now: UInt64, visibleOnly: Bool) -> [Number640] {
        func ok(_ e: Entry) -> Bool { visibleOnly ? e.visible(at: now) : e.live(at: now) }
        switch query {
        case .keys(let keys):
            return keys.filter { k in locations[k.location]?.entries[k].map(ok) ?? false }
        case .latest(let location, let domain, let content):
            return heads(location: location, domain: domain, content: content, now: now)
        case .range(let from, let to, let limit, let descending):
            guard from <= to, limit > 0 else { return [] }
            var out: [Number640] = []
            let locs = from.location == to.location ? [from.location]
                : locations.keys.filter { $0 >= from.location && $0 <= to.location }.sorted()
            for loc in descending ? locs.reversed() : locs {
                guard locations[loc] != nil else { continue }
                let keys = locations[loc]?.sortedKeys() ?? []
                let inRange = keys.lazy.filter { $0 >= from && $0 <= to }
                for k in descending ? Array(inRange.reversed()) : Array(inRange) {
                    guard let e = locations[loc]?.entries[k], ok(e) else { continue }
                    out.append(k)
                    if out.count >= limit { return out }
                }
            }
            return out
        }
    }

    private func removeEntry(_ key: Number640) -> Entry? {
        guard let e = locations[key.location]?.entries.removeValue(forKey: key) else { return nil }
        totalBytes -= Self.footprint(e.stored)
        totalEntries -= 1
        let item = Item(key)
        locations[key.location]?.items[item]?.remove(key.version)
        if locations[key.location]?.items[item]?.isEmpty == true { locations[key.location]?.items[item] = nil }
        if locations[key.location]?.entries.isEmpty == true {
            locations[key.location] = nil
        } else {
            locations[key.location]?.sortedCache = nil
        }
        return e
    }

    public func sweepExpired(now: UInt64) -> Int {
        lock.withLock {
            var expired: [Number640] = []
            for (_, loc) in locations {
                for (k, e) in loc.entries where e.expiresAt != 0 && e.expiresAt <= now { expired.append(k) }
            }
            for k in expired { _ = removeEntry(k) }
            return expired.count
        }
    }
}
