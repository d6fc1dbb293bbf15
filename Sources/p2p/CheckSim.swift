import Foundation
import NIOConcurrencyHelpers
import P2PDHT
import P2PEvaluation
import P2PKernel
import P2PReplication
import P2PStorage
import P2PTesting

/// `p2p sim --check`: a history of concurrent puts, overwrites, removes and gets from many
/// clients while peers leave abruptly and join in waves, datagrams are lost (`--loss`) and the
/// network splits and heals; then, once replication is quiet, every key is read again and the
/// whole history is checked (`ConsistencyChecker`): no acknowledged write lost, no stale or
/// removed value read after settling.
///
/// ```
///  clients (light nodes: no replicas) ── ops: 45 % put (a value no other put writes), 15 % remove, 40 % get
///  faults  ── wave 1 ── partition … heal ── wave 2 ── wave 3   (each wave: `churn` of the peers leave,
///                                                               a tenth at a time, as many join)
///  settle  ── replication quiet ── every key read from a random client ── check
/// ```
struct CheckSim {
    let ops: Int
    let keys: Int
    let concurrency: Int
    let churn: Double
    let waves: Int
    /// Fraction of the peers on one side of the partition; 0: none.
    let partition: Double
    let partitionSeconds: Double
    let policies: PolicyRegistry
    let runtime: SimRuntime
    let makePlugins: @Sendable () -> [any Plugin]

    /// The run's figures.
    struct Report {
        var consistency: ConsistencyReport
        var clients: Int
        var left = 0, joined = 0
        var workloadSeconds = 0.0, settleSeconds = 0.0
        /// Whether replication went quiet (no value moved for five intervals) within `settleLimit`.
        var settled = false
        var opsPerSecond = 0.0
        /// Writes acknowledged by a quorum, of those issued.
        var acknowledgedShare = 0.0
        /// Gets that returned an answer, of those issued.
        var answeredShare = 0.0
    }

    /// Live peers, shared by the workload and the fault driver.
    private final class Peers: @unchecked Sendable {
        private let lock = NIOLock()
        private var nodes: [Node]
        init(_ nodes: [Node]) { self.nodes = nodes }
        var all: [Node] { lock.withLock { nodes } }
        func remove(_ gone: [Node]) { lock.withLock { nodes.removeAll { n in gone.contains { $0 === n } } } }
        func add(_ more: [Node]) { lock.withLock { nodes += more } }
    }

    func run(_ net: Testnet) async throws -> Report {
        let runtime = self.runtime
        let peers = Peers(net.nodes)
        // Clients: light nodes that store nothing, so what survives is what the peers keep.
        // Like the CLI's client commands they say they cannot be reached unsolicited, so no peer
        // maps them, routes lookups to them or counts them in a replica set.
        let clientCount = max(2, min(32, concurrency))
        note("check: \(clientCount) clients join…")
        var clients: [Node] = []
        for _ in 0..<clientCount {
            let seed = net.nodes[runtime.index(net.nodes.count)].address.socket
            let node = try await runtime.builder().maintenance(.seconds(1)).requestTimeout(.seconds(2))
                .flags([.firewalledUDP, .firewalledTCP])
                .plugins([DHTPlugin(acceptsReplicas: false), EvaluationPlugin()])
                .start()
            try await node.bootstrap(to: seed)
            clients.append(node)
        }
        let keySpace = (0..<keys).map { Number640(location: Number160(hashing: "check key \($0)")) }
        let history = NIOLockedValueBox(History())
        // Every choice drawn up front: the run repeats whatever order operations finish in.
        var plan: [(client: Int, key: Int, kind: Int)] = []
        for _ in 0..<ops {
            let roll = runtime.index(100)
            plan.append((runtime.index(clients.count), runtime.index(keys), roll < 45 ? 0 : roll < 60 ? 1 : 2))
        }
        let options = DHTOptions(replicaSet: policies.factor)
        let started = runtime.now()
        let done = NIOLockedValueBox(false)
        note("check: \(ops) operations on \(keys) keys, \(concurrency) in flight, while \(waves) waves of \(Int(churn * 100)) % churn\(partition > 0 ? " and a partition" : "") run…")
        let clientList = clients
        async let faults: (left: Int, joined: Int) = injectFaults(peers: peers, clients: clientList, until: done)
        await withTaskGroup(of: Void.self) { group in
            var next = 0
            func add() {
                let (c, k, kind) = plan[next]
                let n = next
                next += 1
                let client = clients[c], key = keySpace[k]
                group.addTask {
                    let invoked = runtime.now()
                    var op = History.Operation(key: key, kind: .get, invoked: invoked, completed: invoked, outcome: .noAnswer)
                    switch kind {
                    case 0:
                        let value = Array("k\(k)#\(n)".utf8)
                        op.kind = .put(value)
                        let r = try? await client.dht.put(key, value, options: options)
                        op.outcome = r?.isSuccess == true ? .acknowledged : .unknown
                    case 1:
                        op.kind = .remove
                        let removal = StoredValue.tombstone(stamp: client.storage.versions.next())
                        let r = try? await client.dht.put([key: removal], options: options)
                        op.outcome = r?.isSuccess == true ? .acknowledged : .unknown
                    default:
                        if let r = try? await client.dht.get(key) { op.outcome = .read(r.value) }
                    }
                    op.completed = runtime.now()
                    history.withLockedValue { $0.append(op) }
                }
            }
            while next < min(concurrency, plan.count) { add() }
            while await group.next() != nil {
                if next < plan.count { add() }
            }
        }
        done.withLockedValue { $0 = true }
        let (left, joined) = try await faults
        let workloadSeconds = runtime.milliseconds(since: started) / 1000
        note("check: workload done in \(String(format: "%.1f", workloadSeconds)) s; waiting for replication to be quiet…")
        let settleStart = runtime.now()
        let settled = try await settle()
        let settledAt = runtime.now()
        let settleSeconds = runtime.milliseconds(since: settleStart) / 1000
        note(settled ? "check: quiet after \(String(format: "%.1f", settleSeconds)) s; reading every key…"
                     : "check: replication still moving values \(Int(Self.settleLimit)) s after the workload; reading every key…")
        await withTaskGroup(of: Void.self) { group in
            var next = 0
            func add() {
                let key = keySpace[next]
                let client = clients[next % clients.count]
                next += 1
                group.addTask {
                    let invoked = runtime.now()
                    let r = try? await client.dht.get(key)
                    let op = History.Operation(key: key, kind: .get, invoked: invoked, completed: runtime.now(),
                                               outcome: r.map { .read($0.value) } ?? .noAnswer)
                    history.withLockedValue { $0.append(op) }
                }
            }
            while next < min(concurrency, keySpace.count) { add() }
            while await group.next() != nil {
                if next < keySpace.count { add() }
            }
        }
        let all = history.withLockedValue { $0 }
        let consistency = ConsistencyChecker.check(all, settledAt: settledAt)
        let writes = all.operations.filter { if case .get = $0.kind { return false } else { return true } }
        let gets = all.operations.filter { if case .get = $0.kind { return true } else { return false } }
        var report = Report(consistency: consistency, clients: clients.count, left: left, joined: joined)
        report.workloadSeconds = workloadSeconds
        report.settleSeconds = settleSeconds
        report.settled = settled
        report.opsPerSecond = Double(ops) / max(workloadSeconds, 1e-9)
        report.acknowledgedShare = Double(writes.filter { $0.outcome == .acknowledged }.count) / Double(max(1, writes.count))
        report.answeredShare = Double(gets.filter { $0.outcome != .noAnswer }.count) / Double(max(1, gets.count))
        note("check: \(consistency)")
        // Where each wrong key's versions live now: by rank among the live peers (0: closest).
        let live = peers.all
        for f in consistency.findings.prefix(10) {
            note("  \(f)")
            let ranked = live.sorted { f.read.key.location.isCloser($0.peerID, than: $1.peerID) }
            for (rank, n) in ranked.enumerated() {
                guard let v = n.registry.storageBackend?.replicaEntries([f.read.key], now: n.clock.uptimeNanoseconds)[f.read.key] else { continue }
                note("    rank \(rank): \(v.isTombstone ? "removal" : String(decoding: v.value, as: UTF8.self)) stamp \(VersionStamp.millis(v.stamp))")
            }
        }
        return report
    }

    /// The fault schedule: a wave, the partition and its healing, the other waves, each a few
    /// seconds apart, while the workload runs (stopping early when it is done).
    private func injectFaults(peers: Peers, clients: [Node], until done: NIOLockedValueBox<Bool>) async throws -> (left: Int, joined: Int) {
        var left = 0, joined = 0
        for wave in 1...max(1, waves) {
            try await runtime.sleep(for: .seconds(5))
            if done.withLockedValue({ $0 }) { break }
            let (l, j) = try await churnWave(peers)
            left += l
            joined += j
            note("check: wave \(wave): \(l) left, \(j) joined")
            if wave == 1, partition > 0, let network = runtime.network {
                try await runtime.sleep(for: .seconds(5))
                var rng = runtime.random.generator
                let everyone = (peers.all + clients).shuffled(using: &rng)
                let cut = max(1, min(everyone.count - 1, Int((Double(everyone.count) * partition).rounded())))
                let hostOf: (Node) -> SimHost? = { IPAddress($0.config.host).flatMap(network.host(at:)) }
                network.partition([everyone.prefix(cut).compactMap(hostOf), everyone.dropFirst(cut).compactMap(hostOf)])
                note("check: partition \(cut) / \(everyone.count - cut) for \(Int(partitionSeconds)) s")
                try await runtime.sleep(for: .seconds(partitionSeconds))
                network.heal()
                note("check: partition healed")
            }
        }
        return (left, joined)
    }

    /// `churn` of the live peers leave without a word, a tenth of them each second, and as many
    /// new ones join through random survivors.
    private func churnWave(_ peers: Peers) async throws -> (Int, Int) {
        var rng = runtime.random.generator
        let live = peers.all.shuffled(using: &rng)
        let leaving = min(live.count - 1, Int((Double(live.count) * churn).rounded()))
        guard leaving > 0 else { return (0, 0) }
        let gone = Array(live.prefix(leaving))
        let step = max(1, leaving / 10)
        var at = 0
        while at < gone.count {
            let batch = Array(gone[at..<min(gone.count, at + step)])
            at += batch.count
            peers.remove(batch)
            for n in batch { await n.shutdown(announce: false) }
            try await runtime.sleep(for: .seconds(1))
        }
        let survivors = peers.all
        let runtime = self.runtime
        let plugins = makePlugins
        let seeds = (0..<leaving).map { _ in survivors[runtime.index(survivors.count)].address.socket }
        let newcomers: [Node] = await withTaskGroup(of: Node?.self) { group in
            var out: [Node] = []
            var next = 0
            func add() {
                let seed = seeds[next]
                next += 1
                group.addTask {
                    guard let node = try? await runtime.builder().maintenance(.seconds(1)).requestTimeout(.seconds(2)).plugins(plugins()).start() else { return nil }
                    do {
                        try await node.bootstrap(to: seed)
                        return node
                    } catch {
                        await node.shutdown()
                        return nil
                    }
                }
            }
            while next < min(64, seeds.count) { add() }
            while let n = await group.next() {
                if let n { out.append(n) }
                if next < seeds.count { add() }
            }
            return out
        }
        peers.add(newcomers)
        return (leaving, newcomers.count)
    }

    /// Virtual seconds replication may take to go quiet after the workload (300).
    static let settleLimit = 300.0

    /// Waits until replication has been quiet — no value sent, no push failed — for five
    /// intervals; false if it was not within `settleLimit`. (An overlay whose faults are over
    /// must stop moving copies: views that disagree for good would send them back and forth.)
    private func settle() async throws -> Bool {
        defer { note("check: replication so far: \(policies.total)") }
        let start = runtime.now()
        var last = policies.sent.activity
        var quietSince = runtime.now()
        let quiet = Double(policies.interval.components.seconds) * 1000 + Double(policies.interval.components.attoseconds) / 1e15
        var lastNote = runtime.now()
        while runtime.milliseconds(since: start) < Self.settleLimit * 1000 {
            try await runtime.sleep(for: .milliseconds(200))
            if runtime.milliseconds(since: lastNote) >= 30_000 {
                lastNote = runtime.now()
                note("check: settling: \(policies.total)")
            }
            let now = policies.sent.activity
            if now != last {
                last = now
                quietSince = runtime.now()
            } else if runtime.milliseconds(since: quietSince) >= quiet * 5 {
                return true
            }
        }
        return false
    }
}
