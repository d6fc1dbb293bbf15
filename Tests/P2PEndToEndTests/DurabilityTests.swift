import Foundation
import NIOConcurrencyHelpers
import NIOCore
import P2PDHT
import P2PKernel
import P2PStorage
import Testing

/// A folder for one test, removed at the end.
private func scratchFolder() throws -> String {
    let path = NSTemporaryDirectory() + "p2p-durable-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

private func bytes(_ path: String) -> [UInt8] { (try? [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))) ?? [] }

/// A client node in this process that talks to a `p2p node` process's storage directly.
private struct StorageClient {
    let node: Node
    let command = CommandID.derive(from: "dht.storage")

    static func start() async throws -> StorageClient {
        StorageClient(node: try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).requestTimeout(.seconds(5)).start())
    }

    func peer(at port: String) async throws -> PeerAddress {
        try await node.ping(PeerSocketAddress(parsing: "127.0.0.1:\(port)"))
    }

    /// The node's answer to one storage request: its result or its typed refusal.
    func execute(_ request: StorageRequest, at peer: PeerAddress) async throws -> StorageResult {
        let reply = try await node.request(to: peer, command: command, payload: StorageCodec.encode(request)).get()
        if let e = RPCError.from(reply: reply) { throw e }
        return try StorageCodec.decodeResult(reply.payload)
    }
}

/// `unshare` runs a node in its own mount namespace, where the test mounts a small or read-only
/// file system that vanishes with the process.
private func inMountNamespace(_ script: String) -> [String] { ["/usr/bin/unshare", "-m", "--propagation", "private", "/bin/sh", "-c", script] }

@Suite("SQLite storage, end to end", .serialized)
struct DurabilityTests {
    @Test("kill -9 in the middle of 10,000 puts: after a restart on the same file every acknowledged put is there")
    func killNineKeepsEveryAcknowledgedPut() async throws {
        let folder = try scratchFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let file = folder + "/node.db"
        let args = ["--port", "0", "--plugins", "dht,evaluation", "--nat", "off", "--storage", "sqlite:\(file)"]
        let node = try NodeProcess(args)
        defer { node.kill9() }
        #expect(node.waitFor("listening on"))
        let port = try #require(node.port)
        let client = try await StorageClient.start()
        let target = try await client.peer(at: port)
        let total = 10_000, inFlight = 32
        let acked = NIOLockedValueBox<[Number640: [UInt8]]>([:])
        let killAfter = 4_000
        let clock = ContinuousClock()
        let started = clock.now
        let killed = NIOLockedValueBox(false)
        // 32 writers share the 10,000 keys; node is killed (no quit, no flush) once 4,000 are acknowledged.
        await withTaskGroup(of: Void.self) { group in
            for w in 0..<inFlight {
                group.addTask {
                    var i = w
                    while i < total {
                        let key = Number640(location: Number160(hashing: "durable \(i)"))
                        let value = Array("value \(i) ".utf8) + [UInt8](repeating: UInt8(i & 0xFF), count: 64)
                        if case .statuses(let s, _)? = try? await client.execute(.put([key: StoredValue(value)], mode: .overwrite), at: target),
                           s[key] == .ok {
                            let n = acked.withLockedValue { $0[key] = value; return $0.count }
                            if n == killAfter, !killed.withLockedValue({ let was = $0; $0 = true; return was }) {
                                node.kill9()
                            }
                        }
                        if killed.withLockedValue({ $0 }) { return }
                        i += inFlight
                    }
                }
            }
        }
        let took = clock.now - started
        let acknowledged = acked.withLockedValue { $0 }
        print("durability: \(acknowledged.count) puts acknowledged before kill -9 in \(took) (\(Int(Double(acknowledged.count) / (Double(took.components.seconds) + Double(took.components.attoseconds) / 1e18))) puts/s, \(inFlight) in flight, sync full)")
        #expect(acknowledged.count >= killAfter)
        #expect(node.process.terminationReason == .uncaughtSignal)

        let restarted = try NodeProcess(args)
        defer { restarted.stop() }
        #expect(restarted.waitFor("listening on"))
        #expect(restarted.output.contains("entries read back"))
        let newPort = try #require(restarted.port)
        let again = try await client.peer(at: newPort)
        var missing = 0, wrong = 0
        let keys = Array(acknowledged.keys)
        for start in stride(from: 0, to: keys.count, by: 500) {
            let batch = Array(keys[start..<min(start + 500, keys.count)])
            guard case .values(let v, _) = try await client.execute(.get(.keys(batch)), at: again) else {
                Issue.record("a get answered without values")
                return
            }
            for k in batch {
                guard let got = v[k] else { missing += 1; continue }
                if got.value != acknowledged[k] { wrong += 1 }
            }
        }
        #expect(missing == 0, "\(missing) of \(keys.count) acknowledged puts lost")
        #expect(wrong == 0)
        await client.node.shutdown()
    }

    @Test("a file that is not a database: the node refuses to start, names it, exits 1, and leaves the file as it was")
    func corruptFileRefused() throws {
        let folder = try scratchFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let file = folder + "/node.db"
        let garbage = Array("not a database, but somebody's notes\n".utf8) + [UInt8](repeating: 0xAB, count: 5000)
        try Data(garbage).write(to: URL(fileURLWithPath: file))
        let r = try P2PTool.run(["node", "--host", "127.0.0.1", "--port", "0", "--storage", "sqlite:\(file)"], timeout: 30)
        #expect(r.code == 1)
        #expect(r.err.contains("is not a SQLite database"), "\(r.err)")
        let kept = bytes(file) == garbage
        #expect(kept)
        let bad = try P2PTool.run(["node", "--storage", "mysql:somewhere"])
        #expect(bad.code == 2)
        let noDHT = try P2PTool.run(["node", "--plugins", "messaging", "--storage", "sqlite:\(file)"])
        #expect(noDHT.code == 2)
        #expect(noDHT.err.contains("needs the dht plugin"))
    }

    @Test("a read-only file system: a node with its file there exits 1 saying so; one asked to create a file there too")
    func readOnlyRefused() throws {
        let folder = try scratchFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        // A storage file made here first, copied into a tmpfs that is then remounted read-only.
        let seedFile = folder + "/seed.db"
        _ = try P2PTool.run(["node", "--host", "127.0.0.1", "--port", "0", "--storage", "sqlite:\(seedFile)", "--nat", "off"], timeout: 3)
        #expect(FileManager.default.fileExists(atPath: seedFile))
        let mount = folder + "/ro"
        try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
        for (name, copy) in [("node.db", true), ("new.db", false)] {
            let script = "mount -t tmpfs -o size=4m tmpfs \(mount) && \(copy ? "cp \(seedFile) \(mount)/node.db && " : "")mount -o remount,ro \(mount) && "
                + "exec \(P2PTool.path) node --host 127.0.0.1 --port 0 --nat off --storage sqlite:\(mount)/\(name)"
            let p = try NodeProcess([], launcher: inMountNamespace(script), subcommand: [])
            let deadline = Date().addingTimeInterval(30)
            while p.process.isRunning, Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
            p.stop()
            #expect(p.process.terminationStatus == 1, "\(name): \(p.output)")
            #expect(p.output.contains("read-only") || p.output.contains("readonly"), "\(name): \(p.output)")
            #expect(!p.output.contains("Fatal") && !p.output.contains("crashed"))
        }
    }

    @Test("a full disk: puts are refused with a typed error once the file system is full, the node keeps serving what it holds, and nothing acknowledged is lost")
    func fullDisk() async throws {
        let folder = try scratchFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let mount = folder + "/small"
        try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
        let script = "mount -t tmpfs -o size=1m tmpfs \(mount) && exec \(P2PTool.path) node --host 127.0.0.1 --port 0 --nat off --plugins dht,evaluation --storage sqlite:\(mount)/node.db"
        let node = try NodeProcess([], launcher: inMountNamespace(script), subcommand: [])
        defer { node.stop() }
        #expect(node.waitFor("listening on"), "\(node.output)")
        let port = try #require(node.port)
        let client = try await StorageClient.start()
        let target = try await client.peer(at: port)
        var stored: [Number640] = []
        var refusal: StorageError?
        for i in 0..<200 {
            let key = Number640(location: Number160(hashing: "full \(i)"))
            do {
                _ = try await client.execute(.put([key: StoredValue([UInt8](repeating: UInt8(i & 0xFF), count: 20_000))], mode: .overwrite), at: target)
                stored.append(key)
            } catch let e as StorageError {
                refusal = e
                break
            }
        }
        guard case .backendFailed(let reason)? = refusal else {
            Issue.record("no put was refused: \(String(describing: refusal)); \(node.output)")
            return
        }
        #expect(reason.contains("full"), "\(reason)")
        #expect(stored.count >= 10)
        // Still serving: a ping, and every acknowledged value.
        _ = try await client.peer(at: port)
        guard case .values(let v, _) = try await client.execute(.get(.keys(stored)), at: target) else {
            Issue.record("a get answered without values")
            return
        }
        #expect(v.count == stored.count)
        #expect(node.process.isRunning)
        await client.node.shutdown()
    }

    @Test("a restarted node with its saved routing table and no bootstrap address rejoins the overlay")
    func rejoinWithoutBootstrap() throws {
        let folder = try scratchFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let (a, b, bootstrap) = try twoJoinedNodes()
        defer { a.stop(); b.stop() }
        let file = folder + "/node.db"
        let c = try NodeProcess(["--port", "0", "--storage", "sqlite:\(file)"] + bootstrap)
        #expect(c.waitFor("bootstrapped via"))
        c.stop()
        #expect(c.process.terminationStatus == 0)
        let again = try NodeProcess(["--port", "0", "--storage", "sqlite:\(file)"])
        defer { again.stop() }
        #expect(again.waitFor("rejoined via"), "\(again.output)")
        if let line = again.output.split(separator: "\n").first(where: { $0.contains("rejoined via") }) { print(line) }
        #expect(again.waitFor("peer joined") || again.output.contains("verified peers"))
    }
}
