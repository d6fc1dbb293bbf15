import NIOCore

/// What bootstrapping found.
public struct BootstrapResult: Sendable {
    /// The seed that answered.
    public var seed: PeerAddress
    /// The lookup of our own id that filled the peer map.
    public var lookup: RoutingResult
    /// Lookups run to fill empty far buckets afterwards.
    public var refreshLookups: Int
    /// Verified peers in the map afterwards.
    public var verifiedPeers: Int

    public init(seed: PeerAddress, lookup: RoutingResult, refreshLookups: Int, verifiedPeers: Int) {
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

extension Node {
    /// Pings an address and returns the peer that answered.
    public func ping(_ target: PeerSocketAddress, over transport: TransportKind = .udp) async throws -> PeerAddress {
        let reply = try await request(to: target, command: kernelCommands.ping,
                                      transport: transport == .udp ? .udp : .tcp).get()
        if let error = RPCError.from(reply: reply) { throw error }
        return reply.sender
    }

    /// The k peers closest to `key` in the whole overlay, found by iterative lookup.
    public func closestPeers(to key: Number160, config: RoutingConfig? = nil) async throws -> RoutingResult {
        try await lookup(key, config: config).get()
    }

    /// The lookup as a future, for callers already on event loops (simulations, plugins).
    ///
    /// - Parameters:
    ///   - question: a plugin's question carried in every request; answers come back in
    ///     `RoutingResult.answers`, and hits count towards `maxDirectHits`.
    ///   - initialHits: hits already counted before the lookup (say, this node holds the data).
    public func lookup(_ key: Number160, config: RoutingConfig? = nil, question: RoutingQuestion? = nil,
                       initialHits: Int = 0) -> EventLoopFuture<RoutingResult> {
        let cfg = config ?? self.config.routing
        if eventLoop.inEventLoop {
            guard running else { return eventLoop.makeFailedFuture(RPCError.shutDown) }
            return IterativeLookup(node: self, key: key, config: cfg, question: question, initialHits: initialHits).start()
        }
        return eventLoop.flatSubmit { [self] in
            guard running else { return eventLoop.makeFailedFuture(RPCError.shutDown) }
            return IterativeLookup(node: self, key: key, config: cfg, question: question, initialHits: initialHits).start()
        }
    }

    /// Joins the overlay: pings the seeds until one answers, then looks up our own id, which fills
    /// our peer map and announces us to the peers closest to us.
    @discardableResult
    public func bootstrap(to seeds: [PeerSocketAddress]) async throws -> BootstrapResult {
        var reasons: [String] = []
        for seed in seeds {
            do {
                let peer = try await ping(seed)
                let lookup = try await closestPeers(to: peerID)
                let refreshed = try await refreshBuckets()
                let verified = peerMap.counts.verified
                // Joined, but nobody here can say how we are seen: taken as reachable for now.
                if verified == 0 { await nat.nobodyToAsk(self) }
                return BootstrapResult(seed: peer, lookup: lookup, refreshLookups: refreshed, verifiedPeers: verified)
            } catch {
                reasons.append("\(seed): \(error)")
            }
        }
        throw BootstrapError.noSeedAnswered(reasons)
    }

    /// Joins through one seed.
    @discardableResult
    public func bootstrap(to seed: PeerSocketAddress) async throws -> BootstrapResult {
        try await bootstrap(to: [seed])
    }

    /// Fills empty buckets farther than our nearest neighbour by looking up a random id in each.
    ///
    /// Looking up our own id only meets peers near us; without this, a peer can end up knowing
    /// nobody in the other half of the id space, and lookups from it for keys there converge on
    /// the wrong region (Kademlia's join does the same refresh). Returns how many lookups ran.
    @discardableResult
    public func refreshBuckets() async throws -> Int {
        let occupancy = peerMap.bucketOccupancy
        guard let nearest = occupancy.firstIndex(where: { $0 > 0 }) else { return 0 }
        var rng = random.generator
        var keys: [Number160] = []
        for bucket in stride(from: 159, to: nearest, by: -1) where occupancy[bucket] == 0 {
            keys.append(peerID ^ Number160.random(bitLength: bucket + 1, using: &rng))
        }
        guard !keys.isEmpty else { return 0 }
        var refresh = config.routing
        refresh.resultSize = min(refresh.resultSize, refresh.refreshResultSize)
        let lookups = keys.map { lookup($0, config: refresh) }
        _ = try await EventLoopFuture.whenAllComplete(lookups, on: eventLoop).get()
        return keys.count
    }

    /// Asks a peer how it sees us and to probe us back over UDP and TCP.
    public func discover(via peer: PeerSocketAddress) async throws -> DiscoverResult {
        let reply = try await request(to: peer, command: kernelCommands.discover, transport: .udp).get()
        if let error = RPCError.from(reply: reply) { throw error }
        guard let observed = reply.firstPeers?.first?.socket, let bits = reply.firstInteger else {
            throw RPCError.malformedReply("discover reply without observed address and probe result")
        }
        let udp = bits & 1 != 0, tcp = bits & 2 != 0
        let reachable = udp && tcp && observed.udpPort == address.udpPort
        let result = DiscoverResult(observed: observed, udpReachable: udp, tcpReachable: tcp,
                                    reachability: reachable ? .reachable : .behindNAT(outside: observed))
        registry.publish(.reachability(result))
        return result
    }

    /// Pings the peers due for a check (by how long they have been up); a peer that fails often
    /// enough is removed by the RPC layer's failure accounting.
    func startMaintenance() {
        guard running else { return }
        for policy in registry.replicationPolicies {
            guard let every = policy.timerInterval else { continue }
            let t = TimeAmount(every)
            backgroundTasks.append(eventLoop.scheduleRepeatedTask(initialDelay: t, delay: t) { [self] _ in
                let context = ReplicationContext(node: self)
                spawn { await policy.handle(.timer, context: context) }
            })
        }
        guard let interval = config.maintenanceInterval else { return }
        let t = TimeAmount(interval)
        maintenanceTask = eventLoop.scheduleRepeatedTask(initialDelay: t, delay: t) { [self] _ in
            for peer in peerMap.dueForCheck(limit: config.maintenancePingsPerRound) {
                learnRoute(peer)
                _ = requestOnLoop(target: peer.socket, expectedID: peer.id, command: kernelCommands.ping,
                                  payload: [], transport: .udp, timeout: nil)
            }
        }
    }
}
