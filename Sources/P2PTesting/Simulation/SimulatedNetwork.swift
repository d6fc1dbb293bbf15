import Logging
import NIOConcurrencyHelpers
import NIOCore
import P2PKernel

/// A network in this process that the real kernel runs on, in virtual time: hosts with
/// addresses, links with latency, loss, duplication and jitter, partitions that open and heal,
/// hosts that crash or are cut off, and NATs in front of hosts. Every random choice — addresses,
/// regions, latencies, losses, and every node's ids and keys — comes from one seed, so a run
/// repeats exactly.
///
/// ```swift
/// let net = SimulatedNetwork(seed: 7, conditions: LinkConditions(latency: .world, loss: 0.02))
/// let result = try await net.run {
///     let a = try await net.node().start()
///     let b = try await net.node().start()
///     try await b.bootstrap(to: a.address.socket)
///     return try await b.closestPeers(to: Number160(hashing: "x"))
/// }
/// net.stop()
/// ```
/// Nodes see the network through `SimulatedTransport`: datagrams, connections (ordered, reliable
/// frames), extra sockets for hole punching — the same seam as real sockets. Everything runs on
/// `loop`, one thread, in an order that depends only on the seed.
public final class SimulatedNetwork: @unchecked Sendable {
    public let loop: SimulatedEventLoop
    public let seed: UInt64
    /// What links do to packets; may be changed while the simulation runs (on the loop).
    public var conditions: LinkConditions
    /// The network's own random numbers (addresses, regions, latencies, losses).
    let random: RandomSource

    // Confined to `loop` once running (set up before):
    private var hostsByIP: [IPAddress: SimHost] = [:]
    private var natsByIP: [IPAddress: SimNAT] = [:]
    private(set) var hosts: [SimHost] = []
    private var nodeCount = 0
    private var privateCount: UInt32 = 0
    private var partitioned = false
    /// Datagrams and frames that went out, were lost, and were dropped for other reasons.
    public private(set) var stats = Stats()

    public struct Stats: Sendable, Equatable {
        public var datagrams = 0
        public var datagramsLost = 0
        public var datagramsDuplicated = 0
        /// No host or socket there, filtered by a NAT, across a partition, or to a crashed host.
        public var datagramsUndeliverable = 0
        public var frames = 0
        public var connections = 0
        public var connectionsRefused = 0
    }

    public init(seed: UInt64, conditions: LinkConditions = LinkConditions()) {
        self.loop = SimulatedEventLoop()
        self.seed = seed
        self.conditions = conditions
        self.random = RandomSource(seed: seed ^ 0x5EED_0F_5EED)
    }

    /// Runs `body` on the simulation's loop; virtual time advances while it waits.
    public func run<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) async throws -> T {
        try await loop.run(body)
    }

    /// Lets go of every node (their transports close under them, no quit sent) and stops the
    /// loop; nothing more runs.
    public func stop() {
        try? loop.submit { [self] in
            for h in hosts { h.transport?.detach() }
        }.wait()
        loop.stop()
    }

    private var connectionCount: UInt64 = 0
    func nextConnectionID() -> UInt64 {
        connectionCount += 1
        return connectionCount
    }

    /// Virtual time since the network was made.
    public var elapsed: Duration { loop.elapsed }

    // MARK: hosts

    /// A new host: a public address (unique, spread over the address space like real peers), or
    /// a private one behind `nat`, or — `onSubnetOf` — a public one in another host's IPv4 /24
    /// (two servers of one operator; a Sybil's addresses).
    public func addHost(behind nat: SimNAT? = nil, onSubnetOf neighbour: SimHost? = nil) -> SimHost {
        let index = hosts.count
        let ip: IPAddress
        if nat == nil, let neighbour, case .v4(let base) = neighbour.ip,
           let free = (1...254).lazy.map({ IPAddress.v4(base & 0xFFFF_FF00 | UInt32($0)) }).first(where: { self.hostsByIP[$0] == nil && self.natsByIP[$0] == nil }) {
            ip = free
        } else if nat != nil {
            // Private addresses from 100.64.0.0/10, unique in the simulation.
            privateCount += 1
            ip = .v4(0x6440_0000 | (privateCount & 0x003F_FFFF))
        } else {
            ip = freshPublicAddress()
        }
        let region = conditions.latency == .world ? pickRegion() : 0
        let span = WorldLatency.accessRange.upperBound - WorldLatency.accessRange.lowerBound
        let access = WorldLatency.accessRange.lowerBound + random.next() % (span + 1)
        let host = SimHost(index: index, ip: ip, region: region, accessNanoseconds: access, nat: nat)
        hosts.append(host)
        hostsByIP[ip] = host
        return host
    }

    /// A NAT with a public address of its own.
    public func addNAT(mapping: SimNAT.Mapping, filtering: SimNAT.Filtering = .addressAndPortDependent) -> SimNAT {
        let nat = SimNAT(publicIP: freshPublicAddress(), mapping: mapping, filtering: filtering, network: self)
        natsByIP[nat.publicIP] = nat
        return nat
    }

    private func freshPublicAddress() -> IPAddress {
        while true {
            let v = UInt32(truncatingIfNeeded: random.next())
            let top = v >> 24
            // Public unicast only: not 0/8, 10/8, 100.64/10, 127/8, 169.254/16, 172.16/12, 192.168/16, 224+.
            guard top >= 1, top < 224, top != 10, top != 127 else { continue }
            if top == 100, (v >> 22) & 0x3 == 1 { continue }
            if v >> 16 == 0xA9FE || v >> 20 == 0xAC1 || v >> 16 == 0xC0A8 { continue }
            // The last octet 1–254: no network or broadcast-looking addresses.
            guard v & 0xFF != 0, v & 0xFF != 255 else { continue }
            let ip = IPAddress.v4(v)
            if hostsByIP[ip] == nil, natsByIP[ip] == nil { return ip }
        }
    }

    private func pickRegion() -> UInt8 {
        let total = WorldLatency.weights.reduce(0, +)
        var x = Double(random.next() >> 11) / Double(1 << 53) * total
        for (i, w) in WorldLatency.weights.enumerated() {
            if x < w { return UInt8(i) }
            x -= w
        }
        return UInt8(WorldLatency.weights.count - 1)
    }

    // MARK: nodes

    /// A builder for a node on a new host (or on `host`): its transport is the simulated
    /// network's, its loop the simulation's, its ids and keys drawn from the seed. NAT traversal
    /// never asks a real gateway here (port mapping off).
    public func node(on host: SimHost? = nil, behind nat: SimNAT? = nil) -> NodeBuilder {
        let h = host ?? addHost(behind: nat)
        nodeCount += 1
        let nodeSeed = seed &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(nodeCount) &* 0xD1B5_4A32_D192_ED03
        return Node.builder().configure { [self] c in
            c.eventLoopGroup = loop
            c.host = "\(h.ip)"
            c.port = 4000
            c.randomSeed = nodeSeed
            c.maintenanceInterval = nil
            c.nat.portMapping = false
            c.makeTransport = { [self] _, _, _ in SimulatedTransport(network: self, host: h) }
        }
    }

    /// The host at `ip` (its own address, not a NAT's).
    public func host(at ip: IPAddress) -> SimHost? { hostsByIP[ip] }

    // MARK: faults

    /// Splits the hosts: hosts in different groups cannot reach each other until `heal()`;
    /// hosts in no group form one more group. Connections across the split carry nothing.
    public func partition(_ groups: [[SimHost]]) {
        for h in hosts { h.partition = 0 }
        for (i, g) in groups.enumerated() {
            for h in g { h.partition = UInt16(i + 1) }
        }
        partitioned = true
    }

    /// Ends a partition.
    public func heal() {
        for h in hosts { h.partition = 0 }
        partitioned = false
    }

    /// Cuts a host off (its cable pulled): nothing reaches it and nothing it sends arrives, but
    /// its node keeps running and notices only by timeouts. `reconnect` undoes it.
    public func disconnect(_ host: SimHost) { host.cutOff = true }
    public func reconnect(_ host: SimHost) { host.cutOff = false }

    // MARK: moving packets (on the loop)

    /// One-way delay between two hosts, before jitter.
    func oneWay(_ a: SimHost, _ b: SimHost) -> UInt64 {
        switch conditions.latency {
        case .constant(let rtt):
            return Self.nanos(rtt) / 2
        case .uniform(let lo, let hi):
            let (x, y) = a.index < b.index ? (a, b) : (b, a)
            var h = seed ^ UInt64(x.index) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(y.index) &* 0xC2B2_AE3D_27D4_EB4F
            h ^= h >> 29
            h = h &* 0xBF58_476D_1CE4_E5B9
            h ^= h >> 32
            let l = Self.nanos(lo), u = Self.nanos(hi)
            return (l + (u > l ? h % (u - l + 1) : 0)) / 2
        case .world:
            let rtt = WorldLatency.table[Int(a.region)][Int(b.region)]
            return UInt64(rtt * 500_000) + a.accessNanoseconds + b.accessNanoseconds
        }
    }

    static func nanos(_ d: Duration) -> UInt64 {
        let (s, a) = d.components
        return UInt64(max(0, s)) * 1_000_000_000 + UInt64(max(0, a) / 1_000_000_000)
    }

    private func chance(_ p: Double) -> Bool {
        p > 0 && Double(random.next() >> 11) / Double(1 << 53) < p
    }

    private func jitter() -> UInt64 {
        let j = Self.nanos(conditions.jitter)
        return j == 0 ? 0 : random.next() % (j + 1)
    }

    /// Whether two hosts can exchange packets now.
    func canReach(_ a: SimHost, _ b: SimHost) -> Bool {
        !a.cutOff && !b.cutOff && (!partitioned || a.partition == b.partition)
    }

    /// Where a packet from `source` (a host's own endpoint) to `destination` goes: the receiving
    /// host and port, and the source as the receiver sees it (after `source`'s NAT); nil when
    /// nothing there takes it (no host, filtered by a NAT).
    func route(from host: SimHost, port: UInt16, to destination: Endpoint, tcp: Bool) -> (SimHost, UInt16, seen: Endpoint)? {
        var seen = Endpoint(ip: host.ip, port: port)
        if let nat = host.nat { seen = nat.outbound(from: seen, to: destination, tcp: tcp, now: loop.nowNanoseconds) }
        if let nat = natsByIP[destination.ip] {
            guard let inside = nat.inbound(to: destination.port, from: seen, tcp: tcp, now: loop.nowNanoseconds),
                  let target = hostsByIP[inside.ip] else { return nil }
            return (target, inside.port, seen)
        }
        // A host behind a NAT is reached only through its NAT (or by its neighbours behind it).
        guard let target = hostsByIP[destination.ip], target.nat == nil || target.nat === host.nat else { return nil }
        return (target, destination.port, seen)
    }

    /// Sends one datagram from `host`'s socket at `port`.
    func send(_ datagram: ByteBuffer, from host: SimHost, port: UInt16, to destination: Endpoint) {
        stats.datagrams += 1
        guard let (target, targetPort, seen) = route(from: host, port: port, to: destination, tcp: false), canReach(host, target) else {
            stats.datagramsUndeliverable += 1
            return
        }
        if chance(conditions.loss) {
            stats.datagramsLost += 1
            return
        }
        let delay = oneWay(host, target) + jitter()
        loop.schedule(afterNanoseconds: delay) { [self] in deliver(datagram, to: target, port: targetPort, from: seen) }
        if chance(conditions.duplicate) {
            stats.datagramsDuplicated += 1
            loop.schedule(afterNanoseconds: delay + jitter() + 1) { [self] in deliver(datagram, to: target, port: targetPort, from: seen) }
        }
    }

    private func deliver(_ datagram: ByteBuffer, to host: SimHost, port: UInt16, from seen: Endpoint) {
        guard !host.cutOff, let transport = host.transport else {
            stats.datagramsUndeliverable += 1
            return
        }
        transport.deliver(datagram, port: port, from: seen)
    }

    /// Delay of one frame on a connection: the link's, plus a retransmission timeout for each
    /// lost segment.
    func frameDelay(_ a: SimHost, _ b: SimHost) -> UInt64 {
        var d = oneWay(a, b)
        stats.frames += 1
        while chance(conditions.loss) { d += max(200_000_000, 4 * oneWay(a, b)) }
        return d
    }

    /// Opens a connection from `host`'s `port` to `destination`: established after a round
    /// trip, refused after one when nothing listens there, and never when a NAT or a partition
    /// swallows the SYN (the caller's timeout ends it).
    func connect(from client: SimulatedTransport, port: UInt16, to destination: Endpoint, raw: RawFrames?,
                 promise: EventLoopPromise<any PeerConnection>) {
        stats.connections += 1
        let host = client.host
        guard let (target, targetPort, seen) = route(from: host, port: port, to: destination, tcp: true), canReach(host, target) else {
            return
        }
        let there = oneWay(host, target)
        loop.schedule(afterNanoseconds: there) { [self] in
            guard !target.cutOff, canReach(host, target), let server = target.transport, server.listening, targetPort == server.port else {
                stats.connectionsRefused += 1
                loop.schedule(afterNanoseconds: there) { promise.fail(RPCError.unreachable(peer: "\(destination)", reason: "connection refused")) }
                return
            }
            // Both ends as each sees the other: the server sees the NAT's mapping of the client.
            let clientEnd = SimConnection(transport: client, remote: destination, raw: raw, peerHost: target)
            let serverEnd = SimConnection(transport: server, remote: seen, raw: nil, peerHost: host)
            clientEnd.peer = serverEnd
            serverEnd.peer = clientEnd
            // Frames to the client cannot arrive before the SYN-ACK does.
            clientEnd.notBefore = loop.nowNanoseconds + there
            server.accepted(serverEnd)
            loop.schedule(afterNanoseconds: there) {
                guard clientEnd.isActive else { return promise.fail(RPCError.unreachable(peer: "\(destination)", reason: "connection reset")) }
                client.opened(clientEnd)
                promise.succeed(clientEnd)
            }
        }
    }
}

/// One machine of the simulated network.
public final class SimHost: @unchecked Sendable, CustomStringConvertible {
    public let index: Int
    /// Its own address (private when behind a NAT).
    public let ip: IPAddress
    /// Index into `WorldLatency.regions` (0 unless the latency model is `.world`).
    public let region: UInt8
    let accessNanoseconds: UInt64
    public let nat: SimNAT?
    var partition: UInt16 = 0
    var cutOff = false
    /// The node's transport while it runs.
    weak var transport: SimulatedTransport?

    init(index: Int, ip: IPAddress, region: UInt8, accessNanoseconds: UInt64, nat: SimNAT?) {
        self.index = index
        self.ip = ip
        self.region = region
        self.accessNanoseconds = accessNanoseconds
        self.nat = nat
    }

    public var description: String { "host \(index) at \(ip)" }
}

/// A NAT in front of hosts: maps their endpoints to ports of its public address and lets in only
/// what its filtering allows (RFC 4787's terms).
public final class SimNAT: @unchecked Sendable {
    public enum Mapping: Sendable {
        /// One external port per internal endpoint, the same as the internal one when free.
        case portPreserving
        /// One external port per internal endpoint, another than the internal one.
        case consistent
        /// Another external port for every destination.
        case symmetric
    }
    public enum Filtering: Sendable {
        /// Anyone may send to a mapped port (full cone).
        case endpointIndependent
        /// Only addresses the host sent to (restricted cone).
        case addressDependent
        /// Only address-and-port pairs the host sent to (port-restricted cone; most home NATs).
        case addressAndPortDependent
    }
    /// Idle mappings expire (UDP after 2 minutes; TCP after 2 hours).
    static let udpTimeout: UInt64 = 120_000_000_000
    static let tcpTimeout: UInt64 = 7_200_000_000_000

    public let publicIP: IPAddress
    public let mapping: Mapping
    public let filtering: Filtering
    private unowned let network: SimulatedNetwork

    private struct Key: Hashable {
        let inside: Endpoint
        let remote: Endpoint?
        let tcp: Bool
    }
    private struct Entry {
        let inside: Endpoint
        var permitted: Set<Endpoint>
        var lastUsed: UInt64
    }
    private var byKey: [Key: UInt16] = [:]
    private var byPort: [UInt16: Entry] = [:]
    private var tcpByPort: [UInt16: Entry] = [:]

    init(publicIP: IPAddress, mapping: Mapping, filtering: Filtering, network: SimulatedNetwork) {
        self.publicIP = publicIP
        self.mapping = mapping
        self.filtering = filtering
        self.network = network
    }

    /// The external endpoint for a packet from `inside` to `remote`; opens the way back.
    func outbound(from inside: Endpoint, to remote: Endpoint, tcp: Bool, now: UInt64) -> Endpoint {
        let key = Key(inside: inside, remote: mapping == .symmetric ? remote : nil, tcp: tcp)
        let timeout = tcp ? Self.tcpTimeout : Self.udpTimeout
        if let port = byKey[key], var e = (tcp ? tcpByPort : byPort)[port], now &- e.lastUsed < timeout {
            e.permitted.insert(remote)
            e.lastUsed = now
            if tcp { tcpByPort[port] = e } else { byPort[port] = e }
            return Endpoint(ip: publicIP, port: port)
        }
        var port = inside.port
        if mapping != .portPreserving || isTaken(port, tcp: tcp, now: now) {
            repeat { port = UInt16(1024 + network.random.next() % 64_512) } while isTaken(port, tcp: tcp, now: now)
        }
        let e = Entry(inside: inside, permitted: [remote], lastUsed: now)
        if tcp { tcpByPort[port] = e } else { byPort[port] = e }
        byKey[key] = port
        return Endpoint(ip: publicIP, port: port)
    }

    private func isTaken(_ port: UInt16, tcp: Bool, now: UInt64) -> Bool {
        guard let e = (tcp ? tcpByPort : byPort)[port] else { return false }
        return now &- e.lastUsed < (tcp ? Self.tcpTimeout : Self.udpTimeout)
    }

    /// Where a packet from `source` to our port `port` goes inside, if the filtering lets it in.
    func inbound(to port: UInt16, from source: Endpoint, tcp: Bool, now: UInt64) -> Endpoint? {
        guard var e = (tcp ? tcpByPort : byPort)[port], now &- e.lastUsed < (tcp ? Self.tcpTimeout : Self.udpTimeout) else { return nil }
        switch filtering {
        case .endpointIndependent: break
        case .addressDependent: guard e.permitted.contains(where: { $0.ip == source.ip }) else { return nil }
        case .addressAndPortDependent: guard e.permitted.contains(source) else { return nil }
        }
        e.lastUsed = now
        if tcp { tcpByPort[port] = e } else { byPort[port] = e }
        return e.inside
    }
}
