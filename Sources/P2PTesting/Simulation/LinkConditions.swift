import P2PKernel

/// How long packets take between two hosts of the simulated network.
public enum LatencyModel: Sendable, Equatable, CustomStringConvertible {
    /// The same round trip between every pair of hosts.
    case constant(Duration)
    /// A round trip per pair of hosts, drawn uniformly from the range once for the pair (from the
    /// seed and the two addresses: the same pair always gets the same value).
    case uniform(Duration, Duration)
    /// Every host lives in a region (weighted by where internet users are) and has a last-mile
    /// delay of its own; a pair's round trip is the regions' round trip (`WorldLatency.table`)
    /// plus both last miles.
    case world

    /// Parses `50ms`, `2s`, `20ms-200ms` or `world` (`--rtt`).
    public init?(parsing text: String) {
        if text == "world" {
            self = .world
            return
        }
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        switch parts.count {
        case 1:
            guard let d = Self.duration(parts[0]) else { return nil }
            self = .constant(d)
        case 2:
            guard let lo = Self.duration(parts[0]), let hi = Self.duration(parts[1]), lo <= hi else { return nil }
            self = .uniform(lo, hi)
        default:
            return nil
        }
    }

    /// `250us`, `50ms`, `1.5s`; at most 60 s.
    static func duration(_ s: Substring) -> Duration? {
        let units: [(String, Double)] = [("us", 1e-6), ("ms", 1e-3), ("s", 1)]
        for (suffix, scale) in units where s.hasSuffix(suffix) {
            guard let v = Double(s.dropLast(suffix.count)), v >= 0, v * scale <= 60 else { return nil }
            return .nanoseconds(Int64((v * scale * 1e9).rounded()))
        }
        return nil
    }

    public var description: String {
        func f(_ d: Duration) -> String { "\(Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15) ms" }
        switch self {
        case .constant(let d): return "\(f(d)) round trip"
        case .uniform(let lo, let hi): return "\(f(lo))–\(f(hi)) round trip per link"
        case .world: return "world regions"
        }
    }
}

/// What the network does to packets besides delaying them. Datagrams can be lost, duplicated
/// and reordered (by jitter); stream frames are never lost or reordered (TCP retransmits), but a
/// lost segment delays its frame by a retransmission timeout.
public struct LinkConditions: Sendable, Equatable {
    public var latency: LatencyModel
    /// Each datagram is lost with this probability (and each TCP frame delayed by a retransmission).
    public var loss: Double
    /// Each datagram that arrives arrives twice with this probability.
    public var duplicate: Double
    /// Each datagram waits up to this much longer than the link's latency (uniformly): datagrams
    /// sent close together arrive out of order.
    public var jitter: Duration

    public init(latency: LatencyModel = .constant(.milliseconds(20)), loss: Double = 0, duplicate: Double = 0, jitter: Duration = .zero) {
        self.latency = latency
        self.loss = min(max(loss, 0), 1)
        self.duplicate = min(max(duplicate, 0), 1)
        self.jitter = jitter
    }
}

/// Round trips between world regions, from public measurements between cloud regions and
/// internet exchanges (approximate medians, 2024–2026), and how internet users spread over them.
public enum WorldLatency {
    public static let regions = ["north-america-east", "north-america-west", "south-america", "europe-west", "europe-east",
                                 "asia-east", "asia-south", "oceania", "africa"]
    /// Share of internet users per region (ITU figures, rounded), in the order of `regions`.
    public static let weights: [Double] = [6, 4, 10, 9, 7, 27, 22, 1, 14]
    /// Round trip in milliseconds between two regions' centres (symmetric).
    public static let table: [[Double]] = [
        //  NA-E  NA-W  SA    EU-W  EU-E  AS-E  AS-S  OC    AF
        [   12,   65,  115,   75,   95,  150,  190,  200,  225],  // north-america-east
        [   65,   12,  175,  135,  160,  105,  220,  140,  280],  // north-america-west
        [  115,  175,   15,  185,  210,  260,  300,  310,  340],  // south-america
        [   75,  135,  185,   10,   30,  215,  120,  255,  160],  // europe-west
        [   95,  160,  210,   30,   12,  190,  110,  270,  175],  // europe-east
        [  150,  105,  260,  215,  190,   15,  110,  115,  270],  // asia-east
        [  190,  220,  300,  120,  110,  110,   15,  150,  250],  // asia-south
        [  200,  140,  310,  255,  270,  115,  150,   12,  290],  // oceania
        [  225,  280,  340,  160,  175,  270,  250,  290,   20],  // africa
    ]
    /// Last-mile delay of one host, one way: 2–15 ms (fibre to busy DSL or cable).
    static let accessRange: ClosedRange<UInt64> = 2_000_000...15_000_000
}
