import P2PKernel

/// A Bloom filter of peer ids an asker already knows: a tracker leaves them out of its answer,
/// so repeated gets return peers the asker has not seen yet.
///
/// Peer ids are SHA-1 outputs, so their bits are already uniform: the k positions come from the
/// id's two 64-bit words by double hashing (no further hashing). 1,024 bytes and 5 positions,
/// the default, keep false positives near 2 % at 1,024 ids and far below at a few hundred. A false
/// positive only leaves a peer out of one answer.
///
/// ```swift
/// var known = KnownPeersFilter()
/// for peer in first.peers { known.insert(peer.id) }
/// let more = try await node.tracker.get(key, known: known)
/// ```
public struct KnownPeersFilter: Sendable, Hashable {
    /// Bytes of bits by default (TomP2P's size).
    public static let defaultBytes = 1_024
    public static let defaultHashes = 5
    /// The largest filter a peer accepts on the wire (64 K bits).
    public static let maxBytes = 8_192
    public static let maxHashes = 16

    public private(set) var bits: [UInt8]
    public let hashes: Int
    /// Ids inserted through this value (not sent; a decoded filter starts at 0).
    public private(set) var inserted = 0

    public init(bytes: Int = KnownPeersFilter.defaultBytes, hashes: Int = KnownPeersFilter.defaultHashes) {
        bits = [UInt8](repeating: 0, count: min(max(1, bytes), Self.maxBytes))
        self.hashes = min(max(1, hashes), Self.maxHashes)
    }

    /// A filter holding these ids.
    public init<S: Sequence>(_ ids: S, bytes: Int = KnownPeersFilter.defaultBytes) where S.Element == Number160 {
        self.init(bytes: bytes)
        for id in ids { insert(id) }
    }

    public mutating func insert(_ id: Number160) {
        let m = UInt64(bits.count * 8)
        var h = id.high
        let step = id.middle | 1
        for _ in 0..<hashes {
            let bit = Int(h % m)
            bits[bit >> 3] |= 1 << UInt8(bit & 7)
            h &+= step
        }
        inserted += 1
    }

    public func contains(_ id: Number160) -> Bool {
        let m = UInt64(bits.count * 8)
        var h = id.high
        let step = id.middle | 1
        for _ in 0..<hashes {
            let bit = Int(h % m)
            guard bits[bit >> 3] & (1 << UInt8(bit & 7)) != 0 else { return false }
            h &+= step
        }
        return true
    }

    /// Wire form: one byte of hash count, then the bits.
    public var encoded: [UInt8] { [UInt8(hashes)] + bits }

    /// Reads a filter a peer sent; anything out of bounds is a typed error.
    public init(decoding bytes: [UInt8]) throws(TrackerError) {
        guard bytes.count >= 2 else { throw .badRequest("a known-peers filter of \(bytes.count) bytes") }
        let k = Int(bytes[0])
        guard (1...Self.maxHashes).contains(k) else { throw .badRequest("a known-peers filter with \(k) hash positions (1 to \(Self.maxHashes))") }
        guard bytes.count - 1 <= Self.maxBytes else { throw .badRequest("a known-peers filter of \(bytes.count - 1) bytes, over \(Self.maxBytes)") }
        hashes = k
        bits = Array(bytes.dropFirst())
    }
}
