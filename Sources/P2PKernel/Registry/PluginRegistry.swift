import NIOConcurrencyHelpers

/// Everything plugins register into a node: commands, reply handlers, event subscriptions, and
/// state that plugins share by type (storage keeps its backend, interceptors and replication
/// policies there, evaluation its schemes: the kernel knows nothing of either). Registration happens while
/// the node is assembled; lookups happen per request under an uncontended lock.
public final class PluginRegistry: Sendable {
    /// Commands by name and wire id.
    public let commands = CommandRegistry()

    private struct State: Sendable {
        var plugins: [any Plugin] = []
        var shared: [ObjectIdentifier: any Sendable] = [:]
        var services: [ObjectIdentifier: any Sendable] = [:]
        var rawReplyHandler: (any RawReplyHandler)?
        var objectHandlers: [String: any AnyObjectReplyHandler] = [:]
        var subscribers: [@Sendable (NodeEvent) -> Void] = []
        var questions: [UInt16: any RoutingQuestionHandler] = [:]
        var commandsByPlugin: [String: [String]] = [:]
        var status: [(title: String, rows: @Sendable () -> [(String, String)])] = []
    }
    private let state = NIOLockedValueBox(State())

    public init() {}

    // MARK: plugins

    /// Installs a plugin: a duplicate name, or any error from its `install`, leaves the registry
    /// as it was before the call.
    public func install(_ plugin: any Plugin) throws {
        let duplicate = state.withLockedValue { s in s.plugins.contains { $0.name == plugin.name } }
        guard !duplicate else { throw PluginError.duplicatePlugin(plugin.name) }
        let before = state.withLockedValue { $0 }
        let commandsBefore = commands.names
        do {
            try plugin.install(into: self)
        } catch {
            state.withLockedValue { $0 = before }
            commands.removeAll(except: Set(commandsBefore))
            throw error
        }
        let added = commands.names.filter { !commandsBefore.contains($0) }
        state.withLockedValue {
            $0.plugins.append(plugin)
            $0.commandsByPlugin[plugin.name] = added
        }
    }

    /// The commands a plugin registered when it was installed.
    public func commandNames(of plugin: String) -> [String] {
        state.withLockedValue { $0.commandsByPlugin[plugin] ?? [] }
    }

    // MARK: status

    /// Adds a section to the node's status (`Node.status()`, the status page): `rows` is called
    /// each time the status is read, on the node's event loop, and must be quick.
    public func addStatus(_ title: String, rows: @escaping @Sendable () -> [(String, String)]) {
        state.withLockedValue { $0.status.append((title, rows)) }
    }

    func statusSections() -> [NodeStatus.Section] {
        let providers = state.withLockedValue { $0.status }
        return providers.map { NodeStatus.Section(title: $0.title, rows: $0.rows()) }
    }

    /// Installed plugins, in install order.
    public var plugins: [any Plugin] { state.withLockedValue { $0.plugins } }

    /// The installed plugin of a type, if any.
    public func plugin<P: Plugin>(_ type: P.Type) -> P? {
        state.withLockedValue { s in s.plugins.lazy.compactMap { $0 as? P }.first }
    }

    // MARK: commands

    /// Registers a command handler (see `CommandRegistry.register`).
    @discardableResult
    public func register(command: any CommandHandler) throws -> UInt16 {
        try commands.register(command)
    }

    // MARK: routing questions

    /// Registers a handler for questions carried in routing steps.
    public func register(question handler: any RoutingQuestionHandler) throws {
        let id = CommandID.derive(from: handler.name)
        let error: RegistryError? = state.withLockedValue { s in
            if let existing = s.questions[id] {
                return existing.name == handler.name ? .duplicateName(handler.name)
                    : .idCollision(name: handler.name, existing: existing.name, id: id)
            }
            s.questions[id] = handler
            return nil
        }
        if let error { throw error }
    }

    /// The question handler for a wire id.
    public func questionHandler(for id: UInt16) -> (any RoutingQuestionHandler)? {
        state.withLockedValue { $0.questions[id] }
    }

    // MARK: shared state

    /// Reads and changes the value of type `T` that plugins share in this node (created by `make`
    /// on first use), under the registry's lock: a module such as P2PStorage keeps its registrations
    /// here, and a plugin whose install fails leaves it as it was.
    public func withShared<T: Sendable, R>(_ type: T.Type, default make: () -> T, _ body: (inout T) throws -> R) rethrows -> R {
        try state.withLockedValue { s in
            var value = s.shared[ObjectIdentifier(type)] as? T ?? make()
            defer { s.shared[ObjectIdentifier(type)] = value }
            return try body(&value)
        }
    }

    /// The shared value of type `T`, if one was set.
    public func shared<T: Sendable>(_ type: T.Type) -> T? {
        state.withLockedValue { $0.shared[ObjectIdentifier(type)] as? T }
    }

    // MARK: services

    /// Offers a service to the other plugins by its protocol type, so that they use it without
    /// naming this plugin or its commands: `registry.provide((any RawMessageSender).self, Sender())`.
    /// A later call replaces it.
    public func provide<S: Sendable>(_ type: S.Type, _ service: S) {
        state.withLockedValue { $0.services[ObjectIdentifier(type)] = service }
    }

    /// The service of a type, if a plugin provides one.
    public func service<S>(_ type: S.Type) -> S? {
        state.withLockedValue { $0.services[ObjectIdentifier(type)] } as? S
    }

    // MARK: requirements

    /// Checks what every installed plugin requires (`Plugin.requirements`): a missing one with a
    /// default gets the default installed (returned, to be logged), one without fails.
    public func resolveRequirements() throws(PluginError) -> [(installed: String, for: String, need: String)] {
        var installed: [(installed: String, for: String, need: String)] = []
        var checked = 0
        while checked < plugins.count {
            let plugin = plugins[checked]
            checked += 1
            for need in plugin.requirements where !need.isMet(self) {
                guard let fallback = need.fallback else {
                    throw .missingRequirement(plugin: plugin.name, need: need.description)
                }
                if plugins.contains(where: { $0.name == fallback.name }) {
                    throw .missingRequirement(plugin: plugin.name, need: "\(need.description) (its default, '\(fallback.name)', is installed but does not provide it)")
                }
                do {
                    try install(fallback)
                } catch {
                    throw .missingRequirement(plugin: plugin.name, need: "\(need.description) (its default '\(fallback.name)' failed: \(error))")
                }
                guard need.isMet(self) else {
                    throw .missingRequirement(plugin: plugin.name, need: "\(need.description) (its default '\(fallback.name)' does not provide it)")
                }
                installed.append((fallback.name, plugin.name, need.description))
            }
        }
        return installed
    }

    // MARK: direct-message handlers

    /// Sets the handler for raw (bytes) direct messages; a later call replaces it.
    public func setRawReplyHandler(_ handler: any RawReplyHandler) {
        state.withLockedValue { $0.rawReplyHandler = handler }
    }

    public var rawReplyHandler: (any RawReplyHandler)? { state.withLockedValue { $0.rawReplyHandler } }

    /// Registers a handler for `Codable` direct messages of one type (by its `typeName`).
    public func register<H: ObjectReplyHandler>(objectHandler handler: H) throws {
        let boxed = ObjectHandlerBox(handler)
        try state.withLockedValue { s in
            guard s.objectHandlers[boxed.typeName] == nil else { throw PluginError.duplicateObjectHandler(boxed.typeName) }
            s.objectHandlers[boxed.typeName] = boxed
        }
    }

    /// The object handler for a type name.
    public func objectHandler(for typeName: String) -> (any AnyObjectReplyHandler)? {
        state.withLockedValue { $0.objectHandlers[typeName] }
    }

    // MARK: events

    /// Subscribes to node events (peer map changes, reachability).
    public func subscribe(_ subscriber: @escaping @Sendable (NodeEvent) -> Void) {
        state.withLockedValue { $0.subscribers.append(subscriber) }
    }

    func publish(_ event: NodeEvent) {
        let subscribers = state.withLockedValue { $0.subscribers }
        for s in subscribers { s(event) }
    }
}

/// What happens to a node that plugins may want to know.
public enum NodeEvent: Sendable, Equatable {
    case peerInserted(PeerAddress, verified: Bool)
    case peerRemoved(PeerAddress, reason: RemovalReason)
    /// The result of a discover: how the outside sees this node.
    case reachability(DiscoverResult)
    /// The NAT ladder found a new way to reach this node, or lost one (`NATTraversal`).
    case reachabilityChanged(ReachabilityReport)
    /// A relayed peer is now reached directly: by a reverse connection or a punched hole.
    case directPath(DirectPath)
}
