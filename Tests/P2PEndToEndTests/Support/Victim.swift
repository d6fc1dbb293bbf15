import Foundation
import NIOCore
import Testing
@testable import P2PKernel
#if canImport(Glibc)
import Glibc
#endif

/// A path for `name` in a directory of its own under the temporary directory.
func temporaryPath(_ name: String) -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("p2p-test-\(UInt64.random(in: 0...UInt64.max))")
    try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir.appendingPathComponent(name).path
}

/// What a process uses, read from /proc.
enum ProcessUsage {
    /// Resident set size in bytes.
    static func rss(_ pid: Int32) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kib = line.split(separator: " ").compactMap({ Int($0) }).first else { return nil }
        return kib * 1024
    }

    /// User plus system CPU time in seconds.
    static func cpuSeconds(_ pid: Int32) -> Double? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return nil }
        // Fields after the command name: state is field 3; utime and stime are fields 14 and 15.
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Open file descriptors.
    static func openFiles(_ pid: Int32) -> Int? {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd"))?.count
    }
}

/// A `p2p node` process under attack, with the resources it uses while the attack runs.
final class Victim: @unchecked Sendable {
    let node: NodeProcess
    let address: PeerSocketAddress
    /// The id the node printed.
    let id: String

    /// Starts `p2p node` on 127.0.0.1 (or inside a namespace, through `launcher`).
    init(_ args: [String] = [], host: String = "127.0.0.1", port: UInt16 = 0, launcher: [String] = []) throws {
        node = try NodeProcess(["--port", "\(port)"] + args, host: host, launcher: launcher)
        guard node.waitFor("listening on"), let port = node.port.flatMap(UInt16.init) else {
            node.stop()
            throw RPCError.malformedReply("the victim did not start: \(node.output)")
        }
        address = PeerSocketAddress(ip: IPAddress(host) ?? .loopback, port: port)
        let out = node.output
        id = out.range(of: #"node (0x[0-9a-f]{40})"#, options: .regularExpression).map { String(out[$0].dropFirst(5)) } ?? ""
    }

    var pid: Int32 { node.process.processIdentifier }
    var isAlive: Bool { node.process.isRunning }

    /// What the victim used while `attack` ran: its peak RSS (sampled every 50 ms) and CPU in
    /// cores (CPU seconds over wall seconds).
    struct Usage: CustomStringConvertible {
        var peakRSS: Int
        var baseRSS: Int
        var cores: Double
        var seconds: Double
        var description: String {
            String(format: "peak RSS %.1f MiB (%.1f MiB before), %.2f cores over %.1f s",
                   Double(peakRSS) / 1_048_576, Double(baseRSS) / 1_048_576, cores, seconds)
        }
    }

    func underAttack(_ attack: @Sendable () async throws -> Void) async throws -> Usage {
        let base = ProcessUsage.rss(pid) ?? 0
        let cpu0 = ProcessUsage.cpuSeconds(pid) ?? 0
        let start = ContinuousClock.now
        let pid = self.pid
        let sampler = Task {
            var peak = 0
            while !Task.isCancelled {
                peak = max(peak, ProcessUsage.rss(pid) ?? 0)
                try? await Task.sleep(for: .milliseconds(50))
            }
            return peak
        }
        try await attack()
        sampler.cancel()
        let peak = max(await sampler.value, ProcessUsage.rss(pid) ?? 0)
        let seconds = (ContinuousClock.now - start).seconds
        let cores = ((ProcessUsage.cpuSeconds(pid) ?? 0) - cpu0) / max(seconds, 0.001)
        return Usage(peakRSS: peak, baseRSS: base, cores: cores, seconds: seconds)
    }

    /// A legitimate peer's ping, lookup, put and get through the victim (separate client
    /// processes, as a user would run them), with `launcher` for namespaces.
    func legitimateClientsWork(launcher: [String] = [], key: String = "k\(UInt32.random(in: 0...UInt32.max))") throws {
        let seed = "\(address)"
        let ping = try P2PTool.run(launcher: launcher, ["ping", seed], timeout: 30)
        #expect(ping.code == 0, "ping: \(ping.err)")
        let lookup = try P2PTool.run(launcher: launcher, ["lookup", "--bootstrap", seed, "hello"], timeout: 30)
        #expect(lookup.code == 0, "lookup: \(lookup.err)")
        let value = "v\(UInt32.random(in: 0...UInt32.max))"
        let put = try P2PTool.run(launcher: launcher, ["put", "--bootstrap", seed, key, value], timeout: 30)
        #expect(put.code == 0, "put: \(put.err); the victim said: \(node.output.suffix(2000))")
        let get = try P2PTool.run(launcher: launcher, ["get", "--bootstrap", seed, key], timeout: 30)
        #expect(get.code == 0 && get.out.contains(value), "get: \(get.out) \(get.err)")
    }

    func stop() { node.stop() }
}

/// A blocking TCP socket for attacks that must control exactly what is written and when.
final class RawTCP: @unchecked Sendable {
    let fd: Int32

    /// Connects to `port` on 127.0.0.1; nil when the connection is refused or the process is out
    /// of file descriptors.
    init?(port: UInt16, sendTimeout: Double = 2) {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        let ok = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard ok == 0 else {
            Glibc.close(fd)
            return nil
        }
        var tv = timeval(tv_sec: Int(sendTimeout), tv_usec: Int((sendTimeout - Double(Int(sendTimeout))) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Writes as much of `bytes` as the peer takes before the send timeout; returns how much.
    @discardableResult
    func write(_ bytes: [UInt8]) -> Int {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { break }
            sent += n
        }
        return sent
    }

    /// Whether the peer has closed (or reset) the connection, by the kernel's TCP state: unread
    /// data in front of the peer's FIN does not hide it.
    var closedByPeer: Bool {
        var info = [UInt8](repeating: 0, count: 256)
        var length = socklen_t(info.count)
        guard getsockopt(fd, Int32(IPPROTO_TCP), TCP_INFO, &info, &length) == 0 else { return true }
        // tcpi_state: 1 established; 8 close-wait (the peer sent FIN); 7 closed (reset).
        return info[0] != 1
    }

    func close() { Glibc.close(fd) }

    /// Waits (polling, bounded) until the peer has closed every one of `connections`; returns
    /// how many are still open.
    static func waitUntilClosed(_ connections: [RawTCP], within timeout: Duration) async -> Int {
        let deadline = ContinuousClock.now + timeout
        while connections.contains(where: { !$0.closedByPeer }), ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(200))
        }
        return connections.filter { !$0.closedByPeer }.count
    }
}

/// A thread that sends datagrams as fast as it can for a while (floods run off the Swift
/// concurrency pool, which the test itself needs).
final class Flood: @unchecked Sendable {
    let thread: Thread

    init(to target: PeerSocketAddress, for seconds: Double, packet: @escaping @Sendable (Int) -> [UInt8]) {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = target.udpPort.bigEndian
        if case .v4(let v) = target.ip { addr.sin_addr.s_addr = v.bigEndian }
        let destination = addr
        let box = Box()
        thread = Thread {
            var addr = destination
            let end = Date().addingTimeInterval(seconds)
            var i = 0
            while Date() < end {
                let bytes = packet(i)
                _ = bytes.withUnsafeBytes { raw in
                    withUnsafePointer(to: &addr) { p in
                        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, raw.baseAddress, raw.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                    }
                }
                i += 1
            }
            box.sent = i
            // What came back, without waiting: the first byte of each datagram.
            var buffer = [UInt8](repeating: 0, count: 2048)
            var answers: [UInt8] = []
            while true {
                let n = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
                guard n > 0 else { break }
                answers.append(buffer[0])
            }
            box.answers = answers
            Glibc.close(fd)
        }
        thread.start()
        self.box = box
    }

    private final class Box: @unchecked Sendable {
        var sent = 0
        var answers: [UInt8] = []
    }
    private let box: Box

    /// Waits (polling, bounded) for the flood to end; returns how many datagrams it sent, and
    /// the first byte (the packet kind) of each datagram that came back.
    func wait() async -> (sent: Int, answers: [UInt8]) {
        while !thread.isFinished { try? await Task.sleep(for: .milliseconds(20)) }
        return (box.sent, box.answers)
    }
}
