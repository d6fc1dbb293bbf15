import Crypto
import Foundation
#if canImport(CCryptoBoringSSL)
import CCryptoBoringSSL
#endif

/// The AEAD every sealed packet uses: AES-256-GCM, 12-byte nonce, 16-byte tag.
///
/// Called once per packet each way, so it is the session layer's hot path. swift-crypto's public
/// `AES.GCM` costs about 1.2 µs a call here, most of it in its wrappers (`Data` and `SealedBox`
/// allocations, a `SymmetricKey` per call, generic dispatch), not in AES. BoringSSL is the engine
/// under swift-crypto; when its module is visible (it is whenever swift-crypto is built from
/// source, as SwiftPM does) the cipher calls its EVP AEAD interface directly: a context on the
/// stack, sealing in place in the outgoing buffer and opening into the caller's buffer, no
/// allocation. Otherwise it falls back to the public API. Both produce the same bytes (tested).
enum SessionCipher {
    static let tagBytes = 16

    /// Encrypts `length` bytes at `text` in place and writes the tag to `tag`.
    static func seal(key: SessionKey, nonce: UnsafeRawBufferPointer, ad: UnsafeRawBufferPointer,
                     text: UnsafeMutableRawPointer, length: Int, tag: UnsafeMutableRawPointer) -> Bool {
        #if canImport(CCryptoBoringSSL)
        return withContext(key) { ctx in
            var tagLength = 0
            let bytes = text.assumingMemoryBound(to: UInt8.self)
            return CCryptoBoringSSL_EVP_AEAD_CTX_seal_scatter(
                ctx, bytes, tag.assumingMemoryBound(to: UInt8.self), &tagLength, tagBytes,
                nonce.bytes, nonce.count, bytes, length, nil, 0,
                ad.bytes, ad.count) == 1 && tagLength == tagBytes
        }
        #else
        do {
            let box = try AES.GCM.seal(UnsafeRawBufferPointer(start: text, count: length), using: key.symmetric,
                                       nonce: try AES.GCM.Nonce(data: nonce), authenticating: ad)
            box.ciphertext.withUnsafeBytes { text.copyMemory(from: $0.baseAddress!, byteCount: length) }
            box.tag.withUnsafeBytes { tag.copyMemory(from: $0.baseAddress!, byteCount: tagBytes) }
            return true
        } catch {
            return false
        }
        #endif
    }

    /// Decrypts `ciphertext` into `out` (at least as long) if `tag` authenticates it with `ad`.
    static func open(key: SessionKey, nonce: UnsafeRawBufferPointer, ad: UnsafeRawBufferPointer, ciphertext: UnsafeRawBufferPointer,
                     tag: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) -> Bool {
        guard tag.count == tagBytes, out.count >= ciphertext.count else { return false }
        #if canImport(CCryptoBoringSSL)
        return withContext(key) { ctx in
            CCryptoBoringSSL_EVP_AEAD_CTX_open_gather(
                ctx, out.baseAddress?.assumingMemoryBound(to: UInt8.self), nonce.bytes, nonce.count,
                ciphertext.bytes, ciphertext.count, tag.bytes, tag.count,
                ad.bytes, ad.count) == 1
        }
        #else
        do {
            let box = try AES.GCM.SealedBox(nonce: try AES.GCM.Nonce(data: nonce), ciphertext: ciphertext, tag: tag)
            let plain = try AES.GCM.open(box, using: key.symmetric, authenticating: ad)
            plain.withUnsafeBytes { out.copyMemory(from: $0) }
            return true
        } catch {
            return false
        }
        #endif
    }
}

#if canImport(CCryptoBoringSSL)
extension SessionCipher {
    /// An AES-256-GCM context for `key` on the stack, for one call (set up per call: a context
    /// per session would cost each ~600 bytes, and thousands of sessions live in a simulation).
    private static func withContext(_ key: SessionKey, _ body: (UnsafeMutablePointer<EVP_AEAD_CTX>) -> Bool) -> Bool {
        key.withBytes { k in
            var ctx = EVP_AEAD_CTX()
            guard CCryptoBoringSSL_EVP_AEAD_CTX_init(&ctx, CCryptoBoringSSL_EVP_aead_aes_256_gcm(), k.bytes, 32, tagBytes, nil) == 1 else {
                return false
            }
            defer { CCryptoBoringSSL_EVP_AEAD_CTX_cleanup(&ctx) }
            return body(&ctx)
        }
    }
}
#endif

extension UnsafeRawBufferPointer {
    /// The bytes as C wants them (never null: BoringSSL asserts pointers even for zero lengths).
    var bytes: UnsafePointer<UInt8> {
        (baseAddress ?? UnsafeRawPointer(SessionCipher.empty)).assumingMemoryBound(to: UInt8.self)
    }
}

extension SessionCipher {
    /// Somewhere for an empty buffer to point.
    nonisolated(unsafe) static let empty = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
}

extension SessionKey {
    func withBytes<T>(_ body: (UnsafeRawBufferPointer) -> T) -> T {
        withUnsafeBytes(of: self) { body($0) }
    }
}
