/// The peer map's bounds and timings.
public struct PeerMapConfig: Sendable {
    /// k: verified peers per bucket (Kademlia's and TomP2P's 20).
    public var bucketSize = 20
    /// Peers only heard of, kept per bucket as replacements for verified ones that fail. Smaller
    /// than k: they are hints, and each costs memory in every peer of a large simulation.
    public var overflowSize = 5
    /// Failures in a row after which a verified peer counts as offline and is removed.
    public var offlineAfterFailures = 3
    /// How long an offline peer is ignored when others mention it (it is let back at once when it
    /// contacts us itself).
    public var banDuration: Duration = .seconds(60)
    /// Most banned ids remembered; the oldest ban is forgotten first.
    public var maxBanned = 1_000
    /// When a verified peer is checked again, by how many checks it has passed: a peer up for long
    /// is likely to stay up (Kademlia's observation), so it is pinged less and less often.
    public var checkIntervals: [Duration] = [.seconds(10), .seconds(20), .seconds(40), .seconds(80), .seconds(160), .seconds(320)]

    /// Most peers one IP group (an IPv4 /24, an IPv6 /48) may hold in one bucket, and in the
    /// whole map: one operator on one subnet cannot fill a bucket, or the table, with identities
    /// it generated (go-libp2p's diversity filter has this shape). Loopback is exempt, so that
    /// simulations run every peer on 127.0.0.1. On a LAN where every peer shares a /24, raise them.
    public var maxPeersPerIPGroupPerBucket = 2
    public var maxPeersPerIPGroup = 8

    public init() {}
}

/// What changed in a peer map.
public enum PeerMapEvent: Sendable, Equatable {
    /// A peer was added; `verified` tells whether it talked to us or was only mentioned.
    case inserted(PeerAddress, verified: Bool)
    /// A peer was removed.
    case removed(PeerAddress, reason: RemovalReason)
}

/// Why a peer left the map.
public enum RemovalReason: Sendable, Equatable {
    /// It announced that it is shutting down.
    case quit
    /// It failed `offlineAfterFailures` times in a row (or once, if only heard of).
    case offline
    /// It announced that it cannot be reached unsolicited (behind a NAT, not yet mapped or relayed).
    case unreachable
    /// A connection we keep open to it (a relay link) closed: it went away, or came back with
    /// another identity at the same address.
    case disconnected
}
