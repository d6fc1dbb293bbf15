import NIOCore
import NIOPosix

/// Where a message came from, and so where its reply goes.
enum Origin {
    case udp(SocketAddress)
    case tcp(any Channel)

    var kind: TransportKind {
        if case .udp = self { .udp } else { .tcp }
    }
}

/// A request waiting for its reply.
struct PendingRequest {
    let promise: EventLoopPromise<Message>
    var timer: Scheduled<Void>?
    /// The id the reply must come from; zero when we do not know it yet (pinging an address).
    let expected: Number160
    let target: PeerSocketAddress
    /// Kept so that a "retry over TCP" reply can re-send the same request.
    let command: UInt16
    let payload: [Payload]
    let timeout: Duration
    /// The TCP connection the request went out on, so that its closing fails the request at once.
    var connection: ObjectIdentifier?
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

    func received(_ buffer: ByteBuffer, from remote: SocketAddress, origin: Origin) {
        guard let ip = IPAddress(remote) else { return }
        let networkID = config.networkID
        let decoded = buffer.withUnsafeReadableBytes { raw in
            Result { () throws(WireError) -> Message in try WireCodec.decode(raw, senderIP: ip, networkID: networkID) }
        }
        let message: Message
        switch decoded {
        case .success(let m): message = m
        case .failure(let error):
            droppedCount.withLockedValue { $0 += 1 }
            logger.trace("dropped message", metadata: ["from": "\(remote)", "error": "\(error)"])
            return
        }
        guard running, message.sender.id != peerID else { return }
        if message.type.isReply {
            completePending(message, origin: origin)
        } else {
            handleRequest(message, origin: origin, sourcePort: UInt16(remote.port ?? 0))
        }
    }

    private func completePending(_ reply: Message, origin: Origin) {
        guard let p = pending[reply.id] else { return }
        // A reply must come from the peer we asked (when we know its id): a guessed message id
        // from elsewhere does not complete someone else's request.
        guard p.expected == .zero || p.expected == reply.sender.id else { return }
        pending[reply.id] = nil
        p.timer?.cancel()
        if reply.type == .retryOverTCP, case .udp = origin {
            retryOverTCP(p)
            return
        }
        peerMap.peerFound(reply.sender, verified: true)
        p.promise.succeed(reply)
    }

    private func handleRequest(_ request: Message, origin: Origin, sourcePort: UInt16) {
        if request.command != kernelCommands.quit, request.sender.udpPort != 0 {
            peerMap.peerFound(request.sender, verified: true)
        }
        guard let handler = registry.commands.handler(for: request.command) else {
            if request.type == .request {
                sendReply(.error(.unknownCommand, "no handler for command 0x\(String(request.command, radix: 16))"), to: request, origin: origin)
            }
            return
        }
        let context = CommandContext(node: self, sender: request.sender, transport: origin.kind, sourcePort: sourcePort)
        switch handler.handle(request, context: context) {
        case .reply(let reply):
            if request.type == .request { sendReply(reply, to: request, origin: origin) }
        case .future(let future):
            guard request.type == .request else { return }
            future.hop(to: eventLoop).whenComplete { [self] result in
                switch result {
                case .success(let reply): sendReply(reply, to: request, origin: origin)
                case .failure(let error): sendReply(.error(.exception, "\(error)"), to: request, origin: origin)
                }
            }
        }
    }

    private func sendReply(_ reply: Reply, to request: Message, origin: Origin) {
        guard running else { return }
        var m = Message(networkID: config.networkID, id: request.id, type: reply.type, command: request.command,
                        sender: address, recipientID: request.sender.id, payload: reply.payload)
        var size: Int
        do {
            size = try WireCodec.validate(m)
        } catch {
            m.type = .exception
            m.payload = [.bytes(Array("reply cannot be encoded: \(error)".utf8))]
            size = WireCodec.encodedSize(m)
        }
        switch origin {
        case .udp(let remote):
            if size > WireLimits.udpPayloadLimit {
                m.type = .retryOverTCP
                m.payload = []
                size = WireCodec.encodedSize(m)
            }
            guard let udp = udpChannel else { return }
            var buffer = udp.allocator.buffer(capacity: size)
            buffer.writeMessage(m, size: size, framed: false)
            udp.writeAndFlush(AddressedEnvelope(remoteAddress: remote, data: buffer), promise: nil)
        case .tcp(let channel):
            var buffer = channel.allocator.buffer(capacity: size + 4)
            buffer.writeMessage(m, size: size, framed: true)
            channel.writeAndFlush(buffer, promise: nil)
        }
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
        request(to: peer.socket, expectedID: peer.id, command: command, payload: payload, transport: transport, timeout: timeout)
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
        func message(_ reply: Reply) -> Message {
            Message(networkID: config.networkID, id: 0, type: reply.type, command: command, sender: address,
                    recipientID: peerID, payload: reply.payload)
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

    private func nextID() -> UInt32 {
        repeat { nextMessageID &+= 1 } while pending[nextMessageID] != nil
        return nextMessageID
    }

    func requestOnLoop(target: PeerSocketAddress, expectedID: Number160, command: UInt16, payload: [Payload],
                       transport: TransportChoice, timeout: Duration?) -> EventLoopFuture<Message> {
        guard running else { return eventLoop.makeFailedFuture(RPCError.shutDown) }
        guard pending.count < config.maxInFlight else {
            return eventLoop.makeFailedFuture(RPCError.tooManyInFlight(limit: config.maxInFlight))
        }
        let id = nextID()
        let m = Message(networkID: config.networkID, id: id, type: .request, command: command, sender: address,
                        recipientID: expectedID, payload: payload)
        let size: Int
        do { size = try WireCodec.validate(m) } catch { return eventLoop.makeFailedFuture(RPCError.encoding(error)) }
        let useUDP: Bool
        switch transport {
        case .auto: useUDP = size <= WireLimits.udpPayloadLimit
        case .udp:
            guard size <= WireLimits.udpPayloadLimit else {
                return eventLoop.makeFailedFuture(RPCError.encoding(.limitExceeded(what: "UDP request bytes", value: size, limit: WireLimits.udpPayloadLimit)))
            }
            useUDP = true
        case .tcp: useUDP = false
        }
        let promise = eventLoop.makePromise(of: Message.self)
        let total = timeout ?? config.requestTimeout
        pending[id] = PendingRequest(promise: promise, timer: nil, expected: expectedID, target: target,
                                     command: command, payload: payload, timeout: total)
        if useUDP, let udp = udpChannel {
            var buffer = udp.allocator.buffer(capacity: size)
            buffer.writeMessage(m, size: size, framed: false)
            let remote = target.udpSocketAddress
            udp.writeAndFlush(AddressedEnvelope(remoteAddress: remote, data: buffer), promise: nil)
            let retryAfter = min(config.udpRetryAfter, total / 2)
            pending[id]?.timer = eventLoop.scheduleTask(in: TimeAmount(retryAfter)) { [self] in
                guard pending[id] != nil, running else { return }
                udp.writeAndFlush(AddressedEnvelope(remoteAddress: remote, data: buffer), promise: nil)
                pending[id]?.timer = eventLoop.scheduleTask(in: TimeAmount(total - retryAfter)) { [self] in
                    timedOut(id, after: total)
                }
            }
        } else {
            var buffer = ByteBufferAllocator().buffer(capacity: size + 4)
            buffer.writeMessage(m, size: size, framed: true)
            connection(to: target).whenComplete { [self] result in
                switch result {
                case .success(let channel):
                    guard pending[id] != nil else { return }
                    pending[id]?.connection = ObjectIdentifier(channel)
                    channel.writeAndFlush(buffer, promise: nil)
                case .failure(let error):
                    guard let p = pending.removeValue(forKey: id) else { return }
                    p.timer?.cancel()
                    if expectedID != .zero { peerMap.peerFailed(expectedID) }
                    p.promise.fail(RPCError.unreachable(peer: "\(target)", reason: "\(error)"))
                }
            }
            pending[id]?.timer = eventLoop.scheduleTask(in: TimeAmount(total)) { [self] in
                timedOut(id, after: total)
            }
        }
        return promise.futureResult
    }

    private func timedOut(_ id: UInt32, after total: Duration) {
        guard let p = pending.removeValue(forKey: id) else { return }
        if p.expected != .zero { peerMap.peerFailed(p.expected) }
        let ms = Int(total.components.seconds * 1000 + total.components.attoseconds / 1_000_000_000_000_000)
        p.promise.fail(RPCError.timeout(peer: "\(p.target)", milliseconds: ms))
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
        guard running, let udp = udpChannel else { return nil }
        let m = Message(networkID: config.networkID, id: nextID(), type: .fireAndForget, command: command,
                        sender: address, recipientID: peer.id, payload: payload)
        guard (try? WireCodec.validate(m)) != nil else { return nil }
        let size = WireCodec.encodedSize(m)
        guard size <= WireLimits.udpPayloadLimit else { return nil }
        var buffer = udp.allocator.buffer(capacity: size)
        buffer.writeMessage(m, size: size, framed: false)
        return udp.writeAndFlush(AddressedEnvelope(remoteAddress: peer.socket.udpSocketAddress, data: buffer))
    }

    // MARK: TCP pool

    /// A pooled connection to the peer's TCP port, opened on first use and reused after.
    func connection(to target: PeerSocketAddress) -> EventLoopFuture<any Channel> {
        let key = PeerSocketAddress(ip: target.ip, tcpPort: target.tcpPort, udpPort: 0)
        if let existing = pool[key] { return existing }
        if pool.count >= config.maxTCPConnections, let oldest = poolOrder.first {
            poolOrder.removeFirst()
            pool.removeValue(forKey: oldest)?.whenSuccess { $0.close(promise: nil) }
        }
        let future = ClientBootstrap(group: eventLoop)
            .connectTimeout(TimeAmount(config.requestTimeout))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { [self] ch in configureTCP(ch) }
            .connect(to: target.tcpSocketAddress)
        pool[key] = future
        poolOrder.append(key)
        future.whenComplete { [self] result in
            switch result {
            case .failure:
                forget(key, future)
            case .success(let ch):
                ch.closeFuture.whenComplete { [self] _ in
                    forget(key, future)
                    failRequests(on: ObjectIdentifier(ch), target: target)
                }
            }
        }
        return future
    }

    /// Fails every request still waiting on a connection that closed: its reply cannot come.
    private func failRequests(on connection: ObjectIdentifier, target: PeerSocketAddress) {
        let ids = pending.compactMap { $0.value.connection == connection ? $0.key : nil }
        for id in ids {
            guard let p = pending.removeValue(forKey: id) else { continue }
            p.timer?.cancel()
            if p.expected != .zero { peerMap.peerFailed(p.expected) }
            p.promise.fail(RPCError.unreachable(peer: "\(target)", reason: "connection closed before the reply"))
        }
    }

    private func forget(_ key: PeerSocketAddress, _ future: EventLoopFuture<any Channel>) {
        if let current = pool[key], current === future {
            pool[key] = nil
            poolOrder.removeAll { $0 == key }
        }
    }
}
