import NIOConcurrencyHelpers
import NIOCore

/// One picture of what a node is doing, for an operator: what the status page draws and
/// `/status.json` serves. Built by `Node.status()`; plugins add their own sections with
/// `PluginRegistry.addStatus`.
public struct NodeStatus: Codable, Sendable, Equatable {
    public struct Reachability: Codable, Sendable, Equatable {
        /// Whether peers can reach this node unsolicited (true until NAT traversal says otherwise).
        public var reachable: Bool
        /// How: direct, upnp, nat-pmp, pcp, hole-punch, relay or none.
        public var method: String
        /// The NAT in front of the node, when traversal ran (none, port-preserving, consistent, symmetric…).
        public var natType: String?
        /// The address the outside sees, when traversal found one.
        public var external: String?
        public var mappings: [String]
        public var relays: [String]
    }

    public struct Peer: Codable, Sendable, Equatable {
        public var id: String
        public var address: String
    }

    /// One bucket of the peer map: peers at XOR distance [2^index, 2^(index+1)) from this node.
    public struct Bucket: Codable, Sendable, Equatable {
        public var index: Int
        public var peers: [Peer]
    }

    public struct PluginInfo: Codable, Sendable, Equatable {
        public var name: String
        public var version: String
        public var commands: [String]
    }

    /// A titled list of name/value rows a plugin reports (storage: entries and bytes).
    public struct Section: Codable, Sendable, Equatable {
        public var title: String
        public var rows: [[String]]
        public init(title: String, rows: [(String, String)]) {
            self.title = title
            self.rows = rows.map { [$0.0, $0.1] }
        }
    }

    public struct Event: Codable, Sendable, Equatable {
        /// Seconds since the node started.
        public var at: Double
        public var text: String
    }

    public var id: String
    /// The address peers are told (announced ports), and the one the sockets are bound to.
    public var announced: String
    public var bound: String
    public var security: String
    public var uptimeSeconds: Double
    public var reachability: Reachability
    public var verifiedPeers: Int
    public var overflowPeers: Int
    /// Non-empty buckets, closest first.
    public var buckets: [Bucket]
    public var sessions: Int
    public var requestsInFlight: Int
    public var droppedMessages: Int
    public var handshakes: Int
    public var plugins: [PluginInfo]
    public var sections: [Section]
    /// The latest events, oldest first (at most `EventLog.capacity`).
    public var events: [Event]
}

/// The node's most recent events, for the status page: a fixed number kept, the oldest dropped.
/// Peers come and go at a rate others control, so this is a ring, never a growing list.
final class EventLog: Sendable {
    static let capacity = 64

    /// What happened, kept as data and put into words when the status page asks: a node records
    /// a line per peer it meets, and 64 lines of text cost a peer 5 KiB more than 64 records.
    enum Record: Sendable {
        /// A peer joined (`left == nil`) or left; its id's first 48 bits.
        case peer(idPrefix: UInt64, socket: PeerSocketAddress, left: RemovalReason?)
        case text(String)

        var text: String {
            switch self {
            case .text(let t): return t
            case .peer(let prefix, let socket, let left):
                let id = String(prefix >> 16, radix: 16)
                let padded = String(repeating: "0", count: max(0, 12 - id.count)) + id
                guard let left else { return "peer joined: \(padded) at \(socket)" }
                return "peer left: \(padded) at \(socket) (\(left))"
            }
        }
    }

    private let ring = NIOLockedValueBox((items: [(at: Double, record: Record)](), next: 0))
    private let clock: NodeClock
    private let started: NIODeadline

    init(clock: NodeClock) {
        self.clock = clock
        self.started = clock.now
    }

    func add(_ text: String) { add(.text(text)) }

    func peerJoined(_ p: PeerAddress) { add(.peer(idPrefix: p.id.high, socket: p.socket, left: nil)) }
    func peerLeft(_ p: PeerAddress, _ reason: RemovalReason) { add(.peer(idPrefix: p.id.high, socket: p.socket, left: reason)) }

    private func add(_ record: Record) {
        let at = Double((clock.now - started).nanoseconds) / 1e9
        ring.withLockedValue { r in
            if r.items.count < Self.capacity {
                r.items.append((at, record))
            } else {
                r.items[r.next] = (at, record)
                r.next = (r.next + 1) % Self.capacity
            }
        }
    }

    var events: [NodeStatus.Event] {
        let items = ring.withLockedValue { r in Array(r.items[r.next...] + r.items[..<r.next]) }
        return items.map { NodeStatus.Event(at: $0.at, text: $0.record.text) }
    }

    var uptime: Double { Double((clock.now - started).nanoseconds) / 1e9 }
}

extension NodeStatus {
    /// What `node` is doing now (on its event loop).
    init(of node: Node) {
        let kernel = node.kernel, peerMap = node.peerMap, registry = node.registry, nat = node.nat
        let report = nat.report
        let reach = NodeStatus.Reachability(
            reachable: report?.reachable ?? true,
            method: report.map { $0.reachable ? $0.method.rawValue : ReachabilityMethod.none.rawValue } ?? ReachabilityMethod.direct.rawValue,
            natType: report?.natType.rawValue,
            external: report?.external.map { "\($0)" },
            mappings: report?.mappings.map { "\($0)" } ?? [],
            relays: nat.relays.map { "\($0.id.hexString.prefix(12)) at \($0.socket)" })
        var buckets: [NodeStatus.Bucket] = []
        var grouped: [Int: [NodeStatus.Peer]] = [:]
        for p in peerMap.verifiedPeers {
            guard let b = peerMap.bucketIndex(of: p.id) else { continue }
            grouped[b, default: []].append(NodeStatus.Peer(id: p.id.hexString, address: "\(p.socket)"))
        }
        for b in grouped.keys.sorted() { buckets.append(NodeStatus.Bucket(index: b, peers: grouped[b] ?? [])) }
        let counts = peerMap.counts
        let plugins = registry.plugins.map { p in
            NodeStatus.PluginInfo(name: p.name, version: p.version, commands: registry.commandNames(of: p.name))
        }
        self.init(
            id: node.peerID.hexString,
            announced: "\(kernel.me.socket)",
            bound: "\(node.config.host):\(kernel.transport.boundPort)",
            security: node.config.security == .authenticated ? "authenticated sessions" : "insecure (plaintext)",
            uptimeSeconds: node.events.uptime,
            reachability: reach,
            verifiedPeers: counts.verified,
            overflowPeers: counts.overflow,
            buckets: buckets,
            sessions: kernel.sessions.table.count,
            requestsInFlight: kernel.rpc.pending.count,
            droppedMessages: node.droppedMessages,
            handshakes: node.handshakesCompleted,
            plugins: plugins,
            sections: registry.statusSections(),
            events: node.events.events)
    }
}
