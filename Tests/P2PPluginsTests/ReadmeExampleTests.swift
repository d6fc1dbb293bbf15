// The storage interceptor shown in README.md, verbatim (the last test below keeps them equal).
import Foundation
import P2PDHT
import P2PEvaluation
import P2PKernel
import P2PTesting
import Testing
import P2PTestSupport

struct Counter: StorageInterceptor {
    let scope = InterceptorScope.domain(Number160(hashing: "visits"))

    func intercept(_ request: StorageRequest, context: StorageContext, next: StorageNext) async throws -> StorageResult {
        guard case .put(let entries, let mode) = request,
              case .values(let old, _) = try context.backend.execute(.get(.keys(Array(entries.keys))), now: context.now)
        else { return try await next(request) }
        var summed = entries
        for (key, new) in entries {
            // Network input: a number that is not one, or a sum past Int.max, is refused, not trapped on.
            guard let added = Int(String(decoding: new.value, as: UTF8.self)) else { throw StorageError.malformed("a visit count must be an integer") }
            let before = old[key].flatMap { Int(String(decoding: $0.value, as: UTF8.self)) } ?? 0
            let (sum, overflow) = before.addingReportingOverflow(added)
            guard !overflow else { throw StorageError.malformed("the count would overflow") }
            summed[key]?.value = Array(String(sum).utf8)
        }
        return try await next(.put(summed, mode: mode))
    }
}

struct CounterPlugin: Plugin {
    let name = "counter", version = "1.0.0"
    func install(into registry: PluginRegistry) throws { registry.add(interceptor: Counter()) }
}

@Suite("README example")
struct ReadmeExampleTests {
    @Test("the README's counter interceptor adds visits instead of replacing them")
    func counter() async throws {
        let net = try await Testnet.start(peers: 5, routing: .perfect, plugins: { _ in [DHTPlugin(), EvaluationPlugin(), CounterPlugin()] })
        let k = Number640(location: Number160(hashing: "home page"), domain: Number160(hashing: "visits"))
        for node in net.nodes { try await node.dht.put(k, Array("2".utf8)) }
        #expect(try await net.nodes[0].dht.get(k).value.map { String(decoding: $0, as: UTF8.self) } == "10")
        // A sum past Int.max and a count that is no number are refused with a reason; the count stays.
        let big = Number640(location: Number160(hashing: "big"), domain: Number160(hashing: "visits"))
        try await net.nodes[0].dht.put(big, Array(String(Int.max).utf8))
        let overflow = try await net.nodes[1].dht.put(big, Array("1".utf8))
        // Every replica that holds the count refuses (the fan-out may still place the put on peers past them).
        #expect(overflow.failures.count >= 3 && overflow.failures.values.allSatisfy { $0.contains("overflow") }, "\(overflow.failures)")
        let notANumber = try await net.nodes[1].dht.put(k, Array("ten".utf8))
        #expect(notANumber.failures.count >= 3 && notANumber.failures.values.allSatisfy { $0.contains("integer") }, "\(notANumber.failures)")
        #expect(try await net.nodes[0].dht.get(big).value.map { String(decoding: $0, as: UTF8.self) } == String(Int.max))
        #expect(try await net.nodes[0].dht.get(k).value.map { String(decoding: $0, as: UTF8.self) } == "10")
        await net.shutdown()
    }

    @Test("the README's interceptor is the one in this file")
    func readmeMatches() throws {
        let here = URL(fileURLWithPath: #filePath)
        let root = here.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let readme = try String(contentsOf: root.appendingPathComponent("README.md"), encoding: .utf8)
        let mine = try String(contentsOf: here, encoding: .utf8)
        let start = try #require(mine.range(of: "struct Counter: StorageInterceptor {"))
        let end = try #require(mine.range(of: "@Suite(\"README example\")"))
        #expect(readme.contains(String(mine[start.lowerBound..<end.lowerBound])))
    }
}
