/// The knobs of an iterative lookup, named as in TomP2P.
///
/// Defaults differ from TomP2P's (parallel 2, no-new-info 5, failures 10, success 20) on purpose:
/// those stop a lookup before the k closest peers have all answered, which loses recall. Here a
/// lookup ends when the k closest peers it knows of have all answered (Kademlia's convergence),
/// and the knobs below are caps for networks where that takes too long.
public struct RoutingConfig: Sendable, Equatable {
    /// α: requests in flight at once.
    public var parallel = 3
    /// k: how many closest peers the result holds.
    public var resultSize = 20
    /// Stop once this many peers were direct hits: peers whose id is the key, or, when the lookup
    /// carries a question, peers whose answer is a hit (they have the data). Unlimited by default.
    public var maxDirectHits = Int.max
    /// Stop after this many replies in a row brought no peer into the k closest known.
    public var maxNoNewInfo = 30
    /// Stop after this many peers named by others (not from our own map) failed to answer.
    public var maxFailures = 20
    /// Stop after this many peers answered.
    public var maxSuccess = 100
    /// Candidates remembered per lookup; the farthest are dropped beyond it.
    public var maxCandidates = 200
    /// How many peers a bucket-refresh lookup converges on. A refresh is there to meet a few
    /// peers in an empty far bucket, not the k closest to a random id: 4 route as well as 20
    /// (recall 1.0 in the 1,000-peer simulation) at half the contacts, and every contact costs a
    /// handshake and a session.
    public var refreshResultSize = 4
    /// Candidates one IP group (an IPv4 /24, an IPv6 /48; loopback exempt) may take in one
    /// lookup: a Sybil with many ids on one subnet cannot fill the result, and what a lookup
    /// stores or fetches lands on peers of several operators.
    public var maxPerIPGroup = 3
    /// Peers contacted per lookup that this node did not know first-hand (referrals only): every
    /// contact is a handshake sent to an address someone else named, so a hostile referrer can
    /// aim at most this many at third parties. A lookup in a 1,000-peer overlay makes about 20.
    public var maxReferredContacts = 48

    public init(parallel: Int = 3, resultSize: Int = 20, maxDirectHits: Int = .max, maxNoNewInfo: Int = 30,
                maxFailures: Int = 20, maxSuccess: Int = 100) {
        self.parallel = max(1, parallel)
        self.resultSize = max(1, resultSize)
        self.maxDirectHits = max(1, maxDirectHits)
        self.maxNoNewInfo = max(1, maxNoNewInfo)
        self.maxFailures = max(1, maxFailures)
        self.maxSuccess = max(1, maxSuccess)
    }
}

/// What a lookup found.
public struct RoutingResult: Sendable {
    /// The closest peers that answered, closest first, at most `resultSize`.
    public var peers: [PeerAddress]
    /// The longest chain of referrals that led to an answering peer (1 = known at the start).
    public var hops: Int
    /// Requests sent.
    public var messages: Int
    /// Requests that failed.
    public var failures: Int
    /// Why the lookup stopped.
    public var stop: StopReason
    /// Answers to the routing question, from the peers that answered it, in arrival order.
    public var answers: [RoutingAnswer] = []

    public enum StopReason: String, Sendable {
        /// The k closest known peers all answered.
        case converged
        case maxDirectHits, maxNoNewInfo, maxFailures, maxSuccess, maxReferredContacts
        /// The node knew no peer to ask.
        case noPeers
    }
}
