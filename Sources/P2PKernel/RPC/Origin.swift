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
/// Bounded and small, because every peer of a large simulation holds one: `capacity` entries in a
/// ring allocated on first use, answers kept only up to `maxReplyBytes` of payload (a large answer
/// — a neighbor list, a value — comes from a read, which may run twice). Confined to the loop.
struct RecentRequests {
    struct Key: Equatable {
        let sender: Number160
        let id: UInt32
    }
    enum Seen {
        case new
        case running
        case answered(Reply)
    }
    /// Entries remembered: more than a requester sends one peer at once in a lookup or a put.
    static let capacity = 16
    /// An answer is kept if its payload is at most this large (statuses of writes are small).
    static let maxReplyBytes = 256
    /// Seconds an entry stays good: longer than a requester goes on re-sending (its timeout).
    static let lifetime: UInt32 = 10

    private var ring: [(key: Key, at: UInt32, reply: Reply?)] = []
    private var next = 0

    mutating func seen(_ key: Key, now: UInt32) -> Seen {
        for e in ring where e.key == key && now &- e.at <= Self.lifetime {
            return e.reply.map { .answered($0) } ?? .running
        }
        return .new
    }

    mutating func running(_ key: Key, now: UInt32) { put(key, now: now, reply: nil) }

    mutating func answered(_ key: Key, _ reply: Reply, now: UInt32) {
        let bytes = reply.payload.reduce(0) { $0 + WireCodec.sectionSize($1) }
        if let i = ring.firstIndex(where: { $0.key == key }) {
            ring[i].reply = bytes <= Self.maxReplyBytes ? reply : nil
            ring[i].at = now
            if bytes > Self.maxReplyBytes { ring[i].at = now &- Self.lifetime &- 1 }
            return
        }
        guard bytes <= Self.maxReplyBytes else { return }
        put(key, now: now, reply: reply)
    }

    private mutating func put(_ key: Key, now: UInt32, reply: Reply?) {
        if ring.count < Self.capacity {
            ring.append((key, now, reply))
        } else {
            ring[next] = (key, now, reply)
            next = (next + 1) % Self.capacity
        }
    }
}
