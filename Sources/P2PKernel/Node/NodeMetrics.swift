import CoreMetrics
import NIOConcurrencyHelpers

/// What a node counts, recorded through swift-metrics with the node's own factory
/// (`NodeConfig.metrics`), so that several nodes in one process keep separate numbers and the
/// kernel depends on the metrics API only, never on an exporter.
///
/// Counters move on the paths they count (a message in or out, a reply, a timeout, a handshake);
/// gauges (peer map by bucket, sessions, reachability, relays, plugins, and whatever plugins add
/// with `addSampler`) are read once a second on the node's event loop.
///
/// Names follow Prometheus conventions (`p2p_…_total` for counters, base units):
///
/// | metric | kind | dimensions |
/// |---|---|---|
/// | `p2p_messages_total` | counter | `direction` (in, out), `command` |
/// | `p2p_message_bytes_total` | counter | `direction`, `command` |
/// | `p2p_rpc_duration_seconds` | histogram | `command` |
/// | `p2p_rpc_timeouts_total` | counter | `command` |
/// | `p2p_handshakes_total` | counter | `result` (completed, failed) |
/// | `p2p_dropped_messages_total` | counter | |
/// | `p2p_peers` | gauge | `bucket` (only buckets that held a peer) |
/// | `p2p_peers_verified`, `p2p_peers_overflow`, `p2p_sessions` | gauge | |
/// | `p2p_reachable` | gauge | `method` (direct, upnp, nat-pmp, pcp, hole-punch, relay, none) |
/// | `p2p_port_mappings`, `p2p_relays_used`, `p2p_relayed_peers` | gauge | |
/// | `p2p_plugins_loaded`, `p2p_commands_registered` | gauge | |
///
/// A remote peer picks the command id of every message it sends: ids no plugin registered are
/// all counted under `command="unknown"`, so the number of series is bounded by the registry,
/// never by what peers send.
public final class NodeMetrics: @unchecked Sendable {
    /// The factory every metric of this node is made with.
    public let factory: any MetricsFactory

    struct CommandSeries {
        let messagesIn: Counter
        let messagesOut: Counter
        let bytesIn: Counter
        let bytesOut: Counter
        let latency: Timer
        let timeouts: Counter
    }

    // Confined to the node's event loop:
    private var byCommand: [UInt16: CommandSeries] = [:]
    private var unknown: CommandSeries?
    private var bucketGauges: [Int: Gauge] = [:]
    private var reachableGauges: [String: Gauge] = [:]

    let handshakesCompleted: Counter
    let handshakesFailed: Counter
    let dropped: Counter
    private let verified: Gauge
    private let overflow: Gauge
    private let sessions: Gauge
    private let mappings: Gauge
    private let relaysUsed: Gauge
    private let relayedPeers: Gauge
    private let pluginsLoaded: Gauge
    private let commandsRegistered: Gauge

    private let samplers = NIOLockedValueBox([@Sendable () -> Void]())
    private let made = NIOLockedValueBox([String: AnyObject]())

    init(factory: any MetricsFactory) {
        self.factory = factory
        handshakesCompleted = Counter(label: "p2p_handshakes_total", dimensions: [("result", "completed")], factory: factory)
        handshakesFailed = Counter(label: "p2p_handshakes_total", dimensions: [("result", "failed")], factory: factory)
        dropped = Counter(label: "p2p_dropped_messages_total", dimensions: [], factory: factory)
        verified = Gauge(label: "p2p_peers_verified", dimensions: [], factory: factory)
        overflow = Gauge(label: "p2p_peers_overflow", dimensions: [], factory: factory)
        sessions = Gauge(label: "p2p_sessions", dimensions: [], factory: factory)
        mappings = Gauge(label: "p2p_port_mappings", dimensions: [], factory: factory)
        relaysUsed = Gauge(label: "p2p_relays_used", dimensions: [], factory: factory)
        relayedPeers = Gauge(label: "p2p_relayed_peers", dimensions: [], factory: factory)
        pluginsLoaded = Gauge(label: "p2p_plugins_loaded", dimensions: [], factory: factory)
        commandsRegistered = Gauge(label: "p2p_commands_registered", dimensions: [], factory: factory)
    }

    // MARK: for plugins

    /// A counter of this node's, made once per label and dimensions and reused after.
    public func counter(_ label: String, dimensions: [(String, String)] = []) -> Counter {
        cached("c", label, dimensions) { Counter(label: label, dimensions: dimensions, factory: factory) }
    }

    /// A gauge of this node's, made once per label and dimensions and reused after.
    public func gauge(_ label: String, dimensions: [(String, String)] = []) -> Gauge {
        cached("g", label, dimensions) { Gauge(label: label, dimensions: dimensions, factory: factory) }
    }

    /// Runs `body` once a second on the node's event loop, to set gauges from state it reads
    /// (a storage plugin reports its entries and bytes this way). It must be quick.
    public func addSampler(_ body: @escaping @Sendable () -> Void) {
        samplers.withLockedValue { $0.append(body) }
    }

    private func cached<T: AnyObject>(_ kind: String, _ label: String, _ dimensions: [(String, String)], make: () -> T) -> T {
        let key = kind + "|" + label + "|" + dimensions.map { $0.0 + "=" + $0.1 }.joined(separator: ",")
        return made.withLockedValue { m in
            if let existing = m[key] as? T { return existing }
            let new = make()
            m[key] = new
            return new
        }
    }

    // MARK: recorded by the kernel (on the event loop)

    func series(_ command: UInt16, registry: CommandRegistry) -> CommandSeries {
        if let s = byCommand[command] { return s }
        guard let name = registry.name(for: command) else {
            if let u = unknown { return u }
            let u = makeSeries("unknown")
            unknown = u
            return u
        }
        let s = makeSeries(name)
        byCommand[command] = s
        return s
    }

    private func makeSeries(_ name: String) -> CommandSeries {
        let f = factory
        return CommandSeries(
            messagesIn: Counter(label: "p2p_messages_total", dimensions: [("direction", "in"), ("command", name)], factory: f),
            messagesOut: Counter(label: "p2p_messages_total", dimensions: [("direction", "out"), ("command", name)], factory: f),
            bytesIn: Counter(label: "p2p_message_bytes_total", dimensions: [("direction", "in"), ("command", name)], factory: f),
            bytesOut: Counter(label: "p2p_message_bytes_total", dimensions: [("direction", "out"), ("command", name)], factory: f),
            latency: Timer(label: "p2p_rpc_duration_seconds", dimensions: [("command", name)], factory: f),
            timeouts: Counter(label: "p2p_rpc_timeouts_total", dimensions: [("command", name)], factory: f))
    }

    func countOut(_ s: CommandSeries, bytes: Int) {
        s.messagesOut.increment()
        s.bytesOut.increment(by: bytes)
    }

    /// Reads the gauges; runs once a second on the node's event loop.
    func sample(_ node: Node) {
        let occupancy = node.peerMap.bucketOccupancy
        for (bucket, n) in occupancy.enumerated() where n > 0 || bucketGauges[bucket] != nil {
            let g: Gauge
            if let existing = bucketGauges[bucket] {
                g = existing
            } else {
                g = Gauge(label: "p2p_peers", dimensions: [("bucket", "\(bucket)")], factory: factory)
                bucketGauges[bucket] = g
            }
            g.record(n)
        }
        let counts = node.peerMap.counts
        verified.record(counts.verified)
        overflow.record(counts.overflow)
        sessions.record(node.kernel.sessions.table.count)
        let report = node.nat.report
        let method = report?.reachable == false ? ReachabilityMethod.none.rawValue : (report?.method.rawValue ?? ReachabilityMethod.direct.rawValue)
        for m in [ReachabilityMethod.direct, .upnp, .natPMP, .pcp, .holePunch, .relay, .none] {
            let g: Gauge
            if let existing = reachableGauges[m.rawValue] {
                g = existing
            } else {
                g = Gauge(label: "p2p_reachable", dimensions: [("method", m.rawValue)], factory: factory)
                reachableGauges[m.rawValue] = g
            }
            g.record(m.rawValue == method ? 1 : 0)
        }
        mappings.record(report?.mappings.count ?? 0)
        relaysUsed.record(node.nat.relays.count)
        relayedPeers.record(node.kernel.relay.relayServed.count)
        pluginsLoaded.record(node.registry.plugins.count)
        commandsRegistered.record(node.registry.commands.names.count)
        for s in samplers.withLockedValue({ $0 }) { s() }
    }
}
