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
    /// By our index (every packet received).
    private var byIndex = SlotIndex()
    /// By the top 64 bits of the peer id (the full id is checked on use): the session to send in.
    /// No one can aim a key at another's 64-bit id prefix.
    private var byPeer = SlotIndex()
    /// Replay windows for TCP, by our index: only sessions that ever carried a TCP frame have one.
    private var tcpWindows: [UInt64: ReplayWindow] = [:]
    /// FINISH headers of initiator sessions the responder has not answered in yet, by our index.
    private var finishPrefixes: [UInt64: [UInt8]] = [:]

    init(capacity: Int) {
        self.capacity = min(max(2, capacity), SlotIndex.maxSlots)
    }

    var count: Int { sessions.count }

    /// Every session is found by its index, and its peer's entry points at a session of that peer
    /// (debug builds check it after every change).
    func isConsistent() -> Bool {
        for (i, s) in sessions.enumerated() where slot(index: s.localIndex) != i { return false }
        for s in sessions {
            guard let p = byPeer.find(s.remoteID.high, key: { $0 < sessions.count ? sessions[$0].remoteID.high : 0 }), p < sessions.count,
                  sessions[p].remoteID == s.remoteID else { return false }
        }
        return byIndex.count == sessions.count && byIndex.slots.allSatisfy { $0 < sessions.count } && byPeer.slots.allSatisfy { $0 < sessions.count }
    }

    /// The slot of the session with our index `index`.
    func slot(index: UInt64) -> Int? {
        byIndex.find(index) { sessions[$0].localIndex }
    }

    /// The slot of the session to send to `peer` in.
    func slot(peer: Number160) -> Int? {
        guard let s = byPeer.find(peer.high, key: { sessions[$0].remoteID.high }), sessions[s].remoteID == peer else { return nil }
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
    mutating func insert(_ session: Session, finishPrefix: [UInt8]? = nil) -> Int {
        if let existing = slot(index: session.localIndex) { remove(slot: existing) }
        let keep = slot(peer: session.remoteID).map { sessions[$0].localIndex }
        var stale: [UInt64] = []
        for s in sessions where s.remoteID == session.remoteID && s.localIndex != keep { stale.append(s.localIndex) }
        for index in stale {
            if let s = slot(index: index) { remove(slot: s) }
        }
        if sessions.count >= capacity, let victim = sessions.indices.min(by: { sessions[$0].lastUsed < sessions[$1].lastUsed }) {
            remove(slot: victim)
        }
        // Grow by a quarter, not double: thousands of nodes in one process each hold a table.
        if sessions.count == sessions.capacity { sessions.reserveCapacity(max(8, sessions.count + sessions.count / 4)) }
        let s = sessions.count
        sessions.append(session)
        byIndex.set(session.localIndex, to: s) { sessions[$0].localIndex }
        byPeer.set(session.remoteID.high, to: s) { sessions[$0].remoteID.high }
        if let finishPrefix { finishPrefixes[session.localIndex] = finishPrefix }
        assert(isConsistent(), "session table inconsistent after insert")
        return s
    }

    /// Records a counter received over TCP in the session `slot` (the FINISH that created it).
    mutating func markTCP(_ counter: UInt64, slot: Int) {
        tcpWindows[sessions[slot].localIndex, default: ReplayWindow()].mark(counter)
    }

    /// Whether the peer has answered in the session (an initiator's packets stop carrying FINISH).
    func isConfirmed(slot: Int) -> Bool {
        finishPrefixes.isEmpty || finishPrefixes[sessions[slot].localIndex] == nil
    }

    /// Drops the session in `slot`.
    mutating func remove(slot: Int) {
        let gone = sessions[slot]
        if !tcpWindows.isEmpty { tcpWindows[gone.localIndex] = nil }
        if !finishPrefixes.isEmpty { finishPrefixes[gone.localIndex] = nil }
        byIndex.remove(gone.localIndex, slot: slot) { sessions[$0].localIndex }
        byPeer.remove(gone.remoteID.high, slot: slot) { sessions[$0].remoteID.high }
        let last = sessions.count - 1
        if slot != last {
            let moved = sessions[last]
            sessions[slot] = moved
            byIndex.move(moved.localIndex, from: last, to: slot)
            byPeer.move(moved.remoteID.high, from: last, to: slot)
        }
        sessions.removeLast()
        // The peer's older session, if one is left, becomes the one to send in.
        if self.slot(peer: gone.remoteID) == nil, let other = sessions.firstIndex(where: { $0.remoteID == gone.remoteID }) {
            byPeer.set(gone.remoteID.high, to: other) { sessions[$0].remoteID.high }
        }
        assert(isConsistent(), "session table inconsistent after remove")
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
        /// The plaintext is in the output buffer.
        case message(length: Int, remoteID: Number160, localIndex: UInt64)
        /// No session has this index.
        case unknownIndex
        case rejected(OpenError)
    }

    /// Opens a packet addressed to our index `index` into `out`. A SEALED packet (as opposed to a
    /// repeated FINISH) from the responder confirms an initiator's session.
    mutating func open(_ packet: UnsafeRawBufferPointer, index: UInt64, headerBytes: Int, counter: UInt64, transport: TransportKind,
                       now: UInt32, into out: UnsafeMutableRawBufferPointer) -> Opened {
        guard let s = slot(index: index) else { return .unknownIndex }
        let window = transport == .udp ? sessions[s].udpWindow : tcpWindows[index] ?? ReplayWindow()
        guard window.canAccept(counter) else { return .rejected(.replayed) }
        guard let length = sessions[s].decrypt(packet, headerBytes: headerBytes, counter: counter, transport: transport, into: out) else {
            return .rejected(.authenticationFailed)
        }
        if transport == .udp {
            sessions[s].udpWindow.mark(counter)
        } else {
            tcpWindows[index, default: ReplayWindow()].mark(counter)
        }
        sessions[s].lastUsed = now
        if headerBytes == SessionWire.sealedHeaderBytes, !finishPrefixes.isEmpty { finishPrefixes[index] = nil }
        return .message(length: length, remoteID: sessions[s].remoteID, localIndex: index)
    }

    /// The sealed packet carrying `plain` in the session `slot` (a TCP frame, length first, for TCP).
    mutating func seal(_ plain: ByteBuffer, slot: Int, transport: TransportKind, now: UInt32) -> ByteBuffer? {
        let prefix = finishPrefixes.isEmpty ? nil : finishPrefixes[sessions[slot].localIndex]
        let size = Session.sealedSize(plain.readableBytes, finish: prefix != nil)
        var out = ByteBufferAllocator().buffer(capacity: size + 4)
        if transport == .tcp { out.writeInteger(UInt32(size)) }
        guard sessions[slot].seal(plain, transport: transport, finishPrefix: prefix, into: &out) else { return nil }
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
        guard let s = slot(index: index) ?? slot(peer: peer) else { return nil }
        return seal(plain, slot: s, transport: transport, now: now)
    }

    mutating func removeAll() {
        sessions = []
        tcpWindows = [:]
        finishPrefixes = [:]
        byIndex.removeAll()
        byPeer.removeAll()
    }
}
