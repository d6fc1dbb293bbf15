@_exported import P2PAddress

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
