import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A real NAT in network namespaces: an "internet" namespace and two home networks behind NAT
/// routers (nftables masquerade), optionally with miniupnpd (UPnP IGD, NAT-PMP, PCP) on a router.
///
/// ```
///  pub  : bridge br0 — 203.0.113.254 (routers' gateway), 203.0.113.10/.11 (STUN, 2 IPs × 2 ports),
///         public peers 198.51.100.10, 192.0.2.10, 198.18.0.10 (three /24s)
///  rtr  : wan0 203.0.113.1 ⇄ lan0 192.168.77.1      lan : 192.168.77.10 (default via .1)
///  rtr2 : wan0 203.0.113.2 ⇄ lan0 192.168.78.1      lan2: 192.168.78.10 (default via .1)
/// ```
/// Every address lives in namespaces this lab creates; nothing is routed out of them. `close()`
/// stops every process the lab started and deletes every namespace, also after a failure (and a
/// later lab removes what a killed run left behind).
final class NATLab: @unchecked Sendable {
    static let prefix = "p2pn"
    let tag: String
    let pub: String, rtr: String, lan: String, rtr2: String, lan2: String
    static let publicPeers = ["198.51.100.10", "192.0.2.10", "198.18.0.10"]
    static let stunIPs = ["203.0.113.10", "203.0.113.11"]
    private var namespaces: [String] = []
    private var processes: [Process] = []
    private var stun: STUNServer?
    let dir: String
    private let lock = NSLock()

    /// How a router maps and filters.
    struct Router: Sendable {
        /// `masquerade` flags: "" keeps ports (endpoint-independent), "random,fully-random" is symmetric.
        var masquerade = ""
        /// What the router does with unsolicited packets from outside: drop (a home router), or
        /// accept (its own stack answers with RST / port unreachable).
        var unsolicited = "drop"
    }

    init() throws {
        tag = "\(NATLab.prefix)\(getpid())x\(UInt16.random(in: 0...9999))"
        (pub, rtr, lan, rtr2, lan2) = ("\(tag)pub", "\(tag)rtr", "\(tag)lan", "\(tag)rtr2", "\(tag)lan2")
        dir = temporaryPath("natlab")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        NATLab.removeStale()
        do {
            try build()
        } catch {
            close()
            throw error
        }
    }

    private func build() throws {
        for ns in [pub, rtr, lan, rtr2, lan2] {
            try NetLab.ip(["netns", "add", ns])
            namespaces.append(ns)
            try NetLab.ip(["-n", ns, "link", "set", "lo", "up"])
        }
        try NetLab.ip(["-n", pub, "link", "add", "br0", "type", "bridge"])
        for a in ["203.0.113.254/24"] + NATLab.stunIPs.map({ "\($0)/24" }) + NATLab.publicPeers.map({ "\($0)/24" }) {
            try NetLab.ip(["-n", pub, "addr", "add", a, "dev", "br0"])
        }
        try NetLab.ip(["-n", pub, "link", "set", "br0", "up"])
        for (i, (r, l, net)) in [(rtr, lan, 77), (rtr2, lan2, 78)].enumerated() {
            let port = "p-wan\(i + 1)"
            try NetLab.ip(["-n", r, "link", "add", "wan0", "type", "veth", "peer", "name", port, "netns", pub])
            try NetLab.ip(["-n", pub, "link", "set", port, "master", "br0", "up"])
            try NetLab.ip(["-n", r, "addr", "add", "203.0.113.\(i + 1)/24", "dev", "wan0"])
            try NetLab.ip(["-n", r, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", l])
            try NetLab.ip(["-n", r, "addr", "add", "192.168.\(net).1/24", "dev", "lan0"])
            try NetLab.ip(["-n", l, "addr", "add", "192.168.\(net).10/24", "dev", "eth0"])
            for (ns, dev) in [(r, "wan0"), (r, "lan0"), (l, "eth0")] { try NetLab.ip(["-n", ns, "link", "set", dev, "up"]) }
            try NetLab.ip(["-n", l, "route", "add", "default", "via", "192.168.\(net).1"])
            try NetLab.ip(["-n", r, "route", "add", "default", "via", "203.0.113.254"])
            try sh(r, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            try configure(router: i == 0 ? rtr : rtr2, Router())
        }
    }

    /// Sets a router's firewall and NAT: chains laid out the way miniupnpd's nftables build expects.
    func configure(router ns: String, _ r: Router) throws {
        let lannet = ns == rtr ? "192.168.77.0/24" : "192.168.78.0/24"
        let rules = """
        flush ruleset
        table inet filter {
          chain input {
            type filter hook input priority 0; policy accept;
            ct state established,related accept
            iifname "wan0" ip saddr { \(NATLab.stunIPs.joined(separator: ", ")) } udp sport { 3478, 3479 } accept
            iifname "wan0" ct state new \(r.unsolicited)
          }
          chain forward {
            type filter hook forward priority 0; policy drop;
            ct state established,related accept
            iifname "lan0" oifname "wan0" accept
            iifname "wan0" jump miniupnpd
          }
          chain miniupnpd { }
          chain prerouting {
            type nat hook prerouting priority -100; policy accept;
            iifname "wan0" jump prerouting_miniupnpd
          }
          chain postrouting {
            type nat hook postrouting priority 100; policy accept;
            oifname "wan0" jump postrouting_miniupnpd
            oifname "wan0" ip saddr \(lannet) masquerade \(r.masquerade)
          }
          chain prerouting_miniupnpd { }
          chain postrouting_miniupnpd { }
        }
        """
        try sh(ns, ["nft", "-f", "-"], input: rules)
        _ = try? sh(ns, ["conntrack", "-F"])
    }

    /// The command prefix that runs a program inside `ns`.
    func launcher(_ ns: String) -> [String] { ["/usr/sbin/ip", "netns", "exec", ns] }

    // MARK: gateway

    /// Starts the STUN helper miniupnpd needs (its WAN address is a reserved one, so it proves
    /// with STUN that it is not behind another NAT before it forwards ports).
    func startSTUN() throws {
        guard stun == nil else { return }
        var fds: [String: Int32] = [:]
        for ip in NATLab.stunIPs {
            for port in [UInt16(3478), 3479] {
                fds["\(ip):\(port)"] = try NetLab.udpSocket(in: pub, address: ip, port: port)
            }
        }
        stun = STUNServer(sockets: fds, ips: NATLab.stunIPs)
    }

    /// Starts miniupnpd on `rtr` with UPnP and/or NAT-PMP+PCP, its chains flushed first (it does
    /// not flush them itself), and waits until it listens.
    @discardableResult
    func startGateway(upnp: Bool = true, natpmp: Bool = true) throws -> Process {
        try startSTUN()
        for chain in ["miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"] {
            try sh(rtr, ["nft", "flush", "chain", "inet", "filter", chain])
        }
        let conf = "\(dir)/miniupnpd.conf"
        let text = """
        ext_ifname=wan0
        listening_ip=lan0
        http_port=5555
        enable_natpmp=\(natpmp ? "yes" : "no")
        enable_upnp=\(upnp ? "yes" : "no")
        secure_mode=yes
        system_uptime=no
        uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
        clean_ruleset_interval=0
        ext_perform_stun=yes
        ext_stun_host=\(NATLab.stunIPs[0])
        ext_stun_port=3478
        upnp_table_name=filter
        upnp_nat_table_name=filter
        upnp_forward_chain=miniupnpd
        upnp_nat_chain=prerouting_miniupnpd
        upnp_nat_postrouting_chain=postrouting_miniupnpd
        allow 1024-65535 192.168.77.0/24 1024-65535
        deny 0-65535 0.0.0.0/0 0-65535

        """
        try text.write(toFile: conf, atomically: true, encoding: .utf8)
        let log = "\(dir)/miniupnpd.log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        p.arguments = ["netns", "exec", rtr, "/usr/sbin/miniupnpd", "-d", "-f", conf, "-P", "\(dir)/miniupnpd.pid"]
        let handle = FileHandle(forWritingAtPath: log)
        p.standardOutput = handle
        p.standardError = handle
        try p.run()
        lock.withLock { processes.append(p) }
        let ready = natpmp ? "Listening for NAT-PMP" : "HTTP listening"
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if gatewayLog.contains(ready) { return p }
            guard p.isRunning else { break }
            Thread.sleep(forTimeInterval: 0.05)
        }
        throw NetLab.LabError(description: "miniupnpd did not start: \(gatewayLog.suffix(2000))")
    }

    var gatewayLog: String { (try? String(contentsOfFile: "\(dir)/miniupnpd.log", encoding: .utf8)) ?? "" }

    /// Stops a process the lab started (SIGTERM, then SIGKILL after 5 s).
    func stop(_ p: Process) {
        if p.isRunning { p.terminate() }
        let deadline = Date().addingTimeInterval(5)
        while p.isRunning, Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        lock.withLock { processes.removeAll { $0 === p } }
    }

    /// The redirect rules miniupnpd holds for `port` (UDP and TCP), read from the router's nftables.
    func gatewayRules(port: UInt16) -> Set<String> {
        let text = (try? sh(rtr, ["nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd"])) ?? ""
        // miniupnpd-nftables writes the protocol as a raw header match: `@nh,72,8 0x6` (TCP) or
        // `0x11` (UDP), e.g. `iif "wan0" @nh,72,8 0x11 th dport 4000 dnat ip to 192.168.77.10:4000`.
        let lines = text.split(separator: "\n").filter { $0.contains("dport \(port) ") }
        var found = Set<String>()
        for line in lines {
            if line.contains("0x6 ") || line.contains("tcp") { found.insert("tcp") }
            if line.contains("0x11 ") || line.contains("udp") { found.insert("udp") }
        }
        return found
    }

    // MARK: running things

    @discardableResult
    func sh(_ ns: String, _ args: [String], input: String? = nil) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        p.arguments = ["netns", "exec", ns] + args
        let out = Pipe(), err = Pipe(), inp = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = inp
        try p.run()
        if let input { inp.fileHandleForWriting.write(Data(input.utf8)) }
        try? inp.fileHandleForWriting.close()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw NetLab.LabError(description: "\(args.joined(separator: " ")) in \(ns): \(String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))")
        }
        return String(decoding: data, as: UTF8.self)
    }

    /// Stops every process and deletes every namespace of this lab.
    func close() {
        let running = lock.withLock { processes }
        for p in running { stop(p) }
        stun?.stop()
        stun = nil
        for ns in namespaces.reversed() { try? NetLab.ip(["netns", "del", ns]) }
        namespaces.removeAll()
        try? FileManager.default.removeItem(atPath: dir)
    }

    deinit { close() }

    /// Namespaces of labs whose process is gone.
    static func removeStale() {
        guard let list = try? NetLab.run("/usr/sbin/ip", ["netns", "list"]) else { return }
        for line in list.split(separator: "\n") {
            let name = String(line.split(separator: " ").first ?? "")
            guard name.hasPrefix(prefix) else { continue }
            let digits = name.dropFirst(prefix.count).prefix { $0.isNumber }
            if let pid = Int32(digits), pid != getpid(), kill(pid, 0) != 0 { try? NetLab.ip(["netns", "del", name]) }
        }
    }
}

/// A STUN binding server (RFC 5389, with RFC 3489's CHANGE-REQUEST) on two IPs × two ports: what
/// miniupnpd asks before it forwards ports from a reserved WAN address. Runs on a thread of its
/// own over sockets made inside the lab's namespace.
final class STUNServer: @unchecked Sendable {
    private let sockets: [String: Int32]
    private let ips: [String]
    private let thread: Thread
    private let lock = NSLock()
    private var running = true

    init(sockets: [String: Int32], ips: [String]) {
        self.sockets = sockets
        self.ips = ips
        let box = Box()
        thread = Thread { box.server?.serve() }
        box.server = self
        thread.start()
    }

    private final class Box: @unchecked Sendable { weak var server: STUNServer? }

    func stop() {
        lock.withLock { running = false }
        Thread.sleep(forTimeInterval: 0.25)
        for fd in sockets.values { Glibc.close(fd) }
    }

    private var isRunning: Bool { lock.withLock { running } }

    private func serve() {
        let keys = Array(sockets.keys)
        var fds = keys.map { pollfd(fd: sockets[$0] ?? -1, events: Int16(POLLIN), revents: 0) }
        var buffer = [UInt8](repeating: 0, count: 2048)
        while isRunning {
            guard poll(&fds, nfds_t(fds.count), 100) > 0 else { continue }
            for (i, p) in fds.enumerated() where p.revents & Int16(POLLIN) != 0 {
                var from = sockaddr_in()
                var len = socklen_t(MemoryLayout<sockaddr_in>.size)
                let n = withUnsafeMutablePointer(to: &from) { ptr in
                    ptr.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(p.fd, &buffer, buffer.count, 0, $0, &len) }
                }
                guard n >= 20 else { continue }
                answer(Array(buffer[0..<n]), from: from, on: keys[i])
            }
        }
    }

    private func answer(_ m: [UInt8], from: sockaddr_in, on key: String) {
        guard m[0] == 0, m[1] == 1 else { return }
        let length = Int(m[2]) << 8 | Int(m[3])
        var change: UInt8 = 0
        var at = 20
        while at + 4 <= min(m.count, 20 + length) {
            let type = Int(m[at]) << 8 | Int(m[at + 1]), len = Int(m[at + 2]) << 8 | Int(m[at + 3])
            if type == 3, len == 4, at + 8 <= m.count { change = m[at + 7] }
            at += 4 + len + (4 - len % 4) % 4
        }
        let parts = key.split(separator: ":")
        let ip = String(parts[0]), port = UInt16(parts[1]) ?? 3478
        let otherIP = ip == ips[0] ? ips[1] : ips[0], otherPort: UInt16 = port == 3478 ? 3479 : 3478
        let replyKey = "\(change & 4 != 0 ? otherIP : ip):\(change & 2 != 0 ? otherPort : port)"
        let srcIP = UInt32(bigEndian: from.sin_addr.s_addr), srcPort = UInt16(bigEndian: from.sin_port)
        func attr(_ t: UInt16, _ a: UInt32, _ p: UInt16, xor: Bool) -> [UInt8] {
            let cookie: UInt32 = 0x2112_A442
            let pp = xor ? p ^ UInt16(cookie >> 16) : p, aa = xor ? a ^ cookie : a
            return [UInt8(t >> 8), UInt8(t & 0xFF), 0, 8, 0, 1, UInt8(pp >> 8), UInt8(pp & 0xFF),
                    UInt8(aa >> 24), UInt8(aa >> 16 & 0xFF), UInt8(aa >> 8 & 0xFF), UInt8(aa & 0xFF)]
        }
        var other = in_addr()
        inet_pton(AF_INET, otherIP, &other)
        let attrs = attr(1, srcIP, srcPort, xor: false) + attr(0x20, srcIP, srcPort, xor: true)
            + attr(5, UInt32(bigEndian: other.s_addr), otherPort, xor: false)
        let reply = [0x01, 0x01, UInt8(attrs.count >> 8), UInt8(attrs.count & 0xFF), 0x21, 0x12, 0xA4, 0x42] + Array(m[8..<20]) + attrs
        guard let fd = sockets[replyKey] else { return }
        var to = from
        _ = withUnsafePointer(to: &to) { ptr in
            ptr.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, reply, reply.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
    }
}
