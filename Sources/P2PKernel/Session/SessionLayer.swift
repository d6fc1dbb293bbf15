import NIOCore
import NIOPosix

/// A message waiting to be sealed: for a request (by id), or fire-and-forget (with a write promise).
struct QueuedMessage {
    let plain: ByteBuffer
    let requestID: UInt32?
    let written: EventLoopPromise<Void>?
}

/// Which handshake a message waits for: one per address, expected id and transport at a time.
struct HandshakeKey: Hashable {
    let ip: IPAddress
    let port: UInt16
    let expected: Number160
    let transport: TransportKind
}

/// A handshake this node started and is waiting on.
struct OutboundHandshake {
    let crypto: InitiatorHandshake
    let key: HandshakeKey
    let target: PeerSocketAddress
    let transport: TransportKind
    /// The TCP connection the INIT went out on (the RESPONSE must come back on it).
    let connection: (any PeerConnection)?
    var queue: [QueuedMessage]
    var retransmit: KernelTimers.Handle?
    var expiry: KernelTimers.Handle?
}

/// The session layer of a node, between the wire codec and the transport: its sessions, the
/// handshakes it started, the stateless responder and the handshake rate limit.
///
/// ```
///  send:    message ─ encode ─┬─ session with the peer? ── seal ──────────────────── PathTable
///                             └─ no: queue ─ INIT ⇢ RESPONSE ─ session ─ FINISH+seal ─ PathTable
///  receive: packet ─┬─ SEALED / FINISH ─ session by index ─ open ─ replay check ─ decode ─ RPCEngine
///                   ├─ INIT ─ rate limit ─ stateless RESPONSE
///                   └─ SESSION_UNKNOWN / REFUSED ─ the handshake or requests they concern
/// ```
/// Confined to the node's event loop.
final class SessionLayer: KernelPart, @unchecked Sendable {
    private var link = KernelLink()
    @inline(__always) var kernel: Kernel { link.value }
    func attach(_ kernel: Kernel) { link.set(kernel) }

    /// The handshake responder; nil in insecure mode.
    let responder: HandshakeResponder?
    var table: SessionTable
    var handshakes: [UInt64: OutboundHandshake] = [:]
    var handshakeKeys: [HandshakeKey: UInt64] = [:]
    var handshakeBuckets: TokenBuckets
    let refusalLog: LogBudget

    init(config: NodeConfig, keyPair: PeerKeyPair, random: RandomSource, clock: NodeClock) {
        let limits = config.limits
        responder = config.security == .authenticated ? HandshakeResponder(identity: keyPair, network: config.networkID, random: random) : nil
        table = SessionTable(capacity: limits.maxSessions)
        handshakeBuckets = TokenBuckets(rate: limits.handshakesPerSecond, burst: limits.handshakeBurst, slots: limits.rateLimitSlots, seed: random.next())
        refusalLog = LogBudget(perSecond: 2, clock: clock)
    }

    /// Whether the node runs authenticated sessions (the default), not plaintext.
    var enabled: Bool { responder != nil }

    /// Drops every session and handshake (shutdown); what waited on a handshake fails.
    func closeAll() {
        for index in Array(handshakes.keys).sorted() {
            if let h = handshakes.removeValue(forKey: index) {
                kernel.timers.cancel(h.retransmit)
                kernel.timers.cancel(h.expiry)
                for item in h.queue { item.written?.fail(RPCError.shutDown) }
            }
        }
        handshakeKeys.removeAll()
        table.removeAll()
    }

    // MARK: sending

    /// Seals `item` in the session with `expected`, or queues it behind a handshake.
    func sendSecure(_ item: QueuedMessage, to target: PeerSocketAddress, expected: Number160, over kind: TransportKind,
                    connection: (any PeerConnection)?) {
        if expected != .zero, let (packet, local) = table.seal(item.plain, peer: expected, transport: kind, now: coarseSeconds) {
            send(item, packet, session: local, to: target, peer: expected, over: kind, connection: connection)
        } else {
            enqueue(item, target: target, expected: expected, over: kind, connection: connection)
        }
    }

    /// Seals one message in the session in `slot` and writes it.
    private func seal(_ item: QueuedMessage, slot: Int, to target: PeerSocketAddress, over kind: TransportKind, connection: (any PeerConnection)?) {
        let local = table[slot].localIndex, peer = table[slot].remoteID
        send(item, table.seal(item.plain, slot: slot, transport: kind, now: coarseSeconds), session: local, to: target, peer: peer,
             over: kind, connection: connection)
    }

    private func send(_ item: QueuedMessage, _ packet: ByteBuffer?, session: UInt64, to target: PeerSocketAddress, peer: Number160,
                      over kind: TransportKind, connection: (any PeerConnection)?) {
        guard let packet else {
            return reject(item, .encoding(.limitExceeded(what: "sealed message bytes", value: item.plain.readableBytes, limit: WireLimits.maxMessageBytes)))
        }
        if let id = item.requestID {
            guard kernel.rpc.pending[id] != nil else { return }
            kernel.rpc.pending[id]?.session = session
        }
        switch kind {
        case .udp:
            guard transport.mainSocket != nil else { return reject(item, .shutDown) }
            kernel.paths.emitUDP(packet, to: target, peer: peer, promise: item.written)
        case .tcp:
            guard let connection else { return reject(item, .shutDown) }
            kernel.paths.emitTCP(packet, on: connection, peer: peer, promise: item.written)
        }
    }

    /// Sends a reply in the session its request came in (or the peer's newest, if that one was
    /// dropped meanwhile); with neither, the reply is dropped and the requester times out.
    func sendInSession(_ plain: ByteBuffer, replyTo peer: Number160, session: UInt64, origin: Origin) {
        eventLoop.assertInEventLoop()
        guard let packet = table.sealReply(plain, index: session, peer: peer, transport: origin.kind, now: coarseSeconds) else { return }
        switch origin {
        case .udp(let remote): kernel.paths.udpSocket(to: remote)?.send(packet, to: remote, promise: nil)
        case .tcp(let connection): kernel.rpc.writeReply(packet, on: connection)
        case .relayed, .link: kernel.paths.writeRelayed(packet, framed: origin.kind == .tcp, origin: origin)
        }
    }

    private func reject(_ item: QueuedMessage, _ error: RPCError, peerFailed: Bool = false) {
        item.written?.fail(error)
        if let id = item.requestID { kernel.rpc.failRequest(id, error, peerFailed: peerFailed) }
    }

    // MARK: handshakes we start

    private func enqueue(_ item: QueuedMessage, target: PeerSocketAddress, expected: Number160, over kind: TransportKind,
                         connection: (any PeerConnection)?) {
        let key = HandshakeKey(ip: target.ip, port: kind == .udp ? target.udpPort : target.tcpPort, expected: expected, transport: kind)
        if let index = handshakeKeys[key], handshakes[index] != nil {
            if let id = item.requestID, handshakes[index]?.queue.contains(where: { $0.requestID == id }) == true { return }
            guard (handshakes[index]?.queue.count ?? 0) < limits.maxQueuedPerHandshake else {
                return reject(item, .busy("more than \(limits.maxQueuedPerHandshake) messages wait for the handshake with \(target)"))
            }
            handshakes[index]?.queue.append(item)
            return
        }
        guard handshakes.count < limits.maxHandshakesInProgress else {
            return reject(item, .busy("more than \(limits.maxHandshakesInProgress) handshakes in progress"))
        }
        var fresh: UInt64
        repeat { fresh = UInt64(kernel.rpc.randomIDs.next()) << 32 | UInt64(kernel.rpc.randomIDs.next()) } while fresh == 0 || handshakes[fresh] != nil || table.slot(index: fresh) != nil
        let index = fresh
        let crypto = InitiatorHandshake(network: networkID, index: index, expected: expected, random: random)
        handshakes[index] = OutboundHandshake(crypto: crypto, key: key, target: target, transport: kind, connection: connection, queue: [item])
        handshakeKeys[key] = index
        sendINIT(index, retry: min(kernel.rpc.retryAfter(expected), TimeAmount(kernel.requestTimeout / 4)))
        // No RESPONSE within a request's time: the peer did not answer, which counts against it.
        handshakes[index]?.expiry = kernel.timers.schedule(in: TimeAmount(kernel.requestTimeout)) { [self] in
            failHandshake(index, .timeout(peer: "\(target)", milliseconds: Int(kernel.requestTimeout.components.seconds * 1000
                + kernel.requestTimeout.components.attoseconds / 1_000_000_000_000_000)), peerFailed: true)
        }
    }

    /// Sends (or re-sends) an INIT; over UDP, again after `retry`, doubling, until the handshake
    /// finishes or expires.
    private func sendINIT(_ index: UInt64, retry: TimeAmount) {
        guard let h = handshakes[index], running else { return }
        var packet = ByteBufferAllocator().buffer(capacity: SessionWire.initBytes + 4)
        switch h.transport {
        case .udp:
            packet.writeBytes(h.crypto.initPacket)
            kernel.paths.emitUDP(packet, to: h.target, peer: h.crypto.expected, promise: nil)
            handshakes[index]?.retransmit = kernel.timers.schedule(in: retry) { [self] in
                sendINIT(index, retry: retry * 2)
            }
        case .tcp:
            packet.writeInteger(UInt32(SessionWire.initBytes))
            packet.writeBytes(h.crypto.initPacket)
            if let c = h.connection { kernel.paths.emitTCP(packet, on: c, peer: h.crypto.expected, promise: nil) }
        }
    }

    private func removeHandshake(_ index: UInt64) -> OutboundHandshake? {
        guard let h = handshakes.removeValue(forKey: index) else { return nil }
        kernel.timers.cancel(h.retransmit)
        kernel.timers.cancel(h.expiry)
        if handshakeKeys[h.key] == index { handshakeKeys[h.key] = nil }
        if handshakes.isEmpty, handshakes.capacity > 4 {
            // As with `kernel.rpc.pending`: bootstrap grows these, and an idle node need not keep the room.
            handshakes = [:]
            handshakeKeys = [:]
        }
        return h
    }

    private func failHandshake(_ index: UInt64, _ error: RPCError, peerFailed: Bool = false) {
        guard let h = removeHandshake(index) else { return }
        metrics?.handshakesFailed.increment()
        for item in h.queue { reject(item, error, peerFailed: peerFailed) }
    }

    /// Whether a handshake packet came back the way the handshake went out.
    private func cameBack(_ h: OutboundHandshake, origin: Origin, remote: Endpoint) -> Bool {
        switch origin {
        case .udp:
            return h.transport == .udp && (kernel.paths.udpPaths[h.crypto.expected]?.address == remote
                || (remote.ip == h.target.ip && remote.port == h.target.udpPort))
        case .tcp(let connection): return h.connection.map { $0 === connection } ?? false
        case .relayed(let peer, .udp): return h.transport == .udp && h.crypto.expected == peer
        case .relayed(let peer, .tcp(let connection)):
            return h.crypto.expected == peer && (h.connection.map { $0 === connection } ?? false)
        case .link: return false
        }
    }

    private func completeHandshake(_ r: HandshakeResponse, origin: Origin, remote: Endpoint) {
        guard let h = handshakes[r.initiatorIndex], cameBack(h, origin: origin, remote: remote) else {
            countDrop("RESPONSE from \(remote) for no handshake of ours")
            return
        }
        let session: Session
        let finishPrefix: [UInt8]
        do {
            (session, finishPrefix) = try h.crypto.complete(r, network: networkID, identity: node.keyPair, now: coarseSeconds)
        } catch .identityMismatch(let expected, let got) {
            failHandshake(r.initiatorIndex, .identityMismatch(peer: "\(h.target)", expected: expected, got: got), peerFailed: true)
            return
        } catch {
            // A forged RESPONSE (it needed our random index): keep waiting for the real one.
            countDrop("RESPONSE from \(remote): \(error)")
            return
        }
        _ = removeHandshake(r.initiatorIndex)
        var fresh = session
        fresh.lastUsed = coarseSeconds
        let slot = table.insert(fresh, finishPrefix: finishPrefix)
        node.counters.withLockedValue { $0.handshakes += 1 }
        metrics?.handshakesCompleted.increment()
        let local = table[slot].localIndex
        for item in h.queue {
            // A slot moves when another session is removed; find ours again by its index.
            guard let s = table.slot(index: local) else { return reject(item, .shutDown) }
            seal(item, slot: s, to: h.target, over: h.transport, connection: h.connection)
        }
    }

    private func handshakeRefused(_ reason: RefusalReason, index: UInt64, origin: Origin, remote: Endpoint) {
        guard let h = handshakes[index], cameBack(h, origin: origin, remote: remote) else { return }
        let peer = "\(h.target)"
        switch reason {
        case .insecurePeer:
            logRefusal("\(remote) runs without authenticated table (insecure mode); this node requires them")
            failHandshake(index, .securityMismatch(peer: peer, reason: "the peer runs without authenticated table (insecure mode); this node requires them"))
        case .notThisPeer:
            failHandshake(index, .identityMismatch(peer: peer, expected: h.crypto.expected, got: nil), peerFailed: true)
        case .unsupportedVersion, .otherNetwork:
            failHandshake(index, .handshakeRefused(peer: peer, reason: "\(reason)"))
        }
    }

    /// The peer says it has no session with the index we used: it restarted or dropped it. If we
    /// have requests in that session waiting on exactly that address, forget the session and send
    /// them again (a new handshake first), so a restarted peer answers within one request timeout.
    private func sessionLost(_ index: UInt64, origin: Origin, remote: Endpoint) {
        guard let slot = table.sessions.firstIndex(where: { $0.remoteIndex == index }) else { return }
        let local = table[slot].localIndex
        let affected = kernel.rpc.pending.filter { _, p in
            guard p.session == local else { return false }
            switch origin {
            case .udp:
                return p.transport == .udp && ((p.expected != .zero && kernel.paths.udpPaths[p.expected]?.address == remote)
                    || (remote.ip == p.target.ip && remote.port == p.target.udpPort))
            case .tcp(let connection): return p.connection == ObjectIdentifier(connection)
            case .relayed(let peer, let via): return p.expected == peer && p.transport == via.kind
            case .link: return false
            }
        }
        guard !affected.isEmpty else { return }
        table.remove(slot: slot)
        for (id, p) in affected {
            kernel.rpc.pending[id]?.session = 0
            kernel.rpc.transmit(p.plaintext, to: p.target, expected: p.expected, over: p.transport, requestID: id)
        }
    }

    /// Drops every session with `peer` (it quit): the memory is free at once, and a peer that
    /// comes back handshakes anew. On the event loop.
    func forgetSessions(of peer: Number160) {
        while let slot = table.slot(peer: peer) { table.remove(slot: slot) }
    }

    // MARK: receiving

    func received(_ buffer: ByteBuffer, remote: Endpoint, origin: Origin) {
        eventLoop.assertInEventLoop()
        let ip = remote.ip
        buffer.withUnsafeReadableBytes { raw in
            let packet: SessionPacket
            do {
                packet = try SessionCodec.decode(raw)
            } catch {
                countDrop("undecodable session packet from \(remote): \(error)")
                kernel.connections.closeIfStream(origin)
                return
            }
            let source = SourceKey.of(ip, port: remote.port)
            switch packet {
            case .sealed(let header):
                let opened = open(raw, index: header.receiverIndex, headerBytes: SessionWire.sealedHeaderBytes, counter: header.counter,
                                  ip: ip, remote: remote, origin: origin)
                if !opened, handshakeBuckets.allow(source, nowNanoseconds: clock.uptimeNanoseconds) {
                    // The peer holds a session we do not (we restarted, or dropped it): say so, so it
                    // handshakes again. Nine bytes, for at least 33 received: no amplification.
                    var notice = ByteBufferAllocator().buffer(capacity: SessionWire.sessionUnknownBytes)
                    notice.writeBytes(SessionCodec.encodeSessionUnknown(index: header.receiverIndex))
                    kernel.rpc.write(notice, origin: origin)
                }
            case .handshakeFinish(let finish, let bodyOffset):
                acceptFinish(raw, finish, bodyOffset: bodyOffset, source: source, ip: ip, remote: remote, origin: origin)
            case .handshakeInit(let i):
                answerInit(i, source: source, ip: ip, origin: origin)
            case .handshakeResponse(let r):
                completeHandshake(r, origin: origin, remote: remote)
            case .sessionUnknown(let index):
                sessionLost(index, origin: origin, remote: remote)
            case .refused(let reason, let index):
                handshakeRefused(reason, index: index, origin: origin, remote: remote)
            }
        }
    }

    private func answerInit(_ i: HandshakeInit, source: UInt64, ip: IPAddress, origin: Origin) {
        guard let responder, handshakeBuckets.allow(source, nowNanoseconds: clock.uptimeNanoseconds) else {
            countDrop("INIT over the handshake rate of its source")
            return
        }
        let refusal: RefusalReason? = i.networkID != networkID ? .otherNetwork
            : (i.responderHint != .zero && i.responderHint != peerID) ? .notThisPeer : nil
        var packet = ByteBufferAllocator().buffer(capacity: SessionWire.initBytes)
        if let refusal {
            countDrop("INIT refused: \(refusal)")
            packet.writeBytes(SessionCodec.encodeRefused(refusal, initiatorIndex: i.initiatorIndex))
        } else {
            do {
                packet.writeBytes(SessionCodec.encode(try responder.respond(to: i, from: ip, now: clock.uptimeNanoseconds)))
            } catch {
                countDrop("INIT with a bad key: \(error)")
                return
            }
        }
        kernel.rpc.write(packet, origin: origin)
    }

    private func acceptFinish(_ raw: UnsafeRawBufferPointer, _ f: HandshakeFinish, bodyOffset: Int, source: UInt64,
                              ip: IPAddress, remote: Endpoint, origin: Origin) {
        // The initiator repeats FINISH until we answer in the session: those open in it directly.
        if let slot = table.slot(index: f.responderIndex) {
            guard table[slot].remoteIndex == f.initiatorIndex else { return countDrop("FINISH for another session") }
            _ = open(raw, index: f.responderIndex, headerBytes: bodyOffset, counter: f.counter, ip: ip, remote: remote, origin: origin)
            return
        }
        guard let responder, handshakeBuckets.allow(source, nowNanoseconds: clock.uptimeNanoseconds) else {
            return countDrop("FINISH over the handshake rate of its source")
        }
        var session: Session
        do {
            session = try responder.accept(f, from: ip, now: clock.uptimeNanoseconds, seconds: coarseSeconds)
        } catch {
            return countDrop("FINISH from \(remote): \(error)")
        }
        withScratch(raw.count) { scratch in
            guard let length = session.decrypt(raw, headerBytes: bodyOffset, counter: f.counter, transport: origin.kind, into: scratch) else {
                return countDrop("FINISH from \(remote) whose message does not open")
            }
            // A fresh session: mark the counter in the window of the transport it came on.
            if origin.kind == .udp { session.udpWindow.mark(f.counter) }
            // Only a FINISH whose message opens makes a session: a valid signature alone does not.
            session.lastUsed = coarseSeconds
            let slot = table.insert(session)
            if origin.kind == .tcp { table.markTCP(f.counter, slot: slot) }
            node.counters.withLockedValue { $0.handshakes += 1 }
            metrics?.handshakesCompleted.increment()
            deliver(UnsafeRawBufferPointer(rebasing: scratch[..<length]), remoteID: session.remoteID, session: session.localIndex,
                    ip: ip, remote: remote, origin: origin)
        }
    }

    /// Opens a packet addressed to our index and hands on what it carries; false when no session
    /// has that index.
    private func open(_ raw: UnsafeRawBufferPointer, index: UInt64, headerBytes: Int, counter: UInt64, ip: IPAddress,
                      remote: Endpoint, origin: Origin) -> Bool {
        withScratch(raw.count) { scratch in
            switch table.open(raw, index: index, headerBytes: headerBytes, counter: counter, transport: origin.kind,
                                 now: coarseSeconds, into: scratch) {
            case .unknownIndex:
                return false
            case .rejected(let error):
                countDrop("sealed packet from \(remote): \(error)")
                kernel.connections.closeIfStream(origin)
            case .message(let length, let remoteID, let local):
                deliver(UnsafeRawBufferPointer(rebasing: scratch[..<length]), remoteID: remoteID, session: local, ip: ip, remote: remote, origin: origin)
            }
            return true
        }
    }

    /// Runs `body` with a buffer for an opened packet of up to `bytes`: the event loop thread's own
    /// for datagram sizes (no allocation per packet, and none per node), a fresh one for larger
    /// TCP frames.
    private func withScratch<T>(_ bytes: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> T) rethrows -> T {
        if bytes <= Scratch.bytes {
            if let mine = Scratch.perThread.currentValue { return try body(mine.buffer) }
            let fresh = Scratch()
            Scratch.perThread.currentValue = fresh
            return try body(fresh.buffer)
        }
        let big = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 16)
        defer { big.deallocate() }
        return try body(big)
    }

    /// Decodes an opened message and hands it on, if its sender is the session's proven peer.
    private func deliver(_ plain: UnsafeRawBufferPointer, remoteID: Number160, session: UInt64, ip: IPAddress, remote: Endpoint, origin: Origin) {
        let message: Message
        do {
            message = try WireCodec.decode(plain, senderIP: ip, networkID: networkID)
        } catch {
            return countDrop("sealed message from \(remote) does not decode: \(error)")
        }
        guard message.sender.id == remoteID else {
            return countDrop("message claims id \(message.sender.id) in the session of \(remoteID)")
        }
        kernel.rpc.dispatch(message, bytes: plain.count, origin: origin, remote: remote, session: session)
    }

    // MARK: refusing the other mode

    /// A plaintext request to a node that requires table: answered with `sessionRequired`, a
    /// bare header no larger than the request, so the insecure peer gets a clear error.
    func refusePlaintext(_ message: Message, remote: Endpoint, origin: Origin) {
        guard message.type == .request,
              handshakeBuckets.allow(SourceKey.of(message.sender.ip, port: remote.port), nowNanoseconds: clock.uptimeNanoseconds) else {
            return countDrop("plaintext message from \(remote)")
        }
        logRefusal("refused a plaintext request from \(remote): this node requires authenticated table (the peer runs insecure)")
        let reply = Message(networkID: networkID, id: message.id, type: .sessionRequired, command: message.command,
                            sender: selfAddress, recipientID: message.sender.id)
        var plain = ByteBufferAllocator().buffer(capacity: WireLimits.headerBytes)
        plain.writeMessage(reply, size: WireLimits.headerBytes, framed: false)
        kernel.rpc.write(plain, origin: origin)
    }

    /// A handshake to a node in insecure mode: refused with a 10-byte REFUSED, so the secure peer
    /// gets a clear error too.
    func refuseHandshake(_ buffer: ByteBuffer, remote: Endpoint, origin: Origin) {
        let index: UInt64? = buffer.withUnsafeReadableBytes { raw in
            if case .handshakeInit(let i)? = try? SessionCodec.decode(raw) { return i.initiatorIndex }
            return nil
        }
        guard let index, handshakeBuckets.allow(SourceKey.of(remote.ip, port: remote.port), nowNanoseconds: clock.uptimeNanoseconds) else {
            return countDrop("session packet from \(remote) to an insecure node")
        }
        logRefusal("refused a handshake from \(remote): this node runs insecure and the peer requires authenticated table")
        var packet = ByteBufferAllocator().buffer(capacity: SessionWire.refusedBytes)
        packet.writeBytes(SessionCodec.encodeRefused(.insecurePeer, initiatorIndex: index))
        kernel.rpc.write(packet, origin: origin)
    }

    /// Counts a refusal between modes and logs it, at most a few times a second.
    func logRefusal(_ text: String) {
        node.counters.withLockedValue { $0.securityRefusals += 1 }
        if refusalLog.allow() { logger.warning("\(text)") }
    }
}

/// A decryption buffer per thread: every node on an event loop runs on its thread, one packet at
/// a time, and nothing holds the plaintext after it is decoded.
final class Scratch: @unchecked Sendable {
    static let bytes = SessionWire.maxDatagramBytes + 64
    static let perThread = ThreadSpecificVariable<Scratch>()
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Scratch.bytes, alignment: 16)
    deinit { buffer.deallocate() }
}
