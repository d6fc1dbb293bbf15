import Testing
@testable import P2PKernel

/// The table that keeps a re-sent UDP request from running twice, against a source that floods it.
@Suite("Requests remembered against running twice")
struct RecentRequestsTests {
    private func key(_ i: Int) -> RecentRequests.Key {
        RecentRequests.Key(sender: Number160(hashing: "peer \(i % 7)"), id: UInt32(i))
    }

    @Test("a flood of distinct requests holds no more than the bound, forgetting the oldest first")
    func floodIsBounded() {
        var recent = RecentRequests(capacity: 64)
        for i in 0..<10_000 {
            recent.running(key(i), now: 5)
            if i % 2 == 0 { recent.answered(key(i), Reply(), now: 5) }
        }
        #expect(recent.count == 64)
        guard case .new = recent.seen(key(0), now: 5) else { Issue.record("the oldest request is still remembered"); return }
        guard case .answered = recent.seen(key(9_998), now: 5) else { Issue.record("a recent answered request was forgotten"); return }
        guard case .running = recent.seen(key(9_999), now: 5) else { Issue.record("a recent running request was forgotten"); return }
    }

    @Test("requests are forgotten after the lifetime, and an answer too large to keep is not kept")
    func lifetimeAndLargeAnswers() {
        var recent = RecentRequests(capacity: 4_096)
        for i in 0..<100 { recent.running(key(i), now: 1) }
        #expect(recent.count == 100)
        guard case .new = recent.seen(key(3), now: 1 + RecentRequests.lifetime + 1) else { Issue.record("an expired request still counts"); return }
        recent.running(key(1_000), now: 1 + RecentRequests.lifetime + 1)
        #expect(recent.count == 1)
        recent.answered(key(1_000), Reply(payload: [.bytes(Array(repeating: 0, count: RecentRequests.maxReplyBytes + 1))]), now: 20)
        #expect(recent.count == 0)
    }
}
