import P2PDHT
import P2PEvaluation
import P2PKernel
import P2PMessaging
import P2PStorage
import Testing
import P2PTestSupport

/// A plugin that needs a service nobody provides and has no default.
private struct NeedsRouting: Plugin {
    let name = "needs-routing"
    let version = "1"
    func install(into registry: PluginRegistry) throws {}
    var requirements: [PluginRequirement] {
        [.service((any RoutedMessageSender).self, "routed messages (the DHT plugin provides them)")]
    }
}

@Suite("Declared plugin requirements")
struct RequirementsTests {
    @Test("a node with only the DHT plugin gets the built-in evaluation schemes, and its gets work")
    func dhtInstallsItsDefault() async throws {
        let a = try await Node.builder().host("127.0.0.1").port(0).plugin(DHTPlugin()).start()
        let b = try await Node.builder().host("127.0.0.1").port(0).plugin(DHTPlugin()).start()
        #expect(a.registry.schemeNames.contains("majority"))
        #expect(a.registry.plugins.map(\.name) == ["dht", "evaluation"])
        _ = try await b.bootstrap(to: [a.address.socket])
        let key = Number640(location: Number160(hashing: "only-dht"))
        #expect(try await b.dht.put(key, Array("v".utf8)).isSuccess)
        #expect(try await a.dht.get(key).value == Array("v".utf8))
        await b.shutdown()
        await a.shutdown()
    }

    @Test("a missing requirement without a default stops the node from starting, naming it; with its provider installed the node starts")
    func missingRequirement() async throws {
        await #expect { try await Node.builder().host("127.0.0.1").port(0).plugin(NeedsRouting()).start() } throws: { error in
            "\(error)".contains("plugin 'needs-routing' needs routed messages (the DHT plugin provides them)")
        }
        let node = try await Node.builder().host("127.0.0.1").port(0).plugin(NeedsRouting()).plugin(DHTPlugin()).start()
        #expect(node.registry.service((any RoutedMessageSender).self) != nil)
        #expect(node.registry.service((any RawMessageSender).self) == nil)
        await node.shutdown()
    }
}
