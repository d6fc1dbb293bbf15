import NIOCore

/// Something a plugin needs from the other plugins of its node, stated instead of assumed: the
/// node checks every plugin's requirements once all are installed, installs the stated default
/// for one that is missing, and refuses to start, naming it, when there is no default.
///
/// ```swift
/// var requirements: [PluginRequirement] {
///     [.evaluationScheme("majority", default: EvaluationPlugin())]
/// }
/// ```
public struct PluginRequirement: Sendable, CustomStringConvertible {
    /// What is needed, in words ("an evaluation scheme named 'majority'").
    public let description: String
    /// Whether the registry has it.
    public let isMet: @Sendable (PluginRegistry) -> Bool
    /// A plugin that provides it, installed when nothing else does.
    public let fallback: (any Plugin)?

    public init(_ description: String, default fallback: (any Plugin)? = nil, isMet: @escaping @Sendable (PluginRegistry) -> Bool) {
        self.description = description
        self.fallback = fallback
        self.isMet = isMet
    }

    /// A service of type `S` (see `PluginRegistry.provide`).
    public static func service<S>(_ type: S.Type, _ description: String, default fallback: (any Plugin)? = nil) -> PluginRequirement {
        PluginRequirement(description, default: fallback) { $0.service(type) != nil }
    }
}

/// Sends raw bytes to the raw reply handler of the peer at an address and returns its answer.
/// The messaging plugin provides it; others (the `.so` host functions) use it without naming a
/// command.
public protocol RawMessageSender: Sendable {
    func send(_ bytes: [UInt8], to address: PeerSocketAddress, node: Node) -> EventLoopFuture<[UInt8]>
}

/// Sends raw bytes to the raw reply handler of the peer closest to a key (found by a lookup)
/// and returns its answer. The DHT provides it.
public protocol RoutedMessageSender: Sendable {
    func send(_ bytes: [UInt8], toKey key: Number160, node: Node) -> EventLoopFuture<[UInt8]>
}
