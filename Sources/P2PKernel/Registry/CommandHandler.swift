import NIOCore

/// A named command a node answers. The kernel's own commands (ping, neighbors, quit, discover) are
/// handlers like any other and are registered by name through the same registry.
///
/// ```swift
/// struct Echo: CommandHandler {
///     let name = "example.echo"
///     func handle(_ request: Message, context: CommandContext) -> CommandResult {
///         .reply(Reply(payload: request.payload))
///     }
/// }
/// ```
public protocol CommandHandler: Sendable {
    /// A unique name; the 16-bit wire id is derived from it (`CommandID.derive`).
    var name: String { get }
    /// Answers one request. Runs on the node's event loop: return `.reply` when the answer is at
    /// hand, `.future` when it needs more I/O, and never block.
    func handle(_ request: Message, context: CommandContext) -> CommandResult
}

/// A handler's answer.
public enum CommandResult: Sendable {
    /// Reply now.
    case reply(Reply)
    /// Reply when the future completes (a failed future becomes an `exception` reply).
    case future(EventLoopFuture<Reply>)
}

/// The type and payload of a reply; the node fills in the header.
public struct Reply: Sendable {
    public var type: MessageType
    public var payload: [Payload]
    public init(_ type: MessageType = .ok, payload: [Payload] = []) {
        self.type = type
        self.payload = payload
    }
    /// An error reply with a human-readable reason in a byte section.
    public static func error(_ type: MessageType, _ reason: String) -> Reply {
        Reply(type, payload: [.bytes(Array(reason.utf8))])
    }
}

/// Which transport a request came in on.
public enum TransportKind: Sendable, Hashable, CustomStringConvertible {
    case udp
    case tcp
    public var description: String { self == .udp ? "udp" : "tcp" }
}

/// What a handler may use while answering.
public struct CommandContext: Sendable {
    /// The node answering.
    public let node: Node
    /// The sender as this node sees it (IP from the socket, ports as announced).
    public let sender: PeerAddress
    /// The transport the request arrived on.
    public let transport: TransportKind
    /// The source port the request came from (the outside port, when the sender is behind NAT).
    public let sourcePort: UInt16
    /// The TCP connection the request came on (nil for UDP and relayed requests).
    var connection: (any PeerConnection)? = nil
    /// The node's event loop, on which the handler runs.
    public var eventLoop: any EventLoop { node.eventLoop }
}

/// Derives 16-bit wire ids from command names.
public enum CommandID {
    /// FNV-1a (32-bit) of the UTF-8 name, folded to 16 bits: deterministic across nodes and
    /// builds, so two nodes that install the same command agree without coordination.
    public static func derive(from name: String) -> UInt16 {
        var h: UInt32 = 0x811C_9DC5
        for b in name.utf8 {
            h ^= UInt32(b)
            h = h &* 0x0100_0193
        }
        return UInt16(truncatingIfNeeded: h >> 16) ^ UInt16(truncatingIfNeeded: h)
    }
}
