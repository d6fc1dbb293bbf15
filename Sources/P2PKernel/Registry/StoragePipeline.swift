import NIOConcurrencyHelpers
import NIOCore

/// Runs storage requests through the interceptors that cover them and then the backend.
///
/// ```
///  request ─┬─ no interceptor covers it ─────────────────────────────── backend (on the loop)
///           └─ gate (one chain at a time) ─ interceptor 1 ─ … ─ next ─── backend
/// ```
/// The fast path is synchronous: a request nobody intercepts never leaves the event loop.
public final class StoragePipeline: Sendable {
    private let registry: PluginRegistry
    private let gate: AsyncGate

    init(registry: PluginRegistry, maxQueued: Int = NodeLimits().maxInterceptorQueue) {
        self.registry = registry
        self.gate = AsyncGate(maxWaiting: maxQueued)
    }

    /// The uptime clock storage uses for TTLs.
    public static func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

    /// Carries out the request at once when no interceptor covers it; nil when it must go through
    /// the async chain (`execute`).
    public func executeImmediately(_ request: StorageRequest) -> Result<StorageResult, StorageError>? {
        guard let backend = registry.storageBackend else { return .failure(.noBackend) }
        guard interceptors(for: request).isEmpty else { return nil }
        return Result { () throws(StorageError) -> StorageResult in try backend.execute(request, now: Self.now()) }
    }

    /// Carries out the request through every interceptor that covers it.
    public func execute(_ request: StorageRequest, sender: PeerAddress?, node: Node) async throws -> StorageResult {
        guard let backend = registry.storageBackend else { throw StorageError.noBackend }
        let chain = interceptors(for: request)
        guard !chain.isEmpty else { return try backend.execute(request, now: Self.now()) }
        let context = StorageContext(sender: sender, node: node, backend: backend)
        guard await gate.enter() else {
            throw StorageError.busy("more than \(gate.maxWaiting) storage requests wait for the interceptor chain")
        }
        defer { gate.leave() }
        return try await run(request, chain[...], context: context, backend: backend)
    }

    /// As `execute`, for callers on the event loop: the fast path completes at once.
    public func executeFuture(_ request: StorageRequest, sender: PeerAddress?, node: Node) -> EventLoopFuture<StorageResult> {
        if let now = executeImmediately(request) {
            return node.eventLoop.makeCompletedFuture(now.mapError { $0 as any Error })
        }
        return node.eventLoop.makeFutureWithTask { try await self.execute(request, sender: sender, node: node) }
    }

    private func run(_ request: StorageRequest, _ chain: ArraySlice<any StorageInterceptor>, context: StorageContext,
                     backend: any StorageBackend) async throws -> StorageResult {
        guard let first = chain.first else { return try backend.execute(request, now: Self.now()) }
        let rest = chain.dropFirst()
        return try await first.intercept(request, context: context) { next in
            try await self.run(next, rest, context: context, backend: backend)
        }
    }

    private func interceptors(for request: StorageRequest) -> [any StorageInterceptor] {
        guard registry.hasInterceptors else { return [] }
        return registry.interceptors(covering: request.domains)
    }
}

/// A FIFO async mutex: callers wait their turn without blocking a thread, and at most
/// `maxWaiting` wait at once: a peer that sends requests faster than the chain runs them gets
/// refusals, not a queue that grows without end.
final class AsyncGate: Sendable {
    let maxWaiting: Int
    private struct State {
        var busy = false
        var waiters: [CheckedContinuation<Bool, Never>] = []
        var head = 0
    }
    private let state = NIOLockedValueBox(State())

    init(maxWaiting: Int) {
        self.maxWaiting = max(0, maxWaiting)
    }

    /// Waits for the gate; false at once when `maxWaiting` callers already wait.
    func enter() async -> Bool {
        await withCheckedContinuation { (c: CheckedContinuation<Bool, Never>) in
            let now: Bool? = state.withLockedValue { s -> Bool? in
                if !s.busy {
                    s.busy = true
                    return true
                }
                guard s.waiters.count - s.head < maxWaiting else { return false }
                if s.head > 64, s.head * 2 > s.waiters.count {
                    s.waiters.removeFirst(s.head)
                    s.head = 0
                }
                s.waiters.append(c)
                return nil
            }
            if let now { c.resume(returning: now) }
        }
    }

    func leave() {
        let next = state.withLockedValue { s -> CheckedContinuation<Bool, Never>? in
            guard s.head < s.waiters.count else {
                s.busy = false
                s.waiters.removeAll()
                s.head = 0
                return nil
            }
            let c = s.waiters[s.head]
            s.head += 1
            return c
        }
        next?.resume(returning: true)
    }
}
