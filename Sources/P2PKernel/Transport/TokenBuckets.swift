/// Rate limits per source: each source may spend `burst` tokens at once and earns `rate` a second.
///
/// Bounded: at most `maxSources` buckets are kept; when full, buckets that have refilled (their
/// source went quiet) are forgotten, and if none has, new sources share one overflow bucket, so
/// a flood from many addresses is limited as one. Confined to the node's event loop.
struct TokenBuckets {
    let rate: Double
    let burst: Double
    let maxSources: Int
    private var buckets: [UInt64: Bucket] = [:]
    private var overflow = Bucket(tokens: 0, stamp: 0)

    private struct Bucket {
        var tokens: Float
        /// Uptime in milliseconds, truncated: refill only looks at differences.
        var stamp: UInt32
    }

    init(rate: Double, burst: Double, maxSources: Int) {
        self.rate = max(0, rate)
        self.burst = max(1, burst)
        self.maxSources = max(1, maxSources)
        overflow.tokens = Float(self.burst)
    }

    /// Takes one token from `source`'s bucket; false when it is empty.
    mutating func allow(_ source: UInt64, nowNanoseconds: UInt64) -> Bool {
        let now = UInt32(truncatingIfNeeded: nowNanoseconds / 1_000_000)
        if var b = buckets[source] {
            let ok = take(&b, now)
            buckets[source] = b
            return ok
        }
        if buckets.count >= maxSources {
            buckets = buckets.filter { _, b in Double(b.tokens) + Double(now &- b.stamp) / 1000 * rate < burst }
        }
        if buckets.count >= maxSources { return take(&overflow, now) }
        var b = Bucket(tokens: Float(burst), stamp: now)
        let ok = take(&b, now)
        buckets[source] = b
        return ok
    }

    private func take(_ b: inout Bucket, _ now: UInt32) -> Bool {
        let earned = Double(now &- b.stamp) / 1000 * rate
        b.tokens = Float(min(burst, Double(b.tokens) + earned))
        b.stamp = now
        guard b.tokens >= 1 else { return false }
        b.tokens -= 1
        return true
    }

    /// Sources remembered now.
    var count: Int { buckets.count }
}

/// The key rate limits and connection counts use for where a packet came from: the IP (an IPv6
/// /64, what one host or subscriber gets), and on loopback the port too, because every peer of
/// an in-process simulation shares 127.0.0.1.
enum SourceKey {
    static func of(_ ip: IPAddress, port: UInt16) -> UInt64 {
        switch ip {
        case .v4(let v):
            return ip.isLoopback ? (1 << 62) | UInt64(v) << 16 | UInt64(port) : UInt64(v)
        case .v6(let hi, _):
            return ip.isLoopback ? (1 << 62) | (1 << 61) | UInt64(port) : (hi | 1 << 63)
        }
    }
}
