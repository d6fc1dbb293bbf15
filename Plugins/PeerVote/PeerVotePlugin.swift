import P2PKernel
import P2PStorage

/// TomP2P's storage-extension example as an interceptor: in the domain "vote", a put adds the
/// stored integer (decimal text) to the one already there instead of replacing it.
public struct PeerVotePlugin: Plugin {
    public let name = "peervote"
    public let version = "1.0.0"
    /// The domain whose puts are counted: SHA-1 of "vote".
    public static let domain = Number160(hashing: "vote")
    public init() {}

    public func install(into registry: PluginRegistry) throws {
        registry.add(interceptor: VoteCounter())
        try registry.register(command: CheckVote())
    }
}

/// `peervote.check`: a vote, normalised (the same small work in every PeerVote variant —
/// compiled in, `.so`, `.wasm` — to compare what a call costs each).
public struct CheckVote: CommandHandler {
    public let name = "peervote.check"
    public init() {}
    public func handle(_ request: Message, context: CommandContext) -> CommandResult {
        guard let vote = try? VoteCounter.integer(request.firstBytes ?? []) else { return .reply(.error(.badRequest, "a vote must be a decimal integer")) }
        return .reply(Reply(payload: [.bytes(Array(String(vote).utf8))]))
    }
}

/// Why a vote is refused.
public enum VoteError: Error, CustomStringConvertible {
    case notAnInteger(String)
    case overflow
    public var description: String {
        switch self {
        case .notAnInteger(let s): "a vote must be a decimal integer, got '\(s.prefix(40))'"
        case .overflow: "the vote count would overflow"
        }
    }
}

/// Sums votes: reads the current count, adds the new one, stores the sum. Interceptor chains run
/// one at a time per node, so concurrent votes are not lost.
public struct VoteCounter: StorageInterceptor {
    public let scope = InterceptorScope.domain(PeerVotePlugin.domain)
    public init() {}

    public func intercept(_ request: StorageRequest, context: StorageContext, next: StorageNext) async throws -> StorageResult {
        guard case .put(let entries, let mode) = request else { return try await next(request) }
        let current = try context.backend.execute(.get(.keys(Array(entries.keys))), now: context.now)
        guard case .values(let stored, _) = current else { return try await next(request) }
        var summed: [Number640: StoredValue] = [:]
        for (key, vote) in entries {
            let add = try Self.integer(vote.value)
            let before = try stored[key].map { try Self.integer($0.value) } ?? 0
            let (sum, overflow) = before.addingReportingOverflow(add)
            guard !overflow else { throw VoteError.overflow }
            var v = vote
            v.value = Array(String(sum).utf8)
            summed[key] = v
        }
        return try await next(.put(summed, mode: mode))
    }

    static func integer(_ bytes: [UInt8]) throws -> Int64 {
        let text = String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: " \n\t")
        guard let n = Int64(text) else { throw VoteError.notAnInteger(text) }
        return n
    }
}

extension String {
    func trimmingCharacters(in set: String) -> String {
        let chars = Set(set)
        var s = Substring(self)
        while let f = s.first, chars.contains(f) { s = s.dropFirst() }
        while let l = s.last, chars.contains(l) { s = s.dropLast() }
        return String(s)
    }
}
