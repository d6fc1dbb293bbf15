/// Every length the decoder accepts is bounded by one of these, so that a hostile peer cannot make
/// a node allocate more than the bytes it sent justify.
public enum WireLimits {
    /// The wire format version this build speaks; other versions are refused.
    public static let version: UInt8 = 1
    /// Largest UDP datagram we send: below the common 1,500-byte MTU minus IP/UDP headers and room
    /// for tunnels, so a datagram is never fragmented.
    public static let udpPayloadLimit = 1_400
    /// Largest message over TCP (4 MiB): bounds the frame buffer a connection may hold.
    public static let maxMessageBytes = 4 << 20
    /// Most payload sections in one message; the codec has six section kinds, so 16 leaves room.
    public static let maxSections = 16
    /// Most keys (160- or 640-bit) in one section.
    public static let maxKeys = 65_535
    /// Most peer addresses in one section: a neighbors reply carries k (20); bulk transfers of peer
    /// maps (relays, later) stay well below this.
    public static let maxPeers = 1_024
    /// Most entries in one key→data map section.
    public static let maxMapEntries = 65_535
    /// Fixed header size in bytes (see docs/WIRE.md).
    public static let headerBytes = 59
    /// Ed25519 public key (32) plus signature (64) at the end of a signed message.
    public static let signatureTrailerBytes = 96
}
