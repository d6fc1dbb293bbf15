import Dispatch
import DequeModule
import Foundation
import HeapModule
import NIOConcurrencyHelpers
import NIOCore
import P2PKernel
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An event loop with virtual time, for the simulated network: one thread runs every node of a
/// simulation, every timer and every task, in one order that depends only on what was scheduled —
/// so a run repeats exactly from its seed.
///
/// ```
///  ready queue (FIFO) ──▶ run everything ready ──▶ nothing ready? ──▶ virtual time jumps to the next timer
///         ▲                                                              (only inside `run {}`)
///   execute / Swift jobs (tasks that prefer `taskExecutor`)
/// ```
/// Time only moves when nothing is ready to run: a request that times out after 3 s of virtual
/// time costs no wall time, and 100,000 peers can live through an hour in minutes. Virtual time
/// moves only while a `run` body is in progress; outside one, the loop runs what is ready and waits.
public final class SimulatedEventLoop: VirtualTimeEventLoop, @unchecked Sendable {
    /// Wall-clock milliseconds at virtual time zero (2026-01-01T00:00:00Z): storage TTLs and
    /// signature windows need a plausible date.
    public static let epochMilliseconds: UInt64 = 1_767_225_600_000
    /// Virtual uptime at the start: not zero, so that "zero" never means "now" by accident.
    static let startNanoseconds: UInt64 = 1_000_000_000

    private let lock = NIOLock()
    private let wake = ConditionLock(value: 0)
    // Guarded by `lock`:
    private var ready = Deque<@Sendable () -> Void>()
    private var timers = Heap<TimerRef>()
    private var sequence: UInt64 = 0
    private var stopped = false
    private var driving = 0
    private var foreign = 0
    private let nowNanos = Atomic<UInt64>(SimulatedEventLoop.startNanoseconds)
    /// Set once by the loop's thread before `init` returns, read-only after.
    nonisolated(unsafe) private var loopThread: pthread_t?
    private let threadLock = NIOLock()
    private var executed: UInt64 = 0

    /// Runs Swift tasks on this loop's thread (see `VirtualTimeEventLoop.taskExecutor`).
    public private(set) var taskExecutor: any TaskExecutor = NoExecutor()

    public init() {
        taskExecutor = SimulatedTaskExecutor(loop: self)
        let thread = Thread { [self] in
            threadLock.withLock { loopThread = pthread_self() }
            runLoop()
        }
        thread.stackSize = 16 << 20
        thread.name = "simulated-loop"
        thread.start()
        while threadLock.withLock({ loopThread == nil }) { usleep(100) }
    }

    // MARK: time

    public var now: NIODeadline { .uptimeNanoseconds(nowNanos.load(ordering: .relaxed)) }

    public var unixMilliseconds: UInt64 {
        Self.epochMilliseconds + (nowNanos.load(ordering: .relaxed) - Self.startNanoseconds) / 1_000_000
    }

    /// Virtual time since the loop started.
    public var elapsed: Duration { .nanoseconds(Int64(nowNanos.load(ordering: .relaxed) - Self.startNanoseconds)) }

    /// Jobs that reached this loop from other threads while a `run` body was in progress: each is
    /// a place where the simulation depended on something outside it (and may not repeat).
    public var foreignSubmissions: Int { lock.withLock { foreign } }

    /// Jobs (closures and task steps) run so far.
    public var jobsRun: UInt64 { lock.withLock { executed } }

    // MARK: driving

    /// Runs `body` as a task on this loop: virtual time advances whenever everything in the
    /// simulation waits. Every node, timer and task started inside runs on the loop's thread.
    public func run<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) async throws -> T {
        try await withTaskExecutorPreference(taskExecutor) { [self] in
            // On the loop from here: time may move while the body waits.
            lock.withLock { driving += 1 }
            defer { lock.withLock { driving -= 1 } }
            return try await body()
        }
    }

    // MARK: EventLoop

    public var inEventLoop: Bool {
        guard let t = loopThread else { return false }
        return pthread_equal(t, pthread_self()) != 0
    }

    public func execute(_ task: @escaping @Sendable () -> Void) {
        let onLoop = inEventLoop
        lock.withLock {
            ready.append(task)
            if !onLoop, driving > 0 { foreign += 1 }
        }
        if !onLoop { signal() }
    }

    public func scheduleTask<T>(deadline: NIODeadline, _ task: @escaping @Sendable () throws -> T) -> Scheduled<T> {
        let promise = makePromise(of: T.self)
        let entry = TimerEntry()
        entry.task = {
            do { promise.succeed(try task()) } catch { promise.fail(error) }
        }
        entry.abandon = { promise.fail(EventLoopError.shutdown) }
        let onLoop = inEventLoop
        lock.withLock {
            sequence &+= 1
            let at = max(deadline.uptimeNanoseconds, nowNanos.load(ordering: .relaxed))
            timers.insert(TimerRef(deadline: at, sequence: sequence, entry: entry))
        }
        if !onLoop { signal() }
        return Scheduled(promise: promise) { [self] in
            lock.withLock {
                entry.task = nil
                entry.abandon = nil
            }
        }
    }

    /// Runs `body` on the loop `delay` nanoseconds of virtual time from now, without a promise or
    /// a way to cancel it: the network's timer per packet in flight.
    func schedule(afterNanoseconds delay: UInt64, _ body: @escaping () -> Void) {
        let entry = TimerEntry()
        entry.task = body
        lock.withLock {
            sequence &+= 1
            timers.insert(TimerRef(deadline: nowNanos.load(ordering: .relaxed) &+ delay, sequence: sequence, entry: entry))
        }
    }

    /// Virtual uptime in nanoseconds.
    var nowNanoseconds: UInt64 { nowNanos.load(ordering: .relaxed) }

    public func scheduleTask<T>(in delay: TimeAmount, _ task: @escaping @Sendable () throws -> T) -> Scheduled<T> {
        scheduleTask(deadline: now + delay, task)
    }

    public func preconditionInEventLoop(file: StaticString, line: UInt) {
        precondition(inEventLoop, "not on the simulated loop", file: file, line: line)
    }

    public func preconditionNotInEventLoop(file: StaticString, line: UInt) {
        precondition(!inEventLoop, "on the simulated loop", file: file, line: line)
    }

    public func shutdownGracefully(queue: DispatchQueue, _ callback: @escaping @Sendable ((any Error)?) -> Void) {
        // What is still scheduled never runs: its promises fail (as NIO's own loops do), so no
        // future is left unfulfilled.
        let abandoned: [() -> Void] = lock.withLock {
            stopped = true
            ready.removeAll()
            let pending = timers.unordered.compactMap { ref -> (() -> Void)? in
                defer { ref.entry.abandon = nil }
                return ref.entry.task == nil ? nil : ref.entry.abandon
            }
            timers = Heap()
            return pending
        }
        for fail in abandoned { fail() }
        signal()
        queue.async { callback(nil) }
    }

    /// Stops the loop's thread; what is still scheduled never runs.
    public func stop() {
        shutdownGracefully(queue: .global()) { _ in }
    }

    // MARK: the loop

    private func signal() {
        wake.lock()
        wake.unlock(withValue: 1)
    }

    private func runLoop() {
        var batch = Deque<@Sendable () -> Void>()
        while true {
            var due: TimerEntry?
            let action: Int = lock.withLock {
                if stopped { return 0 }
                if !ready.isEmpty {
                    swap(&batch, &ready)
                    return 1
                }
                // Nothing ready: the next timer, if time may move.
                while let first = timers.min, first.entry.task == nil { _ = timers.popMin() }
                guard driving > 0, let next = timers.popMin() else { return 2 }
                if next.deadline > nowNanos.load(ordering: .relaxed) { nowNanos.store(next.deadline, ordering: .relaxed) }
                due = next.entry
                return 3
            }
            switch action {
            case 0:
                return
            case 1:
                var n: UInt64 = 0
                while let job = batch.popFirst() {
                    job()
                    n += 1
                }
                lock.withLock { executed &+= n }
            case 3:
                if let task = lock.withLock({ () -> (() -> Void)? in
                    defer { due?.task = nil }
                    return due?.task
                }) {
                    task()
                    lock.withLock { executed &+= 1 }
                }
            default:
                // Nothing to do until someone outside submits or starts driving.
                wake.lock(whenValue: 1)
                wake.unlock(withValue: 0)
            }
        }
    }
}

/// A timer's closure, cleared when it runs or is cancelled (the heap entry then is skipped).
private final class TimerEntry: @unchecked Sendable {
    var task: (() -> Void)?
    /// Fails the task's promise when the loop stops before it runs.
    var abandon: (() -> Void)?
}

/// A heap entry: due time, then scheduling order, so that equal deadlines run in the order they
/// were scheduled (determinism).
private struct TimerRef: Comparable {
    let deadline: UInt64
    let sequence: UInt64
    let entry: TimerEntry

    static func < (a: TimerRef, b: TimerRef) -> Bool {
        a.deadline != b.deadline ? a.deadline < b.deadline : a.sequence < b.sequence
    }

    static func == (a: TimerRef, b: TimerRef) -> Bool { a.deadline == b.deadline && a.sequence == b.sequence }
}

/// Runs Swift task jobs on the simulated loop, in its order.
final class SimulatedTaskExecutor: TaskExecutor, @unchecked Sendable {
    unowned let loop: SimulatedEventLoop

    init(loop: SimulatedEventLoop) { self.loop = loop }

    func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        loop.execute { [self] in unowned.runSynchronously(on: asUnownedTaskExecutor()) }
    }
}

/// Placeholder until the loop is initialised.
private final class NoExecutor: TaskExecutor {
    func enqueue(_ job: consuming ExecutorJob) {}
}
