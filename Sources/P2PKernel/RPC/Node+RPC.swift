import NIOCore

/// Where a message came from, and so where its reply goes.
enum Origin {
    case udp(Endpoint)
    case tcp(any PeerConnection)
    /// From a relayed peer (its id), forwarded by one of its relays (see `RelayPacket`).
    case relayed(Number160, RelayVia)
    /// To us, a relayed peer, through our link to a relay: the relay's return token, the
    /// transport the sender used to reach the relay, and its address as the relay saw it.
    case link(any PeerConnection, token: UInt32, kind: TransportKind, source: Endpoint)

    /// The transport the sender used: sessions seal and open per transport.
    var kind: TransportKind {
        switch self {
        case .udp: .udp
        case .tcp: .tcp
        case .relayed(_, let via): via.kind
        case .link(_, _, let kind, _): kind
        }
    }
}

/// How a relay's packets reach us: datagrams from its UDP socket, or frames on our connection to it.
enum RelayVia {
    case udp(Endpoint)
    case tcp(any PeerConnection)
    var kind: TransportKind { if case .udp = self { .udp } else { .tcp } }
}

/// A request waiting for its reply.
struct PendingRequest {
    let promise: EventLoopPromise<Message>
    var timer: Scheduled<Void>?
    /// The id the reply must come from; zero when we do not know it yet (pinging an address).
    let expected: Number160
    /// The reply must come from here (UDP) or on the connection the request went out on (TCP).
    let target: PeerSocketAddress
    /// Kept so that a "retry over TCP" reply can re-send the same request.
    let command: UInt16
    let payload: [Payload]
    let timeout: Duration
    /// The encoded request, re-sent (sealed under a new counter) when a datagram is lost or the
    /// peer lost our session.
    let plaintext: ByteBuffer
    let transport: TransportKind
    /// The TCP connection the request went out on: its reply must come back on it, and its
    /// closing fails the request at once.
    var connection: ObjectIdentifier?
    /// Our index of the session the request went out in (zero: none yet, or insecure mode).
    var session: UInt64 = 0
    /// When it was sent (UDP requests, and every request when the node records metrics).
    var sent: NIODeadline = .uptimeNanoseconds(0)
    /// Whether it went out more than once (its reply then says nothing about the round trip).
    var resent = false
}

/// The round trip of this node's UDP requests, smoothed (RFC 6298's estimator, over every peer):
/// how soon a request with no reply is sent again. On loopback that is the floor, on a
/// continent-spanning link a few hundred milliseconds, and a lost datagram costs about one
/// round trip instead of a fixed second.
struct RTTEstimator {
    private var srtt: Int64 = 0
    private var rttvar: Int64 = 0
    private var samples = 0
    /// Never sooner than this: a busy peer (or machine) answers late without anything being lost.
    static let floor: Int64 = 200_000_000

    mutating func sample(_ rtt: TimeAmount) {
        let r = max(0, rtt.nanoseconds)
        if samples == 0 {
            srtt = r
            rttvar = r / 2
        } else {
            rttvar += (abs(srtt - r) - rttvar) / 4
            srtt += (r - srtt) / 8
        }
        samples &+= 1
    }

    /// When to send again: srtt + 4·rttvar, between the floor and `ceiling` (`ceiling` / 2 before
    /// any sample).
    func timeout(ceiling: Duration) -> TimeAmount {
        let cap = TimeAmount(ceiling).nanoseconds
        guard samples > 0 else { return .nanoseconds(max(Self.floor, cap / 2)) }
        return .nanoseconds(min(cap, max(Self.floor, srtt + 4 * rttvar)))
    }
}

/// How a request travels.
public enum TransportChoice: Sendable {
    /// UDP when the request fits one datagram, TCP otherwise.
    case auto
    case udp
    case tcp
}

extension Node {
    // MARK: inbound

    /// Every datagram and TCP frame starts here, on the node's event loop.
    func received(_ buffer: ByteBuffer, from remote: Endpoint, origin: Origin) {
        guard running, let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return }
        let ip = remote.ip
        if first == PacketKind.plaintext.rawValue {
            receivedPlaintext(buffer, ip: ip, remote: remote, origin: origin)
        } else if first >= ProbePacket.kind, first <= ObservePacket.answerKind {
            receivedNATPacket(first, buffer, remote: remote, origin: origin)
        } else if first >= RelayPacket.toRelay, first <= RelayPacket.fromRelay {
            receivedRelayPacket(first, buffer, remote: remote, origin: origin)
        } else if first == PunchPacket.kind {
            guard case .udp = origin, let udp = transport.mainSocket else {
                countDrop("punch packet from \(remote) not over UDP")
                return closeIfStream(origin)
            }
            receivedPunch(buffer, from: remote, socket: udp)
        } else if sessionsEnabled {
            receivedSessionPacket(buffer, ip: ip, remote: remote, origin: origin)
        } else {
            refuseHandshake(buffer, remote: remote, origin: origin)
        }
    }

    func receivedPlaintext(_ buffer: ByteBuffer, ip: IPAddress, remote: Endpoint, origin: Origin) {
        let networkID = config.networkID
        let decoded = buffer.withUnsafeReadableBytes { raw in
            Result { () throws(WireError) -> Message in try WireCodec.decode(raw, senderIP: ip, networkID: networkID) }
        }
        let message: Message
        switch decoded {
        case .success(let m): message = m
        case .failure(let error):
            countDrop("undecodable message from \(remote): \(error)")
            closeIfStream(origin)
            return
        }
        if sessionsEnabled {
            refusePlaintext(message, remote: remote, origin: origin)
        } else {
            dispatch(message, bytes: buffer.readableBytes, origin: origin, remote: remote, session: 0)
        }
    }

    /// A decoded message: from an authenticated session (`session` is our index of it) or, in
    /// insecure mode, in the clear.
    func dispatch(_ message: Message, bytes: Int, origin: Origin, remote: Endpoint, session: UInt64) {
        guard message.sender.id != peerID else { return }
        if let metrics {
            let s = metrics.series(message.command, registry: registry.commands)
            s.messagesIn.increment()
            s.bytesIn.increment(by: bytes)
        }
        authenticated(origin)
        if !udpPaths.isEmpty, case .udp(let remote) = origin { heardOverPath(message.sender.id, remote) }
        if message.type.isReply {
            completePending(message, origin: origin, remote: remote, session: session)
        } else {
            // A request names us or nobody (a ping to an address); anything else was meant for
            // another peer and is not answered.
            guard message.recipientID == peerID || message.recipientID == .zero else {
                countDrop("request for peer \(message.recipientID) from \(remote)")
                return
            }
            handleRequest(message, origin: origin, session: session)
        }
    }

    /// A reply completes its request only if it names us, comes from the peer asked (its proven
    /// id, in secure mode), and arrives from the address the request went to — or on the TCP
    /// connection it went out on. Anything else is dropped, so a guessed message id is not
    /// enough to answer someone else's request.
    private func completePending(_ reply: Message, origin: Origin, remote: Endpoint, session: UInt64) {
        guard let p = pending[reply.id] else { return }
        guard reply.recipientID == peerID, p.expected == .zero || p.expected == reply.sender.id else {
            countDrop("reply \(reply.id) from \(remote) names the wrong peers")
            return
        }
        switch origin {
        case .udp:
            let sameAddress = remote.port == p.target.udpPort && remote.ip == p.target.ip
            guard p.transport == .udp, sameAddress || (!udpPaths.isEmpty && p.expected != .zero && udpPaths[p.expected]?.address == remote) else {
                countDrop("reply \(reply.id) from \(remote), but the request went to \(p.target)")
                return
            }
        case .tcp(let connection):
            guard p.connection == ObjectIdentifier(connection) else {
                countDrop("reply \(reply.id) on another connection than its request")
                return
            }
        case .relayed(let peer, let via):
            // Through a relay of the peer asked: its session proved the id.
            let sameWay: Bool
            switch via {
            case .udp: sameWay = p.transport == .udp
            case .tcp(let connection): sameWay = p.connection == ObjectIdentifier(connection)
            }
            guard p.expected == peer, sameWay else {
                countDrop("relayed reply \(reply.id) for another request")
                return
            }
        case .link:
            countDrop("reply \(reply.id) through our relay: we send our requests directly")
            return
        }
        pending[reply.id] = nil
        releaseIfEmpty()
        p.timer?.cancel()
        if reply.type == .retryOverTCP, case .udp = origin {
            retryOverTCP(p)
            return
        }
        if reply.type == .sessionRequired {
            logRefusal("\(remote) requires authenticated sessions; this node runs insecure")
            p.promise.fail(RPCError.securityMismatch(peer: "\(p.target)", reason: "the peer requires authenticated sessions and this node runs insecure"))
            return
        }
        noteContact(reply.sender)
        if p.transport == .udp, !p.resent, case .udp = origin { rtt.sample(clock.now - p.sent) }
        if let metrics {
            metrics.series(p.command, registry: registry.commands).latency.recordNanoseconds(Int64(clamping: (clock.now - p.sent).nanoseconds))
        }
        p.promise.succeed(reply)
    }

    private func handleRequest(_ request: Message, origin: Origin, session: UInt64) {
        if request.command != kernelCommands.quit {
            noteContact(request.sender)
        }
        switch origin {
        case .udp(let remote):
            if !relayRoutes.isEmpty { noteUDPPath(request.sender, remote: remote, socket: punchSockets.isEmpty ? nil : punchSockets[remote]) }
        case .tcp: noteDirectPath(request.sender.id, origin: origin)
        case .link:
            considerReverseConnection(to: request.sender, origin: origin)
            if request.command != kernelCommands.quit { considerPunch(with: request.sender) }
        case .relayed:
            // Its relay is of its own choosing and says what IP it has: no punch on that word.
            if request.command == kernelCommands.punch {
                if request.type == .request { sendReply(.error(.denied, "punch through one of my relays"), to: request, origin: origin, session: session) }
                return
            }
        }
        guard let handler = registry.commands.handler(for: request.command) else {
            if request.type == .request {
                sendReply(.error(.unknownCommand, "no handler for command 0x\(String(request.command, radix: 16))"), to: request, origin: origin, session: session)
            }
            return
        }
        // A handler that answers later holds a place until it does: bounded per node and per peer.
        let sender = request.sender.id
        let perPeer = handlersPerPeer[sender.high] ?? 0
        guard handlersInFlight < config.limits.maxHandlersInFlight, perPeer < config.limits.maxHandlersInFlightPerPeer else {
            if request.type == .request {
                sendReply(.error(.denied, "busy: too many requests in progress"), to: request, origin: origin, session: session)
            }
            return
        }
        var connection: (any PeerConnection)?
        if case .tcp(let c) = origin { connection = c }
        let context = CommandContext(node: self, sender: request.sender, transport: origin.kind, sourcePort: origin.sourcePort, connection: connection)
        switch handler.handle(request, context: context) {
        case .reply(let reply):
            if request.type == .request { sendReply(reply, to: request, origin: origin, session: session) }
        case .future(let future):
            handlersInFlight += 1
            handlersPerPeer[sender.high] = perPeer + 1
            future.hop(to: eventLoop).whenComplete { [self] result in
                handlersInFlight -= 1
                if let n = handlersPerPeer[sender.high] { handlersPerPeer[sender.high] = n > 1 ? n - 1 : nil }
                guard request.type == .request else { return }
                switch result {
                case .success(let reply): sendReply(reply, to: request, origin: origin, session: session)
                case .failure(let error): sendReply(.error(.exception, "\(error)"), to: request, origin: origin, session: session)
                }
            }
        }
    }

    func sendReply(_ reply: Reply, to request: Message, origin: Origin, session: UInt64) {
        guard running else { return }
        var m = Message(networkID: config.networkID, id: request.id, type: reply.type, command: request.command,
                        sender: selfAddress, recipientID: request.sender.id, payload: reply.payload)
        var size: Int
        do {
            size = try WireCodec.validate(m)
        } catch {
            m.type = .exception
            m.payload = [.bytes(Array("reply cannot be encoded: \(error)".utf8))]
            size = WireCodec.encodedSize(m)
        }
        if origin.kind == .udp, size > WireLimits.udpPayloadLimit {
            m.type = .retryOverTCP
            m.payload = []
            size = WireCodec.encodedSize(m)
        }
        var plain = ByteBufferAllocator().buffer(capacity: size)
        plain.writeMessage(m, size: size, framed: false)
        if let metrics { metrics.countOut(metrics.series(m.command, registry: registry.commands), bytes: size) }
        if sessionsEnabled {
            sendInSession(plain, replyTo: request.sender.id, session: session, origin: origin)
        } else {
            write(plain, origin: origin)
        }
    }

    /// Writes bytes as they are: one datagram back to `origin`'s address, or one frame on its connection.
    func write(_ packet: ByteBuffer, origin: Origin) {
        switch origin {
        case .udp(let remote):
            udpSocket(to: remote)?.send(packet, to: remote, promise: nil)
        case .tcp(let connection):
            writeReply(packet.framed(), on: connection)
        case .relayed, .link:
            writeRelayed(packet, framed: false, origin: origin)
        }
    }

    /// Writes a reply frame unless the connection already holds `maxQueuedReplyBytes` the peer has
    /// not read: then the peer is not reading its replies and the connection is closed.
    /// (Back-pressure stops reading from it, but handlers already running still answer, and a
    /// reply may be megabytes.)
    func writeReply(_ frame: ByteBuffer, on connection: any PeerConnection) {
        let queued = connection.queuedBytes
        guard queued + frame.readableBytes <= config.limits.maxQueuedReplyBytes else {
            countDrop("a reply to a peer that does not read: \(queued) bytes already queued")
            connection.close()
            return
        }
        connection.write(frame, promise: nil)
    }

    // MARK: outbound

    /// Sends a request and completes with the peer's reply, whatever its type (`ok`, `notFound`,
    /// `denied` …); transport failures and timeouts fail the future with an `RPCError`.
    ///
    /// - Parameters:
    ///   - target: where to send it.
    ///   - expectedID: the peer id the reply must come from; `.zero` when not known yet.
    public func request(to target: PeerSocketAddress, expectedID: Number160 = .zero, command: UInt16,
                        payload: [Payload] = [], transport: TransportChoice = .auto,
                        timeout: Duration? = nil) -> EventLoopFuture<Message> {
        if eventLoop.inEventLoop {
            return requestOnLoop(target: target, expectedID: expectedID, command: command, payload: payload, transport: transport, timeout: timeout)
        }
        return eventLoop.flatSubmit { [self] in
            requestOnLoop(target: target, expectedID: expectedID, command: command, payload: payload, transport: transport, timeout: timeout)
        }
    }

    /// `request` to a known peer: the reply must come from its id.
    public func request(to peer: PeerAddress, command: UInt16, payload: [Payload] = [],
                        transport: TransportChoice = .auto, timeout: Duration? = nil) -> EventLoopFuture<Message> {
        if eventLoop.inEventLoop {
            learnRoute(peer)
            return requestOnLoop(target: peer.socket, expectedID: peer.id, command: command, payload: payload, transport: transport, timeout: timeout)
        }
        return eventLoop.flatSubmit { [self] in
            learnRoute(peer)
            return requestOnLoop(target: peer.socket, expectedID: peer.id, command: command, payload: payload, transport: transport, timeout: timeout)
        }
    }

    /// Sends a request by command name; the reply's type is checked (`ok` or the matching error).
    public func request(to peer: PeerAddress, command name: String, payload: [Payload] = [],
                        transport: TransportChoice = .auto) async throws -> Message {
        let reply = try await request(to: peer, command: CommandID.derive(from: name), payload: payload, transport: transport).get()
        if let error = RPCError.from(reply: reply) { throw error }
        return reply
    }

    /// Runs a command of this node's registry as if the request had come from this node itself,
    /// and returns the reply it would have sent (an `unknownCommand` reply when there is no handler).
    public func handleLocally(command: UInt16, payload: [Payload]) -> EventLoopFuture<Message> {
        let request = Message(networkID: config.networkID, id: 0, type: .request, command: command, sender: address,
                              recipientID: peerID, payload: payload)
        let (network, me, sender) = (config.networkID, peerID, address)
        let message: @Sendable (Reply) -> Message = { reply in
            Message(networkID: network, id: 0, type: reply.type, command: command, sender: sender, recipientID: me, payload: reply.payload)
        }
        guard let handler = registry.commands.handler(for: command) else {
            return eventLoop.makeSucceededFuture(message(.error(.unknownCommand, "no handler for command 0x\(String(command, radix: 16))")))
        }
        return eventLoop.flatSubmit { [self] in
            let context = CommandContext(node: self, sender: address, transport: .udp, sourcePort: address.udpPort)
            switch handler.handle(request, context: context) {
            case .reply(let r): return eventLoop.makeSucceededFuture(message(r))
            case .future(let f): return f.hop(to: eventLoop).map(message)
            }
        }
    }

    /// A message id no pending request uses: random, so that an off-path peer cannot predict the
    /// ids of our requests (in insecure mode the id and the source address are all a reply has).
    private func nextID() -> UInt32 {
        var id: UInt32
        repeat { id = randomIDs.next() } while id == 0 || pending[id] != nil
        return id
    }

    func requestOnLoop(target: PeerSocketAddress, expectedID: Number160, command: UInt16, payload: [Payload],
                       transport: TransportChoice, timeout: Duration?) -> EventLoopFuture<Message> {
        guard running else { return eventLoop.makeFailedFuture(RPCError.shutDown) }
        guard pending.count < config.maxInFlight else {
            return eventLoop.makeFailedFuture(RPCError.tooManyInFlight(limit: config.maxInFlight))
        }
        let id = nextID()
        let m = Message(networkID: config.networkID, id: id, type: .request, command: command, sender: selfAddress,
                        recipientID: expectedID, payload: payload)
        let size: Int
        do { size = try WireCodec.validate(m) } catch { return eventLoop.makeFailedFuture(RPCError.encoding(error)) }
        let kind: TransportKind
        switch transport {
        case .auto: kind = size <= WireLimits.udpPayloadLimit ? .udp : .tcp
        case .udp:
            guard size <= WireLimits.udpPayloadLimit else {
                return eventLoop.makeFailedFuture(RPCError.encoding(.limitExceeded(what: "UDP request bytes", value: size, limit: WireLimits.udpPayloadLimit)))
            }
            kind = .udp
        case .tcp: kind = .tcp
        }
        // A relayed peer we hold a punched UDP path to is asked over it; one we hold a direct
        // connection to (it connected back to us, or a punched one) over that connection.
        let punchedUDP = kind == .udp && !udpPaths.isEmpty && expectedID != .zero && udpPaths[expectedID] != nil
        let routedKind = !punchedUDP && !directPaths.isEmpty && expectedID != .zero && directPaths[expectedID] != nil ? TransportKind.tcp : kind
        if !punchedUDP, let problem = unsendable(routedTarget(target, expected: expectedID), routedKind) {
            return eventLoop.makeFailedFuture(RPCError.invalidAddress(problem))
        }
        var plain = ByteBufferAllocator().buffer(capacity: size)
        plain.writeMessage(m, size: size, framed: false)
        let promise = eventLoop.makePromise(of: Message.self)
        let total = timeout ?? config.requestTimeout
        pending[id] = PendingRequest(promise: promise, timer: nil, expected: expectedID, target: target, command: command,
                                     payload: payload, timeout: total, plaintext: plain, transport: routedKind)
        if let metrics { metrics.countOut(metrics.series(command, registry: registry.commands), bytes: size) }
        if metrics != nil || routedKind == .udp { pending[id]?.sent = clock.now }
        transmit(plain, to: target, expected: expectedID, over: routedKind, requestID: id)
        if routedKind == .udp {
            // Re-sent after about a round trip, then at doubling intervals, until the deadline:
            // datagrams get lost, and so may the FINISH of a fresh session. A re-sent request is
            // sealed anew, so the peer answers it.
            let first = min(rtt.timeout(ceiling: config.udpRetryAfter), TimeAmount(total / 2))
            resend(id, after: first, deadline: clock.now + TimeAmount(total), total: total)
        } else {
            pending[id]?.timer = eventLoop.scheduleTask(in: TimeAmount(total)) { [self] in
                timedOut(id, after: total)
            }
        }
        return promise.futureResult
    }

    private func resend(_ id: UInt32, after interval: TimeAmount, deadline: NIODeadline, total: Duration, attempt: Int = 1) {
        let next = clock.now + interval
        guard next < deadline else {
            pending[id]?.timer = eventLoop.scheduleTask(deadline: deadline) { [self] in timedOut(id, after: total) }
            return
        }
        pending[id]?.timer = eventLoop.scheduleTask(deadline: next) { [self] in
            guard let p = pending[id], running else { return }
            // Through a relay that did not answer: the next one of the peer's relays. A punched
            // path that lost two sends in a row is given up: the relays carry it from now on.
            if p.expected != .zero {
                rotateRelay(for: p.expected)
                if attempt >= 2, !udpPaths.isEmpty, let path = udpPaths[p.expected], coarseSeconds &- path.heard >= 2 {
                    logger.info("direct path to \(p.expected) over udp went quiet; its relays carry the traffic again")
                    dropUDPPath(p.expected, ifTo: path.address)
                }
            }
            pending[id]?.resent = true
            transmit(p.plaintext, to: p.target, expected: p.expected, over: .udp, requestID: id)
            resend(id, after: min(interval * 2, TimeAmount(config.udpRetryAfter)), deadline: deadline, total: total, attempt: attempt + 1)
        }
    }

    /// Why `target` cannot be sent to over `kind`, or nil. A peer can announce anything; sending
    /// to port 0, a broadcast or multicast address, or an address family our socket lacks fails
    /// in the kernel, and SwiftNIO closes a UDP socket on such an error.
    func unsendable(_ target: PeerSocketAddress, _ kind: TransportKind) -> String? {
        let port = kind == .udp ? target.udpPort : target.tcpPort
        if port == 0 { return "\(target): port 0" }
        if !target.ip.isUnicast { return "\(target): not a unicast address" }
        if !target.ip.isV4, transport.isIPv4 { return "\(target): IPv6, and this node listens on IPv4 only" }
        return nil
    }

    /// Fails a pending request now.
    func failRequest(_ id: UInt32, _ error: RPCError, peerFailed: Bool = false) {
        guard let p = pending.removeValue(forKey: id) else { return }
        releaseIfEmpty()
        p.timer?.cancel()
        if peerFailed, p.expected != .zero { peerMap.peerFailed(p.expected) }
        p.promise.fail(error)
    }

    private func timedOut(_ id: UInt32, after total: Duration) {
        guard let p = pending[id] else { return }
        let ms = Int(total.components.seconds * 1000 + total.components.attoseconds / 1_000_000_000_000_000)
        metrics?.series(p.command, registry: registry.commands).timeouts.increment()
        failRequest(id, .timeout(peer: "\(p.target)", milliseconds: ms), peerFailed: true)
    }

    /// The peer answered a UDP request with "too large for UDP": ask again over TCP, completing
    /// the same promise.
    private func retryOverTCP(_ p: PendingRequest) {
        requestOnLoop(target: p.target, expectedID: p.expected, command: p.command, payload: p.payload,
                      transport: .tcp, timeout: p.timeout).cascade(to: p.promise)
    }

    /// Sends a message that expects no reply; returns the write's future, or nil if not running.
    @discardableResult
    func sendFireAndForget(to peer: PeerAddress, command: UInt16, payload: [Payload] = []) -> EventLoopFuture<Void>? {
        learnRoute(peer)
        guard running, udpPaths[peer.id] != nil || unsendable(routedTarget(peer.socket, expected: peer.id), .udp) == nil else { return nil }
        let m = Message(networkID: config.networkID, id: nextID(), type: .fireAndForget, command: command,
                        sender: selfAddress, recipientID: peer.id, payload: payload)
        guard let size = try? WireCodec.validate(m), size <= WireLimits.udpPayloadLimit else { return nil }
        var plain = ByteBufferAllocator().buffer(capacity: size)
        plain.writeMessage(m, size: size, framed: false)
        if let metrics { metrics.countOut(metrics.series(command, registry: registry.commands), bytes: size) }
        let written = eventLoop.makePromise(of: Void.self)
        transmit(plain, to: peer.socket, expected: peer.id, over: .udp, requestID: nil, written: written)
        return written.futureResult
    }

    /// Sends one encoded message: in the clear in insecure mode, otherwise sealed in the peer's
    /// session, handshaking first when there is none.
    func transmit(_ plain: ByteBuffer, to target: PeerSocketAddress, expected: Number160, over kind: TransportKind,
                  requestID: UInt32?, written: EventLoopPromise<Void>? = nil) {
        switch kind {
        case .udp:
            guard transport.mainSocket != nil else {
                written?.fail(RPCError.shutDown)
                return
            }
            if !sessionsEnabled {
                emitUDP(plain, to: target, peer: expected, promise: written)
            } else {
                sendSecure(QueuedMessage(plain: plain, requestID: requestID, written: written), to: target, expected: expected, over: .udp, connection: nil)
            }
        case .tcp:
            connection(to: target, peer: expected).whenComplete { [self] result in
                switch result {
                case .failure(let error):
                    written?.fail(error)
                    if let id = requestID { failRequest(id, .unreachable(peer: "\(target)", reason: "\(error)"), peerFailed: true) }
                case .success(let connection):
                    if let id = requestID {
                        guard pending[id] != nil else { return }
                        pending[id]?.connection = ObjectIdentifier(connection)
                    }
                    if !sessionsEnabled {
                        emitTCP(plain.framed(), on: connection, peer: expected, promise: written)
                    } else {
                        sendSecure(QueuedMessage(plain: plain, requestID: requestID, written: written), to: target, expected: expected,
                                   over: .tcp, connection: connection)
                    }
                }
            }
        }
    }

    // MARK: TCP pool

    /// The connection to use for `peer`: one it opened to us (a reverse connection), the pooled
    /// one to its relay when it is relayed, else the pooled one to `target`.
    func connection(to target: PeerSocketAddress, peer: Number160) -> EventLoopFuture<any PeerConnection> {
        if !directPaths.isEmpty, peer != .zero, let direct = directPaths[peer] { return eventLoop.makeSucceededFuture(direct) }
        return connection(to: routedTarget(target, expected: peer))
    }

    /// A pooled connection to the peer's TCP port, opened on first use and reused after.
    func connection(to target: PeerSocketAddress) -> EventLoopFuture<any PeerConnection> {
        let key = PeerSocketAddress(ip: target.ip, tcpPort: target.tcpPort, udpPort: 0)
        if let existing = pool[key] { return existing }
        if let problem = unsendable(target, .tcp) { return eventLoop.makeFailedFuture(RPCError.invalidAddress(problem)) }
        // The oldest unpinned connection makes room (links to our relays are pinned).
        if pool.count >= config.maxTCPConnections, let at = poolOrder.firstIndex(where: { !pinned.contains($0) }) {
            let oldest = poolOrder.remove(at: at)
            pool.removeValue(forKey: oldest)?.whenSuccess { $0.close() }
        }
        let future = transport.connect(to: target.tcpEndpoint, timeout: TimeAmount(config.requestTimeout), fromListenPort: false, raw: nil)
        pool[key] = future
        poolOrder.append(key)
        future.whenComplete { [self] result in
            switch result {
            case .failure:
                forget(key, future)
            case .success(let c):
                c.closeFuture.whenComplete { [self] _ in
                    forget(key, future)
                    failRequests(on: ObjectIdentifier(c), target: target)
                }
            }
        }
        return future
    }

    /// Fails every request still waiting on a connection that closed: its reply cannot come.
    func failRequests(on connection: ObjectIdentifier, target: PeerSocketAddress) {
        let ids = pending.compactMap { $0.value.connection == connection ? $0.key : nil }
        for id in ids {
            // A request to a relayed peer through a relay that went away goes through another.
            if let p = pending[id], p.expected != .zero, let route = relayRoutes[p.expected], route.relays.count > 1 {
                rotateRelay(for: p.expected)
                pending[id]?.connection = nil
                pending[id]?.session = 0
                transmit(p.plaintext, to: p.target, expected: p.expected, over: p.transport, requestID: id)
                continue
            }
            failRequest(id, .unreachable(peer: "\(target)", reason: "connection closed before the reply"), peerFailed: true)
        }
    }

    private func forget(_ key: PeerSocketAddress, _ future: EventLoopFuture<any PeerConnection>) {
        if let current = pool[key], current === future {
            pool[key] = nil
            poolOrder.removeAll { $0 == key }
        }
    }

    /// A dictionary keeps its storage when emptied; bootstrap leaves a node's `pending` table sized
    /// for dozens of requests at ~200 bytes each, so an empty, large one gives its storage back.
    func releaseIfEmpty() {
        if pending.isEmpty, pending.capacity > 8 { pending = [:] }
    }

    /// A peer talked to us first-hand: it enters the peer map as verified — unless it says it
    /// cannot be reached unsolicited (firewalled, not relayed): routing others to it would only
    /// make their lookups wait for timeouts. A peer that was in the map and now says so leaves it.
    func noteContact(_ sender: PeerAddress) {
        learnRoute(sender)
        if sender.isContactable {
            peerMap.peerFound(sender, verified: true)
        } else if peerMap.contains(sender.id) {
            peerMap.peerFailed(sender.id, reason: .unreachable)
        }
    }

    /// Counts a dropped packet and says why at trace level.
    func countDrop(_ why: @autoclosure () -> String) {
        droppedCount.withLockedValue { $0 += 1 }
        metrics?.dropped.increment()
        logger.trace("dropped", metadata: ["why": "\(why())"])
    }
}

extension Origin {
    /// The source port of a datagram; zero for TCP (a connection's port says nothing about the peer).
    var sourcePort: UInt16 {
        if case .udp(let remote) = self { return remote.port }
        return 0
    }
}

extension ByteBuffer {
    /// This packet behind a 4-byte length: one TCP frame.
    func framed() -> ByteBuffer {
        var out = ByteBufferAllocator().buffer(capacity: readableBytes + 4)
        out.writeInteger(UInt32(readableBytes))
        out.writeImmutableBuffer(self)
        return out
    }
}

/// Random 32-bit numbers from the node's source, two per draw.
struct RandomPool {
    let source: RandomSource
    private var spare: UInt32?

    init(_ source: RandomSource) { self.source = source }

    mutating func next() -> UInt32 {
        if let v = spare {
            spare = nil
            return v
        }
        let v = source.next()
        spare = UInt32(truncatingIfNeeded: v >> 32)
        return UInt32(truncatingIfNeeded: v)
    }
}
