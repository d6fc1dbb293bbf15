import Foundation
import P2PDHT
import P2PEvaluation
import P2PKernel
import P2PLoader
import P2PMessaging
import P2PTesting
import Testing

enum FixtureError: Error {
    case compileFailed(name: String, status: Int32)
}

/// Builds the C fixture plugin (with variant defines) into a temporary folder.
enum Fixture {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let dir: URL = {
        let d = FileManager.default.temporaryDirectory.appendingPathComponent("p2p-loader-tests-\(getpid())")
        try? FileManager.default.createDirectory(at: d, withIntermediateDirectories: true)
        return d
    }()

    static func build(_ name: String, defines: [String] = [], source: String = "sample_plugin.c") throws -> String {
        let out = dir.appendingPathComponent("\(name).so").path
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["cc", "-shared", "-fPIC", "-I", root.appendingPathComponent("Sources/P2PPluginABI/include").path]
            + defines.map { "-D\($0)" }
            + [root.appendingPathComponent("Tests/P2PLoaderTests/Fixtures/\(source)").path, "-o", out]
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw FixtureError.compileFailed(name: name, status: p.terminationStatus) }
        return out
    }

    /// The fixture's tally domain (see sample_plugin.c).
    static let tallyDomain = Number160(high: 0x7A11_7A11_0000_0000, middle: 0, low: 0)
}

@Suite("Loaded .so plugins", .serialized)
struct LoaderTests {
    @Test("a C plugin serves a 20-peer network: its interceptor, command, reply handler and scheme all work")
    func cPluginAcrossNetwork() async throws {
        let path = try Fixture.build("sample")
        let net = try await Testnet.start(peers: 20, routing: .perfect, plugins: { _ in
            let loaded: [any Plugin] = (try? PluginLoader.load(path)).map { [$0] } ?? []
            return [DHTPlugin(), EvaluationPlugin(), MessagingPlugin()] + loaded
        })
        for node in net.nodes { #expect(node.registry.plugins.contains { $0.name == "sample" }) }

        // Interceptor: five puts into the tally domain from five peers add up on the responsible peers.
        let k = Number640(location: Number160(hashing: "count"), domain: Fixture.tallyDomain)
        for i in 0..<5 { #expect(try await net.nodes[i].dht.put(k, Array("2".utf8)).isSuccess) }
        #expect(try await net.nodes[10].dht.get(k).value.map { String(decoding: $0, as: UTF8.self) } == "10")
        let refused = try await net.nodes[11].dht.put(k, Array("many".utf8))
        #expect(refused.failures.values.contains { $0.contains("a tally takes an integer") })

        // Command, routed from another peer to the peers closest to a key.
        var first = DHTOptions()
        first.evaluation = "first"
        let routed = try await net.nodes[3].dht.send(to: Number160(hashing: "anywhere"), command: "sample.upper", Array("shout".utf8), options: first)
        #expect(routed.replies.count == 3)
        #expect(routed.reply.map { String(decoding: $0, as: UTF8.self) } == "SHOUT")

        // Raw reply handler, over a direct message.
        let world = try await net.nodes[0].messaging.send(Array("hello".utf8), to: net.nodes[1].address)
        #expect(String(decoding: world, as: UTF8.self) == "world")
        await #expect {
            _ = try await net.nodes[0].messaging.send(Array("hi".utf8), to: net.nodes[1].address)
        } throws: { e in "\(e)".contains("say hello") }

        // Evaluation scheme chosen by name.
        let multi = Number640(location: Number160(hashing: "several"))
        try await net.nodes[2].dht.put(multi, Array("short".utf8))
        var longest = DHTOptions()
        longest.evaluation = "sample.longest"
        #expect(try await net.nodes[4].dht.get(multi, options: longest).value.map { String(decoding: $0, as: UTF8.self) } == "short")
        await net.shutdown()
    }

    @Test("bad plugins are refused with clear errors")
    func refusals() throws {
        let otherABI = try Fixture.build("abi2", defines: ["SAMPLE_ABI=2"])
        #expect(throws: PluginLoadError.abiMismatch(path: otherABI, plugin: 2, host: PluginLoader.abiVersion)) { try PluginLoader.load(otherABI) }
        let text = Fixture.dir.appendingPathComponent("bogus.so").path
        try Data("not an elf".utf8).write(to: URL(fileURLWithPath: text))
        #expect { try PluginLoader.load(text) } throws: { e in
            guard case PluginLoadError.notASharedObject(let p, let reason) = e else { return false }
            return p == text && !reason.isEmpty
        }
        let noEntry = try Fixture.build("noentry", defines: ["NO_ENTRY"])
        #expect(throws: PluginLoadError.noEntrySymbol(path: noEntry)) { try PluginLoader.load(noEntry) }
        let missing = Fixture.dir.appendingPathComponent("missing.so").path
        #expect(throws: PluginLoadError.fileMissing(path: missing)) { try PluginLoader.load(missing) }
        #expect("\(PluginLoadError.abiMismatch(path: "x.so", plugin: 2, host: 1))".contains("version 2, this node speaks version 1"))
    }

    @Test("a duplicate name, a duplicate command and a failing init are refused while the node keeps serving")
    func refusedAtInstall() async throws {
        let good = try PluginLoader.load(try Fixture.build("sample"))
        let again = try PluginLoader.load(try Fixture.build("sample-again"))
        let dupCommand = try PluginLoader.load(try Fixture.build("dupcmd", defines: ["SAMPLE_NAME=\"dupcmd\"", "DUPLICATE_COMMAND"]))
        let failing = try PluginLoader.load(try Fixture.build("failing", defines: ["SAMPLE_NAME=\"failing\"", "FAIL_INIT"]))
        let node = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil)
            .plugins([DHTPlugin(), EvaluationPlugin(), MessagingPlugin()])
            .plugins([good, again, dupCommand, failing], optional: true).start()
        let refused = Dictionary(uniqueKeysWithValues: node.refusedPlugins.map { ($0.name, $0.reason) })
        #expect(refused["sample"]?.contains("a plugin named 'sample' is already installed") == true)
        #expect(refused["dupcmd"]?.contains("'sample.upper' is already registered") == true)
        #expect(refused["failing"]?.contains("the sample refuses to start") == true)
        #expect(node.registry.plugins.filter { $0.name == "sample" }.count == 1)
        // The node serves on, the good plugin included.
        let other = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).plugin(MessagingPlugin()).start()
        #expect(try await other.ping(node.address.socket).id == node.peerID)
        let reply = try await other.request(to: node.address, command: "sample.upper", payload: [.bytes(Array("ok".utf8))])
        #expect(reply.firstBytes.map { String(decoding: $0, as: UTF8.self) } == "OK")
        await other.shutdown()
        await node.shutdown()
    }
}
