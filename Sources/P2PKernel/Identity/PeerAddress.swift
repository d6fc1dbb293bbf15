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

/// An IP address with a TCP and a UDP port: where a peer (or its relay) can be reached.
public struct PeerSocketAddress: Hashable, Sendable, CustomStringConvertible {
    public var ip: IPAddress
    public var tcpPort: UInt16
    public var udpPort: UInt16

    public init(ip: IPAddress, tcpPort: UInt16, udpPort: UInt16) {
        self.ip = ip
        self.tcpPort = tcpPort
        self.udpPort = udpPort
    }

    /// An address whose TCP and UDP ports are the same.
    public init(ip: IPAddress, port: UInt16) {
        self.init(ip: ip, tcpPort: port, udpPort: port)
    }

    /// Whether a peer can be reached here: a unicast IP and both ports non-zero. Sending to port 0
    /// fails in the kernel (and would close the socket), so such records are refused on arrival.
    public var isValidPeerRecord: Bool {
        ip.isUnicast && tcpPort != 0 && udpPort != 0
    }

    public var description: String {
        let host = ip.isV4 ? ip.description : "[\(ip)]"
        return tcpPort == udpPort ? "\(host):\(tcpPort)" : "\(host):tcp\(tcpPort)/udp\(udpPort)"
    }

    /// Parses `HOST:PORT` where HOST is an IPv4 address, `localhost`, or `[IPv6]`.
    public init(parsing text: String) throws(AddressParseError) {
        let host: Substring, portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw .malformed(text) }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw .malformed(text) }
            portText = rest.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":") else { throw .malformed(text) }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        guard let port = UInt16(portText), port != 0 else { throw .badPort(String(portText)) }
        let ip: IPAddress?
        if host == "localhost" { ip = .loopback } else { ip = IPAddress(String(host)) }
        guard let ip else { throw .badHost(String(host)) }
        self.init(ip: ip, port: port)
    }
}

/// Why a `HOST:PORT` string is not an address.
public enum AddressParseError: Error, Equatable, CustomStringConvertible {
    case malformed(String)
    case badPort(String)
    case badHost(String)
    public var description: String {
        switch self {
        case .malformed(let s): "'\(s)' is not HOST:PORT"
        case .badPort(let s): "'\(s)' is not a port from 1 to 65535"
        case .badHost(let s): "'\(s)' is not an IPv4 address, [IPv6] address or localhost"
        }
    }
}

/// Reachability flags a peer announces about itself.
public struct PeerFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// UDP from outside does not reach the peer.
    public static let firewalledUDP = PeerFlags(rawValue: 1 << 0)
    /// TCP from outside does not reach the peer.
    public static let firewalledTCP = PeerFlags(rawValue: 1 << 1)
    /// The peer is reached through the relays listed in its address.
    public static let relayed = PeerFlags(rawValue: 1 << 2)
    /// The peer's ports are mapped on its NAT (UPnP or NAT-PMP).
    public static let portForwarded = PeerFlags(rawValue: 1 << 3)
    /// The peer is behind a NAT that maps its socket to one external port for every destination
    /// (port-preserving or consistent): a peer behind another such NAT can punch a hole to it,
    /// over UDP and TCP, coordinated through its relays.
    public static let punchable = PeerFlags(rawValue: 1 << 4)
    /// The peer is behind a NAT that maps each destination to another port (symmetric): only a
    /// peer behind a `.punchable` NAT can reach it directly, by birthday probing over UDP.
    public static let symmetricNAT = PeerFlags(rawValue: 1 << 5)
    /// Every flag the wire format defines; other bits are refused by the decoder.
    public static let known: PeerFlags = [.firewalledUDP, .firewalledTCP, .relayed, .portForwarded, .punchable, .symmetricNAT]
}

/// A peer: its id, where it listens, its flags and up to five relays.
///
/// Two addresses are the same peer when their ids are equal; `==` compares every field.
public struct PeerAddress: Hashable, Sendable, CustomStringConvertible {
    /// The most relays a peer may list: each costs space in every message that carries the address.
    public static let maxRelays = 5

    public var id: Number160
    public var socket: PeerSocketAddress
    public var flags: PeerFlags
    /// Relay peers that forward to this one when it is `.relayed`; at most `maxRelays`.
    public private(set) var relays: [PeerSocketAddress]

    public init(id: Number160, socket: PeerSocketAddress, flags: PeerFlags = [], relays: [PeerSocketAddress] = []) {
        self.id = id
        self.socket = socket
        self.flags = flags
        self.relays = Array(relays.prefix(PeerAddress.maxRelays))
    }

    public var ip: IPAddress { socket.ip }
    /// Whether others can reach this peer unsolicited: directly, or through its relays. A
    /// firewalled peer without relays only talks to peers it contacts itself.
    public var isContactable: Bool {
        flags.isDisjoint(with: [.firewalledUDP, .firewalledTCP]) || (flags.contains(.relayed) && !relays.isEmpty)
    }
    /// Whether others reach this peer at its own address (not firewalled, not relayed): what an
    /// observer, a prober or a relay must be.
    public var isDirectlyReachable: Bool {
        flags.isDisjoint(with: [.firewalledUDP, .firewalledTCP, .relayed])
    }
    public var tcpPort: UInt16 { socket.tcpPort }
    public var udpPort: UInt16 { socket.udpPort }

    /// Replaces the relay list; more than `maxRelays` is an error.
    public mutating func setRelays(_ list: [PeerSocketAddress]) throws(WireError) {
        guard list.count <= PeerAddress.maxRelays else {
            throw .limitExceeded(what: "relays", value: list.count, limit: PeerAddress.maxRelays)
        }
        relays = list
    }

    public var description: String {
        "\(id.hexString.prefix(10))…@\(socket)" + (flags.isEmpty ? "" : "[flags \(flags.rawValue)]")
    }
}
