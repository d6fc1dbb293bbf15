import P2PKernel

/// What one peer answered to a get or a routed send (a send's reply sits under key `.zero`).
public struct PeerAnswer: Sendable, Hashable {
    public var peer: PeerAddress
    public var entries: [Number640: [UInt8]]
    public init(peer: PeerAddress, entries: [Number640: [UInt8]]) {
        self.peer = peer
        self.entries = entries
    }
}

/// Turns the answers of several peers into one (majority vote, union, latest version, first
/// answer …). Chosen per request by name.
public protocol EvaluationScheme: Sendable {
    var name: String { get }
    func evaluate(_ answers: [PeerAnswer]) -> [Number640: [UInt8]]
}

/// The schemes of one node, kept in the registry's shared state (so a plugin whose install fails
/// leaves them as they were).
struct EvaluationSchemes: Sendable {
    var byName: [String: any EvaluationScheme] = [:]
}

extension PluginRegistry {
    /// Registers an evaluation scheme under its name.
    public func register(scheme: any EvaluationScheme) throws {
        try withShared(EvaluationSchemes.self, default: { EvaluationSchemes() }) { s in
            guard s.byName[scheme.name] == nil else { throw PluginError.duplicateEvaluationScheme(scheme.name) }
            s.byName[scheme.name] = scheme
        }
    }

    /// The scheme registered under `name`.
    public func scheme(named name: String) -> (any EvaluationScheme)? {
        shared(EvaluationSchemes.self)?.byName[name]
    }

    /// Names of every registered scheme, sorted.
    public var schemeNames: [String] { shared(EvaluationSchemes.self)?.byName.keys.sorted() ?? [] }
}

extension PluginRequirement {
    /// An evaluation scheme registered under `name`.
    public static func evaluationScheme(_ name: String, default fallback: (any Plugin)? = nil) -> PluginRequirement {
        PluginRequirement("an evaluation scheme named '\(name)'", default: fallback) { $0.scheme(named: name) != nil }
    }
}
