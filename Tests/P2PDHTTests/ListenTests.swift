import Foundation
import NIOConcurrencyHelpers
import P2PDHT
import P2PEvaluation
import P2PKernel
import P2PStatus
import P2PStorage
import P2PTesting
import Testing
import P2PTestSupport

/// Collects a listen stream's events as they come.
private final class Heard: Sendable {
    let events = NIOLockedValueBox([(ListenEvent, ContinuousClock.Instant)]())
    let task: Task<Void, Never>

    init(_ stream: AsyncThrowingStream<ListenEvent, any Error>) {
        let events = self.events
        task = Task {
            do {
                for try await e in stream { events.withLockedValue { $0.append((e, .now)) } }
            } catch {}
        }
    }

    func waitFor(seconds: Double = 20, _ condition: ([ListenEvent]) -> Bool) async -> Bool {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while ContinuousClock.now < deadline {
            if condition(events.withLockedValue { $0.map(\.0) }) { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return condition(events.withLockedValue { $0.map(\.0) })
    }

    var all: [ListenEvent] { events.withLockedValue { $0.map(\.0) } }
}

/// How many subscriptions a node holds for others (read through its status page section).
private func subscriptionsHeld(_ node: Node) async throws -> Int {
    let status = try await node.status()
    let row = status.sections.first { $0.title == "listen" }?.rows.first { $0.first == "subscriptions held" }
    return Int(row?.last ?? "") ?? -1
}

private func ms(_ d: Duration) -> Double { Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15 }

@Suite("Listening to a key", .serialized)
struct ListenTests {
    @Test("a listener hears each put and remove under its location once, from another peer of a 20-peer network; stopping it ends its subscriptions")
    func hearsPutsAndRemoves() async throws {
        let net = try await testnet(20)
        defer { Task { await net.shutdown() } }
        let listener = net.nodes[3], writer = net.nodes[17]
        let location = Number160(hashing: "listened")
        let heard = Heard(listener.dht.listen(location))
        // Subscriptions are in place once the responsible peers hold them.
        var held = 0
        for _ in 0..<200 {
            held = 0
            for n in net.nodes { held += try await subscriptionsHeld(n) }
            if held >= 3 { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(held >= 3)
        var latencies: [Double] = []
        for i in 0..<10 {
            let started = ContinuousClock.now
            let key = Number640(location: location, domain: .zero, content: Number160(hashing: "item \(i)"))
            try await writer.dht.put(key, Array("value \(i)".utf8))
            #expect(await heard.waitFor { $0.contains(.stored(key, Array("value \(i)".utf8))) })
            if let at = heard.events.withLockedValue({ $0.first { $0.0 == .stored(key, Array("value \(i)".utf8)) }?.1 }) {
                latencies.append(ms(at - started))
            }
        }
        latencies.sort()
        print("listen: put → listener heard it: median \(latencies[latencies.count / 2]) ms, worst \(latencies.last ?? 0) ms over \(latencies.count) puts (debug build, 20 peers)")
        // Every responsible peer reported each put; the listener passed each on once.
        #expect(heard.all.count == 10)
        let gone = Number640(location: location, domain: .zero, content: Number160(hashing: "item 4"))
        _ = try await writer.dht.remove(.keys([gone]))
        #expect(await heard.waitFor { $0.contains(.removed(gone)) })
        // A put elsewhere is not heard.
        try await writer.dht.put(Number640(location: Number160(hashing: "elsewhere")), Array("x".utf8))
        heard.task.cancel()
        var left = -1
        for _ in 0..<200 {
            left = 0
            for n in net.nodes { left += try await subscriptionsHeld(n) }
            if left == 0 { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(left == 0, "subscriptions left after the listener stopped: \(left)")
        #expect(!heard.all.contains { $0.key.location != location })
    }

    @Test("subscriptions are bounded per peer and per location, expire without refresh, and only subscribed peers are heard")
    func hostileSubscribersAndNotifiers() async throws {
        var limits = ListenLimits()
        limits.maxPerPeer = 8
        limits.maxPerLocation = 12
        let bounds = limits
        let net = try await Testnet.start(peers: 4, routing: .perfect, plugins: { _ in
            [DHTPlugin(listenLimits: bounds), EvaluationPlugin()]
        })
        defer { Task { await net.shutdown() } }
        let target = net.nodes[0], hostile = net.nodes[1], other = net.nodes[2]
        let location = Number160(hashing: "bounded")
        func subscribe(_ from: Node, id: Int64, ttl: Int64, location: Number160 = location) async throws -> Message {
            try await from.request(to: target.address, command: CommandID.derive(from: "dht.listen"),
                                   payload: [.keys([location]), .integer(id), .integer(ttl)]).get()
        }
        // One peer: 8 subscriptions, the 9th refused with the bound named.
        for id in 1...8 { #expect(try await subscribe(hostile, id: Int64(id), ttl: 600).type == .ok) }
        let ninth = try await subscribe(hostile, id: 9, ttl: 600)
        #expect(ninth.type == .denied)
        #expect(String(decoding: ninth.firstBytes ?? [], as: UTF8.self).contains("8 subscriptions held for this peer"))
        // A TTL above the bound is cut to it.
        let refreshed = try await subscribe(hostile, id: 1, ttl: 1_000_000)
        #expect(refreshed.payload.first == .integer(600))
        // One location: 12 subscribers at most, whoever asks.
        for id in 1...4 { #expect(try await subscribe(other, id: Int64(id), ttl: 600).type == .ok) }
        #expect(try await subscribe(other, id: 5, ttl: 600).type == .denied)
        // Malformed requests are refused, not crashed on.
        let bad = try await hostile.request(to: target.address, command: CommandID.derive(from: "dht.listen"), payload: [.integer(1)]).get()
        #expect(bad.type == .badRequest)
        let negative = try await subscribe(other, id: 77, ttl: -5)
        #expect(negative.type == .badRequest)
        // Ending them frees the places.
        for id in 1...8 { #expect(try await subscribe(hostile, id: Int64(id), ttl: 0).type == .ok) }
        #expect(try await subscribe(hostile, id: 9, ttl: 600).type == .ok)
        #expect(try await subscriptionsHeld(target) == 5)

        // A subscription that is not refreshed runs out (3 s TTL).
        let brief = Number160(hashing: "brief")
        #expect(try await subscribe(other, id: 99, ttl: 3, location: brief).type == .ok)
        let heldBefore = try await subscriptionsHeld(target)
        try await Task.sleep(for: .seconds(4))
        try await net.nodes[3].dht.put(Number640(location: brief), Array("after expiry".utf8), options: DHTOptions(replicas: 4))
        var after = heldBefore
        for _ in 0..<100 {
            after = try await subscriptionsHeld(target)
            if after == heldBefore - 1 { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(after == heldBefore - 1)

        // Notifications: only from peers the listener subscribed through, only about its location.
        let listener = net.nodes[3]
        let listened = Number160(hashing: "listened by 3")
        let heard = Heard(listener.dht.listen(listened))
        defer { heard.task.cancel() }
        try await Task.sleep(for: .milliseconds(300))
        let status = try await listener.status()
        let section = status.sections.first { $0.title == "listen" }
        let listening: [String]? = section?.rows.first { $0.first == "listening" }
        #expect(listening?.last == "1")
        // A forged notification names a subscription id it cannot know: nothing is delivered.
        for guess in 1...50 {
            let forged = try await hostile.request(to: listener.address, command: CommandID.derive(from: "dht.notify"),
                                                   payload: [.integer(Int64(guess)), .dataMap([DataEntry(key: Number640(location: listened), value: Array("forged".utf8))])]).get()
            #expect(forged.type == .notFound)
        }
        let garbage = try await hostile.request(to: listener.address, command: CommandID.derive(from: "dht.notify"), payload: [.bytes([1, 2, 3])]).get()
        #expect(garbage.type == .badRequest)
        try await net.nodes[1].dht.put(Number640(location: listened), Array("real".utf8), options: DHTOptions(replicas: 4))
        #expect(await heard.waitFor { $0.contains(.stored(Number640(location: listened), Array("real".utf8))) })
        #expect(!heard.all.contains(.stored(Number640(location: listened), Array("forged".utf8))))
    }

    @Test("metrics: a peer sending 200 unregistered command ids adds one series (command=\"unknown\"), not 200")
    func unknownCommandsShareOneSeries() async throws {
        let exporter = MetricsExporter()
        let target = try await Node.builder().host("127.0.0.1").port(0).metrics(exporter.factory).plugins([DHTPlugin()]).start()
        let sender = try await Node.builder().host("127.0.0.1").port(0).start()
        defer { Task { await sender.shutdown(); await target.shutdown() } }
        for id in 0..<200 {
            let reply = try await sender.request(to: target.address, command: UInt16(40_000 + id)).get()
            #expect(reply.type == .unknownCommand)
        }
        _ = try await sender.request(to: target.address, command: CommandID.derive(from: "kernel.ping")).get()
        let text = exporter.text()
        let commands = Set(text.split(separator: "\n").filter { $0.hasPrefix("p2p_messages_total{") }.compactMap { line -> String? in
            guard let r = line.range(of: #"command="[^"]*""#, options: .regularExpression) else { return nil }
            return String(line[r])
        })
        #expect(commands.contains("command=\"unknown\""))
        #expect(commands.count <= 3, "\(commands)")
        let unknownIn = text.split(separator: "\n").first { $0.hasPrefix("p2p_messages_total{") && $0.contains("direction=\"in\"") && $0.contains("command=\"unknown\"") }
        // At least the 200 sent; a request re-sent on a busy machine (its reply was late) counts again.
        let counted = unknownIn.flatMap { Int($0.split(separator: " ").last ?? "") } ?? 0
        #expect(counted >= 200 && counted <= 220, "\(counted) unknown messages counted")
    }
}
