import NIOCore

/// The wire ids of the kernel's own commands, derived from their names like any plugin's.
struct KernelCommandIDs: Sendable {
    let ping = CommandID.derive(from: KernelCommands.ping)
    let neighbors = CommandID.derive(from: KernelCommands.neighbors)
    let quit = CommandID.derive(from: KernelCommands.quit)
    let discover = CommandID.derive(from: KernelCommands.discover)
    let punch = CommandID.derive(from: KernelCommands.punch)
}

/// The commands every node answers. They go through the registry like any plugin's.
public enum KernelCommands {
    public static let ping = "kernel.ping"
    public static let neighbors = "kernel.neighbors"
    public static let quit = "kernel.quit"
    public static let discover = "kernel.discover"

    static let handlers: [any CommandHandler] = [Ping(), Neighbors(), Quit(), Discover(), Observe(), Probe(), ProbeFor(), RelayRequest(), PunchRequest()]

    /// Answers `ok`: the sender learns we are alive (and, from the reply header, our id).
    struct Ping: CommandHandler {
        let name = KernelCommands.ping
        func handle(_ request: Message, context: CommandContext) -> CommandResult { .reply(Reply()) }
    }

    /// Answers with the k verified peers closest to the key in the first key section.
    struct Neighbors: CommandHandler {
        let name = KernelCommands.neighbors
        func handle(_ request: Message, context: CommandContext) -> CommandResult {
            guard let key = request.firstKeys?.first else { return .reply(.error(.badRequest, "neighbors needs a key")) }
            let k = context.node.config.routing.resultSize
            var peers = context.node.peerMap.closest(to: key, count: k + 1)
            peers.removeAll { $0.id == request.sender.id }
            if peers.count > k { peers.removeLast(peers.count - k) }
            // A plugin's question rides along: [keys, integer(question id), question sections…].
            if request.payload.count > 1, case .integer(let q) = request.payload[1], let id = UInt16(exactly: q),
               let handler = context.node.registry.questionHandler(for: id),
               let answer = handler.answer(Array(request.payload.dropFirst(2)), key: key, context: context) {
                return .reply(Reply(payload: [.peers(peers), .integer(q)] + answer))
            }
            return .reply(Reply(payload: [.peers(peers)]))
        }
    }

    /// The sender leaves: remove it from the map, and its sessions, at once.
    struct Quit: CommandHandler {
        let name = KernelCommands.quit
        func handle(_ request: Message, context: CommandContext) -> CommandResult {
            context.node.peerMap.peerFailed(request.sender.id, reason: .quit)
            context.node.kernel.sessions.forgetSessions(of: request.sender.id)
            context.node.kernel.paths.dropUDPPath(request.sender.id)
            if let nonce = context.node.kernel.punch.punchByPeer[request.sender.id] { context.node.kernel.punch.endPunch(nonce, why: "the peer quit", quiet: true) }
            return .reply(Reply())
        }
    }

    /// Tells the sender the address it was seen from, after probing it back there over UDP and
    /// TCP. Result integer: bit 0 UDP probe answered, bit 1 TCP.
    ///
    /// The probes go only to the source of the request (its IP and source port; a node listens
    /// for TCP on its UDP port), never to ports the sender names, so discover cannot aim traffic at
    /// a third party; and each source gets a few discovers a second (`NodeLimits.discoversPerSecond`).
    struct Discover: CommandHandler {
        let name = KernelCommands.discover
        func handle(_ request: Message, context: CommandContext) -> CommandResult {
            let node = context.node
            let sender = request.sender
            guard context.transport == .udp else {
                return .reply(.error(.badRequest, "discover runs over UDP: the probe goes back to the datagram's source"))
            }
            let source = SourceKey.of(sender.ip, port: context.sourcePort)
            guard node.kernel.prober.discoverBuckets.allow(source, nowNanoseconds: node.clock.uptimeNanoseconds) else {
                return .reply(.error(.denied, "busy: more than \(node.config.limits.discoversPerSecond) discovers a second from this source"))
            }
            let observed = PeerSocketAddress(ip: sender.ip, port: context.sourcePort)
            let probeTimeout = min(node.config.requestTimeout / 2, .seconds(2))
            let udp = node.kernel.rpc.requestOnLoop(target: observed, expectedID: sender.id, command: node.kernel.commands.ping, payload: [],
                                         transport: .udp, timeout: probeTimeout)
                .map { _ in 1 as Int64 }.recover { _ in 0 }
            let tcp = node.kernel.rpc.requestOnLoop(target: observed, expectedID: sender.id, command: node.kernel.commands.ping, payload: [],
                                         transport: .tcp, timeout: probeTimeout)
                .map { _ in 2 as Int64 }.recover { _ in 0 }
            let reply = udp.and(tcp).map { u, t in
                Reply(payload: [.peers([PeerAddress(id: sender.id, socket: observed, flags: sender.flags)]), .integer(u | t)])
            }
            return .future(reply)
        }
    }
}
