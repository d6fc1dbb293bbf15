#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import P2PKernel
import P2PPluginHost

/// A manifest-declared C function as a command: typed arguments in, the typed result out.
/// A request of the single byte 0xFF asks for the signature instead (what `p2p call` uses to
/// parse its arguments).
struct FFICommand: CommandHandler {
    let function: FFIFunction
    let bounded: BoundedCallback
    var name: String { function.declaration.command }

    static let describeRequest: [UInt8] = [0xFF]

    init(function: FFIFunction, limits: PluginCallLimits, executor: PluginExecutor) {
        self.function = function
        self.bounded = BoundedCallback(name: function.declaration.command, limits: limits, executor: executor)
    }

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        let bytes = request.firstBytes ?? []
        if bytes == Self.describeRequest {
            let signature = (try? JSONEncoder().encode(function.declaration)).map { Array($0) } ?? []
            return .reply(Reply(payload: [.bytes(signature)]))
        }
        // The arguments are checked on the event loop (cheap, and a malformed request never
        // reaches the executor); the C function runs on the executor behind the limits.
        let args: [FFIValue]
        do {
            try bounded.admit(requestBytes: bytes.count)
            args = try FFIValue.decode(bytes)
            try function.check(args)
        } catch let e as PluginCallError {
            return .reply(e.reply)
        } catch {
            return .reply(.error(.badRequest, "\(error)"))
        }
        let function = self.function
        let future = bounded.call(requestBytes: bytes.count, on: context.eventLoop, resultBytes: { $0.count }) {
            FFIValue.encode([try function.call(args)])
        }
        return .future(future.map { Reply(payload: [.bytes($0)]) }.flatMapErrorThrowing { error in
            if let e = error as? PluginCallError { return e.reply }
            return .error(.badRequest, "\(error)")
        })
    }
}

/// Reads and checks a manifest: every type must be known, every symbol present.
enum ManifestReader {
    /// The manifest path for a shared object: `libNAME.json` beside `libNAME.so`.
    static func path(for library: String) -> String {
        (library.hasSuffix(".so") ? String(library.dropLast(3)) : library) + ".json"
    }

    /// The raw shape, with types as text so that an unknown one gets a clear message.
    private struct Raw: Decodable {
        struct Function: Decodable {
            var command: String
            var symbol: String
            var params: [String]
            var returns: String
            var free_result: Bool?
        }
        struct Limits: Decodable {
            var max_request_bytes: Int?
            var max_result_bytes: Int?
            var max_in_flight: Int?
            var deadline_ms: Int?
        }
        var name: String
        var version: String?
        var functions: [Function]
        var limits: Limits?
    }

    static func read(_ path: String) throws(PluginLoadError) -> FFIManifest {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch { throw .badManifest(path: path, reason: "cannot read: \(error)") }
        let raw: Raw
        do { raw = try JSONDecoder().decode(Raw.self, from: data) } catch { throw .badManifest(path: path, reason: "not a manifest: \(error)") }
        guard !raw.name.isEmpty else { throw .badManifest(path: path, reason: "empty name") }
        var functions: [FFIDeclaration] = []
        let known = FFIType.allCases.filter { $0 != .void }.map(\.rawValue).joined(separator: ", ")
        for f in raw.functions {
            var params: [FFIType] = []
            for p in f.params {
                guard let t = FFIType(rawValue: p), t != .void else {
                    throw .badManifest(path: path, reason: "\(f.command): unknown parameter type '\(p)' (one of: \(known))")
                }
                params.append(t)
            }
            guard let r = FFIType(rawValue: f.returns) else {
                throw .badManifest(path: path, reason: "\(f.command): unknown return type '\(f.returns)' (one of: \(known), void)")
            }
            functions.append(FFIDeclaration(command: f.command, symbol: f.symbol, params: params, returns: r, freeResult: f.free_result))
        }
        var limits = PluginCallLimits.default
        if let l = raw.limits {
            func positive(_ v: Int?, _ key: String, max: Int) throws(PluginLoadError) -> Int? {
                guard let v else { return nil }
                guard v > 0, v <= max else { throw .badManifest(path: path, reason: "limits.\(key) must be 1 to \(max), got \(v)") }
                return v
            }
            limits.maxRequestBytes = try positive(l.max_request_bytes, "max_request_bytes", max: 16 << 20) ?? limits.maxRequestBytes
            limits.maxResultBytes = try positive(l.max_result_bytes, "max_result_bytes", max: 16 << 20) ?? limits.maxResultBytes
            limits.maxInFlight = try positive(l.max_in_flight, "max_in_flight", max: 1024) ?? limits.maxInFlight
            if let ms = try positive(l.deadline_ms, "deadline_ms", max: 600_000) { limits.deadline = .milliseconds(ms) }
        }
        return FFIManifest(name: raw.name, version: raw.version ?? "?", functions: functions, limits: limits)
    }
}
