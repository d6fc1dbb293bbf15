import NIOCore

/// What bootstrapping found.
public struct BootstrapResult: Sendable {
    /// The seed that answered.
    public var seed: PeerAddress
    /// The lookup of our own id that filled the peer map (nil when the join only met the seed:
    /// `bootstrap(to:fill: false)`).
    public var lookup: RoutingResult?
    /// Lookups run to fill empty far buckets afterwards.
    public var refreshLookups: Int
    /// Verified peers in the map afterwards.
    public var verifiedPeers: Int

    public init(seed: PeerAddress, lookup: RoutingResult?, refreshLookups: Int, verifiedPeers: Int) {
        self.seed = seed
        self.lookup = lookup
        self.refreshLookups = refreshLookups
        self.verifiedPeers = verifiedPeers
    }
}

/// How the outside sees this node.
public struct DiscoverResult: Sendable, Equatable {
    public enum Reachability: Sendable, Equatable {
        /// The peer reached us back over UDP and TCP at the address it saw.
        case reachable
        /// The peer could not reach us back on our announced ports: we are behind a NAT or
        /// firewall, seen from outside as `outside`.
        case behindNAT(outside: PeerSocketAddress)
    }
    /// The address the peer saw our request come from (its UDP port is the outside port).
    public var observed: PeerSocketAddress
    public var udpReachable: Bool
    public var tcpReachable: Bool
    public var reachability: Reachability
}

/// Why bootstrapping failed.
public enum BootstrapError: Error, CustomStringConvertible {
    case noSeedAnswered([String])
    public var description: String {
        switch self {
        case .noSeedAnswered(let reasons): "no seed answered: " + reasons.joined(separator: "; ")
        }
    }
}
