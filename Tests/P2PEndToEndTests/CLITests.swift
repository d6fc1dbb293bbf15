import Foundation
import Testing

/// Runs the `p2p` binary built beside the test bundle (`scripts/test` builds every product).
struct P2PTool {
    static var path: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("p2p").path
    }

    /// Runs to completion (bounded by `timeout`) and returns exit code, stdout, stderr; with a
    /// `launcher` (say `ip netns exec NS`), through it.
    static func run(launcher: [String] = [], _ args: [String], timeout: Double = 60) throws -> (code: Int32, out: String, err: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: launcher.first ?? path)
        p.arguments = launcher.isEmpty ? args : Array(launcher.dropFirst()) + [path] + args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning, Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        if p.isRunning { p.terminate() }
        p.waitUntilExit()
        return (p.terminationStatus,
                String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self),
                String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
    }
}

/// Two `p2p node` processes, the second joined through the first, and the `--bootstrap` arguments
/// that reach them (stop both when done).
func twoJoinedNodes() throws -> (NodeProcess, NodeProcess, [String]) {
    let a = try NodeProcess(["--port", "0"])
    #expect(a.waitFor("listening on"))
    guard let port = a.port else {
        a.stop()
        throw CLIError("the first node printed no port: \(a.output)")
    }
    let b = try NodeProcess(["--port", "0", "--bootstrap", "127.0.0.1:\(port)"])
    #expect(b.waitFor("bootstrapped via"))
    return (a, b, ["--bootstrap", "127.0.0.1:\(port)"])
}

struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A `p2p node` process whose output is collected as it runs.
final class NodeProcess: @unchecked Sendable {
    let process = Process()
    private let lock = NSLock()
    private var text = ""

    init(_ args: [String], host: String? = "127.0.0.1", launcher: [String] = [], subcommand: [String] = ["node"]) throws {
        let command = subcommand + (host.map { ["--host", $0] } ?? []) + args
        process.executableURL = URL(fileURLWithPath: launcher.first ?? P2PTool.path)
        process.arguments = launcher.isEmpty ? command : Array(launcher.dropFirst()) + [P2PTool.path] + command
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        pipe.fileHandleForReading.readabilityHandler = { [weak self] h in
            let chunk = String(decoding: h.availableData, as: UTF8.self)
            self?.lock.withLock { self?.text += chunk }
        }
        try process.run()
    }

    var output: String { lock.withLock { text } }

    /// Waits (bounded) until the output contains `needle`.
    func waitFor(_ needle: String, seconds: Double = 20) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if output.contains(needle) { return true }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return false
    }

    /// The port from "listening on HOST:PORT".
    var port: String? {
        guard let r = output.range(of: #"listening on [0-9.]+:(\d+)"#, options: .regularExpression) else { return nil }
        return output[r].split(separator: ":").last.map(String.init)
    }

    /// Kills the process at once (no quit announced, sockets closed by the kernel).
    func kill9() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    func stop() {
        if process.isRunning { process.terminate() }
        let deadline = Date().addingTimeInterval(10)
        while process.isRunning, Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }
}

@Suite("p2p tool", .serialized)
struct CLITests {
    @Test("bad arguments print one line and exit with code 2",
          arguments: [["ping", "not-an-address"], ["sim", "--peers", "0"], ["--bogus"], ["ping", "1.2.3.4:99999"],
                      ["lookup", "hello"], ["lookup", "--bootstrap", "127.0.0.1:1", "0x12"]])
    func badArguments(args: [String]) throws {
        let r = try P2PTool.run(args)
        #expect(r.code == 2)
        #expect(r.err.hasPrefix("p2p: "))
        #expect(r.err.split(separator: "\n").count == 1)
    }

    @Test("two node processes: ping, lookup, a port in use, and a graceful quit the other sees")
    func twoNodes() throws {
        let a = try NodeProcess(["--port", "0"])
        defer { a.stop() }
        #expect(a.waitFor("listening on"))
        let port = try #require(a.port)
        let b = try NodeProcess(["--port", "0", "--bootstrap", "127.0.0.1:\(port)"])
        defer { b.stop() }
        #expect(b.waitFor("bootstrapped via"))
        #expect(a.waitFor("peer joined"))
        let bPort = try #require(b.port)

        let ping = try P2PTool.run(["ping", "127.0.0.1:\(bPort)"])
        #expect(ping.code == 0)
        #expect(ping.out.contains("reply from"))
        let tcp = try P2PTool.run(["ping", "--tcp", "127.0.0.1:\(port)"])
        #expect(tcp.code == 0)
        let lookup = try P2PTool.run(["lookup", "--bootstrap", "127.0.0.1:\(port)", "hello"])
        #expect(lookup.code == 0)
        #expect(lookup.out.contains("2 peers"))
        let inUse = try P2PTool.run(["node", "--host", "127.0.0.1", "--port", port])
        #expect(inUse.code == 2)
        #expect(inUse.err.contains("cannot listen"))

        b.stop()
        #expect(b.process.terminationStatus == 0)
        #expect(b.output.contains("stopped"))
        #expect(a.waitFor("(quit)"))
    }

    @Test("a node takes its settings from a config file; a malformed one exits 2 naming the field")
    func configFile() throws {
        let dir = FileManager.default.temporaryDirectory
        let good = dir.appendingPathComponent("p2p-node-\(getpid()).json")
        try Data(#"{"port": 0, "host": "127.0.0.1", "plugins": ["dht", "evaluation"]}"#.utf8).write(to: good)
        let node = try NodeProcess(["--config", good.path])
        defer { node.stop() }
        #expect(node.waitFor("listening on 127.0.0.1:"))
        #expect(node.output.contains("plugins: dht, evaluation"))
        let bad = dir.appendingPathComponent("p2p-bad-\(getpid()).json")
        try Data(#"{"port": "four thousand"}"#.utf8).write(to: bad)
        let r = try P2PTool.run(["node", "--config", bad.path])
        #expect(r.code == 2)
        #expect(r.err.contains("port"))
    }

    @Test("sim --json reports every figure the issue names")
    func simJSON() throws {
        let r = try P2PTool.run(["sim", "--peers", "30", "--lookups", "20", "--json"])
        #expect(r.code == 0)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any])
        #expect(object["peers"] as? Int == 30)
        #expect(object["bootstrap_s"] is Double || object["bootstrap_s"] is Int)
        #expect(object["memory_per_peer_kib"] != nil)
        let lookup = try #require(object["lookup"] as? [String: Any])
        for key in ["p50_ms", "p95_ms", "p99_ms", "hops_mean", "recall"] {
            #expect(lookup[key] != nil, "missing lookup.\(key)")
        }
        #expect(lookup["count"] as? Int == 20)
        #expect((lookup["recall"] as? Double ?? 0) >= 0.95)
    }
}

@Suite("p2p identities and modes", .serialized)
struct CLIIdentityTests {
    @Test("keygen writes a key and prints its id; id prints it again; a node run with --key keeps that id across restarts")
    func keygenAndRestart() throws {
        let path = temporaryPath("node.key")
        let made = try P2PTool.run(["keygen", path])
        #expect(made.code == 0)
        let id = made.out.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(id.hasPrefix("0x") && id.count == 42)
        #expect(try P2PTool.run(["id", path]).out.trimmingCharacters(in: .whitespacesAndNewlines) == id)
        #expect(try P2PTool.run(["keygen", path]).code == 2)  // never overwrites
        for _ in 0..<2 {
            let node = try NodeProcess(["--port", "0", "--key", path])
            #expect(node.waitFor("listening on"))
            #expect(node.output.contains("node \(id) "))
            let port = try #require(node.port)
            let ping = try P2PTool.run(["ping", "127.0.0.1:\(port)"])
            #expect(ping.out.contains("reply from \(id)"))
            node.stop()
        }
    }

    @Test("put --key --protect entry signs and protects; a stranger's put and remove exit 1 naming the owner; get --json shows the verified signer; the owner removes")
    func signedAndProtected() throws {
        let alice = temporaryPath("alice.key"), bob = temporaryPath("bob.key")
        let aliceID = try P2PTool.run(["keygen", alice]).out.trimmingCharacters(in: .whitespacesAndNewlines)
        _ = try P2PTool.run(["keygen", bob])
        let (a, b, seed) = try twoJoinedNodes()
        defer { a.stop(); b.stop() }

        let put = try P2PTool.run(["put"] + seed + ["--key", alice, "--protect", "entry", "diary", "day one"])
        #expect(put.code == 0, "\(put.err)")
        #expect(put.out.contains("signed by \(aliceID)"))
        for args in [["put"] + seed + ["--key", bob, "diary", "bob was here"], ["put"] + seed + ["diary", "anonymous"],
                     ["remove"] + seed + ["--key", bob, "diary"]] {
            let denied = try P2PTool.run(args)
            #expect(denied.code == 1, "\(args): \(denied.err)")
            #expect(denied.err.split(separator: "\n").count == 1, "\(denied.err)")
            #expect(denied.err.contains("owned by \(aliceID)"), "\(denied.err)")
        }
        let get = try P2PTool.run(["get"] + seed + ["--json", "diary"])
        #expect(get.code == 0)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(get.out.utf8)) as? [String: Any])
        let values = try #require(object["values"] as? [String: String])
        #expect(Array(values.values) == ["day one"])
        let signers = try #require(object["signers"] as? [String: [String: Any]])
        #expect(signers.values.first?["signer"] as? String == aliceID)
        #expect(signers.values.first?["verified"] as? Bool == true)
        #expect(try P2PTool.run(["put"] + seed + ["--protect", "entry", "diary", "x"]).code == 2)  // --protect needs --key
        let removed = try P2PTool.run(["remove"] + seed + ["--key", alice, "diary"])
        #expect(removed.code == 0, "\(removed.err)")
        #expect(try P2PTool.run(["get"] + seed + ["diary"]).code == 1)
    }

    @Test("tracker: add --once lists the peer with its attachment, get prints it (and --json); an announcer stays listed; nobody listed exits 1; bad arguments exit 2")
    func tracker() throws {
        let (a, b, seed) = try twoJoinedNodes()
        defer { a.stop(); b.stop() }

        let add = try P2PTool.run(["tracker", "add", "--host", "127.0.0.1"] + seed + ["--once", "--attachment", "hello tracker", "swarm"])
        #expect(add.code == 0, "\(add.err)")
        // Both nodes and the adder itself are the trackers (two, if a lookup missed one).
        #expect(add.out.contains("on 3 trackers") || add.out.contains("on 2 trackers"), "\(add.out)")
        let id = try #require(add.out.split(separator: " ").dropFirst().first.map(String.init))
        let get = try P2PTool.run(["tracker", "get"] + seed + ["--json", "swarm"])
        #expect(get.code == 0, "\(get.err)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(get.out.utf8)) as? [String: Any])
        let peers = try #require(object["peers"] as? [[String: String]])
        #expect(peers.map { $0["id"] } == [id])
        #expect(peers.first?["attachment"] == "hello tracker")

        let announcer = try NodeProcess(seed + ["--attachment", "still here", "swarm2"], subcommand: ["tracker", "add"])
        defer { announcer.stop() }
        #expect(announcer.waitFor("re-adding every"), "\(announcer.output)")
        let listed = try P2PTool.run(["tracker", "get"] + seed + ["swarm2"])
        #expect(listed.code == 0 && listed.out.contains("still here"), "\(listed.out) \(listed.err)")

        let nobody = try P2PTool.run(["tracker", "get"] + seed + ["nobody here"])
        #expect(nobody.code == 1 && nobody.err.contains("nobody is listed"), "\(nobody.err)")
        #expect(try P2PTool.run(["tracker", "add", "swarm"]).code == 2)
        #expect(try P2PTool.run(["tracker", "add"] + seed + ["--attachment", String(repeating: "x", count: 1_025), "swarm"]).code == 2)
        #expect(try P2PTool.run(["tracker", "get"] + seed + ["0x12"]).code == 2)
    }

    @Test("bad key files exit 2 with one clear line", arguments: ["missing", "open", "garbage"])
    func badKeys(kind: String) throws {
        let path = temporaryPath("bad.key")
        switch kind {
        case "open":
            _ = try P2PTool.run(["keygen", path])
            chmod(path, 0o644)
        case "garbage":
            FileManager.default.createFile(atPath: path, contents: Data("not a key\n".utf8), attributes: [.posixPermissions: 0o600])
        default:
            break
        }
        for args in [["id", path], ["node", "--port", "0", "--key", path], ["ping", "--key", path, "127.0.0.1:1"]] {
            let r = try P2PTool.run(args, timeout: 20)
            #expect(r.code == 2, "\(args)")
            #expect(r.err.hasPrefix("p2p: key file"), "\(args): \(r.err)")
            #expect(r.err.split(separator: "\n").count == 1)
        }
    }

    @Test("an insecure client and a secure node refuse each other with a clear message")
    func modesRefuse() throws {
        let node = try NodeProcess(["--port", "0"])
        defer { node.stop() }
        #expect(node.waitFor("authenticated sessions"))
        let port = try #require(node.port)
        let r = try P2PTool.run(["ping", "--insecure", "127.0.0.1:\(port)"])
        #expect(r.code == 1)
        #expect(r.err.contains("requires authenticated sessions"))
        #expect(node.waitFor("refused a plaintext request"))
    }
}

@Suite("The README's WebAssembly plugin steps", .serialized)
struct WasmReadmeTests {
    @Test("new, build, inspect, load, call, vote, then a rebuilt file is reloaded by the running node (and SIGHUP reloads)")
    func asWritten() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("p2p-readme-wasm-\(getpid())/ballot")
        try? FileManager.default.removeItem(at: dir)
        defer { try? FileManager.default.removeItem(at: dir.deletingLastPathComponent()) }
        #expect(try P2PTool.run(["plugin", "new", "ballot", "--template", "wasm-c", "--output", dir.path]).code == 0)
        let built = try P2PTool.run(["plugin", "build", dir.path], timeout: 120)
        let wasm = dir.appendingPathComponent("ballot.wasm").path
        #expect(built.code == 0)
        #expect(built.out.split(separator: "\n").last.map(String.init) == wasm)
        let inspected = try P2PTool.run(["plugin", "inspect", wasm])
        #expect(inspected.out.contains("commands:      ballot.hello"))
        #expect(inspected.out.contains("fuel per call"))
        let node = try NodeProcess(["--port", "0", "--plugin", wasm])
        defer { node.stop() }
        #expect(node.waitFor("listening on"))
        #expect(node.output.contains("plugin \(wasm): ballot 1.0.0 (WebAssembly"))
        let at = ["--bootstrap", "127.0.0.1:\(node.port ?? "0")"]
        #expect(try P2PTool.run(["call"] + at + ["ballot.hello", "world"]).out.contains("hello, world"))
        #expect(try P2PTool.run(["put"] + at + ["--domain", "ballot", "poll", "5"]).code == 0)
        #expect(try P2PTool.run(["put"] + at + ["--domain", "ballot", "poll", "7"]).code == 0)
        #expect(try P2PTool.run(["get"] + at + ["--domain", "ballot", "poll"]).out.contains("12"))
        // The README's edit, then a build: the running node picks the new file up.
        let source = dir.appendingPathComponent("ballot.c")
        let text = try String(contentsOf: source, encoding: .utf8)
        try text.replacingOccurrences(of: "\"hello, \"", with: "\"howdy, \"").write(to: source, atomically: true, encoding: .utf8)
        #expect(try P2PTool.run(["plugin", "build", dir.path], timeout: 120).code == 0)
        #expect(node.waitFor("reloaded \(wasm): generation 2", seconds: 30))
        #expect(try P2PTool.run(["call"] + at + ["ballot.hello", "world"]).out.contains("howdy, world"))
        // The votes are storage, not plugin state: they survive the reload.
        #expect(try P2PTool.run(["get"] + at + ["--domain", "ballot", "poll"]).out.contains("12"))
        kill(node.process.processIdentifier, SIGHUP)
        #expect(node.waitFor("reloaded \(wasm): generation 3", seconds: 30))
    }
}
