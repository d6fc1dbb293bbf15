import Crypto
import NIOConcurrencyHelpers
import P2PKernel

/// A value as stored, with its metadata.
public struct StoredValue: Sendable, Hashable {
    /// The bytes.
    public var value: [UInt8]
    /// Seconds the value lives after it is stored (its TTL as written, and signed); 0 keeps it
    /// until removed.
    public var ttlSeconds: UInt32
    /// The versions (version keys of the same location, domain and content) this one is based on.
    public var basedOn: [Number160]
    /// A prepared value (first phase of a two-phase put) is invisible to gets until confirmed.
    public var prepared: Bool
    /// Asks for entry protection: the value's signer becomes the owner of its entry (location,
    /// domain, content: every version), and only the owner may write or remove it afterwards.
    /// Needs a signature.
    public var protectEntry: Bool
    /// The owner's Ed25519 signature over key, bytes, TTL, basedOn and `protectEntry`, with the
    /// owner's public key; it travels with the value, so any peer can check it (`verify(at:)`).
    public var signature: ValueSignature?
    /// Set in answers only, by the peer that answered: whole seconds the value has left there,
    /// rounded up (a value with 0.3 s left says 1, never 0), nil when it never expires.
    public var remainingSeconds: UInt32?
    /// When this version of the key was written: a hybrid logical clock reading
    /// (`VersionStamp`: Unix milliseconds and a counter), set by the writer and signed with the
    /// value. Every replica keeps, for one key, the entry with the greatest stamp (`supersedes`):
    /// a newer one replaces an older one, an older one is refused, whichever path it comes by.
    /// 0: not stamped yet — the storage that takes it stamps it with its own clock (newest).
    /// A stamped value lives `ttlSeconds` after its stamp, on every replica alike.
    public var stamp: UInt64
    /// A removal: the key holds nothing since `stamp`. Kept (and replicated) for the storage's
    /// tombstone lifetime so that no older copy comes back; never served to gets.
    public var isTombstone: Bool

    public init(_ value: [UInt8], ttlSeconds: UInt32 = 0, basedOn: [Number160] = [], prepared: Bool = false,
                protectEntry: Bool = false, signature: ValueSignature? = nil, stamp: UInt64 = 0) {
        self.value = value
        self.ttlSeconds = ttlSeconds
        self.basedOn = basedOn
        self.prepared = prepared
        self.protectEntry = protectEntry
        self.signature = signature
        self.remainingSeconds = nil
        self.stamp = stamp
        self.isTombstone = false
    }

    /// A removal marker written at `stamp`. Sign it (`signed(at:by:)`) to remove a protected entry
    /// on replicas that learn of it by replication.
    public static func tombstone(stamp: UInt64) -> StoredValue {
        var v = StoredValue([], stamp: stamp)
        v.isTombstone = true
        return v
    }

    /// Whether this entry replaces `other` under the same key: a greater stamp wins; at equal
    /// stamps a removal wins over a value, and between two values the greater `versionDigest`
    /// (then the greater bytes) does, so that every replica — and anti-entropy, which compares
    /// digests, not bytes — picks the same one without asking anyone.
    public func supersedes(_ other: StoredValue) -> Bool {
        if stamp != other.stamp { return stamp > other.stamp }
        if isTombstone != other.isTombstone { return isTombstone }
        guard value != other.value else { return false }
        let (mine, theirs) = (versionDigest, other.versionDigest)
        if mine != theirs { return mine > theirs }
        return other.value.lexicographicallyPrecedes(value)
    }

    /// The first 8 bytes of SHA-256 of the bytes (0 for a removal): what tells two values of one
    /// stamp apart where only versions are compared.
    public var versionDigest: UInt64 {
        guard !isTombstone else { return 0 }
        return SHA256.hash(data: value).prefix(8).reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// Whether this is the same version of the key as `other` (same stamp, kind and bytes): storing
    /// it again changes nothing.
    public func isSameVersion(as other: StoredValue) -> Bool {
        stamp == other.stamp && isTombstone == other.isTombstone && value == other.value
    }
}

/// Version stamps: a hybrid logical clock's readings, Unix milliseconds in the high 48 bits and a
/// counter in the low 16, so stamps follow wall time and still grow when many writes share a
/// millisecond or a writer's clock is behind a stamp it has seen.
public enum VersionStamp {
    /// The stamp of `millis` with counter 0.
    public static func at(millis: UInt64) -> UInt64 { millis << 16 }
    /// The Unix milliseconds of a stamp.
    public static func millis(_ stamp: UInt64) -> UInt64 { stamp >> 16 }
}

/// A node's version clock (a hybrid logical clock): `next()` is greater than every stamp it
/// issued or observed, and follows wall time. Storage observes every stamp it stores, so a write
/// stamped here after a read is newer than what was read.
public final class VersionClock: Sendable {
    private let wall: @Sendable () -> UInt64
    private let last = NIOLockedValueBox<UInt64>(0)
    /// How far ahead of this clock a stamp may be and still be taken (60 s): a writer whose clock
    /// runs further ahead, or a peer that claims a stamp from the future to pin a key, is refused.
    public let maxAheadMillis: UInt64

    /// A clock reading `wallMillis` (Unix milliseconds; the machine's clock by default).
    public init(maxAheadMillis: UInt64 = 60_000, wallMillis: @escaping @Sendable () -> UInt64 = { WriterProof.nowMillis() }) {
        self.wall = wallMillis
        self.maxAheadMillis = maxAheadMillis
    }

    /// A clock reading a node's clock (virtual on the simulated network).
    public convenience init(clock: NodeClock) {
        self.init(wallMillis: { clock.unixMilliseconds })
    }

    /// Unix milliseconds now.
    public var wallMillis: UInt64 { wall() }

    /// A new stamp, greater than any issued or observed.
    public func next() -> UInt64 {
        let physical = VersionStamp.at(millis: wall())
        return last.withLockedValue { l in
            l = max(physical, l &+ 1)
            return l
        }
    }

    /// Notes a stamp seen (stored or read), so later stamps exceed it; stamps from too far ahead
    /// are not taken (they are refused where they are stored).
    public func observe(_ stamp: UInt64) {
        guard !isAhead(stamp) else { return }
        last.withLockedValue { $0 = max($0, stamp) }
    }

    /// Whether a stamp lies more than `maxAheadMillis` ahead of this clock.
    public func isAhead(_ stamp: UInt64) -> Bool {
        VersionStamp.millis(stamp) > wall() &+ maxAheadMillis
    }
}

/// Which stored entries a request is about.
public enum StorageQuery: Sendable, Hashable {
    /// Exactly these keys.
    case keys([Number640])
    /// Every key from `from` to `to` inclusive, at most `limit`, ascending or descending.
    case range(from: Number640, to: Number640, limit: Int, descending: Bool)
    /// The current heads of one item: its versions that no other version is based on.
    case latest(location: Number160, domain: Number160, content: Number160)

    /// Everything under one location and domain.
    public static func all(location: Number160, domain: Number160 = .zero, limit: Int = .max) -> StorageQuery {
        .range(from: Number640(location: location, domain: domain),
               to: Number640(location: location, domain: domain, content: .max, version: .max), limit: limit, descending: false)
    }

    /// What is left of this query after an answer cut at `key` (an answer's `resumeAfter`): the
    /// keys after it, or the range beyond it; nil when nothing is left.
    public func resuming(after key: Number640) -> StorageQuery? {
        switch self {
        case .keys(let keys):
            let rest = keys.filter { $0 > key }
            return rest.isEmpty ? nil : .keys(rest)
        case .range(let from, let to, let limit, let descending):
            if descending {
                guard let before = key.predecessor, before >= from else { return nil }
                return .range(from: from, to: before, limit: limit, descending: true)
            }
            guard let after = key.successor, after <= to else { return nil }
            return .range(from: after, to: to, limit: limit, descending: false)
        case .latest:
            return nil
        }
    }
}

extension Number640 {
    /// The next key in order; nil after `.max`.
    public var successor: Number640? { step(up: true) }
    /// The previous key in order; nil before `.zero`.
    public var predecessor: Number640? { step(up: false) }

    private func step(up: Bool) -> Number640? {
        var bytes = location.bytes + domain.bytes + content.bytes + version.bytes
        var i = bytes.count - 1
        while i >= 0 {
            if up {
                if bytes[i] == 0xFF { bytes[i] = 0 } else { bytes[i] += 1; break }
            } else {
                if bytes[i] == 0 { bytes[i] = 0xFF } else { bytes[i] -= 1; break }
            }
            i -= 1
        }
        guard i >= 0, let l = Number160(bytes: bytes[0..<20]), let d = Number160(bytes: bytes[20..<40]),
              let c = Number160(bytes: bytes[40..<60]), let v = Number160(bytes: bytes[60..<80]) else { return nil }
        return Number640(location: l, domain: d, content: c, version: v)
    }
}

/// How a put treats a key that already holds a value, and what else it asks for.
public struct PutMode: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// Replace what the key holds (the default).
    public static let overwrite: PutMode = []
    /// Refuse with `failedNotAbsent` when the key exists.
    public static let ifAbsent = PutMode(rawValue: 1)
    /// Claim the domain (location, domain) for the request's writer: afterwards only the writer
    /// may write or remove anything in it. Needs a signed request (`WriterProof`).
    public static let protectDomain = PutMode(rawValue: 2)
    /// The values replace what the keys hold whatever their stamps: what an interceptor computed
    /// from the value held (a count, a merge) is this peer's state of the key. Set by the
    /// pipeline for a put whose values an interceptor changed; never sent over the wire.
    public static let replaceHeld = PutMode(rawValue: 4)
}

/// A request to storage: what the DHT sends to the responsible peers, and what interceptors see.
public enum StorageRequest: Sendable, Hashable {
    case put([Number640: StoredValue], mode: PutMode)
    case get(StorageQuery)
    case remove(StorageQuery, returnValues: Bool)
    /// Keys and their basedOn sets instead of values.
    case digest(StorageQuery)
    /// Second phase of a two-phase put: makes prepared values visible.
    case confirm([Number640])
    /// Changes the TTL of stored values without sending them again. A signed value needs a new
    /// signature over the new TTL (`signatures`); a signature by another key hands a protected
    /// entry to that key.
    case putMeta([Number640], ttlSeconds: UInt32, signatures: [Number640: ValueSignature] = [:])
    /// Hands a protected domain to another key (only its owner may).
    case transferDomain(location: Number160, domain: Number160, to: SignerKey)

    /// The domains the request touches; nil when it may touch any (a range across domains).
    public var domains: Set<Number160>? {
        switch self {
        case .put(let entries, _): return Set(entries.keys.map(\.domain))
        case .get(let q), .remove(let q, _), .digest(let q): return q.domains
        case .confirm(let keys), .putMeta(let keys, _, _): return Set(keys.map(\.domain))
        case .transferDomain(_, let domain, _): return [domain]
        }
    }

    /// How many entries the request names itself (a range names none: the answering peer
    /// bounds what it covers).
    public var namedEntries: Int {
        switch self {
        case .put(let entries, _): entries.count
        case .get(.keys(let k)), .remove(.keys(let k), _), .digest(.keys(let k)), .confirm(let k), .putMeta(let k, _, _): k.count
        case .get, .remove, .digest, .transferDomain: 0
        }
    }

    /// Whether the request changes stored data.
    public var isWrite: Bool {
        switch self {
        case .get, .digest: false
        default: true
        }
    }
}

extension StorageQuery {
    var domains: Set<Number160>? {
        switch self {
        case .keys(let keys): return Set(keys.map(\.domain))
        case .range(let from, let to, _, _):
            return from.location == to.location && from.domain == to.domain ? [from.domain] : nil
        case .latest(_, let domain, _): return [domain]
        }
    }
}

/// The outcome for one key.
public enum StorageStatus: UInt8, Sendable, Hashable, CustomStringConvertible {
    case ok = 0
    /// `putIfAbsent` found a value already there.
    case failedNotAbsent = 1
    /// The put's basedOn set does not cover the current heads: there are now several.
    case versionFork = 2
    case notFound = 3
    case denied = 4
    case failed = 5
    /// The key holds a newer version (a greater stamp, or a removal of it): the write changed
    /// nothing there.
    case superseded = 6
    /// The write's stamp lies further ahead of this peer's clock than it accepts.
    case stampAhead = 7

    public var description: String {
        switch self {
        case .ok: "ok"
        case .failedNotAbsent: "failed-not-absent"
        case .versionFork: "version-fork"
        case .notFound: "not-found"
        case .denied: "denied"
        case .failed: "failed"
        case .superseded: "superseded"
        case .stampAhead: "stamp-ahead"
        }
    }
}

/// What storage answers.
public enum StorageResult: Sendable, Hashable {
    /// Per key (puts, confirms, putMeta, removes without values). A remove cut at the peer's
    /// bound of entries per answer says where to resume (`resumeAfter`), as values do.
    case statuses([Number640: StorageStatus], resumeAfter: Number640? = nil)
    /// Stored values (gets, removes with values). When the answer was cut at the peer's bound of
    /// bytes or entries, `resumeAfter` is the last key it holds: ask again for the rest
    /// (`StorageQuery.resuming(after:)`).
    case values([Number640: StoredValue], resumeAfter: Number640? = nil)
    /// Keys and their basedOn sets (digests).
    case digest([Number640: [Number160]])
}

/// Why storage refused a whole request.
public enum StorageError: Error, Equatable, Sendable, CustomStringConvertible {
    case valueTooLarge(bytes: Int, limit: Int)
    case storageFull(bytes: Int, limit: Int)
    case tooManyEntries(location: Number160, limit: Int)
    /// The peer holds its limit of entries over all locations.
    case entryLimit(limit: Int)
    /// A value based on more versions than the peer accepts.
    case tooManyBasedOn(count: Int, limit: Int)
    /// A request naming more entries than a peer serves in one request (split it).
    case requestTooLarge(entries: Int, limit: Int)
    case unknownDomain(Number160)
    case denied(String)
    /// A write to a protected entry or domain by someone other than its owner: names the owner.
    case protected(key: Number640, owner: SignerKey, domain: Bool)
    /// A value's signature does not verify over what it claims to sign.
    case badSignature(Number640)
    /// The request's writer proof is forged, too old, from the future, or seen before.
    case badWriterProof(String)
    /// The writer holds its quota of bytes on this peer.
    case quotaExceeded(writer: SignerKey, bytes: Int, limit: Int)
    case malformed(String)
    /// No storage backend is installed on this node.
    case noBackend
    /// Too many requests are waiting; try again later.
    case busy(String)
    /// The backend could not carry out or keep the request (a disk full, a database that failed):
    /// nothing of it was kept.
    case backendFailed(String)

    public var description: String {
        switch self {
        case .valueTooLarge(let b, let l): "value of \(b) bytes exceeds the \(l)-byte limit"
        case .storageFull(let b, let l): "storing would take \(b) bytes, over the \(l)-byte limit of this peer"
        case .tooManyEntries(let loc, let l): "location \(loc) already holds the limit of \(l) entries"
        case .entryLimit(let l): "this peer already holds its limit of \(l) entries"
        case .tooManyBasedOn(let n, let l): "a value based on \(n) versions, over the limit of \(l)"
        case .requestTooLarge(let n, let l): "a request of \(n) entries, over the limit of \(l) per request (split it)"
        case .unknownDomain(let d): "domain \(d) is not served by this peer"
        case .denied(let r): "denied: \(r)"
        case .protected(let k, let o, let d): "denied: \(d ? "domain \(k.domain) at \(k.location)" : "entry \(k)") is protected by owner \(o.id)"
        case .badSignature(let k): "the signature of the value at \(k) does not verify"
        case .badWriterProof(let r): "bad writer proof: \(r)"
        case .quotaExceeded(let w, let b, let l): "writer \(w.id) would hold \(b) bytes, over its quota of \(l)"
        case .malformed(let r): "malformed storage request: \(r)"
        case .noBackend: "this peer has no storage backend"
        case .busy(let r): "busy: \(r)"
        case .backendFailed(let r): "storage failed: \(r)"
        }
    }
}

/// A storage backend: where values live on one peer. Synchronous on purpose: it is called on the
/// event loop for every storage request without interceptors, so it must be fast and must not
/// block; do slow work in an interceptor instead.
public protocol StorageBackend: Sendable {
    /// Shown by tools and in errors.
    var name: String { get }
    /// Carries out one request for `writer` (the verified key of the request's writer proof, nil
    /// for an unsigned request), applying the node's protection rules. Value signatures were
    /// verified before the call. `now` is the uptime clock in nanoseconds (for TTLs).
    func execute(_ request: StorageRequest, writer: SignerKey?, now: UInt64) throws(StorageError) -> StorageResult
    /// Removes expired values; returns how many. Costs what expired, not what is stored.
    func sweepExpired(now: UInt64) -> Int
    /// When the earliest value held may expire (uptime nanoseconds; it may have been removed or
    /// renewed since), nil when nothing held expires: the pipeline sweeps then and sleeps while
    /// nothing expires. A backend that does not track it keeps the default, 0: swept every interval.
    var nextExpiry: UInt64? { get }
    /// Every location holding at least one entry (for replication, which walks what is stored).
    func storedLocations() -> [Number160]
    /// Whether writes become durable after `execute` returns (a backend that commits to disk):
    /// the pipeline then acknowledges a write only once `whenDurable` reports it so.
    var defersDurability: Bool { get }
    /// A mark of the writes carried out so far: taken before a write, handed to `whenDurable`.
    func durabilityMark() -> UInt64
    /// Calls `done` once every write carried out after `mark` and before this call is durable
    /// (with nil), or with the error when any of them could not be kept (those were undone).
    /// Called at once by a backend whose writes are done when `execute` returns.
    func whenDurable(since mark: UInt64, _ done: @escaping @Sendable (StorageError?) -> Void)
    /// What the backend holds now, for metrics and the status page; nil when it cannot tell.
    var usage: StorageUsage? { get }
    /// Hands the backend its node's version clock (called when the node's storage pipeline is
    /// made): it stamps unstamped writes, observes stored stamps and reads wall time from it.
    func use(versions: VersionClock)
    /// The entries under one location, removals included, in key order after `after`, at most
    /// `limit`: what anti-entropy compares. `more` when the location holds more.
    func versions(at location: Number160, after: Number640?, limit: Int, now: UInt64) -> (versions: [EntryVersion], more: Bool)
    /// The entries under `keys` as replication sends them, removals included (no remaining time).
    func replicaEntries(_ keys: [Number640], now: UInt64) -> [Number640: StoredValue]
    /// Forgets the entries that still hold exactly these versions — a copy this peer handed to
    /// the replica set it is not part of — without a removal and without events: the data lives
    /// on in the set. Returns how many were forgotten.
    func evict(_ versions: [EntryVersion], now: UInt64) -> Int
}

/// One entry as anti-entropy compares it: its key, its version stamp, whether it is a removal,
/// and its bytes' `versionDigest`.
public struct EntryVersion: Sendable, Hashable {
    public var key: Number640
    public var stamp: UInt64
    public var isTombstone: Bool
    public var digest: UInt64
    public init(key: Number640, stamp: UInt64, isTombstone: Bool, digest: UInt64) {
        self.key = key
        self.stamp = stamp
        self.isTombstone = isTombstone
        self.digest = digest
    }

    public init(key: Number640, _ v: StoredValue) {
        self.init(key: key, stamp: v.stamp, isTombstone: v.isTombstone, digest: v.versionDigest)
    }

    /// Whether the version this describes replaces `other` (`StoredValue.supersedes`, up to the
    /// bytes: equal digests count as the same version).
    public func supersedes(_ other: EntryVersion) -> Bool {
        if stamp != other.stamp { return stamp > other.stamp }
        if isTombstone != other.isTombstone { return isTombstone }
        return digest > other.digest
    }
}

/// What a storage backend holds.
public struct StorageUsage: Sendable, Equatable {
    /// Entries, counting every version.
    public var entries: Int
    /// Bytes of stored values and their metadata, as the backend's limits count them.
    public var bytes: Int
    public init(entries: Int, bytes: Int) {
        self.entries = entries
        self.bytes = bytes
    }
}

extension StorageBackend {
    /// A backend that cannot list its locations is not replicated.
    public func storedLocations() -> [Number160] { [] }

    /// Unknown: swept every interval.
    public var nextExpiry: UInt64? { 0 }

    /// Writes are done when `execute` returns.
    public var defersDurability: Bool { false }
    public func durabilityMark() -> UInt64 { 0 }
    public func whenDurable(since mark: UInt64, _ done: @escaping @Sendable (StorageError?) -> Void) { done(nil) }
    public var usage: StorageUsage? { nil }
    public func use(versions: VersionClock) {}
    /// A backend that cannot forget keeps its copies.
    public func evict(_ versions: [EntryVersion], now: UInt64) -> Int { 0 }

    /// From the visible values (a backend that keeps no removals).
    public func versions(at location: Number160, after: Number640?, limit: Int, now: UInt64) -> (versions: [EntryVersion], more: Bool) {
        let from = after?.successor ?? Number640(location: location)
        let to = Number640(location: location, domain: .max, content: .max, version: .max)
        guard from.location == location,
              case .values(let v, let resume)? = try? execute(.get(.range(from: from, to: to, limit: limit, descending: false)), now: now) else {
            return ([], false)
        }
        return (v.sorted { $0.key < $1.key }.map { EntryVersion(key: $0.key, $0.value) }, resume != nil)
    }

    /// From a get (a backend that keeps no removals).
    public func replicaEntries(_ keys: [Number640], now: UInt64) -> [Number640: StoredValue] {
        guard case .values(let v, _)? = try? execute(.get(.keys(keys)), now: now) else { return [:] }
        return v.mapValues { var x = $0; x.remainingSeconds = nil; return x }
    }

    /// An unsigned request (no writer).
    public func execute(_ request: StorageRequest, now: UInt64) throws(StorageError) -> StorageResult {
        try execute(request, writer: nil, now: now)
    }
}

/// What a write changed, as the state after it: per key the entry now stored (nil: none any
/// more), per item (location, domain, content; version zero) and per domain (location, domain)
/// the owner now (nil: none). What `MemoryStorage.executeRecording` reports and `restore` reads.
public struct StorageChanges: Sendable {
    public struct Entry: Sendable, Hashable {
        public var stored: StoredValue
        /// Uptime nanoseconds at which it expires; 0 never.
        public var expiresAt: UInt64
        /// The request's proven writer (for the per-writer quota).
        public var writer: SignerKey?
        public init(stored: StoredValue, expiresAt: UInt64, writer: SignerKey?) {
            self.stored = stored
            self.expiresAt = expiresAt
            self.writer = writer
        }
    }
    public var entries: [Number640: Entry?] = [:]
    public var entryOwners: [Number640: SignerKey?] = [:]
    public var domainOwners: [Number640: SignerKey?] = [:]
    public init() {}
    public var isEmpty: Bool { entries.isEmpty && entryOwners.isEmpty && domainOwners.isEmpty }
}

/// Which requests an interceptor sees.
public enum InterceptorScope: Sendable, Hashable {
    /// Every storage request.
    case all
    /// Requests touching this domain.
    case domain(Number160)

}

/// What an interceptor may use.
public struct StorageContext: Sendable {
    /// The peer that sent the request; nil when it comes from this node itself.
    public let sender: PeerAddress?
    /// The request's writer, proven by its signature; nil for an unsigned request.
    public let writer: SignerKey?
    public let node: Node
    /// The backend, for reads an interceptor needs (e.g. the current value to add to).
    public let backend: any StorageBackend
    /// The values of the put as the writer sent them (nil for other requests): a value an
    /// interceptor changes is stamped by this peer when stored.
    var originalPuts: [Number640: StoredValue]?

    public init(sender: PeerAddress?, writer: SignerKey?, node: Node, backend: any StorageBackend) {
        self.sender = sender
        self.writer = writer
        self.node = node
        self.backend = backend
    }

    /// The node's uptime clock in nanoseconds, what the backend's TTLs use (virtual on the
    /// simulated network): pass it to `backend.execute(_:now:)`.
    public var now: UInt64 { node.clock.uptimeNanoseconds }
}

/// The rest of the chain after an interceptor.
public typealias StorageNext = @Sendable (StorageRequest) async throws -> StorageResult

/// Middleware around storage, scoped to a domain or to all. Interceptors of one node run one
/// chain at a time, so a read-modify-write interceptor is atomic.
///
/// ```swift
/// struct Uppercase: StorageInterceptor {
///     let scope = InterceptorScope.domain(Number160(hashing: "shout"))
///     func intercept(_ request: StorageRequest, context: StorageContext, next: StorageNext) async throws -> StorageResult {
///         guard case .put(let entries, let mode) = request else { return try await next(request) }
///         return try await next(.put(entries.mapValues { var v = $0; v.value = Array(String(decoding: v.value, as: UTF8.self).uppercased().utf8); return v }, mode: mode))
///     }
/// }
/// ```
public protocol StorageInterceptor: Sendable {
    var scope: InterceptorScope { get }
    func intercept(_ request: StorageRequest, context: StorageContext, next: StorageNext) async throws -> StorageResult
}
