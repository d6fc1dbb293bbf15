import NIOConcurrencyHelpers
import NIOCore
import P2PKernel
import P2PStorage

/// What a listener of a location hears: a value stored, or a key removed.
public enum ListenEvent: Sendable, Equatable {
    case stored(Number640, [UInt8])
    case removed(Number640)

    public var key: Number640 {
        switch self {
        case .stored(let k, _), .removed(let k): k
        }
    }
}

/// What one node holds for the listeners of others, and what it asks of the peers it listens
/// through. Every subscription is a claim by a remote peer, so each is bounded: per peer, per
/// location, in all, and in time (a subscription not refreshed within its TTL is gone).
public struct ListenLimits: Sendable {
    /// Subscriptions one peer id may hold on this node.
    public var maxPerPeer = 64
    /// Subscribers of one location (a put there is announced to each).
    public var maxPerLocation = 256
    /// Subscriptions on this node in all.
    public var maxTotal = 16_384
    /// The longest TTL granted; a subscriber asks again before it runs out.
    public var maxTTLSeconds: Int64 = 600
    /// Keys whose last event a listener remembers to drop the copies other replicas send.
    public var rememberedKeys = 4_096
    /// Events waiting in a listener's stream before the oldest are dropped (a slow consumer).
    public var bufferedEvents = 1_024

    public init() {}
}

/// Both sides of listening on one node, shared by the `dht.listen` and `dht.notify` commands.
final class ListenState: Sendable {
    struct Subscription {
        let peer: PeerAddress
        let id: UInt64
        var expires: UInt64
    }

    final class Listener: Sendable {
        let location: Number160
        let continuation: AsyncThrowingStream<ListenEvent, any Error>.Continuation
        /// Peers this listener subscribed through: only they may notify it.
        let peers = NIOLockedValueBox(Set<Number160>())
        private let seen = NIOLockedValueBox([Number640: Int]())
        private let remembered: Int

        init(location: Number160, continuation: AsyncThrowingStream<ListenEvent, any Error>.Continuation, remembered: Int) {
            self.location = location
            self.continuation = continuation
            self.remembered = remembered
        }

        /// Yields an event unless it repeats the last one seen for its key (every replica sends it).
        func deliver(_ event: ListenEvent) {
            let mark: Int
            switch event {
            case .stored(_, let v): mark = v.hashValue | 1
            case .removed: mark = 0
            }
            let fresh = seen.withLockedValue { s in
                if s[event.key] == mark { return false }
                if s.count >= remembered { s.removeAll(keepingCapacity: true) }
                s[event.key] = mark
                return true
            }
            if fresh { continuation.yield(event) }
        }
    }

    let limits: ListenLimits
    private struct Held {
        var byLocation: [Number160: [Subscription]] = [:]
        var perPeer: [Number160: Int] = [:]
        var total = 0

        /// One subscription of `peer` ended.
        mutating func release(_ peer: Number160) {
            total -= 1
            if let n = perPeer[peer], n > 1 { perPeer[peer] = n - 1 } else { perPeer[peer] = nil }
        }

        /// Drops a location's expired subscriptions; returns the live ones.
        @discardableResult
        mutating func prune(_ location: Number160, _ subs: [Subscription], now: UInt64) -> [Subscription] {
            let live = subs.filter { $0.expires > now }
            guard live.count != subs.count else { return subs }
            for s in subs where s.expires <= now { release(s.peer.id) }
            byLocation[location] = live.isEmpty ? nil : live
            return live
        }
    }
    private let held = NIOLockedValueBox(Held())
    private let listeners = NIOLockedValueBox([UInt64: Listener]())

    init(limits: ListenLimits) { self.limits = limits }

    // MARK: the responsible peer's side

    enum SubscribeOutcome: Equatable {
        case granted(Int64)
        case refused(String)
    }

    /// Adds or refreshes a subscription (ttl > 0), or ends it (ttl 0).
    func subscribe(location: Number160, peer: PeerAddress, id: UInt64, ttlSeconds: Int64, now: UInt64) -> SubscribeOutcome {
        let ttl = min(max(ttlSeconds, 0), limits.maxTTLSeconds)
        let expires = now &+ UInt64(ttl) * 1_000_000_000
        return held.withLockedValue { h in
            var subs = h.byLocation[location] ?? []
            if let i = subs.firstIndex(where: { $0.peer.id == peer.id && $0.id == id }) {
                if ttl == 0 {
                    subs.remove(at: i)
                    h.release(peer.id)
                } else {
                    subs[i].expires = expires
                }
                h.byLocation[location] = subs.isEmpty ? nil : subs
                return .granted(ttl)
            }
            guard ttl > 0 else { return .granted(0) }
            if h.perPeer[peer.id, default: 0] >= limits.maxPerPeer || subs.count >= limits.maxPerLocation || h.total >= limits.maxTotal {
                Self.prune(&h, now: now)
                subs = h.byLocation[location] ?? []
            }
            if h.perPeer[peer.id, default: 0] >= limits.maxPerPeer {
                return .refused("busy: \(limits.maxPerPeer) subscriptions held for this peer")
            }
            if subs.count >= limits.maxPerLocation { return .refused("busy: \(limits.maxPerLocation) subscribers of this location") }
            if h.total >= limits.maxTotal { return .refused("busy: \(limits.maxTotal) subscriptions held") }
            subs.append(Subscription(peer: peer, id: id, expires: expires))
            h.byLocation[location] = subs
            h.perPeer[peer.id, default: 0] += 1
            h.total += 1
            return .granted(ttl)
        }
    }

    /// Live subscribers of a location (expired ones are dropped on the way).
    func subscribers(of location: Number160, now: UInt64) -> [Subscription] {
        held.withLockedValue { h in
            guard let subs = h.byLocation[location] else { return [] }
            return h.prune(location, subs, now: now)
        }
    }

    /// Ends a subscription whose subscriber did not take a notification.
    func drop(location: Number160, peer: Number160, id: UInt64) {
        held.withLockedValue { h in
            guard var subs = h.byLocation[location], let i = subs.firstIndex(where: { $0.peer.id == peer && $0.id == id }) else { return }
            subs.remove(at: i)
            h.release(peer)
            h.byLocation[location] = subs.isEmpty ? nil : subs
        }
    }

    var hasSubscriptions: Bool { held.withLockedValue { $0.total > 0 } }
    var subscriptionCount: Int { held.withLockedValue { $0.total } }

    private static func prune(_ h: inout Held, now: UInt64) {
        for (location, subs) in h.byLocation { h.prune(location, subs, now: now) }
    }

    // MARK: the listener's side

    func add(_ listener: Listener, id: UInt64) { listeners.withLockedValue { $0[id] = listener } }
    func removeListener(_ id: UInt64) { _ = listeners.withLockedValue { $0.removeValue(forKey: id) } }
    func listener(_ id: UInt64) -> Listener? { listeners.withLockedValue { $0[id] } }
    var listenerCount: Int { listeners.withLockedValue { $0.count } }
}

extension PluginRegistry {
    var listenState: ListenState? { shared(ListenState.self) }
}

/// `dht.listen`: subscribes the sender to puts and removes under a location.
///
/// Request: `keys` [location], `integer` subscription id, `integer` TTL seconds (0 ends it).
/// Reply: `integer` the TTL granted; `denied` with the bound that was hit.
struct ListenCommand: CommandHandler {
    static let commandName = "dht.listen"
    static let id = CommandID.derive(from: commandName)
    let name = ListenCommand.commandName

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        guard request.payload.count == 3, case .keys(let keys) = request.payload[0], keys.count == 1,
              case .integer(let id) = request.payload[1], case .integer(let ttl) = request.payload[2], ttl >= 0 else {
            return .reply(.error(.badRequest, "a listen request is keys [location], integer id, integer ttl ≥ 0"))
        }
        guard let state = context.node.registry.listenState else { return .reply(.error(.denied, "no listening here")) }
        switch state.subscribe(location: keys[0], peer: context.sender, id: UInt64(bitPattern: id), ttlSeconds: ttl, now: context.node.clock.uptimeNanoseconds) {
        case .granted(let t): return .reply(Reply(payload: [.integer(t)]))
        case .refused(let why): return .reply(.error(.denied, why))
        }
    }
}

/// `dht.notify`: a responsible peer tells a listener what changed.
///
/// Request: `integer` subscription id, then `dataMap` of stored values or `keys640` of removed
/// keys. Only a peer the listener subscribed through is heard, and only about the location it
/// listens to.
struct NotifyCommand: CommandHandler {
    static let commandName = "dht.notify"
    static let id = CommandID.derive(from: commandName)
    let name = NotifyCommand.commandName

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        guard request.payload.count == 2, case .integer(let id) = request.payload[0] else {
            return .reply(.error(.badRequest, "a notification is integer id, then dataMap or keys640"))
        }
        guard let listener = context.node.registry.listenState?.listener(UInt64(bitPattern: id)),
              listener.peers.withLockedValue({ $0.contains(context.sender.id) }) else {
            return .reply(.error(.notFound, "no such listener"))
        }
        switch request.payload[1] {
        case .dataMap(let entries):
            guard entries.allSatisfy({ $0.key.location == listener.location }) else { return .reply(.error(.badRequest, "a key of another location")) }
            for e in entries { listener.deliver(.stored(e.key, e.value)) }
        case .keys640(let keys):
            guard keys.allSatisfy({ $0.location == listener.location }) else { return .reply(.error(.badRequest, "a key of another location")) }
            for k in keys { listener.deliver(.removed(k)) }
        default:
            return .reply(.error(.badRequest, "a notification is integer id, then dataMap or keys640"))
        }
        return .reply(Reply())
    }
}

extension DHT {
    /// Tells the listeners of a location what a request changed here (called after a put,
    /// confirm or remove ran on this peer).
    static func notifyListeners(of location: Number160, stored: [Number640], removed: [Number640], node: Node) {
        guard let state = node.registry.listenState, state.hasSubscriptions else { return }
        let subs = state.subscribers(of: location, now: node.clock.uptimeNanoseconds)
        guard !subs.isEmpty else { return }
        var payload: [Payload] = []
        var events: [ListenEvent] = []
        if !stored.isEmpty, case .success(.values(let values, _))? = node.storage.executeImmediately(.get(.keys(stored))) {
            let entries = values.map { DataEntry(key: $0.key, value: $0.value.value) }
            if !entries.isEmpty {
                payload.append(.dataMap(entries))
                events += entries.map { .stored($0.key, $0.value) }
            }
        }
        var removals: [Payload] = []
        if !removed.isEmpty {
            removals.append(.keys640(removed))
            events += removed.map { .removed($0) }
        }
        for s in subs {
            if s.peer.id == node.peerID {
                if let l = state.listener(s.id) { for e in events { l.deliver(e) } }
                continue
            }
            for section in payload + removals {
                // A subscriber that does not answer, or no longer listens under this id (it moved
                // on to closer peers), is not notified again.
                node.request(to: s.peer, command: NotifyCommand.id, payload: [.integer(Int64(bitPattern: s.id)), section])
                    .whenComplete { result in
                        if case .success(let reply) = result, reply.type == .ok { return }
                        state.drop(location: location, peer: s.peer.id, id: s.id)
                    }
            }
        }
    }

    /// The values stored and removed under `location` from now on, as the peers responsible for
    /// it report them (OpenDHT's `listen`). The stream subscribes through the `replicas` peers
    /// closest to the location, refreshes the subscriptions every third of `ttl` (finding the
    /// closest peers again, so churn is followed), and ends them when the consumer stops
    /// iterating. It finishes with an error only if no peer took the first subscription.
    ///
    /// ```swift
    /// for try await event in node.dht.listen(Number160(hashing: "news")) {
    ///     if case .stored(let key, let value) = event { print(key.content, value) }
    /// }
    /// ```
    public func listen(_ location: Number160, ttl: Duration = .seconds(60), options: DHTOptions = DHTOptions()) -> AsyncThrowingStream<ListenEvent, any Error> {
        let node = self.node
        guard let state = node.registry.listenState else {
            return AsyncThrowingStream { $0.finish(throwing: DHTError.pluginNotInstalled) }
        }
        let (stream, continuation) = AsyncThrowingStream<ListenEvent, any Error>.makeStream(bufferingPolicy: .bufferingNewest(state.limits.bufferedEvents))
        let id = max(1, node.random.next())
        let listener = ListenState.Listener(location: location, continuation: continuation, remembered: state.limits.rememberedKeys)
        state.add(listener, id: id)
        let seconds = max(3, min(ttl.components.seconds, state.limits.maxTTLSeconds))
        let dht = self
        let task = node.spawn {
            var first = true
            while !Task.isCancelled {
                let granted = await dht.subscribe(location, id: id, ttlSeconds: seconds, listener: listener, options: options)
                if first, granted == 0 {
                    continuation.finish(throwing: DHTError.notListening("no peer responsible for \(location) answered"))
                    return
                }
                first = false
                try? await node.clock.sleep(for: .seconds(seconds) / 3)
            }
        }
        continuation.onTermination = { _ in
            task.cancel()
            state.removeListener(id)
            let peers = listener.peers.withLockedValue { $0 }
            for p in peers where p != node.peerID {
                guard let address = node.peerMap.verifiedPeer(p) else { continue }
                _ = node.request(to: address, command: ListenCommand.id,
                                 payload: [.keys([location]), .integer(Int64(bitPattern: id)), .integer(0)])
            }
            if peers.contains(node.peerID) {
                _ = state.subscribe(location: location, peer: node.address, id: id, ttlSeconds: 0, now: node.clock.uptimeNanoseconds)
            }
        }
        return stream
    }

    /// One round of subscriptions; returns how many peers took it.
    private func subscribe(_ location: Number160, id: UInt64, ttlSeconds: Int64, listener: ListenState.Listener, options: DHTOptions) async -> Int {
        let node = self.node
        let payload: [Payload] = [.keys([location]), .integer(Int64(bitPattern: id)), .integer(ttlSeconds)]
        // The peers are allowed to notify before their answer arrives: a put racing the
        // subscription must not be lost.
        let answers = try? await fanOut(location, options: options, remote: { peer in
            listener.peers.withLockedValue { _ = $0.insert(peer.id) }
            return node.request(to: peer, command: ListenCommand.id, payload: payload).flatMapThrowing { reply in
                if let e = RPCError.from(reply: reply) { throw e }
            }
        }, local: {
            listener.peers.withLockedValue { _ = $0.insert(node.peerID) }
            guard let state = node.registry.listenState else { return node.eventLoop.makeFailedFuture(DHTError.pluginNotInstalled) }
            switch state.subscribe(location: location, peer: node.address, id: id, ttlSeconds: ttlSeconds, now: node.clock.uptimeNanoseconds) {
            case .granted: return node.eventLoop.makeSucceededVoidFuture()
            case .refused(let why): return node.eventLoop.makeFailedFuture(DHTError.notListening(why))
            }
        }).get()
        let took = Set((answers ?? []).compactMap { a -> Number160? in
            if case .success = a.1 { return a.0.id }
            return nil
        })
        // Peers that refused or did not answer are not listened to.
        listener.peers.withLockedValue { $0 = $0.filter { took.contains($0) } }
        return took.count
    }
}
