import P2PAddress
import NIOCore
import NIOPosix

/// How a port mapping was made.
public enum MappingMethod: String, Sendable, Equatable {
    case upnp
    case pcp
    case natPMP = "nat-pmp"
}

/// A mapping this node holds on its gateway.
public struct PortMappingInfo: Sendable, Equatable {
    public var proto: MappingProtocol
    public var internalPort: UInt16
    public var externalPort: UInt16
    /// The gateway's external address, when it said.
    public var externalIP: IPAddress?
    /// Seconds granted (0: permanent, UPnP IGD v1).
    public var lifetime: UInt32
    public var method: MappingMethod
}

/// Why mapping failed, rung by rung.
public struct PortMappingFailure: Error, Sendable, CustomStringConvertible {
    public var reasons: [String]
    public var description: String { reasons.isEmpty ? "no gateway" : reasons.joined(separator: "; ") }
}

/// The node's port mappings on its gateway: UPnP IGD, and PCP falling back to NAT-PMP, started
/// at once; the first to map both UDP and TCP wins. Kept alive by `check()` (which re-creates a
/// mapping the gateway lost: a reboot, chains flushed) and renewed before the lease ends;
/// deleted by `release()`.
///
/// Everything here talks only to the default gateway and to the UPnP device that answered on the
/// LAN (whose control URL must be on its own host).
package actor PortMapper {
    let loop: any EventLoop
    let gateway: IPAddress
    let client: IPAddress
    let internalPort: UInt16
    let lease: UInt32
    private let nonces: [MappingProtocol: [UInt8]]
    private(set) var mappings: [PortMappingInfo] = []
    private var upnp: UPnPGateway?
    private var lastEpoch: UInt32?
    private var epochAt: ContinuousClock.Instant?
    private var renewedAt = ContinuousClock.now
    private var released = false

    package init(loop: any EventLoop, gateway: IPAddress, client: IPAddress, internalPort: UInt16, lease: UInt32) {
        self.loop = loop
        self.gateway = gateway
        self.client = client
        self.internalPort = internalPort
        self.lease = lease
        var rng = SystemRandomNumberGenerator()
        nonces = [.udp: (0..<12).map { _ in UInt8.random(in: 0...255, using: &rng) },
                  .tcp: (0..<12).map { _ in UInt8.random(in: 0...255, using: &rng) }]
    }

    /// The gateway of the default route and our address toward it; nil without a default route.
    package static func findGateway(loop: any EventLoop) async -> (gateway: IPAddress, client: IPAddress)? {
        guard let gateway = DefaultGateway.ipv4() else { return nil }
        guard let ch = try? await DatagramBootstrap(group: loop).connect(to: gateway.socketAddress(port: NATPMP.port)).get() else { return nil }
        defer { ch.close(promise: nil) }
        guard let local = ch.localAddress.flatMap(IPAddress.init) else { return nil }
        return (gateway, local)
    }

    enum Outcome: Sendable { case mapped([PortMappingInfo], UPnPGateway?), failed(String) }

    /// Maps UDP and TCP of `internalPort` by whichever rung answers first.
    package func map() async throws -> [PortMappingInfo] {
        released = false
        let first: Outcome = await withTaskGroup(of: Outcome.self) { group in
            group.addTask { await self.mapWithGatewayProtocols() }
            group.addTask { await self.mapWithUPnP() }
            var reasons: [String] = []
            var winner: Outcome?
            for await outcome in group {
                switch outcome {
                case .mapped(let m, let device):
                    if winner == nil {
                        winner = outcome
                    } else {
                        // Both mapped: keep the first, give the other back unless it is the same mapping.
                        let kept: [PortMappingInfo] = if case .mapped(let w, _)? = winner { w } else { [] }
                        for extra in m where !kept.contains(where: { $0.proto == extra.proto && $0.externalPort == extra.externalPort }) {
                            await self.delete(extra, device: device)
                        }
                    }
                case .failed(let why):
                    reasons.append(why)
                }
            }
            return winner ?? .failed(reasons.joined(separator: "; "))
        }
        switch first {
        case .mapped(let m, let device):
            mappings = m
            upnp = device
            renewedAt = .now
            return m
        case .failed(let why):
            throw PortMappingFailure(reasons: [why])
        }
    }

    private func mapWithGatewayProtocols() async -> Outcome {
        let mapper = GatewayMapper(gateway: gateway, client: client, loop: loop)
        var out: [PortMappingInfo] = []
        for p in [MappingProtocol.udp, .tcp] {
            do {
                let (m, via) = try await mapper.map(p, internalPort: internalPort, suggestedExternal: out.first?.externalPort ?? internalPort,
                                                    lifetime: lease, nonce: nonces[p] ?? [])
                noteEpoch(m.epoch)
                out.append(PortMappingInfo(proto: p, internalPort: m.internalPort, externalPort: m.externalPort, externalIP: m.externalIP,
                                           lifetime: m.lifetime, method: via == .pcp ? .pcp : .natPMP))
            } catch {
                for m in out { await delete(m, device: nil) }
                return .failed("PCP/NAT-PMP at \(gateway): \(error)")
            }
        }
        return .mapped(out, nil)
    }

    private func mapWithUPnP() async -> Outcome {
        do {
            let device = try await UPnPGateway.discover(on: loop, preferred: gateway)
            var out: [PortMappingInfo] = []
            let external = try? await device.externalAddress()
            for p in [MappingProtocol.udp, .tcp] {
                do {
                    let port = try await device.addMapping(p, externalPort: out.first?.externalPort ?? internalPort, internalPort: internalPort,
                                                           client: client, lease: min(lease, 3600), description: "SwiftP2P \(p)")
                    out.append(PortMappingInfo(proto: p, internalPort: internalPort, externalPort: port, externalIP: external,
                                               lifetime: min(lease, 3600), method: .upnp))
                } catch {
                    for m in out { await delete(m, device: device) }
                    throw error
                }
            }
            return .mapped(out, device)
        } catch {
            return .failed("UPnP: \(error)")
        }
    }

    /// A NAT-PMP/PCP epoch that fell behind the time passed means the gateway lost its state.
    private func noteEpoch(_ epoch: UInt32) {
        lastEpoch = epoch
        epochAt = .now
    }

    private func epochRegressed(_ epoch: UInt32) -> Bool {
        guard let last = lastEpoch, let at = epochAt else { return false }
        let elapsed = Double((ContinuousClock.now - at).components.seconds)
        // RFC 6886 §3.6: the new epoch should be at least previous + 7/8 of the time passed (−2 s).
        return Double(epoch) < Double(last) + elapsed * 7 / 8 - 2
    }

    /// What `check()` found.
    package enum Health: Sendable, Equatable {
        /// The mappings are in place (renewed if due).
        case ok
        /// The gateway had lost them (or rebooted); they are mapped again, perhaps on other ports.
        case restored([PortMappingInfo])
        /// The gateway did not answer, or refused.
        case failed(String)
    }

    /// Makes sure the mappings still exist: PCP/NAT-PMP mappings are requested again (the
    /// protocols' own renewal, idempotent, and it re-creates a lost mapping); UPnP mappings are
    /// looked up and added again if gone. Renews when half the lease has passed.
    package func check() async -> Health {
        guard !released, !mappings.isEmpty else { return .failed("no mappings") }
        let before = mappings
        do {
            if let device = upnp {
                let due = lease != 0 && ContinuousClock.now - renewedAt > .seconds(Int64(min(lease, 3600) / 2))
                var lost = false
                for m in mappings {
                    let present = try await device.hasMapping(m.proto, externalPort: m.externalPort)
                    if !present || due {
                        lost = lost || !present
                        let port = try await device.addMapping(m.proto, externalPort: m.externalPort, internalPort: m.internalPort, client: client,
                                                               lease: m.lifetime, description: "SwiftP2P \(m.proto)")
                        if let i = mappings.firstIndex(of: m) { mappings[i].externalPort = port }
                    }
                }
                if due { renewedAt = .now }
                return lost || mappings != before ? .restored(mappings) : .ok
            }
            let mapper = GatewayMapper(gateway: gateway, client: client, loop: loop)
            var regressed = false
            for (i, m) in mappings.enumerated() {
                let (fresh, via) = try await mapper.map(m.proto, internalPort: m.internalPort, suggestedExternal: m.externalPort,
                                                        lifetime: lease, nonce: nonces[m.proto] ?? [])
                regressed = regressed || epochRegressed(fresh.epoch)
                noteEpoch(fresh.epoch)
                mappings[i] = PortMappingInfo(proto: m.proto, internalPort: fresh.internalPort, externalPort: fresh.externalPort,
                                              externalIP: fresh.externalIP ?? m.externalIP, lifetime: fresh.lifetime, method: via == .pcp ? .pcp : .natPMP)
            }
            renewedAt = .now
            return regressed || mappings != before ? .restored(mappings) : .ok
        } catch {
            return .failed("\(error)")
        }
    }

    /// Deletes every mapping (at shutdown, or when the node found another way).
    package func release() async -> [String] {
        released = true
        var problems: [String] = []
        for m in mappings {
            if let why = await delete(m, device: upnp) { problems.append(why) }
        }
        mappings = []
        return problems
    }

    @discardableResult
    private func delete(_ m: PortMappingInfo, device: UPnPGateway?) async -> String? {
        do {
            switch m.method {
            case .upnp:
                guard let device else { return "no UPnP device to delete \(m.proto) \(m.externalPort) on" }
                try await device.deleteMapping(m.proto, externalPort: m.externalPort)
            case .pcp, .natPMP:
                _ = try await GatewayMapper(gateway: gateway, client: client, loop: loop)
                    .map(m.proto, internalPort: m.internalPort, suggestedExternal: 0, lifetime: 0, nonce: nonces[m.proto] ?? [])
            }
            return nil
        } catch {
            return "deleting \(m.method) \(m.proto) \(m.externalPort): \(error)"
        }
    }
}
