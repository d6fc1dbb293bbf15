/// What a datagram or TCP frame is, by its first byte: every kind the kernel sends, in one place
/// (docs/WIRE.md has their layouts).
///
/// A plaintext wire message starts with the wire version (1); everything else starts with a byte
/// of 0x81 or more, so the two can never be mistaken for each other. Bytes no kind uses are
/// handed to the session layer, which refuses them.
public enum PacketKind: UInt8, Sendable, CaseIterable {
    /// A wire message in the clear (insecure mode only); the byte is `WireLimits.version`.
    case plaintext = 1
    /// First handshake message: the initiator's ephemeral key, padded.
    case handshakeInit = 0x81
    /// Second: the responder's ephemeral key, identity and signature over the transcript.
    case handshakeResponse = 0x82
    /// Third: the initiator's identity and signature, followed by one sealed message.
    case handshakeFinish = 0x83
    /// A message sealed under an established session.
    case sealed = 0x84
    /// "I have no session with this index": the sender should handshake again.
    case sessionUnknown = 0x85
    /// A handshake refused, with why.
    case refused = 0x86
    /// A probe-back's nonce (`ProbePacket`), one datagram or frame; no session.
    case probe = 0x87
    /// "From where do you see this connection?" and its answer (`ObservePacket`), TCP only.
    case observe = 0x88
    case observeAnswer = 0x89
    /// Relay packets (`RelayPacket`): to a relay, relay to its client, client to relay, relay back.
    case toRelay = 0x8A
    case toClient = 0x8B
    case fromClient = 0x8C
    case fromRelay = 0x8D
    /// A hole punch's datagram (`PunchPacket`).
    case punch = 0x8E

    /// The part of the kernel a kind belongs to.
    public enum Layer: Sendable {
        case plaintext, session, nat, relay, punch
    }

    public var layer: Layer {
        switch self {
        case .plaintext: .plaintext
        case .handshakeInit, .handshakeResponse, .handshakeFinish, .sealed, .sessionUnknown, .refused: .session
        case .probe, .observe, .observeAnswer: .nat
        case .toRelay, .toClient, .fromClient, .fromRelay: .relay
        case .punch: .punch
        }
    }
}
