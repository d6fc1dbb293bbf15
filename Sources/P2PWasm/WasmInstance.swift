import Logging
import NIOConcurrencyHelpers
import P2PKernel
import P2PPluginHost
import P2PStorage
import Synchronization
@_spi(Fuzzing) import WasmKit

/// Thrown by the memory limiter inside a call: the call stops with `memoryLimit`.
struct MemoryLimitExceeded: Error {
    let desired: Int
}

/// A host function found the plugin's pointers or lengths pointing outside its memory, or called
/// an import where it may not: the call stops as a trap.
struct GuestFault: Error, CustomStringConvertible {
    let description: String
}

/// A host import's work (copying bytes, a log line, a storage access) was charged to the call's
/// fuel, and the fuel ran out.
struct HostFuelExhausted: Error {}

/// Refuses growth past the instance's memory limit (and tables past a fixed size), by throwing:
/// the call that asked stops at once, rather than the plugin seeing a failed grow and carrying on.
final class Limiter: ResourceLimiter, Sendable {
    let maxBytes: Int
    init(maxBytes: Int) { self.maxBytes = maxBytes }
    func limitMemoryGrowth(to desired: Int) throws -> Bool {
        guard desired <= maxBytes else { throw MemoryLimitExceeded(desired: desired) }
        return true
    }
    func limitTableGrowth(to desired: Int) throws -> Bool { desired <= 100_000 }
}

/// What a plugin registered in `p2p_init`, by kind and name, with the export that handles it.
struct WasmRegistrations: Equatable, Sendable {
    var commands: [String: String] = [:]
    /// Domain (nil: all) → export.
    var interceptors: [(domain: Number160?, export: String)] = []
    var replyHandler: String?
    var schemes: [String: String] = [:]
    var name: String?
    var version: String?

    static func == (a: Self, b: Self) -> Bool {
        a.commands == b.commands && a.replyHandler == b.replyHandler && a.schemes == b.schemes
            && a.interceptors.map(\.domain) == b.interceptors.map(\.domain) && a.interceptors.map(\.export) == b.interceptors.map(\.export)
    }
}

/// A send a plugin asked for during a call; carried out once the call returns.
struct PendingSend: Sendable {
    enum Target: Sendable {
        case address(String)
        case key(Number160)
    }
    let target: Target
    let bytes: [UInt8]
    let token: UInt32
}

/// One instance of a plugin module: its own store, memory and fuel. Calls are serialised (a
/// WebAssembly store belongs to one thread at a time); each gets the fuel of `limits`.
final class WasmInstance: @unchecked Sendable {
    let file: WasmModuleFile
    let limits: WasmLimits
    let label: String
    private let store: Store
    private var instance: Instance!
    private var memory: Memory!
    private var alloc: Function!
    private var free: Function?
    private var onReply: Function?
    private var handlers: [String: Function] = [:]
    private let lock = NIOLock()

    // The state of the call under way (under `lock`).
    private var output: [UInt8]?
    private var outputOverflow = false
    private var registering: WasmRegistrations?
    private var registrationError: String?
    private var sends: [PendingSend] = []
    private var inCall = false
    private var logLines = 0
    private var storageOperations = 0

    /// Per call: log lines kept (more are dropped), storage reads and writes allowed.
    static let logLinesPerCall = 16
    static let storageOperationsPerCall = 64

    /// The node whose storage the plugin reads and writes (set once the node runs).
    let node = NIOLockedValueBox<Node?>(nil)
    /// Set after a trap, fuel or memory failure: the plugin's memory may be half-updated, so the
    /// next call gets a fresh instance.
    var poisoned: Bool { poisonFlag.load(ordering: .acquiring) }
    private let poisonFlag = Atomic<Bool>(false)

    static let logger = Logger(label: "swiftp2p.wasm")

    /// One engine for every instance: fuel metering on, software bounds checks (no signal
    /// handlers in the node's process).
    static let engine = Engine(configuration: EngineConfiguration(memoryBoundsChecking: .software, fuelMetering: true))

    /// Instantiates the module and runs `p2p_init`, collecting what it registers.
    init(file: WasmModuleFile, limits: WasmLimits, label: String) throws(WasmPluginError) {
        self.file = file
        self.limits = limits
        self.label = label
        store = Store(engine: Self.engine)
        store.resourceLimiter = Limiter(maxBytes: limits.memoryBytes)
        store.fuel = Fuel(remaining: limits.fuelForInit)
        do {
            instance = try file.module.instantiate(store: store, imports: makeImports())
        } catch let e as MemoryLimitExceeded {
            throw .memoryTooLarge(path: file.path, bytes: UInt64(e.desired), limit: limits.memoryBytes)
        } catch {
            throw .instantiation(path: file.path, reason: Self.reason(error))
        }
        guard let memory = instance.exports[memory: "memory"] else {
            throw .missingExport(path: file.path, name: "memory", type: "(a memory)")
        }
        guard memory.byteCount <= limits.memoryBytes else {
            throw .memoryTooLarge(path: file.path, bytes: UInt64(memory.byteCount), limit: limits.memoryBytes)
        }
        self.memory = memory
        for (name, type) in WasmABI.requiredExports {
            guard let f = instance.exports[function: name], f.type == type else {
                throw .missingExport(path: file.path, name: name, type: Self.describe(type))
            }
        }
        alloc = instance.exports[function: "p2p_alloc"]
        free = instance.exports[function: WasmABI.free.0].flatMap { $0.type == WasmABI.free.1 ? $0 : nil }
        onReply = instance.exports[function: WasmABI.onReply.0].flatMap { $0.type == WasmABI.onReply.1 ? $0 : nil }
    }

    /// Runs the ABI check and `p2p_init`; returns the registrations.
    func initialize() throws(WasmPluginError) -> WasmRegistrations {
        lock.lock()
        defer {
            lastMemoryBytes.store(memory.byteCount, ordering: .relaxed)
            lock.unlock()
        }
        do {
            store.fuel = Fuel(remaining: limits.fuelForInit)
            let version: Int32
            do {
                version = Int32(bitPattern: try instance.exports[function: "p2p_abi_version"]?.invoke([]).first?.i32 ?? 0)
            } catch {
                throw .initFailed(plugin: label, code: WasmABI.failed, message: "p2p_abi_version: \(Self.reason(error))")
            }
            guard version == WasmABI.version else { throw .abiMismatch(path: file.path, plugin: version, host: WasmABI.version) }
            registering = WasmRegistrations()
            registrationError = nil
            output = nil
            defer { registering = nil }
            let code: Int32
            do {
                code = Int32(bitPattern: try instance.exports[function: "p2p_init"]?.invoke([]).first?.i32 ?? UInt32(WasmABI.failed))
            } catch {
                throw .initFailed(plugin: label, code: WasmABI.failed, message: Self.reason(error))
            }
            let message = String(decoding: output ?? [], as: UTF8.self)
            guard code == WasmABI.ok else {
                let parts = [message, registrationError ?? ""].filter { !$0.isEmpty }
                throw .initFailed(plugin: label, code: code, message: parts.isEmpty ? "no reason given" : parts.joined(separator: ": "))
            }
            if let e = registrationError { throw .badRegistration(plugin: label, reason: e) }
            return registering ?? WasmRegistrations()
        }
    }

    /// Bytes of linear memory the instance had after its last call (read without waiting for a
    /// call under way).
    var memoryBytes: Int { lastMemoryBytes.load(ordering: .relaxed) }
    private let lastMemoryBytes = Atomic<Int>(0)

    // MARK: calls

    /// The outcome of one call.
    struct Outcome: Sendable {
        let code: Int32
        /// What the plugin handed over with `p2p.output` (nil: nothing).
        let output: [UInt8]?
        let fuel: UInt64
        let sends: [PendingSend]
    }

    /// Calls `export` with `segments` copied into the plugin's memory; `arguments` turns their
    /// addresses into the call's arguments. Every failure is a `PluginCallError`.
    func call(_ export: String, callback: String, segments: [[UInt8]?],
              arguments: ([UInt32?]) -> [Value]) throws(PluginCallError) -> Outcome {
        lock.lock()
        defer {
            lastMemoryBytes.store(memory.byteCount, ordering: .relaxed)
            lock.unlock()
        }
        do {
            guard !poisoned else { throw .unavailable(callback: callback) }
            guard let function = handler(export) else { throw .trapped(callback: callback, reason: "the plugin no longer exports \(export)") }
            output = nil
            outputOverflow = false
            sends = []
            logLines = 0
            storageOperations = 0
            inCall = true
            defer { inCall = false }
            let budget = limits.fuelPerCall
            store.fuel = Fuel(remaining: budget)
            do {
                let total = segments.reduce(0) { $0 + ($1?.count ?? 0) }
                var block: UInt32 = 0
                var addresses: [UInt32?] = []
                if total > 0 {
                    block = try alloc.invoke([.i32(UInt32(total))]).first?.i32 ?? 0
                    guard block != 0, Int(block) + total <= memory.byteCount else {
                        throw GuestFault(description: "p2p_alloc(\(total)) returned no room")
                    }
                }
                var at = Int(block)
                for s in segments {
                    guard let s else { addresses.append(nil); continue }
                    addresses.append(UInt32(at))
                    if !s.isEmpty {
                        memory.withUnsafeMutableBufferPointer(offset: UInt(at), count: s.count) { $0.copyBytes(from: s) }
                    }
                    at += s.count
                }
                let result = try function.invoke(arguments(addresses))
                if total > 0, let free { _ = try free.invoke([.i32(block)]) }
                guard !outputOverflow else { throw PluginCallError.resultTooLarge(callback: callback, limit: limits.calls.maxResultBytes) }
                let code = Int32(bitPattern: result.first?.i32 ?? UInt32(WasmABI.failed))
                let used = budget - (store.fuel?.remaining ?? budget)
                return Outcome(code: code, output: output, fuel: used, sends: sends)
            } catch let e as PluginCallError {
                throw e
            } catch {
                poisonFlag.store(true, ordering: .releasing)
                throw classify(error, callback: callback, budget: budget)
            }
        }
    }

    /// Hands a reply to a send back to the plugin (`p2p_on_reply`), if it takes replies.
    func deliver(token: UInt32, code: Int32, bytes: [UInt8]) throws(PluginCallError) -> Outcome? {
        guard onReply != nil else { return nil }
        return try call(WasmABI.onReply.0, callback: "\(label) p2p_on_reply", segments: [bytes]) { a in
            [.i32(token), .i32(UInt32(bitPattern: code)), .i32(a[0] ?? 0), .i32(UInt32(bytes.count))]
        }
    }

    private func handler(_ name: String) -> Function? {
        if let f = handlers[name] { return f }
        guard let f = instance.exports[function: name] else { return nil }
        handlers[name] = f
        return f
    }

    private func classify(_ error: any Error, callback: String, budget: UInt64) -> PluginCallError {
        if error is MemoryLimitExceeded { return .memoryLimit(callback: callback, limit: limits.memoryBytes) }
        if error is HostFuelExhausted { return .outOfFuel(callback: callback, fuel: budget) }
        if let fault = error as? GuestFault { return .trapped(callback: callback, reason: fault.description) }
        let reason = Self.reason(error)
        if reason.contains("out of fuel") { return .outOfFuel(callback: callback, fuel: budget) }
        return .trapped(callback: callback, reason: reason)
    }

    /// The first line of an error, without WasmKit's "Trap: " prefix.
    static func reason(_ error: any Error) -> String {
        let text = "\(error)".split(separator: "\n").first.map(String.init) ?? "\(error)"
        return text.hasPrefix("Trap: ") ? String(text.dropFirst(6)) : text
    }

    static func describe(_ t: FunctionType) -> String {
        "(\(t.parameters.map { "\($0)" }.joined(separator: ", "))) -> (\(t.results.map { "\($0)" }.joined(separator: ", ")))"
    }

    // MARK: host functions

    /// Charges a host import to the call's fuel: 100 units, and one per 16 bytes it copies — so
    /// that a plugin cannot make the host work without paying (a loop of 1 MiB outputs).
    private func charge(_ bytes: Int) throws {
        guard let remaining = store.fuel?.remaining else { return }
        let cost = UInt64(100 + max(0, bytes) / 16)
        guard remaining >= cost else { throw HostFuelExhausted() }
        store.fuel = Fuel(remaining: remaining - cost)
    }

    /// Reads `len` bytes at `ptr` of the plugin's memory, checking both against its size.
    private func read(_ ptr: UInt32, _ len: UInt32, max: Int) throws -> [UInt8] {
        guard Int(len) <= max else { throw GuestFault(description: "a length of \(len) bytes is over \(max)") }
        guard Int(ptr) + Int(len) <= memory.byteCount else { throw GuestFault(description: "bytes \(ptr)..<\(Int(ptr) + Int(len)) are outside memory") }
        guard len > 0 else { return [] }
        return memory.withUnsafeBufferPointer(offset: UInt(ptr), count: Int(len)) { Array($0) }
    }

    private func write(_ bytes: [UInt8], at ptr: UInt32) throws {
        guard Int(ptr) + bytes.count <= memory.byteCount else { throw GuestFault(description: "bytes \(ptr)..<\(Int(ptr) + bytes.count) are outside memory") }
        guard !bytes.isEmpty else { return }
        memory.withUnsafeMutableBufferPointer(offset: UInt(ptr), count: bytes.count) { $0.copyBytes(from: bytes) }
    }

    private func text(_ ptr: UInt32, _ len: UInt32, max: Int = 256) throws -> String {
        String(decoding: try read(ptr, len, max: max), as: UTF8.self)
    }

    private func key160(_ ptr: UInt32) throws -> Number160 {
        guard let n = Number160(bytes: try read(ptr, 20, max: 20)) else { throw GuestFault(description: "bad key") }
        return n
    }

    private func key640(_ ptr: UInt32) throws -> Number640 {
        let b = try read(ptr, 80, max: 80)
        guard let l = Number160(bytes: b[0..<20]), let d = Number160(bytes: b[20..<40]),
              let c = Number160(bytes: b[40..<60]), let v = Number160(bytes: b[60..<80]) else { throw GuestFault(description: "bad key") }
        return Number640(location: l, domain: d, content: c, version: v)
    }

    /// Checks that `name` is an export of the handler shape `type`; records the problem otherwise.
    private func checkHandler(_ name: String, _ type: FunctionType, for what: String) -> Bool {
        guard let f = instance.exports[function: name] else {
            registrationError = registrationError ?? "\(what) names the export \(name), which the module does not have"
            return false
        }
        guard f.type == type else {
            registrationError = registrationError ?? "\(what): \(name) has the type \(Self.describe(f.type)), a handler needs \(Self.describe(type))"
            return false
        }
        return true
    }

    private func makeImports() -> Imports {
        var imports = Imports()
        func define(_ name: String, _ body: @escaping (WasmInstance, [Value]) throws -> [Value]) {
            guard let type = WasmABI.imports[name] else { return }
            imports.define(module: WasmABI.importModule, name: name,
                           Function(store: store, parameters: type.parameters, results: type.results) { [unowned self] _, args in
                               try body(self, args)
                           })
        }
        func i32(_ v: Int32) -> [Value] { [.i32(UInt32(bitPattern: v))] }
        define("log") { me, a in
            try me.charge(Int(a[2].i32))
            me.logLines += 1
            guard me.logLines <= Self.logLinesPerCall || me.registering != nil && me.logLines <= 64 else { return [] }
            let level: Logger.Level = switch a[0].i32 { case 0: .debug; case 2: .warning; case 3: .error; default: .info }
            let line = try me.text(a[1].i32, a[2].i32, max: 4096)
            Self.logger.log(level: level, "\(line)", metadata: ["plugin": "\(me.label)"])
            return []
        }
        define("describe") { me, a in
            try me.charge(0)
            guard me.registering != nil else { return i32(WasmABI.denied) }
            me.registering?.name = try me.text(a[0].i32, a[1].i32, max: 128)
            me.registering?.version = try me.text(a[2].i32, a[3].i32, max: 64)
            return i32(WasmABI.ok)
        }
        define("register_command") { me, a in
            try me.charge(0)
            guard me.registering != nil else { return i32(WasmABI.denied) }
            let name = try me.text(a[0].i32, a[1].i32), export = try me.text(a[2].i32, a[3].i32)
            guard !name.isEmpty, me.checkHandler(export, WasmABI.commandType, for: "command \(name)") else { return i32(WasmABI.badRequest) }
            guard me.registering?.commands[name] == nil else {
                me.registrationError = me.registrationError ?? "command \(name) is registered twice"
                return i32(WasmABI.denied)
            }
            me.registering?.commands[name] = export
            return i32(WasmABI.ok)
        }
        define("register_put_interceptor") { me, a in
            try me.charge(0)
            guard me.registering != nil else { return i32(WasmABI.denied) }
            let domain = a[0].i32 == 0 ? nil : try me.key160(a[0].i32)
            let export = try me.text(a[1].i32, a[2].i32)
            guard me.checkHandler(export, WasmABI.interceptorType, for: "the put interceptor") else { return i32(WasmABI.badRequest) }
            me.registering?.interceptors.append((domain, export))
            return i32(WasmABI.ok)
        }
        define("register_reply_handler") { me, a in
            try me.charge(0)
            guard me.registering != nil else { return i32(WasmABI.denied) }
            let export = try me.text(a[0].i32, a[1].i32)
            guard me.checkHandler(export, WasmABI.commandType, for: "the reply handler") else { return i32(WasmABI.badRequest) }
            me.registering?.replyHandler = export
            return i32(WasmABI.ok)
        }
        define("register_evaluation_scheme") { me, a in
            try me.charge(0)
            guard me.registering != nil else { return i32(WasmABI.denied) }
            let name = try me.text(a[0].i32, a[1].i32), export = try me.text(a[2].i32, a[3].i32)
            guard !name.isEmpty, me.checkHandler(export, WasmABI.schemeType, for: "evaluation scheme \(name)") else { return i32(WasmABI.badRequest) }
            me.registering?.schemes[name] = export
            return i32(WasmABI.ok)
        }
        define("output") { me, a in
            try me.charge(Int(a[1].i32))
            let limit = me.registering != nil ? 4096 : me.limits.calls.maxResultBytes
            guard Int(a[1].i32) <= limit else {
                me.outputOverflow = true
                return i32(WasmABI.failed)
            }
            me.output = try me.read(a[0].i32, a[1].i32, max: limit)
            return i32(WasmABI.ok)
        }
        define("storage_get") { me, a in
            try me.charge(Int(a[2].i32))
            me.storageOperations += 1
            guard me.inCall, me.storageOperations <= Self.storageOperationsPerCall, let node = me.node.withLockedValue({ $0 }),
                  let backend = node.registry.storageBackend else { return i32(-WasmABI.failed) }
            let key = try me.key640(a[0].i32)
            guard case .values(let v, _)? = try? backend.execute(.get(.keys([key])), now: node.clock.uptimeNanoseconds), let value = v[key] else {
                return i32(-WasmABI.notFound)
            }
            let bytes = value.value
            let room = Int(a[2].i32)
            try me.write(Array(bytes.prefix(room)), at: a[1].i32)
            return i32(Int32(clamping: bytes.count))
        }
        define("storage_put") { me, a in
            try me.charge(Int(a[2].i32))
            me.storageOperations += 1
            guard me.inCall, me.storageOperations <= Self.storageOperationsPerCall, let node = me.node.withLockedValue({ $0 }),
                  let backend = node.registry.storageBackend else { return i32(WasmABI.failed) }
            let key = try me.key640(a[0].i32)
            let value = try me.read(a[1].i32, a[2].i32, max: me.limits.calls.maxResultBytes)
            do {
                _ = try backend.execute(.put([key: StoredValue(value, ttlSeconds: a[3].i32)], mode: .overwrite), now: node.clock.uptimeNanoseconds)
                return i32(WasmABI.ok)
            } catch {
                return i32(WasmABI.denied)
            }
        }
        define("send_direct") { me, a in
            try me.charge(Int(a[3].i32))
            guard me.inCall, me.sends.count < me.limits.sendsPerCall else { return i32(WasmABI.denied) }
            let address = try me.text(a[0].i32, a[1].i32)
            let bytes = try me.read(a[2].i32, a[3].i32, max: me.limits.calls.maxRequestBytes)
            me.sends.append(PendingSend(target: .address(address), bytes: bytes, token: a[4].i32))
            return i32(WasmABI.ok)
        }
        define("routed_send") { me, a in
            try me.charge(Int(a[2].i32))
            guard me.inCall, me.sends.count < me.limits.sendsPerCall else { return i32(WasmABI.denied) }
            let key = try me.key160(a[0].i32)
            let bytes = try me.read(a[1].i32, a[2].i32, max: me.limits.calls.maxRequestBytes)
            me.sends.append(PendingSend(target: .key(key), bytes: bytes, token: a[3].i32))
            return i32(WasmABI.ok)
        }
        return imports
    }
}
