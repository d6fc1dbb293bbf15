import Crypto
import P2PKernel

/// An Ed25519 public key (32 bytes) that signs values or write requests: a user's key, which may
/// differ from the key of the peer that sends the request.
public struct SignerKey: Hashable, Sendable, CustomStringConvertible {
    /// The 32 raw bytes.
    public let bytes: [UInt8]

    /// Nil unless `bytes` is a 32-byte Ed25519 public key.
    public init?(bytes: [UInt8]) {
        guard bytes.count == 32, (try? Curve25519.Signing.PublicKey(rawRepresentation: bytes)) != nil else { return nil }
        self.bytes = bytes
    }

    public init(_ key: Curve25519.Signing.PublicKey) {
        self.bytes = Array(key.rawRepresentation)
    }

    /// The key's id as a peer id: SHA-1 of its 32 bytes. This is how owners are named, and the
    /// master-key rule compares a domain or content key with it.
    public var id: Number160 { Number160(sha1Of: bytes) }

    public var description: String { id.hexString }

    func isValid(_ signature: [UInt8], of message: [UInt8]) -> Bool {
        guard signature.count == 64, let key = try? Curve25519.Signing.PublicKey(rawRepresentation: bytes) else { return false }
        return key.isValidSignature(signature, for: message)
    }
}

/// A value's signature: by whom, and the 64 signature bytes.
public struct ValueSignature: Hashable, Sendable {
    public let signer: SignerKey
    public let signature: [UInt8]

    public init(signer: SignerKey, signature: [UInt8]) {
        self.signer = signer
        self.signature = signature
    }
}

extension StoredValue {
    /// What a value's signature covers: the key it is stored under (location, domain, content,
    /// version), its version stamp and whether it is a removal (so a replayed older version or a
    /// re-sent removed value loses to the newer one by the order itself), its TTL (counted from
    /// the stamp: it cannot be extended without the signer), whether it asks for entry
    /// protection, the versions it is based on, and SHA-256 of its bytes (so a large value is
    /// hashed once, not by Ed25519's two passes).
    /// Not covered: `prepared` (a phase of the put, not content) and `remainingSeconds`.
    public func signedBytes(at key: Number640) -> [UInt8] {
        var out: [UInt8] = Array("swiftp2p/value/2".utf8)
        out.reserveCapacity(out.count + 80 + 16 + basedOn.count * 20 + 32)
        for part in [key.location, key.domain, key.content, key.version] { out.append(contentsOf: part.bytes) }
        withUnsafeBytes(of: stamp.bigEndian) { out.append(contentsOf: $0) }
        out.append(isTombstone ? 1 : 0)
        withUnsafeBytes(of: ttlSeconds.bigEndian) { out.append(contentsOf: $0) }
        out.append(protectEntry ? 1 : 0)
        withUnsafeBytes(of: UInt16(truncatingIfNeeded: basedOn.count).bigEndian) { out.append(contentsOf: $0) }
        for b in basedOn { out.append(contentsOf: b.bytes) }
        out.append(contentsOf: SHA256.hash(data: value))
        return out
    }

    /// This value signed by `key` for storage under `storageKey`. An unstamped value is stamped
    /// first, with the machine's clock (a stamp of 0 would be older than any other version).
    public func signed(at storageKey: Number640, by key: Curve25519.Signing.PrivateKey) throws -> StoredValue {
        var v = self
        if v.stamp == 0 { v.stamp = Self.signingClock.next() }
        v.signature = ValueSignature(signer: SignerKey(key.publicKey), signature: Array(try key.signature(for: v.signedBytes(at: storageKey))))
        return v
    }

    /// Stamps values signed without one (`signed(at:by:)`).
    static let signingClock = VersionClock()

    /// Whether the value carries a signature that verifies for storage under `key`.
    public func verify(at key: Number640) -> Bool {
        guard let s = signature else { return false }
        return s.signer.isValid(s.signature, of: signedBytes(at: key))
    }
}

/// Proof that a write request comes from the holder of a key: an Ed25519 signature over the
/// whole request (every key and value in it, its mode) and a timestamp. Peers refuse a proof
/// whose timestamp lies outside their window, and one they have seen before, so a signed request
/// can neither be re-aimed at other keys nor replayed later.
public struct WriterProof: Hashable, Sendable {
    public let signer: SignerKey
    /// Unix time in milliseconds when it was signed.
    public let timestampMillis: UInt64
    public let signature: [UInt8]

    /// Bytes on the wire: key, timestamp, signature.
    public static let byteCount = 32 + 8 + 64

    public init(signer: SignerKey, timestampMillis: UInt64, signature: [UInt8]) {
        self.signer = signer
        self.timestampMillis = timestampMillis
        self.signature = signature
    }

    /// Signs `request` with `key` at `timestampMillis` (now by default).
    public init(signing request: StorageRequest, with key: Curve25519.Signing.PrivateKey,
                timestampMillis: UInt64 = WriterProof.nowMillis()) throws {
        self.signer = SignerKey(key.publicKey)
        self.timestampMillis = timestampMillis
        self.signature = Array(try key.signature(for: Self.message(request, timestampMillis: timestampMillis)))
    }

    /// Whether the signature covers `request` at this timestamp.
    public func verifies(_ request: StorageRequest) -> Bool {
        signer.isValid(signature, of: Self.message(request, timestampMillis: timestampMillis))
    }

    static func message(_ request: StorageRequest, timestampMillis: UInt64) -> [UInt8] {
        var out: [UInt8] = Array("swiftp2p/write/1".utf8)
        withUnsafeBytes(of: timestampMillis.bigEndian) { out.append(contentsOf: $0) }
        out.append(contentsOf: SHA256.hash(data: StorageCodec.canonicalBytes(request)))
        return out
    }

    public var bytes: [UInt8] {
        var out = signer.bytes
        withUnsafeBytes(of: timestampMillis.bigEndian) { out.append(contentsOf: $0) }
        out.append(contentsOf: signature)
        return out
    }

    public init?(bytes: [UInt8]) {
        guard bytes.count == Self.byteCount, let key = SignerKey(bytes: Array(bytes[0..<32])) else { return nil }
        signer = key
        timestampMillis = bytes[32..<40].reduce(0) { $0 << 8 | UInt64($1) }
        signature = Array(bytes[40...])
    }

    /// Wall-clock Unix time in milliseconds.
    public static func nowMillis() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec) * 1_000 + UInt64(ts.tv_nsec) / 1_000_000
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
