/// Rate limits per source: each source may spend `burst` tokens at once and earns `rate` a second.
///
/// Bounded and small: `slots` buckets, allocated on first use, shared by sources through a hash
/// keyed with a secret seed. Two sources rarely share a bucket and no one can choose to share
/// another's; a flood from many addresses fills many buckets but never more memory. (A table
/// per source would cost a node memory for every peer that ever handshook with it.) Confined to
/// the node's event loop.
struct TokenBuckets {
    let rate: Double
    let burst: Double
    let slots: Int
    private let seed: UInt64
    private var table: [Bucket] = []

    private struct Bucket {
        var tokens: Float
        /// Uptime in milliseconds, truncated: refill only looks at differences.
        var stamp: UInt32
    }

    init(rate: Double, burst: Double, slots: Int, seed: UInt64) {
        self.seed = seed
        self.rate = max(0, rate)
        self.burst = max(1, burst)
        self.slots = max(1, slots)
    }

    /// Takes one token from `source`'s bucket; false when it is empty.
    mutating func allow(_ source: UInt64, nowNanoseconds: UInt64) -> Bool {
        let now = UInt32(truncatingIfNeeded: nowNanoseconds / 1_000_000)
        if table.isEmpty { table = [Bucket](repeating: Bucket(tokens: Float(burst), stamp: now), count: slots) }
        let i = Int(((source ^ seed) &* 0x9E37_79B9_7F4A_7C15) >> 33) % slots
        let earned = Double(now &- table[i].stamp) / 1000 * rate
        table[i].tokens = Float(min(burst, Double(table[i].tokens) + earned))
        table[i].stamp = now
        guard table[i].tokens >= 1 else { return false }
        table[i].tokens -= 1
        return true
    }
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
