import NIOCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// An IPv4 or IPv6 address held inline (no heap storage).
public enum IPAddress: Hashable, Sendable, CustomStringConvertible {
    /// An IPv4 address, network byte order folded into a host integer (`127.0.0.1` = `0x7F000001`).
    case v4(UInt32)
    /// An IPv6 address as two 64-bit halves, most significant first.
    case v6(UInt64, UInt64)

    /// The IPv4 loopback address.
    public static let loopback = IPAddress.v4(0x7F00_0001)

    /// Parses dotted IPv4 (`10.0.0.1`) or IPv6 in its full or `::`-compressed form.
    public init?(_ text: String) {
        if text.contains(":") {
            guard let v = IPAddress.parseV6(text) else { return nil }
            self = v
        } else {
            let parts = text.split(separator: ".", omittingEmptySubsequences: false)
            guard parts.count == 4 else { return nil }
            var value: UInt32 = 0
            for p in parts {
                guard !p.isEmpty, p.count <= 3, let n = UInt32(p), n <= 255 else { return nil }
                value = value << 8 | n
            }
            self = .v4(value)
        }
    }

    private static func parseV6(_ text: String) -> IPAddress? {
        var halves: [String] = []
        var rest = Substring(text)
        while let r = rest.firstRange(of: "::") {
            halves.append(String(rest[..<r.lowerBound]))
            rest = rest[r.upperBound...]
        }
        halves.append(String(rest))
        guard halves.count <= 2 else { return nil }
        func groups(_ s: String) -> [UInt16]? {
            if s.isEmpty { return [] }
            var out: [UInt16] = []
            for g in s.split(separator: ":", omittingEmptySubsequences: false) {
                guard !g.isEmpty, g.count <= 4, let v = UInt16(g, radix: 16) else { return nil }
                out.append(v)
            }
            return out
        }
        guard let head = groups(halves[0]) else { return nil }
        var all = head
        if halves.count == 2 {
            guard let tail = groups(halves[1]), head.count + tail.count < 8 else { return nil }
            all += Array(repeating: 0, count: 8 - head.count - tail.count) + tail
        }
        guard all.count == 8 else { return nil }
        var hi: UInt64 = 0, lo: UInt64 = 0
        for i in 0..<4 { hi = hi << 16 | UInt64(all[i]) }
        for i in 4..<8 { lo = lo << 16 | UInt64(all[i]) }
        return .v6(hi, lo)
    }

    /// Whether this is an IPv4 address.
    public var isV4: Bool { if case .v4 = self { true } else { false } }

    /// Whether packets may be sent here: not unspecified (0.0.0.0/8, ::), broadcast, multicast
    /// (224/4, ff00::/8) or reserved (240/4). A peer record naming anything else is refused.
    public var isUnicast: Bool {
        switch self {
        case .v4(let v):
            let top = v >> 24
            return top != 0 && top < 224
        case .v6(let hi, let lo):
            return !(hi == 0 && lo == 0) && hi >> 56 != 0xFF
        }
    }

    /// The group an address counts in for the Sybil limits of peer maps and lookups: its IPv4 /24
    /// or IPv6 /48. Nil for loopback, which is exempt so that simulations of many peers on
    /// 127.0.0.1 work.
    public var sybilGroup: UInt64? {
        switch self {
        case .v4(let v): return isLoopback ? nil : 1 << 62 | UInt64(v >> 8)
        case .v6(let hi, _): return isLoopback ? nil : 1 << 63 | hi >> 16
        }
    }

    /// 127.0.0.0/8 or ::1.
    public var isLoopback: Bool {
        switch self {
        case .v4(let v): v >> 24 == 127
        case .v6(let hi, let lo): hi == 0 && lo == 1
        }
    }

    public var description: String {
        switch self {
        case .v4(let v):
            return "\(v >> 24).\(v >> 16 & 0xFF).\(v >> 8 & 0xFF).\(v & 0xFF)"
        case .v6(let hi, let lo):
            var groups: [String] = []
            for i in stride(from: 48, through: 0, by: -16) { groups.append(String(hi >> UInt64(i) & 0xFFFF, radix: 16)) }
            for i in stride(from: 48, through: 0, by: -16) { groups.append(String(lo >> UInt64(i) & 0xFFFF, radix: 16)) }
            return groups.joined(separator: ":")
        }
    }
}

extension IPAddress {
    /// The IP of a NIO socket address (nil for Unix sockets).
    package init?(_ address: SocketAddress) {
        switch address {
        case .v4(let a):
            self = .v4(UInt32(bigEndian: a.address.sin_addr.s_addr))
        case .v6(let a):
            var addr = a.address.sin6_addr
            let (hi, lo) = withUnsafeBytes(of: &addr) { raw in
                (UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self)),
                 UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
            }
            // An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 peer it stands for.
            if hi == 0, lo >> 32 == 0xFFFF { self = .v4(UInt32(truncatingIfNeeded: lo)) } else { self = .v6(hi, lo) }
        case .unixDomainSocket:
            return nil
        }
    }

    /// A NIO socket address for this IP and a port, built without parsing text.
    package func socketAddress(port: UInt16) -> SocketAddress {
        switch self {
        case .v4(let v):
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_port = port.bigEndian
            sa.sin_addr.s_addr = v.bigEndian
            return SocketAddress(sa, host: "")
        case .v6(let hi, let lo):
            var sa = sockaddr_in6()
            sa.sin6_family = sa_family_t(AF_INET6)
            sa.sin6_port = port.bigEndian
            withUnsafeMutableBytes(of: &sa.sin6_addr) { raw in
                raw.storeBytes(of: hi.bigEndian, toByteOffset: 0, as: UInt64.self)
                raw.storeBytes(of: lo.bigEndian, toByteOffset: 8, as: UInt64.self)
            }
            return SocketAddress(sa, host: "")
        }
    }
}
