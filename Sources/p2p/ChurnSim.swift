import Foundation
import NIOConcurrencyHelpers
import P2PDHT
import P2PKernel
import P2PReplication
import P2PStorage
import P2PTesting

/// Every replication policy the simulation made, to sum what they sent.
final class PolicyRegistry: Sendable {
    private let all = NIOLockedValueBox<[IndirectReplication]>([])
    let factor: Int
    let interval: Duration

    init(factor: Int, interval: Duration) {
        self.factor = factor
        self.interval = interval
    }

    func make() -> IndirectReplication {
        let p = IndirectReplication(mode: .nRoot, factor: factor, interval: interval)
        all.withLockedValue { $0.append(p) }
        return p
    }

    /// Every policy's statistics, summed.
    var total: ReplicationStats {
        all.withLockedValue { ps in
            ps.reduce(into: ReplicationStats()) { t, p in
                let s = p.stats
                t.offers += s.offers
                t.summaries += s.summaries
                t.keysOffered += s.keysOffered
                t.failedOffers += s.failedOffers
                t.refusedOffers += s.refusedOffers
                t.valuesSent += s.valuesSent
                t.bytesSent += s.bytesSent
                t.failedPuts += s.failedPuts
                t.deferred += s.deferred
                t.handedOver += s.handedOver
                t.lookups += s.lookups
            }
        }
    }

    /// Bytes an offered key costs on the wire: the key (80) and its version (17).
    static let offeredKeyBytes = 97

    /// Bytes of values and of offered keys sent so far, and how many values moved (offers go on
    /// every round; values move only while replica sets are being refilled).
    var sent: (bytes: Int, activity: Int) {
        all.withLockedValue { ps in
            ps.reduce((0, 0)) { acc, p in
                let s = p.stats
                return (acc.0 + s.bytesSent + s.keysOffered * Self.offeredKeyBytes + s.summaries * 32, acc.1 + s.valuesSent + s.failedPuts)
            }
        }
    }
}

/// What one wave of churn left.
struct ChurnWave {
    var left: Int
    var joined: Int
    var retrievable: Double
    var replicasMean: Double
    var bytesPerValue: Double
    var settleSeconds: Double
}

/// Stores values, then in waves makes a fraction of the peers vanish without a word and as many
/// new ones join, lets replication run until it is quiet, and checks every value from a random
/// live peer.
struct ChurnSim {
    let values: Int
    let churn: Double
    let waves: Int
    let valueSize: Int
    let policies: PolicyRegistry
    let runtime: SimRuntime
    let makePlugins: @Sendable () -> [any Plugin]

    func run(_ net: Testnet) async throws -> (waves: [ChurnWave], live: [Node]) {
        var live = net.nodes
        let runtime = self.runtime
        var rng = runtime.random.generator
        let keys = (0..<values).map { Number640(location: Number160(hashing: "churn value \($0)")) }
        let data = (0..<values).map { i in Array("value \(i) ".utf8) + runtime.random.bytes(valueSize) }
        note("churn: storing \(values) values with \(policies.factor) replicas…")
        // 32 puts at once, each from a peer drawn up front (the run repeats whatever the order
        // the puts finish in).
        let writers = keys.map { _ in live[runtime.index(live.count)] }
        let factor = policies.factor
        let stored = await withTaskGroup(of: Bool.self) { group in
            var ok = 0, next = 0
            func add() {
                let (node, k, v) = (writers[next], keys[next], data[next])
                next += 1
                group.addTask { (try? await node.dht.put(k, v, options: DHTOptions(replicas: factor)).isSuccess) == true }
            }
            while next < min(32, keys.count) { add() }
            while let r = await group.next() {
                if r { ok += 1 }
                if next < keys.count { add() }
            }
            return ok
        }
        guard stored == values else { throw CLIError.failed("only \(stored) of \(values) values were stored before churn") }
        note("churn: stored; replicating…")
        let initial = try await settle()
        note("churn: replication quiet after \(String(format: "%.1f", initial)) s")
        var report: [ChurnWave] = []
        for wave in 1...max(1, waves) {
            let leaving = min(live.count - 1, Int((Double(live.count) * churn).rounded()))
            live.shuffle(using: &rng)
            let gone = Array(live.prefix(leaving))
            live.removeFirst(leaving)
            // A wave takes ten seconds: a tenth of its peers vanish each second (all at once, a
            // value whose every holder is among them is lost whatever replication does: at 50 %
            // churn and 6 copies, 1.6 % of the values).
            let step = max(1, leaving / 10)
            var at = 0
            while at < gone.count {
                let batch = gone[at..<min(gone.count, at + step)]
                at += batch.count
                for n in batch { await n.shutdown(announce: false) }
                if at < gone.count { try await runtime.sleep(for: .seconds(1)) }
            }
            let before = policies.sent.bytes
            // New peers join 16 at a time (64 on the simulated network), each through a random survivor (a join meets the dead
            // in other peers' maps and waits out their timeouts, as a real one would).
            let seeds = (0..<leaving).map { _ in live[runtime.index(live.count)].address.socket }
            let plugins = makePlugins
            let newcomers: [Node] = await withTaskGroup(of: Node?.self) { group in
                var out: [Node] = []
                var next = 0
                func add() {
                    let seed = seeds[next]
                    next += 1
                    group.addTask {
                        guard let node = try? await runtime.builder().maintenance(.seconds(1)).requestTimeout(.seconds(2))
                            .plugins(plugins()).start() else { return nil }
                        do {
                            try await node.bootstrap(to: seed)
                            return node
                        } catch {
                            await node.shutdown()
                            return nil
                        }
                    }
                }
                while next < min(runtime.isSimulated ? 64 : 16, seeds.count) { add() }
                while let n = await group.next() {
                    if let n { out.append(n) }
                    if next < seeds.count { add() }
                }
                return out
            }
            live.append(contentsOf: newcomers)
            let joined = newcomers.count
            note("churn wave \(wave): \(leaving) left, \(joined) joined; replicating…")
            let totalBefore = policies.total
            let settleSeconds = try await settle()
            do {
                let t = policies.total
                note("churn wave \(wave): settled in \(String(format: "%.1f", settleSeconds)) s; offers \(t.offers - totalBefore.offers) keys \(t.keysOffered - totalBefore.keysOffered) failed \(t.failedOffers - totalBefore.failedOffers) values \(t.valuesSent - totalBefore.valuesSent) bytes \(t.bytesSent - totalBefore.bytesSent) lookups \(t.lookups - totalBefore.lookups) handedOver \(t.handedOver - totalBefore.handedOver)")
            }
            let bytes = policies.sent.bytes - before
            // Every value read from a random live peer (32 at a time), and its exact copies counted.
            let askers = keys.map { _ in live[runtime.index(live.count)] }
            // (Each miss keeps what its get saw: the peers asked, as ranks among the live.)
            let liveNow = live
            let ranked: @Sendable (Number640) -> [Number160: Int] = { k in
                Dictionary(liveNow.sorted { k.location.isCloser($0.peerID, than: $1.peerID) }.enumerated().map { ($1.peerID, $0) }) { a, _ in a }
            }
            let (found, missed) = await withTaskGroup(of: (Int, Bool, String).self) { group in
                var hits = 0
                var missed: [Int: String] = [:]
                var next = 0
                func add() {
                    let (asker, k, v, i) = (askers[next], keys[next], data[next], next)
                    next += 1
                    group.addTask {
                        do {
                            let r = try await asker.dht.get(k)
                            guard r.value != v else { return (i, true, "") }
                            let rank = ranked(k)
                            let seen = r.outcomes.map { o in "\(rank[o.peer.id].map(String.init) ?? "dead"):\(o.failure ?? (r.perPeer[o.peer]?[k] == nil ? "none" : "held"))" }
                            return (i, false, "reader rank \(rank[asker.peerID] ?? -1) asked \(seen.joined(separator: " "))")
                        } catch {
                            return (i, false, "get failed: \(error)")
                        }
                    }
                }
                while next < min(32, keys.count) { add() }
                while let (i, hit, why) = await group.next() {
                    if hit { hits += 1 } else { missed[i] = why }
                    if next < keys.count { add() }
                }
                return (hits, missed)
            }
            // Where a missed value's copies are: ranks among the live peers (0: closest).
            for i in missed.keys.sorted().prefix(3) {
                let k = keys[i]
                let ranks = live.sorted { k.location.isCloser($0.peerID, than: $1.peerID) }.enumerated().compactMap { rank, n -> Int? in
                    n.registry.storageBackend?.replicaEntries([k], now: n.clock.uptimeNanoseconds)[k] == nil ? nil : rank
                }
                note("churn wave \(wave): value \(i) missed; held at ranks \(ranks)")
                if !ranks.isEmpty { note("  held, yet not read: \(missed[i] ?? "")") }
            }
            do {
                // Where the copies are: how many at each rank among the live peers (0: the key's
                // closest; the set is ranks 0 to factor-1, copies are handed back from factor + 2).
                var hist: [Int: Int] = [:]
                for k in keys {
                    let ranked = live.sorted { k.location.isCloser($0.peerID, than: $1.peerID) }
                    for (r, n) in ranked.enumerated() where n.registry.storageBackend?.replicaEntries([k], now: n.clock.uptimeNanoseconds)[k] != nil {
                        hist[min(r, 30), default: 0] += 1
                    }
                }
                note("churn wave \(wave): copies by rank \(hist.sorted { $0.key < $1.key }.map { "\($0.key):\($0.value)" }.joined(separator: " "))")
            }
            var replicas = 0
            for (k, v) in zip(keys, data) {
                replicas += live.count { n in
                    guard case .values(let got, _)? = try? n.registry.storageBackend?.execute(.get(.keys([k])), now: n.clock.uptimeNanoseconds) else { return false }
                    return got[k]?.value == v
                }
            }
            let w = ChurnWave(left: leaving, joined: joined, retrievable: Double(found) / Double(max(1, values)),
                              replicasMean: Double(replicas) / Double(max(1, values)),
                              bytesPerValue: Double(bytes) / Double(max(1, values)), settleSeconds: settleSeconds)
            note("churn wave \(wave): \(found)/\(values) retrievable, \(String(format: "%.2f", w.replicasMean)) replicas on average")
            report.append(w)
        }
        return (report, live)
    }

    /// Waits until replication has been quiet for five intervals — longer than a peer waits
    /// before offering a location again to a peer it brought up to date (three rounds), so the
    /// dead are noticed first — at most 180 s; how long it took. (`P2P_SETTLE_TRACE` set: what
    /// replication did, every 10 s.)
    private func settle() async throws -> Double {
        let start = runtime.now()
        var last = policies.sent.activity
        var quietSince = runtime.now()
        let quiet = Double(policies.interval.components.seconds) * 1000 + Double(policies.interval.components.attoseconds) / 1e15
        let trace = ProcessInfo.processInfo.environment["P2P_SETTLE_TRACE"] != nil
        var traced = (at: 0.0, stats: policies.total)
        while runtime.milliseconds(since: start) < 180_000 {
            try await runtime.sleep(for: .milliseconds(200))
            if trace, runtime.milliseconds(since: start) - traced.at >= 10_000 {
                let t = policies.total, b = traced.stats
                note("settle +\(Int(runtime.milliseconds(since: start) / 1000)) s: offers \(t.offers - b.offers) keys \(t.keysOffered - b.keysOffered) failed \(t.failedOffers - b.failedOffers) values \(t.valuesSent - b.valuesSent) failedPuts \(t.failedPuts - b.failedPuts) handedOver \(t.handedOver - b.handedOver) lookups \(t.lookups - b.lookups)")
                traced = (runtime.milliseconds(since: start), t)
            }
            let now = policies.sent.activity
            if now != last {
                last = now
                quietSince = runtime.now()
            } else if runtime.milliseconds(since: quietSince) >= quiet * 5 {
                break
            }
        }
        return runtime.milliseconds(since: start) / 1000
    }
}
