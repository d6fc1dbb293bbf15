import ArgumentParser
import Foundation
import NIOCore
import P2PKernel
import P2PTesting

/// Where a `p2p sim` run lives: real sockets on loopback and the wall clock, or the simulated
/// network and its virtual clock. The workloads ask it for time, randomness and new nodes, so
/// the same code measures both.
struct SimRuntime: Sendable {
    let network: SimulatedNetwork?
    /// The driver's random numbers: seeded on the simulated network (a run repeats), the
    /// system's on sockets.
    let random: RandomSource

    var isSimulated: Bool { network != nil }

    /// Nanoseconds on the run's clock: virtual on the simulated network.
    func now() -> UInt64 {
        if let network { return network.loop.now.uptimeNanoseconds }
        return NIODeadline.now().uptimeNanoseconds
    }

    /// Milliseconds since `start` (a `now()` reading).
    func milliseconds(since start: UInt64) -> Double { Double(now() &- start) / 1e6 }

    /// Waits on the run's clock.
    func sleep(for d: Duration) async throws {
        if let network {
            try await NodeClock(loop: network.loop).sleep(for: d)
        } else {
            try await Task.sleep(for: d)
        }
    }

    /// A builder for one more node: on a new simulated host, or on 127.0.0.1.
    func builder() -> NodeBuilder {
        network?.node() ?? Node.builder().host("127.0.0.1").port(0)
    }

    /// A uniform index below `n`.
    func index(_ n: Int) -> Int { random.int(in: 0..<n) }
}

/// `--network`: what a `p2p sim` runs on.
enum NetworkArgument: String, ExpressibleByArgument, CaseIterable {
    case simulated
    case sockets
}

/// `--rtt`: a latency model of the simulated network.
extension LatencyModel: ExpressibleByArgument {
    public init?(argument: String) { self.init(parsing: argument) }
    public static var defaultCompletionKind: CompletionKind { .list(["world", "50ms", "20ms-200ms"]) }
}

/// Swift seeds its hash functions per process, so dictionary and set order — and with it the
/// order a node visits its peers in — differs between runs. A simulated run must repeat from its
/// seed, so `p2p sim` runs itself again with the per-process seed switched off (Swift's own
/// `SWIFT_DETERMINISTIC_HASHING`) before anything is hashed.
func ensureDeterministicHashing() {
    guard ProcessInfo.processInfo.environment["SWIFT_DETERMINISTIC_HASHING"] == nil else { return }
    setenv("SWIFT_DETERMINISTIC_HASHING", "1", 1)
    let args = CommandLine.arguments
    var argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) }
    argv.append(nil)
    execv("/proc/self/exe", &argv)
    // Only reached when exec failed: go on, with runs that may differ in order.
    note("warning: could not re-run with deterministic hashing (\(String(cString: strerror(errno)))); results may vary between runs of one seed")
}
