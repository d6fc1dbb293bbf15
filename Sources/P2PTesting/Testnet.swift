import NIOCore
import P2PKernel

/// An N-peer overlay on loopback in this process, for tests, benchmarks and `p2p sim`.
///
/// ```swift
/// let net = try await Testnet.start(peers: 200)                       // bootstrapped through peer 0
/// let net2 = try await Testnet.start(peers: 1000, perfectRouting: true) // every map pre-filled
/// defer { Task { await net.shutdown() } }
/// ```
public final class Testnet: Sendable {
    /// The peers, in start order; `nodes[0]` is the seed everyone bootstraps through.
    public let nodes: [Node]
    /// Seconds the bootstrap phase took (zero with perfect routing or without bootstrap).
    public let bootstrapSeconds: Double

    public init(nodes: [Node], bootstrapSeconds: Double) {
        self.nodes = nodes
        self.bootstrapSeconds = bootstrapSeconds
    }

    /// How the network is brought up.
    public enum Routing: Sendable {
        /// Peer 0 is the seed; every other peer pings it and looks up its own id.
        case bootstrap
        /// Every peer map is filled with every other peer, as if the overlay had run for long.
        case perfect
        /// Peers start but know nobody.
        case none
    }

    /// Starts `peers` nodes on 127.0.0.1 with ephemeral ports.
    ///
    /// - Parameters:
    ///   - routing: how the maps are filled.
    ///   - joinConcurrency: how many peers bootstrap at once.
    ///   - plugins: the plugins of peer i (none by default: a bare kernel).
    ///   - configure: changes to each node's config (maintenance is off unless set here).
    ///   - progress: called with (phase, done, total) now and then during long phases.
    ///   - network: the simulated network to start the peers on (call this inside its `run`);
    ///     nil: real sockets on 127.0.0.1.
    public static func start(peers: Int, routing: Routing = .bootstrap, joinConcurrency: Int = 16,
                             network: SimulatedNetwork? = nil,
                             plugins: @Sendable (Int) -> [any Plugin] = { _ in [] },
                             configure: @Sendable (Int, inout NodeConfig) -> Void = { _, _ in },
                             progress: (@Sendable (String, Int, Int) -> Void)? = nil) async throws -> Testnet {
        precondition(peers >= 1, "a testnet needs at least one peer")
        var nodes: [Node] = []
        nodes.reserveCapacity(peers)
        let clock = network.map { NodeClock(loop: $0.loop) }
        do {
            for i in 0..<peers {
                var builder = (network?.node() ?? Node.builder().host("127.0.0.1").port(0)).maintenance(nil).requestTimeout(.seconds(2))
                builder = builder.configure { configure(i, &$0) }.plugins(plugins(i))
                nodes.append(try await builder.start())
                if i % 5000 == 4999 || (network == nil && i % 500 == 499) { progress?("start", i + 1, peers) }
            }
        } catch {
            for n in nodes { await n.shutdown() }
            throw error
        }
        var seconds = 0.0
        switch routing {
        case .none: break
        case .perfect:
            for (i, node) in nodes.enumerated() {
                for other in nodes where other !== node { node.peerMap.peerFound(other.address, verified: true) }
                if i % 500 == 499 { progress?("fill", i + 1, peers) }
            }
        case .bootstrap:
            let wall = ContinuousClock()
            let started = wall.now
            let virtualStart = clock?.now
            let seed = nodes[0].address.socket
            let joiners = Array(nodes.dropFirst())
            let window = max(1, joinConcurrency)
            try await withThrowingTaskGroup(of: Void.self) { group in
                var next = 0
                var done = 0
                func add() {
                    let node = joiners[next]
                    next += 1
                    group.addTask {
                        // A busy seed may miss a ping (UDP), and a lossy simulated link several:
                        // retry as a real node would.
                        let attempts = network.map { $0.conditions.loss > 0 ? 10 : 3 } ?? 3
                        for attempt in 1...attempts {
                            do {
                                try await node.bootstrap(to: seed)
                                return
                            } catch where attempt < attempts {
                                continue
                            }
                        }
                    }
                }
                while next < min(window, joiners.count) { add() }
                while try await group.next() != nil {
                    done += 1
                    if done % (network == nil ? 250 : 5000) == 0 { progress?("bootstrap", done, joiners.count) }
                    if next < joiners.count { add() }
                }
            }
            // On the simulated network, the virtual time it took.
            if let clock, let virtualStart {
                seconds = Double((clock.now - virtualStart).nanoseconds) / 1e9
            } else {
                seconds = (wall.now - started).seconds
            }
        }
        return Testnet(nodes: nodes, bootstrapSeconds: seconds)
    }

    /// The ids of the `count` peers closest to `key`, closest first, leaving out `excluding`.
    public func trueClosest(to key: Number160, count: Int, excluding: Number160? = nil) -> [Number160] {
        var ids = nodes.map(\.peerID)
        if let excluding { ids.removeAll { $0 == excluding } }
        ids.sort { ($0 ^ key) < ($1 ^ key) }
        return Array(ids.prefix(count))
    }

    /// The fraction of the true closest `k` (excluding the asker) that a result holds.
    public func recall(of result: RoutingResult, key: Number160, asker: Number160, k: Int = 20) -> Double {
        let truth = Set(trueClosest(to: key, count: k, excluding: asker))
        guard !truth.isEmpty else { return 1 }
        let found = result.peers.filter { truth.contains($0.id) }.count
        return Double(found) / Double(truth.count)
    }

    /// Shuts every peer down (each announces quit to its neighbours).
    public func shutdown() async {
        await withTaskGroup(of: Void.self) { group in
            for n in nodes { group.addTask { await n.shutdown() } }
        }
    }
}

extension Duration {
    /// The duration in seconds, as a floating-point number.
    public var seconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}
