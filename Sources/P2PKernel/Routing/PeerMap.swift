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

    struct Bucket {
        var verified: [Entry] = []
        var overflow: [Entry] = []
    }

    /// Our own id; never stored.
    public let selfID: Number160
    public let config: PeerMapConfig
    private let lock = NIOLock()
    private var buckets = [Bucket](repeating: Bucket(), count: 160)
    private var verifiedCount = 0
    private var overflowCount = 0
    private var banned: [Number160: UInt64] = [:]
    private var listeners: [@Sendable (PeerMapEvent) -> Void] = []
    private let checkIntervals: [UInt64]

    public init(selfID: Number160, config: PeerMapConfig = PeerMapConfig()) {
        self.selfID = selfID
        self.config = config
        self.checkIntervals = config.checkIntervals.map { PeerMap.nanoseconds($0) }
    }

    static func nanoseconds(_ d: Duration) -> UInt64 {
        let (s, a) = d.components
        return UInt64(max(0, s)) * 1_000_000_000 + UInt64(max(0, a) / 1_000_000_000)
    }

    static func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

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
        guard let b = bucketIndex(of: address.id) else { return false }
        let now = PeerMap.now()
        let event: PeerMapEvent? = lock.withLock {
            if let until = banned[address.id] {
                if until > now && !verified { return nil }
                banned[address.id] = nil
            }
            var bucket = buckets[b]
            defer { buckets[b] = bucket }
            if let i = bucket.verified.firstIndex(where: { $0.address.id == address.id }) {
                if verified {
                    bucket.verified[i].address = address
                    bucket.verified[i].lastSeen = now
                    bucket.verified[i].failures = 0
                }
                return nil
            }
            let o = bucket.overflow.firstIndex(where: { $0.address.id == address.id })
            if verified {
                if bucket.verified.count < config.bucketSize {
                    if let o {
                        bucket.overflow.remove(at: o)
                        overflowCount -= 1
                    }
                    bucket.verified.append(Entry(address: address, lastSeen: now, failures: 0, checks: 0))
                    verifiedCount += 1
                    return o == nil ? .inserted(address, verified: true) : nil
                }
                // A full bucket keeps its long-lived peers (they are likelier to stay); the newcomer
                // waits in overflow for a place.
            }
            if let o {
                bucket.overflow[o].address = address
                if verified { bucket.overflow[o].lastSeen = now }
                return nil
            }
            guard config.overflowSize > 0 else { return nil }
            if bucket.overflow.count >= config.overflowSize {
                bucket.overflow.removeFirst()
                overflowCount -= 1
            }
            bucket.overflow.append(Entry(address: address, lastSeen: verified ? now : 0, failures: 0, checks: 0))
            overflowCount += 1
            return .inserted(address, verified: false)
        }
        if let event { emit(event) }
        return event != nil
    }

    /// Records that a peer did not answer (or announced it quits). A verified peer is removed after
    /// `offlineAfterFailures` failures in a row, a peer only heard of at once, a quitting peer at
    /// once. Returns whether the peer was removed.
    @discardableResult
    public func peerFailed(_ id: Number160, reason: RemovalReason = .offline) -> Bool {
        guard let b = bucketIndex(of: id) else { return false }
        let removed: PeerAddress? = lock.withLock {
            var bucket = buckets[b]
            defer { buckets[b] = bucket }
            if let i = bucket.verified.firstIndex(where: { $0.address.id == id }) {
                bucket.verified[i].failures &+= 1
                guard reason == .quit || Int(bucket.verified[i].failures) >= config.offlineAfterFailures else { return nil }
                let gone = bucket.verified.remove(at: i)
                verifiedCount -= 1
                // Promote the most recently seen overflow peer into the free place.
                if let j = bucket.overflow.indices.max(by: { bucket.overflow[$0].lastSeen < bucket.overflow[$1].lastSeen }),
                   bucket.overflow[j].lastSeen > 0 {
                    var e = bucket.overflow.remove(at: j)
                    overflowCount -= 1
                    e.failures = 0
                    bucket.verified.append(e)
                    verifiedCount += 1
                }
                if reason == .offline { ban(id) }
                return gone.address
            }
            if let i = bucket.overflow.firstIndex(where: { $0.address.id == id }) {
                let gone = bucket.overflow.remove(at: i)
                overflowCount -= 1
                if reason == .offline { ban(id) }
                return gone.address
            }
            return nil
        }
        guard let removed else { return false }
        emit(.removed(removed, reason: reason))
        return true
    }

    private func ban(_ id: Number160) {
        if banned.count >= config.maxBanned, let oldest = banned.min(by: { $0.value < $1.value })?.key {
            banned[oldest] = nil
        }
        banned[id] = PeerMap.now() + PeerMap.nanoseconds(config.banDuration)
    }

    /// Whether an id is banned right now (failed until offline, not heard from first-hand since).
    public func isBanned(_ id: Number160) -> Bool {
        lock.withLock { (banned[id] ?? 0) > PeerMap.now() }
    }

    /// The verified peer with this id, if any.
    public func verifiedPeer(_ id: Number160) -> PeerAddress? {
        guard let b = bucketIndex(of: id) else { return nil }
        return lock.withLock { buckets[b].verified.first(where: { $0.address.id == id })?.address }
    }

    /// Whether the id is in the map at all (verified or overflow).
    public func contains(_ id: Number160) -> Bool {
        guard let b = bucketIndex(of: id) else { return false }
        return lock.withLock {
            buckets[b].verified.contains { $0.address.id == id } || buckets[b].overflow.contains { $0.address.id == id }
        }
    }

    /// The number of failures in a row recorded for a verified peer (nil if not verified).
    public func failureCount(_ id: Number160) -> Int? {
        guard let b = bucketIndex(of: id) else { return nil }
        return lock.withLock { buckets[b].verified.first(where: { $0.address.id == id }).map { Int($0.failures) } }
    }

    /// Counts of verified and overflow peers.
    public var counts: (verified: Int, overflow: Int) {
        lock.withLock { (verifiedCount, overflowCount) }
    }

    /// All verified peers.
    public var verifiedPeers: [PeerAddress] {
        lock.withLock { buckets.flatMap { $0.verified.map(\.address) } }
    }

    /// The `count` peers closest to `key` by XOR, closest first; overflow peers only when asked.
    public func closest(to key: Number160, count: Int, includeOverflow: Bool = false) -> [PeerAddress] {
        guard count > 0 else { return [] }
        // Buckets nearer to the key's own bucket hold the closer peers, but XOR order across
        // buckets is not monotonic in the index, so gather all and select; maps hold a few hundred.
        var candidates: [(Number160, PeerAddress)] = []
        lock.withLock {
            candidates.reserveCapacity(verifiedCount + (includeOverflow ? overflowCount : 0))
            for bucket in buckets {
                for e in bucket.verified { candidates.append((e.address.id ^ key, e.address)) }
                if includeOverflow {
                    for e in bucket.overflow { candidates.append((e.address.id ^ key, e.address)) }
                }
            }
        }
        if candidates.count > count {
            // Partial selection: keep the `count` smallest distances.
            var best: [(Number160, PeerAddress)] = []
            best.reserveCapacity(count + 1)
            for c in candidates {
                if best.count == count, let last = best.last, !(c.0 < last.0) { continue }
                var lo = 0, hi = best.count
                while lo < hi {
                    let mid = (lo + hi) / 2
                    if best[mid].0 < c.0 { lo = mid + 1 } else { hi = mid }
                }
                best.insert(c, at: lo)
                if best.count > count { best.removeLast() }
            }
            return best.map(\.1)
        }
        candidates.sort { $0.0 < $1.0 }
        return candidates.map(\.1)
    }

    /// Verified peers due for a maintenance check, at most `limit`, least recently seen first;
    /// each is marked as checked so it is not handed out again before its next interval.
    public func dueForCheck(limit: Int) -> [PeerAddress] {
        guard limit > 0, !checkIntervals.isEmpty else { return [] }
        let now = PeerMap.now()
        return lock.withLock {
            var due: [(UInt64, Int, Int)] = []
            for (b, bucket) in buckets.enumerated() where !bucket.verified.isEmpty {
                for (i, e) in bucket.verified.enumerated() {
                    let interval = checkIntervals[min(Int(e.checks), checkIntervals.count - 1)]
                    if now >= e.lastSeen &+ interval { due.append((e.lastSeen, b, i)) }
                }
            }
            due.sort { $0.0 < $1.0 }
            var out: [PeerAddress] = []
            for (_, b, i) in due.prefix(limit) {
                buckets[b].verified[i].checks &+= 1
                buckets[b].verified[i].lastSeen = now
                out.append(buckets[b].verified[i].address)
            }
            return out
        }
    }

    private func emit(_ event: PeerMapEvent) {
        let ls = lock.withLock { listeners }
        for l in ls { l(event) }
    }
}
