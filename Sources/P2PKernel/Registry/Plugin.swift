/// A unit of functionality a node is assembled from. Built-in plugins (DHT, messaging,
/// evaluation …) and third-party ones use exactly this protocol and the registry API.
///
/// ```swift
/// struct Hello: Plugin {
///     let name = "example.hello"
///     let version = "1.0.0"
///     func install(into registry: PluginRegistry) throws {
///         try registry.register(command: HelloCommand())
///     }
/// }
/// let node = try await Node.builder().plugin(Hello()).start()
/// ```
public protocol Plugin: Sendable {
    /// Unique among the plugins of one node.
    var name: String { get }
    /// Free-form, shown by tools.
    var version: String { get }
    /// Registers the plugin's extension points. Runs before the node binds its sockets, in the
    /// order the plugins were added; an error stops the node from starting.
    func install(into registry: PluginRegistry) throws
    /// Runs after the node is listening, in install order.
    func start(node: Node) async throws
    /// Runs when the node shuts down, in reverse install order, before it announces quit.
    func stop(node: Node) async
    /// What this plugin needs from the others (checked when all are installed).
    var requirements: [PluginRequirement] { get }
}

extension Plugin {
    public var requirements: [PluginRequirement] { [] }
    public func start(node: Node) async throws {}
    public func stop(node: Node) async {}
}

/// Why a plugin could not be installed.
public enum PluginError: Error, Equatable, CustomStringConvertible {
    case duplicatePlugin(String)
    case duplicateEvaluationScheme(String)
    case duplicateObjectHandler(String)
    case installFailed(plugin: String, reason: String)
    /// A plugin needs something no installed plugin provides, and has no default for it.
    case missingRequirement(plugin: String, need: String)

    public var description: String {
        switch self {
        case .duplicatePlugin(let n): "a plugin named '\(n)' is already installed"
        case .duplicateEvaluationScheme(let n): "an evaluation scheme named '\(n)' is already registered"
        case .duplicateObjectHandler(let n): "an object reply handler for '\(n)' is already registered"
        case .installFailed(let p, let r): "plugin '\(p)' failed to install: \(r)"
        case .missingRequirement(let p, let n): "plugin '\(p)' needs \(n), and no installed plugin provides it"
        }
    }
}
