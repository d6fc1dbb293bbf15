import NIOCore

/// An IP address and one port: where a datagram comes from or goes to, or one end of a connection.
public struct Endpoint: Hashable, Sendable, CustomStringConvertible {
    public var ip: IPAddress
    public var port: UInt16

    public init(ip: IPAddress, port: UInt16) {
        self.ip = ip
        self.port = port
    }

    public var description: String { ip.isV4 ? "\(ip):\(port)" : "[\(ip)]:\(port)" }
}

extension PeerSocketAddress {
    /// Where this peer takes datagrams.
    public var udpEndpoint: Endpoint { Endpoint(ip: ip, port: udpPort) }
    /// Where this peer takes connections.
    public var tcpEndpoint: Endpoint { Endpoint(ip: ip, port: tcpPort) }
}

/// How bytes move between peers: *how* a datagram or a frame gets there, never *what* to send or
/// to whom (that is the kernel's: `PathTable` picks the way, the session layer seals, the RPC
/// engine correlates). Two implementations: sockets (`SocketTransport`: UDP and TCP on SwiftNIO)
/// and the simulated network (`SimulatedTransport` in P2PTesting), on which the same kernel runs
/// in virtual time.
///
/// ```
///            kernel                                     transport
///  send ──── DatagramSocket.send(bytes, to:) ─────────▶  one datagram
///       ──── PeerConnection.write(frame) ──────────────▶  one frame on a stream
///  receive ◀─ TransportEvents.received(datagram:…) ────  a datagram on any of the node's sockets
///          ◀─ TransportEvents.received(frame:on:) ─────  a whole frame (length first) on a connection
/// ```
/// Everything is called on, and calls back on, the node's event loop.
package protocol PeerTransport: AnyObject, Sendable {
    /// Binds the node's datagram socket and listener; inbound traffic goes to `events` from then on.
    func start(events: any TransportEvents) -> EventLoopFuture<Void>
    /// The node's own datagram socket (nil while it is being bound again).
    var mainSocket: (any DatagramSocket)? { get }
    /// The port the node listens on (datagrams and connections alike).
    var boundPort: UInt16 { get }
    /// Whether the node's socket is IPv4 (an IPv6 target is then refused before a send could fail).
    var isIPv4: Bool { get }
    /// Times the main socket closed under the node and was bound again.
    var rebinds: Int { get }
    /// The host's own addresses (a peer that sees us at one of them sees us without a NAT).
    var localAddresses: Set<IPAddress> { get }
    /// Whether the host has a real gateway that may be asked for port mappings (UPnP, PCP,
    /// NAT-PMP): never on the simulated network, whatever a node's configuration says.
    var hasGateway: Bool { get }
    /// An extra datagram socket on an ephemeral port (hole punching's birthday sockets, probes);
    /// what arrives on it goes to the events with that socket.
    func openDatagramSocket() -> EventLoopFuture<any DatagramSocket>
    /// A connection to `remote`. `fromListenPort`: from the node's own listen port (TCP hole
    /// punching and observation dial from there). `raw`: the connection's frames (of at most
    /// `raw.maxFrame` bytes) go to `raw.onFrame` instead of the node: a few small unauthenticated
    /// exchanges of NAT traversal.
    func connect(to remote: Endpoint, timeout: TimeAmount, fromListenPort: Bool, raw: RawFrames?) -> EventLoopFuture<any PeerConnection>
    /// Closes every socket and connection.
    func close() -> EventLoopFuture<Void>
}

/// Frames of a connection handed to a closure instead of the node (see `PeerTransport.connect`).
package struct RawFrames: Sendable {
    package var maxFrame: Int
    package var onFrame: @Sendable (ByteBuffer) -> Void

    package init(maxFrame: Int, onFrame: @escaping @Sendable (ByteBuffer) -> Void) {
        self.maxFrame = maxFrame
        self.onFrame = onFrame
    }
}

/// A datagram socket of a node.
package protocol DatagramSocket: AnyObject, Sendable {
    var localPort: UInt16 { get }
    /// Sends one datagram; a send the system refuses completes `promise` with the error.
    func send(_ datagram: ByteBuffer, to remote: Endpoint, promise: EventLoopPromise<Void>?)
    func close()
}

/// A stream to one remote endpoint that carries whole frames (a TCP connection on sockets). A
/// frame is a 4-byte big-endian length and that many bytes of one packet.
package protocol PeerConnection: AnyObject, Sendable {
    /// The remote end, as this node sees it.
    var remote: Endpoint { get }
    var isActive: Bool { get }
    /// Bytes written and not yet taken by the network (a peer that does not read makes this grow).
    var queuedBytes: Int { get }
    /// Writes one frame (length included).
    func write(_ frame: ByteBuffer, promise: EventLoopPromise<Void>?)
    func close()
    /// Completes when the connection has closed, for whatever reason.
    var closeFuture: EventLoopFuture<Void> { get }
}

/// What a transport tells its node, on the node's event loop.
package protocol TransportEvents: AnyObject, Sendable {
    /// A datagram from `remote` on one of the node's sockets.
    func received(datagram: ByteBuffer, from remote: Endpoint, on socket: any DatagramSocket)
    /// One whole frame, its length stripped, on a connection.
    func received(frame: ByteBuffer, on connection: any PeerConnection)
    /// A connection someone opened to us: admitted, or refused with an error (then closed).
    func admit(_ connection: any PeerConnection) throws
    /// A connection carried nothing for `NodeConfig.tcpIdleTimeout`.
    func idle(_ connection: any PeerConnection)
    /// The bytes of partial frames over all connections: the budget and its bound.
    var partialFrames: PartialFrameBudget { get }
    /// How long a connection may stay unable to take writes before it is closed.
    var limits: NodeLimits { get }
    /// The transport closed: it lets go of these events, and a node that is kept alive by its
    /// transport (as a running node is) is let go of too.
    func transportClosed()
}

/// Bytes announced by TCP frames still arriving, over all connections of a node: a frame may be
/// 4 MiB, and a peer that starts many and finishes none must not hold more than
/// `NodeLimits.maxPartialFrameBytes`. Confined to the node's event loop.
package final class PartialFrameBudget: @unchecked Sendable {
    package let limit: Int
    package private(set) var held = 0

    package init(limit: Int) { self.limit = limit }

    /// Takes `bytes`; false when they do not fit.
    package func reserve(_ bytes: Int) -> Bool {
        guard held + bytes <= limit else { return false }
        held += bytes
        return true
    }

    package func release(_ bytes: Int) {
        held = max(0, held - bytes)
    }
}
