import DequeModule
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
    var timer: KernelTimers.Handle?
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

/// Round-trip estimates per peer, bounded: a peer 10 ms away is asked again after the floor,
/// one across the world after its own round trip — where one node-wide estimate re-sends to the
/// far peers too soon and waits too long for the near ones. Confined to the node's event loop.
struct PeerRoundTrips {
    private var table: [Number160: RTTEstimator] = [:]
    /// Peers in the order they were first measured: the oldest goes when the table is full.
    private var order = Deque<Number160>()
    let capacity: Int

    init(capacity: Int) {
        self.capacity = max(1, capacity)
    }

    var count: Int { table.count }

    mutating func sample(_ peer: Number160, _ rtt: TimeAmount) {
        if table[peer] == nil {
            if table.count >= capacity, let oldest = order.popFirst() { table[oldest] = nil }
            order.append(peer)
        }
        table[peer, default: RTTEstimator()].sample(rtt)
    }

    /// The peer's estimator, if it was measured.
    subscript(_ peer: Number160) -> RTTEstimator? { table[peer] }
}

/// How a request travels.
public enum TransportChoice: Sendable {
    /// UDP when the request fits one datagram, TCP otherwise.
    case auto
    case udp
    case tcp
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

/// The UDP requests a node is running or answered lately, by sender and message id: a requester
/// sends a request again when its reply is late or lost, and the second copy must not be carried
/// out again (a put, an add or a vote would count twice). A copy of one still running is dropped
/// (the reply is on its way); a copy of one answered within `lifetime` gets the same answer again.
///
/// Every request of the last `lifetime` seconds is remembered, up to `capacity`
/// (`NodeLimits.maxRecentRequests`): a burst — fifty peers voting on one key at once — must not
/// push out a request before its copy arrives (a ring of 16 did, and votes counted twice). Answers
/// are kept only up to `maxReplyBytes` of payload (a large answer — a neighbor list, a value —
/// comes from a read, which may run twice). Nothing is held by a node nobody asked lately: the
/// table gives its storage back when it empties. Confined to the loop.
struct RecentRequests {
    struct Key: Hashable {
        let sender: Number160
        let id: UInt32
    }
    enum Seen {
        case new
        case running
        case answered(Reply)
    }
    /// An answer is kept if its payload is at most this large (statuses of writes are small).
    static let maxReplyBytes = 256
    /// Seconds an entry stays good: longer than a requester goes on re-sending (its timeout).
    static let lifetime: UInt32 = 10

    let capacity: Int
    private var entries: [Key: (at: UInt32, reply: Reply?, place: UInt64)] = [:]
    /// Keys in the order they were last recorded: the oldest are forgotten first. A key recorded
    /// again (running, then answered) moves to the back; its older place is skipped.
    private var order = Deque<(key: Key, place: UInt64)>()
    private var places: UInt64 = 0

    init(capacity: Int) { self.capacity = max(1, capacity) }

    /// Requests remembered now.
    var count: Int { entries.count }

    mutating func seen(_ key: Key, now: UInt32) -> Seen {
        guard let e = entries[key], now &- e.at <= Self.lifetime else { return .new }
        return e.reply.map { .answered($0) } ?? .running
    }

    mutating func running(_ key: Key, now: UInt32) { record(key, now: now, reply: nil) }

    mutating func answered(_ key: Key, _ reply: Reply, now: UInt32) {
        let bytes = reply.payload.reduce(0) { $0 + WireCodec.sectionSize($1) }
        guard bytes <= Self.maxReplyBytes else {
            // Too large to keep: a copy runs again (a read), so forget that it ran.
            entries[key] = nil
            return
        }
        record(key, now: now, reply: reply)
    }

    private mutating func record(_ key: Key, now: UInt32, reply: Reply?) {
        forgetOld(now: now)
        if entries[key] == nil, entries.count >= capacity { forgetOldest() }
        places &+= 1
        entries[key] = (now, reply, places)
        order.append((key, places))
        // Places of keys recorded again or forgotten leave as they reach the front; a flood of
        // them (large answers are not kept) is bounded as well.
        while order.count > 2 * capacity, let first = order.popFirst() {
            if entries[first.key]?.place == first.place { entries[first.key] = nil }
        }
    }

    /// Forgets what is older than `lifetime`.
    private mutating func forgetOld(now: UInt32) {
        while let first = order.first {
            guard let e = entries[first.key], e.place == first.place else {
                order.removeFirst()
                continue
            }
            guard now &- e.at > Self.lifetime else { break }
            order.removeFirst()
            entries[first.key] = nil
        }
        if entries.isEmpty, entries.capacity > 16 {
            entries = [:]
            order = Deque()
        }
    }

    /// Forgets the request recorded longest ago (the table is full).
    private mutating func forgetOldest() {
        while let first = order.popFirst() {
            if entries[first.key]?.place == first.place {
                entries[first.key] = nil
                return
            }
        }
    }
}
