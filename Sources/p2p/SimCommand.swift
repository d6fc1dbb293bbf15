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

    @Option(help: "How many peers.")
    var peers: Int = 500

    @Option(help: "How many lookups for random keys, from random peers, one after another.")
    var lookups: Int = 1000

    @Flag(help: "Fill every peer map with every peer instead of bootstrapping.")
    var perfect = false

    @Option(help: "How many peers bootstrap at once.")
    var joinConcurrency: Int = 16

    @Option(help: "DHT operations per phase: sequential puts, sequential gets, then puts and gets with --concurrency in flight (0 skips them).")
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

    func validate() throws {
        guard peers >= 1 else { throw ValidationError("--peers must be at least 1, got \(peers)") }
        guard lookups >= 0 else { throw ValidationError("--lookups must not be negative, got \(lookups)") }
        guard ops >= 0 else { throw ValidationError("--ops must not be negative, got \(ops)") }
        guard (1...4096).contains(concurrency) else { throw ValidationError("--concurrency must be from 1 to 4096, got \(concurrency)") }
        guard (0...(1 << 20)).contains(valueSize) else { throw ValidationError("--value-size must be from 0 to 1048576") }
        guard (1...64).contains(parallel) else { throw ValidationError("--parallel must be from 1 to 64, got \(parallel)") }
        guard joinConcurrency >= 1 else { throw ValidationError("--join-concurrency must be at least 1") }
        guard (0...100_000).contains(values) else { throw ValidationError("--values must be from 0 to 100000, got \(values)") }
        guard churn >= 0, churn < 1 else { throw ValidationError("--churn must be from 0 to below 1, got \(churn)") }
        guard (1...100).contains(churnWaves) else { throw ValidationError("--churn-waves must be from 1 to 100, got \(churnWaves)") }
        guard (1...20).contains(replicationFactor) else { throw ValidationError("--replication-factor must be from 1 to 20, got \(replicationFactor)") }
        guard replicationInterval >= 0.1, replicationInterval <= 3_600 else { throw ValidationError("--replication-interval must be from 0.1 to 3600 seconds") }
        guard values == 0 || peers >= 2 else { throw ValidationError("churn needs at least 2 peers") }
    }

    func run() async throws {
        raiseOpenFileLimit()
        var sqliteBackends: [SQLiteStorage] = []
        let rssBefore = residentMemoryBytes() ?? 0
        note("starting \(peers) peers…")
        let net: Testnet
        let policies = PolicyRegistry(factor: replicationFactor, interval: .milliseconds(Int(replicationInterval * 1000)))
        let replicating = values > 0
        do {
            var chosen = ops > 0 ? plugins.split(separator: ",").map(String.init).filter { !$0.isEmpty } : []
            if replicating { for p in ["dht", "evaluation"] where !chosen.contains(p) { chosen.append(p) } }
            let names = chosen
            _ = try BuiltInPlugins.make(names, peerID: { "" })
            for file in pluginFiles {
                do { _ = try PluginFile.load(file) } catch { throw CLIError.usage("\(error)") }
            }
            let files = pluginFiles
            let security: SecurityMode = insecure ? .insecure : .authenticated
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
                                          joinConcurrency: joinConcurrency,
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
        note("bootstrapped \(peers) peers in \(String(format: "%.2f", net.bootstrapSeconds)) s; running \(lookups) lookups…")

        var latencies: [Double] = []
        var recalls: [Double] = []
        var hops = 0, messages = 0, failedLookups = 0
        latencies.reserveCapacity(lookups)
        var rng = SystemRandomNumberGenerator()
        var routing = RoutingConfig()
        routing.parallel = parallel
        let clock = ContinuousClock()
        if peers > 1 {
            for i in 0..<lookups {
                let asker = net.nodes[Int.random(in: 0..<peers, using: &rng)]
                let key = Number160.random(using: &rng)
                let start = clock.now
                do {
                    let result = try await asker.closestPeers(to: key, config: routing)
                    latencies.append((clock.now - start).milliseconds)
                    let r = net.recall(of: result, key: key, asker: asker.peerID)
                    recalls.append(r)
                    hops += result.hops
                    messages += result.messages
                } catch {
                    failedLookups += 1
                }
                if lookups >= 1000, (i + 1) % (lookups / 4) == 0 { note("  lookups: \(i + 1)/\(lookups)") }
            }
        }
        let lookupHandshakes = net.nodes.reduce(0) { $0 + $1.handshakesCompleted } / 2 - bootstrapHandshakes
        var phases: [String: PhaseReport] = [:]
        if ops > 0 {
            let workload = DHTWorkload(net: net, ops: ops, valueSize: valueSize, domain: try domain.map(parseKey) ?? .zero,
                                       fixedValue: value.map { Array($0.utf8) })
            // The signed phases store values signed by a user key, with the request's writer proof
            // and entry protection, and read them back verifying each signature: the cost of the
            // security model beside the unsigned phases of the same run.
            let signer = Curve25519.Signing.PrivateKey()
            let plan: [(String, Bool, Bool, Curve25519.Signing.PrivateKey?)] = [
                ("seq_put", false, true, nil), ("seq_get", false, false, nil), ("put", true, true, nil), ("get", true, false, nil),
                ("signed_put", true, true, signer), ("signed_get", true, false, signer),
            ]
            for (name, concurrent, isPut, key) in plan {
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
        if replicating {
            let names = ["dht", "evaluation"]
            let sim = ChurnSim(values: values, churn: churn, waves: churnWaves, valueSize: valueSize, policies: policies, makePlugins: {
                ((try? BuiltInPlugins.make(names, peerID: { "" })) ?? []) + [ReplicationPlugin(policies.make())]
            })
            let (waves, live) = try await sim.run(net)
            churnReport = waves
            for n in live where !net.nodes.contains(where: { $0 === n }) { await n.shutdown() }
        }
        let verified = net.nodes.map { $0.peerMap.counts.verified }
        note("shutting down…")
        await net.shutdown()
        for store in sqliteBackends { store.close() }
        let footprint = ops > 0 ? try storageFootprint() : nil

        latencies.sort()
        let sortedRecalls = recalls.sorted()
        let n = max(1, latencies.count)
        let report = SimReport(
            peers: peers,
            bootstrapSeconds: net.bootstrapSeconds,
            bootstrapHandshakes: bootstrapHandshakes,
            lookupHandshakes: lookupHandshakes,
            secure: !insecure,
            lookups: latencies.count,
            failedLookups: failedLookups,
            p50: percentile(latencies, 0.50), p95: percentile(latencies, 0.95), p99: percentile(latencies, 0.99),
            hopsMean: Double(hops) / Double(n),
            messagesMean: Double(messages) / Double(n),
            recall: recalls.isEmpty ? 0 : recalls.reduce(0, +) / Double(recalls.count),
            recallMin: sortedRecalls.first ?? 0,
            recallMedian: percentile(sortedRecalls, 0.5),
            memoryPerPeerKiB: memoryPerPeerKiB,
            rssMiB: Double(rssAfter) / 1_048_576,
            verifiedMean: Double(verified.reduce(0, +)) / Double(max(1, verified.count)),
            phases: phases,
            footprint: footprint,
            churn: churnReport.map { ChurnReport(churn: churn, factor: replicationFactor, values: values, waves: $0) }
        )
        if json {
            print(report.json())
        } else {
            print(report.summary())
        }
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
    var bootstrapSeconds: Double
    var bootstrapHandshakes: Int
    var lookupHandshakes: Int
    var secure: Bool
    var lookups: Int
    var failedLookups: Int
    var p50: Double, p95: Double, p99: Double
    var hopsMean: Double
    var messagesMean: Double
    var recall: Double, recallMin: Double, recallMedian: Double
    var memoryPerPeerKiB: Double
    var rssMiB: Double
    var verifiedMean: Double
    var phases: [String: PhaseReport]
    var footprint: StorageFootprint?
    var churn: ChurnReport?

    func json() -> String {
        func r(_ v: Double, _ digits: Int = 4) -> Double { (v * pow(10, Double(digits))).rounded() / pow(10, Double(digits)) }
        var object: [String: Any] = [
            "peers": peers,
            "bootstrap_s": r(bootstrapSeconds, 3),
            "bootstrap_handshakes": bootstrapHandshakes,
            "secure": secure,
            "lookup": [
                "count": lookups, "failed": failedLookups,
                "p50_ms": r(p50), "p95_ms": r(p95), "p99_ms": r(p99),
                "hops_mean": r(hopsMean, 3), "messages_mean": r(messagesMean, 2),
                "recall": r(recall), "recall_min": r(recallMin), "recall_median": r(recallMedian),
                "handshakes": lookupHandshakes,
            ] as [String: Any],
            "memory_per_peer_kib": r(memoryPerPeerKiB, 2),
            "rss_mib": r(rssMiB, 1),
            "verified_peers_mean": r(verifiedMean, 1),
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
            object["storage_bytes_per_100_byte_entry"] = ["unsigned": r(footprint.unsigned, 0), "signed": r(footprint.signed, 0)]
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
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }

    func summary() -> String {
        func f(_ v: Double, _ d: Int = 3) -> String { String(format: "%.\(d)f", v) }
        return """
        SwiftP2P simulation: \(peers) peers in one process
          bootstrap     \(f(bootstrapSeconds, 2)) s (every peer pinged the seed and looked up its own id; \(secure ? "\(bootstrapHandshakes) handshakes" : "insecure: no sessions"))
          peer maps     \(f(verifiedMean, 1)) verified peers each on average
          lookups       \(lookups) done, \(failedLookups) failed
          latency       p50 \(f(p50)) ms · p95 \(f(p95)) ms · p99 \(f(p99)) ms
          per lookup    \(f(hopsMean, 2)) hops · \(f(messagesMean, 1)) messages
          recall        \(f(recall, 4)) of the true 20 closest on average (median \(f(recallMedian, 2)), worst \(f(recallMin, 2)))
          memory        \(f(memoryPerPeerKiB, 1)) KiB per peer (RSS \(f(rssMiB, 1)) MiB)
        """ + ["seq_put", "seq_get", "put", "get", "signed_put", "signed_get"].compactMap { name in
            phases[name].map { p in
                "\n  \(name.padding(toLength: 12, withPad: " ", startingAt: 0))  \(f(p.opsPerSecond, 0)) ops/s with \(p.concurrency) in flight · p50 \(f(p.p50)) ms · p95 \(f(p.p95)) ms · p99 \(f(p.p99)) ms · success \(f(p.successRate * 100, 2)) %"
            }
        }.joined() + (footprint.map { "\n  storage       \(f($0.unsigned, 0)) bytes per stored 100-byte entry (\(f($0.signed, 0)) signed and protected)" } ?? "")
            + (churn.map { c in
                "\n  churn         \(c.waves.count) waves of \(f(c.churn * 100, 0)) %: \(f(c.retrievable * 100, 2)) % of \(c.values) values retrievable (worst wave), "
                    + "\(f(c.replicasMean, 2)) replicas on average (factor \(c.factor)), \(f(c.bytesPerValuePerWave, 0)) replication bytes per value per wave"
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

    init(net: Testnet, ops: Int, valueSize: Int, domain: Number160 = .zero, fixedValue: [UInt8]? = nil) {
        self.net = net
        self.ops = ops
        var rng = SystemRandomNumberGenerator()
        keys = (0..<3).map { _ in (0..<ops).map { _ in Number640(location: .random(using: &rng), domain: domain) } }
        values = (0..<3).map { _ in (0..<ops).map { _ in fixedValue ?? (0..<valueSize).map { _ in UInt8.random(in: 0...255, using: &rng) } } }
    }

    func run(isPut: Bool, concurrency: Int, keySet: Int, signer: Curve25519.Signing.PrivateKey? = nil) async -> PhaseReport {
        let options = signer.map { DHTOptions(signer: $0, protect: .entry) } ?? DHTOptions()
        let clock = ContinuousClock()
        let start = clock.now
        let results = await withTaskGroup(of: (Double, Bool).self) { group in
            var out: [(Double, Bool)] = []
            out.reserveCapacity(ops)
            var next = 0
            func add() {
                let i = next
                next += 1
                let node = net.nodes[Int.random(in: 0..<net.nodes.count)]
                let key = keys[keySet][i], value = values[keySet][i]
                group.addTask {
                    let t0 = ContinuousClock.now
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
                    return ((ContinuousClock.now - t0).milliseconds, ok)
                }
            }
            while next < min(concurrency, ops) { add() }
            while let r = await group.next() {
                out.append(r)
                if next < ops { add() }
            }
            return out
        }
        let seconds = (clock.now - start).milliseconds / 1000
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
