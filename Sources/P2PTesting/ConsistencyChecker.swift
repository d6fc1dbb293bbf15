import P2PKernel

/// A history of operations on keys (registers) by many clients, and the checker that decides
/// whether what the readers saw is allowed: Jepsen's approach for a last-writer-wins register
/// with acknowledged writes, without a model of the implementation.
///
/// Every put writes a value no other put writes, so a read names the write it saw. A read of
/// `key` that began at `t` may return the value (or the absence) left by a write `x` only if no
/// *acknowledged* write to `key` began after `x` had completed and completed before `t` — such a
/// write must have replaced `x` for every later reader. What breaks the rule is named by the write
/// that should have won:
/// - **lost write**: the reader sees nothing, or an older value, where an acknowledged put must be;
/// - **resurrected**: the reader sees a value an acknowledged remove had removed;
/// - **stale read**: the reader sees an older value where a newer acknowledged put must be;
/// - **phantom**: the reader sees bytes no put wrote.
/// Reads that began after `settledAt` (faults over, replication quiet) are held to the rule;
/// earlier reads are counted (a reader cut off in a partition may see old data) but not violations.
public struct History: Sendable {
    public enum Kind: Sendable, Hashable {
        case put([UInt8])
        case remove
        case get
    }

    public enum Outcome: Sendable, Hashable {
        /// A write acknowledged by its quorum.
        case acknowledged
        /// A write that failed or whose outcome is unknown: it may or may not have taken effect.
        case unknown
        /// What a get returned (nil: nothing).
        case read([UInt8]?)
        /// A get that failed (no answer): says nothing.
        case noAnswer
    }

    public struct Operation: Sendable, Hashable {
        public var key: Number640
        public var kind: Kind
        /// When the client issued it and when it returned (any one clock the clients share:
        /// virtual nanoseconds on the simulated network).
        public var invoked: UInt64
        public var completed: UInt64
        public var outcome: Outcome

        public init(key: Number640, kind: Kind, invoked: UInt64, completed: UInt64, outcome: Outcome) {
            self.key = key
            self.kind = kind
            self.invoked = invoked
            self.completed = completed
            self.outcome = outcome
        }
    }

    public private(set) var operations: [Operation] = []
    public init(_ operations: [Operation] = []) { self.operations = operations }

    public mutating func append(_ op: Operation) { operations.append(op) }
}

/// What the checker found.
public struct ConsistencyReport: Sendable, CustomStringConvertible {
    public enum Violation: String, Sendable, Hashable {
        case lostWrite = "lost write"
        case resurrected = "resurrected"
        case staleRead = "stale read"
        case phantom = "phantom"
    }

    public struct Finding: Sendable, Hashable, CustomStringConvertible {
        public var violation: Violation
        public var read: History.Operation
        /// The acknowledged write the reader should have seen (or something newer), if any.
        public var expected: History.Operation?
        public var description: String {
            let saw = if case .read(let v) = read.outcome { v.map { String(decoding: $0, as: UTF8.self) } ?? "nothing" } else { "?" }
            let want = expected.map { e -> String in
                if case .put(let v) = e.kind { return "\"\(String(decoding: v, as: UTF8.self))\" (acknowledged at \(e.completed))" }
                return "the remove acknowledged at \(e.completed)"
            } ?? "-"
            return "\(violation.rawValue) at \(read.key.location.hexString.prefix(8)): a get begun at \(read.invoked) saw \(saw), expected \(want)"
        }
    }

    /// Operations in the history, writes acknowledged, reads checked after settling.
    public var operations = 0, acknowledgedWrites = 0, settledReads = 0
    /// Reads before settling that a settled reader could not have made (allowed during faults).
    public var staleDuringFaults = 0
    public var findings: [Finding] = []

    public func count(_ v: Violation) -> Int { findings.filter { $0.violation == v }.count }
    public var isValid: Bool { findings.isEmpty }

    public var description: String {
        "\(operations) operations, \(acknowledgedWrites) acknowledged writes, \(settledReads) reads after settling: "
            + "\(count(.lostWrite)) lost, \(count(.staleRead)) stale, \(count(.resurrected)) resurrected, \(count(.phantom)) phantom"
            + " (\(staleDuringFaults) older reads during faults)"
    }
}

public enum ConsistencyChecker {
    /// Checks every read of `history`; reads begun at or after `settledAt` must obey the rule.
    public static func check(_ history: History, settledAt: UInt64) -> ConsistencyReport {
        var report = ConsistencyReport()
        report.operations = history.operations.count
        var writes: [Number640: [History.Operation]] = [:]
        var putsByValue: [[UInt8]: History.Operation] = [:]
        for op in history.operations {
            switch op.kind {
            case .put(let v):
                writes[op.key, default: []].append(op)
                putsByValue[v] = op
            case .remove:
                writes[op.key, default: []].append(op)
            case .get:
                break
            }
            if op.outcome == .acknowledged { report.acknowledgedWrites += 1 }
        }
        for read in history.operations {
            guard case .get = read.kind, case .read(let seen) = read.outcome else { continue }
            let settled = read.invoked >= settledAt
            if settled { report.settledReads += 1 }
            let finding = judge(read, seen: seen, writes: writes[read.key] ?? [], putsByValue: putsByValue)
            guard let finding else { continue }
            if settled { report.findings.append(finding) } else { report.staleDuringFaults += 1 }
        }
        return report
    }

    /// Nil when `read` may have seen `seen`; else what is wrong.
    static func judge(_ read: History.Operation, seen: [UInt8]?, writes: [History.Operation],
                      putsByValue: [[UInt8]: History.Operation]) -> ConsistencyReport.Finding? {
        // The acknowledged writes every reader begun at read.invoked must see (or see past).
        let required = writes.filter { $0.outcome == .acknowledged && $0.completed <= read.invoked }
        /// The acknowledged write that began after `x` completed (nil: `x` is the empty start,
        /// before everything) and completed before the read: `x` is then overwritten.
        func overwriter(of completed: UInt64?) -> History.Operation? {
            required.filter { w in completed.map { w.invoked > $0 } ?? true }.max { $0.completed < $1.completed }
        }
        if let seen {
            guard let x = putsByValue[seen], x.key == read.key, x.invoked <= read.completed else {
                return .init(violation: .phantom, read: read, expected: nil)
            }
            guard let w = overwriter(of: x.completed) else { return nil }
            return .init(violation: w.kind == .remove ? .resurrected : .staleRead, read: read, expected: w)
        }
        // Nothing seen: left by a remove, or by no write at all (the start, nil).
        var candidates: [UInt64?] = [nil]
        for w in writes where w.kind == .remove && w.invoked <= read.completed { candidates.append(w.completed) }
        if candidates.contains(where: { overwriter(of: $0) == nil }) { return nil }
        // Every removal (or the empty start) was overwritten by an acknowledged put.
        let w = required.filter { if case .put = $0.kind { return true } else { return false } }.max { $0.completed < $1.completed }
        return .init(violation: .lostWrite, read: read, expected: w)
    }
}
