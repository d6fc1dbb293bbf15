import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Hosts in network namespaces of their own, joined by one bridge, with addresses in
/// 10.77.0.0/16 (real, distinct addresses, unlike loopback). Built with `ip` (root needed), every
/// namespace is removed by `close()`; namespaces left by a killed run are removed when the next
/// lab starts. Nothing is routed outside the namespaces: the bridge lives in a namespace too.
final class NetLab: @unchecked Sendable {
    struct LabError: Error, CustomStringConvertible {
        let description: String
    }

    /// Namespace names start with this and the creating process id.
    static let prefix = "p2pt"
    let tag: String
    private(set) var namespaces: [String] = []
    private let hub: String
    private var links = 0

    init() throws {
        tag = "\(NetLab.prefix)\(getpid())"
        hub = "\(tag)hub"
        try NetLab.removeStale()
        try NetLab.ip(["netns", "add", hub])
        namespaces.append(hub)
        try NetLab.ip(["-n", hub, "link", "add", "br0", "type", "bridge"])
        try NetLab.ip(["-n", hub, "link", "set", "br0", "up"])
    }

    /// Adds a host: a namespace with one interface on the bridge and these addresses (/16).
    @discardableResult
    func addHost(_ name: String, addresses: [String]) throws -> String {
        let ns = "\(tag)\(name)"
        try NetLab.ip(["netns", "add", ns])
        namespaces.append(ns)
        links += 1
        let inside = "v\(getpid() % 100_000)a\(links)", outside = "v\(getpid() % 100_000)b\(links)"
        try NetLab.ip(["link", "add", inside, "type", "veth", "peer", "name", outside])
        try NetLab.ip(["link", "set", inside, "netns", ns])
        try NetLab.ip(["link", "set", outside, "netns", hub])
        try NetLab.ip(["-n", ns, "link", "set", inside, "name", "eth0"])
        try NetLab.ip(["-n", hub, "link", "set", outside, "master", "br0"])
        try NetLab.ip(["-n", hub, "link", "set", outside, "up"])
        try NetLab.ip(["-n", ns, "link", "set", "lo", "up"])
        try NetLab.ip(["-n", ns, "link", "set", "eth0", "up"])
        for a in addresses { try NetLab.ip(["-n", ns, "addr", "add", "\(a)/16", "dev", "eth0"]) }
        return ns
    }

    /// The command prefix that runs a program inside `ns`.
    func launcher(_ ns: String) -> [String] { ["/usr/sbin/ip", "netns", "exec", ns] }

    /// A UDP socket bound to `address`:`port` inside `ns` (the calling thread enters the
    /// namespace only while it creates the socket; the socket stays in it).
    static func udpSocket(in ns: String, address: String, port: UInt16) throws -> Int32 {
        typealias SetNS = @convention(c) (Int32, Int32) -> Int32
        guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setns") else { throw LabError(description: "no setns") }
        let setns = unsafeBitCast(sym, to: SetNS.self)
        let newNet: Int32 = 0x4000_0000  // CLONE_NEWNET
        let mine = open("/proc/thread-self/ns/net", O_RDONLY)
        let target = open("/var/run/netns/\(ns)", O_RDONLY)
        defer {
            if mine >= 0 { Glibc.close(mine) }
            if target >= 0 { Glibc.close(target) }
        }
        guard mine >= 0, target >= 0, setns(target, newNet) == 0 else { throw LabError(description: "cannot enter \(ns): errno \(errno)") }
        defer { _ = setns(mine, newNet) }
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        inet_pton(AF_INET, address, &addr.sin_addr)
        let bound = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard fd >= 0, bound == 0 else {
            if fd >= 0 { Glibc.close(fd) }
            throw LabError(description: "cannot bind \(address):\(port) in \(ns): errno \(errno)")
        }
        return fd
    }

    /// Removes every namespace of this lab.
    func close() {
        for ns in namespaces.reversed() { try? NetLab.ip(["netns", "del", ns]) }
        namespaces.removeAll()
    }

    deinit { close() }

    /// Namespaces of labs whose process is gone.
    static func removeStale() throws {
        let list = try run("/usr/sbin/ip", ["netns", "list"])
        for line in list.split(separator: "\n") {
            let name = String(line.split(separator: " ").first ?? "")
            guard name.hasPrefix(prefix) else { continue }
            let digits = name.dropFirst(prefix.count).prefix { $0.isNumber }
            if let pid = Int32(digits), pid != getpid(), kill(pid, 0) != 0 { try? ip(["netns", "del", name]) }
        }
    }

    static func ip(_ args: [String]) throws {
        _ = try run("/usr/sbin/ip", args)
    }

    @discardableResult
    static func run(_ tool: String, _ args: [String]) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        p.waitUntilExit()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        guard p.terminationStatus == 0 else {
            throw LabError(description: "\(tool) \(args.joined(separator: " ")): \(String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))")
        }
        return text
    }
}
