import P2PAddress
/// The two port-mapping protocols a gateway speaks on UDP port 5351: NAT-PMP (RFC 6886) and its
/// successor PCP (RFC 6887). Pure encoders and decoders; `GatewayMapper` does the talking.
public enum MappingProtocol: String, Sendable, Hashable, CustomStringConvertible {
    case udp, tcp
    public var description: String { rawValue }
}

/// Why a gateway refused, in its own protocol's terms.
public enum GatewayError: Error, Equatable, Sendable, CustomStringConvertible {
    /// NAT-PMP result code (1 unsupported version, 2 refused, 3 network failure, 4 out of resources, 5 unsupported opcode).
    case natPMP(result: UInt16)
    /// PCP result code (RFC 6887 §7.4).
    case pcp(result: UInt8)
    /// The answer did not parse, or did not answer what was asked.
    case malformed(String)
    /// No answer after every retransmission.
    case noAnswer(tries: Int)
    /// An exchange ended without an answer or an error (its socket went away first).
    case abandoned

    public var description: String {
        switch self {
        case .natPMP(let r): "NAT-PMP result \(r) (\(GatewayError.natPMPText[Int(r)] ?? "unknown"))"
        case .pcp(let r): "PCP result \(r) (\(GatewayError.pcpText[Int(r)] ?? "unknown"))"
        case .malformed(let w): "malformed gateway answer: \(w)"
        case .abandoned: "the exchange ended without an answer"
        case .noAnswer(let n): "no answer from the gateway after \(n) tries"
        }
    }

    static let natPMPText = [1: "unsupported version", 2: "not authorized or refused", 3: "network failure",
                             4: "out of resources", 5: "unsupported opcode"]
    static let pcpText = [1: "unsupported version", 2: "not authorized", 3: "malformed request", 4: "unsupported opcode",
                          5: "unsupported option", 6: "malformed option", 7: "network failure", 8: "no resources",
                          9: "unsupported protocol", 10: "user exceeded quota", 11: "cannot provide external",
                          12: "address mismatch", 13: "excessive remote peers"]
}

/// A mapping a gateway granted.
public struct GatewayMapping: Sendable, Equatable {
    public var proto: MappingProtocol
    public var internalPort: UInt16
    /// The port the gateway assigned (may differ from the one asked for).
    public var externalPort: UInt16
    /// Seconds the gateway granted.
    public var lifetime: UInt32
    /// The gateway's external address, when the protocol says it (PCP does; NAT-PMP asks separately).
    public var externalIP: IPAddress?
    /// The gateway's epoch (seconds since it started, or lost state), for reboot detection.
    public var epoch: UInt32
}

/// NAT-PMP messages (RFC 6886 §3).
public enum NATPMP {
    public static let port: UInt16 = 5351

    /// "What is your external address?" (2 bytes).
    public static func externalAddressRequest() -> [UInt8] { [0, 0] }

    /// "Map `internalPort`" (12 bytes); lifetime 0 with external port 0 deletes the mapping.
    public static func mapRequest(_ p: MappingProtocol, internalPort: UInt16, suggestedExternal: UInt16, lifetime: UInt32) -> [UInt8] {
        var b: [UInt8] = [0, p == .udp ? 1 : 2, 0, 0]
        b += be16(internalPort) + be16(suggestedExternal) + be32(lifetime)
        return b
    }

    /// The external address from an opcode-0 answer, and the epoch.
    public static func parseExternalAddress(_ b: [UInt8]) throws(GatewayError) -> (IPAddress, epoch: UInt32) {
        guard b.count >= 12, b[0] == 0, b[1] == 128 else { throw .malformed("NAT-PMP external-address answer of \(b.count) bytes") }
        let result = u16(b, 2)
        guard result == 0 else { throw .natPMP(result: result) }
        return (.v4(u32(b, 8)), u32(b, 4))
    }

    /// The mapping from an opcode-1/2 answer.
    public static func parseMap(_ b: [UInt8], expecting p: MappingProtocol) throws(GatewayError) -> GatewayMapping {
        // A gateway that speaks only NAT-PMP answers a version-0 error to anything it does not know.
        guard b.count >= 4, b[0] == 0 else { throw .malformed("NAT-PMP map answer of \(b.count) bytes") }
        let result = u16(b, 2)
        guard result == 0 else { throw .natPMP(result: result) }
        guard b.count >= 16, b[1] == 128 + (p == .udp ? 1 : 2) else { throw .malformed("NAT-PMP map answer for another opcode") }
        return GatewayMapping(proto: p, internalPort: u16(b, 8), externalPort: u16(b, 10), lifetime: u32(b, 12), externalIP: nil, epoch: u32(b, 4))
    }
}

/// PCP MAP messages (RFC 6887 §7 and §11).
public enum PCP {
    public static let version: UInt8 = 2
    public static let mapBytes = 60

    /// A MAP request (60 bytes): header with the client's address, then the 12-byte nonce,
    /// protocol, ports and a suggested external address (all zeros: any).
    public static func mapRequest(_ p: MappingProtocol, internalPort: UInt16, suggestedExternal: UInt16, lifetime: UInt32,
                                  client: IPAddress, nonce: [UInt8]) -> [UInt8] {
        var b: [UInt8] = [version, 1, 0, 0] + be32(lifetime) + ipv6Bytes(client)
        b += nonce.prefix(12) + [UInt8](repeating: 0, count: max(0, 12 - nonce.count))
        b += [p == .udp ? 17 : 6, 0, 0, 0] + be16(internalPort) + be16(suggestedExternal)
        b += [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF] + [0, 0, 0, 0]  // ::ffff:0.0.0.0
        return b
    }

    /// The mapping from a MAP answer; the nonce must be the request's.
    public static func parseMap(_ b: [UInt8], expecting p: MappingProtocol, nonce: [UInt8]) throws(GatewayError) -> GatewayMapping {
        // A NAT-PMP-only gateway answers version 0, result 1 (unsupported version).
        if b.count >= 4, b[0] == 0 { throw .natPMP(result: u16(b, 2)) }
        guard b.count >= 24, b[0] == version, b[1] == 0x81 else { throw .malformed("PCP answer of \(b.count) bytes") }
        guard b[3] == 0 else { throw .pcp(result: b[3]) }
        guard b.count >= mapBytes, Array(b[24..<36]) == Array(nonce.prefix(12)) else { throw .malformed("PCP answer with another nonce") }
        guard b[36] == (p == .udp ? 17 : 6) else { throw .malformed("PCP answer for another protocol") }
        let ip = IPAddress.fromIPv6Bytes(Array(b[44..<60]))
        return GatewayMapping(proto: p, internalPort: u16(b, 40), externalPort: u16(b, 42), lifetime: u32(b, 4), externalIP: ip, epoch: u32(b, 8))
    }

    static func ipv6Bytes(_ ip: IPAddress) -> [UInt8] {
        switch ip {
        case .v4(let v): return [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF] + be32(v)
        case .v6(let hi, let lo): return be64(hi) + be64(lo)
        }
    }
}

extension IPAddress {
    /// From 16 bytes; an IPv4-mapped address (::ffff:a.b.c.d) becomes the IPv4 one.
    static func fromIPv6Bytes(_ b: [UInt8]) -> IPAddress? {
        guard b.count == 16 else { return nil }
        var hi: UInt64 = 0, lo: UInt64 = 0
        for i in 0..<8 { hi = hi << 8 | UInt64(b[i]) }
        for i in 8..<16 { lo = lo << 8 | UInt64(b[i]) }
        if hi == 0, lo >> 32 == 0xFFFF { return .v4(UInt32(truncatingIfNeeded: lo)) }
        return .v6(hi, lo)
    }
}

private func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }
private func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
private func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(v >> UInt64(56 - 8 * $0) & 0xFF) } }
private func u16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }
private func u32(_ b: [UInt8], _ at: Int) -> UInt32 { UInt32(b[at]) << 24 | UInt32(b[at + 1]) << 16 | UInt32(b[at + 2]) << 8 | UInt32(b[at + 3]) }
