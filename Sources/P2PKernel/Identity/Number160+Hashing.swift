import Crypto

extension Number160 {
    /// SHA-1 of the bytes, as TomP2P's `Utils.makeSHAHash(byte[])`.
    public init(sha1Of bytes: [UInt8]) {
        let digest = Insecure.SHA1.hash(data: bytes)
        // A SHA-1 digest is always 20 bytes, so this cannot fail.
        self = digest.withUnsafeBytes { Number160(bytes: $0) } ?? .zero
    }

    /// SHA-1 of the string's UTF-8 bytes, as TomP2P's `Number160.createHash(String)`.
    public init(hashing string: String) {
        self.init(sha1Of: Array(string.utf8))
    }
}
