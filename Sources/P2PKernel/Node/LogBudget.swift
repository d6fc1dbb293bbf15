import NIOConcurrencyHelpers
import NIOCore

/// A budget of log lines per second, so that a peer cannot flood a node's log (one line per
/// joining or refused peer would be a disk-filling lever). Lines over the budget are counted and
/// reported with the next line that is allowed.
public final class LogBudget: Sendable {
    private struct State {
        var tokens: Double
        var stamp: UInt64
        var suppressed = 0
    }
    private let perSecond: Double
    private let state: NIOLockedValueBox<State>
    private let clock: NodeClock?

    /// `clock`: the node's (virtual on the simulated network); nil reads the machine's.
    public init(perSecond: Double, clock: NodeClock? = nil) {
        self.perSecond = max(0.1, perSecond)
        self.clock = clock
        self.state = NIOLockedValueBox(State(tokens: max(1, perSecond), stamp: clock?.uptimeNanoseconds ?? NIODeadline.now().uptimeNanoseconds))
    }

    /// Whether one more line may be logged now.
    public func allow() -> Bool { take() != nil }

    /// Nil when over budget; otherwise how many lines were suppressed since the last allowed one.
    public func take() -> Int? {
        let now = clock?.uptimeNanoseconds ?? NIODeadline.now().uptimeNanoseconds
        return state.withLockedValue { s in
            s.tokens = min(max(1, perSecond), s.tokens + Double(now &- s.stamp) / 1e9 * perSecond)
            s.stamp = now
            guard s.tokens >= 1 else {
                s.suppressed += 1
                return nil
            }
            s.tokens -= 1
            defer { s.suppressed = 0 }
            return s.suppressed
        }
    }
}
