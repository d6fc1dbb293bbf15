import P2PKernel

/// How storage requests and results travel inside kernel messages (docs/DHT.md).
///
/// Request: `integer(header)`, then sections by operation. The header packs the operation
/// (bits 0–7), flags (bits 8–15: 1 ifAbsent, 2 returnValues, 4 descending) and the query kind
/// (bits 16–23: 0 keys, 1 range, 2 latest). Values travel in a data map, each value prefixed with
/// its metadata: `u32 ttl, u8 flags (1 = prepared), u16 n, n × 20-byte basedOn, bytes`.
enum StorageCodec {
    enum Op: UInt8 { case put = 1, get, remove, digest, confirm, putMeta }
    enum QueryKind: UInt8 { case keys = 0, range, latest }
    enum ResultKind: Int64 { case statuses = 1, values, digest }

    static let ifAbsent: Int64 = 1, returnValues: Int64 = 2, descending: Int64 = 4
    /// Metadata bytes before a value: ttl, flags, basedOn count.
    static let valueHeader = 7

    // MARK: values

    static func encode(_ v: StoredValue) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(valueHeader + v.basedOn.count * 20 + v.value.count)
        out.append(contentsOf: [UInt8(v.ttlSeconds >> 24), UInt8(v.ttlSeconds >> 16 & 0xFF), UInt8(v.ttlSeconds >> 8 & 0xFF), UInt8(v.ttlSeconds & 0xFF)])
        out.append(v.prepared ? 1 : 0)
        let n = UInt16(min(v.basedOn.count, Int(UInt16.max)))
        out.append(UInt8(n >> 8))
        out.append(UInt8(n & 0xFF))
        for b in v.basedOn.prefix(Int(n)) { out.append(contentsOf: b.bytes) }
        out.append(contentsOf: v.value)
        return out
    }

    static func decodeValue(_ bytes: [UInt8]) throws(StorageError) -> StoredValue {
        guard bytes.count >= valueHeader else { throw .malformed("value of \(bytes.count) bytes is shorter than its \(valueHeader)-byte header") }
        let ttl = UInt32(bytes[0]) << 24 | UInt32(bytes[1]) << 16 | UInt32(bytes[2]) << 8 | UInt32(bytes[3])
        guard bytes[4] & ~1 == 0 else { throw .malformed("unknown value flags 0x\(String(bytes[4], radix: 16))") }
        let n = Int(bytes[5]) << 8 | Int(bytes[6])
        guard valueHeader + n * 20 <= bytes.count else { throw .malformed("value claims \(n) basedOn keys but has \(bytes.count) bytes") }
        var based: [Number160] = []
        based.reserveCapacity(n)
        for i in 0..<n {
            let at = valueHeader + i * 20
            guard let k = Number160(bytes: bytes[at..<at + 20]) else { throw .malformed("basedOn key") }
            based.append(k)
        }
        return StoredValue(Array(bytes[(valueHeader + n * 20)...]), ttlSeconds: ttl, basedOn: based, prepared: bytes[4] & 1 == 1)
    }

    // MARK: requests

    static func encode(_ request: StorageRequest) -> [Payload] {
        func header(_ op: Op, _ flags: Int64 = 0, _ kind: QueryKind = .keys) -> Payload {
            .integer(Int64(op.rawValue) | flags << 8 | Int64(kind.rawValue) << 16)
        }
        func query(_ op: Op, _ q: StorageQuery, _ flags: Int64 = 0) -> [Payload] {
            switch q {
            case .keys(let keys): return [header(op, flags, .keys), .keys640(keys)]
            case .range(let from, let to, let limit, let desc):
                return [header(op, flags | (desc ? descending : 0), .range), .keys640([from, to]), .integer(Int64(limit))]
            case .latest(let l, let d, let c):
                return [header(op, flags, .latest), .keys640([Number640(location: l, domain: d, content: c)])]
            }
        }
        switch request {
        case .put(let entries, let mode):
            return [header(.put, mode == .ifAbsent ? ifAbsent : 0),
                    .dataMap(entries.sorted { $0.key < $1.key }.map { DataEntry(key: $0.key, value: encode($0.value)) })]
        case .get(let q): return query(.get, q)
        case .digest(let q): return query(.digest, q)
        case .remove(let q, let values): return query(.remove, q, values ? returnValues : 0)
        case .confirm(let keys): return [header(.confirm), .keys640(keys)]
        case .putMeta(let keys, let ttl): return [header(.putMeta), .keys640(keys), .integer(Int64(ttl))]
        }
    }

    static func decodeRequest(_ payload: [Payload]) throws(StorageError) -> StorageRequest {
        guard case .integer(let h)? = payload.first, h >= 0 else { throw .malformed("missing request header") }
        guard let op = Op(rawValue: UInt8(truncatingIfNeeded: h)) else { throw .malformed("unknown storage operation \(h & 0xFF)") }
        let flags = h >> 8 & 0xFF
        guard let kind = QueryKind(rawValue: UInt8(truncatingIfNeeded: h >> 16)), h >> 24 == 0 else {
            throw .malformed("unknown query kind \(h >> 16)")
        }
        func keys(_ at: Int) throws(StorageError) -> [Number640] {
            guard payload.count > at, case .keys640(let k) = payload[at] else { throw .malformed("missing key section") }
            return k
        }
        func query() throws(StorageError) -> StorageQuery {
            let k = try keys(1)
            switch kind {
            case .keys: return .keys(k)
            case .range:
                guard k.count == 2, payload.count > 2, case .integer(let limit) = payload[2], limit > 0 else {
                    throw .malformed("a range needs from, to and a positive limit")
                }
                return .range(from: k[0], to: k[1], limit: Int(clamping: limit), descending: flags & descending != 0)
            case .latest:
                guard k.count == 1 else { throw .malformed("latest needs exactly one key") }
                return .latest(location: k[0].location, domain: k[0].domain, content: k[0].content)
            }
        }
        switch op {
        case .put:
            guard payload.count > 1, case .dataMap(let entries) = payload[1] else { throw .malformed("put without values") }
            var map: [Number640: StoredValue] = [:]
            for e in entries { map[e.key] = try decodeValue(e.value) }
            return .put(map, mode: flags & ifAbsent != 0 ? .ifAbsent : .overwrite)
        case .get: return .get(try query())
        case .digest: return .digest(try query())
        case .remove: return .remove(try query(), returnValues: flags & returnValues != 0)
        case .confirm: return .confirm(try keys(1))
        case .putMeta:
            guard payload.count > 2, case .integer(let ttl) = payload[2], let t = UInt32(exactly: ttl) else {
                throw .malformed("putMeta needs a TTL from 0 to \(UInt32.max)")
            }
            return .putMeta(try keys(1), ttlSeconds: t)
        }
    }

    // MARK: results

    static func encode(_ result: StorageResult) -> [Payload] {
        switch result {
        case .statuses(let s):
            let sorted = s.sorted { $0.key < $1.key }
            return [.integer(ResultKind.statuses.rawValue), .keys640(sorted.map(\.key)), .bytes(sorted.map(\.value.rawValue))]
        case .values(let v):
            return [.integer(ResultKind.values.rawValue), .dataMap(v.sorted { $0.key < $1.key }.map { DataEntry(key: $0.key, value: encode($0.value)) })]
        case .digest(let d):
            return [.integer(ResultKind.digest.rawValue),
                    .dataMap(d.sorted { $0.key < $1.key }.map { DataEntry(key: $0.key, value: $0.value.flatMap(\.bytes)) })]
        }
    }

    static func decodeResult(_ payload: [Payload]) throws(StorageError) -> StorageResult {
        guard case .integer(let k)? = payload.first, let kind = ResultKind(rawValue: k) else { throw .malformed("missing result kind") }
        switch kind {
        case .statuses:
            guard payload.count == 3, case .keys640(let keys) = payload[1], case .bytes(let codes) = payload[2], keys.count == codes.count else {
                throw .malformed("statuses need as many codes as keys")
            }
            var out: [Number640: StorageStatus] = [:]
            for (key, code) in zip(keys, codes) {
                guard let s = StorageStatus(rawValue: code) else { throw .malformed("unknown status \(code)") }
                out[key] = s
            }
            return .statuses(out)
        case .values:
            guard payload.count == 2, case .dataMap(let entries) = payload[1] else { throw .malformed("values need a data map") }
            var out: [Number640: StoredValue] = [:]
            for e in entries { out[e.key] = try decodeValue(e.value) }
            return .values(out)
        case .digest:
            guard payload.count == 2, case .dataMap(let entries) = payload[1] else { throw .malformed("a digest needs a data map") }
            var out: [Number640: [Number160]] = [:]
            for e in entries {
                guard e.value.count % 20 == 0 else { throw .malformed("basedOn list of \(e.value.count) bytes") }
                out[e.key] = stride(from: 0, to: e.value.count, by: 20).compactMap { Number160(bytes: e.value[$0..<$0 + 20]) }
            }
            return .digest(out)
        }
    }
}
