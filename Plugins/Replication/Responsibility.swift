import P2PKernel

/// Who keeps a location's replicas filled.
public enum ReplicationMode: String, Sendable, CaseIterable {
    /// Only the peer closest to the location (itself included) copies it to the others.
    case zeroRoot = "0-root"
    /// Every peer among the `factor` closest copies it to the others of them.
    case nRoot = "n-root"
}

/// The responsibility rules, as pure functions of what one peer knows.
public enum Responsibility {
    /// The `factor` ids closest to `location` by XOR among `me` and `peers`, closest first.
    public static func replicaSet(of location: Number160, me: Number160, peers: [Number160], factor: Int) -> [Number160] {
        guard factor > 0 else { return [] }
        var all = Set(peers)
        all.insert(me)
        return Array(all.sorted { ($0 ^ location) < ($1 ^ location) }.prefix(factor))
    }

    /// Whether `me` keeps the location's replicas filled.
    public static func isResponsible(_ mode: ReplicationMode, for location: Number160, me: Number160, peers: [Number160], factor: Int) -> Bool {
        let set = replicaSet(of: location, me: me, peers: peers, factor: factor)
        switch mode {
        case .zeroRoot: return set.first == me
        case .nRoot: return set.contains(me)
        }
    }

    /// The peers `me` copies the location to: the rest of the replica set when responsible;
    /// otherwise (a copy stored here, by a put or as an old replica) the responsible peer in
    /// 0-root, the replica set in n-root — so a copy held outside the set reaches it.
    public static func targets(_ mode: ReplicationMode, for location: Number160, me: Number160, peers: [Number160], factor: Int) -> [Number160] {
        let set = replicaSet(of: location, me: me, peers: peers, factor: factor)
        if isResponsible(mode, for: location, me: me, peers: peers, factor: factor) { return set.filter { $0 != me } }
        switch mode {
        case .zeroRoot: return set.first.map { [$0] } ?? []
        case .nRoot: return set
        }
    }
}
