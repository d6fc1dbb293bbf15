import NIOCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

extension IPAddress {
    /// The IP of a NIO socket address (nil for Unix sockets).
    init?(_ address: SocketAddress) {
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
    func socketAddress(port: UInt16) -> SocketAddress {
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

extension PeerSocketAddress {
    var udpSocketAddress: SocketAddress { ip.socketAddress(port: udpPort) }
    var tcpSocketAddress: SocketAddress { ip.socketAddress(port: tcpPort) }
}
