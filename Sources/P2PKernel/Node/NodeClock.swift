import NIOConcurrencyHelpers
import NIOCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// An event loop whose time is not the machine's: the simulated network's (P2PTesting), where
/// every timer of every node advances with one virtual clock. A node on such a loop reads the wall
/// clock from it too, so TTLs, signature windows and ages all follow virtual time.
public protocol VirtualTimeEventLoop: EventLoop {
    /// Milliseconds since 1970 in this loop's time.
    var unixMilliseconds: UInt64 { get }
    /// Runs Swift tasks on this loop's thread, in the loop's order: tasks a node starts (see
    /// `Node.spawn`) prefer it, so a simulated run stays deterministic.
    var taskExecutor: any TaskExecutor { get }
}

/// The time a node lives in: its event loop's (`EventLoop.now`), and the wall clock to go with it.
/// On sockets both are the machine's; on the simulated network both are virtual. Kernel and
/// plugins read time only through this, never `NIODeadline.now()` or `Date()`, so that a
/// simulated node sees one consistent virtual clock.
public struct NodeClock: Sendable {
    public let loop: any EventLoop
    private let virtual: (any VirtualTimeEventLoop)?

    public init(loop: any EventLoop) {
        self.loop = loop
        self.virtual = loop as? any VirtualTimeEventLoop
    }

    /// Monotonic nanoseconds (the loop's `now`): what ages, rates and deadlines use.
    public var uptimeNanoseconds: UInt64 { loop.now.uptimeNanoseconds }

    /// The loop's `now`.
    public var now: NIODeadline { loop.now }

    /// Whole seconds of uptime.
    public var seconds: UInt32 { UInt32(truncatingIfNeeded: loop.now.uptimeNanoseconds / 1_000_000_000) }

    /// Milliseconds since 1970: what TTLs and signature time windows use.
    public var unixMilliseconds: UInt64 {
        if let virtual { return virtual.unixMilliseconds }
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec) * 1_000 + UInt64(ts.tv_nsec) / 1_000_000
    }

    /// Whether time here is virtual (the simulated network).
    public var isVirtual: Bool { virtual != nil }

    /// The executor tasks of this node prefer: the simulated loop's, or none (any thread).
    public var taskExecutor: (any TaskExecutor)? { virtual?.taskExecutor }

    /// Waits `duration` of this clock's time (a timer on the loop, so virtual time on the
    /// simulated network); throws `CancellationError` if the task is cancelled first.
    public func sleep(for duration: Duration) async throws {
        let loop = self.loop
        let promise = loop.makePromise(of: Void.self)
        let timer = loop.scheduleTask(in: TimeAmount(duration)) { promise.succeed(()) }
        try await withTaskCancellationHandler {
            try await promise.futureResult.get()
        } onCancel: {
            timer.cancel()
            promise.fail(CancellationError())
        }
        try Task.checkCancellation()
    }
}

/// Where a node's random numbers come from: the system's generator, or — on the simulated
/// network — a generator seeded from the run's seed, so that a run repeats exactly. Ids, keys,
/// message ids, session indices, ephemeral keys and every random choice of kernel and plugins
/// draw from it. Thread-safe.
public final class RandomSource: @unchecked Sendable {
    private let lock = NIOLock()
    private var state: (UInt64, UInt64, UInt64, UInt64)?

    /// The system's cryptographic generator.
    public init() { state = nil }

    /// A deterministic generator (xoshiro256**) seeded with `seed`: for simulations only — its
    /// numbers are predictable, so keys drawn from it protect nothing.
    public init(seed: UInt64) {
        var s = seed
        func splitMix() -> UInt64 {
            s &+= 0x9E37_79B9_7F4A_7C15
            var z = s
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        state = (splitMix(), splitMix(), splitMix(), splitMix())
    }

    /// Whether the numbers are seeded (a simulation) rather than the system's.
    public var isSeeded: Bool { lock.withLock { state != nil } }

    /// 64 random bits.
    public func next() -> UInt64 {
        lock.withLock {
            guard var s = state else {
                var system = SystemRandomNumberGenerator()
                return system.next()
            }
            let result = rotl(s.1 &* 5, 7) &* 9
            let t = s.1 << 17
            s.2 ^= s.0
            s.3 ^= s.1
            s.1 ^= s.2
            s.0 ^= s.3
            s.2 ^= t
            s.3 = rotl(s.3, 45)
            state = s
            return result
        }
    }

    /// `count` random bytes.
    public func bytes(_ count: Int) -> [UInt8] {
        // Eight bytes a draw: the system generator is a system call per draw.
        var system = SystemRandomNumberGenerator()
        let seeded = isSeeded
        var out: [UInt8] = []
        out.reserveCapacity(count + 8)
        while out.count < count {
            let v = seeded ? next() : system.next()
            for i in 0..<8 where out.count < count { out.append(UInt8(truncatingIfNeeded: v >> (8 * i))) }
        }
        return out
    }

    /// A uniform integer in `range`.
    public func int(in range: Range<Int>) -> Int {
        var g = generator
        return Int.random(in: range, using: &g)
    }

    /// A `RandomNumberGenerator` drawing from this source.
    public var generator: Generator { Generator(source: self) }

    /// This source as a `RandomNumberGenerator` (for `.random(using:)`, `shuffled(using:)`).
    public struct Generator: RandomNumberGenerator {
        let source: RandomSource
        public mutating func next() -> UInt64 { source.next() }
    }

    private func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }
}

extension PeerKeyPair {
    /// A key pair from `random`'s bytes (a simulation's seeded source makes the same ids every run).
    public init(random: RandomSource) {
        guard random.isSeeded else {
            self.init()
            return
        }
        // Any 32 bytes are a valid Ed25519 seed.
        do {
            try self.init(rawPrivateKey: random.bytes(32))
        } catch {
            self.init()
        }
    }
}
