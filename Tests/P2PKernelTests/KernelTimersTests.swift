import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
@testable import P2PKernel

/// The node's timer heap: what runs, in what order, what a cancel or a stop prevents, and how
/// much cancelled timers may hold.
@Suite("Kernel timers")
struct KernelTimersTests {
    /// Polls `condition` on the loop until it holds or 60 s pass.
    private func waitFor(_ loop: any EventLoop, _ condition: @escaping @Sendable () -> Bool) async throws -> Bool {
        for _ in 0..<6_000 {
            if try await loop.submit(condition).get() { return true }
            try await Task.sleep(for: .milliseconds(10))
        }
        return false
    }

    @Test("timers run once each in deadline order; cancelled ones never run")
    func orderAndCancel() async throws {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let timers = KernelTimers(loop: loop)
        let ran = NIOLockedValueBox<[Int]>([])
        // Deadlines in a scrambled order, all from one base, every third cancelled.
        let expected: [Int] = try await loop.submit {
            let base = loop.now
            var handles: [Int: KernelTimers.Handle] = [:]
            for i in 0..<300 {
                let ms = Int64((i * 37) % 300)
                handles[i] = timers.schedule(at: base + .milliseconds(ms)) { ran.withLockedValue { $0.append(i) } }
            }
            var kept: [Int] = []
            for i in 0..<300 {
                if i % 3 == 0 { timers.cancel(handles[i]) } else { kept.append(i) }
            }
            // Cancelling twice, or a handle that ran, changes nothing.
            timers.cancel(handles[0])
            return kept.sorted { ($0 * 37) % 300 < ($1 * 37) % 300 }
        }.get()
        #expect(try await waitFor(loop) { ran.withLockedValue { $0.count } >= expected.count && timers.count == 0 })
        #expect(ran.withLockedValue { $0 } == expected)
    }

    @Test("a timer earlier than every armed one runs first, not after the later ones")
    func earlierTimerIsNotHeldBack() async throws {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let timers = KernelTimers(loop: loop)
        let ran = NIOLockedValueBox<[String]>([])
        try await loop.submit {
            timers.schedule(in: .seconds(60)) { ran.withLockedValue { $0.append("late") } }
            timers.schedule(in: .milliseconds(20)) { ran.withLockedValue { $0.append("early") } }
        }.get()
        #expect(try await waitFor(loop) { ran.withLockedValue { $0 } == ["early"] })
        // The late one is still there, and goes when the node stops.
        #expect(try await loop.submit { timers.count }.get() == 1)
        try await loop.submit { timers.stop() }.get()
        #expect(try await loop.submit { timers.count + timers.entries }.get() == 0)
        // After a stop nothing is scheduled.
        let after: Int = try await loop.submit {
            timers.schedule(in: .zero) { ran.withLockedValue { $0.append("after stop") } }
            return timers.count
        }.get()
        #expect(after == 0)
    }

    @Test("cancelled timers do not pile up: the heap holds at most about four times the live ones")
    func cancelledEntriesAreDropped() async throws {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let timers = KernelTimers(loop: loop)
        let (live, entries): (Int, Int) = try await loop.submit {
            // A busy node: 20,000 requests whose replies come long before their timeouts.
            for i in 0..<20_000 {
                let h = timers.schedule(in: .seconds(30 + Int64(i % 7))) {}
                if i % 1_000 != 0 { timers.cancel(h) }
            }
            return (timers.count, timers.entries)
        }.get()
        #expect(live == 20)
        #expect(entries <= 1_025)
        try await loop.submit { timers.stop() }.get()
    }
}

/// Round trips kept per peer: bounded, the first measured forgotten first, and each peer timed
/// by its own.
@Suite("Round trips per peer")
struct PeerRoundTripsTests {
    @Test("a near and a far peer get their own re-send times; a flood of peers keeps only the bound")
    func perPeerAndBounded() {
        var table = PeerRoundTrips(capacity: 100)
        let near = Number160(hashing: "near"), far = Number160(hashing: "far")
        for _ in 0..<20 {
            table.sample(near, .milliseconds(10))
            table.sample(far, .milliseconds(400))
        }
        let ceiling = Duration.seconds(1)
        // The near one at the floor (200 ms), the far one above its round trip.
        #expect(table[near]?.timeout(ceiling: ceiling) == .nanoseconds(RTTEstimator.floor))
        let farTimeout = table[far]?.timeout(ceiling: ceiling).nanoseconds ?? 0
        #expect(farTimeout >= 400_000_000 && farTimeout < 1_000_000_000)
        // 10,000 strangers answering once each: the table holds 100, the oldest gone first.
        for i in 0..<10_000 { table.sample(Number160(hashing: "stranger \(i)"), .milliseconds(50)) }
        #expect(table.count == 100)
        #expect(table[near] == nil && table[far] == nil)
        #expect(table[Number160(hashing: "stranger 9999")] != nil)
        #expect(table[Number160(hashing: "stranger 9899")] == nil)
    }
}
