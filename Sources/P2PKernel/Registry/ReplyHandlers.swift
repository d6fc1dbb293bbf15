#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Answers direct messages of raw bytes.
public protocol RawReplyHandler: Sendable {
    func reply(to bytes: [UInt8], from sender: PeerAddress) async throws -> [UInt8]
}

extension CommandContext {
    /// Answers a request whose first byte section is for this peer's raw reply handler (direct
    /// messages and routed sends): the handler's bytes, or `denied` when the peer has none.
    public func answerWithRawHandler(_ request: Message) -> CommandResult {
        guard let bytes = request.firstBytes else { return .reply(.error(.badRequest, "the message carries no byte section")) }
        guard let handler = node.registry.rawReplyHandler else {
            return .reply(.error(.denied, "this peer has no raw reply handler"))
        }
        let sender = self.sender
        return .future(node.makeFutureWithTask {
            Reply(payload: [.bytes(try await handler.reply(to: bytes, from: sender))])
        })
    }
}

/// Answers direct messages carrying one `Codable` type; the reply is `Codable` too.
///
/// ```swift
/// struct Greeter: ObjectReplyHandler {
///     func reply(to request: String, from sender: PeerAddress) async throws -> String {
///         request == "hello" ? "world" : "?"
///     }
/// }
/// ```
public protocol ObjectReplyHandler: Sendable {
    associatedtype Request: Codable & Sendable
    associatedtype Response: Codable & Sendable
    /// The name the request type travels under; by default the type's name.
    static var typeName: String { get }
    func reply(to request: Request, from sender: PeerAddress) async throws -> Response
}

extension ObjectReplyHandler {
    public static var typeName: String { String(describing: Request.self) }
}

/// A type-erased object handler, as the registry stores it.
public protocol AnyObjectReplyHandler: Sendable {
    var typeName: String { get }
    /// Decodes the JSON request, answers, and encodes the JSON response.
    func reply(json: [UInt8], from sender: PeerAddress) async throws -> [UInt8]
}

/// Why an object message could not be handled.
public enum ObjectMessageError: Error, CustomStringConvertible {
    case undecodable(type: String, reason: String)
    public var description: String {
        switch self {
        case .undecodable(let t, let r): "cannot decode a \(t): \(r)"
        }
    }
}

struct ObjectHandlerBox<H: ObjectReplyHandler>: AnyObjectReplyHandler {
    let handler: H
    init(_ handler: H) { self.handler = handler }
    var typeName: String { H.typeName }

    func reply(json: [UInt8], from sender: PeerAddress) async throws -> [UInt8] {
        let request: H.Request
        do {
            request = try JSONDecoder().decode(H.Request.self, from: Data(json))
        } catch {
            throw ObjectMessageError.undecodable(type: H.typeName, reason: "\(error)")
        }
        let response = try await handler.reply(to: request, from: sender)
        return Array(try JSONEncoder().encode(response))
    }
}
