import Foundation
import Testing

/// GET over a plain TCP socket (HTTP/1.1, connection closed after the answer): the body, or nil.
private func httpGet(_ port: String, _ path: String) -> (status: Int, body: String)? {
    guard let p = UInt16(port) else { return nil }
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var tv = timeval(tv_sec: 10, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = p.bigEndian
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    let connected = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard connected == 0 else { return nil }
    let request = Array("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".utf8)
    guard request.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, 0) }) == request.count else { return nil }
    var data = [UInt8]()
    var chunk = [UInt8](repeating: 0, count: 65_536)
    while true {
        let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n <= 0 { break }
        data += chunk[0..<n]
    }
    let text = String(decoding: data, as: UTF8.self)
    guard let split = text.range(of: "\r\n\r\n"), let code = Int(text.split(separator: " ").dropFirst().first ?? "") else { return nil }
    var body = String(text[split.upperBound...])
    if text[..<split.lowerBound].lowercased().contains("transfer-encoding: chunked") { body = dechunk(body) }
    return (code, body)
}

private func dechunk(_ s: String) -> String {
    var out = "", rest = Substring(s)
    while let line = rest.range(of: "\r\n") {
        guard let size = Int(rest[..<line.lowerBound], radix: 16), size > 0 else { break }
        let start = line.upperBound
        let bytes = Array(rest[start...].utf8)
        guard bytes.count >= size else { break }
        out += String(decoding: bytes[0..<size], as: UTF8.self)
        rest = Substring(String(decoding: bytes[size...], as: UTF8.self)).dropFirst(2)
    }
    return out
}

/// Waits (bounded) for a condition, polling.
private func eventually(seconds: Double = 30, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        Thread.sleep(forTimeInterval: 0.1)
    }
    return condition()
}

private func portAfter(_ needle: String, in output: String) -> String? {
    guard let r = output.range(of: needle + #"http://127\.0\.0\.1:(\d+)"#, options: .regularExpression) else { return nil }
    return output[r].split(separator: ":").last.map { String($0.prefix { $0.isNumber }) }
}

private func nodeID(_ output: String) -> String? {
    guard let r = output.range(of: #"node 0x[0-9a-f]{40}"#, options: .regularExpression) else { return nil }
    return String(output[r].dropFirst("node 0x".count))
}

/// Runs a program to completion (bounded); its exit code and output.
private func run(_ program: String, _ args: [String], timeout: Double = 120) throws -> (code: Int32, out: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: program)
    p.arguments = args
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    try p.run()
    let deadline = Date().addingTimeInterval(timeout)
    while p.isRunning, Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
    if p.isRunning { kill(p.processIdentifier, SIGKILL) }
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
}

private func which(_ name: String) -> String? {
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
        let path = "\(dir)/\(name)"
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return nil
}

/// Waits (bounded) for a process to end; its exit code, or nil if it did not.
private func exitCode(_ node: NodeProcess, within seconds: Double) -> Int32? {
    let deadline = Date().addingTimeInterval(seconds)
    while node.process.isRunning, Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
    return node.process.isRunning ? nil : node.process.terminationStatus
}

@Suite("Operating a node: metrics, status page, lifecycle, follow", .serialized)
struct OperatorTests {
    @Test("/metrics parses as Prometheus text (prometheus_client's parser) and its counters move as traffic flows")
    func metricsParseAndMove() throws {
        let a = try NodeProcess(["--port", "0", "--nat", "off", "--metrics", "0"])
        defer { a.stop() }
        #expect(a.waitFor("metrics: http://"))
        let port = try #require(a.port)
        let metricsPort = try #require(portAfter("metrics: ", in: a.output))
        let first = try #require(httpGet(metricsPort, "/metrics"))
        #expect(first.status == 200)
        for i in 0..<5 {
            let put = try P2PTool.run(["put", "--bootstrap", "127.0.0.1:\(port)", "metric key \(i)", "value \(i)"])
            #expect(put.code == 0, "\(put.err)")
        }
        func storageIn(_ text: String) -> Double {
            let line = text.split(separator: "\n").first { $0.hasPrefix("p2p_messages_total{") && $0.contains("direction=\"in\"") && $0.contains("command=\"dht.storage\"") }
            return line.flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0
        }
        var second = ""
        #expect(eventually { second = httpGet(metricsPort, "/metrics")?.body ?? ""; return storageIn(second) >= 5 && second.contains("p2p_storage_entries 5") })
        #expect(storageIn(first.body) < storageIn(second))

        // Prometheus' own parser reads it: every family and sample, typed.
        let file = temporaryPath("metrics.txt")
        defer { try? FileManager.default.removeItem(atPath: file) }
        try second.write(toFile: file, atomically: true, encoding: .utf8)
        let script = """
        import json, sys
        from prometheus_client.parser import text_string_to_metric_families
        fams = {f.name: (f.type, len(f.samples)) for f in text_string_to_metric_families(open(sys.argv[1]).read())}
        print(json.dumps(fams))
        """
        let python = try #require(which("python3"), "python3 is needed (scripts/test installs prometheus_client)")
        let parsed = try run(python, ["-c", script, file])
        #expect(parsed.code == 0, "prometheus_client could not parse /metrics (scripts/test installs it with pip): \(parsed.out)")
        let families = try #require(try JSONSerialization.jsonObject(with: Data(parsed.out.utf8)) as? [String: [Any]], "\(parsed.out)")
        // prometheus_client names counter families without the _total suffix.
        for (name, type) in [("p2p_messages", "counter"), ("p2p_message_bytes", "counter"), ("p2p_rpc_duration_seconds", "histogram"),
                             ("p2p_rpc_timeouts", "counter"), ("p2p_handshakes", "counter"), ("p2p_peers_verified", "gauge"),
                             ("p2p_sessions", "gauge"), ("p2p_storage_entries", "gauge"), ("p2p_storage_bytes", "gauge"),
                             ("p2p_reachable", "gauge"), ("p2p_plugins_loaded", "gauge"), ("p2p_replication_values_sent", "counter")] {
            #expect(families[name]?.first as? String == type, "\(name): \(String(describing: families[name]))")
        }
        #expect(families.count >= 20)
    }

    @Test("the status page, loaded in headless Chromium, shows the node's peers and stored entries; /status.json says the same")
    func statusPageInChromium() throws {
        let chromium = try #require(which("chromium"), "Debian's chromium is needed (scripts/test installs it)")
        let a = try NodeProcess(["--port", "0", "--nat", "off", "--status", "0"])
        defer { a.stop() }
        #expect(a.waitFor("status page: http://"))
        let port = try #require(a.port)
        let statusPort = try #require(portAfter("status page: ", in: a.output))
        var peers: [NodeProcess] = []
        defer { for p in peers { p.stop() } }
        for _ in 0..<3 {
            let p = try NodeProcess(["--port", "0", "--nat", "off", "--bootstrap", "127.0.0.1:\(port)"])
            peers.append(p)
            #expect(p.waitFor("bootstrapped via"))
        }
        let ids = peers.compactMap { nodeID($0.output) }
        #expect(ids.count == 3)
        for i in 0..<4 {
            let put = try P2PTool.run(["put", "--bootstrap", "127.0.0.1:\(port)", "--replicas", "4", "status key \(i)", "value \(i)"])
            #expect(put.code == 0, "\(put.err)")
        }
        var json: [String: Any] = [:]
        #expect(eventually {
            guard let body = httpGet(statusPort, "/status.json")?.body,
                  let object = try? JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any] else { return false }
            json = object
            return (object["verifiedPeers"] as? Int ?? 0) >= 3
        })
        let sections = json["sections"] as? [[String: Any]] ?? []
        let storage = sections.first { $0["title"] as? String == "storage" }
        let entriesRow = (storage?["rows"] as? [[String]])?.first { $0.first == "entries" }
        #expect(Int(entriesRow?.last ?? "") == 4, "\(String(describing: storage))")

        let dom = try run(chromium, ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=5000",
                                     "--dump-dom", "http://127.0.0.1:\(statusPort)/"])
        #expect(dom.code == 0, "\(dom.out.suffix(500))")
        for id in ids { #expect(dom.out.contains("data-id=\"\(id)\""), "peer \(id) not on the page") }
        #expect(dom.out.contains("id=\"section-storage\""))
        #expect(dom.out.contains("<th>entries</th><td>4</td>"), "\(dom.out.suffix(2000))")
        #expect(dom.out.contains("<b id=\"verified-count\">3</b>"))
        #expect(dom.out.contains("dht.storage"))
        // The page refreshed itself in Chromium's virtual time: the body was fetched again and put back.
        #expect(dom.out.contains("id=\"main\"><header>"))
    }

    @Test("SIGTERM: the node leaves gracefully (peers told, storage flushed) and exits 0; its peer sees it leave")
    func gracefulStop() throws {
        let file = temporaryPath("graceful.db")
        defer { try? FileManager.default.removeItem(atPath: file) }
        let a = try NodeProcess(["--port", "0", "--nat", "off"])
        defer { a.stop() }
        #expect(a.waitFor("listening on"))
        let port = try #require(a.port)
        let b = try NodeProcess(["--port", "0", "--nat", "off", "--storage", "sqlite:\(file)", "--bootstrap", "127.0.0.1:\(port)"])
        defer { b.stop() }
        #expect(b.waitFor("bootstrapped via"))
        let bID = try #require(nodeID(b.output))
        kill(b.process.processIdentifier, SIGTERM)
        #expect(exitCode(b, within: 30) == 0, "\(b.output)")
        #expect(b.output.contains("received SIGTERM, leaving"))
        #expect(b.output.contains("stopped"))
        #expect(a.waitFor("peer left: 0x\(bID)"), "\(a.output)")
        // The routing table was saved at stop: a restart rejoins from it without --bootstrap.
        let again = try NodeProcess(["--port", "0", "--nat", "off", "--storage", "sqlite:\(file)"])
        defer { again.stop() }
        #expect(again.waitFor("rejoined via"), "\(again.output)")
    }

    @Test("a stop that overruns --shutdown-timeout is cut off (exit 1); a second signal stops the node at once (exit 130)")
    func boundedAndSecondSignal() throws {
        // A plugin whose shutdown takes a minute: a plugin blocked in its own code.
        let dir = temporaryPath("slowstop")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = dir + "/slow.c", so = dir + "/slow.so"
        try """
        #include "p2p_plugin.h"
        #include <unistd.h>
        static int init(const p2p_host_api *h, p2p_bytes *e) { (void)h; (void)e; return P2P_OK; }
        static void stop(void) { sleep(60); }
        static const p2p_plugin_descriptor d = {P2P_PLUGIN_ABI_VERSION, "slowstop", "1.0.0", init, stop};
        const p2p_plugin_descriptor *p2p_plugin_entry(const p2p_host_api *h, uint32_t v) { (void)h; (void)v; return &d; }
        """.write(toFile: source, atomically: true, encoding: .utf8)
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let cc = try run("/usr/bin/env", ["cc", "-shared", "-fPIC", "-I", root.appendingPathComponent("Sources/P2PPluginABI/include").path, source, "-o", so])
        #expect(cc.code == 0, "\(cc.out)")

        let bounded = try NodeProcess(["--port", "0", "--nat", "off", "--plugin", so, "--shutdown-timeout", "1"])
        defer { bounded.kill9() }
        #expect(bounded.waitFor("listening on"))
        #expect(bounded.output.contains("slowstop"))
        kill(bounded.process.processIdentifier, SIGTERM)
        #expect(exitCode(bounded, within: 30) == 1, "\(bounded.output)")
        #expect(bounded.output.contains("stopping took longer than 1.0 s"), "\(bounded.output)")

        let twice = try NodeProcess(["--port", "0", "--nat", "off", "--plugin", so, "--shutdown-timeout", "120"])
        defer { twice.kill9() }
        #expect(twice.waitFor("listening on"))
        kill(twice.process.processIdentifier, SIGINT)
        #expect(twice.waitFor("received SIGINT, leaving"))
        kill(twice.process.processIdentifier, SIGINT)
        #expect(exitCode(twice, within: 30) == 130, "\(twice.output)")
        #expect(twice.output.contains("SIGINT again: stopping at once"))
    }

    @Test("p2p get --follow prints a value put by another peer as it is stored")
    func follow() throws {
        let a = try NodeProcess(["--port", "0", "--nat", "off"])
        defer { a.stop() }
        #expect(a.waitFor("listening on"))
        let port = try #require(a.port)
        let b = try NodeProcess(["--port", "0", "--nat", "off", "--bootstrap", "127.0.0.1:\(port)"])
        defer { b.stop() }
        #expect(b.waitFor("bootstrapped via"))
        let bPort = try #require(b.port)
        let follower = try NodeProcess(["--bootstrap", "127.0.0.1:\(port)", "followed key"], host: nil, subcommand: ["get", "--follow"])
        defer { follower.stop() }
        #expect(follower.waitFor("following 0x"), "\(follower.output)")
        for i in 1...3 {
            let put = try P2PTool.run(["put", "--bootstrap", "127.0.0.1:\(bPort)", "followed key", "news \(i)"])
            #expect(put.code == 0, "\(put.err)")
            #expect(follower.waitFor("news \(i)\n"), "\(follower.output)")
        }
        // Each value once, though every responsible peer reported it.
        #expect(follower.output.components(separatedBy: "news 2\n").count == 2)
        kill(follower.process.processIdentifier, SIGINT)
        #expect(exitCode(follower, within: 30) == 0, "\(follower.output)")
    }
}
