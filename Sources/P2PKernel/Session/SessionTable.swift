import NIOCore

/// Every session of one node, bounded by `capacity`: when full, the least recently used session is
/// dropped (its peer's next packet gets SESSION_UNKNOWN and the two handshake again, one round
/// trip). Confined to the node's event loop.
///
/// Sessions sit in one dense array; two small maps find them by our index (every packet) and by
/// the peer's id (every send). A peer has at most two sessions: the newest, used for sending, and
/// the one before it, kept so that packets already in flight in it still open.
struct SessionTable {
    let capacity: Int
    private(set) var sessions: [Session] = []
    private var byIndex: [UInt64: Int32] = [:]
    /// By the top 64 bits of the peer id (the full id is checked on use): a third of the memory of
    /// keying by the whole id, and no one can aim a key at another's 64-bit prefix.
    private var byPeer: [UInt64: Int32] = [:]

    init(capacity: Int) {
        self.capacity = max(2, capacity)
    }

    var count: Int { sessions.count }

    /// The slot of the session with our index `index`.
    func slot(index: UInt64) -> Int? {
        byIndex[index].map(Int.init)
    }

    /// The slot of the session to send to `peer` in.
    func slot(peer: Number160) -> Int? {
        guard let s = byPeer[peer.high].map(Int.init), sessions[s].remoteID == peer else { return nil }
        return s
    }

    subscript(slot: Int) -> Session {
        get { sessions[slot] }
        _modify { yield &sessions[slot] }
    }

    /// Adds a session and makes it the one used for its peer; returns its slot. An older session
    /// of the same peer stays (for packets in flight), any older still is dropped, and when the
    /// table is full the least recently used session makes room.
    @discardableResult
    mutating func insert(_ session: Session) -> Int {
        if let existing = byIndex[session.localIndex] { remove(slot: Int(existing)) }
        let keep = slot(peer: session.remoteID).map { sessions[$0].localIndex }
        let stale = sessions.lazy.filter { $0.remoteID == session.remoteID && $0.localIndex != keep }.map(\.localIndex)
        for index in Array(stale) {
            if let s = byIndex[index] { remove(slot: Int(s)) }
        }
        if sessions.count >= capacity, let victim = sessions.indices.min(by: { sessions[$0].lastUsed < sessions[$1].lastUsed }) {
            remove(slot: victim)
        }
        let s = sessions.count
        sessions.append(session)
        byIndex[session.localIndex] = Int32(s)
        byPeer[session.remoteID.high] = Int32(s)
        return s
    }

    /// Drops the session in `slot`.
    mutating func remove(slot: Int) {
        let gone = sessions[slot]
        byIndex[gone.localIndex] = nil
        if byPeer[gone.remoteID.high] == Int32(slot) { byPeer[gone.remoteID.high] = nil }
        let last = sessions.count - 1
        if slot != last {
            let moved = sessions[last]
            sessions[slot] = moved
            byIndex[moved.localIndex] = Int32(slot)
            if byPeer[moved.remoteID.high] == Int32(last) { byPeer[moved.remoteID.high] = Int32(slot) }
        }
        sessions.removeLast()
        // The peer's older session, if one is left, becomes the one to send in.
        if byPeer[gone.remoteID.high] == nil, let other = sessions.firstIndex(where: { $0.remoteID == gone.remoteID }) {
            byPeer[gone.remoteID.high] = Int32(other)
        }
    }

    /// Drops every session idle since before `cutoff` (uptime seconds); returns how many.
    @discardableResult
    mutating func removeIdle(before cutoff: UInt32) -> Int {
        var removed = 0
        var i = 0
        while i < sessions.count {
            if sessions[i].lastUsed < cutoff {
                remove(slot: i)
                removed += 1
            } else {
                i += 1
            }
        }
        return removed
    }

    // MARK: one call per packet

    /// What opening a packet found.
    enum Opened {
        /// The plaintext is in the output buffer; `confirmed` when this packet confirmed an
        /// initiator's session (the responder has answered in it).
        case message(length: Int, remoteID: Number160, localIndex: UInt64)
        /// No session has this index.
        case unknownIndex
        case rejected(OpenError)
    }

    /// Opens a packet addressed to our index `index` into `out`. A SEALED packet (as opposed to a
    /// repeated FINISH) from the responder confirms an initiator's session.
    mutating func open(_ packet: UnsafeRawBufferPointer, index: UInt64, headerBytes: Int, counter: UInt64, transport: TransportKind,
                       now: UInt32, into out: UnsafeMutableRawBufferPointer) -> Opened {
        guard let s = byIndex[index].map(Int.init) else { return .unknownIndex }
        do {
            let length = try sessions[s].open(packet, headerBytes: headerBytes, counter: counter, transport: transport, into: out)
            sessions[s].lastUsed = now
            if headerBytes == SessionWire.sealedHeaderBytes, sessions[s].finishPrefix != nil { sessions[s].finishPrefix = nil }
            return .message(length: length, remoteID: sessions[s].remoteID, localIndex: index)
        } catch {
            return .rejected(error)
        }
    }

    /// The sealed packet carrying `plain` in the session `slot` (a TCP frame, length first, for TCP).
    mutating func seal(_ plain: ByteBuffer, slot: Int, transport: TransportKind, now: UInt32) -> ByteBuffer? {
        let size = sessions[slot].sealedSize(plain.readableBytes)
        var out = ByteBufferAllocator().buffer(capacity: size + 4)
        if transport == .tcp { out.writeInteger(UInt32(size)) }
        guard sessions[slot].seal(plain, transport: transport, into: &out) else { return nil }
        sessions[slot].lastUsed = now
        return out
    }

    /// Seals `plain` in the session to send `peer` in; nil (and no slot) when there is none.
    mutating func seal(_ plain: ByteBuffer, peer: Number160, transport: TransportKind, now: UInt32) -> (packet: ByteBuffer?, localIndex: UInt64)? {
        guard let s = slot(peer: peer) else { return nil }
        return (seal(plain, slot: s, transport: transport, now: now), sessions[s].localIndex)
    }

    /// Seals a reply in the session its request came in, or the peer's newest if that one went.
    mutating func sealReply(_ plain: ByteBuffer, index: UInt64, peer: Number160, transport: TransportKind, now: UInt32) -> ByteBuffer? {
        guard let s = byIndex[index].map(Int.init) ?? slot(peer: peer) else { return nil }
        return seal(plain, slot: s, transport: transport, now: now)
    }

    mutating func removeAll() {
        sessions.removeAll()
        byIndex.removeAll()
        byPeer.removeAll()
    }
}
