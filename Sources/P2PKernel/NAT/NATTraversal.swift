import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
@_exported import P2PPortMapping

/// How a node makes itself reachable. Off by default for nodes built in code (simulations and
/// tests on loopback need none of it); `p2p node` runs it (`--nat auto`).
public struct NATConfig: Sendable {
    public enum Mode: Sendable, Equatable {
        /// Only what the application asks for (`node.nat.makeReachable()`).
        case off
        /// Runs the ladder once the node knows peers, again every `recheckInterval` and whenever a
        /// mapping is lost.
        case auto
    }
    public var mode: Mode = .off
    /// Ask the gateway for port mappings (UPnP IGD, PCP, NAT-PMP). Never done for a node bound to
    /// loopback.
    public var portMapping = true
    /// Peers asked how they see us (at distinct IPs); the NAT is classified from at least two.
    public var observers = 3
    public var observeTimeout: Duration = .milliseconds(1500)
    /// How long probes may take to arrive after the prober said it sent them.
    public var probeGrace: Duration = .milliseconds(400)
    /// Lease asked of the gateway (NAT-PMP's recommended 2 hours; UPnP gets at most 1 hour).
    public var leaseSeconds: UInt32 = 7200
    /// How often a held mapping is checked (and re-created if the gateway lost it): a gateway
    /// that reboots loses its mappings without telling anyone.
    public var mappingCheckInterval: Duration = .seconds(2)
    /// Checks failing in a row before a mapping counts as lost and the ladder runs again.
    public var mappingLostAfter = 3
    /// The ladder runs again this often (addresses change: DHCP, a new uplink).
    public var recheckInterval: Duration = .seconds(600)
    /// Relays an unreachable node sets up among its closest reachable peers (TomP2P's 5); it
    /// counts as reachable with at least `minimumRelays` of them, or every candidate there is.
    public var relays = 5
    public var minimumRelays = 3
    /// A relay is pinged over its link this often; one that fails or closes is replaced at once
    /// and not asked again for `relayRetryAfter`.
    public var relayKeepAlive: Duration = .seconds(10)
    public var relayRetryAfter: Duration = .seconds(60)
    /// Punch a direct path to a relayed peer when both sides are behind NATs that allow it (see
    /// `HolePunch.swift`): UDP and TCP when both map consistently, UDP by birthday probing when
    /// exactly one is symmetric; never when both are.
    public var holePunching = true
    /// How long a punch may take from the moment both sides fire; then the relays stay in use.
    public var punchBudget: Duration = .seconds(3)
    /// A peer is not punched to again this soon after a punch with it began.
    public var punchRetryAfter: Duration = .seconds(60)
    /// Birthday probing: sockets the symmetric side opens, and datagrams the other side sprays
    /// at random ports of its IP (256 and 3000: P ≈ 1 − e^−12 of a hit within the budget).
    public var birthdaySockets = 256
    public var birthdayProbes = 3000
    /// A punched UDP path is pinged this often: NATs forget idle UDP mappings within minutes
    /// (often 30 s); a path whose ping fails is dropped and the relays carry the traffic again.
    public var pathKeepAlive: Duration = .seconds(15)

    public init(mode: Mode = .off) { self.mode = mode }
}

/// How a NAT maps one socket's traffic to different destinations, from what peers at different
/// addresses saw (RFC 4787's terms in brackets).
public enum NATType: String, Sendable, Equatable {
    /// No NAT: peers see one of our own addresses.
    case none
    /// The same external port for every destination, equal to ours [endpoint-independent mapping].
    case portPreserving = "port-preserving"
    /// The same external port for every destination, not ours [endpoint-independent mapping].
    case consistent
    /// Another external port per destination [address- and port-dependent mapping].
    case symmetric
    /// Fewer than two observers answered.
    case unknown
}

/// How the node is reachable.
public enum ReachabilityMethod: String, Sendable, Equatable {
    case direct
    case upnp
    case natPMP = "nat-pmp"
    case pcp
    case holePunch = "hole-punch"
    case relay
    /// Not reachable unsolicited: the node reaches out, nobody reaches in.
    case none
}

/// What one peer saw of us.
public struct NATObservation: Sendable, Equatable {
    public var peer: PeerAddress
    /// Our UDP socket's address as the peer saw it.
    public var udp: PeerSocketAddress?
    /// Our listen port's address as the peer saw a TCP connection from it.
    public var tcp: PeerSocketAddress?
}

/// What `makeReachable()` found and did.
public struct ReachabilityReport: Sendable, Equatable {
    public struct Step: Sendable, Equatable {
        public var name: String
        public var milliseconds: Double
        public var outcome: String
    }
    public var reachable: Bool
    public var method: ReachabilityMethod
    /// The address others reach us at (IP and the announced ports), when known.
    public var external: PeerSocketAddress?
    public var natType: NATType
    public var observations: [NATObservation]
    public var mappings: [PortMappingInfo]
    public var relays: [PeerAddress]
    public var steps: [Step]
    public var elapsed: Duration

    public var elapsedMilliseconds: Double { ReachabilityReport.ms(elapsed) }

    static func ms(_ d: Duration) -> Double {
        Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
    }

    static func ms(_ t: TimeAmount) -> Double { Double(t.nanoseconds) / 1e6 }

    /// One line: `reachable via upnp as 203.0.113.1:4000`, `relayed via 3 relays`, or why not.
    public var summary: String {
        if !reachable { return "not reachable (NAT \(natType.rawValue)\(external.map { ", seen as \($0.ip)" } ?? ""))" }
        if method == .relay { return "relayed via \(relays.count) relays: " + relays.map { "\($0.socket)" }.joined(separator: ", ") }
        return "reachable via \(method.rawValue) as \(external.map { "\($0.ip):\($0.udpPort)" } ?? "?")"
    }

    /// How peers behind NATs can reach a relayed node directly: `udp+tcp` (its NAT maps
    /// consistently: any such peer punches), `udp by birthday probing` (symmetric: only peers
    /// behind consistent NATs, over UDP), or `none`.
    public var holePunching: String {
        guard reachable, method == .relay else { return "none" }
        switch natType {
        case .portPreserving, .consistent: return "udp+tcp"
        case .symmetric: return "udp by birthday probing"
        case .none, .unknown: return "none"
        }
    }

    /// One JSON object: `reachable`, `method`, `external`, `nat_type`, `relays`, `elapsed_ms`,
    /// `hole_punching`, `mappings`, `observations`, `steps`.
    public var json: String {
        struct Out: Encodable {
            struct Mapping: Encodable { let proto: String, internal_port: UInt16, external_port: UInt16, external_ip: String?, lifetime_s: UInt32, method: String }
            struct Obs: Encodable { let peer: String, udp: String?, tcp: String? }
            struct StepOut: Encodable { let name: String, ms: Double, outcome: String }
            let reachable: Bool, method: String, external: String?, external_udp_port: UInt16?, external_tcp_port: UInt16?
            let nat_type: String, relays: [String], elapsed_ms: Double, hole_punching: String
            let mappings: [Mapping], observations: [Obs], steps: [StepOut]
        }
        let out = Out(reachable: reachable, method: method.rawValue, external: external.map { "\($0.ip):\($0.udpPort)" },
                      external_udp_port: external?.udpPort, external_tcp_port: external?.tcpPort,
                      nat_type: natType.rawValue, relays: relays.map { "\($0.socket.ip):\($0.udpPort)" },
                      elapsed_ms: (elapsedMilliseconds * 10).rounded() / 10, hole_punching: holePunching,
                      mappings: mappings.map { .init(proto: $0.proto.rawValue, internal_port: $0.internalPort, external_port: $0.externalPort,
                                                      external_ip: $0.externalIP.map { "\($0)" }, lifetime_s: $0.lifetime, method: $0.method.rawValue) },
                      observations: observations.map { .init(peer: "\($0.peer.id)", udp: $0.udp.map { "\($0.ip):\($0.udpPort)" },
                                                             tcp: $0.tcp.map { "\($0.ip):\($0.tcpPort)" }) },
                      steps: steps.map { .init(name: $0.name, ms: ($0.milliseconds * 10).rounded() / 10, outcome: $0.outcome) })
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return (try? encoder.encode(out)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
    }
}

/// Why the ladder could not run.
public enum NATError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The node knows no peer to ask how it is seen (bootstrap first).
    case noPeers
    /// No peer answered an observation.
    case noObservation
    /// No peer answered a request to probe us back: nothing was learnt about our reachability.
    case noProbeAnswer
    case stopped
    /// An exchange ended without an answer or an error (its connection went away first).
    case abandoned
    public var description: String {
        switch self {
        case .abandoned: "the exchange ended without an answer"
        case .noPeers: "no verified peer to ask how this node is seen: bootstrap first"
        case .noObservation: "no peer said how it sees this node"
        case .noProbeAnswer: "no peer answered a request to probe this node back"
        case .stopped: "the node stopped"
        }
    }
}

/// NAT traversal for one node: `node.nat`.
///
/// The ladder (`makeReachable()`), each rung as soon as what it needs is known:
/// ```
///  observe: ≥2 peers at distinct IPs say where they see our UDP socket and our listen port (TCP)
///     ├─ classify: no NAT / port-preserving / consistent / symmetric
///     ├─ probe-back of the observed ports by a third peer ───────────── arrives? → direct
///     └─ behind a NAT: gateway mapping (UPnP ∥ PCP→NAT-PMP) → probe-back → upnp / pcp / nat-pmp
///  otherwise: not reachable (firewalled flags: others do not route to us)
/// ```
/// The node's announced ports and flags follow the result and are re-announced to the peers it
/// holds sessions with; a `NodeEvent.reachabilityChanged` fires when the result changes.
public final class NATTraversal: @unchecked Sendable {
    /// SO_REUSEPORT: the listener and the sockets that dial out from its port both need it on Linux.
    public static let reusePort = ChannelOptions.Types.SocketOption(level: .socket, name: NIOBSDSocket.Option(rawValue: SO_REUSEPORT))

    /// The node, from its creation until it shuts down (or fails to start). Not a weak
    /// reference: that would give the node a side table, and every retain of the node — several
    /// per message — would take the runtime's slow path.
    private let owner = NIOLockedValueBox<Node?>(nil)
    private var node: Node? { owner.withLockedValue { $0 } }
    private struct State {
        var report: ReachabilityReport?
        var running: Task<ReachabilityReport, any Error>?
        var mapper: PortMapper?
        var maintenance: Task<Void, Never>?
        var stopped = false
        /// Our relays, whether we want them (the ladder found no direct way), and relays that
        /// failed recently (not asked again until then).
        var relays: [PeerAddress] = []
        var wantRelays = false
        var relayFailed: [Number160: NIODeadline] = [:]
        var settingUpRelays = false
        /// Where peers saw us last (the classification's address), known before the report.
        var observed: PeerSocketAddress?
    }
    private let state = NIOLockedValueBox(State())

    init() {}

    func attach(_ node: Node) { owner.withLockedValue { $0 = node } }

    /// Lets go of the node (it shut down or did not start): what still runs here finds no node and ends.
    func detach() { owner.withLockedValue { $0 = nil } }

    /// The last report, if the ladder ran.
    public var report: ReachabilityReport? { state.withLockedValue { $0.report } }

    /// Where peers saw our UDP socket and listen port last (hole punching's external ports).
    var observedExternal: PeerSocketAddress? { state.withLockedValue { $0.observed ?? $0.report?.external } }

    /// Runs the ladder and returns what it found; concurrent calls share one run.
    @discardableResult
    public func makeReachable() async throws -> ReachabilityReport {
        let executor = node?.clock.taskExecutor
        let task: Task<ReachabilityReport, any Error> = try state.withLockedValue { s in
            guard !s.stopped else { throw NATError.stopped }
            if let t = s.running { return t }
            let t = Task(executorPreference: executor) { try await self.runLadder() }
            s.running = t
            return t
        }
        defer { state.withLockedValue { if $0.running == task { $0.running = nil } } }
        return try await task.value
    }

    /// Starts the automatic mode (`NATConfig.Mode.auto`): the ladder runs once peers are known,
    /// and again on schedule or when a mapping is lost.
    func startAutomatic() {
        ensureMaintenance()
    }

    /// Deletes the mappings and stops maintenance (node shutdown).
    func stop() async {
        let (mapper, maintenance, running) = state.withLockedValue { s in
            s.stopped = true
            defer { s.mapper = nil; s.maintenance = nil }
            return (s.mapper, s.maintenance, s.running)
        }
        maintenance?.cancel()
        running?.cancel()
        if let mapper {
            let problems = await mapper.release()
            for p in problems { node?.logger.warning("port mapping not deleted", metadata: ["why": "\(p)"]) }
        }
    }

    // MARK: the ladder

    private func runLadder() async throws -> ReachabilityReport {
        guard let node else { throw NATError.stopped }
        let cfg = node.config.nat
        let clock = node.clock
        let start = clock.now
        var steps: [ReachabilityReport.Step] = []
        func step(_ name: String, _ since: NIODeadline, _ outcome: String) {
            steps.append(.init(name: name, milliseconds: ReachabilityReport.ms(clock.now - since), outcome: outcome))
        }

        let observers = pickObservers(node, count: max(1, cfg.observers))
        guard !observers.isEmpty else { throw NATError.noPeers }
        let tObserve = clock.now
        let observations = await observe(node, observers, timeout: cfg.observeTimeout)
        let answered = observations.filter { $0.udp != nil }
        step("observe", tObserve, "\(answered.count) of \(observers.count) peers answered")
        guard !answered.isEmpty else { throw NATError.noObservation }

        let bound = try await node.eventLoop.submit { node.kernel.transport.boundPort }.get()
        let local = node.kernel.transport.localAddresses
        let c = NATTraversal.classify(observations, boundPort: bound, local: local)
        steps.append(.init(name: "classify", milliseconds: 0, outcome: c.type.rawValue))
        let external = PeerSocketAddress(ip: c.ip, tcpPort: c.tcpPort, udpPort: c.udpPort)
        state.withLockedValue { $0.observed = external }

        // Probe the observed ports and, behind a NAT, ask the gateway at the same time.
        let mayMap = cfg.portMapping && node.kernel.transport.hasGateway && c.type != .none && !node.boundToLoopback && !c.ip.isLoopback
        let tProbe = clock.now
        async let probed = probe(node, observers, udp: c.udpPort, tcp: c.tcpPort, grace: cfg.probeGrace)
        async let mapped = mayMap ? mapPorts(node, internalPort: bound, lease: cfg.leaseSeconds) : nil
        let direct = await probed
        step("probe observed \(c.udpPort)/\(c.tcpPort)", tProbe, direct.outcome)
        let mapping = await mapped
        if mayMap { step("port mapping", tProbe, mapping?.outcome ?? "not tried") }
        // No prober answered (they left, or are swamped): that says nothing about us. The last
        // verdict stands and the ladder runs again soon — calling ourselves unreachable here
        // took healthy peers on loopback out of every map (they went relayed) when the peers
        // they asked had just died.
        if direct.answered == 0, mapping?.mapper == nil { throw NATError.noProbeAnswer }

        var report = ReachabilityReport(reachable: false, method: .none, external: external, natType: c.type, observations: observations,
                                        mappings: [], relays: [], steps: steps, elapsed: .zero)
        // A mapping the gateway granted is verified by a probe of its own: the direct probe
        // above may have passed only because the mapping landed while it was on its way, and a
        // mapping (renewed, checked) outlives the state a NAT keeps for a path that looks open.
        if let m = mapping, let mapper = m.mapper, let udp = m.info.first(where: { $0.proto == .udp }),
           let tcp = m.info.first(where: { $0.proto == .tcp }) {
            let tVerify = clock.now
            let verified = await probe(node, observers, udp: udp.externalPort, tcp: tcp.externalPort, grace: cfg.probeGrace)
            report.steps.append(.init(name: "probe mapped \(udp.externalPort)/\(tcp.externalPort)",
                                      milliseconds: ReachabilityReport.ms(clock.now - tVerify), outcome: verified.outcome))
            if verified.udp && verified.tcp {
                report.reachable = true
                report.mappings = m.info
                report.method = switch udp.method { case .upnp: .upnp; case .pcp: .pcp; case .natPMP: .natPMP }
                report.external = PeerSocketAddress(ip: c.ip, tcpPort: tcp.externalPort, udpPort: udp.externalPort)
                keep(mapper)
                await announce(node, udpPort: udp.externalPort, tcpPort: tcp.externalPort, ip: c.ip, flags: [.portForwarded])
            } else {
                // Mapped but not reachable through it (a second NAT in front of the gateway).
                let external = udp.externalIP.map { "\($0)" } ?? "?"
                report.steps.append(.init(name: "mapping unusable", milliseconds: 0,
                                          outcome: "the gateway's external address is \(external), peers see \(c.ip)"))
                _ = await mapper.release()
            }
        } else if let m = mapping?.mapper {
            _ = await m.release()
        }
        if !report.reachable && direct.udp && direct.tcp {
            report.reachable = true
            report.method = .direct
            await announce(node, udpPort: c.udpPort, tcpPort: c.tcpPort, ip: c.ip, flags: [])
        }
        if !report.reachable {
            var flags: PeerFlags = []
            if !direct.udp { flags.insert(.firewalledUDP) }
            if !direct.tcp { flags.insert(.firewalledTCP) }
            // How others may punch to us, once we are relayed (see `HolePunch.swift`).
            switch c.type {
            case .portPreserving, .consistent: flags.insert(.punchable)
            case .symmetric: flags.insert(.symmetricNAT)
            case .none, .unknown: break
            }
            await announce(node, udpPort: bound, tcpPort: bound, ip: nil, flags: flags)
            if cfg.relays > 0, node.kernel.sessions.enabled {
                let tRelay = clock.now
                state.withLockedValue { $0.wantRelays = true }
                let (relays, candidates) = await setUpRelays(node)
                report.steps.append(.init(name: "relays", milliseconds: ReachabilityReport.ms(clock.now - tRelay),
                                          outcome: "\(relays.count) of \(candidates) candidates: \(relays.map { "\($0.socket)" }.joined(separator: ", "))"))
                if !relays.isEmpty, relays.count >= min(cfg.minimumRelays, candidates) {
                    report.reachable = true
                    report.method = .relay
                    report.relays = relays
                }
            }
        } else {
            await dropRelays(node)
        }
        report.elapsed = .nanoseconds((clock.now - start).nanoseconds)
        publish(report, on: node)
        return report
    }

    /// Verified peers to ask, each at another IP (another /24 first), reachable at their own address.
    private func pickObservers(_ node: Node, count: Int) -> [PeerAddress] {
        var chosen: [PeerAddress] = []
        var groups = Set<UInt64>(), ips = Set<IPAddress>()
        var rng = node.random.generator
        let peers = node.peerMap.verifiedPeers.filter(\.isDirectlyReachable).shuffled(using: &rng)
        for pass in 0..<2 {
            for p in peers where chosen.count < count && !ips.contains(p.ip) {
                let group = p.ip.sybilGroup ?? UInt64(truncatingIfNeeded: p.ip.hashValue)
                if pass == 0, groups.contains(group) { continue }
                chosen.append(p)
                ips.insert(p.ip)
                groups.insert(group)
            }
        }
        return chosen
    }

    private func observe(_ node: Node, _ peers: [PeerAddress], timeout: Duration) async -> [NATObservation] {
        await withTaskGroup(of: NATObservation.self) { group in
            for p in peers {
                group.addTask {
                    async let udp = try? node.observeUDP(via: p, timeout: timeout)
                    async let tcp = try? node.observeTCP(at: p.socket, timeout: timeout)
                    return NATObservation(peer: p, udp: await udp, tcp: await tcp)
                }
            }
            var out: [NATObservation] = []
            for await o in group { out.append(o) }
            return out
        }
    }

    /// Classifies from the UDP observations: the external IP most peers saw, and whether its port
    /// stays the same across destinations (and equals ours).
    static func classify(_ obs: [NATObservation], boundPort: UInt16, local: Set<IPAddress>)
        -> (type: NATType, ip: IPAddress, udpPort: UInt16, tcpPort: UInt16) {
        let udp = obs.compactMap(\.udp)
        let ip = mostCommon(udp.map(\.ip)) ?? .v4(0)
        let udpPort = mostCommon(udp.filter { $0.ip == ip }.map(\.udpPort)) ?? boundPort
        let tcpPort = mostCommon(obs.compactMap(\.tcp).filter { $0.ip == ip }.map(\.tcpPort)) ?? udpPort
        let type: NATType
        if local.contains(ip) || ip.isLoopback {
            type = .none
        } else if udp.count < 2 {
            type = .unknown
        } else if Set(udp.map(\.udpPort)).count == 1 {
            type = udpPort == boundPort ? .portPreserving : .consistent
        } else {
            type = .symmetric
        }
        return (type, ip, udpPort, tcpPort)
    }

    private static func mostCommon<T: Hashable>(_ values: [T]) -> T? {
        var counts: [T: Int] = [:]
        for v in values { counts[v, default: 0] += 1 }
        return values.max { counts[$0, default: 0] < counts[$1, default: 0] }
    }

    /// This host's interface addresses.
    static func localAddresses() -> Set<IPAddress> {
        Set(((try? System.enumerateDevices()) ?? []).compactMap { $0.address.flatMap(IPAddress.init) })
    }

    private struct ProbeOutcome: Sendable {
        var udp = false
        var tcp = false
        /// Probers that answered (sent their probes, whether or not they arrived).
        var answered = 0
        var outcome = "no answer"
    }

    /// Probe-back through up to two peers at once; a port counts as reachable if either's probe arrived.
    private func probe(_ node: Node, _ peers: [PeerAddress], udp: UInt16, tcp: UInt16, grace: Duration) async -> ProbeOutcome {
        await withTaskGroup(of: (PeerAddress, Result<(udp: Bool, tcp: Bool, prober: PeerAddress?), any Error>).self) { group in
            for p in peers.prefix(2) {
                group.addTask {
                    do { return (p, .success(try await node.probeBack(via: p, udpPort: udp, tcpPort: tcp, grace: grace))) } catch { return (p, .failure(error)) }
                }
            }
            var out = ProbeOutcome()
            var notes: [String] = []
            for await (p, r) in group {
                switch r {
                case .success(let v):
                    out.answered += 1
                    out.udp = out.udp || v.udp
                    out.tcp = out.tcp || v.tcp
                    notes.append("via \(p.socket.ip)\(v.prober.map { $0.id != p.id ? " (sent by \($0.socket.ip))" : "" } ?? ""): udp \(v.udp ? "arrived" : "lost"), tcp \(v.tcp ? "arrived" : "lost")")
                case .failure(let e):
                    notes.append("via \(p.socket.ip): \(e)")
                }
            }
            out.outcome = notes.joined(separator: "; ")
            return out
        }
    }

    private struct Mapped: Sendable {
        var mapper: PortMapper?
        var info: [PortMappingInfo]
        var outcome: String
    }

    private func mapPorts(_ node: Node, internalPort: UInt16, lease: UInt32) async -> Mapped {
        guard let (gateway, client) = await PortMapper.findGateway(loop: node.eventLoop) else {
            return Mapped(mapper: nil, info: [], outcome: "no default gateway")
        }
        let old = state.withLockedValue { s in defer { s.mapper = nil }; return s.mapper }
        if let old { _ = await old.release() }
        let mapper = PortMapper(loop: node.eventLoop, gateway: gateway, client: client, internalPort: internalPort, lease: lease)
        do {
            let info = try await mapper.map()
            let text = info.map { "\($0.method.rawValue) \($0.proto) \($0.internalPort)→\($0.externalPort) \($0.lifetime) s" }.joined(separator: ", ")
            return Mapped(mapper: mapper, info: info, outcome: text)
        } catch {
            return Mapped(mapper: nil, info: [], outcome: "\(error)")
        }
    }

    private func keep(_ mapper: PortMapper) {
        state.withLockedValue { $0.mapper = mapper }
        ensureMaintenance()
    }

    // MARK: announcing

    /// Sets the announced ports and flags and tells the peers we hold sessions with (the header
    /// of any message carries them; a ping is the smallest).
    private func announce(_ node: Node, udpPort: UInt16, tcpPort: UInt16, ip: IPAddress?, flags: PeerFlags,
                          relays: [PeerSocketAddress]? = nil) async {
        _ = try? await node.eventLoop.submit {
            var me = node.kernel.me
            let keep = me.flags.intersection([.relayed])
            me.socket = PeerSocketAddress(ip: ip ?? me.socket.ip, tcpPort: tcpPort, udpPort: udpPort)
            me.flags = flags.union(keep)
            if let relays {
                try? me.setRelays(Array(relays.prefix(PeerAddress.maxRelays)))
                if relays.isEmpty { me.flags.remove(.relayed) } else { me.flags.insert(.relayed) }
            }
            guard me != node.kernel.me else { return }
            let firewalled: PeerFlags = [.firewalledUDP, .firewalledTCP]
            let becameRoutable = !node.kernel.me.flags.isDisjoint(with: firewalled) && me.flags.isDisjoint(with: firewalled)
            node.kernel.announce(me)
            if becameRoutable { node.kernel.becameRoutable() }
            var told = 0
            for peer in node.peerMap.verifiedPeers where told < 64 && (!node.kernel.sessions.enabled || node.kernel.sessions.table.slot(peer: peer.id) != nil) {
                node.kernel.rpc.sendFireAndForget(to: peer, command: node.kernel.commands.ping)
                told += 1
            }
        }.get()
    }

    private func publish(_ report: ReachabilityReport, on node: Node) {
        let previous = state.withLockedValue { s in defer { s.report = report }; return s.report }
        let changed = previous.map { $0.reachable != report.reachable || $0.method != report.method || $0.external != report.external } ?? true
        if changed { node.registry.publish(.reachabilityChanged(report)) }
    }

    // MARK: relays (the relayed side)

    /// Fills our relays up to `NATConfig.relays` from the closest reachable peers we know (not
    /// relayed, not firewalled, not failed recently), asking several at once, and announces
    /// them. Returns our relays and how many candidates there were in all.
    private func setUpRelays(_ node: Node) async -> ([PeerAddress], Int) {
        let cfg = node.config.nat
        let now = node.clock.now
        guard state.withLockedValue({ s -> Bool in
            guard !s.settingUpRelays, !s.stopped else { return false }
            s.settingUpRelays = true
            s.relayFailed = s.relayFailed.filter { now - $0.value < TimeAmount(cfg.relayRetryAfter) }
            return true
        }) else { return (state.withLockedValue { $0.relays }, 0) }
        defer { state.withLockedValue { $0.settingUpRelays = false } }
        ensureMaintenance()
        let (current, failed) = state.withLockedValue { ($0.relays, $0.relayFailed) }
        let me = node.peerID
        func candidates() async -> [PeerAddress] {
            ((try? await node.eventLoop.submit {
                node.peerMap.verifiedPeers.filter {
                    $0.isDirectlyReachable && $0.id != me
                }
            }.get()) ?? []).sorted { ($0.id ^ me) < ($1.id ^ me) }
        }
        var all = await candidates()
        var queue = all.filter { p in failed[p.id] == nil && !current.contains { $0.id == p.id } }
        if current.count + queue.count < cfg.relays {
            // Too few known: a lookup of our own id meets the peers closest to us.
            _ = try? await node.closestPeers(to: me)
            all = await candidates()
            queue = all.filter { p in failed[p.id] == nil && !current.contains { $0.id == p.id } }
        }
        var got = current
        while got.count < cfg.relays, !queue.isEmpty {
            let batch = Array(queue.prefix(cfg.relays - got.count))
            queue.removeFirst(batch.count)
            let results = await withTaskGroup(of: (PeerAddress, Bool).self) { group in
                for p in batch { group.addTask { (p, await self.askRelay(node, p)) } }
                var out: [(PeerAddress, Bool)] = []
                for await r in group { out.append(r) }
                return out
            }
            for (p, ok) in results {
                let failedAt = node.clock.now
                if ok { got.append(p) } else { state.withLockedValue { $0.relayFailed[p.id] = failedAt } }
            }
        }
        let stillWanted = state.withLockedValue { s -> Bool in
            guard s.wantRelays else { return false }
            s.relays = got
            return true
        }
        guard stillWanted else {
            for p in got where !current.contains(where: { $0.id == p.id }) { _ = try? await node.eventLoop.submit { node.kernel.relay.dropRelayLink(to: p) }.get() }
            return ([], all.count)
        }
        if got.map(\.id) != current.map(\.id) {
            let bound = (try? await node.eventLoop.submit { node.kernel.transport.boundPort }.get()) ?? 0
            let flags = (try? await node.eventLoop.submit { node.kernel.me.flags }.get()) ?? []
            await announce(node, udpPort: bound, tcpPort: bound, ip: nil, flags: flags.subtracting([.relayed]), relays: got.map(\.socket))
            // The peers closest to our id are those a lookup of it ends at: a lookup of our own id
            // carries our record, with its relays, to each of them (every request's header does),
            // so anyone looking us up finds us at once — not a neighbour in our place.
            if !got.isEmpty { _ = try? await node.closestPeers(to: me) }
        }
        return (got, all.count)
    }

    /// Asks `peer` to relay for us over a TCP connection that then stays open as our link.
    private func askRelay(_ node: Node, _ peer: PeerAddress) async -> Bool {
        do {
            let reply = try await node.request(to: peer, command: CommandID.derive(from: KernelCommands.relay), transport: .tcp,
                                               timeout: .seconds(3)).get()
            guard reply.type == .ok else { return false }
            let key = PeerSocketAddress(ip: peer.ip, tcpPort: peer.tcpPort, udpPort: 0)
            let link = try await node.eventLoop.flatSubmit { () -> EventLoopFuture<any PeerConnection> in
                node.kernel.connections.pool[key] ?? node.eventLoop.makeFailedFuture(NATError.abandoned)
            }.get()
            try await node.eventLoop.submit {
                node.kernel.relay.adoptRelayLink(link, relay: peer)
                link.closeFuture.whenComplete { _ in node.spawn { await self.relayLost(node, peer) } }
            }.get()
            return link.isActive
        } catch {
            node.logger.debug("relay refused", metadata: ["peer": "\(peer)", "why": "\(error)"])
            return false
        }
    }

    /// A relay's link closed or it stopped answering: replace it now, and skip it for a while.
    private func relayLost(_ node: Node, _ peer: PeerAddress) async {
        let wanted = state.withLockedValue { s -> Bool in
            guard s.relays.contains(where: { $0.id == peer.id }) else { return false }
            s.relays.removeAll { $0.id == peer.id }
            s.relayFailed[peer.id] = node.clock.now
            return s.wantRelays && !s.stopped
        }
        guard wanted else { return }
        node.logger.info("relay \(peer.socket) lost; replacing it")
        // Its link broke or it stopped answering: gone from the map too (its place may be
        // needed by its successor at the same address).
        _ = try? await node.eventLoop.submit {
            node.kernel.relay.dropRelayLink(to: peer)
            node.peerMap.peerFailed(peer.id, reason: .disconnected)
        }.get()
        let (relays, _) = await setUpRelays(node)
        if relays.isEmpty { node.logger.warning("no relay left") }
        let updated = state.withLockedValue { s -> ReachabilityReport? in
            guard var r = s.report, r.method == .relay || !r.reachable else { return nil }
            r.relays = relays
            r.reachable = !relays.isEmpty
            r.method = relays.isEmpty ? .none : .relay
            s.report = r
            return r
        }
        if let updated { node.registry.publish(.reachabilityChanged(updated)) }
    }

    /// Stops using relays (the node became reachable another way).
    private func dropRelays(_ node: Node) async {
        let old = state.withLockedValue { s in
            defer { s.relays = []; s.wantRelays = false }
            return s.relays
        }
        guard !old.isEmpty else { return }
        for p in old { _ = try? await node.eventLoop.submit { node.kernel.relay.dropRelayLink(to: p) }.get() }
        let bound = (try? await node.eventLoop.submit { node.kernel.me }.get())
        if let me = bound { await announce(node, udpPort: me.udpPort, tcpPort: me.tcpPort, ip: nil, flags: me.flags.subtracting([.relayed]), relays: []) }
    }

    /// Our relays now.
    public var relays: [PeerAddress] { state.withLockedValue { $0.relays } }

    /// Takes relays without running the ladder, for a node that knows it cannot be reached (a
    /// mobile uplink, a firewall that drops everything inbound): it announces itself firewalled
    /// and relayed. Returns the relays it got.
    @discardableResult
    public func useRelays() async -> [PeerAddress] {
        guard let node else { return [] }
        state.withLockedValue { $0.wantRelays = true }
        let me = (try? await node.eventLoop.submit { node.kernel.me }.get())
        if let me { await announce(node, udpPort: me.udpPort, tcpPort: me.tcpPort, ip: nil, flags: [.firewalledUDP, .firewalledTCP]) }
        return await setUpRelays(node).0
    }

    /// Takes `type` and `external` as the ladder's verdict without running it, for a relayed node
    /// on loopback (which has no NAT to observe): tests of hole punching.
    func assume(_ type: NATType, external: PeerSocketAddress) async {
        guard let node else { return }
        var flags: PeerFlags = [.firewalledUDP, .firewalledTCP]
        switch type {
        case .portPreserving, .consistent: flags.insert(.punchable)
        case .symmetric: flags.insert(.symmetricNAT)
        case .none, .unknown: break
        }
        state.withLockedValue { s in
            s.observed = external
            s.report = ReachabilityReport(reachable: !s.relays.isEmpty, method: s.relays.isEmpty ? .none : .relay, external: external,
                                          natType: type, observations: [], mappings: [], relays: s.relays, steps: [], elapsed: .zero)
        }
        guard let me = try? await node.eventLoop.submit({ node.kernel.me }).get() else { return }
        await announce(node, udpPort: me.udpPort, tcpPort: me.tcpPort, ip: nil, flags: flags)
    }

    /// Pings each relay over its link; tops the relays up when some are missing.
    private func tendRelays(_ node: Node) async {
        let (relays, want) = state.withLockedValue { ($0.relays, $0.wantRelays) }
        guard want else { return }
        // All at once: one dead relay must not hold up the others' checks (or the mapping's).
        let silent = await withTaskGroup(of: PeerAddress?.self) { group in
            for p in relays {
                group.addTask {
                    (try? await node.request(to: p, command: node.kernel.commands.ping, transport: .tcp, timeout: .seconds(3)).get()) == nil ? p : nil
                }
            }
            var out: [PeerAddress] = []
            for await p in group { if let p { out.append(p) } }
            return out
        }
        for p in silent { await relayLost(node, p) }
        if state.withLockedValue({ $0.relays.count }) < node.config.nat.relays { _ = await setUpRelays(node) }
    }

    // MARK: maintenance

    /// A node with nobody to ask how it is seen is taken as reachable, as the first node of an
    /// overlay is: the firewalled flags it may have started with are dropped until a ladder gives
    /// its verdict (the ladder runs as soon as a verified peer is known).
    func nobodyToAsk(_ node: Node) async {
        guard state.withLockedValue({ $0.report == nil }) else { return }
        let flags = (try? await node.eventLoop.submit { node.kernel.me.flags }.get()) ?? []
        guard !flags.isDisjoint(with: [.firewalledUDP, .firewalledTCP]) else { return }
        let bound = (try? await node.eventLoop.submit { node.kernel.transport.boundPort }.get()) ?? 0
        guard bound != 0 else { return }
        await announce(node, udpPort: bound, tcpPort: bound, ip: nil, flags: [])
    }

    private func ensureMaintenance() {
        let executor = node?.clock.taskExecutor
        state.withLockedValue { s in
            guard s.maintenance == nil, !s.stopped else { return }
            s.maintenance = Task(executorPreference: executor) { [weak self] in await self?.maintain() }
        }
    }

    /// Checks held mappings; in automatic mode also runs the ladder when peers first appear, on
    /// schedule, and after a mapping is lost.
    private func maintain() async {
        var failures = 0
        guard let clock = node?.clock else { return }
        var nextRun = clock.now
        var lastCheck = clock.now
        var lastRelayCheck = clock.now
        while !Task.isCancelled {
            guard let node, !state.withLockedValue({ $0.stopped }) else { return }
            let cfg = node.config.nat
            let now = clock.now
            if let mapper = state.withLockedValue({ $0.mapper }), now - lastCheck >= TimeAmount(cfg.mappingCheckInterval) {
                lastCheck = now
                switch await mapper.check() {
                case .ok:
                    failures = 0
                case .restored(let m):
                    failures = 0
                    node.logger.info("port mapping restored", metadata: ["mappings": "\(m.map { "\($0.proto) \($0.externalPort)" })"])
                    if let udp = m.first(where: { $0.proto == .udp }), let tcp = m.first(where: { $0.proto == .tcp }) {
                        await announce(node, udpPort: udp.externalPort, tcpPort: tcp.externalPort, ip: nil, flags: [.portForwarded])
                        state.withLockedValue { s in
                            s.report?.mappings = m
                            if let ip = s.report?.external?.ip { s.report?.external = PeerSocketAddress(ip: ip, tcpPort: tcp.externalPort, udpPort: udp.externalPort) }
                        }
                    }
                case .failed(let why):
                    failures += 1
                    node.logger.debug("port mapping check failed", metadata: ["failures": "\(failures)", "why": "\(why)"])
                    if failures >= cfg.mappingLostAfter {
                        failures = 0
                        node.logger.warning("port mapping lost; running the NAT ladder again", metadata: ["why": "\(why)"])
                        state.withLockedValue { $0.mapper = nil }
                        _ = try? await makeReachable()
                        nextRun = clock.now + TimeAmount(cfg.recheckInterval)
                    }
                }
            }
            if now - lastRelayCheck >= TimeAmount(cfg.relayKeepAlive) {
                lastRelayCheck = now
                await tendRelays(node)
            }
            if cfg.mode == .auto, now >= nextRun {
                if node.peerMap.counts.verified > 0 {
                    do {
                        try await makeReachable()
                        nextRun = clock.now + TimeAmount(cfg.recheckInterval)
                    } catch {
                        // No peer answered yet: try again soon.
                        nextRun = clock.now + .seconds(5)
                        if let e = error as? NATError, e == .noPeers || e == .noObservation { await nobodyToAsk(node) }
                    }
                }
            }
            try? await clock.sleep(for: .milliseconds(250))
        }
    }
}


