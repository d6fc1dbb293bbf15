import ArgumentParser
import P2PSQLite
import P2PStatus
import Crypto
import Foundation
import NIOCore
import P2PKernel
import P2PLoader
import P2PDHT
import P2PReplication
import P2PStorage
import P2PTesting

struct SimCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sim",
        abstract: "Start N peers in this process, bootstrap them, run lookups and compare each with the true k closest."
    )

    @Option(help: "How many peers. Above 1,000 they run on the simulated network unless --network sockets; above 20,000 simulated peers run without sessions unless --secure.")
    var peers: Int = 500

    @Option(help: "How many lookups for random keys, from random peers, one after another.")
    var lookups: Int = 1000

    @Flag(help: "Fill every peer map with every peer instead of bootstrapping.")
    var perfect = false

    @Option(help: "How many peers bootstrap at once (16 on sockets, 64 on the simulated network).")
    var joinConcurrency: Int?

    @Option(help: "DHT operations per phase: sequential puts and gets (on sockets), then puts, gets, signed puts and signed gets with --concurrency in flight (0 skips them).")
    var ops: Int = 0

    @Option(help: "Operations in flight in the concurrent put and get phases.")
    var concurrency: Int = 32

    @Option(help: "Bytes per stored value.")
    var valueSize: Int = 100

    @Option(help: "Built-in plugins of every peer when --ops is given, comma-separated.")
    var plugins: String = BuiltInPlugins.names.joined(separator: ",")

    @Option(name: .customLong("plugin"), help: "A plugin file (.so or .wasm) every peer loads (repeatable).")
    var pluginFiles: [String] = []

    @Option(help: "Domain of the keys the operations use (hashed like a key; default zero).")
    var domain: String?

    @Option(help: "A fixed value for every put instead of random bytes (e.g. 1 for vote domains).")
    var value: String?

    @Option(help: "α: lookup requests in flight at once.")
    var parallel: Int = RoutingConfig().parallel

    @Flag(help: "Print one JSON object instead of a summary.")
    var json = false

    @Option(help: "Where every peer stores values with --ops: memory (the default) or sqlite:DIR (one SQLite file per peer in DIR, made if missing).")
    var storage: StorageArgument = .memory

    @Option(name: .customLong("storage-sync"), help: "With sqlite storage: full (acknowledged once on disk; the default) or normal (once handed to the OS).")
    var storageSync: StorageSyncArgument = .full

    @Flag(help: "Run every peer without sessions (plaintext, unauthenticated), to compare with the default.")
    var insecure = false

    @Flag(help: "Authenticated sessions even above \(SimCommand.plaintextAbove) simulated peers (where they are off unless asked for: see --help of --peers).")
    var secure = false

    /// Above this many simulated peers sessions are off unless `--secure`: a handshake costs about
    /// 0.3 ms of CPU on each side and a peer makes ~50 when it joins, so 100,000 peers would spend
    /// ~25 minutes of one core on handshakes alone (measured: 10,000 secure peers 217 s, plaintext 25 s).
    static let plaintextAbove = 20_000

    /// Authenticated unless `--insecure`, or a simulation above `plaintextAbove` peers without `--secure`.
    var security: SecurityMode {
        if insecure { return .insecure }
        if secure { return .authenticated }
        return resolvedNetwork == .simulated && peers > Self.plaintextAbove ? .insecure : .authenticated
    }

    @Flag(help: "Every peer records its metrics into a Prometheus registry of its own (as p2p node --metrics does), to measure what recording costs.")
    var metrics = false

    @Option(help: "Values to store before churn (0: no churn phase). Every peer then runs indirect replication (n-root).")
    var values: Int = 0

    @Option(help: "Fraction of the peers that leave abruptly (no quit) in each wave, as many new ones joining.")
    var churn: Double = 0.3

    @Option(name: .customLong("churn-waves"), help: "Waves of churn.")
    var churnWaves: Int = 1

    @Option(name: .customLong("replication-factor"), help: "Copies of each value (with --values).")
    var replicationFactor: Int = 6

    @Option(name: .customLong("replication-interval"), help: "Seconds between replication rounds (with --values).")
    var replicationInterval: Double = 2

    @Option(help: "What the peers run on: simulated (one thread, virtual time; the default above 1,000 peers) or sockets (real UDP and TCP on 127.0.0.1).")
    var network: NetworkArgument?

    @Option(help: "Seed of every random choice on the simulated network: ids, keys, addresses, latencies, losses and the workloads. The same seed repeats a run exactly. Default: a fresh one, printed.")
    var seed: UInt64?

    @Option(help: "Round trip on the simulated network: a constant (50ms), a range drawn per link (20ms-200ms), or world (peers spread over the world's regions, with real-world round trips between them).")
    var rtt: LatencyModel = .world

    @Option(help: "Simulated network: fraction of datagrams lost (each lost TCP segment delays its frame instead).")
    var loss: Double = 0

    @Option(help: "Simulated network: fraction of datagrams delivered twice.")
    var duplicate: Double = 0

    @Option(help: "Simulated network: extra delay per datagram, up to this many milliseconds (reorders them).")
    var jitter: Double = 0

    @Option(help: "Simulated network: after the other phases, split the peers in two — this fraction on one side — for --partition-seconds, run lookups during it and after it heals.")
    var partition: Double?

    @Option(name: .customLong("partition-seconds"), help: "Virtual seconds the partition lasts.")
    var partitionSeconds: Double = 60

    @Flag(help: "Run the consistency check: --check-ops puts, removes and gets from many clients on --check-keys keys while --churn-waves waves of --churn run, a partition (--partition, 0.3 by default) splits the network and heals, and datagrams are lost (--loss); then every key is read and the history checked. Exits 1 when an acknowledged write was lost or a stale or removed value was read after settling, or when replication still moved values \(Int(CheckSim.settleLimit)) virtual seconds after the workload.")
    var check = false

    @Option(name: .customLong("check-ops"), help: "Operations of the consistency check.")
    var checkOps: Int = 2_000

    @Option(name: .customLong("check-keys"), help: "Keys the consistency check's operations share (default: one per ten operations).")
    var checkKeys: Int?

    /// The network this run uses: simulated above 1,000 peers unless told.
    var resolvedNetwork: NetworkArgument { network ?? (peers > 1_000 ? .simulated : .sockets) }

    func validate() throws {
        guard peers >= 1 else { throw ValidationError("--peers must be at least 1, got \(peers)") }
        guard lookups >= 0 else { throw ValidationError("--lookups must not be negative, got \(lookups)") }
        guard ops >= 0 else { throw ValidationError("--ops must not be negative, got \(ops)") }
        guard (1...4096).contains(concurrency) else { throw ValidationError("--concurrency must be from 1 to 4096, got \(concurrency)") }
        guard (0...(1 << 20)).contains(valueSize) else { throw ValidationError("--value-size must be from 0 to 1048576") }
        guard (1...64).contains(parallel) else { throw ValidationError("--parallel must be from 1 to 64, got \(parallel)") }
        guard (joinConcurrency ?? 1) >= 1 else { throw ValidationError("--join-concurrency must be at least 1") }
        guard (0...100_000).contains(values) else { throw ValidationError("--values must be from 0 to 100000, got \(values)") }
        guard churn >= 0, churn < 1 else { throw ValidationError("--churn must be from 0 to below 1, got \(churn)") }
        guard (1...100).contains(churnWaves) else { throw ValidationError("--churn-waves must be from 1 to 100, got \(churnWaves)") }
        guard (1...20).contains(replicationFactor) else { throw ValidationError("--replication-factor must be from 1 to 20, got \(replicationFactor)") }
        guard replicationInterval >= 0.1, replicationInterval <= 3_600 else { throw ValidationError("--replication-interval must be from 0.1 to 3600 seconds") }
        guard values == 0 || peers >= 2 else { throw ValidationError("churn needs at least 2 peers") }
        guard (0...1).contains(loss) else { throw ValidationError("--loss must be from 0 to 1, got \(loss)") }
        guard (0...1).contains(duplicate) else { throw ValidationError("--duplicate must be from 0 to 1, got \(duplicate)") }
        guard (0...10_000).contains(jitter) else { throw ValidationError("--jitter must be from 0 to 10000 ms, got \(jitter)") }
        if let partition { guard partition > 0, partition < 1 else { throw ValidationError("--partition must be between 0 and 1, got \(partition)") } }
        guard (1...86_400).contains(partitionSeconds) else { throw ValidationError("--partition-seconds must be from 1 to 86400") }
        guard (1...1_000_000).contains(checkOps) else { throw ValidationError("--check-ops must be from 1 to 1000000, got \(checkOps)") }
        if let checkKeys { guard (1...1_000_000).contains(checkKeys) else { throw ValidationError("--check-keys must be from 1 to 1000000, got \(checkKeys)") } }
        guard !check || values == 0 else { throw ValidationError("--check and --values are separate runs: give one") }
        guard !check || peers >= 8 else { throw ValidationError("--check needs at least 8 peers") }
        if resolvedNetwork == .sockets {
            let simulatedOnly = [(seed != nil, "--seed"), (loss > 0, "--loss"), (duplicate > 0, "--duplicate"), (jitter > 0, "--jitter"),
                                 (partition != nil, "--partition")].filter(\.0).map(\.1)
            guard simulatedOnly.isEmpty else {
                throw ValidationError("\(simulatedOnly.joined(separator: ", ")) need the simulated network (--network simulated)")
            }
        }
        guard !(secure && insecure) else { throw ValidationError("--secure and --insecure exclude each other") }
        guard resolvedNetwork == .sockets || storage == .memory else { throw ValidationError("--storage sqlite needs --network sockets") }
        guard resolvedNetwork == .sockets || pluginFiles.isEmpty else { throw ValidationError("--plugin needs --network sockets") }
    }

    func run() async throws {
        let wall = ContinuousClock()
        let started = wall.now
        let cpuBefore = processCPUSeconds()
        guard resolvedNetwork == .simulated else {
            // Each peer holds a UDP and a TCP socket; connections and the process take some more.
            let needed = peers * 2 + 256
            let limit = raiseOpenFileLimit(toAtLeast: needed)
            guard limit.soft >= needed else {
                throw CLIError.failed("\(peers) peers on sockets need about \(needed) open files, this process may open \(limit.soft) (hard limit \(limit.hard)): raise it (ulimit -Hn \(needed) as root, then run again) or use --network simulated")
            }
            let runtime = SimRuntime(network: nil, random: RandomSource())
            let report = try await execute(runtime)
            return try output(report, wallSeconds: (wall.now - started).seconds, cpuSeconds: processCPUSeconds() - cpuBefore)
        }
        ensureDeterministicHashing()
        let seed = self.seed ?? UInt64.random(in: 1...999_999)
        note("simulated network, seed \(seed) (repeat with --seed \(seed))")
        if security == .insecure, !insecure {
            note("sessions off above \(Self.plaintextAbove) simulated peers (handshake CPU would dominate the run); --secure turns them on")
        }
        let conditions = LinkConditions(latency: rtt, loss: loss, duplicate: duplicate, jitter: .nanoseconds(Int64(jitter * 1e6)))
        let net = SimulatedNetwork(seed: seed, conditions: conditions)
        let runtime = SimRuntime(network: net, random: RandomSource(seed: seed ^ 0xD81E))
        var report: SimReport
        do {
            report = try await net.run { try await self.execute(runtime) }
        } catch {
            net.stop()
            throw CLIError.failed("\(error) (seed \(seed))")
        }
        report.simulation = SimulationFacts(seed: seed, rtt: "\(rtt)", loss: loss, duplicate: duplicate, jitterMilliseconds: jitter,
                                            virtualSeconds: net.elapsed.seconds, stats: net.stats,
                                            foreignJobs: net.loop.foreignSubmissions)
        net.stop()
        try output(report, wallSeconds: (wall.now - started).seconds, cpuSeconds: processCPUSeconds() - cpuBefore)
    }

    private func output(_ report: SimReport, wallSeconds: Double, cpuSeconds: Double) throws {
        var r = report
        r.wallSeconds = wallSeconds
        r.cpuSeconds = cpuSeconds
        print(json ? r.json() : r.summary())
        if let c = r.check?.consistency, !c.isValid {
            throw CLIError.failed("the consistency check failed: \(c.findings.count) findings")
        }
        if let c = r.check, !c.settled {
            throw CLIError.failed("the consistency check failed: replication still moved values \(Int(CheckSim.settleLimit)) s after the workload")
        }
    }

    /// Every phase of the run, on sockets or on the simulated network.
    func execute(_ runtime: SimRuntime) async throws -> SimReport {
        var sqliteBackends: [SQLiteStorage] = []
        let rssBefore = residentMemoryBytes() ?? 0
        note("starting \(peers) peers…")
        let net: Testnet
        let policies = PolicyRegistry(factor: replicationFactor, interval: .milliseconds(Int(replicationInterval * 1000)))
        let replicating = values > 0 || check
        do {
            var chosen = ops > 0 ? plugins.split(separator: ",").map(String.init).filter { !$0.isEmpty } : []
            if replicating { for p in ["dht", "evaluation"] where !chosen.contains(p) { chosen.append(p) } }
            let names = chosen
            _ = try BuiltInPlugins.make(names, peerID: { "" })
            for file in pluginFiles {
                do { _ = try PluginFile.load(file) } catch { throw CLIError.usage("\(error)") }
            }
            let files = pluginFiles
            let security = self.security
            var stores: [SQLiteStorage] = []
            if case .sqlite(let dir) = storage {
                guard chosen.contains("dht") else { throw CLIError.usage("--storage sqlite:DIR needs the dht plugin (and --ops)") }
                do { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) } catch {
                    throw CLIError.usage("cannot make \(dir): \(error.localizedDescription)")
                }
                let sync: SQLiteDatabase.Sync = storageSync == .full ? .full : .normal
                for i in 0..<peers {
                    let path = "\(dir)/peer-\(i).db"
                    try? FileManager.default.removeItem(atPath: path)
                    do { stores.append(try SQLiteStorage(path: path, sync: sync)) } catch { throw CLIError.failed("\(error)") }
                }
            }
            let sqliteStores = stores
            sqliteBackends = stores
            let recordMetrics = metrics
            net = try await Testnet.start(peers: peers, routing: perfect ? .perfect : .bootstrap,
                                          joinConcurrency: joinConcurrency ?? (runtime.isSimulated ? 64 : 16), network: runtime.network,
                                          plugins: { i in
                                              ((try? BuiltInPlugins.make(names, peerID: { "" }, backend: sqliteStores.isEmpty ? nil : sqliteStores[i])) ?? [])
                                                  + files.compactMap { try? PluginFile.load($0) }
                                                  + (replicating ? [ReplicationPlugin(policies.make())] : [])
                                          },
                                          configure: { _, config in
                                              config.security = security
                                              if recordMetrics { config.metrics = MetricsExporter().factory }
                                              // Replicating peers run as real nodes do: they ping
                                              // their peers now and then and notice the dead.
                                              if replicating { config.maintenanceInterval = .seconds(1) }
                                          },
                                          progress: { phase, done, total in note("  \(phase): \(done)/\(total)") })
        } catch let error as CLIError {
            throw error
        } catch {
            throw CLIError.failed("could not start the network: \(error)")
        }
        let rssAfter = residentMemoryBytes() ?? 0
        let bootstrapHandshakes = net.nodes.reduce(0) { $0 + $1.handshakesCompleted } / 2
        let memoryPerPeerKiB = Double(max(0, rssAfter - rssBefore)) / Double(peers) / 1024
        note("bootstrapped \(peers) peers in \(String(format: "%.2f", net.bootstrapSeconds)) \(runtime.isSimulated ? "virtual " : "")s; running \(lookups) lookups…")

        var routing = RoutingConfig()
        routing.parallel = parallel
        let measured = peers > 1 ? await LookupPhase.run(net, count: lookups, routing: routing, runtime: runtime, progress: true) : LookupPhase()
        let lookupHandshakes = net.nodes.reduce(0) { $0 + $1.handshakesCompleted } / 2 - bootstrapHandshakes
        var phases: [String: PhaseReport] = [:]
        if ops > 0 {
            let workload = DHTWorkload(net: net, ops: ops, valueSize: valueSize, domain: try domain.map(parseKey) ?? .zero,
                                       fixedValue: value.map { Array($0.utf8) }, runtime: runtime)
            // The signed phases store values signed by a user key, with the request's writer proof
            // and entry protection, and read them back verifying each signature: the cost of the
            // security model beside the unsigned phases of the same run.
            let signer = (try? Curve25519.Signing.PrivateKey(rawRepresentation: runtime.random.bytes(32))) ?? Curve25519.Signing.PrivateKey()
            let plan: [(String, Bool, Bool, Curve25519.Signing.PrivateKey?)] = [
                ("seq_put", false, true, nil), ("seq_get", false, false, nil), ("put", true, true, nil), ("get", true, false, nil),
                ("signed_put", true, true, signer), ("signed_get", true, false, signer),
            ]
            // On the simulated network nothing contends for CPU, so one operation at a time
            // measures what many at once do, only slower: the sequential phases run on sockets only.
            for (name, concurrent, isPut, key) in plan where concurrent || !runtime.isSimulated {
                note("\(name): \(ops) operations\(concurrent ? ", \(concurrency) in flight" : ", one at a time")…")
                let before = net.nodes.reduce(0) { $0 + $1.handshakesCompleted }
                let cpu = processCPUSeconds()
                phases[name] = await workload.run(isPut: isPut, concurrency: concurrent ? concurrency : 1,
                                                  keySet: key != nil ? 2 : concurrent ? 1 : 0, signer: key)
                phases[name]?.cpuMicrosecondsPerOp = (processCPUSeconds() - cpu) * 1e6 / Double(ops)
                phases[name]?.handshakes = (net.nodes.reduce(0) { $0 + $1.handshakesCompleted } - before) / 2
            }
        }
        var churnReport: [ChurnWave]?
        var checkReport: CheckSim.Report?
        var live = net.nodes
        if check {
            let names = ["dht", "evaluation"]
            let sim = CheckSim(ops: checkOps, keys: checkKeys ?? max(1, checkOps / 10), concurrency: concurrency, churn: churn, waves: churnWaves,
                               partition: runtime.isSimulated ? (partition ?? 0.3) : 0, partitionSeconds: partitionSeconds,
                               policies: policies, runtime: runtime, makePlugins: {
                                   ((try? BuiltInPlugins.make(names, peerID: { "" })) ?? []) + [ReplicationPlugin(policies.make())]
                               })
            checkReport = try await sim.run(net)
        } else if replicating {
            let names = ["dht", "evaluation"]
            let sim = ChurnSim(values: values, churn: churn, waves: churnWaves, valueSize: valueSize, policies: policies, runtime: runtime, makePlugins: {
                ((try? BuiltInPlugins.make(names, peerID: { "" })) ?? []) + [ReplicationPlugin(policies.make())]
            })
            let (waves, survivors) = try await sim.run(net)
            churnReport = waves
            live = survivors
        }
        var partitionReport: PartitionReport?
        if !check, let fraction = partition, let network = runtime.network {
            partitionReport = try await PartitionPhase(fraction: fraction, seconds: partitionSeconds, lookups: min(max(lookups, 100), 1_000))
                .run(live, network: network, runtime: runtime, routing: routing)
        }
        let verified = live.map { $0.peerMap.counts.verified }
        note("shutting down…")
        if runtime.isSimulated {
            // Nothing to release: the whole network goes when its loop stops.
        } else {
            await net.shutdown()
            for n in live where !net.nodes.contains(where: { $0 === n }) { await n.shutdown() }
        }
        for store in sqliteBackends { store.close() }
        let footprint = ops > 0 && !runtime.isSimulated ? try storageFootprint() : nil

        return SimReport(
            peers: peers,
            network: runtime.isSimulated ? "simulated" : "sockets",
            bootstrapSeconds: net.bootstrapSeconds,
            bootstrapHandshakes: bootstrapHandshakes,
            lookupHandshakes: lookupHandshakes,
            secure: security == .authenticated,
            lookup: measured,
            memoryPerPeerKiB: memoryPerPeerKiB,
            rssMiB: Double(rssAfter) / 1_048_576,
            verifiedMean: Double(verified.reduce(0, +)) / Double(max(1, verified.count)),
            phases: phases,
            footprint: footprint,
            churn: churnReport.map { ChurnReport(churn: churn, factor: replicationFactor, values: values, waves: $0) },
            partition: partitionReport,
            check: checkReport
        )
    }

    /// Resident bytes per stored 100-byte entry in a memory backend: 100,000 unsigned entries,
    /// then 100,000 signed and protected ones (each in a fresh backend, measured by RSS growth).
    func storageFootprint() throws -> StorageFootprint {
        let n = 100_000
        let key = Curve25519.Signing.PrivateKey()
        let value = Array(repeating: UInt8(42), count: 100)
        func measure(signed: Bool) throws -> Double {
            var rng = SystemRandomNumberGenerator()
            let keys = (0..<n).map { _ in Number640(location: .random(using: &rng)) }
            let values = try keys.map { k -> StoredValue in
                signed ? try StoredValue(value, protectEntry: true).signed(at: k, by: key) : StoredValue(value)
            }
            // Freed memory of earlier phases goes back to the system first, so that what grows
            // is this backend's.
            #if os(Linux)
            _ = glibcMallocTrim(0)
            #endif
            let before = residentMemoryBytes() ?? 0
            let store = MemoryStorage()
            let writer: SignerKey? = signed ? SignerKey(key.publicKey) : nil
            for (k, v) in zip(keys, values) { _ = try store.execute(.put([k: v], mode: .overwrite), writer: writer, now: 1) }
            let after = residentMemoryBytes() ?? 0
            withExtendedLifetime(store) {}
            return Double(max(0, after - before)) / Double(n)
        }
        return StorageFootprint(unsigned: try measure(signed: false), signed: try measure(signed: true))
    }
}

/// Measured resident bytes per stored 100-byte entry.
struct StorageFootprint {
    var unsigned: Double
    var signed: Double
}

func percentile(_ sorted: [Double], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    let i = min(sorted.count - 1, max(0, Int((Double(sorted.count) * p).rounded(.up)) - 1))
    return sorted[i]
}

struct SimReport {
    var peers: Int
    var network: String
    var bootstrapSeconds: Double
    var bootstrapHandshakes: Int
    var lookupHandshakes: Int
    var secure: Bool
    var lookup: LookupPhase
    var memoryPerPeerKiB: Double
    var rssMiB: Double
    var verifiedMean: Double
    var phases: [String: PhaseReport]
    var footprint: StorageFootprint?
    var churn: ChurnReport?
    var partition: PartitionReport?
    var check: CheckSim.Report?
    var simulation: SimulationFacts?
    var wallSeconds = 0.0
    var cpuSeconds = 0.0

    /// One JSON object. On the simulated network every time is virtual and every figure repeats
    /// with the seed, except those whose keys name the machine: `wall`, `cpu`, `memory`, `rss`.
    func json() -> String {
        func r(_ v: Double, _ digits: Int = 4) -> Double { (v * pow(10, Double(digits))).rounded() / pow(10, Double(digits)) }
        var object: [String: Any] = [
            "peers": peers,
            "network": network,
            "bootstrap_s": r(bootstrapSeconds, 3),
            "bootstrap_handshakes": bootstrapHandshakes,
            "secure": secure,
            "lookup": lookup.json(r) .merging(["handshakes": lookupHandshakes]) { a, _ in a },
            "memory_per_peer_kib": r(memoryPerPeerKiB, 2),
            "rss_mib": r(rssMiB, 1),
            "verified_peers_mean": r(verifiedMean, 1),
            "wall_s": r(wallSeconds, 2),
            "cpu_s": r(cpuSeconds, 2),
        ]
        for (name, p) in phases {
            object[name] = ["ops": p.ops, "ops_per_s": r(p.opsPerSecond, 1), "p50_ms": r(p.p50), "p95_ms": r(p.p95),
                            "p99_ms": r(p.p99), "success_rate": r(p.successRate, 5), "concurrency": p.concurrency,
                            "handshakes": p.handshakes, "cpu_us_per_op": r(p.cpuMicrosecondsPerOp, 1)] as [String: Any]
        }
        if let put = phases["put"], let sput = phases["signed_put"], let get = phases["get"], let sget = phases["signed_get"] {
            object["signed_vs_unsigned"] = ["put": r(sput.opsPerSecond / max(put.opsPerSecond, 1e-9), 3),
                                            "get": r(sget.opsPerSecond / max(get.opsPerSecond, 1e-9), 3)]
        }
        if let footprint {
            object["storage_memory_bytes_per_100_byte_entry"] = ["unsigned": r(footprint.unsigned, 0), "signed": r(footprint.signed, 0)]
        }
        if let churn {
            object["churn"] = [
                "fraction": churn.churn, "factor": churn.factor, "values": churn.values, "waves": churn.waves.count,
                "retrievable": r(churn.retrievable, 5), "replicas_mean": r(churn.replicasMean, 3),
                "replication_bytes_per_value_per_wave": r(churn.bytesPerValuePerWave, 1),
                "per_wave": churn.waves.map { w in
                    ["left": w.left, "joined": w.joined, "retrievable": r(w.retrievable, 5), "replicas_mean": r(w.replicasMean, 3),
                     "replication_bytes_per_value": r(w.bytesPerValue, 1), "settle_s": r(w.settleSeconds, 2)] as [String: Any]
                },
            ] as [String: Any]
        }
        if let partition { object["partition"] = partition.json(r) }
        if let check {
            let c = check.consistency
            object["check"] = [
                "operations": c.operations, "acknowledged_writes": c.acknowledgedWrites, "settled_reads": c.settledReads,
                "lost_writes": c.count(.lostWrite), "stale_reads": c.count(.staleRead), "resurrected": c.count(.resurrected),
                "phantoms": c.count(.phantom), "stale_during_faults": c.staleDuringFaults, "clients": check.clients,
                "left": check.left, "joined": check.joined, "workload_s": r(check.workloadSeconds, 2), "settle_s": r(check.settleSeconds, 2),
                "ops_per_second": r(check.opsPerSecond, 1), "acknowledged_share": r(check.acknowledgedShare, 4),
                "answered_share": r(check.answeredShare, 4), "valid": c.isValid, "settled": check.settled,
            ] as [String: Any]
        }
        if let simulation { object["simulation"] = simulation.json(r) }
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }

    func summary() -> String {
        func f(_ v: Double, _ d: Int = 3) -> String { String(format: "%.\(d)f", v) }
        let virtual = simulation != nil
        let unit = virtual ? "virtual " : ""
        let place = simulation.map { "on the simulated network (seed \($0.seed), \($0.rtt)\($0.loss > 0 ? ", \(f($0.loss * 100, 1)) % loss" : ""))" }
            ?? "on sockets in one process"
        let l = lookup
        return """
        SwiftP2P simulation: \(peers) peers \(place)
          bootstrap     \(f(bootstrapSeconds, 2)) \(unit)s (every peer pinged the seed and looked up its own id; \(secure ? "\(bootstrapHandshakes) handshakes" : "insecure: no sessions"))
          peer maps     \(f(verifiedMean, 1)) verified peers each on average
          lookups       \(l.count) done, \(l.failed) failed
          latency       p50 \(f(l.p50)) ms · p95 \(f(l.p95)) ms · p99 \(f(l.p99)) ms\(virtual ? " (virtual)" : "")
          per lookup    \(f(l.hopsMean, 2)) hops · \(f(l.messagesMean, 1)) messages
          recall        \(f(l.recall, 4)) of the true 20 closest on average (median \(f(l.recallMedian, 2)), worst \(f(l.recallMin, 2)))
          memory        \(f(memoryPerPeerKiB, 1)) KiB per peer (RSS \(f(rssMiB, 1)) MiB)
          machine       \(f(wallSeconds, 1)) s wall, \(f(cpuSeconds, 1)) s CPU\(simulation.map { " for \(f($0.virtualSeconds, 1)) s of virtual time" } ?? "")
        """ + ["seq_put", "seq_get", "put", "get", "signed_put", "signed_get"].compactMap { name in
            phases[name].map { p in
                "\n  \(name.padding(toLength: 12, withPad: " ", startingAt: 0))  \(f(p.opsPerSecond, 0)) ops/s with \(p.concurrency) in flight · p50 \(f(p.p50)) ms · p95 \(f(p.p95)) ms · p99 \(f(p.p99)) ms · success \(f(p.successRate * 100, 2)) %"
            }
        }.joined() + (footprint.map { "\n  storage       \(f($0.unsigned, 0)) bytes per stored 100-byte entry (\(f($0.signed, 0)) signed and protected)" } ?? "")
            + (churn.map { c in
                "\n  churn         \(c.waves.count) waves of \(f(c.churn * 100, 0)) %: \(f(c.retrievable * 100, 2)) % of \(c.values) values retrievable (worst wave), "
                    + "\(f(c.replicasMean, 2)) replicas on average (factor \(c.factor)), \(f(c.bytesPerValuePerWave, 0)) replication bytes per value per wave"
            } ?? "")
            + (partition.map { p in
                "\n  partition     \(f(p.fraction * 100, 0)) % / \(f(100 - p.fraction * 100, 0)) % for \(f(p.seconds, 0)) s: recall \(f(p.during.recall, 4)) during "
                    + "(of the reachable side), \(f(p.after.recall, 4)) after healing; lookup p50 \(f(p.during.p50)) ms during, \(f(p.after.p50)) ms after"
            } ?? "")
            + (check.map { c in
                "\n  check         \(c.consistency.isValid ? "VALID" : "INVALID"): \(c.consistency)"
                    + "\n                \(c.left) left, \(c.joined) joined; \(f(c.acknowledgedShare * 100, 2)) % of writes acknowledged, \(f(c.answeredShare * 100, 2)) % of gets answered; "
                    + "\(f(c.opsPerSecond, 1)) ops/s over \(f(c.workloadSeconds, 1)) s, "
                    + (c.settled ? "quiet \(f(c.settleSeconds, 1)) s later" : "NOT QUIET: values still moving \(f(c.settleSeconds, 0)) s later")
            } ?? "")
    }
}

/// One measured phase of DHT operations.
struct PhaseReport: Sendable {
    var ops: Int
    var concurrency: Int
    var opsPerSecond: Double
    var p50: Double, p95: Double, p99: Double
    var successRate: Double
    /// Sessions opened during the phase (handshakes, counted once per pair).
    var handshakes = 0
    /// CPU time of the whole process per operation (every peer's share of it).
    var cpuMicrosecondsPerOp = 0.0
}

/// Puts and gets of random keys with fixed-size values from random peers; gets read back what
/// the put phase of the same kind wrote and count a wrong or missing value as a failure.
final class DHTWorkload: @unchecked Sendable {
    let net: Testnet
    let ops: Int
    let keys: [[Number640]]
    let values: [[[UInt8]]]
    let runtime: SimRuntime

    init(net: Testnet, ops: Int, valueSize: Int, domain: Number160 = .zero, fixedValue: [UInt8]? = nil, runtime: SimRuntime) {
        self.net = net
        self.ops = ops
        self.runtime = runtime
        var rng = runtime.random.generator
        keys = (0..<3).map { _ in (0..<ops).map { _ in Number640(location: .random(using: &rng), domain: domain) } }
        values = (0..<3).map { _ in (0..<ops).map { _ in fixedValue ?? runtime.random.bytes(valueSize) } }
    }

    func run(isPut: Bool, concurrency: Int, keySet: Int, signer: Curve25519.Signing.PrivateKey? = nil) async -> PhaseReport {
        let options = signer.map { DHTOptions(signer: $0, protect: .entry) } ?? DHTOptions()
        let runtime = self.runtime
        let start = runtime.now()
        let results = await withTaskGroup(of: (Double, Bool).self) { group in
            var out: [(Double, Bool)] = []
            out.reserveCapacity(ops)
            var next = 0
            func add() {
                let i = next
                next += 1
                let node = net.nodes[runtime.index(net.nodes.count)]
                let key = keys[keySet][i], value = values[keySet][i]
                group.addTask {
                    let t0 = runtime.now()
                    let ok: Bool
                    if isPut {
                        ok = (try? await node.dht.put(key, value, options: options).isSuccess) ?? false
                    } else if signer != nil {
                        // A signed read counts only when the value's signature verifies here.
                        let got = try? await node.dht.get(key)
                        ok = got?.value == value && got?.signature(of: key)?.verified == true
                    } else {
                        ok = (try? await node.dht.get(key).value) == value
                    }
                    return (runtime.milliseconds(since: t0), ok)
                }
            }
            while next < min(concurrency, ops) { add() }
            while let r = await group.next() {
                out.append(r)
                if next < ops { add() }
            }
            return out
        }
        let seconds = runtime.milliseconds(since: start) / 1000
        let latencies = results.map(\.0).sorted()
        return PhaseReport(ops: ops, concurrency: concurrency, opsPerSecond: Double(ops) / max(seconds, 1e-9),
                           p50: percentile(latencies, 0.5), p95: percentile(latencies, 0.95), p99: percentile(latencies, 0.99),
                           successRate: Double(results.filter(\.1).count) / Double(max(1, results.count)))
    }
}

#if os(Linux)
/// glibc's malloc_trim (not in the Glibc module): gives freed heap pages back to the system.
@_silgen_name("malloc_trim")
func glibcMallocTrim(_ pad: Int) -> Int32
#endif

/// The churn phase's figures.
struct ChurnReport {
    var churn: Double
    var factor: Int
    var values: Int
    var waves: [ChurnWave]
    /// The worst wave's share of values found with their exact bytes.
    var retrievable: Double { waves.map(\.retrievable).min() ?? 0 }
    var replicasMean: Double { waves.last?.replicasMean ?? 0 }
    var bytesPerValuePerWave: Double { waves.isEmpty ? 0 : waves.map(\.bytesPerValue).reduce(0, +) / Double(waves.count) }
}
