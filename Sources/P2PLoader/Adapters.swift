import P2PEvaluation
import P2PKernel
import P2PPluginHost
import P2PStorage
import P2PPluginABI

/// A command registered by a loaded plugin: the first byte section in, one byte section out. The
/// C code runs on the plugin executor behind the command's limits, never on the event loop.
struct LoadedCommand: CommandHandler, @unchecked Sendable {
    let name: String
    let fn: p2p_command_fn
    let user: UnsafeMutableRawPointer?
    let bounded: BoundedCallback

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        let bytes = request.firstBytes ?? []
        let fn = self.fn, user = UncheckedPointer(user), sender = context.sender.id
        let future = bounded.call(requestBytes: bytes.count, on: context.eventLoop, resultBytes: { $0.1.count }) {
            call(fn, user: user.pointer, sender: sender, request: bytes)
        }
        return .future(future.map { code, out in Reply(PluginResultCode.replyType(code), payload: [.bytes(out)]) }
            .flatMapErrorThrowing { error in
                guard let e = error as? PluginCallError else { throw error }
                return e.reply
            })
    }
}

/// A plugin's opaque user pointer, carried to the executor's thread (the ABI says callbacks may
/// run on any thread).
struct UncheckedPointer: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer?
    init(_ pointer: UnsafeMutableRawPointer?) { self.pointer = pointer }
}

/// Calls a command-shaped C callback and takes its output.
func call(_ fn: p2p_command_fn, user: UnsafeMutableRawPointer?, sender: Number160, request: [UInt8]) -> (Int32, [UInt8]) {
    var key = p2p_key160(sender)
    var out = p2p_bytes(data: nil, len: 0)
    let code = withSlice(request) { slice in fn(user, &key, slice, &out) }
    return (code, take(&out))
}

/// A loaded plugin's raw reply handler (on the executor, behind its limits).
struct LoadedReplyHandler: RawReplyHandler, @unchecked Sendable {
    let fn: p2p_reply_fn
    let user: UnsafeMutableRawPointer?
    let bounded: BoundedCallback

    func reply(to bytes: [UInt8], from sender: PeerAddress) async throws -> [UInt8] {
        let fn = self.fn, user = UncheckedPointer(user)
        let (code, out) = try await bounded.call(requestBytes: bytes.count, resultBytes: { $0.1.count }) {
            call(fn, user: user.pointer, sender: sender.id, request: bytes)
        }
        guard code == ABI.ok else { throw LoadedPluginError.refused(code: code, message: String(decoding: out, as: UTF8.self)) }
        return out
    }
}

/// An error a loaded plugin's callback reported.
public enum LoadedPluginError: Error, CustomStringConvertible {
    case refused(code: Int32, message: String)
    case malformedOutput(String)
    public var description: String {
        switch self {
        case .refused(let c, let m): "plugin refused (code \(c))\(m.isEmpty ? "" : ": \(m)")"
        case .malformedOutput(let m): "plugin returned malformed output: \(m)"
        }
    }
}

/// A loaded plugin's put interceptor: for each value put into its domain, the plugin sees the
/// new value and the current one and says what to store.
struct LoadedPutInterceptor: StorageInterceptor, @unchecked Sendable {
    let scope: InterceptorScope
    let fn: p2p_put_interceptor_fn
    let user: UnsafeMutableRawPointer?
    let bounded: BoundedCallback

    func intercept(_ request: StorageRequest, context: StorageContext, next: StorageNext) async throws -> StorageResult {
        guard case .put(let entries, let mode) = request else { return try await next(request) }
        let covered: (Number640) -> Bool = { key in
            if case .domain(let d) = scope { return key.domain == d }
            return true
        }
        let keys = entries.keys.filter(covered)
        guard !keys.isEmpty else { return try await next(request) }
        guard case .values(let current, _) = try context.backend.execute(.get(.keys(keys)), now: context.now) else {
            return try await next(request)
        }
        var changed = entries
        let fn = self.fn, user = UncheckedPointer(user)
        for key in keys {
            guard let entry = entries[key] else { continue }
            let old = current[key]?.value
            let value = entry.value
            let (code, produced, bytes) = try await bounded.call(requestBytes: value.count + (old?.count ?? 0), resultBytes: { $0.2.count }) {
                var k = p2p_key640(key)
                var out = p2p_bytes(data: nil, len: 0)
                let code = withSlice(value) { value in
                    if let old {
                        return withSlice(old) { cur in fn(user.pointer, &k, value, cur, &out) }
                    }
                    return fn(user.pointer, &k, value, p2p_slice(data: nil, len: 0), &out)
                }
                let produced = out.data != nil
                return (code, produced, take(&out))
            }
            guard code == ABI.ok else { throw StorageError.denied(String(decoding: bytes, as: UTF8.self)) }
            if produced { changed[key]?.value = bytes }
        }
        return try await next(.put(changed, mode: mode))
    }
}

/// A loaded plugin's evaluation scheme (answers encoded as the header describes).
struct LoadedScheme: EvaluationScheme, @unchecked Sendable {
    let name: String
    let fn: p2p_evaluate_fn
    let user: UnsafeMutableRawPointer?

    func evaluate(_ answers: [PeerAnswer]) -> [Number640: [UInt8]] {
        let input = SchemeEncoding.encode(answers)
        var out = p2p_bytes(data: nil, len: 0)
        let code = withSlice(input) { fn(user, $0, &out) }
        let bytes = take(&out)
        guard code == ABI.ok else { return [:] }
        return (try? SchemeEncoding.decodeEntries(bytes)) ?? [:]
    }
}
