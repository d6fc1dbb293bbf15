import Foundation
import P2PDHT
import P2PEvaluation
import P2PKernel
import P2PLoader
import P2PMessaging
import P2PTesting
import Testing

/// Runs the `p2p` tool built beside the test bundle.
func p2p(_ args: [String]) throws -> (code: Int32, out: String) {
    let tool = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("p2p")
    let p = Process()
    p.executableURL = tool
    p.arguments = args
    let out = Pipe()
    p.standardOutput = out
    p.standardError = FileHandle.nullDevice
    try p.run()
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// Creates a plugin from a template with `p2p plugin new` and builds it with `p2p plugin build`.
func buildFromTemplate(_ name: String, _ kind: String) throws -> String {
    let dir = Fixture.dir.appendingPathComponent("templates").appendingPathComponent(name)
    try? FileManager.default.removeItem(at: dir)
    let created = try p2p(["plugin", "new", name, "--template", kind, "--output", dir.path])
    guard created.code == 0 else { throw FixtureError.compileFailed(name: "new \(name)", status: created.code) }
    let built = try p2p(["plugin", "build", dir.path])
    guard built.code == 0, let path = built.out.split(separator: "\n").last.map(String.init) else {
        throw FixtureError.compileFailed(name: "build \(name)", status: built.code)
    }
    return path
}

@Suite("Plugins built from the templates", .serialized)
struct TemplateTests {
    @Test("every template builds, loads, and serves a 20-peer network")
    func allTemplates() async throws {
        let paths = [
            try buildFromTemplate("tally", "storage-interceptor"),
            try buildFromTemplate("rev", "command"),
            try buildFromTemplate("greet", "reply-handler"),
            try buildFromTemplate("longest", "evaluation-scheme"),
            try buildFromTemplate("calc", "c-command"),
        ]
        #expect(paths.map { URL(fileURLWithPath: $0).lastPathComponent } == ["libTally.so", "libRev.so", "libGreet.so", "libLongest.so", "libcalc.so"])
        let net = try await Testnet.start(peers: 20, routing: .perfect, plugins: { _ in
            [DHTPlugin(), EvaluationPlugin(), MessagingPlugin()] + paths.compactMap { try? PluginLoader.load($0) }
        })
        for node in net.nodes {
            #expect(Set(node.registry.plugins.map(\.name)).isSuperset(of: ["tally", "rev", "greet", "longest", "calc"]))
            #expect(node.refusedPlugins.isEmpty)
        }

        // storage-interceptor: votes from five peers are summed on the responsible peers.
        var votesDomain = Array("votes".utf8)
        votesDomain += [UInt8](repeating: 0, count: 20 - votesDomain.count)
        let ballot = Number640(location: Number160(hashing: "ballot"), domain: try #require(Number160(bytes: votesDomain)))
        for i in 0..<5 { #expect(try await net.nodes[i].dht.put(ballot, Array("1".utf8)).isSuccess) }
        let holders = try net.nodes.filter { n in
            guard case .values(let v, _)? = try n.registry.storageBackend?.execute(.get(.keys([ballot])), now: StoragePipeline.now()) else { return false }
            return v[ballot]?.value == Array("5".utf8)
        }
        #expect(holders.count == DHTOptions.defaultReplicaSet)
        #expect(try await net.nodes[9].dht.get(ballot).value == Array("5".utf8))
        // A sum past Int.max (network input) is refused with a reason, not trapped on; the count stays.
        let big = Number640(location: Number160(hashing: "big ballot"), domain: ballot.domain)
        #expect(try await net.nodes[0].dht.put(big, Array(String(Int.max).utf8)).isSuccess)
        let overflow = try await net.nodes[1].dht.put(big, Array("1".utf8))
        // Every replica that holds the count refuses (the fan-out may still place the put on peers past them).
        #expect(overflow.failures.count >= 3 && overflow.failures.values.allSatisfy { $0.contains("overflow") }, "\(overflow.failures)")
        #expect(try await net.nodes[9].dht.get(big).value == Array(String(Int.max).utf8))

        // command: routed from another peer to the peers closest to a key.
        var first = DHTOptions()
        first.evaluation = "first"
        let reversed = try await net.nodes[7].dht.send(to: Number160(hashing: "x"), command: "rev.reverse", Array("stressed".utf8), options: first)
        #expect(reversed.reply == Array("desserts".utf8))
        #expect(reversed.replies.count == 3)

        // reply-handler: a direct message.
        #expect(try await net.nodes[2].messaging.send(Array("hello".utf8), to: net.nodes[3].address) == Array("world".utf8))

        // evaluation-scheme: chosen by name for a get.
        let k = Number640(location: Number160(hashing: "multi"))
        try await net.nodes[4].dht.put(k, Array("value".utf8))
        var longest = DHTOptions()
        longest.evaluation = "longest.longest"
        #expect(try await net.nodes[5].dht.get(k, options: longest).value == Array("value".utf8))

        // c-command: typed results when called remotely; mismatches are refused without a call.
        let callee = net.nodes[11].address
        func call(_ command: String, _ args: [FFIValue]) async throws -> Message {
            try await net.nodes[10].request(to: callee, command: CommandID.derive(from: command), payload: [.bytes(FFIValue.encode(args))]).get()
        }
        let sum = try await call("calc.add", [.int(2, .i64), .int(40, .i64)])
        #expect(try FFIValue.decode(sum.firstBytes ?? []) == [.int(42, .i64)])
        let text = try await call("calc.reverse", [.string("hello")])
        #expect(try FFIValue.decode(text.firstBytes ?? []) == [.string("olleh")])
        let sumBytes = try await call("calc.checksum", [.bytes([1, 2, 3])])
        #expect(try FFIValue.decode(sumBytes.firstBytes ?? []) == [.uint(851_975, .u32)])
        let tooFew = try await call("calc.add", [.int(2, .i64)])
        #expect(tooFew.type == .badRequest)
        #expect(String(decoding: tooFew.firstBytes ?? [], as: UTF8.self).contains("takes 2 arguments, got 1"))
        let wrongType = try await call("calc.add", [.int(2, .i64), .string("40")])
        #expect(String(decoding: wrongType.firstBytes ?? [], as: UTF8.self).contains("argument 2 of calc.add must be i64, got string"))
        #expect(try await net.nodes[10].ping(callee.socket).id == callee.id)
        await net.shutdown()
    }

    @Test("the shipped examples: PeerVote as a .so counts votes in the vote domain; CMath's C functions answer typed calls")
    func shippedExamples() async throws {
        let votePath = try p2p(["plugin", "build", Fixture.root.appendingPathComponent("Plugins/PeerVoteLoadable").path]).out
            .split(separator: "\n").last.map(String.init) ?? ""
        let mathPath = try p2p(["plugin", "build", Fixture.root.appendingPathComponent("Plugins/CMath").path]).out
            .split(separator: "\n").last.map(String.init) ?? ""
        let net = try await Testnet.start(peers: 10, routing: .perfect, plugins: { _ in
            [DHTPlugin(), EvaluationPlugin()] + [votePath, mathPath].compactMap { try? PluginLoader.load($0) }
        })
        let node = net.nodes[0]
        #expect(node.registry.plugins.map(\.name).suffix(2) == ["peervote-loadable", "cmath"])
        let scopes = node.registry.interceptors(covering: nil).map(\.scope)
        #expect(scopes == [.domain(Number160(hashing: "vote"))])
        let ballot = Number640(location: Number160(hashing: "ballot"), domain: Number160(hashing: "vote"))
        for n in net.nodes { #expect(try await n.dht.put(ballot, Array("1".utf8)).isSuccess) }
        #expect(try await net.nodes[3].dht.get(ballot).value == Array("10".utf8))

        func call(_ command: String, _ args: [FFIValue]) async throws -> [FFIValue] {
            let reply = try await net.nodes[1].request(to: net.nodes[2].address, command: CommandID.derive(from: command),
                                                       payload: [.bytes(FFIValue.encode(args))]).get()
            return try FFIValue.decode(reply.firstBytes ?? [])
        }
        #expect(try await call("cmath.gcd", [.uint(84, .u64), .uint(36, .u64)]) == [.uint(12, .u64)])
        #expect(try await call("cmath.is_prime", [.uint(7919, .u32)]) == [.bool(true)])
        #expect(try await call("cmath.hypot", [.double(3), .double(4)]) == [.double(5)])
        #expect(try await call("cmath.repeat", [.string("ab"), .int(3, .i32)]) == [.string("ababab")])
        await net.shutdown()
    }

    @Test("a manifest with an unknown type is refused with the type named")
    func badManifest() throws {
        let dir = Fixture.dir.appendingPathComponent("badmanifest")
        try? FileManager.default.removeItem(at: dir)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let library = dir.appendingPathComponent("libodd.so").path
        try FileManager.default.copyItem(atPath: try Fixture.build("plain", defines: ["NO_ENTRY"]), toPath: library)
        try Data(#"{"name": "odd", "functions": [{"command": "odd.f", "symbol": "not_the_entry", "params": ["i128"], "returns": "i32"}]}"#.utf8)
            .write(to: dir.appendingPathComponent("libodd.json"))
        #expect {
            try PluginLoader.load(library)
        } throws: { e in
            guard case PluginLoadError.badManifest(_, let reason) = e else { return false }
            return reason.contains("unknown parameter type 'i128'")
        }
        try Data(#"{"name": "odd", "functions": [{"command": "odd.f", "symbol": "missing_symbol", "params": [], "returns": "i32"}]}"#.utf8)
            .write(to: dir.appendingPathComponent("libodd.json"))
        #expect { try PluginLoader.load(library) } throws: { e in "\(e)".contains("symbol 'missing_symbol' is not in") }
    }
}
