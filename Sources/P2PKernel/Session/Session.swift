import Crypto
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

    /// The key as swift-crypto's public API wants it (the fallback path only).
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
/// send counter, and the replay window for datagrams (128 bytes; the rarer parts — a TCP window,
/// an initiator's FINISH header until it is confirmed — live beside it in `SessionTable`).
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
    /// Uptime seconds at the last packet either way; the least recently used session goes first.
    var lastUsed: UInt32
    let sendKey: SessionKey
    let receiveKey: SessionKey
    var sendCounter: UInt64 = 0
    var udpWindow = ReplayWindow()

    init(localIndex: UInt64, remoteIndex: UInt64, remoteID: Number160, sendKey: SessionKey, receiveKey: SessionKey, lastUsed: UInt32) {
        self.localIndex = localIndex
        self.remoteIndex = remoteIndex
        self.remoteID = remoteID
        self.lastUsed = lastUsed
        self.sendKey = sendKey
        self.receiveKey = receiveKey
    }

    /// Bytes a sealed packet of `plaintextBytes` takes, in a FINISH when `finish`.
    static func sealedSize(_ plaintextBytes: Int, finish: Bool) -> Int {
        (finish ? SessionWire.finishHeaderBytes : SessionWire.sealedHeaderBytes) + plaintextBytes + SessionWire.tagBytes
    }

    /// Appends one sealed packet carrying `plaintext` to `out`: the header (the FINISH header
    /// `finishPrefix` while the initiator's session is unconfirmed), the plaintext encrypted in
    /// place, the tag.
    mutating func seal(_ plaintext: ByteBuffer, transport: TransportKind, finishPrefix: [UInt8]? = nil, into out: inout ByteBuffer) -> Bool {
        let counter = sendCounter
        sendCounter += 1
        let headerStart = out.writerIndex - out.readerIndex
        if let finishPrefix {
            out.writeBytes(finishPrefix)
        } else {
            out.writeInteger(PacketKind.sealed.rawValue)
            out.writeInteger(remoteIndex)
        }
        out.writeInteger(counter)
        let bodyStart = out.writerIndex - out.readerIndex
        let length = plaintext.readableBytes
        out.writeImmutableBuffer(plaintext)
        out.writeRepeatingByte(0, count: SessionWire.tagBytes)
        let key = sendKey
        return out.withUnsafeMutableReadableBytes { all in
            guard let base = all.baseAddress else { return false }
            return Session.withNonce(counter, transport) { nonce in
                SessionCipher.seal(key: key, nonce: nonce, ad: UnsafeRawBufferPointer(start: base + headerStart, count: bodyStart - headerStart),
                                   text: base + bodyStart, length: length, tag: base + bodyStart + length)
            }
        }
    }

    /// Decrypts a sealed body into `out` and returns the plaintext's length, or nil if it does
    /// not authenticate. `packet` is the whole packet: its first `headerBytes` are the
    /// authenticated header, then ciphertext and tag. Replay checks are the caller's.
    func decrypt(_ packet: UnsafeRawBufferPointer, headerBytes: Int, counter: UInt64, transport: TransportKind,
                 into out: UnsafeMutableRawBufferPointer) -> Int? {
        let tagStart = packet.count - SessionWire.tagBytes
        guard headerBytes <= tagStart, out.count >= tagStart - headerBytes else { return nil }
        let key = receiveKey
        let ok = Session.withNonce(counter, transport) { nonce in
            SessionCipher.open(key: key, nonce: nonce, ad: UnsafeRawBufferPointer(rebasing: packet[..<headerBytes]),
                               ciphertext: UnsafeRawBufferPointer(rebasing: packet[headerBytes..<tagStart]),
                               tag: UnsafeRawBufferPointer(rebasing: packet[tagStart...]), into: out)
        }
        return ok ? tagStart - headerBytes : nil
    }

    /// Checks the window, decrypts, and marks the counter: for a single session held outside a
    /// table (a FINISH being accepted; tools and tests). `window` is the transport's.
    func open(_ packet: UnsafeRawBufferPointer, headerBytes: Int, counter: UInt64, transport: TransportKind,
              window: inout ReplayWindow, into out: UnsafeMutableRawBufferPointer) throws(OpenError) -> Int {
        guard window.canAccept(counter) else { throw .replayed }
        guard let n = decrypt(packet, headerBytes: headerBytes, counter: counter, transport: transport, into: out) else {
            throw .authenticationFailed
        }
        window.mark(counter)
        return n
    }

    /// The 12-byte nonce on the stack: three big-endian words, the transport in the top byte of the
    /// first, then the counter.
    @inline(__always)
    private static func withNonce(_ counter: UInt64, _ transport: TransportKind, _ body: (UnsafeRawBufferPointer) -> Bool) -> Bool {
        var n: (UInt32, UInt32, UInt32) = ((UInt32(transport == .udp ? 0 : 1) << 24).bigEndian,
                                           UInt32(truncatingIfNeeded: counter >> 32).bigEndian,
                                           UInt32(truncatingIfNeeded: counter).bigEndian)
        return withUnsafeBytes(of: &n) { body($0) }
    }
}
