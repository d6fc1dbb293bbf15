import P2PKernel

/// How storage requests and results travel inside kernel messages (docs/DHT.md).
///
/// Request: `integer(header)`, then sections by operation, then the writer proof when the header
/// says so. The header packs the operation (bits 0–7), flags (bits 8–15: 1 ifAbsent,
/// 2 returnValues, 4 descending, 8 protectDomain, 16 signed by a writer) and the query kind
/// (bits 16–23: 0 keys, 1 range, 2 latest). Values travel in a data map, each value prefixed with
/// its metadata: `u32 ttl, u8 flags (1 prepared, 2 protectEntry, 4 signed, 8 remaining,
/// 16 stamped, 32 removal), [u32 remaining seconds], [u64 version stamp], u16 n, n × 20-byte
/// basedOn, [32-byte signer, 64-byte signature], bytes` (a removal has no bytes).
public enum StorageCodec {
    enum Op: UInt8 { case put = 1, get, remove, digest, confirm, putMeta, transferDomain }
    enum QueryKind: UInt8 { case keys = 0, range, latest }
    enum ResultKind: Int64 { case statuses = 1, values, digest, refused }

    static let ifAbsent: Int64 = 1, returnValues: Int64 = 2, descending: Int64 = 4, protectDomain: Int64 = 8, signed: Int64 = 16
    static let knownFlags = ifAbsent | returnValues | descending | protectDomain | signed
    /// Metadata bytes before a value at least: ttl, flags, basedOn count.
    static let valueHeader = 7
    static let prepared: UInt8 = 1, protectEntry: UInt8 = 2, hasSignature: UInt8 = 4, hasRemaining: UInt8 = 8
    static let hasStamp: UInt8 = 16, tombstone: UInt8 = 32
    static let knownValueFlags = prepared | protectEntry | hasSignature | hasRemaining | hasStamp | tombstone

    // MARK: values

    public static func encode(_ v: StoredValue) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(valueHeader + 12 + v.basedOn.count * 20 + 96 + v.value.count)
        append(v.ttlSeconds, to: &out)
        var flags: UInt8 = v.prepared ? prepared : 0
        if v.protectEntry { flags |= protectEntry }
        if v.signature != nil { flags |= hasSignature }
        if v.remainingSeconds != nil { flags |= hasRemaining }
        if v.stamp != 0 { flags |= hasStamp }
        if v.isTombstone { flags |= tombstone }
        out.append(flags)
        if let r = v.remainingSeconds { append(r, to: &out) }
        if v.stamp != 0 { append(v.stamp, to: &out) }
        let n = UInt16(min(v.basedOn.count, Int(UInt16.max)))
        out.append(UInt8(n >> 8))
        out.append(UInt8(n & 0xFF))
        for b in v.basedOn.prefix(Int(n)) { out.append(contentsOf: b.bytes) }
        if let s = v.signature {
            out.append(contentsOf: s.signer.bytes)
            out.append(contentsOf: s.signature)
        }
        out.append(contentsOf: v.value)
        return out
    }

    public static func decodeValue(_ bytes: [UInt8]) throws(StorageError) -> StoredValue {
        guard bytes.count >= valueHeader else { throw .malformed("value of \(bytes.count) bytes is shorter than its \(valueHeader)-byte header") }
        let ttl = u32(bytes, 0)
        let flags = bytes[4]
        guard flags & ~knownValueFlags == 0 else {
            throw .malformed("unknown value flags 0x\(String(flags, radix: 16))")
        }
        var at = 5
        var remaining: UInt32?
        if flags & hasRemaining != 0 {
            guard bytes.count >= at + 4 + 2 else { throw .malformed("value too short for its remaining time") }
            remaining = u32(bytes, at)
            at += 4
        }
        var stamp: UInt64 = 0
        if flags & hasStamp != 0 {
            guard bytes.count >= at + 8 + 2 else { throw .malformed("value too short for its version stamp") }
            stamp = bytes[at..<at + 8].reduce(0) { $0 << 8 | UInt64($1) }
            guard stamp != 0 else { throw .malformed("a version stamp of 0 is sent as none") }
            at += 8
        }
        let n = Int(bytes[at]) << 8 | Int(bytes[at + 1])
        at += 2
        let signatureBytes = flags & hasSignature != 0 ? 96 : 0
        guard at + n * 20 + signatureBytes <= bytes.count else {
            throw .malformed("value claims \(n) basedOn keys\(signatureBytes > 0 ? " and a signature" : "") but has \(bytes.count) bytes")
        }
        var based: [Number160] = []
        based.reserveCapacity(n)
        for _ in 0..<n {
            guard let k = Number160(bytes: bytes[at..<at + 20]) else { throw .malformed("basedOn key") }
            based.append(k)
            at += 20
        }
        var signature: ValueSignature?
        if signatureBytes > 0 {
            guard let key = SignerKey(bytes: Array(bytes[at..<at + 32])) else { throw .malformed("a value's signer is no Ed25519 public key") }
            signature = ValueSignature(signer: key, signature: Array(bytes[at + 32..<at + 96]))
            at += 96
        }
        guard flags & protectEntry == 0 || signature != nil else { throw .malformed("entry protection needs a signed value") }
        var v = StoredValue(Array(bytes[at...]), ttlSeconds: ttl, basedOn: based, prepared: flags & prepared != 0,
                            protectEntry: flags & protectEntry != 0, signature: signature)
        v.remainingSeconds = remaining
        v.stamp = stamp
        if flags & tombstone != 0 {
            guard v.value.isEmpty, !v.prepared else { throw .malformed("a removal carries no bytes and is not prepared") }
            v.isTombstone = true
        }
        return v
    }

    // MARK: requests

    /// The request's sections; a writer proof goes last and sets the signed flag.
    public static func encode(_ request: StorageRequest, proof: WriterProof? = nil) -> [Payload] {
        var sections = encodeSections(request, extraFlags: proof == nil ? 0 : signed)
        if let proof { sections.append(.bytes(proof.bytes)) }
        return sections
    }

    private static func encodeSections(_ request: StorageRequest, extraFlags: Int64) -> [Payload] {
        func header(_ op: Op, _ flags: Int64 = 0, _ kind: QueryKind = .keys) -> Payload {
            .integer(Int64(op.rawValue) | (flags | extraFlags) << 8 | Int64(kind.rawValue) << 16)
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
            let flags = (mode.contains(.ifAbsent) ? ifAbsent : 0) | (mode.contains(.protectDomain) ? protectDomain : 0)
            return [header(.put, flags),
                    .dataMap(entries.sorted { $0.key < $1.key }.map { DataEntry(key: $0.key, value: encode($0.value)) })]
        case .get(let q): return query(.get, q)
        case .digest(let q): return query(.digest, q)
        case .remove(let q, let values): return query(.remove, q, values ? returnValues : 0)
        case .confirm(let keys): return [header(.confirm), .keys640(keys)]
        case .putMeta(let keys, let ttl, let signatures):
            return [header(.putMeta), .keys640(keys), .integer(Int64(ttl)),
                    .dataMap(signatures.sorted { $0.key < $1.key }.map { DataEntry(key: $0.key, value: $0.value.signer.bytes + $0.value.signature) })]
        case .transferDomain(let location, let domain, let to):
            return [header(.transferDomain), .keys640([Number640(location: location, domain: domain)]), .bytes(to.bytes)]
        }
    }

    /// The bytes a writer proof signs: every section of the request (the signed flag excluded),
    /// each tagged and length-prefixed, so no two requests share them.
    public static func canonicalBytes(_ request: StorageRequest) -> [UInt8] {
        var out: [UInt8] = []
        for section in encodeSections(request, extraFlags: 0) {
            out.append(section.tag)
            switch section {
            case .integer(let i): append(UInt64(bitPattern: i), to: &out)
            case .bytes(let b):
                append(UInt32(b.count), to: &out)
                out.append(contentsOf: b)
            case .keys640(let keys):
                append(UInt32(keys.count), to: &out)
                for k in keys { for part in [k.location, k.domain, k.content, k.version] { out.append(contentsOf: part.bytes) } }
            case .dataMap(let entries):
                append(UInt32(entries.count), to: &out)
                for e in entries {
                    for part in [e.key.location, e.key.domain, e.key.content, e.key.version] { out.append(contentsOf: part.bytes) }
                    append(UInt32(e.value.count), to: &out)
                    out.append(contentsOf: e.value)
                }
            case .keys(let keys):
                append(UInt32(keys.count), to: &out)
                for k in keys { out.append(contentsOf: k.bytes) }
            case .peers: break  // storage requests carry no peers
            }
        }
        return out
    }

    /// A request and its writer proof (nil when unsigned).
    public static func decodeRequest(_ payload: [Payload]) throws(StorageError) -> StorageRequest {
        try decodeSignedRequest(payload).request
    }

    /// A request and its writer proof. A request naming more than `maxEntries` entries (values
    /// or keys) is refused before any of them is decoded.
    public static func decodeSignedRequest(_ payload: [Payload], maxEntries: Int = .max) throws(StorageError) -> (request: StorageRequest, proof: WriterProof?) {
        guard case .integer(let h)? = payload.first, h >= 0 else { throw .malformed("missing request header") }
        guard let op = Op(rawValue: UInt8(truncatingIfNeeded: h)) else { throw .malformed("unknown storage operation \(h & 0xFF)") }
        let flags = h >> 8 & 0xFF
        guard flags & ~knownFlags == 0 else { throw .malformed("unknown request flags 0x\(String(flags, radix: 16))") }
        guard let kind = QueryKind(rawValue: UInt8(truncatingIfNeeded: h >> 16)), h >> 24 == 0 else {
            throw .malformed("unknown query kind \(h >> 16)")
        }
        var payload = payload
        var proof: WriterProof?
        if flags & signed != 0 {
            guard case .bytes(let b)? = payload.last, let p = WriterProof(bytes: b) else {
                throw .malformed("a signed request needs a \(WriterProof.byteCount)-byte writer proof as its last section")
            }
            proof = p
            payload.removeLast()
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
        if payload.count > 1 {
            let named: Int
            switch payload[1] {
            case .dataMap(let m): named = m.count
            case .keys640(let k): named = k.count
            default: named = 0
            }
            guard named <= maxEntries else { throw .requestTooLarge(entries: named, limit: maxEntries) }
        }
        let request: StorageRequest
        switch op {
        case .put:
            guard payload.count > 1, case .dataMap(let entries) = payload[1] else { throw .malformed("put without values") }
            var map: [Number640: StoredValue] = [:]
            map.reserveCapacity(entries.count)
            for e in entries { map[e.key] = try decodeValue(e.value) }
            var mode = PutMode.overwrite
            if flags & ifAbsent != 0 { mode.insert(.ifAbsent) }
            if flags & protectDomain != 0 { mode.insert(.protectDomain) }
            request = .put(map, mode: mode)
        case .get: request = .get(try query())
        case .digest: request = .digest(try query())
        case .remove: request = .remove(try query(), returnValues: flags & returnValues != 0)
        case .confirm: request = .confirm(try keys(1))
        case .putMeta:
            guard payload.count > 3, case .integer(let ttl) = payload[2], let t = UInt32(exactly: ttl), case .dataMap(let sigs) = payload[3] else {
                throw .malformed("putMeta needs keys, a TTL from 0 to \(UInt32.max) and a signature map")
            }
            var signatures: [Number640: ValueSignature] = [:]
            for e in sigs {
                guard e.value.count == 96, let key = SignerKey(bytes: Array(e.value[0..<32])) else {
                    throw .malformed("a putMeta signature is a 32-byte key and 64 signature bytes")
                }
                signatures[e.key] = ValueSignature(signer: key, signature: Array(e.value[32...]))
            }
            request = .putMeta(try keys(1), ttlSeconds: t, signatures: signatures)
        case .transferDomain:
            let k = try keys(1)
            guard k.count == 1, payload.count > 2, case .bytes(let b) = payload[2], let to = SignerKey(bytes: b) else {
                throw .malformed("transferDomain needs one key and the new owner's 32-byte public key")
            }
            request = .transferDomain(location: k[0].location, domain: k[0].domain, to: to)
        }
        return (request, proof)
    }

    // MARK: results

    public static func encode(_ result: StorageResult) -> [Payload] {
        switch result {
        case .statuses(let s, let resumeAfter):
            let sorted = s.sorted { $0.key < $1.key }
            var out: [Payload] = [.integer(ResultKind.statuses.rawValue), .keys640(sorted.map(\.key)), .bytes(sorted.map(\.value.rawValue))]
            if let resumeAfter { out.append(.keys640([resumeAfter])) }
            return out
        case .values(let v, let resumeAfter):
            var out: [Payload] = [.integer(ResultKind.values.rawValue), .dataMap(v.sorted { $0.key < $1.key }.map { DataEntry(key: $0.key, value: encode($0.value)) })]
            if let resumeAfter { out.append(.keys640([resumeAfter])) }
            return out
        case .digest(let d):
            return [.integer(ResultKind.digest.rawValue),
                    .dataMap(d.sorted { $0.key < $1.key }.map { DataEntry(key: $0.key, value: $0.value.flatMap(\.bytes)) })]
        }
    }

    /// A refusal as an answer: the asker decodes the same typed error.
    public static func encode(refusal e: StorageError) -> [Payload] {
        var code: Int64 = 0, a: Int64 = 0, b: Int64 = 0
        var key: [Number640] = [], owner: [UInt8] = [], text = ""
        switch e {
        case .valueTooLarge(let x, let y): (code, a, b) = (1, Int64(x), Int64(y))
        case .storageFull(let x, let y): (code, a, b) = (2, Int64(x), Int64(y))
        case .tooManyEntries(let l, let y): (code, b, key) = (3, Int64(y), [Number640(location: l)])
        case .entryLimit(let y): (code, b) = (4, Int64(y))
        case .tooManyBasedOn(let x, let y): (code, a, b) = (5, Int64(x), Int64(y))
        case .requestTooLarge(let x, let y): (code, a, b) = (15, Int64(x), Int64(y))
        case .unknownDomain(let d): (code, key) = (6, [Number640(location: .zero, domain: d)])
        case .denied(let r): (code, text) = (7, r)
        case .protected(let k, let o, let d): (code, key, owner, a) = (8, [k], o.bytes, d ? 1 : 0)
        case .badSignature(let k): (code, key) = (9, [k])
        case .badWriterProof(let r): (code, text) = (10, r)
        case .quotaExceeded(let w, let x, let y): (code, owner, a, b) = (11, w.bytes, Int64(x), Int64(y))
        case .malformed(let r): (code, text) = (12, r)
        case .noBackend: code = 13
        case .busy(let r): (code, text) = (14, r)
        case .backendFailed(let r): (code, text) = (16, r)
        }
        return [.integer(ResultKind.refused.rawValue), .integer(code), .integer(a), .integer(b), .keys640(key), .bytes(owner),
                .bytes(Array(text.utf8.prefix(maxRefusalText)))]
    }

    /// Whether an answer is a refusal (result kind 4).
    public static func isRefusal(_ payload: [Payload]) -> Bool {
        if case .integer(ResultKind.refused.rawValue)? = payload.first { return true }
        return false
    }

    /// Longest reason text kept from a remote refusal.
    static let maxRefusalText = 512

    /// A result; a refusal is thrown as the typed `StorageError` the answering peer gave.
    public static func decodeResult(_ payload: [Payload]) throws(StorageError) -> StorageResult {
        guard case .integer(let k)? = payload.first, let kind = ResultKind(rawValue: k) else { throw .malformed("missing result kind") }
        switch kind {
        case .statuses:
            guard payload.count == 3 || payload.count == 4, case .keys640(let keys) = payload[1], case .bytes(let codes) = payload[2],
                  keys.count == codes.count else {
                throw .malformed("statuses need as many codes as keys")
            }
            var out: [Number640: StorageStatus] = [:]
            for (key, code) in zip(keys, codes) {
                guard let s = StorageStatus(rawValue: code) else { throw .malformed("unknown status \(code)") }
                out[key] = s
            }
            return .statuses(out, resumeAfter: try continuation(payload, at: 3))
        case .values:
            guard payload.count == 2 || payload.count == 3, case .dataMap(let entries) = payload[1] else { throw .malformed("values need a data map") }
            var out: [Number640: StoredValue] = [:]
            for e in entries { out[e.key] = try decodeValue(e.value) }
            return .values(out, resumeAfter: try continuation(payload, at: 2))
        case .digest:
            guard payload.count == 2, case .dataMap(let entries) = payload[1] else { throw .malformed("a digest needs a data map") }
            var out: [Number640: [Number160]] = [:]
            for e in entries {
                guard e.value.count % 20 == 0 else { throw .malformed("basedOn list of \(e.value.count) bytes") }
                out[e.key] = stride(from: 0, to: e.value.count, by: 20).compactMap { Number160(bytes: e.value[$0..<$0 + 20]) }
            }
            return .digest(out)
        case .refused:
            throw refusal(payload)
        }
    }

    /// The optional continuation key at `index` of a result.
    private static func continuation(_ payload: [Payload], at index: Int) throws(StorageError) -> Number640? {
        guard payload.count > index else { return nil }
        guard case .keys640(let k) = payload[index], k.count == 1 else { throw .malformed("a continuation is one key") }
        return k[0]
    }

    private static func refusal(_ p: [Payload]) -> StorageError {
        guard p.count == 7, case .integer(let code) = p[1], case .integer(let a) = p[2], case .integer(let b) = p[3],
              case .keys640(let keys) = p[4], case .bytes(let owner) = p[5], case .bytes(let textBytes) = p[6] else {
            return .malformed("a refusal of the wrong shape")
        }
        let text = String(decoding: textBytes.prefix(maxRefusalText), as: UTF8.self)
        let x = Int(clamping: a), y = Int(clamping: b)
        switch code {
        case 1: return .valueTooLarge(bytes: x, limit: y)
        case 2: return .storageFull(bytes: x, limit: y)
        case 3: return .tooManyEntries(location: keys.first?.location ?? .zero, limit: y)
        case 4: return .entryLimit(limit: y)
        case 5: return .tooManyBasedOn(count: x, limit: y)
        case 15: return .requestTooLarge(entries: x, limit: y)
        case 6: return .unknownDomain(keys.first?.domain ?? .zero)
        case 7: return .denied(text)
        case 8:
            guard let k = keys.first, let o = SignerKey(bytes: owner) else { return .malformed("a protection refusal without key and owner") }
            return .protected(key: k, owner: o, domain: a != 0)
        case 9: return keys.first.map { .badSignature($0) } ?? .malformed("a signature refusal without key")
        case 10: return .badWriterProof(text)
        case 11:
            guard let w = SignerKey(bytes: owner) else { return .malformed("a quota refusal without writer") }
            return .quotaExceeded(writer: w, bytes: x, limit: y)
        case 12: return .malformed(text)
        case 13: return .noBackend
        case 14: return .busy(text)
        case 16: return .backendFailed(text)
        default: return .denied("refused (code \(code)): \(text)")
        }
    }

    // MARK: helpers

    static func append(_ v: UInt32, to out: inout [UInt8]) {
        out.append(contentsOf: [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)])
    }

    static func append(_ v: UInt64, to out: inout [UInt8]) {
        for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(v >> UInt64(shift) & 0xFF)) }
    }

    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) << 24 | UInt32(b[at + 1]) << 16 | UInt32(b[at + 2]) << 8 | UInt32(b[at + 3])
    }
}
