import NIOConcurrencyHelpers
import NIOCore
import P2PDHT
import P2PKernel
import P2PStorage

/// Direct replication: the owner republishes. A value published with a refresh interval is put
/// again by its owner every interval, until the owner cancels it or removes it; the other peers
/// keep it only for its TTL, so once the owner stops, it expires everywhere. The owner's own
/// table has no TTL: it never expires what it publishes.
///
/// ```swift
/// let direct = DirectReplication()
/// let node = try await Node.builder().plugin(DHTPlugin()).plugin(ReplicationPlugin(direct: direct)).start()
/// try await direct.publish(key, Array("alive".utf8), ttl: .seconds(30), every: .seconds(10), on: node)
/// await direct.cancel(key)                    // stops refreshing: gone after 30 s
/// try await direct.remove(key, on: node)      // cancels, then removes every interval, `removeRepeats` times
/// ```
public final class DirectReplication: ReplicationPolicy, Sendable {
    public let name = "replication.direct"
    /// How often due publications are looked at (1 s).
    public let tick: Duration
    /// How many times a remove is repeated, one interval apart, to reach replicas that were away.
    public let removeRepeats: Int
    /// Publications one node keeps, at most (10,000).
    public let maxPublications: Int

    public var timerInterval: Duration? { tick }

    struct Publication {
        var value: [UInt8]
        var options: DHTOptions
        var every: Duration
        /// On the node's clock (virtual on the simulated network).
        var due: NIODeadline
        /// Removes left to send (a publication being removed), nil while it is published.
        var removesLeft: Int?
    }
    private let table = NIOLockedValueBox<[Number640: Publication]>([:])
    private let running = NIOLockedValueBox(false)
    private let counts = NIOLockedValueBox((puts: 0, removes: 0))

    public init(tick: Duration = .seconds(1), removeRepeats: Int = 3, maxPublications: Int = 10_000) {
        self.tick = tick
        self.removeRepeats = max(1, removeRepeats)
        self.maxPublications = maxPublications
    }

    /// Why a publication was refused.
    public enum PublishError: Error, Equatable, CustomStringConvertible {
        case tooMany(limit: Int)
        case intervalNotBelowTTL
        public var description: String {
            switch self {
            case .tooMany(let l): "this node already publishes \(l) values"
            case .intervalNotBelowTTL: "the refresh interval must be shorter than the TTL, or the value lapses between refreshes"
            }
        }
    }

    /// Puts the value now and again every `every` until cancelled or removed.
    @discardableResult
    public func publish(_ key: Number640, _ value: [UInt8], ttl: Duration, every: Duration, options: DHTOptions = DHTOptions(),
                        on node: Node) async throws -> PutResult {
        guard every > .zero, ttl > every else { throw PublishError.intervalNotBelowTTL }
        var o = options
        o.ttl = ttl
        let publication = Publication(value: value, options: o, every: every, due: node.clock.now + TimeAmount(every), removesLeft: nil)
        let admitted: Bool = table.withLockedValue { t in
            guard t[key] != nil || t.count < maxPublications else { return false }
            t[key] = publication
            return true
        }
        guard admitted else { throw PublishError.tooMany(limit: maxPublications) }
        counts.withLockedValue { $0.puts += 1 }
        return try await node.dht.put(key, value, options: o)
    }

    /// Stops refreshing `key`; the copies expire by their TTL.
    public func cancel(_ key: Number640) {
        _ = table.withLockedValue { $0.removeValue(forKey: key) }
    }

    /// Stops refreshing `key` and removes it now and `removeRepeats - 1` more times, one refresh
    /// interval apart (a replica that was away while the first remove went out is caught later).
    @discardableResult
    public func remove(_ key: Number640, on node: Node) async throws -> GetResult {
        let options: DHTOptions = table.withLockedValue { t in
            guard var p = t[key] else { return DHTOptions() }
            p.removesLeft = removeRepeats - 1
            p.due = node.clock.now + TimeAmount(p.every)
            t[key] = p.removesLeft == 0 ? nil : p
            return p.options
        }
        counts.withLockedValue { $0.removes += 1 }
        return try await node.dht.remove(.keys([key]), options: options)
    }

    /// Keys being published (refreshed) now.
    public var published: [Number640] { table.withLockedValue { t in t.filter { $0.value.removesLeft == nil }.map(\.key) } }
    /// Puts and removes sent so far.
    public var sent: (puts: Int, removes: Int) { counts.withLockedValue { $0 } }

    public func handle(_ event: ReplicationEvent, context: ReplicationContext) async {
        guard case .timer = event else { return }
        let first = running.withLockedValue { r in defer { r = true }; return !r }
        guard first else { return }
        defer { running.withLockedValue { $0 = false } }
        let now = context.node.clock.now
        let due: [(Number640, Publication)] = table.withLockedValue { t in
            var out: [(Number640, Publication)] = []
            // At most 256 a tick; the rest stay due for the next one.
            for (k, p) in t where p.due <= now {
                guard out.count < 256 else { break }
                out.append((k, p))
                var next = p
                next.due = now + TimeAmount(p.every)
                if let left = p.removesLeft {
                    next.removesLeft = left - 1
                    if left - 1 <= 0 {
                        t[k] = nil
                        continue
                    }
                }
                t[k] = next
            }
            return out
        }
        let node = context.node
        await withTaskGroup(of: Void.self) { group in
            for (key, p) in due {
                group.addTask {
                    if p.removesLeft != nil {
                        _ = try? await node.dht.remove(.keys([key]), options: p.options)
                        self.counts.withLockedValue { $0.removes += 1 }
                    } else {
                        _ = try? await node.dht.put(key, p.value, options: p.options)
                        self.counts.withLockedValue { $0.puts += 1 }
                    }
                }
            }
        }
    }
}
