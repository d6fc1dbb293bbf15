import NIOCore

/// Hole punching: a direct path between two relayed peers, both behind NATs, agreed through the
/// relays they already use (so no other rendezvous is needed).
///
/// ```
///  I (initiator)                         through R's relays                       R
///  CONNECT {nonce, class, ext UDP, TCP} ──────────────────────────────────────▶  checks, keeps the nonce
///                                      ◀────────────────────────────────────── {class, ext UDP, TCP}
///  RTT measured; SYNC {nonce} ────────────────────────────────────────────────▶  fires at once
///  fires RTT/2 later
///  both consistent:   UDP  PUNCH(nonce) every 50 ms from the node socket to the other's ext UDP
///                     TCP  dial from the listen port to the other's ext TCP, again 100 ms after
///                          a refusal (simultaneous open: whichever socket completes is the path)
///  one symmetric (S): S opens `birthdaySockets` sockets, each sends PUNCH to the other's ext UDP;
///                     the other sprays PUNCH at random ports of S's IP (`birthdayProbes` at most)
///  first PUNCH from the peer's IP with the nonce → the path (answered, so the other side learns
///  it too) → a ping in the session over it → the path carries the peer's traffic
/// ```
/// The peer's IP is never its claim: it is the IP its relay saw (the sender IP of the relayed
/// messages); only the ports are claimed. A punch lasts `NATConfig.punchBudget`; bounded per node
/// (`NodeLimits.maxPunchesInProgress`, `punchesPerMinute`, `maxBirthdaysInProgress`) and per peer
/// (`NATConfig.punchRetryAfter`). When both sides are symmetric nobody punches (their flags say so).
/// Either side may begin, after any exchange through relays; if both do at once, the lower id's
/// punch goes on.
enum PunchPacket {
    static let kind = PacketKind.punch.rawValue
    static let bytes = 10

    static func make(_ nonce: UInt64, answer: Bool) -> ByteBuffer {
        var b = ByteBufferAllocator().buffer(capacity: bytes)
        b.writeInteger(kind)
        b.writeInteger(nonce)
        b.writeInteger(UInt8(answer ? 1 : 0))
        return b
    }

    static func decode(_ b: ByteBuffer) -> (nonce: UInt64, answer: Bool)? {
        guard b.readableBytes == bytes, b.getInteger(at: b.readerIndex, as: UInt8.self) == kind,
              let nonce = b.getInteger(at: b.readerIndex + 1, as: UInt64.self),
              let flags = b.getInteger(at: b.readerIndex + 9, as: UInt8.self), flags <= 1 else { return nil }
        return (nonce, flags == 1)
    }
}

/// How a NAT maps, as far as punching cares.
enum PunchClass: Int64, Sendable {
    /// One external port for every destination (port-preserving or consistent).
    case consistent = 1
    /// Another external port per destination.
    case symmetric = 2
}

extension PeerFlags {
    /// The punch class a relayed peer announces, if any.
    var punchClass: PunchClass? {
        if contains(.punchable) { return .consistent }
        if contains(.symmetricNAT) { return .symmetric }
        return nil
    }
}

/// How a direct path to a relayed peer came about.
public enum DirectPathMethod: String, Sendable, Equatable {
    /// The relayed peer connected to us (we are reachable).
    case reverseConnection = "reverse connection"
    /// Both sides sent at once through consistent NATs (UDP), or opened TCP simultaneously.
    case holePunch = "hole punching"
    /// One side symmetric: many sockets on its side, sprayed ports from the other.
    case birthday = "birthday probing"
}

/// A direct path to a relayed peer, proven by a ping in the session over it.
public struct DirectPath: Sendable, Equatable, CustomStringConvertible {
    public var peer: Number160
    public var transport: TransportKind
    public var method: DirectPathMethod
    /// Where the peer is reached on this path.
    public var remote: String
    /// From the start of the punch (or the connection) to the proving ping's answer.
    public var milliseconds: Double

    public var description: String {
        "direct path to \(peer) over \(transport) by \(method.rawValue) (\(remote), \(Int(milliseconds.rounded())) ms)"
    }
}

/// One punch in progress (by nonce).
struct Punch {
    let peer: PeerAddress
    let initiator: Bool
    let mine: PunchClass
    let theirs: PunchClass
    /// The peer's IP with its claimed ports (UDP nil while unknown or when it is symmetric; TCP
    /// only when both sides are consistent).
    var udpTarget: Endpoint?
    var tcpTarget: Endpoint?
    let created: NIODeadline
    var started: NIODeadline?
    var udpDone = false
    var tcpDone = false
    var sent = 0
    var tcpAttempts = 0
    var sockets: [any DatagramSocket] = []
    var expiry: Scheduled<Void>?
    var spray: RepeatedTask?

    var birthday: Bool { mine == .symmetric || theirs == .symmetric }
    var wantsTCP: Bool { mine == .consistent && theirs == .consistent }
    var done: Bool { udpDone && (!wantsTCP || tcpDone) }
}

/// Hole punching, both sides: the punches in progress, their limits, and the paths they install
/// into the `PathTable` when something comes through. Confined to the node's event loop.
final class HolePuncher: KernelPart, @unchecked Sendable {
    private var link = KernelLink()
    @inline(__always) var kernel: Kernel { link.value }
    func attach(_ kernel: Kernel) { link.set(kernel) }

    /// Punches in progress by nonce, which peer each is with, and when each peer was last punched to.
    var punches: [UInt64: Punch] = [:]
    var punchByPeer: [Number160: UInt64] = [:]
    var punchTried: [Number160: UInt32] = [:]
    var punchAnswered: [Number160: UInt32] = [:]
    /// Punches begun or answered in the last minute: when, and the other side's address group.
    var punchLog: [(at: UInt32, group: UInt64, peer: Number160)] = []
    /// PUNCH datagrams sent and TCP punch dials made, over the node's life.
    var punchPacketsSent = 0
    var punchDials = 0

    /// Our punch class, when we are relayed behind a NAT the ladder classified.
    var ownPunchClass: PunchClass? {
        guard selfAddress.flags.contains(.relayed) else { return nil }
        return selfAddress.flags.punchClass
    }

    /// Our external ports as observed (the ladder's report).
    private var ownExternalPorts: (udp: UInt16, tcp: UInt16)? {
        guard let ext = node.nat.observedExternal else { return nil }
        return (ext.udpPort, ext.tcpPort)
    }

    private var punchRetrySeconds: UInt32 { UInt32(max(5, config.nat.punchRetryAfter.components.seconds)) }

    /// Why a punch with `peer` at `ip` may not begin now (nil: it may): one begun and one
    /// answered per peer per `punchRetryAfter`, per node at once and per minute, per address
    /// group (/24, /48) per minute, birthdays at once.
    func punchRefusal(_ peer: Number160, ip: IPAddress, birthday: Bool, answering: Bool = true, perPeer: Bool = true) -> String? {
        let now = coarseSeconds
        if perPeer, let last = (answering ? punchAnswered : punchTried)[peer], now &- last < punchRetrySeconds {
            return "punched to this peer \(now &- last) s ago"
        }
        let limits = config.limits
        guard punches.count < limits.maxPunchesInProgress else { return "busy: \(limits.maxPunchesInProgress) punches in progress" }
        if punchLog.first.map({ now &- $0.at >= 60 }) == true { punchLog.removeAll { now &- $0.at >= 60 } }
        let counted = punchLog.contains { $0.peer == peer }
        guard counted || punchLog.count < limits.punchesPerMinute else { return "busy: \(limits.punchesPerMinute) punches in the last minute" }
        if let group = ip.sybilGroup, !counted, punchLog.count(where: { $0.group == group }) >= limits.punchesPerMinutePerIPGroup {
            return "busy: \(limits.punchesPerMinutePerIPGroup) punches with \(ip)'s network in the last minute"
        }
        if birthday, punches.values.count(where: \.birthday) >= limits.maxBirthdaysInProgress {
            return "busy: a birthday punch is in progress"
        }
        return nil
    }

    /// Books a punch with `peer` (begun or answered) against the limits.
    func notePunch(_ peer: Number160, ip: IPAddress, answering: Bool) {
        let now = coarseSeconds
        if answering { punchAnswered[peer] = now } else { punchTried[peer] = now }
        // One entry per peer a minute: the limits count peers punched with, not attempts.
        if !punchLog.contains(where: { $0.peer == peer }) { punchLog.append((now, ip.sybilGroup ?? 0, peer)) }
        let retry = punchRetrySeconds
        if punchTried.count + punchAnswered.count > 2 * config.limits.punchesPerMinute {
            punchTried = punchTried.filter { now &- $0.value < retry }
            punchAnswered = punchAnswered.filter { now &- $0.value < retry }
        }
    }

    /// Whether we may punch to `ip`: unicast, our socket's family (a send to another family
    /// fails in the kernel, which would close the UDP socket), and loopback only for a node on
    /// loopback.
    func punchable(_ ip: IPAddress) -> Bool {
        ip.isUnicast && (ip.isV4 || !transport.isIPv4) && (!ip.isLoopback || node.boundToLoopback)
    }

    /// After a request from `peer` came down one of our relay links: punch a direct path when
    /// both of us are relayed behind NATs that allow it and the pair lacks one. Only then: the IP
    /// punched to is the one our own relay saw (a relay the peer named could say anything).
    func considerPunch(with peer: PeerAddress) {
        guard config.nat.holePunching, peer.flags.contains(.relayed), let theirs = peer.flags.punchClass, let mine = ownPunchClass,
              !(mine == .symmetric && theirs == .symmetric), kernel.sessions.enabled, running, peer.id != peerID,
              punchByPeer[peer.id] == nil else { return }
        // A path for each transport the pair allows: UDP always, TCP when both are consistent.
        let haveUDP = kernel.paths.udpPaths[peer.id] != nil
        guard !haveUDP || (mine == .consistent && theirs == .consistent && kernel.paths.directPaths[peer.id] == nil) else { return }
        if let why = punchRefusal(peer.id, ip: peer.ip, birthday: mine == .symmetric || theirs == .symmetric, answering: false) {
            logger.trace("no punch", metadata: ["peer": "\(peer.id)", "why": "\(why)"])
            return
        }
        guard punchable(peer.ip), let ports = ownExternalPorts else { return }
        var fresh: UInt64
        repeat { fresh = UInt64(kernel.rpc.randomIDs.next()) << 32 | UInt64(kernel.rpc.randomIDs.next()) } while fresh == 0 || punches[fresh] != nil
        let nonce = fresh
        notePunch(peer.id, ip: peer.ip, answering: false)
        punches[nonce] = Punch(peer: peer, initiator: true, mine: mine, theirs: theirs, created: clock.now)
        punches[nonce]?.udpDone = haveUDP
        punchByPeer[peer.id] = nonce
        expirePunch(nonce, in: config.nat.punchBudget * 2)
        let sent = clock.now
        let connect: [Payload] = [.integer(0), .integer(Int64(bitPattern: nonce)), .integer(mine.rawValue),
                                  .integer(Int64(ports.udp)), .integer(Int64(ports.tcp))]
        let command = kernelCommands.punch
        kernel.rpc.requestOnLoop(target: peer.socket, expectedID: peer.id, command: command, payload: connect, transport: .udp,
                      timeout: config.nat.punchBudget).whenComplete { [self] result in
            guard var p = punches[nonce] else { return }
            let reply: Message
            switch result {
            case .failure(let error): return endPunch(nonce, why: "CONNECT: \(error)")
            case .success(let m): reply = m
            }
            if let error = RPCError.from(reply: reply) {
                if case .denied(let text) = error, text == HolePuncher.punchYield {
                    // Its punch with us goes on instead: this one was never a try.
                    punchTried[peer.id] = nil
                    return endPunch(nonce, why: "the peer's punch goes on", quiet: true)
                }
                // Refused before anything was sent: the peer may be asked again 5 s on.
                punchTried[peer.id] = coarseSeconds &- punchRetrySeconds &+ 5
                return endPunch(nonce, why: "CONNECT refused: \(error)")
            }
            // Its terms must be those its flags announced (the limits were checked for those).
            guard let (cls, udp, tcp) = HolePuncher.punchTerms(reply.payload, from: 0), cls == theirs else {
                return endPunch(nonce, why: "CONNECT: an answer with other terms than the peer announced")
            }
            (p.udpTarget, p.tcpTarget) = HolePuncher.punchTargets(ip: peer.ip, mine: mine, theirs: theirs, udp: udp, tcp: tcp)
            punches[nonce] = p
            let rtt = clock.now - sent
            let sync: [Payload] = [.integer(1), .integer(Int64(bitPattern: nonce))]
            kernel.rpc.requestOnLoop(target: peer.socket, expectedID: peer.id, command: command, payload: sync, transport: .udp,
                          timeout: config.nat.punchBudget).whenComplete { _ in }
            // The SYNC reaches the peer in about half the round trip: fire then, together.
            _ = eventLoop.scheduleTask(in: .nanoseconds(rtt.nanoseconds / 2)) { [self] in beginPunch(nonce) }
        }
    }

    /// The answer to a CONNECT that crossed ours, when our id is the lower: ours goes on.
    static let punchYield = "busy: our punch with you is in progress"

    /// `class, UDP port, TCP port` from integers at `from` on; ports of a consistent side non-zero.
    static func punchTerms(_ payload: [Payload], from: Int) -> (PunchClass, UInt16, UInt16)? {
        let ints = payload.compactMap { p -> Int64? in if case .integer(let v) = p { v } else { nil } }
        guard ints.count == from + 3, let cls = PunchClass(rawValue: ints[from]),
              let udp = UInt16(exactly: ints[from + 1]), let tcp = UInt16(exactly: ints[from + 2]) else { return nil }
        if cls == .consistent, udp == 0 || tcp == 0 { return nil }
        return (cls, udp, tcp)
    }

    /// Where to send: the peer's UDP port unless it is symmetric (then random ports of its IP),
    /// its TCP port only when both sides are consistent.
    static func punchTargets(ip: IPAddress, mine: PunchClass, theirs: PunchClass, udp: UInt16, tcp: UInt16) -> (Endpoint?, Endpoint?) {
        let u = theirs == .consistent ? Endpoint(ip: ip, port: udp) : nil
        let t = mine == .consistent && theirs == .consistent ? Endpoint(ip: ip, port: tcp) : nil
        return (u, t)
    }

    /// CONNECT from `sender` (its IP as our relay, or its own datagrams, reported it): keeps the
    /// punch, answers our terms.
    func answerPunch(_ payload: [Payload], from sender: PeerAddress) -> Reply {
        guard kernel.sessions.enabled else { return .error(.denied, "punching needs authenticated kernel.sessions.table") }
        guard config.nat.holePunching, let mine = ownPunchClass, let ports = ownExternalPorts else {
            return .error(.denied, "this node does not punch (not relayed behind a classified NAT)")
        }
        let ints = payload.compactMap { p -> Int64? in if case .integer(let v) = p { v } else { nil } }
        guard ints.count == 5, ints[0] == 0, ints[1] != 0, let (theirs, udp, tcp) = HolePuncher.punchTerms(payload, from: 2) else {
            return .error(.badRequest, "CONNECT needs phase 0, a nonce, a class and two ports")
        }
        guard theirs == sender.flags.punchClass else { return .error(.badRequest, "CONNECT with another class than the sender's flags say") }
        guard punchable(sender.ip) else { return .error(.badRequest, "\(sender.ip) cannot be punched to from here") }
        guard !(mine == .symmetric && theirs == .symmetric) else { return .error(.denied, "both NATs are symmetric: no punch") }
        let nonce = UInt64(bitPattern: ints[1])
        var superseded = false
        if let other = punchByPeer[sender.id], let p = punches[other] {
            // Both began at once: the lower id's punch goes on.
            if p.initiator, peerID < sender.id { return .error(.denied, HolePuncher.punchYield) }
            guard p.initiator, p.started == nil else { return .error(.denied, "busy: a punch with you is in progress") }
            endPunch(other, why: "superseded by the peer's", quiet: true)
            superseded = true
        }
        guard punches[nonce] == nil else { return .error(.denied, "nonce in use") }
        if let why = punchRefusal(sender.id, ip: sender.ip, birthday: mine == .symmetric || theirs == .symmetric, perPeer: !superseded) {
            return .error(.denied, why)
        }
        var p = Punch(peer: sender, initiator: false, mine: mine, theirs: theirs, created: clock.now)
        p.udpDone = kernel.paths.udpPaths[sender.id] != nil
        (p.udpTarget, p.tcpTarget) = HolePuncher.punchTargets(ip: sender.ip, mine: mine, theirs: theirs, udp: udp, tcp: tcp)
        punches[nonce] = p
        punchByPeer[sender.id] = nonce
        notePunch(sender.id, ip: sender.ip, answering: true)
        // The SYNC comes within a round trip; without it the punch is dropped.
        expirePunch(nonce, in: config.nat.punchBudget * 2)
        return Reply(payload: [.integer(mine.rawValue), .integer(Int64(ports.udp)), .integer(Int64(ports.tcp))])
    }

    /// SYNC from `sender`: fire now.
    func syncPunch(_ payload: [Payload], from sender: PeerAddress) -> Reply {
        let ints = payload.compactMap { p -> Int64? in if case .integer(let v) = p { v } else { nil } }
        guard ints.count == 2, ints[0] == 1 else { return .error(.badRequest, "SYNC needs phase 1 and a nonce") }
        let nonce = UInt64(bitPattern: ints[1])
        guard let p = punches[nonce], p.peer.id == sender.id, !p.initiator else { return .error(.notFound, "no punch with that nonce") }
        if p.started == nil { beginPunch(nonce) }
        return Reply()
    }

    private func expirePunch(_ nonce: UInt64, in d: Duration) {
        punches[nonce]?.expiry?.cancel()
        punches[nonce]?.expiry = eventLoop.scheduleTask(in: TimeAmount(d)) { [self] in endPunch(nonce, why: "time is up") }
    }

    private func beginPunch(_ nonce: UInt64) {
        guard var p = punches[nonce], p.started == nil, running else { return }
        p.started = clock.now
        punches[nonce] = p
        // Already direct (its packets came first): nothing to send.
        if p.done { return finishIfDone(nonce) }
        expirePunch(nonce, in: config.nat.punchBudget)
        let cfg = config.nat
        switch (p.mine, p.theirs) {
        case (.consistent, .consistent):
            dialPunch(nonce)
            guard let target = p.udpTarget, !p.udpDone else { break }
            punches[nonce]?.spray = eventLoop.scheduleRepeatedTask(initialDelay: .zero, delay: .milliseconds(50)) { [self] task in
                guard let q = punches[nonce], !q.udpDone, let udp = transport.mainSocket else { return task.cancel() }
                punches[nonce]?.sent += 1
                punchPacketsSent += 1
                udp.send(PunchPacket.make(nonce, answer: false), to: target, promise: nil)
            }
        case (.consistent, .symmetric):
            // Spray random ports of its IP from our socket: one of its many mappings answers.
            let ip = p.peer.ip
            let tick = 5
            let perTick = max(1, cfg.birthdayProbes * tick / max(tick, Int(ReachabilityReport.ms(cfg.punchBudget))))
            punches[nonce]?.spray = eventLoop.scheduleRepeatedTask(initialDelay: .zero, delay: .milliseconds(Int64(tick))) { [self] task in
                guard let q = punches[nonce], !q.udpDone, q.sent < cfg.birthdayProbes, let udp = transport.mainSocket else { return task.cancel() }
                let n = min(perTick, cfg.birthdayProbes - q.sent)
                var rng = random.generator
                for _ in 0..<n {
                    udp.send(PunchPacket.make(nonce, answer: false), to: Endpoint(ip: ip, port: UInt16.random(in: 1024...65535, using: &rng)), promise: nil)
                }
                punches[nonce]?.sent += n
                punchPacketsSent += n
            }
        case (.symmetric, .consistent):
            guard let target = p.udpTarget else { break }
            openBirthdaySockets(nonce, toward: target, count: cfg.birthdaySockets)
        case (.symmetric, .symmetric):
            endPunch(nonce, why: "both NATs symmetric")
        }
    }

    /// The symmetric side: many sockets, each opening its own mapping toward the peer.
    private func openBirthdaySockets(_ nonce: UInt64, toward target: Endpoint, count: Int) {
        for _ in 0..<count {
            transport.openDatagramSocket().whenComplete { [self] result in
                guard case .success(let socket) = result else { return }
                guard punches[nonce].map({ !$0.udpDone }) == true, running else { return socket.close() }
                punches[nonce]?.sockets.append(socket)
                punches[nonce]?.sent += 1
                punchPacketsSent += 1
                socket.send(PunchPacket.make(nonce, answer: false), to: target, promise: nil)
            }
        }
    }

    /// TCP: dial the peer's port from our listen port until a connection stands or time is up.
    private func dialPunch(_ nonce: UInt64) {
        guard let p = punches[nonce], !p.tcpDone, let target = p.tcpTarget, let started = p.started, running else { return }
        if kernel.paths.directPaths[p.peer.id] != nil {
            // Its SYN reached our listener first: the accepted connection is the path.
            punches[nonce]?.tcpDone = true
            return finishIfDone(nonce)
        }
        let left = started + TimeAmount(config.nat.punchBudget) - clock.now
        guard left > .milliseconds(50) else { return }
        punches[nonce]?.tcpAttempts += 1
        punchDials += 1
        transport.connect(to: target, timeout: left, fromListenPort: true, raw: nil)
            .whenComplete { [self] result in
                switch result {
                case .success(let c):
                    guard let q = punches[nonce], !q.tcpDone, kernel.paths.directPaths[q.peer.id] == nil else { return c.close() }
                    punches[nonce]?.tcpDone = true
                    adoptPunchedConnection(c, peer: q.peer, started: q.created)
                case .failure:
                    // Refused (its NAT or host answered before its own SYN went out) or the
                    // 4-tuple is taken (its SYN got in as an accepted connection): again soon.
                    _ = eventLoop.scheduleTask(in: .milliseconds(100)) { [self] in dialPunch(nonce) }
                }
            }
    }

    /// A punched TCP connection: the peer's path once a ping in the session over it comes back.
    private func adoptPunchedConnection(_ ch: any PeerConnection, peer: PeerAddress, started: NIODeadline) {
        kernel.paths.installDirectPath(peer.id, connection: ch)
        let remote = "\(ch.remote)"
        kernel.rpc.requestOnLoop(target: peer.socket, expectedID: peer.id, command: kernelCommands.ping, payload: [], transport: .tcp,
                      timeout: config.nat.punchBudget).whenComplete { [self] result in
            // The answer proves the path only if it came over it (the connection still stands).
            guard case .success(let reply) = result, reply.type == .ok, let c = kernel.paths.directPaths[peer.id], c === ch, ch.isActive else {
                if let c = kernel.paths.directPaths[peer.id], c === ch { kernel.paths.directPaths[peer.id] = nil }
                return ch.close()
            }
            announcePath(DirectPath(peer: peer.id, transport: .tcp, method: .holePunch, remote: remote, milliseconds: ms(since: started)))
            if let nonce = punchByPeer[peer.id] { finishIfDone(nonce) }
        }
    }

    /// Once every path the punch wants is proven it ends, a moment later (late packets are answered till then).
    func finishIfDone(_ nonce: UInt64) {
        guard let p = punches[nonce], p.done else { return }
        expirePunch(nonce, in: .milliseconds(500))
    }

    /// A PUNCH on `channel` (the node's socket or a birthday socket) from `remote`.
    func receivedPunch(_ buffer: ByteBuffer, from remote: Endpoint, socket: any DatagramSocket) {
        guard let (nonce, answer) = PunchPacket.decode(buffer), let p = punches[nonce], remote.ip == p.peer.ip else {
            return countDrop("punch packet from \(remote) for no punch with it")
        }
        if !answer {
            socket.send(PunchPacket.make(nonce, answer: true), to: remote, promise: nil)
        }
        punchArrived(nonce, from: remote, socket: socket)
    }

    /// Something of the peer's came through the hole at `remote` on `channel`: that is the path
    /// (proven by a ping in the session over it before it is announced).
    private func punchArrived(_ nonce: UInt64, from remote: Endpoint, socket: any DatagramSocket) {
        guard let p = punches[nonce], !p.udpDone else { return }
        punches[nonce]?.udpDone = true
        punches[nonce]?.spray?.cancel()
        punches[nonce]?.spray = nil
        for s in p.sockets where s !== socket { s.close() }
        punches[nonce]?.sockets = p.sockets.filter { $0 === socket }
        kernel.paths.installUDPPath(p.peer.id, socket: socket === transport.mainSocket ? nil : socket, address: remote)
        let method: DirectPathMethod = p.birthday ? .birthday : .holePunch
        let (sent, started) = (p.sent, p.created)
        let seen = "\(remote)"
        kernel.rpc.requestOnLoop(target: p.peer.socket, expectedID: p.peer.id, command: kernelCommands.ping, payload: [], transport: .udp,
                      timeout: config.nat.punchBudget).whenComplete { [self] result in
            // Proven only if the answer came back while the path stood (it went over it).
            guard case .success(let reply) = result, reply.type == .ok, kernel.paths.udpPaths[p.peer.id]?.address == remote else {
                return kernel.paths.dropUDPPath(p.peer.id, ifTo: remote)
            }
            var path = DirectPath(peer: p.peer.id, transport: .udp, method: method, remote: seen, milliseconds: ms(since: started))
            if method == .birthday { path.remote += " after \(sent) kernel.prober.probes" }
            announcePath(path)
            finishIfDone(nonce)
        }
    }

    /// An authenticated request straight over UDP from `peer`, relayed like us, from `remote`:
    /// a hole its side punched (our punch may have ended before its answer came). Taken only
    /// from a peer we punch or punched with lately; its session proved the id, and the address
    /// is where its datagrams come from, as a reply to it goes.
    func noteUDPPath(_ peer: PeerAddress, remote: Endpoint, socket: (any DatagramSocket)?) {
        // (A path it already has was marked heard when the message was dispatched.)
        guard selfAddress.flags.contains(.relayed), !kernel.paths.relayRoutes.isEmpty, kernel.paths.relayRoutes[peer.id] != nil, kernel.sessions.enabled,
              kernel.paths.udpPaths[peer.id] == nil else { return }
        if let nonce = punchByPeer[peer.id], punches[nonce] != nil, let s = socket ?? transport.mainSocket {
            return punchArrived(nonce, from: remote, socket: s)
        }
        let now = coarseSeconds, recent = punchRetrySeconds
        guard [punchTried[peer.id], punchAnswered[peer.id]].contains(where: { $0.map { now &- $0 < recent } ?? false }) else { return }
        kernel.paths.installUDPPath(peer.id, socket: socket, address: remote)
        let method: DirectPathMethod = peer.flags.contains(.symmetricNAT) || selfAddress.flags.contains(.symmetricNAT) ? .birthday : .holePunch
        announcePath(DirectPath(peer: peer.id, transport: .udp, method: method,
                                remote: "\(remote), from its traffic", milliseconds: 0))
    }

    /// A datagram on a birthday socket: a PUNCH; the peer's traffic once the socket is its path;
    /// or, while the punch runs, the peer's first session packet (its answer to our PUNCH was
    /// lost) — then this socket is the path.
    func receivedOnPunchSocket(_ buffer: ByteBuffer, from remote: Endpoint, socket: any DatagramSocket) {
        guard running, let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return }
        if first == PunchPacket.kind {
            receivedPunch(buffer, from: remote, socket: socket)
        } else if let s = kernel.paths.punchSockets[remote], s === socket {
            kernel.received(buffer, from: remote, origin: .udp(remote))
        } else if let (nonce, _) = punches.first(where: { $0.value.sockets.contains { $0 === socket } }),
                  let p = punches[nonce], !p.udpDone, remote.ip == p.peer.ip {
            punchArrived(nonce, from: remote, socket: socket)
            kernel.received(buffer, from: remote, origin: .udp(remote))
        } else {
            countDrop("datagram from \(remote) on a punch socket that is no path to it")
        }
    }

    func endPunch(_ nonce: UInt64, why: String, quiet: Bool = false) {
        guard let p = punches.removeValue(forKey: nonce) else { return }
        if punchByPeer[p.peer.id] == nonce { punchByPeer[p.peer.id] = nil }
        p.expiry?.cancel()
        p.spray?.cancel()
        let keep = kernel.paths.udpPaths[p.peer.id]?.socket
        for s in p.sockets where s !== keep { s.close() }
        guard !quiet else { return }
        let tcpDirect = p.tcpDone || kernel.paths.directPaths[p.peer.id] != nil
        let udp = p.udpDone ? "direct" : "not punched"
        let tcp = p.wantsTCP ? (tcpDirect ? ", tcp direct" : ", tcp not punched after \(p.tcpAttempts) dials") : ""
        if p.started == nil || !p.udpDone || (p.wantsTCP && !tcpDirect) {
            logger.info("hole punching to \(p.peer.id) ended: \(why); udp \(udp) (\(p.sent) packets)\(tcp)")
        } else {
            logger.debug("hole punching to \(p.peer.id) done", metadata: ["udp": "\(udp)", "tcp": "\(tcp)"])
        }
    }

    /// Ends every punch and drops every punched path (shutdown).
    func endAllPunches() {
        for nonce in Array(punches.keys).sorted() { endPunch(nonce, why: "the node stopped", quiet: true) }
    }

    func announcePath(_ path: DirectPath) {
        logger.info("\(path)")
        registry.publish(.directPath(path))
    }

    func ms(since t: NIODeadline) -> Double {
        Double((clock.now - t).nanoseconds) / 1e6
    }
}

extension KernelCommands {
    public static let punch = "kernel.punch"

    /// Hole punching between two relayed peers (see `PunchPacket`): phase 0 CONNECT (nonce,
    /// class, external UDP and TCP ports; answered with ours), phase 1 SYNC (nonce: fire now).
    /// Only in a session (the nonce must not leak); the peer's IP is the one its path reported.
    struct PunchRequest: CommandHandler {
        let name = KernelCommands.punch
        func handle(_ request: Message, context: CommandContext) -> CommandResult {
            let node = context.node
            guard case .integer(let phase)? = request.payload.first else { return .reply(.error(.badRequest, "punch needs a phase")) }
            switch phase {
            case 0: return .reply(node.kernel.punch.answerPunch(request.payload, from: request.sender))
            case 1: return .reply(node.kernel.punch.syncPunch(request.payload, from: request.sender))
            default: return .reply(.error(.badRequest, "punch phase \(phase) unknown"))
            }
        }
    }
}
