import Crypto
import Foundation

/// Why a handshake did not produce a session.
public enum HandshakeError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A key or signature did not verify.
    case badSignature
    /// A public key was malformed or a weak point (the key agreement refused it).
    case badKey
    /// The responder proved an id other than the one asked for.
    case identityMismatch(expected: Number160, got: Number160)
    /// A FINISH whose cookie is not one this node issued in the last two epochs.
    case staleCookie

    public var description: String {
        switch self {
        case .badSignature: "handshake signature does not verify"
        case .badKey: "handshake key is malformed"
        case .identityMismatch(let e, let g): "expected peer \(e.hexString.prefix(10))…, but the peer proved id \(g.hexString.prefix(10))…"
        case .staleCookie: "handshake cookie expired or was not issued here"
        }
    }
}

/// The cryptography both sides share: transcript hashes and key derivation.
///
/// ```
/// T1 = SHA-256("SwiftP2P handshake v1" · network · eI · iI · eR · iR · sR)   signed by the responder
/// T2 = SHA-256(T1 · sI)                                                     signed by the initiator
/// kI→R · kR→I = HKDF-SHA256(ikm: X25519(eI, eR), salt: T2, info: "SwiftP2P session keys v1", 64 bytes)
/// ```
/// Salting the keys with T2 binds them to both identities: a man in the middle who swaps the
/// initiator's identity for its own gets keys that open nothing the initiator sealed.
enum HandshakeCrypto {
    static let label = Array("SwiftP2P handshake v1".utf8)
    static let keyInfo = Array("SwiftP2P session keys v1".utf8)

    static func transcript1(network: UInt32, initiatorEphemeral: [UInt8], initiatorIndex: UInt64,
                            responderEphemeral: [UInt8], responderIndex: UInt64, responderIdentity: [UInt8]) -> [UInt8] {
        var h = SHA256()
        h.update(data: label)
        withUnsafeBytes(of: network.bigEndian) { h.update(data: $0) }
        h.update(data: initiatorEphemeral)
        withUnsafeBytes(of: initiatorIndex.bigEndian) { h.update(data: $0) }
        h.update(data: responderEphemeral)
        withUnsafeBytes(of: responderIndex.bigEndian) { h.update(data: $0) }
        h.update(data: responderIdentity)
        return Array(h.finalize())
    }

    static func transcript2(_ t1: [UInt8], initiatorIdentity: [UInt8]) -> [UInt8] {
        var h = SHA256()
        h.update(data: t1)
        h.update(data: initiatorIdentity)
        return Array(h.finalize())
    }

    /// Both directions' keys: (initiator → responder, responder → initiator).
    static func keys(_ ephemeral: Curve25519.KeyAgreement.PrivateKey, peerEphemeral: [UInt8],
                     t2: [UInt8]) throws(HandshakeError) -> (SessionKey, SessionKey) {
        let shared: SharedSecret
        do {
            let peer = try Curve25519.KeyAgreement.PublicKey(rawRepresentation: peerEphemeral)
            shared = try ephemeral.sharedSecretFromKeyAgreement(with: peer)
        } catch {
            throw .badKey
        }
        let okm = shared.hkdfDerivedSymmetricKey(using: SHA256.self, salt: t2, sharedInfo: keyInfo, outputByteCount: 64)
        return okm.withUnsafeBytes { raw in
            (SessionKey(UnsafeRawBufferPointer(rebasing: raw[0..<32])), SessionKey(UnsafeRawBufferPointer(rebasing: raw[32..<64])))
        }
    }

    static func verify(_ signature: [UInt8], of digest: [UInt8], by identity: [UInt8]) -> Bool {
        PeerKeyPair.verify(signature: signature, of: digest, publicKey: identity)
    }
}

/// Our side of a handshake we started: kept by the node until the RESPONSE arrives.
struct InitiatorHandshake {
    let ephemeral: Curve25519.KeyAgreement.PrivateKey
    let index: UInt64
    /// The id we expect; zero accepts whoever proves an id (a ping to an address).
    let expected: Number160
    /// The INIT we send (and send again when a datagram is lost).
    let initPacket: [UInt8]

    init(network: UInt32, index: UInt64, expected: Number160, random: RandomSource) {
        // From the node's source: the system's generator, or a simulation's seeded one.
        ephemeral = random.isSeeded ? ((try? Curve25519.KeyAgreement.PrivateKey(rawRepresentation: random.bytes(32))) ?? Curve25519.KeyAgreement.PrivateKey())
            : Curve25519.KeyAgreement.PrivateKey()
        self.index = index
        self.expected = expected
        initPacket = SessionCodec.encode(HandshakeInit(networkID: network, ephemeral: Array(ephemeral.publicKey.rawRepresentation),
                                                       initiatorIndex: index, responderHint: expected))
    }

    /// Checks the responder's proof and returns the session and the FINISH header its packets
    /// carry until the responder has answered in it.
    func complete(_ r: HandshakeResponse, network: UInt32, identity: PeerKeyPair, now: UInt32) throws(HandshakeError) -> (Session, finishPrefix: [UInt8]) {
        let responderID = Number160(sha1Of: r.identity)
        if expected != .zero, responderID != expected { throw .identityMismatch(expected: expected, got: responderID) }
        let myEphemeral = Array(ephemeral.publicKey.rawRepresentation)
        let t1 = HandshakeCrypto.transcript1(network: network, initiatorEphemeral: myEphemeral, initiatorIndex: index,
                                             responderEphemeral: r.ephemeral, responderIndex: r.responderIndex, responderIdentity: r.identity)
        guard HandshakeCrypto.verify(r.signature, of: t1, by: r.identity) else { throw .badSignature }
        let myIdentity = identity.publicKey
        let t2 = HandshakeCrypto.transcript2(t1, initiatorIdentity: myIdentity)
        let (toResponder, toInitiator) = try HandshakeCrypto.keys(ephemeral, peerEphemeral: r.ephemeral, t2: t2)
        let signature: [UInt8]
        do { signature = try identity.sign(t2) } catch { throw .badSignature }
        var prefix = SessionCodec.encode(HandshakeFinish(responderIndex: r.responderIndex, initiatorIndex: index, ephemeral: myEphemeral,
                                                          identity: myIdentity, signature: signature, counter: 0))
        prefix.removeLast(8)  // the counter is written per packet
        return (Session(localIndex: index, remoteIndex: r.responderIndex, remoteID: responderID, sendKey: toResponder,
                        receiveKey: toInitiator, lastUsed: now), prefix)
    }
}

/// The responder's side of every handshake: stateless between INIT and FINISH.
///
/// Its ephemeral key and index for an INIT are derived from a secret that changes every epoch
/// (a SYN cookie): `HMAC-SHA512(secret(epoch), eI · iI · source IP)` gives 32 bytes of X25519
/// private key and the 8-byte index. A FINISH is accepted when the index it names derives again
/// from its own fields in this epoch or the last, so a flood of INITs costs memory nothing and
/// CPU one signature each (and those are rate-limited per source).
final class HandshakeResponder {
    /// How long an issued RESPONSE stays good for its FINISH: one to two epochs.
    static let epochNanoseconds: UInt64 = 30_000_000_000

    let identity: PeerKeyPair
    let network: UInt32
    private let master: SymmetricKey
    private var cached: [(epoch: UInt64, key: SymmetricKey)] = []

    init(identity: PeerKeyPair, network: UInt32, random: RandomSource) {
        self.identity = identity
        self.network = network
        self.master = random.isSeeded ? SymmetricKey(data: random.bytes(32)) : SymmetricKey(size: .bits256)
    }

    private func secret(epoch: UInt64) -> SymmetricKey {
        if let hit = cached.first(where: { $0.epoch == epoch }) { return hit.key }
        let mac = withUnsafeBytes(of: epoch.bigEndian) { HMAC<SHA256>.authenticationCode(for: $0, using: master) }
        let key = SymmetricKey(data: Array(mac))
        cached.append((epoch, key))
        if cached.count > 2 { cached.removeFirst() }
        return key
    }

    /// The ephemeral key and index this node uses for one INIT, in one epoch.
    private func derive(epoch: UInt64, ephemeral: [UInt8], initiatorIndex: UInt64, from ip: IPAddress) -> (Curve25519.KeyAgreement.PrivateKey, UInt64)? {
        var h = HMAC<SHA512>(key: secret(epoch: epoch))
        h.update(data: ephemeral)
        withUnsafeBytes(of: initiatorIndex.bigEndian) { h.update(data: $0) }
        switch ip {
        case .v4(let v):
            // As an IPv4-mapped IPv6 address, so both families hash 16 bytes.
            withUnsafeBytes(of: UInt64(0).bigEndian) { h.update(data: $0) }
            withUnsafeBytes(of: (UInt64(0xFFFF_0000_0000) | UInt64(v)).bigEndian) { h.update(data: $0) }
        case .v6(let hi, let lo):
            withUnsafeBytes(of: hi.bigEndian) { h.update(data: $0) }
            withUnsafeBytes(of: lo.bigEndian) { h.update(data: $0) }
        }
        let mac = h.finalize()
        return mac.withUnsafeBytes { raw -> (Curve25519.KeyAgreement.PrivateKey, UInt64)? in
            guard let key = try? Curve25519.KeyAgreement.PrivateKey(rawRepresentation: UnsafeRawBufferPointer(rebasing: raw[0..<32])) else { return nil }
            let index = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 32, as: UInt64.self))
            return (key, index == 0 ? 1 : index)
        }
    }

    /// The RESPONSE to an INIT from `ip`.
    func respond(to i: HandshakeInit, from ip: IPAddress, now: UInt64) throws(HandshakeError) -> HandshakeResponse {
        guard let (ephemeral, index) = derive(epoch: now / Self.epochNanoseconds, ephemeral: i.ephemeral, initiatorIndex: i.initiatorIndex, from: ip) else {
            throw .badKey
        }
        let myEphemeral = Array(ephemeral.publicKey.rawRepresentation)
        let t1 = HandshakeCrypto.transcript1(network: network, initiatorEphemeral: i.ephemeral, initiatorIndex: i.initiatorIndex,
                                             responderEphemeral: myEphemeral, responderIndex: index, responderIdentity: identity.publicKey)
        let signature: [UInt8]
        do { signature = try identity.sign(t1) } catch { throw .badSignature }
        return HandshakeResponse(initiatorIndex: i.initiatorIndex, responderIndex: index, ephemeral: myEphemeral,
                                 identity: identity.publicKey, signature: signature)
    }

    /// The index a FINISH names, if this node issued it to `ip` in this epoch or the last.
    func issuedIndex(for f: HandshakeFinish, from ip: IPAddress, now: UInt64) -> (Curve25519.KeyAgreement.PrivateKey, UInt64)? {
        let epoch = now / Self.epochNanoseconds
        for e in [epoch, epoch &- 1] {
            if let (key, index) = derive(epoch: e, ephemeral: f.ephemeral, initiatorIndex: f.initiatorIndex, from: ip), index == f.responderIndex {
                return (key, index)
            }
        }
        return nil
    }

    /// Checks a FINISH from `ip` and returns the new session (its sealed body is still to open).
    func accept(_ f: HandshakeFinish, from ip: IPAddress, now: UInt64, seconds: UInt32) throws(HandshakeError) -> Session {
        guard let (ephemeral, index) = issuedIndex(for: f, from: ip, now: now) else { throw .staleCookie }
        let myEphemeral = Array(ephemeral.publicKey.rawRepresentation)
        let t1 = HandshakeCrypto.transcript1(network: network, initiatorEphemeral: f.ephemeral, initiatorIndex: f.initiatorIndex,
                                             responderEphemeral: myEphemeral, responderIndex: index, responderIdentity: identity.publicKey)
        let t2 = HandshakeCrypto.transcript2(t1, initiatorIdentity: f.identity)
        guard HandshakeCrypto.verify(f.signature, of: t2, by: f.identity) else { throw .badSignature }
        let (toResponder, toInitiator) = try HandshakeCrypto.keys(ephemeral, peerEphemeral: f.ephemeral, t2: t2)
        return Session(localIndex: index, remoteIndex: f.initiatorIndex, remoteID: Number160(sha1Of: f.identity),
                       sendKey: toInitiator, receiveKey: toResponder, lastUsed: seconds)
    }
}
