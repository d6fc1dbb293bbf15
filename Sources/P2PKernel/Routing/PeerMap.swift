import NIOConcurrencyHelpers
import NIOCore

/// The routing table: 160 buckets by XOR distance from our own id, each with up to k verified
/// peers (they answered us or contacted us) and a few overflow peers (others mentioned them).
///
/// A lock-protected class rather than an actor: it is read on every message, from the event loop,
/// and an actor hop per message costs more than the work itself.
public final class PeerMap: @unchecked Sendable {
    struct Entry {
        var address: PeerAddress
        /// Uptime clock (nanoseconds) when we last heard from the peer first-hand.
        var lastSeen: UInt64
        var failures: UInt8
        /// How many maintenance checks it has passed since it joined; picks the next interval.
        var checks: UInt8
    }

    /// One bucket. Its methods mutate in place (`buckets.modify(b) { $0.found(…) }`), so the arrays are never
    /// copied on the per-message path.
    struct Bucket {
        var verified: [Entry] = []
        var overflow: [Entry] = []

        /// What recording a peer did.
        struct Found {
            var event: PeerMapEvent?
            var verifiedDelta = 0, overflowDelta = 0
            /// Whether the address is now in the bucket (new, or updated in place).
            var stored = false
            /// An overflow peer dropped to make room.
            var evicted: PeerAddress?
        }

        /// The address stored for an id, verified or overflow.
        func address(of id: Number160) -> PeerAddress? {
            verified.first(where: { $0.address.id == id })?.address ?? overflow.first(where: { $0.address.id == id })?.address
        }

        /// How many entries have an address in IP group `group` (by `groupOf`).
        func count(inGroup group: UInt64, _ groupOf: (IPAddress) -> UInt64?) -> Int {
            verified.reduce(0) { $0 + (groupOf($1.address.ip) == group ? 1 : 0) } + overflow.reduce(0) { $0 + (groupOf($1.address.ip) == group ? 1 : 0) }
        }

        /// Records a peer.
        mutating func found(_ address: PeerAddress, verified isVerified: Bool, now: UInt64, config: PeerMapConfig) -> Found {
            if let i = verified.firstIndex(where: { $0.address.id == address.id }) {
                guard isVerified else { return Found() }
                verified[i].address = address
                verified[i].lastSeen = now
                verified[i].failures = 0
                return Found(stored: true)
            }
            let o = overflow.firstIndex(where: { $0.address.id == address.id })
            if isVerified, verified.count < config.bucketSize {
                if let o { overflow.remove(at: o) }
                Self.grow(&verified, toAtMost: config.bucketSize)
                verified.append(Entry(address: address, lastSeen: now, failures: 0, checks: 0))
                return Found(event: o == nil ? .inserted(address, verified: true) : nil, verifiedDelta: 1, overflowDelta: o == nil ? 0 : -1, stored: true)
            }
            // A full bucket keeps its long-lived peers (they are likelier to stay); the newcomer
            // waits in overflow for a place.
            if let o {
                overflow[o].address = address
                if isVerified { overflow[o].lastSeen = now }
                return Found(stored: true)
            }
            guard config.overflowSize > 0 else { return Found() }
            var result = Found(event: .inserted(address, verified: false), overflowDelta: 1, stored: true)
            if overflow.count >= config.overflowSize {
                result.evicted = overflow.removeFirst().address
                result.overflowDelta = 0
            }
            Self.grow(&overflow, toAtMost: config.overflowSize)
            overflow.append(Entry(address: address, lastSeen: isVerified ? now : 0, failures: 0, checks: 0))
            return result
        }

        /// Makes room for one more entry, doubling as an array does but never past the bucket's
        /// bound (an array left to grow by itself holds 32 places for a full bucket of 20).
        private static func grow(_ entries: inout [Entry], toAtMost bound: Int) {
            guard entries.count == entries.capacity, entries.count < bound else { return }
            entries.reserveCapacity(min(max(2, entries.count * 2), bound))
        }

        /// Records a failure; returns the removed peer (if any) and the change in counts.
        mutating func failed(_ id: Number160, reason: RemovalReason, config: PeerMapConfig) -> (PeerAddress?, Int, Int) {
            if let i = verified.firstIndex(where: { $0.address.id == id }) {
                verified[i].failures &+= 1
                guard reason != .offline || Int(verified[i].failures) >= config.offlineAfterFailures else { return (nil, 0, 0) }
                let gone = verified.remove(at: i)
                // Promote the most recently seen overflow peer that talked to us into the free place.
                if let j = overflow.indices.max(by: { overflow[$0].lastSeen < overflow[$1].lastSeen }), overflow[j].lastSeen > 0 {
                    var e = overflow.remove(at: j)
                    e.failures = 0
                    verified.append(e)
                    return (gone.address, 0, -1)
                }
                return (gone.address, -1, 0)
            }
            if let i = overflow.firstIndex(where: { $0.address.id == id }) {
                return (overflow.remove(at: i).address, 0, -1)
            }
            return (nil, 0, 0)
        }
    }

    /// Our own id; never stored.
    public let selfID: Number160
    public let config: PeerMapConfig
    private let lock = NIOLock()
    private var buckets = Buckets()
    private var verifiedCount = 0
    private var overflowCount = 0
    private var banned: [Number160: UInt64] = [:]
    /// Peers (verified and overflow) per IP group, for groups that are not exempt.
    private var groupCounts: [UInt64: Int] = [:]
    private var refusedByIPGroup = 0
    private var listeners: [@Sendable (PeerMapEvent) -> Void] = []
    private let checkIntervals: [UInt64]

    private let clock: NodeClock?

    /// `clock`: the node's (virtual on the simulated network); nil reads the machine's.
    public init(selfID: Number160, config: PeerMapConfig = PeerMapConfig(), clock: NodeClock? = nil) {
        self.selfID = selfID
        self.config = config
        self.clock = clock
        self.checkIntervals = config.checkIntervals.map { PeerMap.nanoseconds($0) }
    }

    static func nanoseconds(_ d: Duration) -> UInt64 {
        let (s, a) = d.components
        return UInt64(max(0, s)) * 1_000_000_000 + UInt64(max(0, a) / 1_000_000_000)
    }

    private func now() -> UInt64 { clock?.uptimeNanoseconds ?? NIODeadline.now().uptimeNanoseconds }

    /// The bucket index of an id: bit length of the XOR distance minus one; `nil` for our own id.
    @inlinable
    public func bucketIndex(of id: Number160) -> Int? {
        let bits = (id ^ selfID).bitLength
        return bits == 0 ? nil : bits - 1
    }

    /// Calls `listener` after every insertion and removal (outside the lock).
    public func onChange(_ listener: @escaping @Sendable (PeerMapEvent) -> Void) {
        lock.withLock { listeners.append(listener) }
    }

    /// Records a peer. `verified` when it contacted us or answered us (first-hand), otherwise it
    /// was only mentioned by someone. Returns whether the peer is new to the map.
    @discardableResult
    public func peerFound(_ address: PeerAddress, verified: Bool) -> Bool {
        // A record we could not send to (port 0, broadcast, multicast…) never enters the map.
        guard address.socket.isValidPeerRecord, let b = bucketIndex(of: address.id) else { return false }
        let now = now()
        let event: PeerMapEvent? = lock.withLock {
            if let until = banned[address.id] {
                if until > now && !verified { return nil }
                banned[address.id] = nil
            }
            // One IP group may hold only so many places per bucket and in all (Sybil limit).
            let group = ipGroup(of: address.ip)
            var before: PeerAddress?
            var groupChanges = false
            if group != nil || !groupCounts.isEmpty {
                before = buckets.read(b) { $0.address(of: address.id) }
                let oldGroup = before.flatMap { ipGroup(of: $0.ip) }
                groupChanges = before == nil || oldGroup != group
                if groupChanges, let group {
                    guard buckets.read(b, { $0.count(inGroup: group, ipGroup) }) < config.maxPeersPerIPGroupPerBucket,
                          (groupCounts[group] ?? 0) < config.maxPeersPerIPGroup else {
                        refusedByIPGroup += 1
                        return nil
                    }
                }
            }
            let found = buckets.modify(b) { $0.found(address, verified: verified, now: now, config: config) }
            verifiedCount += found.verifiedDelta
            overflowCount += found.overflowDelta
            if found.stored, groupChanges {
                if let before { countGroup(of: before.ip, -1) }
                countGroup(of: address.ip, 1)
            }
            if let evicted = found.evicted { countGroup(of: evicted.ip, -1) }
            return found.event
        }
        if let event { emit(event) }
        return event != nil
    }

    private func ipGroup(of ip: IPAddress) -> UInt64? { ip.sybilGroup }

    private func countGroup(of ip: IPAddress, _ delta: Int) {
        guard let g = ipGroup(of: ip) else { return }
        let n = (groupCounts[g] ?? 0) + delta
        groupCounts[g] = n > 0 ? n : nil
    }

    /// Peers refused because their IP group already held its share of a bucket or of the map.
    public var refusedByIPGroupCount: Int { lock.withLock { refusedByIPGroup } }

    /// Records that a peer did not answer (or announced it quits). A verified peer is removed after
    /// `offlineAfterFailures` failures in a row, a peer only heard of at once, a quitting peer at
    /// once. Returns whether the peer was removed.
    @discardableResult
    public func peerFailed(_ id: Number160, reason: RemovalReason = .offline) -> Bool {
        guard let b = bucketIndex(of: id) else { return false }
        let removed: PeerAddress? = lock.withLock {
            let (gone, dv, do_) = buckets.modifyIfStored(b) { $0.failed(id, reason: reason, config: config) } ?? (nil, 0, 0)
            verifiedCount += dv
            overflowCount += do_
            if let gone { countGroup(of: gone.ip, -1) }
            if gone != nil, reason == .offline { ban(id) }
            return gone
        }
        guard let removed else { return false }
        emit(.removed(removed, reason: reason))
        return true
    }

    private func ban(_ id: Number160) {
        if banned.count >= config.maxBanned, let oldest = banned.min(by: { $0.value < $1.value })?.key {
            banned[oldest] = nil
        }
        banned[id] = now() + PeerMap.nanoseconds(config.banDuration)
    }

    /// Whether an id is banned right now (failed until offline, not heard from first-hand since).
    public func isBanned(_ id: Number160) -> Bool {
        lock.withLock { (banned[id] ?? 0) > now() }
    }

    /// The verified peer with this id, if any.
    public func verifiedPeer(_ id: Number160) -> PeerAddress? {
        guard let b = bucketIndex(of: id) else { return nil }
        return lock.withLock { buckets.read(b) { $0.verified.first(where: { $0.address.id == id })?.address } }
    }

    /// Whether the id is in the map at all (verified or overflow).
    public func contains(_ id: Number160) -> Bool {
        guard let b = bucketIndex(of: id) else { return false }
        return lock.withLock {
            buckets.read(b) { $0.verified.contains { $0.address.id == id } || $0.overflow.contains { $0.address.id == id } }
        }
    }

    /// The number of failures in a row recorded for a verified peer (nil if not verified).
    public func failureCount(_ id: Number160) -> Int? {
        guard let b = bucketIndex(of: id) else { return nil }
        return lock.withLock { buckets.read(b) { $0.verified.first(where: { $0.address.id == id }).map { Int($0.failures) } } }
    }

    /// Counts of verified and overflow peers.
    public var counts: (verified: Int, overflow: Int) {
        lock.withLock { (verifiedCount, overflowCount) }
    }

    /// Verified peers per bucket, index 0 (closest) to 159 (the far half of the id space).
    public var bucketOccupancy: [Int] {
        lock.withLock { (0..<160).map { buckets.read($0) { $0.verified.count } } }
    }

    /// All verified peers.
    public var verifiedPeers: [PeerAddress] {
        lock.withLock { buckets.far.reversed().flatMap { $0.verified.map(\.address) } }
    }

    /// The `count` peers closest to `key` by XOR, closest first; overflow peers only when asked.
    ///
    /// Relative to our id, the buckets form bands of strictly increasing distance from the key:
    /// first the key's own bucket `b` (distances below 2^b), then every bucket below `b` together
    /// (distances in [2^b, 2^(b+1))), then `b+1`, `b+2`, … So only the bands needed to reach
    /// `count` are ranked, and only the winners' addresses are copied.
    public func closest(to key: Number160, count: Int, includeOverflow: Bool = false) -> [PeerAddress] {
        guard count > 0 else { return [] }
        let b = bucketIndex(of: key) ?? 0
        // One read of the stored buckets (bucket j is far[159 - j]); empty ones are never visited.
        let far = lock.withLock { buckets.far }
        let lowest = 160 - far.count
        var out: [PeerAddress] = []
        out.reserveCapacity(count)
        var band: [(distance: Number160, bucket: UInt8, index: UInt8, overflow: Bool)] = []
        // The bands in order: b alone, then every bucket below b, then b+1, b+2, … 159 alone.
        var phase = 0, next = max(b + 1, lowest)
        while true {
            let range: Range<Int>
            switch phase {
            case 0: range = b..<(b + 1); phase = 1
            case 1: range = 0..<b; phase = 2
            default:
                guard next < 160 else { return out }
                range = next..<(next + 1)
                next += 1
            }
            band.removeAll(keepingCapacity: true)
            for j in range.clamped(to: lowest..<160) {
                let bucket = far[159 - j]
                for (i, e) in bucket.verified.enumerated() {
                    band.append((e.address.id ^ key, UInt8(j), UInt8(truncatingIfNeeded: i), false))
                }
                if includeOverflow {
                    for (i, e) in bucket.overflow.enumerated() {
                        band.append((e.address.id ^ key, UInt8(j), UInt8(truncatingIfNeeded: i), true))
                    }
                }
            }
            guard !band.isEmpty else { continue }
            let need = count - out.count
            if band.count > need * 2 {
                // Partial selection: keep only the `need` nearest, in order.
                var best = band.prefix(need).sorted { $0.distance < $1.distance }
                for c in band.dropFirst(need) where c.distance < best[need - 1].distance {
                    var at = need - 1
                    while at > 0, c.distance < best[at - 1].distance { at -= 1 }
                    best.removeLast()
                    best.insert(c, at: at)
                }
                band = best
            } else {
                band.sort { $0.distance < $1.distance }
            }
            for c in band {
                let bucket = far[159 - Int(c.bucket)], i = Int(c.index)
                out.append(c.overflow ? bucket.overflow[i].address : bucket.verified[i].address)
                if out.count == count { return out }
            }
        }
    }

    /// Verified peers due for a maintenance check, at most `limit`, least recently seen first;
    /// each is marked as checked so it is not handed out again before its next interval.
    public func dueForCheck(limit: Int) -> [PeerAddress] {
        guard limit > 0, !checkIntervals.isEmpty else { return [] }
        let now = now()
        return lock.withLock {
            var due: [(UInt64, Int, Int)] = []
            for (i, bucket) in buckets.far.enumerated() {
                let b = 159 - i
                for (i, e) in bucket.verified.enumerated() {
                    let interval = checkIntervals[min(Int(e.checks), checkIntervals.count - 1)]
                    if now >= e.lastSeen &+ interval { due.append((e.lastSeen, b, i)) }
                }
            }
            due.sort { $0.0 < $1.0 }
            var out: [PeerAddress] = []
            for (_, b, i) in due.prefix(limit) {
                let address: PeerAddress? = buckets.modifyIfStored(b) { bucket in
                    bucket.verified[i].checks &+= 1
                    bucket.verified[i].lastSeen = now
                    return bucket.verified[i].address
                }
                if let address { out.append(address) }
            }
            return out
        }
    }

    /// The 160 buckets, stored from the farthest (159) down to the closest one ever used: a node
    /// among n peers fills about log2(n) of them, and 140 empty buckets would cost 2.2 KiB a peer.
    struct Buckets {
        /// `far[i]` is bucket `159 - i`.
        private(set) var far: [Bucket] = []

        /// Runs `body` on bucket `b` (an empty one when it is not stored), without copying it.
        @inline(__always)
        func read<R>(_ b: Int, _ body: (Bucket) -> R) -> R {
            let i = 159 - b
            return i < far.count ? body(far[i]) : body(Bucket())
        }

        /// Runs `body` on bucket `b`, storing it (and the empty ones farther out) first if needed.
        @inline(__always)
        mutating func modify<R>(_ b: Int, _ body: (inout Bucket) -> R) -> R {
            let i = 159 - b
            if i >= far.count { far.append(contentsOf: repeatElement(Bucket(), count: i - far.count + 1)) }
            return body(&far[i])
        }

        /// Runs `body` on bucket `b` if it is stored; nil otherwise.
        @inline(__always)
        mutating func modifyIfStored<R>(_ b: Int, _ body: (inout Bucket) -> R) -> R? {
            let i = 159 - b
            return i < far.count ? body(&far[i]) : nil
        }
    }

    private func emit(_ event: PeerMapEvent) {
        let ls = lock.withLock { listeners }
        for l in ls { l(event) }
    }
}
