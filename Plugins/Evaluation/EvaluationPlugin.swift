import P2PKernel

/// The built-in evaluation schemes: `majority` (the default), `union`, `latest`, `first`.
public struct EvaluationPlugin: Plugin {
    public let name = "evaluation"
    public let version = "1.0.0"
    public init() {}

    public func install(into registry: PluginRegistry) throws {
        try registry.register(scheme: MajorityVote())
        try registry.register(scheme: Union())
        try registry.register(scheme: LatestVersion())
        try registry.register(scheme: FirstAnswer())
    }
}

/// Keeps, per key, the value at least half of the responders agree on; a key with no such
/// value is left out, so a minority of peers answering with other data is outvoted.
public struct MajorityVote: EvaluationScheme {
    public let name = "majority"
    public init() {}

    public func evaluate(_ answers: [PeerAnswer]) -> [Number640: [UInt8]] {
        guard !answers.isEmpty else { return [:] }
        var votes: [Number640: [[UInt8]: Int]] = [:]
        for a in answers {
            for (k, v) in a.entries { votes[k, default: [:]][v, default: 0] += 1 }
        }
        var out: [Number640: [UInt8]] = [:]
        for (key, counts) in votes {
            // Most votes wins; among equal counts the smaller value, so the result is deterministic.
            guard let best = counts.max(by: { $0.value != $1.value ? $0.value < $1.value : $0.key.lexicographicallyPrecedes($1.key) == false }),
                  best.value * 2 >= answers.count else { continue }
            out[key] = best.key
        }
        return out
    }
}

/// Everything any responder returned (cumulative); where peers disagree on a key, the value
/// most of them returned.
public struct Union: EvaluationScheme {
    public let name = "union"
    public init() {}

    public func evaluate(_ answers: [PeerAnswer]) -> [Number640: [UInt8]] {
        var votes: [Number640: [[UInt8]: Int]] = [:]
        for a in answers {
            for (k, v) in a.entries { votes[k, default: [:]][v, default: 0] += 1 }
        }
        return votes.compactMapValues { counts in
            counts.max { $0.value != $1.value ? $0.value < $1.value : $0.key.lexicographicallyPrecedes($1.key) == false }?.key
        }
    }
}

/// Per location, domain and content, only the entry with the highest version key.
public struct LatestVersion: EvaluationScheme {
    public let name = "latest"
    public init() {}

    public func evaluate(_ answers: [PeerAnswer]) -> [Number640: [UInt8]] {
        let all = Union().evaluate(answers)
        var best: [Number640: Number640] = [:]  // item (version zeroed) → newest key
        for key in all.keys {
            let item = Number640(location: key.location, domain: key.domain, content: key.content)
            if let current = best[item], current.version >= key.version { continue }
            best[item] = key
        }
        var out: [Number640: [UInt8]] = [:]
        for key in best.values { out[key] = all[key] }
        return out
    }
}

/// The first responder's answer (fastest, least checked).
public struct FirstAnswer: EvaluationScheme {
    public let name = "first"
    public init() {}

    public func evaluate(_ answers: [PeerAnswer]) -> [Number640: [UInt8]] {
        answers.first { !$0.entries.isEmpty }?.entries ?? [:]
    }
}
