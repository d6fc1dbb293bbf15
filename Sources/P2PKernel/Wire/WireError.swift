/// Why bytes are not a valid message, or why a message cannot be encoded.
public enum WireError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The input ended `needed` bytes early while reading `what`.
    case truncated(what: String, needed: Int, available: Int)
    /// Another wire format version.
    case unsupportedVersion(UInt8)
    /// A message of another network (dropped by the transport).
    case wrongNetwork(got: UInt32, expected: UInt32)
    case unknownMessageType(UInt8)
    case unknownSection(UInt8)
    case unknownIPKind(UInt8)
    /// Flag bits this version does not define.
    case reservedBits(what: String, value: UInt8)
    /// A count or length over its named limit.
    case limitExceeded(what: String, value: Int, limit: Int)
    /// Bytes left after the last section (or before the signature trailer).
    case trailingBytes(Int)

    public var description: String {
        switch self {
        case .truncated(let what, let needed, let available):
            "truncated \(what): needs \(needed) bytes, \(available) left"
        case .unsupportedVersion(let v): "wire version \(v) is not supported (this build speaks \(WireLimits.version))"
        case .wrongNetwork(let got, let expected): "message of network \(got), this node is on network \(expected)"
        case .unknownMessageType(let t): "unknown message type \(t)"
        case .unknownSection(let t): "unknown payload section tag \(t)"
        case .unknownIPKind(let k): "unknown IP address kind \(k)"
        case .reservedBits(let what, let v): "reserved bits set in \(what): 0x\(String(v, radix: 16))"
        case .limitExceeded(let what, let value, let limit): "\(what) of \(value) exceeds the limit of \(limit)"
        case .trailingBytes(let n): "\(n) unexpected bytes after the last section"
        }
    }
}
