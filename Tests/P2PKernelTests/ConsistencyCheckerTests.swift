import Testing
import P2PKernel
import P2PTesting

/// The checker itself: histories it must accept and histories it must reject.
@Suite("Consistency checker")
struct ConsistencyCheckerTests {
    let k = Number640(location: Number160(hashing: "register"))

    func put(_ v: String, _ from: UInt64, _ to: UInt64, acked: Bool = true) -> History.Operation {
        .init(key: k, kind: .put(Array(v.utf8)), invoked: from, completed: to, outcome: acked ? .acknowledged : .unknown)
    }
    func remove(_ from: UInt64, _ to: UInt64, acked: Bool = true) -> History.Operation {
        .init(key: k, kind: .remove, invoked: from, completed: to, outcome: acked ? .acknowledged : .unknown)
    }
    func get(_ v: String?, _ from: UInt64, _ to: UInt64) -> History.Operation {
        .init(key: k, kind: .get, invoked: from, completed: to, outcome: .read(v.map { Array($0.utf8) }))
    }
    func check(_ ops: [History.Operation], settledAt: UInt64 = 0) -> ConsistencyReport {
        ConsistencyChecker.check(History(ops), settledAt: settledAt)
    }

    @Test("valid histories: the newest acknowledged write, a write concurrent with it, an unacknowledged write that landed, nothing after a remove, nothing before any write")
    func accepts() {
        #expect(check([put("a", 0, 10), put("b", 20, 30), get("b", 40, 50)]).isValid)
        // Concurrent puts: either may win.
        #expect(check([put("a", 0, 30), put("b", 10, 20), get("a", 40, 50)]).isValid)
        #expect(check([put("a", 0, 30), put("b", 10, 20), get("b", 40, 50)]).isValid)
        // A write that failed or timed out may or may not have taken effect.
        #expect(check([put("a", 0, 10), put("b", 20, 30, acked: false), get("b", 40, 50)]).isValid)
        #expect(check([put("a", 0, 10), put("b", 20, 30, acked: false), get("a", 40, 50)]).isValid)
        #expect(check([put("a", 0, 10), remove(20, 30), get(nil, 40, 50)]).isValid)
        #expect(check([get(nil, 0, 5), put("a", 10, 20), get("a", 15, 25)]).isValid, "a read concurrent with the put may see it")
        #expect(check([put("a", 10, 20), get(nil, 15, 25)]).isValid, "… or not")
        // Removed, then put again: the new value.
        #expect(check([put("a", 0, 10), remove(20, 30), put("c", 40, 50), get("c", 60, 70)]).isValid)
        let report = check([put("a", 0, 10), get("a", 40, 50), get("a", 60, 70)])
        #expect(report.settledReads == 2 && report.acknowledgedWrites == 1 && report.operations == 3)
    }

    @Test("invalid histories are rejected, each named by what went wrong: a lost put, a stale value, a resurrected value, a phantom")
    func rejects() {
        let lost = check([put("a", 0, 10), get(nil, 20, 30)])
        #expect(lost.count(.lostWrite) == 1)
        let lostAfterRemove = check([put("a", 0, 10), remove(20, 30), put("c", 40, 50), get(nil, 60, 70)])
        #expect(lostAfterRemove.count(.lostWrite) == 1)
        let stale = check([put("a", 0, 10), put("b", 20, 30), get("a", 40, 50)])
        #expect(stale.count(.staleRead) == 1)
        #expect(stale.findings.first?.expected?.kind == .put(Array("b".utf8)))
        let resurrected = check([put("a", 0, 10), remove(20, 30), get("a", 40, 50)])
        #expect(resurrected.count(.resurrected) == 1)
        let phantom = check([put("a", 0, 10), get("z", 20, 30)])
        #expect(phantom.count(.phantom) == 1)
        let fromTheFuture = check([get("a", 0, 5), put("a", 10, 20)])
        #expect(fromTheFuture.count(.phantom) == 1, "a read cannot see a put issued after it returned")
        #expect(!lost.isValid && !stale.isValid && !resurrected.isValid && !phantom.isValid)
    }

    @Test("reads before the network settled are counted, not held to the rule; reads after are")
    func settling() {
        let ops = [put("a", 0, 10), put("b", 20, 30), get("a", 40, 50), get("a", 100, 110)]
        let report = check(ops, settledAt: 90)
        #expect(report.staleDuringFaults == 1)
        #expect(report.count(.staleRead) == 1)
        #expect(report.settledReads == 1)
    }
}
