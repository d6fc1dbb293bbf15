import Crypto

/// An Ed25519 key pair identifying a peer; its id is SHA-1 of the 32-byte public key.
public struct PeerKeyPair: Sendable {
    /// The signing key (kept private to this process).
    public let privateKey: Curve25519.Signing.PrivateKey

    /// A fresh random key pair.
    public init() {
        self.privateKey = Curve25519.Signing.PrivateKey()
    }

    /// A key pair from a stored 32-byte private key.
    public init(rawPrivateKey: [UInt8]) throws {
        self.privateKey = try Curve25519.Signing.PrivateKey(rawRepresentation: rawPrivateKey)
    }

    /// The 32-byte public key.
    public var publicKey: [UInt8] { Array(privateKey.publicKey.rawRepresentation) }

    /// The peer id derived from the public key: SHA-1 of its 32 bytes.
    public var peerID: Number160 { Number160(sha1Of: publicKey) }

    /// Signs bytes; the signature is 64 bytes.
    public func sign(_ bytes: [UInt8]) throws -> [UInt8] {
        Array(try privateKey.signature(for: bytes))
    }

    /// Whether `signature` is a valid signature of `bytes` by `publicKey`.
    public static func verify(signature: [UInt8], of bytes: [UInt8], publicKey: [UInt8]) -> Bool {
        guard let key = try? Curve25519.Signing.PublicKey(rawRepresentation: publicKey) else { return false }
        return key.isValidSignature(signature, for: bytes)
    }
}
