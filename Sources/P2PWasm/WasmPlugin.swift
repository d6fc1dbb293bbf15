import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import P2PEvaluation
import P2PKernel
import P2PPluginHost
import P2PStorage
import Synchronization
import WasmKit

/// A WebAssembly plugin: a `.wasm` file run in WasmKit, each node with its own instance, every
/// call with a fuel budget and the instance with a memory limit. A plugin that loops forever,
/// traps or grows past its memory stops with a typed error (`PluginCallError`) for its caller; the
/// node goes on. The file can be replaced while the node runs (`reload()`, a signal, or the file
/// changing): calls in flight finish on the old version, the next ones run the new.
///
/// ```swift
/// let plugin = try WasmPlugin.load("vote.wasm")
/// let node = try await Node.builder().plugin(DHTPlugin()).plugin(plugin).start()
/// ```
public final class WasmPlugin: Plugin, @unchecked Sendable {
    public let name: String
    public let version: String
    public let path: String
    public let limits: WasmLimits

    /// One loaded version: its instance and what it registered.
    final class Generation: Sendable {
        let file: WasmModuleFile
        let registrations: WasmRegistrations
        let number: Int
        let instance: NIOLockedValueBox<WasmInstance>
        let stamp: FileStamp?
        init(file: WasmModuleFile, registrations: WasmRegistrations, number: Int, instance: WasmInstance, stamp: FileStamp?) {
            self.file = file
            self.registrations = registrations
            self.number = number
            self.instance = NIOLockedValueBox(instance)
            self.stamp = stamp
        }
    }

    private let current: NIOLockedValueBox<Generation?>
    /// What the first version registered: the shape the node was assembled with.
    let installed: WasmRegistrations
    private let node = NIOLockedValueBox<Node?>(nil)
    private let claimed = NIOLockedValueBox(false)
    private let watcher = NIOLockedValueBox<RepeatedTask?>(nil)
    private let sendsInFlight = Atomic<Int>(0)
    private let running = Atomic<Int>(0)

    /// Handler calls running now (on any version).
    public var callsInFlight: Int { running.load(ordering: .relaxed) }
    private let stats = NIOLockedValueBox(Stats())
    private let reloadObserver = NIOLockedValueBox<(@Sendable (Result<ReloadReport, WasmPluginError>) -> Void)?>(nil)

    /// Called after every reload, by whatever started it (a call, a signal, the file changing).
    public func onReload(_ observer: @escaping @Sendable (Result<ReloadReport, WasmPluginError>) -> Void) {
        reloadObserver.withLockedValue { $0 = observer }
    }

    struct Stats {
        var calls = 0
        var failures = 0
        var fuel: UInt64 = 0
        var reloads = 0
        var lastReload: String = "never"
        var lastError: String = "none"
    }

    static let logger = Logger(label: "swiftp2p.wasm")

    private init(path: String, limits: WasmLimits, generation: Generation) {
        self.path = path
        self.limits = limits
        self.installed = generation.registrations
        self.name = generation.registrations.name ?? Self.defaultName(path)
        self.version = generation.registrations.version ?? "?"
        self.current = NIOLockedValueBox(generation)
    }

    /// Reads, checks and initialises a `.wasm` plugin (its first instance learns what it registers).
    public static func load(_ path: String, limits: WasmLimits = WasmLimits()) throws(WasmPluginError) -> WasmPlugin {
        let generation = try makeGeneration(path: path, limits: limits, number: 1)
        return WasmPlugin(path: path, limits: limits, generation: generation)
    }

    static func defaultName(_ path: String) -> String {
        let file = path.split(separator: "/").last.map(String.init) ?? path
        return file.hasSuffix(".wasm") ? String(file.dropLast(5)) : file
    }

    private static func makeGeneration(path: String, limits: WasmLimits, number: Int) throws(WasmPluginError) -> Generation {
        let stamp = FileStamp(path)
        let file = try WasmModuleFile.read(path, memoryLimit: limits.memoryBytes)
        let label = defaultName(path)
        let instance = try WasmInstance(file: file, limits: limits, label: label)
        let registrations = try instance.initialize()
        return Generation(file: file, registrations: registrations, number: number, instance: instance, stamp: stamp)
    }

    // MARK: Plugin

    public func install(into registry: PluginRegistry) throws {
        // One instance per node: a second node loads the file again.
        guard claimed.withLockedValue({ c in defer { c = true }; return !c }) else {
            throw PluginError.installFailed(plugin: name, reason: "this WasmPlugin is installed in another registry already; load the file once per node")
        }
        let callLimits = limits.calls
        for (command, _) in installed.commands.sorted(by: { $0.key < $1.key }) {
            try registry.register(command: WasmCommand(name: command, plugin: self, bounded: BoundedCallback(name: command, limits: callLimits)))
        }
        for (index, interceptor) in installed.interceptors.enumerated() {
            let scope: InterceptorScope = interceptor.domain.map { .domain($0) } ?? .all
            registry.add(interceptor: WasmInterceptor(scope: scope, index: index, plugin: self,
                                                      bounded: BoundedCallback(name: "\(name) put interceptor", limits: callLimits)))
        }
        if installed.replyHandler != nil {
            registry.setRawReplyHandler(WasmReplyHandler(plugin: self, bounded: BoundedCallback(name: "\(name) reply handler", limits: callLimits)))
        }
        for scheme in installed.schemes.keys.sorted() {
            try registry.register(scheme: WasmScheme(name: scheme, plugin: self))
        }
        registry.addStatus("wasm \(name)") { [weak self] in self?.statusRows() ?? [] }
    }

    public func start(node: Node) async throws {
        self.node.withLockedValue { $0 = node }
        current.withLockedValue { $0 }?.instance.withLockedValue { $0 }.node.withLockedValue { $0 = node }
        if let every = limits.watchInterval {
            let ms = Int64(every.components.seconds * 1000 + every.components.attoseconds / 1_000_000_000_000_000)
            let task = node.eventLoop.scheduleRepeatedTask(initialDelay: .milliseconds(ms), delay: .milliseconds(ms)) { [weak self] _ in
                self?.checkFile()
            }
            watcher.withLockedValue { $0 = task }
        }
    }

    public func stop(node: Node) async {
        watcher.withLockedValue { $0?.cancel(); $0 = nil }
        current.withLockedValue { $0 = nil }
        self.node.withLockedValue { $0 = nil }
    }

    // MARK: reload

    /// Loads the file again and, if it checks and initialises, makes it the version new calls
    /// run; calls in flight finish on the old one. A version that fails leaves the old in place
    /// (the error is thrown). Registrations the node was not assembled with are ignored (and
    /// logged): commands and interceptors are fixed when the node starts.
    @discardableResult
    public func reload() throws(WasmPluginError) -> ReloadReport {
        let started = ContinuousClock.now
        guard let old = current.withLockedValue({ $0 }) else { throw .instantiation(path: path, reason: "the plugin is stopped") }
        let next: Generation
        do {
            next = try Self.makeGeneration(path: path, limits: limits, number: old.number + 1)
        } catch {
            stats.withLockedValue { $0.lastReload = "failed: \(error)" }
            Self.logger.error("reload failed, the old version stays", metadata: ["plugin": "\(name)", "error": "\(error)"])
            reloadObserver.withLockedValue { $0 }?(.failure(error))
            throw error
        }
        next.instance.withLockedValue { $0 }.node.withLockedValue { $0 = node.withLockedValue { $0 } }
        let ignored = ignoredRegistrations(next.registrations)
        current.withLockedValue { $0 = next }
        let took = ContinuousClock.now - started
        stats.withLockedValue {
            $0.reloads += 1
            $0.lastReload = "version \(next.number) (\(next.registrations.version ?? "?")) in \(took)"
        }
        Self.logger.info("reloaded", metadata: ["plugin": "\(name)", "generation": "\(next.number)", "took": "\(took)",
                                                "ignored": "\(ignored.isEmpty ? "none" : ignored.joined(separator: ", "))"])
        let report = ReloadReport(generation: next.number, took: took, ignored: ignored)
        reloadObserver.withLockedValue { $0 }?(.success(report))
        return report
    }

    /// What a reload did.
    public struct ReloadReport: Sendable {
        public let generation: Int
        public let took: Duration
        /// Registrations of the new version the running node cannot take (until a restart).
        public let ignored: [String]
    }

    /// The version calls run now (1 at load, one more for each reload).
    public var generation: Int { current.withLockedValue { $0?.number ?? 0 } }

    private func ignoredRegistrations(_ r: WasmRegistrations) -> [String] {
        var out: [String] = []
        for c in r.commands.keys.sorted() where installed.commands[c] == nil { out.append("command \(c)") }
        for s in r.schemes.keys.sorted() where installed.schemes[s] == nil { out.append("scheme \(s)") }
        if r.interceptors.count > installed.interceptors.count { out.append("\(r.interceptors.count - installed.interceptors.count) interceptor(s)") }
        if r.replyHandler != nil, installed.replyHandler == nil { out.append("reply handler") }
        return out
    }

    /// Reloads when the file's size or modification time changed (it must stay unchanged for one
    /// check first, so a file being written is not read half-way).
    private let pendingStamp = NIOLockedValueBox<FileStamp?>(nil)
    /// The version of the file whose reload failed: not tried again until the file changes.
    private let failedStamp = NIOLockedValueBox<FileStamp?>(nil)
    private func checkFile() {
        guard let generation = current.withLockedValue({ $0 }), let stamp = FileStamp(path), stamp != generation.stamp,
              stamp != failedStamp.withLockedValue({ $0 }) else {
            pendingStamp.withLockedValue { $0 = nil }
            return
        }
        let settled = pendingStamp.withLockedValue { pending -> Bool in
            defer { pending = stamp }
            return pending == stamp
        }
        guard settled else { return }
        pendingStamp.withLockedValue { $0 = nil }
        let executor = PluginExecutor.shared
        guard let loop = node.withLockedValue({ $0 })?.eventLoop else { return }
        _ = executor.run("\(name) reload", on: loop, deadline: .seconds(30)) { [weak self] in
            guard let self else { return }
            do {
                try self.reload()
            } catch {
                self.failedStamp.withLockedValue { $0 = stamp }
            }
        }
    }

    // MARK: calls

    /// Runs one handler call on the current version: a failed instance (trap, fuel, memory) is
    /// replaced by a fresh one of the same version for the next call.
    func invoke(_ export: (WasmRegistrations) -> String?, callback: String, segments: [[UInt8]?],
                arguments: @escaping ([UInt32?]) -> [Value]) throws(PluginCallError) -> WasmInstance.Outcome {
        guard let generation = current.withLockedValue({ $0 }) else { throw .unavailable(callback: callback) }
        guard let name = export(generation.registrations) else {
            throw .trapped(callback: callback, reason: "version \(generation.number) of the plugin no longer registers it")
        }
        var instance = try freshInstance(generation, callback: callback)
        running.add(1, ordering: .relaxed)
        defer { running.subtract(1, ordering: .relaxed) }
        do {
            let outcome: WasmInstance.Outcome
            do {
                outcome = try instance.call(name, callback: callback, segments: segments, arguments: arguments)
            } catch .unavailable(_) where instance.poisoned {
                // Another call broke the instance while this one waited for it: once more, fresh.
                instance = try freshInstance(generation, callback: callback)
                outcome = try instance.call(name, callback: callback, segments: segments, arguments: arguments)
            }
            stats.withLockedValue {
                $0.calls += 1
                $0.fuel &+= outcome.fuel
            }
            if !outcome.sends.isEmpty { carryOut(outcome.sends, from: instance) }
            return outcome
        } catch {
            stats.withLockedValue {
                $0.calls += 1
                $0.failures += 1
                $0.lastError = "\(error)"
            }
            Self.logger.warning("plugin call failed", metadata: ["plugin": "\(self.name)", "error": "\(error)"])
            throw error
        }
    }

    private func freshInstance(_ generation: Generation, callback: String) throws(PluginCallError) -> WasmInstance {
        let instance = generation.instance.withLockedValue { $0 }
        guard instance.poisoned else { return instance }
        do {
            let fresh = try WasmInstance(file: generation.file, limits: limits, label: instance.label)
            _ = try fresh.initialize()
            fresh.node.withLockedValue { $0 = node.withLockedValue { $0 } }
            generation.instance.withLockedValue { if $0 === instance { $0 = fresh } }
            return generation.instance.withLockedValue { $0 }
        } catch {
            throw .unavailable(callback: "\(callback) (a fresh instance failed: \(error))")
        }
    }

    /// Sends what a call asked for; replies go back to the plugin's `p2p_on_reply`.
    private func carryOut(_ sends: [PendingSend], from instance: WasmInstance) {
        guard let node = node.withLockedValue({ $0 }) else { return }
        for send in sends {
            guard sendsInFlight.add(1, ordering: .relaxed).newValue <= limits.sendsInFlight else {
                sendsInFlight.subtract(1, ordering: .relaxed)
                deliver(send.token, WasmABI.denied, Array("too many sends in flight".utf8), to: instance, node: node)
                continue
            }
            let future: EventLoopFuture<[UInt8]>
            switch send.target {
            case .address(let text):
                guard let address = try? PeerSocketAddress(parsing: text) else {
                    sendsInFlight.subtract(1, ordering: .relaxed)
                    deliver(send.token, WasmABI.badRequest, Array("not HOST:PORT".utf8), to: instance, node: node)
                    continue
                }
                guard let sender = node.registry.service((any RawMessageSender).self) else {
                    sendsInFlight.subtract(1, ordering: .relaxed)
                    deliver(send.token, WasmABI.notFound, Array("no plugin of this node sends direct messages".utf8), to: instance, node: node)
                    continue
                }
                future = sender.send(send.bytes, to: address, node: node)
            case .key(let key):
                guard let sender = node.registry.service((any RoutedMessageSender).self) else {
                    sendsInFlight.subtract(1, ordering: .relaxed)
                    deliver(send.token, WasmABI.notFound, Array("no plugin of this node routes messages".utf8), to: instance, node: node)
                    continue
                }
                future = sender.send(send.bytes, toKey: key, node: node)
            }
            future.whenComplete { [weak self] result in
                guard let self else { return }
                self.sendsInFlight.subtract(1, ordering: .relaxed)
                switch result {
                case .success(let bytes): self.deliver(send.token, WasmABI.ok, bytes, to: instance, node: node)
                case .failure(let error):
                    self.deliver(send.token, PluginResultCode.code(for: error), Array("\(error)".utf8), to: instance, node: node)
                }
            }
        }
    }

    private func deliver(_ token: UInt32, _ code: Int32, _ bytes: [UInt8], to instance: WasmInstance, node: Node) {
        let limit = limits.calls.maxRequestBytes
        let bytes = Array(bytes.prefix(limit))
        _ = PluginExecutor.shared.run("\(name) p2p_on_reply", on: node.eventLoop, deadline: limits.calls.deadline) {
            _ = try? instance.deliver(token: token, code: code, bytes: bytes)
        }
    }

    // MARK: status

    func statusRows() -> [(String, String)] {
        let s = stats.withLockedValue { $0 }
        let g = current.withLockedValue { $0 }
        let memory = g.map { $0.instance.withLockedValue { $0 }.memoryBytes } ?? 0
        return [
            ("file", path),
            ("version", "\(version), generation \(g?.number ?? 0)"),
            ("calls", "\(s.calls) (\(s.failures) failed)"),
            ("fuel per call", s.calls > 0 ? "\(s.fuel / UInt64(s.calls)) on average, \(limits.fuelPerCall) allowed" : "\(limits.fuelPerCall) allowed"),
            ("memory", "\(memory) bytes of \(limits.memoryBytes)"),
            ("last reload", s.lastReload),
            ("last error", s.lastError),
        ]
    }

    /// Calls so far, failed calls, fuel used in all, reloads.
    public var counters: (calls: Int, failures: Int, fuel: UInt64, reloads: Int) {
        stats.withLockedValue { ($0.calls, $0.failures, $0.fuel, $0.reloads) }
    }

    /// Bytes of linear memory the current instance has.
    public var memoryBytes: Int { current.withLockedValue { $0 }.map { $0.instance.withLockedValue { $0 }.memoryBytes } ?? 0 }
}

/// A file's size and modification time, to notice a new version.
struct FileStamp: Equatable, Sendable {
    let size: UInt64
    let modified: Double
    init?(_ path: String) {
        guard let a = try? FileManager.default.attributesOfItem(atPath: path),
              let size = (a[.size] as? NSNumber)?.uint64Value, let date = a[.modificationDate] as? Date else { return nil }
        self.size = size
        self.modified = date.timeIntervalSince1970
    }
}
