import NIOCore

/// Requests and replies: pending requests by random id, their timeouts and re-sends, the
/// handlers answering requests from the registry, and the way replies go back. Confined to the
/// node's event loop.
///
/// ```
///  request ── id ── PathTable (how) ── SessionLayer (seal) ── transport ─ ⇢ ─ peer
///  reply  ⇠ ── pending[id]: from the peer asked, the way it went? ── promise ── caller
///  request from a peer ── registry[command] ── handler ── sendReply ── the way it came
/// ```
final class RPCEngine: KernelPart, @unchecked Sendable {
    private var link = KernelLink()
    @inline(__always) var kernel: Kernel { link.value }
    func attach(_ kernel: Kernel) { link.set(kernel) }

    var pending: [UInt32: PendingRequest] = [:]
    var randomIDs: RandomPool
    /// The smoothed round trip of UDP requests: when to send one again.
    var rtt = RTTEstimator()
    /// The same per peer (bounded): a peer's own round trip times its re-sends when known.
    var peerRTT: PeerRoundTrips
    /// Handlers answering later (a future): in all, and per peer (by the top of its id).
    var handlersInFlight = 0
    var handlersPerPeer: [UInt64: Int] = [:]
    /// UDP requests running or answered in the last seconds, so that one sent again is not
    /// carried out twice.
    var recent: RecentRequests

    init(random: RandomSource, limits: NodeLimits) {
        randomIDs = RandomPool(random)
        recent = RecentRequests(capacity: limits.maxRecentRequests)
        peerRTT = PeerRoundTrips(capacity: limits.maxPeerRoundTrips)
    }

    func receivedPlaintext(_ buffer: ByteBuffer, remote: Endpoint, origin: Origin) {
        let ip = remote.ip
        let networkID = kernel.networkID
        let decoded = buffer.withUnsafeReadableBytes { raw in
            Result { () throws(WireError) -> Message in try WireCodec.decode(raw, senderIP: ip, networkID: networkID) }
        }
        let message: Message
        switch decoded {
        case .success(let m): message = m
        case .failure(let error):
            countDrop("undecodable message from \(remote): \(error)")
            kernel.connections.closeIfStream(origin)
            return
        }
        if kernel.sessions.enabled {
            kernel.sessions.refusePlaintext(message, remote: remote, origin: origin)
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
        kernel.connections.authenticated(origin)
        if !kernel.paths.udpPaths.isEmpty, case .udp(let remote) = origin { kernel.paths.heardOverPath(message.sender.id, remote) }
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
            guard p.transport == .udp, sameAddress || (!kernel.paths.udpPaths.isEmpty && p.expected != .zero && kernel.paths.udpPaths[p.expected]?.address == remote) else {
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
        kernel.timers.cancel(p.timer)
        if reply.type == .retryOverTCP, case .udp = origin {
            retryOverTCP(p)
            return
        }
        if reply.type == .sessionRequired {
            kernel.sessions.logRefusal("\(remote) requires authenticated sessions; this node runs insecure")
            p.promise.fail(RPCError.securityMismatch(peer: "\(p.target)", reason: "the peer requires authenticated sessions and this node runs insecure"))
            return
        }
        noteContact(reply.sender)
        if p.transport == .udp, !p.resent, case .udp = origin {
            // Karn: a reply to a request sent more than once says nothing of the round trip.
            let r = clock.now - p.sent
            rtt.sample(r)
            if p.expected != .zero { peerRTT.sample(p.expected, r) }
        }
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
            if !kernel.paths.relayRoutes.isEmpty { kernel.punch.noteUDPPath(request.sender, remote: remote, socket: kernel.paths.punchSockets.isEmpty ? nil : kernel.paths.punchSockets[remote]) }
        case .tcp: kernel.relay.noteDirectPath(request.sender.id, origin: origin)
        case .link:
            kernel.relay.considerReverseConnection(to: request.sender, origin: origin)
            if request.command != kernelCommands.quit { kernel.punch.considerPunch(with: request.sender) }
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
        guard handlersInFlight < limits.maxHandlersInFlight, perPeer < limits.maxHandlersInFlightPerPeer else {
            if request.type == .request {
                sendReply(.error(.denied, "busy: too many requests in progress"), to: request, origin: origin, session: session)
            }
            return
        }
        // A request sent again over UDP (its reply was lost or late) is not carried out twice: a
        // put or an add would count twice. One still running is dropped; one answered lately gets
        // its answer again.
        let once = origin.kind == .udp && request.type == .request ? RecentRequests.Key(sender: sender, id: request.id) : nil
        if let once {
            switch recent.seen(once, now: coarseSeconds) {
            case .running: return
            case .answered(let reply): return sendReply(reply, to: request, origin: origin, session: session)
            case .new: break
            }
        }
        var connection: (any PeerConnection)?
        if case .tcp(let c) = origin { connection = c }
        let context = CommandContext(node: node, sender: request.sender, transport: origin.kind, sourcePort: origin.sourcePort, connection: connection)
        switch handler.handle(request, context: context) {
        case .reply(let reply):
            guard request.type == .request else { return }
            if let once { recent.answered(once, reply, now: coarseSeconds) }
            sendReply(reply, to: request, origin: origin, session: session)
        case .future(let future):
            handlersInFlight += 1
            handlersPerPeer[sender.high] = perPeer + 1
            if let once { recent.running(once, now: coarseSeconds) }
            future.hop(to: eventLoop).whenComplete { [self] result in
                handlersInFlight -= 1
                if let n = handlersPerPeer[sender.high] { handlersPerPeer[sender.high] = n > 1 ? n - 1 : nil }
                guard request.type == .request else { return }
                let reply: Reply
                switch result {
                case .success(let r): reply = r
                case .failure(let error): reply = .error(.exception, "\(error)")
                }
                if let once { recent.answered(once, reply, now: coarseSeconds) }
                sendReply(reply, to: request, origin: origin, session: session)
            }
        }
    }

    func sendReply(_ reply: Reply, to request: Message, origin: Origin, session: UInt64) {
        guard running else { return }
        var m = Message(networkID: networkID, id: request.id, type: reply.type, command: request.command,
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
        if kernel.sessions.enabled {
            kernel.sessions.sendInSession(plain, replyTo: request.sender.id, session: session, origin: origin)
        } else {
            write(plain, origin: origin)
        }
    }

    /// Writes bytes as they are: one datagram back to `origin`'s address, or one frame on its connection.
    func write(_ packet: ByteBuffer, origin: Origin) {
        switch origin {
        case .udp(let remote):
            kernel.paths.udpSocket(to: remote)?.send(packet, to: remote, promise: nil)
        case .tcp(let connection):
            writeReply(packet.framed(), on: connection)
        case .relayed, .link:
            kernel.paths.writeRelayed(packet, framed: false, origin: origin)
        }
    }

    /// Writes a reply frame unless the connection already holds `maxQueuedReplyBytes` the peer has
    /// not read: then the peer is not reading its replies and the connection is closed.
    /// (Back-pressure stops reading from it, but handlers already running still answer, and a
    /// reply may be megabytes.)
    func writeReply(_ frame: ByteBuffer, on connection: any PeerConnection) {
        let queued = connection.queuedBytes
        guard queued + frame.readableBytes <= limits.maxQueuedReplyBytes else {
            countDrop("a reply to a peer that does not read: \(queued) bytes already queued")
            connection.close()
            return
        }
        connection.write(frame, promise: nil)
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
        eventLoop.assertInEventLoop()
        guard running else { return eventLoop.makeFailedFuture(RPCError.shutDown) }
        guard pending.count < kernel.maxInFlight else {
            return eventLoop.makeFailedFuture(RPCError.tooManyInFlight(limit: kernel.maxInFlight))
        }
        let id = nextID()
        let m = Message(networkID: networkID, id: id, type: .request, command: command, sender: selfAddress,
                        recipientID: expectedID, payload: payload)
        let size: Int
        do { size = try WireCodec.validate(m) } catch { return eventLoop.makeFailedFuture(RPCError.encoding(error)) }
        // A relayed peer we hold a punched UDP path to is asked over it; one we hold a direct
        // connection to (it connected back to us, or a punched one) over that connection.
        let routedKind: TransportKind
        switch kernel.paths.path(to: target, peer: expectedID, size: size, choice: transport) {
        case .success(let k): routedKind = k
        case .failure(let error): return eventLoop.makeFailedFuture(error)
        }
        var plain = ByteBufferAllocator().buffer(capacity: size)
        plain.writeMessage(m, size: size, framed: false)
        let promise = eventLoop.makePromise(of: Message.self)
        let total = timeout ?? kernel.requestTimeout
        pending[id] = PendingRequest(promise: promise, timer: nil, expected: expectedID, target: target, command: command,
                                     payload: payload, timeout: total, plaintext: plain, transport: routedKind)
        if let metrics { metrics.countOut(metrics.series(command, registry: registry.commands), bytes: size) }
        if metrics != nil || routedKind == .udp { pending[id]?.sent = clock.now }
        transmit(plain, to: target, expected: expectedID, over: routedKind, requestID: id)
        if routedKind == .udp {
            // Re-sent after about a round trip, then at doubling intervals up to a quarter of
            // the timeout, until the deadline: datagrams get lost, and so may the FINISH of a
            // fresh session. A re-sent request is sealed anew, so the peer answers it. (Four
            // resends or so fit a timeout: at 2 % loss each way, a request whose three sends
            // were all lost — one in 16,000 — made a live peer look dead now and then to a node
            // asking thousands a minute; five sends, one in 10 million.)
            let first = min(retryAfter(expectedID), TimeAmount(total / 2))
            let cap = min(TimeAmount(kernel.udpRetryAfter), max(first, TimeAmount(total / 4)))
            resend(id, after: first, cap: cap, deadline: clock.now + TimeAmount(total), total: total)
        } else {
            pending[id]?.timer = kernel.timers.schedule(in: TimeAmount(total)) { [self] in
                timedOut(id, after: total)
            }
        }
        return promise.futureResult
    }

    /// How long a request may go unanswered before its asker suspects the peer and goes on
    /// without it (a lookup asks the next peer, a fan-out the next candidate; the request stays
    /// pending until its own timeout): the measured round trip's retransmission time, smoothed
    /// with its variance as TCP does, between 200 ms and `udpRetryAfter`. On the event loop.
    func suspectAfter() -> TimeAmount {
        retryAfter(.zero)
    }

    /// When to send a request to `peer` again, or suspect it: its own retransmission time if
    /// this node measured it, otherwise the node-wide one. On the event loop.
    func retryAfter(_ peer: Number160) -> TimeAmount {
        if peer != .zero, let r = peerRTT[peer] { return r.timeout(ceiling: kernel.udpRetryAfter) }
        return rtt.timeout(ceiling: kernel.udpRetryAfter)
    }

    /// How long a prompt request waits for `peer`: `roundTrips` of its retransmission times,
    /// at least `atLeast`, at most the request timeout — which is also what a peer never
    /// measured gets (see `Node.requestPromptly`). On the event loop.
    func promptTimeout(_ peer: Number160, atLeast: Duration, roundTrips: Int) -> Duration {
        guard peer != .zero, let r = peerRTT[peer] else { return kernel.requestTimeout }
        let wait = Duration.nanoseconds(r.timeout(ceiling: kernel.udpRetryAfter).nanoseconds) * max(1, roundTrips)
        return min(kernel.requestTimeout, max(atLeast, wait))
    }

    private func resend(_ id: UInt32, after interval: TimeAmount, cap: TimeAmount, deadline: NIODeadline, total: Duration, attempt: Int = 1) {
        let next = clock.now + interval
        guard next < deadline else {
            pending[id]?.timer = kernel.timers.schedule(at: deadline) { [self] in timedOut(id, after: total) }
            return
        }
        pending[id]?.timer = kernel.timers.schedule(at: next) { [self] in
            guard let p = pending[id], running else { return }
            // Through a relay that did not answer: the next one of the peer's relays. A punched
            // path that lost two sends in a row is given up: the relays carry it from now on.
            if p.expected != .zero {
                kernel.paths.rotateRelay(for: p.expected)
                if attempt >= 2, !kernel.paths.udpPaths.isEmpty, let path = kernel.paths.udpPaths[p.expected], coarseSeconds &- path.heard >= 2 {
                    logger.info("direct path to \(p.expected) over udp went quiet; its relays carry the traffic again")
                    kernel.paths.dropUDPPath(p.expected, ifTo: path.address)
                }
            }
            pending[id]?.resent = true
            transmit(p.plaintext, to: p.target, expected: p.expected, over: .udp, requestID: id)
            resend(id, after: min(interval * 2, cap), cap: cap, deadline: deadline, total: total, attempt: attempt + 1)
        }
    }

    /// Fails a pending request now.
    func failRequest(_ id: UInt32, _ error: RPCError, peerFailed: Bool = false) {
        guard let p = pending.removeValue(forKey: id) else { return }
        releaseIfEmpty()
        kernel.timers.cancel(p.timer)
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
        kernel.paths.learnRoute(peer)
        guard running, kernel.paths.udpPaths[peer.id] != nil || kernel.paths.unsendable(kernel.paths.routedTarget(peer.socket, expected: peer.id), .udp) == nil else { return nil }
        let m = Message(networkID: networkID, id: nextID(), type: .fireAndForget, command: command,
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
            if !kernel.sessions.enabled {
                kernel.paths.emitUDP(plain, to: target, peer: expected, promise: written)
            } else {
                kernel.sessions.sendSecure(QueuedMessage(plain: plain, requestID: requestID, written: written), to: target, expected: expected, over: .udp, connection: nil)
            }
        case .tcp:
            kernel.connections.connection(to: target, peer: expected).whenComplete { [self] result in
                switch result {
                case .failure(let error):
                    written?.fail(error)
                    if let id = requestID { failRequest(id, .unreachable(peer: "\(target)", reason: "\(error)"), peerFailed: true) }
                case .success(let connection):
                    if let id = requestID {
                        guard pending[id] != nil else { return }
                        pending[id]?.connection = ObjectIdentifier(connection)
                    }
                    if !kernel.sessions.enabled {
                        kernel.paths.emitTCP(plain.framed(), on: connection, peer: expected, promise: written)
                    } else {
                        kernel.sessions.sendSecure(QueuedMessage(plain: plain, requestID: requestID, written: written), to: target, expected: expected,
                                   over: .tcp, connection: connection)
                    }
                }
            }
        }
    }

    /// Fails every request still waiting on a connection that closed: its reply cannot come.
    func failRequests(on connection: ObjectIdentifier, target: PeerSocketAddress) {
        let ids = pending.compactMap { $0.value.connection == connection ? $0.key : nil }
        for id in ids {
            // A request to a relayed peer through a relay that went away goes through another.
            if let p = pending[id], p.expected != .zero, let route = kernel.paths.relayRoutes[p.expected], route.relays.count > 1 {
                kernel.paths.rotateRelay(for: p.expected)
                pending[id]?.connection = nil
                pending[id]?.session = 0
                transmit(p.plaintext, to: p.target, expected: p.expected, over: p.transport, requestID: id)
                continue
            }
            failRequest(id, .unreachable(peer: "\(target)", reason: "connection closed before the reply"), peerFailed: true)
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
        kernel.paths.learnRoute(sender)
        if sender.isContactable {
            peerMap.peerFound(sender, verified: true)
        } else if peerMap.contains(sender.id) {
            peerMap.peerFailed(sender.id, reason: .unreachable)
        }
    }

    /// Fails every pending request (shutdown).
    func closeAll() {
        let waiting = pending
        pending.removeAll()
        for id in waiting.keys.sorted() {
            guard let p = waiting[id] else { continue }
            kernel.timers.cancel(p.timer)
            p.promise.fail(RPCError.shutDown)
        }
    }
}
