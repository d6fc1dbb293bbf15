import ArgumentParser
import Dispatch
import Foundation
import Logging
import NIOConcurrencyHelpers
import P2PKernel
import P2PLoader
import P2PWasm
import P2PReplication
import P2PSQLite
import P2PStatus
import P2PStorage
import ServiceLifecycle
import UnixSignals

struct NodeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node",
        abstract: "Run a peer until SIGINT or SIGTERM, then leave gracefully (a second signal stops it at once)."
    )

    @Option(help: "UDP and TCP port to listen on (0 picks one; default 4000).")
    var port: UInt16?

    @Option(help: "Address to listen on (default 0.0.0.0).")
    var host: String?

    @Option(name: .customLong("bootstrap"), help: "A peer to join through, HOST:PORT (repeatable).", transform: parseAddress)
    var seeds: [PeerSocketAddress] = []

    @Option(name: .customLong("network-id"), help: "Overlay id; messages of other overlays are dropped (default 1).")
    var networkID: UInt32?

    @Option(help: "Built-in plugins to install, comma-separated (\(BuiltInPlugins.names.joined(separator: ",")); empty for a bare kernel).")
    var plugins: String?

    @Option(name: .customLong("plugin"), help: "A plugin file to load, .so or .wasm (repeatable); one that fails to load is refused and the node runs without it. SIGHUP reloads the .wasm ones (they also reload when their file changes).")
    var pluginFiles: [String] = []

    @Option(help: "A JSON config file: {\"port\", \"host\", \"network_id\", \"bootstrap\": [..], \"plugins\": [..], \"plugin_files\": [..], \"key\", \"insecure\", \"nat\", \"replication\", \"replication_factor\", \"storage\", \"storage_sync\", \"metrics\", \"status\", \"shutdown_timeout\"}; flags given here win.")
    var config: String?

    @Option(help: "NAT traversal: auto (observe, probe, map ports on the gateway; the default) or off.")
    var nat: NATModeArgument?

    @Option(help: "Replication with the dht plugin: indirect (the peers responsible for a location keep its copies; the default), direct (this node republishes what it publishes), none.")
    var replication: ReplicationArgument?

    @Option(name: .customLong("replication-factor"), help: "Copies of each location with indirect replication (1 to 20; default 6).")
    var replicationFactor: Int?

    @Option(help: "Where stored values live: memory (the default; lost at exit) or sqlite:PATH (a SQLite file that survives restarts and crashes; the routing table is saved in it too, and the node rejoins through it).")
    var storage: StorageArgument?

    @Option(name: .customLong("storage-sync"), help: "With sqlite storage: full (a put is acknowledged once on disk; the default) or normal (once handed to the OS: survives kill -9, not a power loss).")
    var storageSync: StorageSyncArgument?

    @Option(help: "Serve /metrics (Prometheus text format) on [HOST:]PORT; HOST is 127.0.0.1 unless given.", transform: parseHTTPAddress)
    var metrics: HTTPAddress?

    @Option(help: "Serve the live status page (/ and /status.json) on [HOST:]PORT; HOST is 127.0.0.1 unless given.", transform: parseHTTPAddress)
    var status: HTTPAddress?

    @Option(name: .customLong("shutdown-timeout"), help: "Seconds a graceful stop may take (quit announced, port mappings deleted, storage flushed) before the node is stopped at once (default 10).")
    var shutdownTimeout: Double?

    @OptionGroup var identity: IdentityOptions

    func run() async throws {
        let file = try config.map(NodeConfigFile.read) ?? NodeConfigFile()
        let port = self.port ?? file.port ?? 4000
        let host = self.host ?? file.host ?? "0.0.0.0"
        let networkID = self.networkID ?? file.network_id ?? 1
        var seeds = self.seeds
        if seeds.isEmpty {
            do { seeds = try (file.bootstrap ?? []).map(parseAddress) } catch { throw CLIError.usage("config \(config ?? ""): \(error)") }
        }
        let plugins = self.plugins ?? file.plugins?.joined(separator: ",") ?? BuiltInPlugins.names.joined(separator: ",")
        let pluginFiles = self.pluginFiles + (file.plugin_files ?? [])
        var loaded: [any Plugin] = []
        for file in pluginFiles {
            do {
                let plugin = try PluginFile.load(file)
                loaded.append(plugin)
                say("plugin \(file): \(PluginFile.summary(plugin))")
            } catch {
                say("plugin \(file) refused: \(error)")
            }
        }
        let names = plugins.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        let storageChoice: StorageArgument
        if let storage { storageChoice = storage } else if let text = file.storage {
            guard let parsed = StorageArgument(argument: text) else { throw CLIError.usage("config \(config ?? ""): storage must be memory or sqlite:PATH, not '\(text)'") }
            storageChoice = parsed
        } else {
            storageChoice = .memory
        }
        if let text = file.storage_sync, StorageSyncArgument(rawValue: text) == nil {
            throw CLIError.usage("config \(config ?? ""): storage_sync must be full or normal, not '\(text)'")
        }
        let sync = storageSync ?? file.storage_sync.flatMap(StorageSyncArgument.init(rawValue:)) ?? .full
        var sqlite: SQLitePlugin?
        var backend: (any StorageBackend)?
        if case .sqlite(let path) = storageChoice {
            guard names.contains("dht") else { throw CLIError.usage("--storage sqlite:PATH needs the dht plugin") }
            do {
                let database = try SQLiteDatabase(path: path, sync: sync == .full ? .full : .normal)
                let store = try SQLiteStorage(database: database)
                sqlite = SQLitePlugin(database: database, storage: store)
                backend = store
                say("storage: sqlite \(path) (\(store.loadedEntries) entries read back, sync \(sync.rawValue))")
            } catch {
                throw CLIError.failed("\(error)")
            }
        }
        let id = IDBox()
        var list = try BuiltInPlugins.make(names, peerID: { id.value }, backend: backend)
        if let sqlite { list.append(sqlite) }
        if let text = file.replication, ReplicationArgument(rawValue: text) == nil {
            throw CLIError.usage("config \(config ?? ""): replication must be indirect, direct or none, not '\(text)'")
        }
        let replicationMode = replication ?? file.replication.flatMap(ReplicationArgument.init(rawValue:)) ?? .indirect
        let factor = replicationFactor ?? file.replication_factor ?? 6
        guard (1...20).contains(factor) else { throw CLIError.usage("--replication-factor must be from 1 to 20, got \(factor)") }
        if replicationMode != .none {
            if names.contains("dht") {
                list.append(replicationMode == .indirect ? ReplicationPlugin(IndirectReplication(mode: .nRoot, factor: factor))
                                                         : ReplicationPlugin(direct: DirectReplication()))
            } else if replication != nil || file.replication != nil {
                throw CLIError.usage("--replication \(replicationMode.rawValue) needs the dht plugin")
            }
        }
        let metricsAt: HTTPAddress?
        let statusAt: HTTPAddress?
        do {
            metricsAt = try metrics ?? file.metrics.map(parseHTTPAddress)
            statusAt = try status ?? file.status.map(parseHTTPAddress)
        } catch {
            throw CLIError.usage("config \(config ?? ""): \(error)")
        }
        let timeout = shutdownTimeout ?? file.shutdown_timeout ?? 10
        guard timeout.isFinite, timeout > 0, timeout <= 3_600 else {
            throw CLIError.usage("--shutdown-timeout must be from 0 to 3600 seconds, got \(timeout)")
        }
        var builder = try identity.apply(to: Node.builder(), keyFile: file.key, insecure: file.insecure)
        let exporter = metricsAt.map { _ in MetricsExporter() }
        if let exporter { builder = builder.metrics(exporter.factory) }
        if let text = file.nat, NATModeArgument(rawValue: text) == nil {
            throw CLIError.usage("config \(config ?? ""): nat must be auto or off, not '\(text)'")
        }
        let natMode = nat ?? file.nat.flatMap(NATModeArgument.init(rawValue:)) ?? .auto
        if natMode == .auto {
            builder = builder.nat(.auto)
            // A joining node is not routed to until a probe-back shows it can be reached; the
            // first node of an overlay has nobody to ask and is taken as reachable.
            if !seeds.isEmpty { builder = builder.flags([.firewalledUDP, .firewalledTCP]) }
        }
        // Signals are trapped before the node starts (and before "listening on" is printed), so a
        // SIGTERM at any moment after — during the rejoin too — is a graceful stop.
        let signals = await UnixSignalsSequence(trapping: [.sigterm, .sigint, .sighup])
        let node = try await startNode(builder.host(host).port(port).networkID(networkID).plugins(list).plugins(loaded, optional: true))
        node.registry.subscribe { event in
            if case .reachabilityChanged(let report) = event { say(report.summary) }
        }
        id.value = node.peerID.description
        for (name, reason) in node.refusedPlugins { say("plugin \(name) refused: \(reason)") }
        if !names.isEmpty { say("plugins: \(names.joined(separator: ", "))") }
        if names.contains("dht") {
            say(replicationMode == .indirect ? "replication: indirect, n-root, factor \(factor)" : "replication: \(replicationMode.rawValue)")
        }
        say("node \(node.peerID) listening on \(host):\(node.address.udpPort) (udp+tcp\(node.config.security == .insecure ? ", INSECURE: plaintext, unauthenticated" : ", authenticated sessions"))")
        // Peers come and go at a rate others control: a budget keeps the log from being a lever.
        let budget = LogBudget(perSecond: node.config.limits.peerEventLogsPerSecond)
        node.peerMap.onChange { event in
            let line: String
            switch event {
            case .inserted(let p, let verified) where verified: line = "peer joined: \(p.id) at \(p.socket)"
            case .removed(let p, let reason): line = "peer left: \(p.id) at \(p.socket) (\(reason))"
            default: return
            }
            guard let suppressed = budget.take() else { return }
            say(suppressed > 0 ? "\(line) (\(suppressed) more peer events not shown)" : line)
        }
        let saved = (try? sqlite?.savedPeers()) ?? []
        if !saved.isEmpty {
            do {
                let clock = ContinuousClock()
                let started = clock.now
                let r = try await node.rejoin(from: saved)
                let took = clock.now - started
                let ms = Double(took.components.seconds) * 1000 + Double(took.components.attoseconds) / 1e15
                say("rejoined via \(r.seed.socket) from \(saved.count) saved peers in \(String(format: "%.0f", ms)) ms: \(r.verifiedPeers) verified peers, \(r.lookup?.hops ?? 0) hops")
            } catch {
                note("rejoin from \(saved.count) saved peers failed: \(error)\(seeds.isEmpty ? "" : "; bootstrapping")")
                if seeds.isEmpty { note("no --bootstrap given: waiting for peers to contact this node") }
            }
        }
        if !seeds.isEmpty, node.peerMap.counts.verified == 0 {
            Task {
                // Keep trying: the seed may start after us.
                while await node.isRunning {
                    do {
                        let r = try await node.bootstrap(to: seeds)
                        say("bootstrapped via \(r.seed.socket): \(r.verifiedPeers) verified peers, \(r.lookup?.hops ?? 0) hops")
                        return
                    } catch {
                        note("bootstrap failed, retrying in 2 s: \(error)")
                        try? await Task.sleep(for: .seconds(2))
                    }
                }
            }
        }
        var services: [any Service] = [NodeService(node: node)]
        var servers: [(HTTPAddress, StatusRoutes)] = []
        if let metricsAt { servers.append((metricsAt, .metrics)) }
        if let statusAt {
            if let i = servers.firstIndex(where: { $0.0 == statusAt }) { servers[i].1.insert(.status) } else { servers.append((statusAt, .status)) }
        }
        for (at, routes) in servers {
            var quiet = Logger(label: "swiftp2p.http")
            quiet.logLevel = .warning
            let what = [routes.contains(.status) ? "status page" : nil, routes.contains(.metrics) ? "metrics" : nil].compactMap { $0 }.joined(separator: " and ")
            let path = routes.contains(.status) ? "/" : "/metrics"
            services.append(StatusServer.application(node: node, host: at.host, port: at.port, routes: routes, exporter: exporter, logger: quiet) { port in
                say("\(what): http://\(at.host):\(port)\(path)")
            })
        }
        var groupConfig = ServiceGroupConfiguration(services: services, logger: Logger(label: "swiftp2p.lifecycle", factory: { _ in SwiftLogNoOpLogHandler() }))
        groupConfig.maximumGracefulShutdownDuration = .milliseconds(Int64(timeout * 1000))
        // No cancellation bound in the group: it would end the process with a fatal error at the
        // same moment as the watchdog below (timeout + 2 s), which exits 1 saying why.
        groupConfig.maximumCancellationDuration = nil
        let group = ServiceGroup(configuration: groupConfig)
        // The first SIGTERM or SIGINT stops the group gracefully (the node leaves, then the HTTP
        // servers close), within the timeout; a second one while it leaves stops the process at
        // once: what was acknowledged is already on disk (docs/STORAGE.md).
        let wasmPlugins = loaded.compactMap { $0 as? WasmPlugin }
        for w in wasmPlugins {
            let path = w.path
            w.onReload { result in
                switch result {
                case .success(let r):
                    say("reloaded \(path): generation \(r.generation) in \(r.took)\(r.ignored.isEmpty ? "" : " (needs a restart for: \(r.ignored.joined(separator: ", ")))")")
                case .failure(let error):
                    say("reload of \(path) failed, the old version stays: \(error)")
                }
            }
        }
        let watcher = Task {
            var count = 0
            for await signal in signals {
                if signal == .sighup {
                    for w in wasmPlugins { _ = try? w.reload() }
                    continue
                }
                count += 1
                if count == 1 {
                    say("received \(signal), leaving: telling \(node.peerMap.counts.verified) peers")
                    await group.triggerGracefulShutdown()
                    // The group cancels what is still running at the timeout, but cancellation
                    // cannot interrupt a plugin blocked in its own code: the bound is kept here.
                    // On a Dispatch thread, not a task: a plugin blocked in its shutdown may hold
                    // a thread of the (small) cooperative pool.
                    DispatchQueue.global().asyncAfter(deadline: .now() + timeout + 2) {
                        say("stopping took longer than \(timeout) s: stopping at once")
                        Foundation.exit(1)
                    }
                } else {
                    say("\(signal) again: stopping at once")
                    Foundation.exit(130)
                }
            }
        }
        defer { watcher.cancel() }
        do {
            try await group.run()
        } catch {
            throw CLIError.failed("stopping took longer than \(timeout) s; stopped at once (\(error))")
        }
        say("stopped")
    }
}

/// The node as a service: runs until the group's graceful shutdown, then leaves (plugins
/// stopped — storage flushed, the routing table saved —, port mappings deleted, quit announced).
struct NodeService: Service {
    let node: Node

    func run() async throws {
        do {
            try await gracefulShutdown()
        } catch {
            return  // cancelled: the group is stopping at once
        }
        await node.shutdown()
    }
}

/// Where an HTTP server listens: `PORT`, `:PORT` or `HOST:PORT` (an IP address or localhost).
struct HTTPAddress: Equatable {
    var host: String
    var port: Int
}

func parseHTTPAddress(_ text: String) throws -> HTTPAddress {
    var host = "127.0.0.1"
    var portText = Substring(text)
    if let colon = text.lastIndex(of: ":") {
        let h = text[..<colon].trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        if !h.isEmpty { host = h == "localhost" ? "127.0.0.1" : h }
        portText = text[text.index(after: colon)...]
    }
    guard IPAddress(host) != nil else { throw CLIError.usage("'\(text)': the host must be an IP address or localhost") }
    guard let port = Int(portText), (0...65_535).contains(port) else { throw CLIError.usage("'\(text)': the port must be 0 to 65535") }
    return HTTPAddress(host: host, port: port)
}

/// `--nat auto|off`.
enum NATModeArgument: String, ExpressibleByArgument {
    case auto, off
}

/// `--storage memory|sqlite:PATH`.
enum StorageArgument: ExpressibleByArgument, Equatable {
    case memory
    case sqlite(String)

    init?(argument: String) {
        if argument == "memory" {
            self = .memory
        } else if argument.hasPrefix("sqlite:"), argument.count > "sqlite:".count {
            self = .sqlite(String(argument.dropFirst("sqlite:".count)))
        } else {
            return nil
        }
    }
}

/// `--storage-sync full|normal`.
enum StorageSyncArgument: String, ExpressibleByArgument {
    case full, normal
}

/// `--replication indirect|direct|none`.
enum ReplicationArgument: String, ExpressibleByArgument {
    case indirect, direct, none
}

/// Holds the node's id for handlers created before the node exists.
final class IDBox: @unchecked Sendable {
    private let lock = NSLock()
    private var stored = ""
    var value: String {
        get { lock.withLock { stored } }
        set { lock.withLock { stored = newValue } }
    }
}

/// The node config file (`p2p node --config FILE`); every field is optional.
struct NodeConfigFile: Decodable {
    var port: UInt16?
    var host: String?
    var network_id: UInt32?
    var bootstrap: [String]?
    var plugins: [String]?
    var plugin_files: [String]?
    var key: String?
    var insecure: Bool?
    var nat: String?
    var replication: String?
    var replication_factor: Int?
    var storage: String?
    var storage_sync: String?
    var metrics: String?
    var status: String?
    var shutdown_timeout: Double?

    init() {}

    static func read(_ path: String) throws -> NodeConfigFile {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch { throw CLIError.usage("cannot read config \(path): \(error.localizedDescription)") }
        do { return try JSONDecoder().decode(NodeConfigFile.self, from: data) } catch {
            throw CLIError.usage("config \(path) is not valid: \(error)")
        }
    }
}
