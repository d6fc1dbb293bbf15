/// Why a request did not get the answer it asked for.
public enum RPCError: Error, Equatable, Sendable, CustomStringConvertible {
    /// No reply within the bound (after the UDP retry).
    case timeout(peer: String, milliseconds: Int)
    /// The peer refused.
    case denied(String)
    /// The peer does not have what was asked for.
    case notFound(String)
    /// The peer has no handler for the command.
    case unknownCommand(String)
    /// The peer failed while handling the request.
    case peerError(String)
    /// The peer found the request malformed.
    case badRequest(String)
    /// A TCP connection could not be made.
    case unreachable(peer: String, reason: String)
    /// More than `maxInFlight` requests are waiting for replies on this node.
    case tooManyInFlight(limit: Int)
    /// The node is shutting down or not started.
    case shutDown
    /// The request could not be encoded.
    case encoding(WireError)
    /// The reply arrived but did not have the expected shape.
    case malformedReply(String)
    /// The address cannot be sent to: port 0, or not a unicast address of a family this node speaks.
    case invalidAddress(String)
    /// The peer at the address proved another id than the one asked for.
    case identityMismatch(peer: String, expected: Number160, got: Number160?)
    /// One side runs authenticated sessions and the other plaintext (`SecurityMode`).
    case securityMismatch(peer: String, reason: String)
    /// The peer refused the handshake.
    case handshakeRefused(peer: String, reason: String)
    /// The peer (or this node) is over a bound and refused the work; try again later.
    case busy(String)

    public var description: String {
        switch self {
        case .timeout(let p, let ms): "no reply from \(p) within \(ms) ms"
        case .denied(let r): "denied: \(r)"
        case .notFound(let r): "not found: \(r)"
        case .unknownCommand(let r): "unknown command: \(r)"
        case .peerError(let r): "peer error: \(r)"
        case .badRequest(let r): "bad request: \(r)"
        case .unreachable(let p, let r): "cannot reach \(p): \(r)"
        case .tooManyInFlight(let l): "more than \(l) requests in flight on this node"
        case .shutDown: "the node is shut down"
        case .encoding(let e): "cannot encode request: \(e)"
        case .malformedReply(let r): "malformed reply: \(r)"
        case .invalidAddress(let r): "invalid address: \(r)"
        case .identityMismatch(let p, let e, let g):
            "\(p) is not peer \(e.hexString.prefix(10))…" + (g.map { ": it proved id \($0.hexString.prefix(10))…" } ?? "")
        case .securityMismatch(let p, let r): "cannot talk to \(p): \(r)"
        case .handshakeRefused(let p, let r): "\(p) refused the handshake: \(r)"
        case .busy(let r): "busy: \(r)"
        }
    }

    /// The error a non-ok reply stands for; `nil` for `ok`.
    public static func from(reply: Message) -> RPCError? {
        let reason = reply.firstBytes.map { String(decoding: $0, as: UTF8.self) } ?? ""
        switch reply.type {
        case .ok: return nil
        case .notFound: return .notFound(reason)
        case .denied: return .denied(reason)
        case .exception: return .peerError(reason)
        case .unknownCommand: return .unknownCommand(reason)
        case .badRequest: return .badRequest(reason)
        case .retryOverTCP: return .malformedReply("a UDP-only reply that did not fit a datagram")
        case .sessionRequired:
            return .securityMismatch(peer: "\(reply.sender.socket)", reason: "the peer requires authenticated sessions and this node runs insecure")
        case .request, .fireAndForget: return .malformedReply("a \(reply.type) where a reply was expected")
        }
    }
}
