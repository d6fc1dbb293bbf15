import HeapModule
import NIOCore

/// The timers of one node's busiest clocks — request re-sends and timeouts, lookup suspicions,
/// handshake re-sends — kept in one heap, with one event-loop task armed at the earliest.
///
/// Why not an event-loop task each: most of these timers are cancelled (a reply came), and
/// NIO's loop finds a cancelled task by a linear search of every task scheduled on the loop.
/// Five hundred nodes on two loops with thousands of requests pending made each reply cost a
/// scan of tens of thousands of tasks, and the loops fell behind until every request timed out.
/// Here cancelling forgets the action (O(1)); its heap entry is dropped when it comes due, or
/// when dead entries outnumber live ones.
///
/// Confined to the node's event loop.
final class KernelTimers: @unchecked Sendable {
    /// A scheduled action; cancel it with `cancel(_:)`.
    struct Handle: Hashable, Sendable {
        let raw: UInt64
    }

    private struct Entry: Comparable {
        let deadline: NIODeadline
        let id: UInt64
        static func < (a: Entry, b: Entry) -> Bool {
            a.deadline != b.deadline ? a.deadline < b.deadline : a.id < b.id
        }
    }

    private let loop: any EventLoop
    private var heap = Heap<Entry>()
    private var actions: [UInt64: () -> Void] = [:]
    private var lastID: UInt64 = 0
    /// The deadline of the earliest loop task armed (later ones may still be armed: they fire,
    /// find nothing due, and leave).
    private var armed: NIODeadline?
    private var stopped = false
    init(loop: any EventLoop) {
        self.loop = loop
    }

    /// Live timers (scheduled, neither run nor cancelled).
    var count: Int { actions.count }
    /// Heap entries, dead ones included (what the timers hold in memory).
    var entries: Int { heap.count }

    /// Runs `action` on the loop at `deadline` unless cancelled first.
    @discardableResult
    func schedule(at deadline: NIODeadline, _ action: @escaping () -> Void) -> Handle {
        lastID &+= 1
        let id = lastID
        guard !stopped else { return Handle(raw: id) }
        actions[id] = action
        heap.insert(Entry(deadline: deadline, id: id))
        arm()
        return Handle(raw: id)
    }

    /// Runs `action` on the loop after `delay` unless cancelled first.
    @discardableResult
    func schedule(in delay: TimeAmount, _ action: @escaping () -> Void) -> Handle {
        schedule(at: loop.now + delay, action)
    }

    /// Forgets a timer; nothing happens if it ran or was cancelled already.
    func cancel(_ handle: Handle?) {
        guard let handle, actions.removeValue(forKey: handle.raw) != nil else { return }
        // Dead entries wait in the heap until due: a node cancelling thousands a second with
        // deadlines seconds away would hold thousands; past a point the heap is rebuilt.
        if heap.count > 1_024, heap.count > 4 * actions.count {
            heap = Heap(heap.unordered.filter { actions[$0.id] != nil })
        }
    }

    /// Forgets every timer and schedules none from now on (the node stops).
    func stop() {
        stopped = true
        actions = [:]
        heap = Heap()
    }

    private func arm() {
        while let top = heap.min, actions[top.id] == nil { heap.removeMin() }
        guard let top = heap.min else { return }
        if let armed, armed <= top.deadline { return }
        armed = top.deadline
        let at = top.deadline
        loop.scheduleTask(deadline: at) { [self] in fire(at) }
    }

    private func fire(_ at: NIODeadline) {
        if armed == at { armed = nil }
        let now = loop.now
        while let top = heap.min, top.deadline <= now {
            heap.removeMin()
            if let action = actions.removeValue(forKey: top.id) { action() }
        }
        arm()
    }
}
