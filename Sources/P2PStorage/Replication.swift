import NIOConcurrencyHelpers
import NIOCore
import P2PKernel

/// Reacts to what happens to data and peers: direct replication (the owner refreshes) and
/// indirect replication (a responsible peer copies to the others) are implementations of this.
/// Registered with `PluginRegistry.add(replicationPolicy:)`; the plugin that holds the data (the
/// DHT) starts and stops the delivery of events (`Node.startReplication`).
public protocol ReplicationPolicy: Sendable {
    var name: String { get }
    /// How often the policy is handed `.timer`; nil for never.
    var timerInterval: Duration? { get }
    /// How many peers hold a key's copies under this policy (its replication factor), which is
    /// how many a write goes to; nil when the policy keeps no fixed set.
    var replicaSetSize: Int? { get }
    func handle(_ event: ReplicationEvent, context: ReplicationContext) async
    /// Called synchronously, before `handle`, where the event happens (for what must be known at
    /// once, such as a removal that a replica in flight must not undo).
    func record(_ event: ReplicationEvent, context: ReplicationContext)
}

extension ReplicationPolicy {
    public var timerInterval: Duration? { nil }
    public var replicaSetSize: Int? { nil }
    public func record(_ event: ReplicationEvent, context: ReplicationContext) {}
}

/// What a replication policy is told.
public enum ReplicationEvent: Sendable, Hashable {
    /// Values were stored on this peer (from a put by anyone).
    case dataInserted([Number640])
    /// Values were removed from this peer by a remove request (not by expiry): replication must
    /// not bring them back.
    case dataRemoved([Number640])
    /// A verified peer entered the routing table.
    case peerInserted(PeerAddress)
    case peerRemoved(PeerAddress)
    case timer
}

/// What a replication policy may use.
public struct ReplicationContext: Sendable {
    public let node: Node
    public init(node: Node) { self.node = node }
}

/// The policies of a node and, once started, what delivers their events: kept in the registry's
/// shared state.
struct ReplicationRegistration: Sendable {
    var policies: [any ReplicationPolicy] = []
    let delivery = ReplicationDelivery()
}

/// The timers of a started node's policies; a node starts delivery once.
final class ReplicationDelivery: Sendable {
    private struct State {
        var started = false
        var timers: [RepeatedTask] = []
    }
    private let state = NIOLockedValueBox(State())

    /// Whether this call is the first (and so the one that starts delivery).
    func claimStart() -> Bool {
        state.withLockedValue { s in
            defer { s.started = true }
            return !s.started
        }
    }

    func add(_ timer: RepeatedTask) { state.withLockedValue { $0.timers.append(timer) } }

    func stop() {
        let timers = state.withLockedValue { s in
            defer { s.timers = [] }
            return s.timers
        }
        for t in timers { t.cancel() }
    }
}

extension PluginRegistry {
    /// Adds a replication policy; the node hands it every `ReplicationEvent`.
    public func add(replicationPolicy: any ReplicationPolicy) {
        withShared(ReplicationRegistration.self, default: { ReplicationRegistration() }) { $0.policies.append(replicationPolicy) }
    }

    /// The registered policies, in the order they were added.
    public var replicationPolicies: [any ReplicationPolicy] { shared(ReplicationRegistration.self)?.policies ?? [] }
}

extension Node {
    /// Hands an event to every replication policy: `record` here, `handle` on a task of its own
    /// (policies may do I/O).
    public func replicate(_ event: ReplicationEvent) {
        let policies = registry.replicationPolicies
        guard !policies.isEmpty else { return }
        let context = ReplicationContext(node: self)
        for p in policies { p.record(event, context: context) }
        spawn {
            for p in policies { await p.handle(event, context: context) }
        }
    }

    /// Starts delivering what the kernel reports to the policies: a verified peer joining or any
    /// peer leaving the routing table, and each policy's timer on this node's clock. The plugin
    /// that holds the data calls it when it starts; later calls do nothing.
    public func startReplication() {
        guard let registration = registry.shared(ReplicationRegistration.self), !registration.policies.isEmpty,
              registration.delivery.claimStart() else { return }
        registry.subscribe { [weak self] event in
            switch event {
            case .peerInserted(let p, let verified) where verified: self?.replicate(.peerInserted(p))
            case .peerRemoved(let p, _): self?.replicate(.peerRemoved(p))
            default: break
            }
        }
        for policy in registration.policies {
            guard let every = policy.timerInterval else { continue }
            let t = TimeAmount(every)
            registration.delivery.add(eventLoop.scheduleRepeatedTask(initialDelay: t, delay: t) { [weak self] _ in
                guard let node = self else { return }
                let context = ReplicationContext(node: node)
                node.spawn { await policy.handle(.timer, context: context) }
            })
        }
    }

    /// Stops the policies' timers (when the node shuts down).
    public func stopReplication() {
        registry.shared(ReplicationRegistration.self)?.delivery.stop()
    }
}
