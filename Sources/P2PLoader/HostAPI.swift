import Logging
import NIOCore
import P2PEvaluation
import P2PKernel
import P2PPluginHost
import P2PStorage
import P2PPluginABI
#if canImport(Glibc)
import Glibc
#endif

/// A C callback and its user pointer, carried across threads (the ABI says callbacks may be
/// called from any thread).
struct Completion: @unchecked Sendable {
    let done: p2p_completion_fn
    let user: UnsafeMutableRawPointer?
    func callAsFunction(_ code: Int32, _ bytes: [UInt8]) {
        withSlice(bytes) { done(user, code, $0) }
    }
}

/// The function table handed to every loaded plugin. The functions are plain C functions; each
/// finds its plugin's `HostContext` through the table's `context` pointer.
enum HostAPI {
    static let logger = Logger(label: "swiftp2p.plugin")

    /// A table for one plugin; it and its context live as long as the process (plugins are never
    /// unloaded: `RTLD_NODELETE`).
    static func table(for context: HostContext) -> UnsafeMutablePointer<p2p_host_api> {
        let table = UnsafeMutablePointer<p2p_host_api>.allocate(capacity: 1)
        table.initialize(to: p2p_host_api(
            abi_version: ABI.version,
            context: Unmanaged.passRetained(context).toOpaque(),
            alloc: { len in malloc(max(1, len))?.assumingMemoryBound(to: UInt8.self) },
            log: { ctx, level, message, len in
                guard let c = HostContext.from(ctx), let message else { return }
                let text = String(decoding: UnsafeRawBufferPointer(start: message, count: len), as: UTF8.self)
                let l: Logger.Level = switch level {
                case Int32(P2P_LOG_DEBUG): .debug
                case Int32(P2P_LOG_WARNING): .warning
                case Int32(P2P_LOG_ERROR): .error
                default: .info
                }
                HostAPI.logger.log(level: l, "\(text)", metadata: ["plugin": "\(c.pluginName)"])
            },
            register_command: { ctx, name, fn, user in
                guard let c = HostContext.from(ctx), let registry = c.registry else { return ABI.failed }
                guard let name, let fn else { return ABI.badRequest }
                let n = String(cString: name)
                return HostAPI.registering(c) { try registry.register(command: LoadedCommand(name: n, fn: fn, user: user, bounded: c.bounded(n))) }
            },
            register_put_interceptor: { ctx, domain, fn, user in
                guard let c = HostContext.from(ctx), let registry = c.registry else { return ABI.failed }
                guard let fn else { return ABI.badRequest }
                let scope: InterceptorScope = domain.map { .domain($0.pointee.number) } ?? .all
                registry.add(interceptor: LoadedPutInterceptor(scope: scope, fn: fn, user: user, bounded: c.bounded("\(c.pluginName) put interceptor")))
                return ABI.ok
            },
            register_reply_handler: { ctx, fn, user in
                guard let c = HostContext.from(ctx), let registry = c.registry else { return ABI.failed }
                guard let fn else { return ABI.badRequest }
                registry.setRawReplyHandler(LoadedReplyHandler(fn: fn, user: user, bounded: c.bounded("\(c.pluginName) reply handler")))
                return ABI.ok
            },
            register_evaluation_scheme: { ctx, name, fn, user in
                guard let c = HostContext.from(ctx), let registry = c.registry else { return ABI.failed }
                guard let name, let fn else { return ABI.badRequest }
                return HostAPI.registering(c) { try registry.register(scheme: LoadedScheme(name: String(cString: name), fn: fn, user: user)) }
            },
            storage_get: { ctx, key, out in
                guard let c = HostContext.from(ctx), let node = c.node, let backend = node.registry.storageBackend else { return ABI.failed }
                guard let key, let out else { return ABI.badRequest }
                let k = key.pointee.number
                guard case .values(let v, _)? = try? backend.execute(.get(.keys([k])), now: node.clock.uptimeNanoseconds), let value = v[k] else {
                    return ABI.notFound
                }
                out.pointee = hostAllocated(value.value)
                return ABI.ok
            },
            storage_put: { ctx, key, value, ttl in
                guard let c = HostContext.from(ctx), let node = c.node, let backend = node.registry.storageBackend else { return ABI.failed }
                guard let key else { return ABI.badRequest }
                let entry = [key.pointee.number: StoredValue(value.array, ttlSeconds: ttl)]
                do {
                    _ = try backend.execute(.put(entry, mode: .overwrite), now: node.clock.uptimeNanoseconds)
                    return ABI.ok
                } catch {
                    return ABI.denied
                }
            },
            send_direct: { ctx, address, message, done, user in
                guard let done else { return }
                let completion = Completion(done: done, user: user)
                guard let c = HostContext.from(ctx), let node = c.node, let address,
                      let target = try? PeerSocketAddress(parsing: String(cString: address)) else {
                    return completion(ABI.badRequest, Array("no running node, or not HOST:PORT".utf8))
                }
                guard let sender = node.registry.service((any RawMessageSender).self) else {
                    return completion(ABI.notFound, Array("no plugin of this node sends direct messages (add the messaging plugin)".utf8))
                }
                sender.send(message.array, to: target, node: node).whenComplete { HostAPI.finish($0, completion) }
            },
            routed_send: { ctx, key, message, done, user in
                guard let done else { return }
                let completion = Completion(done: done, user: user)
                guard let c = HostContext.from(ctx), let node = c.node, let key else {
                    return completion(ABI.failed, Array("no running node".utf8))
                }
                guard let sender = node.registry.service((any RoutedMessageSender).self) else {
                    return completion(ABI.notFound, Array("no plugin of this node routes messages (add the DHT plugin)".utf8))
                }
                sender.send(message.array, toKey: key.pointee.number, node: node).whenComplete { HostAPI.finish($0, completion) }
            }
        ))
        return table
    }

    static func registering(_ c: HostContext, _ body: () throws -> Void) -> Int32 {
        do {
            try body()
            return ABI.ok
        } catch {
            c.registrationError = "\(error)"
            logger.error("plugin registration refused", metadata: ["plugin": "\(c.pluginName)", "error": "\(error)"])
            return ABI.denied
        }
    }

    static func finish(_ result: Result<[UInt8], any Error>, _ completion: Completion) {
        switch result {
        case .success(let reply):
            completion(ABI.ok, reply)
        case .failure(let error):
            completion(PluginResultCode.code(for: error), Array("\(error)".utf8))
        }
    }
}
