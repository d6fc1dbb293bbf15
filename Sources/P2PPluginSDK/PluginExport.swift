#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The ABI's result codes as `Int32`, the type the C callbacks return.
let ok = Int32(P2P_OK)

/// Adapts a Swift `Plugin` to the C ABI. Its `entry` is all a plugin's exported function calls.
public enum PluginExport {
    nonisolated(unsafe) private static var plugin: (any Plugin)?
    /// The descriptor the host reads: allocated once and never freed (plugins are never unloaded),
    /// so the pointer handed out stays valid.
    nonisolated(unsafe) private static var descriptor: UnsafeMutablePointer<p2p_plugin_descriptor>?
    nonisolated(unsafe) private static var registered: [AnyObject] = []

    /// Returns the plugin's descriptor. Runs no plugin code: the host checks the ABI version in the
    /// descriptor before it calls `initialize`, where `register` runs.
    public static func entry(_ plugin: any Plugin, host: UnsafePointer<p2p_host_api>?, abi: UInt32) -> UnsafePointer<p2p_plugin_descriptor>? {
        if let descriptor { return UnsafePointer(descriptor) }
        Self.plugin = plugin
        let d = UnsafeMutablePointer<p2p_plugin_descriptor>.allocate(capacity: 1)
        d.initialize(to: p2p_plugin_descriptor(abi_version: UInt32(P2P_PLUGIN_ABI_VERSION), name: strdup(plugin.name),
                                               version: strdup(plugin.version), initialize: initialize, shutdown: nil))
        descriptor = d
        return UnsafePointer(d)
    }

    private static let initialize: @convention(c) (UnsafePointer<p2p_host_api>?, UnsafeMutablePointer<p2p_bytes>?) -> Int32 = { host, failure in
        guard let host, let plugin = PluginExport.plugin else { return Int32(P2P_ERR_FAILED) }
        Host.api = host
        var registrar = Registrar()
        return guarded(failure) {
            try plugin.register(into: &registrar)
            let api = host.pointee
            for c in registrar.commands {
                let box = Box(c)
                registered.append(box)
                let code = c.name.withCString { api.register_command?(api.context, $0, commandTrampoline, Unmanaged.passUnretained(box).toOpaque()) ?? -1 }
                guard code == ok else { throw PluginFailure(.failed, "command '\(c.name)' was refused") }
            }
            if let r = registrar.replyHandler {
                let box = Box(r)
                registered.append(box)
                guard api.register_reply_handler?(api.context, replyTrampoline, Unmanaged.passUnretained(box).toOpaque()) == ok else {
                    throw PluginFailure(.failed, "the reply handler was refused")
                }
            }
            for i in registrar.interceptors {
                let box = Box(i)
                registered.append(box)
                let code: Int32
                if let d = i.domain {
                    var k = d.c
                    code = api.register_put_interceptor?(api.context, &k, putTrampoline, Unmanaged.passUnretained(box).toOpaque()) ?? -1
                } else {
                    code = api.register_put_interceptor?(api.context, nil, putTrampoline, Unmanaged.passUnretained(box).toOpaque()) ?? -1
                }
                guard code == ok else { throw PluginFailure(.failed, "an interceptor was refused") }
            }
            for s in registrar.schemes {
                let box = Box(s)
                registered.append(box)
                let code = s.name.withCString { api.register_evaluation_scheme?(api.context, $0, evaluateTrampoline, Unmanaged.passUnretained(box).toOpaque()) ?? -1 }
                guard code == ok else { throw PluginFailure(.failed, "scheme '\(s.name)' was refused") }
            }
            return nil
        }
    }
}

/// Keeps a handler alive and reachable from C through an opaque pointer.
final class Box<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
    static func from(_ p: UnsafeMutableRawPointer?) -> T? {
        guard let p else { return nil }
        return Unmanaged<Box<T>>.fromOpaque(p).takeUnretainedValue().value
    }
}

/// Bytes handed to the host, allocated with the host's allocator.
func out(_ bytes: [UInt8]) -> p2p_bytes {
    guard !bytes.isEmpty, let api = Host.api, let alloc = api.pointee.alloc, let p = alloc(bytes.count) else {
        return p2p_bytes(data: nil, len: 0)
    }
    bytes.withUnsafeBufferPointer { src in if let b = src.baseAddress { p.update(from: b, count: bytes.count) } }
    return p2p_bytes(data: p, len: bytes.count)
}

func array(_ s: p2p_slice) -> [UInt8] {
    guard let d = s.data, s.len > 0 else { return [] }
    return Array(UnsafeBufferPointer(start: d, count: s.len))
}

/// Runs a callback body, turning thrown failures into result codes and messages.
func guarded(_ output: UnsafeMutablePointer<p2p_bytes>?, _ body: () throws -> [UInt8]?) -> Int32 {
    do {
        if let bytes = try body() { output?.pointee = out(bytes) }
        return Int32(P2P_OK)
    } catch let f as PluginFailure {
        output?.pointee = out(Array(f.message.utf8))
        return f.code.rawValue
    } catch {
        output?.pointee = out(Array("\(error)".utf8))
        return Int32(P2P_ERR_FAILED)
    }
}

let commandTrampoline: p2p_command_fn = { user, sender, request, output in
    guard let c = Box<any PluginCommand>.from(user) else { return Int32(P2P_ERR_FAILED) }
    let from = sender.map { Key160($0.pointee) } ?? Key160(bytes: [])
    return guarded(output) { try c.handle(array(request), from: from) }
}

let replyTrampoline: p2p_reply_fn = { user, sender, request, output in
    guard let r = Box<any PluginReplyHandler>.from(user) else { return Int32(P2P_ERR_FAILED) }
    let from = sender.map { Key160($0.pointee) } ?? Key160(bytes: [])
    return guarded(output) { try r.reply(to: array(request), from: from) }
}

let putTrampoline: p2p_put_interceptor_fn = { user, key, value, current, output in
    guard let i = Box<any PluginPutInterceptor>.from(user), let key else { return Int32(P2P_ERR_FAILED) }
    return guarded(output) { try i.onPut(key: Key640(key.pointee), value: array(value), current: current.data == nil ? nil : array(current)) }
}

let evaluateTrampoline: p2p_evaluate_fn = { user, answers, output in
    guard let s = Box<any PluginEvaluationScheme>.from(user) else { return Int32(P2P_ERR_FAILED) }
    return guarded(output) {
        let input = array(answers)
        var at = 0
        func u32() throws -> Int {
            guard at + 4 <= input.count else { throw PluginFailure(.badRequest, "truncated answers") }
            defer { at += 4 }
            return Int(input[at]) << 24 | Int(input[at + 1]) << 16 | Int(input[at + 2]) << 8 | Int(input[at + 3])
        }
        var parsed: [PeerAnswer] = []
        for _ in 0..<(try u32()) {
            guard at + 20 <= input.count else { throw PluginFailure(.badRequest, "truncated peer id") }
            let peer = Key160(bytes: Array(input[at..<at + 20]))
            at += 20
            var entries: [Key640: [UInt8]] = [:]
            for _ in 0..<(try u32()) {
                guard at + 80 <= input.count else { throw PluginFailure(.badRequest, "truncated key") }
                let key = Key640(bytes: input[at..<at + 80])
                at += 80
                let len = try u32()
                guard at + len <= input.count else { throw PluginFailure(.badRequest, "truncated value") }
                entries[key] = Array(input[at..<at + len])
                at += len
            }
            parsed.append(PeerAnswer(peer: peer, entries: entries))
        }
        let chosen = s.evaluate(parsed)
        var bytes: [UInt8] = []
        func put32(_ v: Int) { bytes += [UInt8(v >> 24 & 0xFF), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
        put32(chosen.count)
        for (k, v) in chosen {
            bytes += k.bytes
            put32(v.count)
            bytes += v
        }
        return bytes
    }
}
