import NIOCore
import P2PEvaluation
import P2PKernel
import P2PStorage

/// Storage and the DHT operations as a plugin: a storage backend, the `dht.storage` command that
/// serves other peers' storage requests, and `dht.send` for routed messages.
///
/// ```swift
/// let node = try await Node.builder().plugin(DHTPlugin()).start()
/// try await node.dht.put(Number640(location: Number160(hashing: "song")), Array("la la".utf8))
/// ```
public struct DHTPlugin: Plugin {
    public let name = "dht"
    public let version = "1.0.0"
    /// Where values live on this peer.
    public let backend: any StorageBackend
    /// When set, only these domains are served; requests touching others are denied.
    public let domains: Set<Number160>?
    /// Whether this peer stores replicas for others (false for short-lived clients such as the
    /// `p2p put` tool, whose data would leave with them).
    public let acceptsReplicas: Bool

    /// How often expired values are swept (each sweep costs what expired, not what is stored).
    public let sweepInterval: Duration
    /// Bounds on the subscriptions other peers hold here and on this node's own listeners.
    public let listenLimits: ListenLimits

    public init(backend: any StorageBackend = MemoryStorage(), domains: Set<Number160>? = nil, acceptsReplicas: Bool = true,
                sweepInterval: Duration = .seconds(1), listenLimits: ListenLimits = ListenLimits()) {
        self.listenLimits = listenLimits
        self.backend = backend
        self.domains = domains
        self.acceptsReplicas = acceptsReplicas
        self.sweepInterval = sweepInterval
    }

    public func install(into registry: PluginRegistry) throws {
        try registry.setStorageBackend(backend)
        try registry.register(command: StorageCommand(domains: domains, acceptsReplicas: acceptsReplicas))
        try registry.register(command: RoutedSendCommand())
        try registry.register(question: GetQuestion(domains: domains))
        try registry.register(command: ListenCommand())
        try registry.register(command: NotifyCommand())
        let limits = listenLimits
        registry.withShared(ListenState.self, default: { ListenState(limits: limits) }) { _ in }
        registry.provide((any RoutedMessageSender).self, DHTRoutedSender())
    }

    /// Gets evaluate the replicas' answers by a scheme: without one every get would fail, so a node
    /// that has none gets the built-in ones.
    public var requirements: [PluginRequirement] {
        [.evaluationScheme("majority", default: EvaluationPlugin()), .evaluationScheme("union", default: EvaluationPlugin())]
    }

    public func start(node: Node) async throws {
        node.storage.startSweeping(node: node, every: sweepInterval)
        node.storage.startReporting(node: node)
        node.startReplication()
        if let listen = node.registry.listenState {
            node.registry.addStatus("listen") {
                [("subscriptions held", "\(listen.subscriptionCount)"), ("listening", "\(listen.listenerCount)")]
            }
        }
    }

    public func stop(node: Node) async {
        node.storage.stopSweeping()
        node.stopReplication()
    }

    /// The wire id of `dht.storage`, for plugins that speak the storage protocol (replication).
    public static let storageCommand = CommandID.derive(from: StorageCommand.commandName)
    static let sendCommand = CommandID.derive(from: RoutedSendCommand.commandName)
}

/// Serves storage requests from other peers.
struct StorageCommand: CommandHandler {
    static let commandName = "dht.storage"
    let name = StorageCommand.commandName
    let domains: Set<Number160>?
    let acceptsReplicas: Bool

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        let storageRequest: StorageRequest
        let proof: WriterProof?
        do {
            (storageRequest, proof) = try StorageCodec.decodeSignedRequest(request.payload, maxEntries: context.node.storage.limits.maxEntriesPerRequest)
        } catch .requestTooLarge(let n, let limit) {
            return .reply(Reply(payload: StorageCodec.encode(refusal: .requestTooLarge(entries: n, limit: limit))))
        } catch {
            return .reply(.error(.badRequest, "\(error)"))
        }
        if !acceptsReplicas, storageRequest.isWrite {
            return .reply(.error(.denied, "this peer does not store replicas"))
        }
        if let allowed = domains {
            guard let touched = storageRequest.domains else { return .reply(.error(.denied, "ranges across domains are not served here")) }
            if let unknown = touched.first(where: { !allowed.contains($0) }) {
                return .reply(.error(.denied, "\(StorageError.unknownDomain(unknown))"))
            }
        }
        let node = context.node
        return .future(DHT.executeLocally(storageRequest, proof: proof, sender: context.sender, node: node).map { result in
            Reply(payload: StorageCodec.encode(result))
        }.flatMapErrorThrowing { error in
            // A refused request is an answer, not a failure of the peer: the asker decodes the
            // same typed error (who owns a protected entry, which bound was hit).
            if let e = error as? StorageError {
                if case .malformed = e { return Reply.error(.badRequest, "\(e)") }
                return Reply(payload: StorageCodec.encode(refusal: e))
            }
            throw error
        })
    }
}

/// Delivers a routed message to this peer's raw reply handler.
struct RoutedSendCommand: CommandHandler {
    static let commandName = "dht.send"
    let name = RoutedSendCommand.commandName

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        context.answerWithRawHandler(request)
    }
}

/// Answers a get carried in a routing step from local storage, when that needs no interceptor:
/// the lookup for a value then stops as soon as enough holders have answered.
struct GetQuestion: RoutingQuestionHandler {
    static let handlerName = "dht.get"
    let name = GetQuestion.handlerName
    let domains: Set<Number160>?

    func answer(_ question: [Payload], key: Number160, context: CommandContext) -> [Payload]? {
        guard let request = try? StorageCodec.decodeRequest(question), case .get(let query) = request else { return nil }
        if let allowed = domains {
            guard let touched = request.domains, touched.isSubset(of: allowed) else { return nil }
        }
        guard case .success(let result)? = context.node.storage.executeImmediately(request) else { return nil }
        return StorageCodec.encode(DHT.withRemovals(result, query: query, node: context.node))
    }

    /// Whether an answer holds at least one value.
    static func isHit(_ answer: [Payload]) -> Bool {
        guard case .values(let v, _)? = try? StorageCodec.decodeResult(answer) else { return false }
        return !v.isEmpty
    }
}

/// Routed raw messages for other plugins: a lookup, then `dht.send` to the closest peer.
struct DHTRoutedSender: RoutedMessageSender {
    func send(_ bytes: [UInt8], toKey key: Number160, node: Node) -> EventLoopFuture<[UInt8]> {
        node.lookup(key).flatMap { result -> EventLoopFuture<Message> in
            guard let closest = result.peers.first else { return node.eventLoop.makeFailedFuture(RPCError.notFound("no peer near the key")) }
            return node.request(to: closest, command: DHTPlugin.sendCommand, payload: [.keys([key]), .bytes(bytes)])
        }.flatMapThrowing { reply in
            if let e = RPCError.from(reply: reply) { throw e }
            return reply.firstBytes ?? []
        }
    }
}
