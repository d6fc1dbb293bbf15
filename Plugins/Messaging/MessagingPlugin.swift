import NIOCore
import P2PKernel
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Direct messages between two peers: raw bytes answered by a `RawReplyHandler`, or `Codable`
/// objects answered by an `ObjectReplyHandler` for their type.
///
/// ```swift
/// let node = try await Node.builder().plugin(MessagingPlugin(objects: [Greeter()])).start()
/// let answer: String = try await other.messaging.send("hello", to: node.address, expecting: String.self)
/// ```
public struct MessagingPlugin: Plugin {
    public let name = "messaging"
    public let version = "1.0.0"
    let raw: (any RawReplyHandler)?
    let register: @Sendable (PluginRegistry) throws -> Void

    /// - Parameters:
    ///   - raw: answers raw direct messages (and routed sends).
    ///   - objects: handlers for `Codable` messages, one per request type.
    public init<each H: ObjectReplyHandler>(raw: (any RawReplyHandler)? = nil, objects: (repeat each H)) {
        self.raw = raw
        let handlers = (repeat each objects)
        self.register = { registry in
            repeat try registry.register(objectHandler: each handlers)
        }
    }

    /// A messaging plugin with only a raw handler (or none: then it only sends).
    public init(raw: (any RawReplyHandler)? = nil) {
        self.raw = raw
        self.register = { _ in }
    }

    public func install(into registry: PluginRegistry) throws {
        if let raw { registry.setRawReplyHandler(raw) }
        try register(registry)
        try registry.register(command: RawCommand())
        try registry.register(command: ObjectCommand())
        registry.provide((any RawMessageSender).self, RawSender())
    }

    static let rawCommand = CommandID.derive(from: RawCommand.commandName)
    static let objectCommand = CommandID.derive(from: ObjectCommand.commandName)
}

/// Raw direct messages for other plugins, by address.
struct RawSender: RawMessageSender {
    func send(_ bytes: [UInt8], to address: PeerSocketAddress, node: Node) -> EventLoopFuture<[UInt8]> {
        node.request(to: address, command: MessagingPlugin.rawCommand, payload: [.bytes(bytes)]).flatMapThrowing { reply in
            if let e = RPCError.from(reply: reply) { throw e }
            return reply.firstBytes ?? []
        }
    }
}

struct RawCommand: CommandHandler {
    static let commandName = "messaging.raw"
    let name = RawCommand.commandName
    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        context.answerWithRawHandler(request)
    }
}

struct ObjectCommand: CommandHandler {
    static let commandName = "messaging.object"
    let name = ObjectCommand.commandName
    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        let sections = request.payload.compactMap { p -> [UInt8]? in if case .bytes(let b) = p { b } else { nil } }
        guard sections.count == 2 else { return .reply(.error(.badRequest, "an object message carries a type name and a body")) }
        let typeName = String(decoding: sections[0], as: UTF8.self)
        guard let handler = context.node.registry.objectHandler(for: typeName) else {
            return .reply(.error(.denied, "this peer has no object reply handler for '\(typeName)'"))
        }
        let sender = context.sender
        let body = sections[1]
        return .future(context.node.makeFutureWithTask {
            do {
                return Reply(payload: [.bytes(try await handler.reply(json: body, from: sender))])
            } catch let e as ObjectMessageError {
                return Reply.error(.badRequest, "\(e)")
            }
        })
    }
}

extension Node {
    /// Direct messages from this node (requires `MessagingPlugin` on the receiving peer).
    public var messaging: Messaging { Messaging(node: self) }
}

/// Why a direct message failed on our side.
public enum MessagingError: Error, CustomStringConvertible {
    case undecodableReply(type: String, reason: String)
    public var description: String {
        switch self {
        case .undecodableReply(let t, let r): "cannot decode the reply as \(t): \(r)"
        }
    }
}

/// Sends direct messages to one peer. TCP by default; `.udp` for small payloads (≤ one datagram).
public struct Messaging: Sendable {
    public let node: Node

    /// Sends bytes; the peer's raw reply handler answers.
    public func send(_ bytes: [UInt8], to peer: PeerAddress, transport: TransportChoice = .tcp) async throws -> [UInt8] {
        let reply = try await node.request(to: peer, command: MessagingPlugin.rawCommand, payload: [.bytes(bytes)], transport: transport).get()
        if let e = RPCError.from(reply: reply) { throw e }
        return reply.firstBytes ?? []
    }

    /// Sends a `Codable` object; the peer's object reply handler for its type answers.
    public func send<Request: Codable & Sendable, Response: Codable & Sendable>(
        _ object: Request, to peer: PeerAddress, expecting: Response.Type = Response.self,
        typeName: String = String(describing: Request.self), transport: TransportChoice = .tcp
    ) async throws -> Response {
        let body = Array(try JSONEncoder().encode(object))
        let reply = try await node.request(to: peer, command: MessagingPlugin.objectCommand,
                                           payload: [.bytes(Array(typeName.utf8)), .bytes(body)], transport: transport).get()
        if let e = RPCError.from(reply: reply) { throw e }
        do {
            return try JSONDecoder().decode(Response.self, from: Data(reply.firstBytes ?? []))
        } catch {
            throw MessagingError.undecodableReply(type: String(describing: Response.self), reason: "\(error)")
        }
    }
}
