import P2PKernel
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Synchronization

/// The bounds on one command (or other callback) of a plugin whose code the node does not
/// trust to be quick or small: a loaded `.so` or a WebAssembly module. Every field is a bound a
/// remote peer runs into, never a hint.
public struct PluginCallLimits: Sendable, Equatable, Codable {
    /// Largest request (or value, for an interceptor) handed to the plugin; a larger one is
    /// refused before any plugin code runs.
    public var maxRequestBytes: Int
    /// Largest result taken back; a larger one fails the call (`resultTooLarge`).
    public var maxResultBytes: Int
    /// Calls of this callback running or queued at once; one more is refused (`busy`).
    public var maxInFlight: Int
    /// How long the caller waits; past it the caller is answered `timedOut` and the call is
    /// reported (native code cannot be interrupted: its thread stays busy until it returns).
    public var deadline: Duration

    public init(maxRequestBytes: Int = 64 * 1024, maxResultBytes: Int = 1 << 20, maxInFlight: Int = 32,
                deadline: Duration = .seconds(2)) {
        self.maxRequestBytes = maxRequestBytes
        self.maxResultBytes = maxResultBytes
        self.maxInFlight = maxInFlight
        self.deadline = deadline
    }

    public static let `default` = PluginCallLimits()
}

/// Why a call into a plugin failed. Travels to a remote caller as the reason of its error reply
/// (`"<case>: text"`), from which `PluginCallError(reason:)` recovers it.
public enum PluginCallError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The request was over `maxRequestBytes`; the plugin never saw it.
    case requestTooLarge(callback: String, bytes: Int, limit: Int)
    /// The plugin produced more than `maxResultBytes`.
    case resultTooLarge(callback: String, limit: Int)
    /// `maxInFlight` calls were already running or queued.
    case busy(callback: String, limit: Int)
    /// No answer within the deadline.
    case timedOut(callback: String, milliseconds: Int)
    /// A WebAssembly plugin used up its fuel for one call (an endless loop, or too much work).
    case outOfFuel(callback: String, fuel: UInt64)
    /// A WebAssembly plugin asked for more linear memory than its limit.
    case memoryLimit(callback: String, limit: Int)
    /// A WebAssembly plugin trapped (unreachable, an out-of-bounds access, a division by zero …).
    case trapped(callback: String, reason: String)
    /// The plugin is stopped (its node shuts down, or a reload failed and nothing is left).
    case unavailable(callback: String)

    /// The wire name of the case.
    public var code: String {
        switch self {
        case .requestTooLarge: "requestTooLarge"
        case .resultTooLarge: "resultTooLarge"
        case .busy: "busy"
        case .timedOut: "timedOut"
        case .outOfFuel: "outOfFuel"
        case .memoryLimit: "memoryLimit"
        case .trapped: "trapped"
        case .unavailable: "unavailable"
        }
    }

    public var description: String {
        switch self {
        case .requestTooLarge(let c, let b, let l): "requestTooLarge: \(c): a request of \(b) bytes is over the limit of \(l)"
        case .resultTooLarge(let c, let l): "resultTooLarge: \(c): the result is over the limit of \(l) bytes"
        case .busy(let c, let l): "busy: \(c): \(l) calls already in flight"
        case .timedOut(let c, let ms): "timedOut: \(c): no answer within \(ms) ms"
        case .outOfFuel(let c, let f): "outOfFuel: \(c): used up its fuel of \(f) for one call"
        case .memoryLimit(let c, let l): "memoryLimit: \(c): asked for more than \(l) bytes of memory"
        case .trapped(let c, let r): "trapped: \(c): \(r)"
        case .unavailable(let c): "unavailable: \(c): the plugin is stopped"
        }
    }

    /// The reply a peer sends for this error.
    public var reply: Reply {
        switch self {
        case .requestTooLarge: .error(.badRequest, description)
        case .busy: .error(.denied, description)
        default: .error(.exception, description)
        }
    }

    /// Which case a remote error reason names (the text after the code is kept, not parsed).
    public static func code(of reason: String) -> String? {
        let codes = ["requestTooLarge", "resultTooLarge", "busy", "timedOut", "outOfFuel", "memoryLimit", "trapped", "unavailable"]
        return codes.first { reason.hasPrefix($0 + ": ") }
    }
}

extension RPCError {
    /// The plugin error a peer reported, by its code (`PluginCallError.code`), if this is one.
    public var pluginErrorCode: String? {
        switch self {
        case .peerError(let r), .badRequest(let r), .denied(let r): PluginCallError.code(of: r)
        default: nil
        }
    }
}

/// Counts the calls of one callback in flight and refuses one over the limit.
public final class CallGate: Sendable {
    private let inFlight = Atomic<Int>(0)
    public let limit: Int
    public init(limit: Int) { self.limit = max(1, limit) }

    /// Takes a slot, or returns false when all are taken.
    public func enter() -> Bool {
        if inFlight.add(1, ordering: .relaxed).newValue > limit {
            inFlight.subtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    public func leave() { inFlight.subtract(1, ordering: .relaxed) }

    public var current: Int { inFlight.load(ordering: .relaxed) }
}

/// Runs plugin code off the event loops, on a fixed number of threads, so that a slow or blocking
/// callback never stalls routing. One executor serves every node of the process (the threads are
/// the bound); each call carries its own deadline.
public final class PluginExecutor: Sendable {
    /// The process-wide executor: as many threads as cores, at least two.
    public static let shared = PluginExecutor(threads: max(2, System.coreCount))

    private let pool: NIOThreadPool
    public let threads: Int
    private let overdue = Atomic<Int>(0)
    static let logger = Logger(label: "swiftp2p.plugin")
    private let running = Atomic<Int>(0)

    public init(threads: Int) {
        self.threads = max(1, threads)
        pool = NIOThreadPool(numberOfThreads: self.threads)
        pool.start()
    }

    /// Calls that passed their deadline and whose code has not returned yet.
    public var overdueCalls: Int { overdue.load(ordering: .relaxed) }
    /// Calls running on the pool now.
    public var runningCalls: Int { running.load(ordering: .relaxed) }

    /// Runs `body` on a pool thread and completes on `eventLoop`: with its result, with its error,
    /// or with `PluginCallError.timedOut` once `deadline` passes (the body keeps its thread until
    /// it returns; it is then counted out of `overdueCalls`).
    public func run<T: Sendable>(_ callback: String, on eventLoop: any EventLoop, deadline: Duration,
                                 _ body: @escaping @Sendable () throws -> T) -> EventLoopFuture<T> {
        let promise = eventLoop.makePromise(of: T.self)
        let settled = Settled()
        let milliseconds = Int(deadline.components.seconds * 1000 + deadline.components.attoseconds / 1_000_000_000_000_000)
        let timer = eventLoop.scheduleTask(in: .milliseconds(Int64(max(1, milliseconds)))) { [self] in
            if settled.claim() {
                overdue.add(1, ordering: .relaxed)
                Self.logger.warning("plugin call over its deadline: its caller is answered timedOut, its thread stays busy until the code returns",
                                    metadata: ["callback": "\(callback)", "deadline_ms": "\(milliseconds)", "overdue": "\(overdue.load(ordering: .relaxed))"])
                promise.fail(PluginCallError.timedOut(callback: callback, milliseconds: milliseconds))
            }
        }
        pool.submit { [self] state in
            guard state == .active else {
                if settled.claim() {
                    timer.cancel()
                    promise.fail(PluginCallError.unavailable(callback: callback))
                }
                return
            }
            running.add(1, ordering: .relaxed)
            let result = Result { try body() }
            running.subtract(1, ordering: .relaxed)
            if settled.claim() {
                timer.cancel()
                promise.completeWith(result)
            } else {
                // The caller was answered with a timeout long ago; the thread is free again.
                overdue.subtract(1, ordering: .relaxed)
            }
        }
        return promise.futureResult
    }

    /// Runs `body` on a pool thread, for async callers (interceptors, reply handlers).
    public func run<T: Sendable>(_ callback: String, deadline: Duration, _ body: @escaping @Sendable () throws -> T) async throws -> T {
        let loop = MultiThreadedEventLoopGroup.singleton.any()
        return try await run(callback, on: loop, deadline: deadline, body).get()
    }
}

/// Whoever claims it first completes the call: the body or the deadline.
private final class Settled: Sendable {
    private let done = Atomic<Bool>(false)
    func claim() -> Bool { done.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged }
}

/// A plugin callback behind its limits: the size of the request is checked before the plugin
/// runs, the calls in flight are counted, the code runs on the executor with a deadline, and the
/// result's size is checked.
public struct BoundedCallback: Sendable {
    public let name: String
    public let limits: PluginCallLimits
    public let gate: CallGate
    public let executor: PluginExecutor

    public init(name: String, limits: PluginCallLimits, executor: PluginExecutor = .shared) {
        self.name = name
        self.limits = limits
        self.gate = CallGate(limit: limits.maxInFlight)
        self.executor = executor
    }

    /// Checks what the caller sends before anything runs.
    public func admit(requestBytes: Int) throws(PluginCallError) {
        guard requestBytes <= limits.maxRequestBytes else {
            throw .requestTooLarge(callback: name, bytes: requestBytes, limit: limits.maxRequestBytes)
        }
    }

    /// Runs `body` (which returns the result's bytes last) within the limits, completing on `eventLoop`.
    public func call<T: Sendable>(requestBytes: Int, on eventLoop: any EventLoop, resultBytes: @escaping @Sendable (T) -> Int,
                                  _ body: @escaping @Sendable () throws -> T) -> EventLoopFuture<T> {
        do { try admit(requestBytes: requestBytes) } catch { return eventLoop.makeFailedFuture(error) }
        guard gate.enter() else { return eventLoop.makeFailedFuture(PluginCallError.busy(callback: name, limit: gate.limit)) }
        let gate = self.gate, name = self.name, limit = limits.maxResultBytes
        return executor.run(name, on: eventLoop, deadline: limits.deadline) {
            defer { gate.leave() }
            let result = try body()
            guard resultBytes(result) <= limit else { throw PluginCallError.resultTooLarge(callback: name, limit: limit) }
            return result
        }
    }

    /// The async form.
    public func call<T: Sendable>(requestBytes: Int, resultBytes: @escaping @Sendable (T) -> Int,
                                  _ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await call(requestBytes: requestBytes, on: MultiThreadedEventLoopGroup.singleton.any(), resultBytes: resultBytes, body).get()
    }

    /// Runs `body` on the calling thread, within the size and in-flight limits: for code whose
    /// time is bounded by other means (a WebAssembly call's fuel), called from an async context
    /// (a storage interceptor), where a hop to the executor would cost more than the call.
    public func callInline<T>(requestBytes: Int, resultBytes: (T) -> Int, _ body: () throws -> T) throws -> T {
        try admit(requestBytes: requestBytes)
        guard gate.enter() else { throw PluginCallError.busy(callback: name, limit: gate.limit) }
        defer { gate.leave() }
        let result = try body()
        guard resultBytes(result) <= limits.maxResultBytes else { throw PluginCallError.resultTooLarge(callback: name, limit: limits.maxResultBytes) }
        return result
    }
}
