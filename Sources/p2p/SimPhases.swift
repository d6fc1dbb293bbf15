import Foundation
import P2PKernel
import P2PTesting

/// Lookups for random keys from random peers, one after another, each compared with the true
/// k closest among the peers it could reach.
struct LookupPhase: Sendable {
    var count = 0
    var failed = 0
    var p50 = 0.0, p95 = 0.0, p99 = 0.0
    var hopsMean = 0.0
    var messagesMean = 0.0
    var recall = 0.0, recallMin = 0.0, recallMedian = 0.0

    /// `count` lookups from random peers of `nodes` (all of `net` when nil); recall counts
    /// against `truth` (every peer of `net`, or those the asker can reach when given).
    static func run(_ net: Testnet, count: Int, routing: RoutingConfig, runtime: SimRuntime, progress: Bool = false,
                    askers: [Node]? = nil, truth: (@Sendable (Node) -> [Number160])? = nil) async -> LookupPhase {
        let pool = askers ?? net.nodes
        // Who asks for what is drawn up front, so the figures do not depend on completion order.
        var rng = runtime.random.generator
        let plan = (0..<count).map { _ in (pool[runtime.index(pool.count)], Number160.random(using: &rng)) }
        // On sockets one at a time (a lookup's latency without others' load); on the simulated
        // network, which has no CPU to share, 64 at once: the same latencies in less virtual time
        // (every node's timers run for as long as virtual time does).
        let inFlight = runtime.isSimulated ? 64 : 1
        struct One: Sendable {
            var ms: Double
            var recall: Double
            var hops: Int
            var messages: Int
        }
        let results: [One?] = await withTaskGroup(of: (Int, One?).self) { group in
            var out = [One?](repeating: nil, count: count)
            var next = 0
            func add() {
                let (i, (asker, key)) = (next, plan[next])
                next += 1
                group.addTask {
                    let start = runtime.now()
                    guard let result = try? await asker.closestPeers(to: key, config: routing) else { return (i, nil) }
                    let ms = runtime.milliseconds(since: start)
                    let recall: Double
                    if let truth {
                        let ids = truth(asker).filter { $0 != asker.peerID }.sorted { ($0 ^ key) < ($1 ^ key) }.prefix(routing.resultSize)
                        let wanted = Set(ids)
                        recall = wanted.isEmpty ? 1 : Double(result.peers.filter { wanted.contains($0.id) }.count) / Double(wanted.count)
                    } else {
                        recall = net.recall(of: result, key: key, asker: asker.peerID)
                    }
                    return (i, One(ms: ms, recall: recall, hops: result.hops, messages: result.messages))
                }
            }
            while next < min(inFlight, count) { add() }
            var done = 0
            while let (i, r) = await group.next() {
                out[i] = r
                done += 1
                if progress, count >= 1000, done % (count / 4) == 0 { note("  lookups: \(done)/\(count)") }
                if next < count { add() }
            }
            return out
        }
        let ok = results.compactMap { $0 }
        let latencies = ok.map(\.ms).sorted()
        let sortedRecalls = ok.map(\.recall).sorted()
        let n = Double(max(1, ok.count))
        return LookupPhase(count: ok.count, failed: count - ok.count,
                           p50: percentile(latencies, 0.50), p95: percentile(latencies, 0.95), p99: percentile(latencies, 0.99),
                           hopsMean: Double(ok.map(\.hops).reduce(0, +)) / n, messagesMean: Double(ok.map(\.messages).reduce(0, +)) / n,
                           recall: ok.isEmpty ? 0 : ok.map(\.recall).reduce(0, +) / n,
                           recallMin: sortedRecalls.first ?? 0, recallMedian: percentile(sortedRecalls, 0.5))
    }

    func json(_ r: (Double, Int) -> Double) -> [String: Any] {
        ["count": count, "failed": failed, "p50_ms": r(p50, 4), "p95_ms": r(p95, 4), "p99_ms": r(p99, 4),
         "hops_mean": r(hopsMean, 3), "messages_mean": r(messagesMean, 2),
         "recall": r(recall, 4), "recall_min": r(recallMin, 4), "recall_median": r(recallMedian, 4)]
    }
}

/// What the partition phase measured.
struct PartitionReport {
    var fraction: Double
    var seconds: Double
    /// Lookups while the network was split, recall against the asker's own side.
    var during: LookupPhase
    /// Lookups once it healed (after a grace of `healSeconds`), recall against everyone.
    var after: LookupPhase
    var healSeconds: Double

    func json(_ r: (Double, Int) -> Double) -> [String: Any] {
        ["fraction": fraction, "seconds": seconds, "heal_grace_s": healSeconds, "during": during.json(r), "after": after.json(r)]
    }
}

/// Splits the simulated network in two for a while: lookups during the split (each side should
/// still find its own closest peers) and after it heals (the two halves should find each other
/// again).
struct PartitionPhase {
    let fraction: Double
    let seconds: Double
    let lookups: Int
    let healSeconds = 30.0

    func run(_ nodes: [Node], network: SimulatedNetwork, runtime: SimRuntime, routing: RoutingConfig) async throws -> PartitionReport {
        var rng = runtime.random.generator
        let shuffled = nodes.shuffled(using: &rng)
        let cut = max(1, min(nodes.count - 1, Int((Double(nodes.count) * fraction).rounded())))
        let sideA = Array(shuffled.prefix(cut)), sideB = Array(shuffled.dropFirst(cut))
        let hostOf: (Node) -> SimHost? = { IPAddress($0.config.host).flatMap(network.host(at:)) }
        network.partition([sideA.compactMap(hostOf), sideB.compactMap(hostOf)])
        let idsA = sideA.map(\.peerID), idsB = sideB.map(\.peerID)
        let inA = Set(idsA)
        let net = Testnet(nodes: nodes, bootstrapSeconds: 0)
        note("partition: \(sideA.count) | \(sideB.count) peers for \(Int(seconds)) s…")
        let started = runtime.now()
        let during = await LookupPhase.run(net, count: lookups, routing: routing, runtime: runtime,
                                           truth: { inA.contains($0.peerID) ? idsA : idsB })
        let spent = runtime.milliseconds(since: started) / 1000
        if spent < seconds { try await runtime.sleep(for: .milliseconds(Int64((seconds - spent) * 1000))) }
        network.heal()
        note("partition healed; lookups after \(Int(healSeconds)) s…")
        try await runtime.sleep(for: .seconds(healSeconds))
        let after = await LookupPhase.run(net, count: lookups, routing: routing, runtime: runtime)
        return PartitionReport(fraction: fraction, seconds: seconds, during: during, after: after, healSeconds: healSeconds)
    }
}

/// How the simulated network was set up, and what it carried.
struct SimulationFacts {
    var seed: UInt64
    var rtt: String
    var loss: Double
    var duplicate: Double
    var jitterMilliseconds: Double
    var virtualSeconds: Double
    var stats: SimulatedNetwork.Stats
    /// Jobs that reached the loop from other threads during the run (0: nothing outside the
    /// simulation took part, so the run repeats from its seed).
    var foreignJobs: Int

    func json(_ r: (Double, Int) -> Double) -> [String: Any] {
        ["seed": seed, "rtt": rtt, "loss": loss, "duplicate": duplicate, "jitter_ms": jitterMilliseconds,
         "virtual_s": r(virtualSeconds, 3), "foreign_jobs": foreignJobs,
         "datagrams": stats.datagrams, "datagrams_lost": stats.datagramsLost, "datagrams_duplicated": stats.datagramsDuplicated,
         "datagrams_undeliverable": stats.datagramsUndeliverable, "frames": stats.frames, "connections": stats.connections]
    }
}
