import Foundation
import NIOCore
import P2PDHT
import P2PEvaluation
import P2PKernel
import P2PPluginHost
import P2PLoader
import P2PMessaging
import P2PStorage
import P2PTesting
import P2PWasm
import Testing

/// Builds a WebAssembly plugin from a C source with `p2p plugin build` (clang from the toolchain).
enum WasmFixture {
    static func build(_ name: String, source: String, prefix: String = "") throws -> String {
        let dir = Fixture.dir.appendingPathComponent("wasm-\(name)")
        try? FileManager.default.removeItem(at: dir)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let text = try String(contentsOf: Fixture.root.appendingPathComponent("Tests/P2PLoaderTests/Fixtures/\(source)"), encoding: .utf8)
        try (prefix + text).write(to: dir.appendingPathComponent("plugin.c"), atomically: true, encoding: .utf8)
        try FileManager.default.copyItem(at: Fixture.root.appendingPathComponent("Templates/wasm-c/p2p_wasm.h"), to: dir.appendingPathComponent("p2p_wasm.h"))
        try #"{ "name": "\#(name)", "language": "c", "sources": ["plugin.c"] }"#.write(to: dir.appendingPathComponent("wasm-plugin.json"), atomically: true, encoding: .utf8)
        let built = try p2p(["plugin", "build", dir.path])
        guard built.code == 0, let path = built.out.split(separator: "\n").last.map(String.init) else {
            throw FixtureError.compileFailed(name: "wasm \(name)", status: built.code)
        }
        return path
    }
}

/// Sends `text` to `command` on `peer` and returns the reply (or the peer's error).
func call(_ from: Node, _ peer: Node, _ command: String, _ bytes: [UInt8], transport: TransportChoice = .auto,
          timeout: Duration? = nil) async throws -> Result<String, RPCError> {
    let reply = try await from.request(to: peer.address, command: CommandID.derive(from: command), payload: [.bytes(bytes)],
                                       transport: transport, timeout: timeout).get()
    if let e = RPCError.from(reply: reply) { return .failure(e) }
    return .success(String(decoding: reply.firstBytes ?? [], as: UTF8.self))
}

func call(_ from: Node, _ peer: Node, _ command: String, _ text: String = "") async throws -> Result<String, RPCError> {
    try await call(from, peer, command, Array(text.utf8))
}

/// Waits for `condition` to hold, checking every 50 ms, up to `seconds`.
func eventually(_ seconds: Double = 30, _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(50))
    }
    return try await condition()
}

@Suite("WebAssembly plugins", .serialized)
struct WasmTests {
    /// Iterations of hostile.slow: a few seconds of interpreted work in a debug build.
    static let slowCount = "3000000"

    @Test("plugins built from the wasm-c and wasm-swift templates serve a 20-peer network: command, interceptor, evaluation scheme")
    func templatesAcrossNetwork() async throws {
        let c = try buildFromTemplate("cvote", "wasm-c")
        let swift = try buildFromTemplate("svote", "wasm-swift")
        #expect(c.hasSuffix("cvote.wasm") && swift.hasSuffix("svote.wasm"))
        let net = try await Testnet.start(peers: 20, routing: .perfect, plugins: { _ in
            [DHTPlugin(), EvaluationPlugin(), MessagingPlugin()] + [c, swift].compactMap { try? WasmPlugin.load($0) }
        })
        for node in net.nodes {
            #expect(Set(node.registry.plugins.map(\.name)).isSuperset(of: ["cvote", "svote"]))
        }
        // Commands, each peer's own instance answering another peer.
        #expect(try await call(net.nodes[3], net.nodes[7], "cvote.hello", "ada") == .success("hello, ada"))
        #expect(try await call(net.nodes[8], net.nodes[2], "svote.hello", "bob") == .success("hello, bob"))

        // Interceptors: five votes of 2 from five peers add up on the responsible peers (C), and
        // three of 4 (Swift); a vote that is not a number is refused with the plugin's reason.
        let cKey = Number640(location: Number160(hashing: "poll"), domain: Number160(hashing: "cvote"))
        for i in 0..<5 { #expect(try await net.nodes[i].dht.put(cKey, Array("2".utf8)).isSuccess) }
        #expect(try await net.nodes[12].dht.get(cKey).value.map { String(decoding: $0, as: UTF8.self) } == "10")
        let sKey = Number640(location: Number160(hashing: "poll"), domain: Number160(hashing: "svote"))
        for i in 5..<8 { #expect(try await net.nodes[i].dht.put(sKey, Array("4".utf8)).isSuccess) }
        #expect(try await net.nodes[13].dht.get(sKey).value.map { String(decoding: $0, as: UTF8.self) } == "12")
        let refused = try await net.nodes[9].dht.put(sKey, Array("many".utf8))
        #expect(!refused.isSuccess)
        #expect("\(refused)".contains("a vote must be a decimal integer"))

        // The scheme: the three replicas disagree (two hold 3, the closest holds 9); the majority
        // says 3, the plugin's "largest count" says 9.
        let key = Number640(location: Number160(hashing: "tally"))
        let replicas = net.trueClosest(to: key.location, count: 3)
        let closest = net.nodes.first { $0.peerID == replicas.first }
        // (All under one version stamp, as replicas that disagree on a version's bytes.)
        let stamp = VersionStamp.at(millis: WriterProof.nowMillis())
        for node in net.nodes where replicas.contains(node.peerID) {
            let value = node.peerID == closest?.peerID ? "9" : "3"
            _ = try node.registry.storageBackend?.execute(.put([key: StoredValue(Array(value.utf8), stamp: stamp)], mode: .overwrite), now: StoragePipeline.now())
        }
        let asker = net.nodes.first { !replicas.contains($0.peerID) }
        #expect(try await asker?.dht.get(key).value.map { String(decoding: $0, as: UTF8.self) } == "3")
        #expect(try await asker?.dht.get(key, options: DHTOptions(evaluation: "cvote.max")).value.map { String(decoding: $0, as: UTF8.self) } == "9")
        let plugin = try #require(net.nodes[7].registry.plugin(WasmPlugin.self))
        #expect(plugin.counters.calls > 0)
        await net.shutdown()
    }

    @Test("an endless loop, a trap, an out-of-bounds access, a memory grow past the limit, a result too large and a bad pointer each give the caller a typed error; the node keeps answering")
    func hostilePlugin() async throws {
        let path = try WasmFixture.build("hostile", source: "hostile_wasm.c")
        let limits = WasmLimits(fuelPerCall: 2_000_000, memoryBytes: 4 << 20, watchInterval: nil)
        let net = try await Testnet.start(peers: 3, routing: .perfect, plugins: { i in
            [DHTPlugin(), EvaluationPlugin()] + (i == 0 ? [try? WasmPlugin.load(path, limits: limits)].compactMap { $0 } : [])
        })
        let host = net.nodes[0], caller = net.nodes[1], bystander = net.nodes[2]
        #expect(try await call(caller, host, "hostile.echo", "before") == .success("before"))
        let expected: [(String, String)] = [
            ("hostile.loop", "outOfFuel"), ("hostile.trap", "trapped"), ("hostile.oob", "trapped"), ("hostile.grow", "memoryLimit"),
            ("hostile.big", "resultTooLarge"), ("hostile.badptr", "trapped"), ("hostile.recurse", "trapped"),
            ("hostile.spin_output", "outOfFuel"),
        ]
        for (command, code) in expected {
            let result = try await call(caller, host, command, "x")
            guard case .failure(let error) = result else {
                Issue.record("\(command) answered \(result)")
                continue
            }
            #expect(error.pluginErrorCode == code, "\(command): \(error)")
            // The node goes on: the plugin answers again (a fresh instance after a failure), and
            // the node answers other peers.
            #expect(try await call(caller, host, "hostile.echo", "after \(command)") == .success("after \(command)"))
            #expect(try await bystander.ping(host.address.socket).id == host.peerID)
        }
        // A thousand log lines cost fuel and are cut to 16; the call itself is fine.
        #expect(try await call(caller, host, "hostile.logspam") == .success("done"))
        // A request over the size limit never reaches the plugin.
        let tooBig = try await call(caller, host, "hostile.echo", [UInt8](repeating: 1, count: 70_000))
        #expect((try? tooBig.get()) == nil)
        if case .failure(let e) = tooBig { #expect(e.pluginErrorCode == "requestTooLarge") }
        // An interceptor that loops: the put fails with the typed error; other puts go on.
        let loopKey = Number640(location: Number160(hashing: "k"), domain: Number160(high: 0x100B_0000_0000_0000, middle: 0, low: 0))
        do {
            let looped = try await host.storage.execute(.put([loopKey: StoredValue(Array("loop".utf8))], mode: .overwrite), sender: nil, node: host)
            Issue.record("the looping interceptor let the put through: \(looped)")
        } catch let error as PluginCallError {
            #expect(error.code == "outOfFuel")
        }
        _ = try await host.storage.execute(.put([loopKey: StoredValue(Array("fine".utf8))], mode: .overwrite), sender: nil, node: host)
        guard case .values(let stored, _) = try await host.storage.execute(.get(.keys([loopKey])), sender: nil, node: host) else {
            Issue.record("no values")
            return
        }
        #expect(stored[loopKey].map { String(decoding: $0.value, as: UTF8.self) } == "fine")
        let plugin = try #require(host.registry.plugin(WasmPlugin.self))
        #expect(plugin.counters.failures >= expected.count)
        await net.shutdown()
    }

    @Test("a new version of the file replaces the behaviour while the node runs; a broken one leaves the old")
    func reload() async throws {
        let v1 = try WasmFixture.build("reload-v1", source: "hostile_wasm.c")
        let v2 = try WasmFixture.build("reload-v2", source: "hostile_wasm.c", prefix: "#define HOSTILE_VERSION \"v2\"\n")
        let live = Fixture.dir.appendingPathComponent("live.wasm").path
        try? FileManager.default.removeItem(atPath: live)
        try FileManager.default.copyItem(atPath: v1, toPath: live)
        let plugin = try WasmPlugin.load(live, limits: WasmLimits(fuelPerCall: 2_000_000_000, calls: PluginCallLimits(deadline: .seconds(60)),
                                                                  watchInterval: .milliseconds(100)))
        let net = try await Testnet.start(peers: 2, routing: .perfect, plugins: { i in i == 0 ? [plugin] : [] })
        let host = net.nodes[0], caller = net.nodes[1]
        let port = host.address.socket
        #expect(try await call(caller, host, "hostile.version") == .success("v1"))
        // Replace the file (as a deploy would: a new file renamed over the old).
        let staged = live + ".new"
        try? FileManager.default.removeItem(atPath: staged)
        try FileManager.default.copyItem(atPath: v2, toPath: staged)
        #expect(rename(staged, live) == 0)
        let switched = try await eventually { try await call(caller, host, "hostile.version") == .success("v2") }
        #expect(switched)
        #expect(plugin.generation == 2)
        #expect(host.address.socket == port)
        // A call in flight during a reload finishes on the version it started on (v2); the next
        // call runs the new one (v1 again).
        // Over TCP: a UDP request unanswered for a second is sent again, and the copy would be a
        // second call.
        let slow = Task { try await call(caller, host, "hostile.slow", Array(Self.slowCount.utf8), transport: .tcp, timeout: .seconds(60)) }
        #expect(await eventually { plugin.callsInFlight == 1 })
        try FileManager.default.copyItem(atPath: v1, toPath: staged)
        #expect(rename(staged, live) == 0)
        try plugin.reload()
        #expect(plugin.callsInFlight == 1, "the slow call ended before the reload did")
        #expect(try await call(caller, host, "hostile.version") == .success("v1"))
        #expect(try await slow.value == .success("v2 slow"))
        // A broken file: the reload fails with a typed error and v1 keeps answering.
        try Data("not wasm".utf8).write(to: URL(fileURLWithPath: staged))
        #expect(rename(staged, live) == 0)
        #expect(throws: WasmPluginError.self) { try plugin.reload() }
        #expect(try await call(caller, host, "hostile.version") == .success("v1"))
        #expect(plugin.generation >= 3)
        await net.shutdown()
    }
}

@Suite("Native plugins bounded", .serialized)
struct NativeBoundsTests {
    static func buildBounded() throws -> String {
        try Fixture.build("bounded", source: "bounded_plugin.c")
    }

    @Test("a request over a command's size limit is refused before the C function runs")
    func sizeLimit() async throws {
        let path = try Self.buildBounded()
        let limits = PluginCallLimits(maxRequestBytes: 1024)
        let net = try await Testnet.start(peers: 2, routing: .perfect, plugins: { i in
            i == 0 ? [try? PluginLoader.load(path, limits: limits)].compactMap { $0 } : []
        })
        let host = net.nodes[0], caller = net.nodes[1]
        let refused = try await call(caller, host, "bounded.count", [UInt8](repeating: 7, count: 2000))
        guard case .failure(let e) = refused else {
            Issue.record("a 2000-byte request was served: \(refused)")
            return
        }
        #expect(e.pluginErrorCode == "requestTooLarge")
        // The refused request never ran: the first call that does counts 1.
        #expect(try await call(caller, host, "bounded.count", [UInt8](repeating: 7, count: 1000)) == .success("1"))
        await net.shutdown()
    }

    @Test("a blocking C function runs off the event loop: pings are answered meanwhile, its caller gets a timeout, one call too many is refused")
    func blockingFunction() async throws {
        let path = try Self.buildBounded()
        // Its own executor, so that the blocked threads do not slow other suites.
        let executor = PluginExecutor(threads: 2)
        let limits = PluginCallLimits(maxInFlight: 2, deadline: .seconds(1))
        let net = try await Testnet.start(peers: 3, routing: .perfect, plugins: { i in
            i == 0 ? [try? PluginLoader.load(path, limits: limits, executor: executor)].compactMap { $0 } : []
        })
        let host = net.nodes[0], caller = net.nodes[1], pinger = net.nodes[2]
        let slow = (0..<2).map { _ in
            // Over TCP: a UDP request is sent again after a second without a reply, and the copy
            // would be a call of its own. (Blocked for 60 s: on a busy machine the twenty pings
            // below took longer than the 8 s this once slept, and a call that had ended was
            // missed by the check after them.)
            caller.request(to: host.address, command: CommandID.derive(from: "bounded.sleep"), payload: [.bytes(Array("60000".utf8))], transport: .tcp)
        }
        #expect(await eventually { executor.runningCalls == 2 })
        // Both plugin threads are blocked in C; the node still answers every ping.
        for _ in 0..<20 {
            #expect(try await pinger.ping(host.address.socket).id == host.peerID)
        }
        #expect(executor.runningCalls == 2)
        // A third call finds both slots taken.
        if case .failure(let e) = try await call(caller, host, "bounded.sleep", "1") {
            #expect(e.pluginErrorCode == "busy")
        } else {
            Issue.record("a third call ran with two in flight")
        }
        // The callers were answered at the deadline, while the C code still runs.
        for future in slow {
            let reply = try await future.get()
            #expect(RPCError.from(reply: reply)?.pluginErrorCode == "timedOut")
        }
        #expect(executor.overdueCalls > 0 || executor.runningCalls == 0)
        await net.shutdown()
    }

    @Test("two nodes of one process load one .so: separate state, and stopping one leaves the other's plugin running")
    func perNodeState() async throws {
        let path = try Self.buildBounded()
        let a = try await Node.builder().host("127.0.0.1").port(0).plugin(try PluginLoader.load(path)).start()
        let b = try await Node.builder().host("127.0.0.1").port(0).plugin(try PluginLoader.load(path)).start()
        let client = try await Node.builder().host("127.0.0.1").port(0).start()
        for n in 1...3 { #expect(try await call(client, a, "bounded.count") == .success("\(n)")) }
        #expect(try await call(client, b, "bounded.count") == .success("1"))
        await a.shutdown()
        // a's plugin was shut down (its copy's global says so); b's was not.
        #expect(try await call(client, b, "bounded.count") == .success("2"))
        await b.shutdown()
        await client.shutdown()
    }
}
