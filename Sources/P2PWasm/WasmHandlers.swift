import Foundation
import NIOCore
import P2PEvaluation
import P2PKernel
import P2PPluginHost
import P2PStorage
import WasmKit

/// A command of a WebAssembly plugin: the request's first byte section in, the plugin's output
/// out, on the plugin executor behind the command's limits. A request of the single byte 0xFF
/// asks for the command's signature instead (what `p2p call` reads): bytes in, bytes out.
struct WasmCommand: CommandHandler {
    let name: String
    let plugin: WasmPlugin
    let bounded: BoundedCallback

    static let describeRequest: [UInt8] = [0xFF]

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        let bytes = request.firstBytes ?? []
        if bytes == Self.describeRequest {
            let signature: [String: Any] = ["command": name, "symbol": "wasm", "params": ["bytes"], "returns": "bytes"]
            let json = (try? JSONSerialization.data(withJSONObject: signature, options: [.sortedKeys])).map { [UInt8]($0) } ?? []
            return .reply(Reply(payload: [.bytes(json)]))
        }
        let plugin = self.plugin, name = self.name, sender = context.sender.id.bytes
        let future = bounded.call(requestBytes: bytes.count, on: context.eventLoop, resultBytes: { $0.output?.count ?? 0 }) {
            try plugin.invoke({ $0.commands[name] }, callback: name, segments: [sender, bytes]) { a in
                [.i32(a[0] ?? 0), .i32(a[1] ?? 0), .i32(UInt32(bytes.count))]
            }
        }
        return .future(future.map { outcome in
            Reply(PluginResultCode.replyType(outcome.code), payload: [.bytes(outcome.output ?? [])])
        }.flatMapErrorThrowing { error in
            guard let e = error as? PluginCallError else { throw error }
            return e.reply
        })
    }
}

/// A WebAssembly plugin's raw reply handler.
struct WasmReplyHandler: RawReplyHandler {
    let plugin: WasmPlugin
    let bounded: BoundedCallback

    func reply(to bytes: [UInt8], from sender: PeerAddress) async throws -> [UInt8] {
        let plugin = self.plugin, callback = bounded.name, id = sender.id.bytes
        let outcome = try await bounded.call(requestBytes: bytes.count, resultBytes: { $0.output?.count ?? 0 }) {
            try plugin.invoke({ $0.replyHandler }, callback: callback, segments: [id, bytes]) { a in
                [.i32(a[0] ?? 0), .i32(a[1] ?? 0), .i32(UInt32(bytes.count))]
            }
        }
        guard outcome.code == WasmABI.ok else {
            throw RPCError.denied("plugin refused (code \(outcome.code)): \(String(decoding: outcome.output ?? [], as: UTF8.self))")
        }
        return outcome.output ?? []
    }
}

/// A WebAssembly plugin's put interceptor: for each value put into its domain the plugin sees the
/// key, the new value and the current one, and says what to store (its output), or keeps the
/// value (no output), or refuses the put (a non-zero code, its output the reason).
struct WasmInterceptor: StorageInterceptor {
    let scope: InterceptorScope
    let index: Int
    let plugin: WasmPlugin
    let bounded: BoundedCallback

    func intercept(_ request: StorageRequest, context: StorageContext, next: StorageNext) async throws -> StorageResult {
        guard case .put(let entries, let mode) = request else { return try await next(request) }
        let keys = entries.keys.filter { key in
            if case .domain(let d) = scope { return key.domain == d }
            return true
        }
        guard !keys.isEmpty else { return try await next(request) }
        guard case .values(let current, _) = try context.backend.execute(.get(.keys(keys)), now: context.now) else {
            return try await next(request)
        }
        var changed = entries
        let plugin = self.plugin, index = self.index, callback = bounded.name
        for key in keys.sorted() {
            guard let value = entries[key]?.value else { continue }
            let old = current[key]?.value
            let keyBytes = key.location.bytes + key.domain.bytes + key.content.bytes + key.version.bytes
            // On this (cooperative) thread, not the executor: the call's fuel bounds its time, and
            // a hop would cost more than a typical interceptor call.
            let outcome = try bounded.callInline(requestBytes: value.count + (old?.count ?? 0), resultBytes: { $0.output?.count ?? 0 }) {
                try plugin.invoke({ $0.interceptors.indices.contains(index) ? $0.interceptors[index].export : nil },
                                  callback: callback, segments: [keyBytes, value, old]) { a in
                    [.i32(a[0] ?? 0), .i32(a[1] ?? 0), .i32(UInt32(value.count)), .i32(a[2] ?? 0),
                     .i32(old.map { UInt32($0.count) } ?? UInt32.max)]
                }
            }
            guard outcome.code == WasmABI.ok else { throw StorageError.denied(String(decoding: outcome.output ?? [], as: UTF8.self)) }
            if let out = outcome.output { changed[key]?.value = out }
        }
        return try await next(.put(changed, mode: mode))
    }
}

/// A WebAssembly plugin's evaluation scheme (the answers encoded as for the C ABI). Evaluation is
/// synchronous, so it runs on the caller's thread — bounded by the fuel of one call; a failed
/// call evaluates to nothing.
struct WasmScheme: EvaluationScheme {
    let name: String
    let plugin: WasmPlugin
    /// Answers larger than this evaluate to nothing (they also have to fit the plugin's memory).
    static let maxInputBytes = 4 << 20

    func evaluate(_ answers: [PeerAnswer]) -> [Number640: [UInt8]] {
        let input = SchemeEncoding.encode(answers)
        guard input.count <= WasmScheme.maxInputBytes else { return [:] }
        let name = self.name, count = UInt32(input.count)
        guard let outcome = try? plugin.invoke({ $0.schemes[name] }, callback: "scheme \(name)", segments: [input], arguments: { a in
            [.i32(a[0] ?? 0), .i32(count)]
        }), outcome.code == WasmABI.ok else { return [:] }
        return (try? SchemeEncoding.decodeEntries(outcome.output ?? [])) ?? [:]
    }
}
