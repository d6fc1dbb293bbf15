import NIOConcurrencyHelpers
import NIOCore
import P2PKernel

/// What storage keeps in a node's registry: the backend, the interceptors, the pipeline.
struct StorageRegistration: Sendable {
    var backend: (any StorageBackend)?
    var interceptors: [any StorageInterceptor] = []
    var pipeline: StoragePipeline?

    /// Those of `all` that cover any of `domains` (every one when nil), in install order.
    static func covering(_ all: [any StorageInterceptor], _ domains: Set<Number160>?) -> [any StorageInterceptor] {
        guard let domains else { return all }
        return all.filter { i in
            switch i.scope {
            case .all: true
            case .domain(let d): domains.contains(d)
            }
        }
    }
}

/// Why storage could not be set up.
public enum StorageSetupError: Error, Equatable, CustomStringConvertible {
    case backendAlreadySet(existing: String, new: String)

    public var description: String {
        switch self {
        case .backendAlreadySet(let e, let n): "storage backend '\(n)' cannot replace '\(e)': a node has one backend"
        }
    }
}

extension PluginRegistry {
    /// Sets the node's storage backend; a node has one.
    public func setStorageBackend(_ backend: any StorageBackend) throws {
        try withShared(StorageRegistration.self, default: { StorageRegistration() }) { r in
            if let existing = r.backend { throw StorageSetupError.backendAlreadySet(existing: existing.name, new: backend.name) }
            r.backend = backend
            if let p = r.pipeline { backend.use(versions: p.versions) }
        }
    }

    /// The storage backend, if a plugin set one.
    public var storageBackend: (any StorageBackend)? { shared(StorageRegistration.self)?.backend }

    /// Adds a storage interceptor; interceptors run in the order they were added, outermost first.
    public func add(interceptor: any StorageInterceptor) {
        withShared(StorageRegistration.self, default: { StorageRegistration() }) { $0.interceptors.append(interceptor) }
    }

    /// The interceptors that cover any of `domains` (every one when nil), in install order.
    public func interceptors(covering domains: Set<Number160>?) -> [any StorageInterceptor] {
        StorageRegistration.covering(shared(StorageRegistration.self)?.interceptors ?? [], domains)
    }

    /// Whether any interceptor is registered at all (lets the storage path skip the lookup).
    public var hasInterceptors: Bool { !(shared(StorageRegistration.self)?.interceptors.isEmpty ?? true) }
}

extension Node {
    /// Storage requests through the interceptors to the backend.
    public var storage: StoragePipeline {
        let registry = self.registry
        return registry.withShared(StorageRegistration.self, default: { StorageRegistration() }) { r in
            if let p = r.pipeline { return p }
            let p = StoragePipeline(registry: registry, clock: clock)
            r.pipeline = p
            r.backend?.use(versions: p.versions)
            return p
        }
    }
}

/// The bounds of what one request may make the pipeline do before it reaches the backend.
public struct StorageRequestLimits: Sendable {
    /// Signatures (values' and putMeta's) one request may carry: each costs a verification on
    /// the event loop (~0.1 ms), so 32 keep a request under a few milliseconds.
    public var maxSignaturesPerRequest = 32
    /// Entries one request may name — a put's values, a query's or a confirm's keys (1,000): a
    /// request's cost on the event loop grows with them (fork detection, protection checks), and
    /// 1,000 keep the costliest under a few milliseconds (`p2p bench storage`).
    public var maxEntriesPerRequest = 1_000
    /// How far a writer proof's timestamp may lie from this peer's clock (10 minutes).
    public var proofWindowMillis: UInt64 = 600_000
    /// Writer proofs remembered to refuse replays (65,536; the oldest are forgotten first).
    public var rememberedProofs = 65_536
    /// Storage requests waiting for the interceptor chain (which runs one request at a time).
    public var maxInterceptorQueue = 256
    public init() {}
}

/// Runs storage requests through the interceptors that cover them and then the backend.
///
/// ```
///  request ─ admit (signatures, writer proof, shape) ─┬─ no interceptor covers it ── backend (on the loop)
///                                                      └─ gate (one chain at a time) ─ interceptor 1 ─ … ─ backend
/// ```
/// The fast path is synchronous: a request nobody intercepts never leaves the event loop.
public final class StoragePipeline: Sendable {
    private let registry: PluginRegistry
    private let gate: AsyncGate
    public let limits: StorageRequestLimits
    private let proofs: NIOLockedValueBox<ProofMemory>
    private let sweeper = NIOLockedValueBox<Sweeper?>(nil)
    /// The node's clock (virtual on the simulated network); nil: the machine's.
    private let clock: NodeClock?
    /// The node's version clock: stamps this node's writes (`DHT` puts and removes) and, handed
    /// to the backend, unstamped writes; observes every stamp stored.
    public let versions: VersionClock

    /// A pipeline over a registry's backend and interceptors (a node makes its own: `node.storage`).
    public init(registry: PluginRegistry, limits: StorageRequestLimits = StorageRequestLimits(), clock: NodeClock? = nil) {
        self.registry = registry
        self.limits = limits
        self.clock = clock
        self.gate = AsyncGate(maxWaiting: limits.maxInterceptorQueue)
        self.proofs = NIOLockedValueBox(ProofMemory(capacity: limits.rememberedProofs))
        self.versions = clock.map { VersionClock(clock: $0) } ?? VersionClock()
    }

    /// The machine's uptime clock, in nanoseconds (a node's own storage reads its node's clock:
    /// `StorageContext.now`).
    public static func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

    /// The uptime clock this pipeline's TTLs use: its node's.
    public func now() -> UInt64 { clock?.uptimeNanoseconds ?? Self.now() }

    /// Checks what a request claims before anything runs: its shape, every value signature, and
    /// the writer proof (signature, time window, replay). Returns the proven writer.
    public func admit(_ request: StorageRequest, proof: WriterProof?, sender: Number160?) throws(StorageError) -> SignerKey? {
        var signatures = 0
        let named = request.namedEntries
        guard named <= limits.maxEntriesPerRequest else { throw .requestTooLarge(entries: named, limit: limits.maxEntriesPerRequest) }
        switch request {
        case .put(let entries, let mode):
            if mode.contains(.protectDomain), proof == nil { throw .denied("domain protection needs a signed request") }
            for (key, v) in entries {
                if v.protectEntry, v.signature == nil { throw .malformed("entry protection at \(key) needs a signed value") }
                guard v.signature != nil else { continue }
                signatures += 1
                guard signatures <= limits.maxSignaturesPerRequest else {
                    throw .denied("more than \(limits.maxSignaturesPerRequest) signed values in one request")
                }
            }
        case .get(let q), .digest(let q), .remove(let q, _):
            if case .range(let from, let to, _, _) = q, from.location != to.location {
                throw .malformed("a range must stay within one location")
            }
            if case .remove = request, case .keys(let keys) = q, Set(keys.map(\.location)).count > 1 {
                throw .malformed("a remove must stay within one location")
            }
        case .putMeta(_, _, let sigs):
            guard sigs.count <= limits.maxSignaturesPerRequest else {
                throw .denied("more than \(limits.maxSignaturesPerRequest) signatures in one request")
            }
            signatures = sigs.count
        case .transferDomain:
            if proof == nil { throw .denied("handing a domain to another key needs a signed request") }
        case .confirm: break
        }
        var writer: SignerKey?
        if let proof {
            guard signatures < limits.maxSignaturesPerRequest else {
                throw .denied("more than \(limits.maxSignaturesPerRequest) signatures in one request")
            }
            let now = clock?.unixMilliseconds ?? WriterProof.nowMillis()
            let skew = now > proof.timestampMillis ? now - proof.timestampMillis : proof.timestampMillis - now
            guard skew <= limits.proofWindowMillis else {
                throw .badWriterProof("signed \(skew / 1000) s \(now > proof.timestampMillis ? "ago" : "ahead"), outside this peer's window of \(limits.proofWindowMillis / 1000) s")
            }
            guard proof.verifies(request) else { throw .badWriterProof("the signature by \(proof.signer.id) does not cover this request") }
            let fresh = proofs.withLockedValue { $0.note(proof, sender: sender, now: now, window: limits.proofWindowMillis) }
            guard fresh else { throw .badWriterProof("this signed request was already delivered by another peer") }
            writer = proof.signer
        }
        if case .put(let entries, _) = request {
            for (key, v) in entries where v.signature != nil && !v.verify(at: key) { throw .badSignature(key) }
        }
        return writer
    }

    /// Carries out the request at once when no interceptor covers it; nil when it must go through
    /// the async chain (`execute`), or wait for a durable backend's commit (`executeFuture`).
    public func executeImmediately(_ request: StorageRequest, proof: WriterProof? = nil, sender: Number160? = nil) -> Result<StorageResult, StorageError>? {
        let registration = registry.shared(StorageRegistration.self)
        guard let backend = registration?.backend else { return .failure(.noBackend) }
        guard Self.interceptors(registration, for: request).isEmpty, !(request.isWrite && backend.defersDurability) else { return nil }
        return direct(request, proof: proof, sender: sender, backend: backend)
    }

    /// Admits the request and hands it to the backend, with no interceptor.
    private func direct(_ request: StorageRequest, proof: WriterProof?, sender: Number160?, backend: any StorageBackend) -> Result<StorageResult, StorageError> {
        Result { () throws(StorageError) -> StorageResult in
            let writer = try admit(request, proof: proof, sender: sender)
            return try apply(request, writer: writer, backend: backend)
        }
    }

    /// The backend carries the request out; a write may bring the next sweep forward.
    private func apply(_ request: StorageRequest, writer: SignerKey?, backend: any StorageBackend) throws(StorageError) -> StorageResult {
        let result = try backend.execute(request, writer: writer, now: now())
        if request.isWrite { wrote(backend) }
        return result
    }

    /// Waits until a write the backend carried out is durable (at once for a memory backend):
    /// a write is acknowledged only then, and fails when it could not be kept.
    private static func durable(_ request: StorageRequest, _ backend: any StorageBackend, since mark: UInt64) async throws(StorageError) {
        guard request.isWrite, backend.defersDurability else { return }
        let failure = await withCheckedContinuation { (c: CheckedContinuation<StorageError?, Never>) in
            backend.whenDurable(since: mark) { c.resume(returning: $0) }
        }
        if let failure { throw failure }
    }

    /// Carries out the request through every interceptor that covers it.
    public func execute(_ request: StorageRequest, proof: WriterProof? = nil, sender: PeerAddress?, node: Node) async throws -> StorageResult {
        let registration = registry.shared(StorageRegistration.self)
        guard let backend = registration?.backend else { throw StorageError.noBackend }
        let writer = try admit(request, proof: proof, sender: sender?.id)
        let chain = Self.interceptors(registration, for: request)
        let mark = backend.durabilityMark()
        guard !chain.isEmpty else {
            let result = try apply(request, writer: writer, backend: backend)
            try await Self.durable(request, backend, since: mark)
            return result
        }
        var context = StorageContext(sender: sender, writer: writer, node: node, backend: backend)
        if case .put(let entries, _) = request { context.originalPuts = entries }
        guard await gate.enter() else {
            throw StorageError.busy("more than \(gate.maxWaiting) storage requests wait for the interceptor chain")
        }
        let result: StorageResult
        do {
            result = try await run(request, chain[...], context: context, backend: backend)
        } catch {
            gate.leave()
            throw error
        }
        gate.leave()
        // Outside the gate: the next chain runs while this write is committed.
        try await Self.durable(request, backend, since: mark)
        return result
    }

    /// As `execute`, for callers on the event loop: the fast path completes at once.
    public func executeFuture(_ request: StorageRequest, proof: WriterProof? = nil, sender: PeerAddress?, node: Node) -> EventLoopFuture<StorageResult> {
        let registration = registry.shared(StorageRegistration.self)
        guard let backend = registration?.backend else { return node.eventLoop.makeFailedFuture(StorageError.noBackend) }
        guard Self.interceptors(registration, for: request).isEmpty else {
            return node.makeFutureWithTask { try await self.execute(request, proof: proof, sender: sender, node: node) }
        }
        let deferred = request.isWrite && backend.defersDurability
        let mark = deferred ? backend.durabilityMark() : 0
        let result = direct(request, proof: proof, sender: sender?.id, backend: backend)
        guard deferred, case .success(let done) = result else { return node.eventLoop.makeCompletedFuture(result.mapError { $0 as any Error }) }
        // A write to a durable backend: carried out here on the loop, answered once committed.
        let promise = node.eventLoop.makePromise(of: StorageResult.self)
        backend.whenDurable(since: mark) { failure in
            if let failure { promise.fail(failure) } else { promise.succeed(done) }
        }
        return promise.futureResult
    }

    /// Sweeps expired values on the node's loop until `stopSweeping` (the plugin that set the
    /// backend starts it). A backend's sweep costs what expired, not what is stored; one that says
    /// when its next value expires (`nextExpiry`) is swept then, at most every `interval` and at
    /// least every `idle`, and a write that expires sooner brings the sweep forward: a node whose
    /// values do not expire does not wake (100,000 simulated peers each woken every second spent
    /// most of a run's time in sweeps that found nothing). Other backends are swept every `interval`.
    /// Expired values are never served, swept or not.
    public func startSweeping(node: Node, every interval: Duration = .seconds(1), idle: Duration = .seconds(60)) {
        let least = max(1_000_000, TimeAmount(interval).nanoseconds)
        let sweep = Sweeper(loop: node.eventLoop, registry: registry, clock: clock, interval: UInt64(least),
                            idle: UInt64(max(least, TimeAmount(idle).nanoseconds)))
        sweeper.withLockedValue { old in
            old?.stop()
            old = sweep
        }
        sweep.arm(now: now())
    }

    /// After a write: brings the sweep forward when the backend now holds a value expiring sooner.
    private func wrote(_ backend: any StorageBackend) {
        guard let sweep = sweeper.withLockedValue({ $0 }) else { return }
        sweep.bringForward(to: backend.nextExpiry, now: now())
    }

    /// One sweep of the backend (what the timer runs): how many values it removed.
    public func sweepOnce(now: UInt64? = nil) -> Int {
        registry.storageBackend?.sweepExpired(now: now ?? self.now()) ?? 0
    }

    /// Reports what the backend holds: `p2p_storage_entries` and `p2p_storage_bytes` gauges (when
    /// the node records metrics) and a "storage" section of the node's status.
    public func startReporting(node: Node) {
        let registry = self.registry
        if let metrics = node.metrics {
            let entries = metrics.gauge("p2p_storage_entries")
            let bytes = metrics.gauge("p2p_storage_bytes")
            metrics.addSampler {
                guard let u = registry.storageBackend?.usage else { return }
                entries.record(u.entries)
                bytes.record(u.bytes)
            }
        }
        registry.addStatus("storage") {
            guard let backend = registry.storageBackend else { return [] }
            var rows = [("backend", backend.name)]
            if let u = backend.usage { rows += [("entries", "\(u.entries)"), ("bytes", "\(u.bytes)")] }
            return rows
        }
    }

    public func stopSweeping() {
        sweeper.withLockedValue { t in
            t?.stop()
            t = nil
        }
    }

    private func run(_ request: StorageRequest, _ chain: ArraySlice<any StorageInterceptor>, context: StorageContext,
                     backend: any StorageBackend) async throws -> StorageResult {
        guard let first = chain.first else { return try apply(Self.restamped(request, from: context), writer: context.writer, backend: backend) }
        let rest = chain.dropFirst()
        return try await first.intercept(request, context: context) { next in
            try await self.run(next, rest, context: context, backend: backend)
        }
    }

    /// A put whose unsigned values an interceptor computed (bytes other than the writer sent)
    /// replaces what the keys hold (`PutMode.replaceHeld`), stamped with the newest of the
    /// writer's stamp and the one held: a read-modify-write (a count, a vote) is this peer's state
    /// of the key, and replicas that applied the same writes hold the same stamp — one that
    /// missed the newest write holds an older one, one that missed another write the same stamp
    /// with other bytes, which a get's vote outweighs.
    private static func restamped(_ request: StorageRequest, from context: StorageContext) -> StorageRequest {
        guard case .put(var entries, var mode) = request, let original = context.originalPuts else { return request }
        let changed = entries.filter { $0.value.signature == nil && original[$0.key]?.value != $0.value.value }.map(\.key)
        guard !changed.isEmpty else { return request }
        let held = context.backend.replicaEntries(changed, now: context.now)
        for key in changed {
            let incoming = entries[key]?.stamp ?? 0
            entries[key]?.stamp = max(incoming == 0 ? context.node.storage.versions.next() : incoming, held[key]?.stamp ?? 0)
        }
        mode.insert(.replaceHeld)
        return .put(entries, mode: mode)
    }

    /// The interceptors covering the request, from one read of the registration (one lock, not three).
    private static func interceptors(_ registration: StorageRegistration?, for request: StorageRequest) -> [any StorageInterceptor] {
        guard let all = registration?.interceptors, !all.isEmpty else { return [] }
        return StorageRegistration.covering(all, request.domains)
    }
}

/// Writer proofs seen within the window, and which peer delivered each: the same peer may
/// deliver a request again (a resend after a lost reply), another peer may not (a replay).
struct ProofMemory: Sendable {
    struct Seen: Sendable {
        let signature: [UInt8]
        let at: UInt64
    }
    let capacity: Int
    private var sender: [[UInt8]: Number160] = [:]
    private var order: [Seen] = []
    private var head = 0

    init(capacity: Int) { self.capacity = max(1, capacity) }

    /// False when another sender delivered this proof before.
    mutating func note(_ proof: WriterProof, sender from: Number160?, now: UInt64, window: UInt64) -> Bool {
        // Forget what left the window, and the oldest beyond the capacity.
        while head < order.count, order[head].at + 2 * window < now || order.count - head >= capacity {
            sender[order[head].signature] = nil
            head += 1
        }
        if head > 1024, head * 2 > order.count {
            order.removeFirst(head)
            head = 0
        }
        let who = from ?? .zero
        if let first = sender[proof.signature] { return first == who }
        sender[proof.signature] = who
        order.append(Seen(signature: proof.signature, at: now))
        return true
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

/// The one sweep timer of a pipeline: when it fires next, re-armed after each sweep and brought
/// forward by writes. It holds the registry, not the pipeline, and no weak reference: a weakly
/// referenced object pays a slower retain on every use, and the pipeline is used on every request.
/// Like any timer of the node it runs until stopped (`stopSweeping`, when the DHT plugin stops).
private final class Sweeper: Sendable {
    let loop: any EventLoop
    let registry: PluginRegistry
    let clock: NodeClock?
    /// Least and most time between sweeps, in nanoseconds.
    let interval: UInt64
    let idle: UInt64
    private let state = NIOLockedValueBox<(task: Scheduled<Void>?, at: UInt64, stopped: Bool)>((nil, .max, false))

    init(loop: any EventLoop, registry: PluginRegistry, clock: NodeClock?, interval: UInt64, idle: UInt64) {
        self.loop = loop
        self.registry = registry
        self.clock = clock
        self.interval = interval
        self.idle = idle
    }

    private var now: UInt64 { clock?.uptimeNanoseconds ?? StoragePipeline.now() }

    /// Sweeps what expired and sets the next sweep.
    private func sweep() {
        let t = now
        _ = registry.storageBackend?.sweepExpired(now: t)
        arm(now: t)
    }

    /// Sets the next sweep after one at `now`: at the backend's next expiry (already past when the
    /// sweep stopped at its cap), within [interval, idle] from now.
    func arm(now: UInt64) {
        let next = registry.storageBackend?.nextExpiry ?? .max
        let at = now &+ min(idle, max(interval, next > now ? next - now : 0))
        schedule(at: at, now: now, onlyIfSooner: false)
    }

    /// Moves the next sweep to `expiry` (no sooner than `interval` from now) when that is sooner.
    func bringForward(to expiry: UInt64?, now: UInt64) {
        guard let expiry else { return }
        schedule(at: max(expiry, now &+ interval), now: now, onlyIfSooner: true)
    }

    private func schedule(at: UInt64, now: UInt64, onlyIfSooner: Bool) {
        state.withLockedValue { s in
            guard !s.stopped, !onlyIfSooner || at < s.at else { return }
            s.task?.cancel()
            s.at = at
            s.task = loop.scheduleTask(in: .nanoseconds(Int64(clamping: at - min(at, now)))) { self.sweep() }
        }
    }

    func stop() {
        state.withLockedValue { s in
            s.stopped = true
            s.task?.cancel()
            s.task = nil
        }
    }
}
