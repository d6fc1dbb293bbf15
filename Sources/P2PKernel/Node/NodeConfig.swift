import CoreMetrics
import Logging
import NIOCore
import NIOPosix

/// Everything a node is built from. Every knob has a default; `Node.builder()` sets them fluently.
public struct NodeConfig: Sendable {
    /// Where to listen: UDP and TCP bind the same port (0 picks a free one).
    public var host = "0.0.0.0"
    public var port: UInt16 = 0
    /// Messages carrying another network id are dropped: two overlays can share hosts and ports.
    public var networkID: UInt32 = 1
    /// The node's key pair; its id is SHA-1 of the public key. A fresh one when nil.
    public var keyPair: PeerKeyPair?
    /// A fixed id instead of the key's: insecure mode only (an id that is not SHA-1 of the key
    /// cannot be proven, so a node in the default mode refuses to start with one).
    public var peerID: Number160?
    /// Authenticated, encrypted sessions with every peer (the default), or plaintext messages for
    /// comparison. The two modes refuse each other with a clear error on both sides.
    public var security: SecurityMode = .authenticated
    /// Everything a remote peer can make this node hold or do, bounded.
    public var limits = NodeLimits()
    /// Announced reachability flags (NAT traversal sets them once it knows).
    public var flags: PeerFlags = []
    /// NAT traversal: off unless asked for (`NATConfig.Mode.auto`, or `node.nat.makeReachable()`).
    public var nat = NATConfig()
    public var peerMap = PeerMapConfig()
    /// Default routing knobs for lookups this node starts.
    public var routing = RoutingConfig()
    /// How long a request waits for its reply before failing with `.timeout`.
    public var requestTimeout: Duration = .seconds(3)
    /// A UDP request with no reply is sent again this often until its timeout (loss is common on UDP).
    public var udpRetryAfter: Duration = .milliseconds(1_000)
    /// Most requests waiting for replies at once on this node; more fail fast with
    /// `.tooManyInFlight` rather than queue without bound.
    public var maxInFlight = 4_096
    /// Most pooled outgoing TCP connections; beyond it the least recently opened one is closed.
    public var maxTCPConnections = 64
    /// A TCP connection with no traffic for this long is closed.
    public var tcpIdleTimeout: Duration = .seconds(30)
    /// How often maintenance runs; `nil` disables it (simulations that measure other things).
    public var maintenanceInterval: Duration? = .seconds(1)
    /// Most peers one maintenance round pings.
    public var maintenancePingsPerRound = 2
    /// How often (with maintenance on) the node looks up its own id, so that its neighbourhood
    /// heals after a partition or a lossy spell dropped peers near it: Kademlia's bucket refresh,
    /// for the bucket that matters most (replica sets are decided there). About 20 messages a
    /// time; nil: never.
    public var neighbourhoodRefresh: Duration? = .seconds(60)
    /// The closest verified peers maintenance watches (with maintenance on; 0, the default:
    /// none): each is pinged when `neighbourWatchInterval` has passed since the last, and one
    /// that answers none of a ping's resends within `neighbourWatchTimeout` is dropped at once,
    /// so replication repairs what it held within seconds instead of at its next routine check
    /// (minutes for a long-lived peer). Off by default: it costs every node a ping per watched
    /// neighbour per interval (12 every 2 s: three times the routine checks), and at 50 % churn
    /// in the simulator it saved no value (the holders that matter die within the same seconds).
    public var watchedNeighbours = 0
    public var neighbourWatchInterval: Duration = .seconds(2)
    public var neighbourWatchTimeout: Duration = .seconds(2)
    /// The event loops the node runs on; every node in a process shares the singleton by default.
    public var eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    public var logger = Logger(label: "swiftp2p.node")
    /// Where the node's metrics go (see `NodeMetrics`); nil records none, at no cost. Each node
    /// takes its own factory, so several nodes in one process keep separate numbers.
    public var metrics: (any MetricsFactory)?
    /// Seeds the node's random numbers (ids, keys, message ids, every random choice) so that a run
    /// repeats: simulations only, since seeded numbers are predictable. Nil: the system's generator.
    public var randomSeed: UInt64?
    /// Makes the node's transport; nil: real sockets (`SocketTransport`). The simulated network
    /// sets its own.
    package var makeTransport: (@Sendable (_ loop: any EventLoop, _ config: NodeConfig, _ logger: Logger) -> any PeerTransport)?

    public init() {}
}

/// Assembles and starts a node.
///
/// ```swift
/// let node = try await Node.builder().port(0).start()
/// ```
public struct NodeBuilder: Sendable {
    public var config = NodeConfig()
    var handlers: [any CommandHandler] = []
    var plugins: [(plugin: any Plugin, optional: Bool)] = []

    public init() {}

    public func host(_ h: String) -> NodeBuilder { with { $0.config.host = h } }
    public func port(_ p: UInt16) -> NodeBuilder { with { $0.config.port = p } }
    public func networkID(_ n: UInt32) -> NodeBuilder { with { $0.config.networkID = n } }
    /// Records the node's metrics with `factory` (see `NodeMetrics`).
    public func metrics(_ factory: any MetricsFactory) -> NodeBuilder { with { $0.config.metrics = factory } }
    public func peerID(_ id: Number160) -> NodeBuilder { with { $0.config.peerID = id } }
    public func keyPair(_ k: PeerKeyPair) -> NodeBuilder { with { $0.config.keyPair = k } }
    public func security(_ s: SecurityMode) -> NodeBuilder { with { $0.config.security = s } }
    public func routing(_ r: RoutingConfig) -> NodeBuilder { with { $0.config.routing = r } }
    public func peerMap(_ p: PeerMapConfig) -> NodeBuilder { with { $0.config.peerMap = p } }
    public func requestTimeout(_ d: Duration) -> NodeBuilder { with { $0.config.requestTimeout = d } }
    /// NAT traversal: `.auto` runs the ladder once the node knows peers and keeps it reachable.
    public func nat(_ mode: NATConfig.Mode) -> NodeBuilder { with { $0.config.nat.mode = mode } }
    public func nat(_ c: NATConfig) -> NodeBuilder { with { $0.config.nat = c } }
    public func flags(_ f: PeerFlags) -> NodeBuilder { with { $0.config.flags = f } }
    public func maintenance(_ interval: Duration?) -> NodeBuilder { with { $0.config.maintenanceInterval = interval } }
    public func eventLoopGroup(_ g: any EventLoopGroup) -> NodeBuilder { with { $0.config.eventLoopGroup = g } }
    public func logger(_ l: Logger) -> NodeBuilder { with { $0.config.logger = l } }
    /// Adds a command handler, registered when the node starts.
    public func command(_ h: any CommandHandler) -> NodeBuilder { with { $0.handlers.append(h) } }
    /// Adds a plugin; plugins install and start in the order they are added. An optional plugin
    /// that fails to install (a duplicate name or command, its own error) is left out and listed
    /// in `Node.refusedPlugins`; a required one stops the node from starting.
    public func plugin(_ p: any Plugin, optional: Bool = false) -> NodeBuilder { with { $0.plugins.append((p, optional)) } }
    /// Adds several plugins, in order.
    public func plugins(_ ps: [any Plugin], optional: Bool = false) -> NodeBuilder { with { $0.plugins += ps.map { ($0, optional) } } }
    /// Changes any other setting.
    public func configure(_ change: (inout NodeConfig) -> Void) -> NodeBuilder { with { change(&$0.config) } }

    private func with(_ change: (inout NodeBuilder) -> Void) -> NodeBuilder {
        var copy = self
        change(&copy)
        return copy
    }

    /// Binds UDP and TCP, registers the kernel's commands and the added ones, and starts
    /// maintenance.
    public func start() async throws -> Node {
        try await Node.start(config: config, handlers: handlers, plugins: plugins)
    }
}

/// Why a node did not start.
public enum NodeStartError: Error, CustomStringConvertible {
    case bindFailed(host: String, port: UInt16, reason: String)
    /// A fixed peer id in authenticated mode: no key proves it.
    case unprovableID(Number160)
    case registry(RegistryError)
    case plugin(PluginError)
    public var description: String {
        switch self {
        case .plugin(let e): "\(e)"
        case .bindFailed(let h, let p, let r): "cannot listen on \(h):\(p): \(r)"
        case .registry(let e): "\(e)"
        case .unprovableID(let id): "peer id \(id) is not SHA-1 of the node's key, so no peer would accept it; fixed ids need SecurityMode.insecure"
        }
    }
}

/// How a node talks to its peers.
public enum SecurityMode: Sendable, Equatable {
    /// Every peer proves its id in a handshake and every datagram and frame is sealed (AEAD).
    case authenticated
    /// Plaintext messages, claimed ids: only for comparison and trusted test networks.
    case insecure
}

/// The bounds on what remote peers can make a node hold or do. Each says why it has its value.
public struct NodeLimits: Sendable {
    /// Sessions kept at once; beyond it the least recently used goes (its peer handshakes again,
    /// one round trip). A node talks to a few hundred peers in a large overlay.
    public var maxSessions = 1_024
    /// Handshakes this node has started and not finished; each holds queued messages.
    public var maxHandshakesInProgress = 256
    /// Messages waiting for one handshake to finish; a lookup sends at most a few to one peer.
    public var maxQueuedPerHandshake = 64
    /// INIT and FINISH packets accepted per source per second (each costs a signature or a
    /// verification, ~60 µs), and the burst allowed: a peer handshakes once per session.
    public var handshakesPerSecond = 20.0
    public var handshakeBurst = 40.0
    /// Discover requests answered per source per second (each sends two probes).
    public var discoversPerSecond = 1.0
    public var discoverBurst = 4.0
    /// Probe-backs (`kernel.probe`, `kernel.probe-for`) sent per source per second, and the burst.
    /// A probe is one 9-byte datagram and one connection carrying a 9-byte frame, to the asker's
    /// own address (`probe`) or to a peer a map member names (`probe-for`): smaller than the
    /// request, so never an amplifier. A node asks at start and every `recheckInterval`; the burst
    /// lets a few nodes behind one NAT address (or one quick series of `p2p nat-check`) through.
    public var probesPerSecond = 4.0
    public var probeBurst = 16.0
    /// Peers this node relays for at once (each holds a link and a return ring).
    public var maxRelayedPeers = 32
    /// Of those, from one address group (a /24, a /48; loopback exempt): ids cost nothing, so one
    /// host cannot take every place.
    public var maxRelayedPeersPerIPGroup = 4
    /// Connections a relayed peer opens back to peers that wrote through its relays, per minute
    /// in all: the address comes from the relay, so it is a claim, and this is where it can aim us.
    public var reverseConnectionsPerMinute = 32
    /// Bytes a relayed peer's traffic may move through this node per second (both directions
    /// together), and the burst: a relay carries routing and messages, not bulk transfers, and
    /// one relayed peer cannot take a relay's whole uplink. No time or total cut-off.
    public var relayBytesPerSecond = 1 << 20
    public var relayBurstBytes = 4 << 20
    /// Ways back to recent senders kept per relayed peer (tokens; 256 × ~40 bytes).
    public var relayReturnSlots = 256
    /// Relayed peers whose relays this node remembers, and direct connections from relayed peers.
    public var maxRelayRoutes = 4096
    public var maxDirectPaths = 256
    /// Hole punches at once, and begun per minute (asked or answered): each sends packets to an
    /// IP a relay reported and to ports the other side claims, so they are few.
    public var maxPunchesInProgress = 8
    public var punchesPerMinute = 32
    /// Of those, with peers of one address group (a /24, a /48; loopback exempt): ids cost
    /// nothing, so one network gets at most half (many honest peers can share one NAT's address).
    public var punchesPerMinutePerIPGroup = 16
    /// Birthday punches at once (one side symmetric): each holds `NATConfig.birthdaySockets`
    /// sockets, or sprays `NATConfig.birthdayProbes` datagrams at one IP.
    public var maxBirthdaysInProgress = 1
    /// Token buckets per rate limit, shared by sources through a secret hash: 1 KiB each, so
    /// every node can afford them, and many enough that two sources rarely share one.
    public var rateLimitSlots = 128
    /// Inbound TCP connections at once, and from one IP (loopback is exempt from the per-IP
    /// bound, or simulations of many peers on 127.0.0.1 could not connect): each holds buffers.
    public var maxInboundTCP = 512
    public var maxInboundTCPPerIP = 16
    /// Bytes held in partially received TCP frames, over all connections: a frame may be 4 MiB,
    /// and a peer that starts many and finishes none must not hold more than this.
    public var maxPartialFrameBytes = 64 << 20
    /// A TCP frame must arrive within this after its first byte (a 4 MiB frame at 0.5 MiB/s).
    public var frameDeadline: Duration = .seconds(8)
    /// Above this many bytes queued for a TCP peer, the node stops reading from it until it reads
    /// its replies (back-pressure); below the low mark it reads again.
    public var tcpWriteHighWater = 4 << 20
    public var tcpWriteLowWater = 1 << 20
    /// Reply bytes a TCP connection may hold unread; beyond it the connection is closed (its peer
    /// is not reading). Four maximum-size replies.
    public var maxQueuedReplyBytes = 16 << 20
    /// An inbound connection whose peer reads none of its replies for this long is closed
    /// (reading from it stopped when the replies piled up).
    public var stalledWriteTimeout: Duration = .seconds(10)
    /// Requests whose handler answers later (a future) in progress at once, and from one peer.
    public var maxHandlersInFlight = 1_024
    public var maxHandlersInFlightPerPeer = 64
    /// UDP requests remembered for `RecentRequests.lifetime` (10 s) so that a copy sent again is not
    /// carried out twice (~100 bytes each, with answers up to 256 bytes). A node that gets more in
    /// 10 s forgets the oldest first: a copy of one of those may run again.
    public var maxRecentRequests = 4_096
    /// Peers whose round trip a node keeps (~80 bytes each): the first re-send to a peer, and how
    /// long a lookup waits before it suspects it, follow its own round trip. Past the bound the
    /// peer measured first is forgotten (it is timed by the node-wide estimate again).
    public var maxPeerRoundTrips = 2_048
    /// Peer joins and leaves logged per second; the rest are counted and summarised.
    public var peerEventLogsPerSecond = 10.0

    public init() {}
}
