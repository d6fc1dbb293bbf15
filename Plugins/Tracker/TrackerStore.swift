import NIOConcurrencyHelpers
import NIOCore
import P2PKernel

/// What a tracker refuses, and why.
public enum TrackerError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The request is malformed or out of bounds (sizes, counts, filter).
    case badRequest(String)
    /// The tracker refused the entry (full, or the peer is held off after a failure).
    case denied(String)
    /// The node has no tracker plugin installed.
    case pluginNotInstalled
    /// No tracker was reachable for an add.
    case noTrackerAccepted([String])

    public var description: String {
        switch self {
        case .badRequest(let r): "bad tracker request: \(r)"
        case .denied(let r): "tracker refused: \(r)"
        case .pluginNotInstalled: "the tracker plugin is not installed on this node"
        case .noTrackerAccepted(let reasons): "no tracker accepted the add" + (reasons.isEmpty ? " (no peer found near the key)" : ": " + reasons.prefix(3).joined(separator: "; "))
        }
    }
}

/// The tracker's settings and bounds. Each bound names what one peer, however hostile, can make
/// a tracker hold.
public struct TrackerConfig: Sendable {
    /// How long an entry lives after its last add (TomP2P: 60 s). Announcers refresh at 0.75 × this.
    public var ttl: Duration = .seconds(60)
    /// How many of the peers closest to a key an add is sent to (TomP2P: 20).
    public var replicas = 20
    /// Peers listed in one answer or one exchange message (TomP2P: 35, what fits a datagram).
    public var maxPeersPerMessage = 35
    /// How often a tracker pushes some of its entries to another tracker of the same key.
    public var pexInterval: Duration = .seconds(60)
    /// Keys pushed per exchange round.
    public var pexKeysPerRound = 8
    /// How long a peer this node found offline cannot be (re-)added here (TomP2P: 5 × TTL).
    public var failedHoldOff: Duration = .seconds(300)
    /// Trackers a get asks for their lists (the closest that say they hold entries).
    public var trackersPerGet = 3

    /// Peers listed under one key (TomP2P: 1,000).
    public var maxEntriesPerKey = 1_000
    /// Keys tracked here.
    public var maxKeys = 10_000
    /// Entries over all keys.
    public var maxEntries = 100_000
    /// Bytes of one attachment.
    public var maxAttachmentBytes = 1_024
    /// Bytes of all attachments held.
    public var maxTotalAttachmentBytes = 16 << 20
    /// Keys one peer can be listed under here.
    public var maxKeysPerPeer = 256
    /// Peers held off at once (the oldest hold-offs are forgotten first).
    public var maxHeldOff = 65_536
    /// Exchange messages taken from one peer per minute.
    public var pexPerPeerPerMinute = 30
    /// Peers heard of by exchange waiting to be pinged before they are listed, and pings at once.
    public var maxPendingVerifications = 256
    public var maxVerificationsInFlight = 16

    public init() {}
}

/// One peer listed under a key.
public struct TrackerPeer: Sendable, Hashable {
    /// The peer, with the address the tracker saw it at (and its relays, if relayed).
    public let peer: PeerAddress
    /// What the peer attached to its entry (at most `TrackerConfig.maxAttachmentBytes`).
    public let attachment: [UInt8]
    public var id: Number160 { peer.id }

    public init(peer: PeerAddress, attachment: [UInt8]) {
        self.peer = peer
        self.attachment = attachment
    }
}

/// The entries a tracker holds, by key: bounded, expiring, thread-safe.
///
/// Fixes of TomP2P's tracker store: a key lives as long as one of its entries does (its list does
/// not vanish a TTL after the key was created), and a re-add replaces the attachment.
public final class TrackerStore: Sendable {
    public enum AddOutcome: Equatable, Sendable {
        case added
        case refreshed
        case denied(String)
    }

    struct Entry {
        var peer: PeerAddress
        var attachment: [UInt8]
        var expires: UInt64
        /// Added by the peer itself, not heard of through an exchange.
        var firstHand: Bool
    }

    private struct State {
        var keys: [Number160: [Number160: Entry]] = [:]
        var keysOfPeer: [Number160: Set<Number160>] = [:]
        var entries = 0
        var attachmentBytes = 0
        var heldOff: [Number160: UInt64] = [:]
    }

    let config: TrackerConfig
    private let state = NIOLockedValueBox(State())

    public init(config: TrackerConfig = TrackerConfig()) {
        self.config = config
    }

    /// The node whose clock and random numbers the store uses (virtual on the simulated network),
    /// the machine's until one is attached; and what to call after an add (wakes the timers).
    private let node = NIOLockedValueBox<(clock: NodeClock, random: RandomSource, added: @Sendable () -> Void)?>(nil)

    /// Makes the store read time and randomness from a node's and call `added` after each add
    /// (`TrackerPlugin` does when it starts: its sweep and exchange timers sleep while the store is empty).
    public func attach(clock: NodeClock, random: RandomSource, added: @escaping @Sendable () -> Void = {}) {
        node.withLockedValue { $0 = (clock, random, added) }
    }

    /// The store's clock: monotonic nanoseconds.
    public var now: UInt64 {
        node.withLockedValue { $0?.clock.uptimeNanoseconds } ?? NIODeadline.now().uptimeNanoseconds
    }

    private func shuffle<T>(_ items: inout [T]) {
        if let random = node.withLockedValue({ $0?.random }) {
            var g = random.generator
            items.shuffle(using: &g)
        } else {
            items.shuffle()
        }
    }
    private var ttlNanos: UInt64 { UInt64(max(0, config.ttl.nanoseconds)) }

    /// Lists `peer` under `key` until `ttl` from `now` (at most the configured TTL). A first-hand
    /// add replaces the attachment and the address; an entry heard of never replaces a first-hand one.
    public func add(key: Number160, peer: PeerAddress, attachment: [UInt8], firstHand: Bool,
                    ttl: Duration? = nil, now: UInt64? = nil) -> AddOutcome {
        let now = now ?? self.now
        defer { node.withLockedValue { $0?.added }?() }
        guard attachment.count <= config.maxAttachmentBytes else {
            return .denied("an attachment of \(attachment.count) bytes, over \(config.maxAttachmentBytes)")
        }
        let life = min(ttlNanos, ttl.map { UInt64(max(0, $0.nanoseconds)) } ?? ttlNanos)
        return state.withLockedValue { s in
            if let until = s.heldOff[peer.id] {
                if until > now { return .denied("\(peer.id) was found offline here; held off \((until - now) / 1_000_000_000 + 1) s more") }
                s.heldOff[peer.id] = nil
            }
            if var existing = s.keys[key]?[peer.id] {
                if existing.firstHand && !firstHand { return .refreshed }
                let grown = attachment.count - existing.attachment.count
                if grown > 0, s.attachmentBytes + grown > config.maxTotalAttachmentBytes {
                    return .denied("attachments here fill \(config.maxTotalAttachmentBytes) bytes, the most this tracker holds")
                }
                s.attachmentBytes += grown
                existing.peer = peer
                existing.attachment = attachment
                existing.expires = firstHand ? now + life : max(existing.expires, now + life)
                existing.firstHand = existing.firstHand || firstHand
                s.keys[key]?[peer.id] = existing
                return .refreshed
            }
            if s.keys[key] == nil, s.keys.count >= config.maxKeys { return .denied("tracking \(config.maxKeys) keys, the most this tracker holds") }
            if (s.keys[key]?.count ?? 0) >= config.maxEntriesPerKey {
                // A peer's own add makes room by evicting an entry only heard of by exchange.
                guard firstHand, let (victim, e) = s.keys[key]?.first(where: { !$0.value.firstHand }) else {
                    return .denied("\(config.maxEntriesPerKey) peers listed under this key, the most it holds")
                }
                s.keys[key]?[victim] = nil
                s.keysOfPeer[victim]?.remove(key)
                if s.keysOfPeer[victim]?.isEmpty == true { s.keysOfPeer[victim] = nil }
                s.entries -= 1
                s.attachmentBytes -= e.attachment.count
            }
            if s.entries >= config.maxEntries { return .denied("\(config.maxEntries) entries held, the most this tracker holds") }
            // Only a peer's own adds count toward its keys: exchanged entries cannot use them up.
            let ownKeys = firstHand ? (s.keysOfPeer[peer.id] ?? []).reduce(0) { $0 + (s.keys[$1]?[peer.id]?.firstHand == true ? 1 : 0) }
                                    : (s.keysOfPeer[peer.id]?.count ?? 0)
            if ownKeys >= config.maxKeysPerPeer { return .denied("listed under \(config.maxKeysPerPeer) keys here, the most one peer may be") }
            if s.attachmentBytes + attachment.count > config.maxTotalAttachmentBytes {
                return .denied("attachments here fill \(config.maxTotalAttachmentBytes) bytes, the most this tracker holds")
            }
            s.attachmentBytes += attachment.count
            s.keys[key, default: [:]][peer.id] = Entry(peer: peer, attachment: attachment, expires: now + life, firstHand: firstHand)
            s.keysOfPeer[peer.id, default: []].insert(key)
            s.entries += 1
            return .added
        }
    }

    /// Up to `limit` live entries of `key` not in `known`, picked at random, and how many live
    /// entries the key has in all.
    public func list(key: Number160, known: KnownPeersFilter? = nil, limit: Int, now: UInt64? = nil) -> (peers: [TrackerPeer], total: Int) {
        let now = now ?? self.now
        return state.withLockedValue { s in
            guard let entries = s.keys[key] else { return ([], 0) }
            var live: [TrackerPeer] = []
            var total = 0
            for e in entries.values where e.expires > now {
                total += 1
                if let known, known.contains(e.peer.id) { continue }
                live.append(TrackerPeer(peer: e.peer, attachment: e.attachment))
            }
            if live.count > limit {
                shuffle(&live)
                live.removeLast(live.count - limit)
            }
            return (live, total)
        }
    }

    /// Live entries of `key` for an exchange: up to `limit`, first-hand ones first, with the time
    /// each has left.
    func sample(key: Number160, limit: Int, now: UInt64? = nil) -> [(TrackerPeer, seconds: UInt16)] {
        let now = now ?? self.now
        return state.withLockedValue { s in
            guard let entries = s.keys[key] else { return [] }
            var live = entries.values.filter { $0.expires > now }
            shuffle(&live)
            live.sort { $0.firstHand && !$1.firstHand }
            return live.prefix(limit).map { e in
                (TrackerPeer(peer: e.peer, attachment: e.attachment), UInt16(clamping: (e.expires - now) / 1_000_000_000))
            }
        }
    }

    /// How many live entries `key` has here.
    public func count(key: Number160, now: UInt64? = nil) -> Int {
        let now = now ?? self.now
        return state.withLockedValue { s in s.keys[key]?.values.reduce(0) { $0 + ($1.expires > now ? 1 : 0) } ?? 0 }
    }

    /// Keys with entries here.
    public var keys: [Number160] { state.withLockedValue { Array($0.keys.keys) } }
    /// Whether the store holds nothing to sweep or exchange: no entries and no hold-offs.
    public var isEmpty: Bool { state.withLockedValue { $0.entries == 0 && $0.heldOff.isEmpty } }
    /// Entries over all keys (expired ones until the next sweep).
    public var entryCount: Int { state.withLockedValue { $0.entries } }
    /// Bytes of attachments held.
    public var attachmentBytes: Int { state.withLockedValue { $0.attachmentBytes } }

    /// Drops every entry of `id`; with `holdOff`, it cannot be added here again until it ends.
    public func remove(peer id: Number160, holdOff: Bool, now: UInt64? = nil) {
        let now = now ?? self.now
        state.withLockedValue { s in
            for key in s.keysOfPeer.removeValue(forKey: id) ?? [] {
                if let gone = s.keys[key]?.removeValue(forKey: id) {
                    s.entries -= 1
                    s.attachmentBytes -= gone.attachment.count
                }
                if s.keys[key]?.isEmpty == true { s.keys[key] = nil }
            }
            guard holdOff else { return }
            if s.heldOff.count >= config.maxHeldOff {
                s.heldOff = s.heldOff.filter { $0.value > now }
                if s.heldOff.count >= config.maxHeldOff, let oldest = s.heldOff.min(by: { $0.value < $1.value }) { s.heldOff[oldest.key] = nil }
            }
            s.heldOff[id] = now + UInt64(max(0, config.failedHoldOff.nanoseconds))
        }
    }

    /// Whether `id` is held off here now.
    public func isHeldOff(_ id: Number160, now: UInt64? = nil) -> Bool {
        let now = now ?? self.now
        return state.withLockedValue { ($0.heldOff[id] ?? 0) > now }
    }

    /// Removes expired entries (and keys left empty) and ended hold-offs; returns how many entries went.
    @discardableResult
    public func sweep(now: UInt64? = nil) -> Int {
        let now = now ?? self.now
        return state.withLockedValue { s in
            var removed = 0
            for key in Array(s.keys.keys) {
                guard let entries = s.keys[key] else { continue }
                let expired = entries.filter { $0.value.expires <= now }.map(\.key)
                guard !expired.isEmpty else { continue }
                for id in expired {
                    s.attachmentBytes -= entries[id]?.attachment.count ?? 0
                    s.keys[key]?[id] = nil
                    s.keysOfPeer[id]?.remove(key)
                    if s.keysOfPeer[id]?.isEmpty == true { s.keysOfPeer[id] = nil }
                }
                if s.keys[key]?.isEmpty == true { s.keys[key] = nil }
                removed += expired.count
            }
            s.entries -= removed
            s.heldOff = s.heldOff.filter { $0.value > now }
            return removed
        }
    }
}

extension Duration {
    var nanoseconds: Int64 {
        let c = components
        return c.seconds * 1_000_000_000 + c.attoseconds / 1_000_000_000
    }
}
