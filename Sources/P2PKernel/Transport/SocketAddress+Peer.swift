import NIOCore

extension PeerSocketAddress {
    /// NIO socket addresses of this peer (raw sockets in tests and tools).
    var udpSocketAddress: SocketAddress { ip.socketAddress(port: udpPort) }
    var tcpSocketAddress: SocketAddress { ip.socketAddress(port: tcpPort) }
}
