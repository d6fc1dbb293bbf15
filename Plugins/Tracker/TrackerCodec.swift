import P2PKernel

/// The tracker's wire forms, in the kernel's payload sections.
///
/// ```
/// tracker.add   request  keys[key] · bytes(attachment) · bytes(known-peers filter, or empty)
///               reply    peers · bytes(records)              (others listed, filtered, ≤ 35)
/// tracker.get   request  keys[key] · bytes(known-peers filter, or empty)
///               reply    peers · bytes(records) · integer(live entries held)
/// tracker.pex   request  keys[key] · peers · bytes(records)
///               reply    integer(entries taken)
/// records: per peer, in the order of the peers section: u16 seconds left · u16 length · attachment
/// ```
enum TrackerCodec {
    static func encode(_ entries: [(TrackerPeer, seconds: UInt16)]) -> [Payload] {
        var records: [UInt8] = []
        records.reserveCapacity(entries.reduce(0) { $0 + 4 + $1.0.attachment.count })
        for (p, seconds) in entries {
            records += [UInt8(seconds >> 8), UInt8(seconds & 0xFF)]
            let n = UInt16(clamping: p.attachment.count)
            records += [UInt8(n >> 8), UInt8(n & 0xFF)]
            records += p.attachment.prefix(Int(n))
        }
        return [.peers(entries.map(\.0.peer)), .bytes(records)]
    }

    /// Reads the peers and records sections of a message (the first of each). Every record must
    /// be whole, at most `maxAttachment` bytes, one per peer; no more than `maxPeers` peers.
    static func decode(_ payload: [Payload], maxPeers: Int, maxAttachment: Int) throws(TrackerError) -> [(TrackerPeer, seconds: UInt16)] {
        var peers: [PeerAddress]?
        var records: [UInt8]?
        for p in payload {
            if case .peers(let v) = p, peers == nil { peers = v }
            if case .bytes(let v) = p, records == nil { records = v }
        }
        guard let peers, let records else { throw .badRequest("peers and records sections expected") }
        guard peers.count <= maxPeers else { throw .badRequest("\(peers.count) peers in one message, over \(maxPeers)") }
        var out: [(TrackerPeer, seconds: UInt16)] = []
        out.reserveCapacity(peers.count)
        var i = 0
        for peer in peers {
            guard records.count - i >= 4 else { throw .badRequest("records end before peer \(out.count + 1) of \(peers.count)") }
            let seconds = UInt16(records[i]) << 8 | UInt16(records[i + 1])
            let n = Int(UInt16(records[i + 2]) << 8 | UInt16(records[i + 3]))
            i += 4
            guard n <= maxAttachment else { throw .badRequest("an attachment of \(n) bytes, over \(maxAttachment)") }
            guard records.count - i >= n else { throw .badRequest("an attachment of \(n) bytes with \(records.count - i) left") }
            out.append((TrackerPeer(peer: peer, attachment: Array(records[i..<i + n])), seconds))
            i += n
        }
        guard i == records.count else { throw .badRequest("\(records.count - i) bytes after the last record") }
        return out
    }

    /// The byte sections of a message, in order.
    static func byteSections(_ payload: [Payload]) -> [[UInt8]] {
        payload.compactMap { if case .bytes(let b) = $0 { b } else { nil } }
    }

    /// The single key a tracker request names.
    static func key(_ request: Message) throws(TrackerError) -> Number160 {
        guard let keys = request.firstKeys, keys.count == 1, let key = keys.first else { throw .badRequest("one key expected") }
        return key
    }

    /// An optional filter: empty bytes mean none.
    static func filter(_ bytes: [UInt8]?) throws(TrackerError) -> KnownPeersFilter? {
        guard let bytes, !bytes.isEmpty else { return nil }
        return try KnownPeersFilter(decoding: bytes)
    }
}
