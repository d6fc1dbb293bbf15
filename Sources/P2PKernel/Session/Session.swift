import Crypto
import Foundation
import NIOCore

/// A 256-bit key held inline: a session keeps two of them without any heap storage (thousands of
/// sessions live in one process in simulations).
struct SessionKey: Sendable, Equatable {
    private var w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64

    /// The first 32 bytes of `bytes` (callers pass exactly 32).
    init(_ bytes: UnsafeRawBufferPointer) {
        w0 = bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self)
        w1 = bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
        w2 = bytes.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
        w3 = bytes.loadUnaligned(fromByteOffset: 24, as: UInt64.self)
    }

    /// The key as swift-crypto wants it (a short-lived copy per use).
    var symmetric: SymmetricKey {
        withUnsafeBytes(of: self) { SymmetricKey(data: $0) }
    }
}

/// Why a sealed packet was not accepted.
enum OpenError: Error, Equatable {
    /// Its counter was seen before or is older than the replay window.
    case replayed
    /// The tag did not verify: forged, corrupted, or sealed under other keys.
    case authenticationFailed
}

/// One authenticated session with a peer: per-direction AES-256-GCM keys from the handshake, a
/// send counter, and replay windows for what arrives.
///
/// Every packet's nonce is `transport (1 byte) · 0 0 0 · counter (8 bytes)`: one send counter per
/// direction makes nonces unique under a key, and the transport byte makes a datagram fail to
/// open if it is replayed into a TCP stream (which has its own window: TCP frames may lag far
/// behind datagrams of the same session).
struct Session {
    /// Our index: the peer puts it in every packet it sends us.
    let localIndex: UInt64
    /// The peer's index: we put it in every packet we send.
    let remoteIndex: UInt64
    /// The peer's proven id (SHA-1 of the Ed25519 key that signed the handshake).
    let remoteID: Number160
    let sendKey: SessionKey
    let receiveKey: SessionKey
    var sendCounter: UInt64 = 0
    var udpWindow = ReplayWindow()
    var tcpWindow = ReplayWindow()
    /// Uptime seconds at the last packet either way; the least recently used session goes first.
    var lastUsed: UInt32
    /// Until the responder has sent anything in this session, the initiator wraps every packet in
    /// a FINISH (this header, 146 bytes before the counter), so a lost FINISH costs nothing: the
    /// next packet carries it again. Nil once confirmed, and always for the responder.
    var finishPrefix: [UInt8]?

    var isConfirmed: Bool { finishPrefix == nil }

    /// Bytes a sealed packet of `plaintextBytes` takes now.
    func sealedSize(_ plaintextBytes: Int) -> Int {
        (finishPrefix == nil ? SessionWire.sealedHeaderBytes : SessionWire.finishHeaderBytes) + plaintextBytes + SessionWire.tagBytes
    }

    /// Appends one sealed packet carrying `plaintext` to `out`.
    mutating func seal(_ plaintext: UnsafeRawBufferPointer, transport: TransportKind, into out: inout ByteBuffer) throws {
        let counter = sendCounter
        sendCounter += 1
        let headerStart = out.writerIndex
        if let prefix = finishPrefix {
            out.writeBytes(prefix)
        } else {
            out.writeInteger(PacketKind.sealed.rawValue)
            out.writeInteger(remoteIndex)
        }
        out.writeInteger(counter)
        let box = try out.withUnsafeReadableBytes { all in
            let header = UnsafeRawBufferPointer(rebasing: all[(headerStart - out.readerIndex)...])
            return try Session.nonce(counter, transport) { nonce in
                try AES.GCM.seal(plaintext, using: sendKey.symmetric, nonce: nonce, authenticating: header)
            }
        }
        out.writeBytes(box.ciphertext)
        out.writeBytes(box.tag)
    }

    /// Opens a sealed body. `packet` is the whole packet; its first `headerBytes` are the
    /// authenticated header, the rest ciphertext and tag.
    mutating func open(_ packet: UnsafeRawBufferPointer, headerBytes: Int, counter: UInt64,
                       transport: TransportKind, now: UInt32) throws(OpenError) -> Data {
        let window = transport == .udp ? udpWindow : tcpWindow
        guard window.canAccept(counter) else { throw .replayed }
        let tagStart = packet.count - SessionWire.tagBytes
        guard headerBytes <= tagStart else { throw .authenticationFailed }
        let plaintext: Data
        do {
            plaintext = try Session.nonce(counter, transport) { nonce in
                let box = try AES.GCM.SealedBox(nonce: nonce,
                                                ciphertext: UnsafeRawBufferPointer(rebasing: packet[headerBytes..<tagStart]),
                                                tag: UnsafeRawBufferPointer(rebasing: packet[tagStart...]))
                return try AES.GCM.open(box, using: receiveKey.symmetric,
                                        authenticating: UnsafeRawBufferPointer(rebasing: packet[..<headerBytes]))
            }
        } catch {
            throw .authenticationFailed
        }
        if transport == .udp { udpWindow.mark(counter) } else { tcpWindow.mark(counter) }
        lastUsed = now
        return plaintext
    }

    private static func nonce<T>(_ counter: UInt64, _ transport: TransportKind, _ body: (AES.GCM.Nonce) throws -> T) throws -> T {
        // Three 32-bit words, big-endian: transport in the top byte of the first, then the counter.
        var n: (UInt32, UInt32, UInt32) = ((UInt32(transport == .udp ? 0 : 1) << 24).bigEndian,
                                           UInt32(truncatingIfNeeded: counter >> 32).bigEndian,
                                           UInt32(truncatingIfNeeded: counter).bigEndian)
        return try withUnsafeBytes(of: &n) { try body(AES.GCM.Nonce(data: $0)) }
    }
}
