import ArgumentParser
import Foundation
import P2PKernel
import P2PLoader
import P2PStorage
import Crypto
import P2PTesting
import NIOCore

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Micro-benchmarks (build with -c release).",
        subcommands: [CodecBench.self, SessionBench.self, RPCBench.self, FFIBench.self, StorageBench.self, PluginBench.self]
    )
}

struct CodecBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "codec",
        abstract: "Encode+decode round trips per second of a neighbors reply with 20 peers, on one core."
    )

    @Option(help: "How long to run, in seconds.")
    var seconds: Double = 3

    @Flag(help: "Print one JSON object.")
    var json = false

    func validate() throws {
        guard seconds > 0 else { throw ValidationError("--seconds must be positive") }
    }

    func run() async throws {
        var rng = SystemRandomNumberGenerator()
        let peers = (0..<20).map { i in
            PeerAddress(id: .random(using: &rng), socket: PeerSocketAddress(ip: .v4(0x7F00_0001), port: UInt16(4000 + i)))
        }
        let sender = PeerAddress(id: .random(using: &rng), socket: PeerSocketAddress(ip: .loopback, port: 4000))
        let message = Message(networkID: 1, id: 42, type: .ok, command: CommandID.derive(from: KernelCommands.neighbors),
                              sender: sender, recipientID: .random(using: &rng), payload: [.peers(peers)])
        let size = WireCodec.encodedSize(message)
        let clock = ContinuousClock()
        let start = clock.now
        let deadline = start + .milliseconds(Int(seconds * 1000))
        var rounds = 0
        var checksum = 0
        while clock.now < deadline {
            for _ in 0..<1000 {
                let bytes = try WireCodec.encode(message)
                let back = try WireCodec.decode(bytes, senderIP: .loopback)
                checksum &+= back.payload.count
            }
            rounds += 1000
        }
        let elapsed = (clock.now - start).milliseconds / 1000
        let perSecond = Double(rounds) / elapsed
        guard checksum == rounds else { throw CLIError.failed("round trip lost sections") }
        if json {
            print("{\"message_bytes\":\(size),\"round_trips_per_s\":\(Int(perSecond)),\"ns_per_round_trip\":\(Int(1e9 / perSecond))}")
        } else {
            print("neighbors reply with 20 peers: \(size) bytes; \(Int(perSecond)) encode+decode round trips/s (\(Int(1e9 / perSecond)) ns each) on one core")
        }
    }
}

struct FFIBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ffi",
        abstract: "Per-call overhead of a manifest-bound C function (typed values, checks, ffi_call) against a direct call."
    )

    @Option(help: "A C library with a manifest declaring COMMAND as (u64, u64) -> u64.")
    var library: String = "Plugins/CMath/libcmath.so"

    @Option(help: "The manifest command to call.")
    var command: String = "cmath.gcd"

    @Option(help: "Calls per measurement.")
    var calls: Int = 2_000_000

    func validate() throws {
        guard calls > 0 else { throw ValidationError("--calls must be positive") }
    }

    func run() async throws {
        let plugin: LoadedPlugin
        do { plugin = try PluginLoader.load(library) } catch { throw CLIError.failed("\(error)") }
        guard let function = plugin.functions.first(where: { $0.declaration.command == command }) else {
            throw CLIError.usage("\(library) declares no command '\(command)'")
        }
        let d = function.declaration
        guard d.params == [.u64, .u64], d.returns == .u64, let symbol = dlsym(dlopen(library, RTLD_NOW | RTLD_NOLOAD), d.symbol) else {
            throw CLIError.usage("\(command) must be (u64, u64) -> u64 for this benchmark")
        }
        let direct = unsafeBitCast(symbol, to: (@convention(c) (UInt64, UInt64) -> UInt64).self)
        let clock = ContinuousClock()
        var sink: UInt64 = 0
        var start = clock.now
        for i in 0..<calls { sink &+= direct(UInt64(i) | 1, 1_000_003) }
        let directNs = (clock.now - start).milliseconds * 1e6 / Double(calls)
        start = clock.now
        for i in 0..<calls {
            if case .uint(let v, _) = try function.call([.uint(UInt64(i) | 1, .u64), .uint(1_000_003, .u64)]) { sink &+= v }
        }
        let ffiNs = (clock.now - start).milliseconds * 1e6 / Double(calls)
        say(String(format: "%@: direct %.1f ns/call, through libffi with typed values %.1f ns/call, overhead %.1f ns/call (checksum %llu)",
                   command, directNs, ffiNs, ffiNs - directNs, sink))
    }
}

struct SessionBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "session",
        abstract: "Handshakes per second and sealed messages per second on one core, and the bytes sealing adds per message."
    )

    @Option(help: "Seconds per measurement.")
    var seconds: Double = 2

    @Option(help: "Message sizes to seal and open, comma-separated.")
    var sizes: String = "100,500,1400"

    @Flag(help: "Print one JSON object.")
    var json = false

    func validate() throws {
        guard seconds > 0 else { throw ValidationError("--seconds must be positive") }
    }

    func run() async throws {
        let sizes = self.sizes.split(separator: ",").compactMap { Int($0) }.filter { $0 >= 0 && $0 <= 1 << 20 }
        guard !sizes.isEmpty else { throw CLIError.usage("--sizes needs sizes from 0 to 1048576") }
        let duration = Duration.milliseconds(Int(seconds * 1000))
        let handshakes = try SessionBenchmark.handshakesPerSecond(for: duration)
        var rows: [(Int, Double, Int)] = []
        for size in sizes {
            let (rate, overhead) = try SessionBenchmark.sealOpenPerSecond(messageBytes: size, for: duration)
            rows.append((size, rate, overhead))
        }
        if json {
            let sealed = rows.map { "{\"message_bytes\":\($0.0),\"seal_open_per_s\":\(Int($0.1)),\"ns_per_seal_open\":\(Int(1e9 / $0.1)),\"overhead_bytes\":\($0.2)}" }
            print("{\"handshakes_per_s\":\(Int(handshakes)),\"us_per_handshake\":\(Int(1e6 / handshakes)),\"sealed\":[\(sealed.joined(separator: ","))]}")
        } else {
            print("handshakes (both sides, one core): \(Int(handshakes))/s, \(Int(1e6 / handshakes)) µs each")
            for (size, rate, overhead) in rows {
                print("seal+open of a \(size)-byte message: \(Int(rate))/s, \(Int(1e9 / rate)) ns each; sealing adds \(overhead) bytes")
            }
        }
    }
}

struct RPCBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rpc",
        abstract: "Request/reply round trips between two nodes in this process: per second, and CPU per round trip, secure and insecure."
    )

    @Option(help: "Round trips per measurement.")
    var count: Int = 50_000

    @Option(help: "Requests in flight at once.")
    var concurrency: Int = 16

    @Option(help: "Bytes in each request and reply.")
    var bytes: Int = 100

    @Option(help: "secure, insecure, or both.")
    var mode: String = "both"

    func validate() throws {
        guard count > 0, (1...1024).contains(concurrency), (0...1300).contains(bytes), ["both", "secure", "insecure"].contains(mode) else {
            throw ValidationError("--count > 0, --concurrency 1…1024, --bytes 0…1300, --mode secure|insecure|both")
        }
    }

    struct Echo: CommandHandler {
        let name = "bench.echo"
        func handle(_ request: Message, context: CommandContext) -> CommandResult { .reply(Reply(payload: request.payload)) }
    }

    func run() async throws {
        let modes: [SecurityMode] = mode == "secure" ? [.authenticated] : mode == "insecure" ? [.insecure] : [.authenticated, .insecure]
        for mode in modes {
            let a = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).security(mode).start()
            let b = try await Node.builder().host("127.0.0.1").port(0).maintenance(nil).security(mode).command(Echo()).start()
            let peer = try await a.ping(b.address.socket)
            let payload: [Payload] = [.bytes([UInt8](repeating: 7, count: bytes))]
            let id = CommandID.derive(from: "bench.echo")
            let count = self.count, concurrency = self.concurrency
            let cpu = processCPUSeconds()
            let clock = ContinuousClock()
            let start = clock.now
            // Driven on a's event loop, as the kernel drives lookups: no task hop per request.
            let done = a.eventLoop.makePromise(of: Void.self)
            a.eventLoop.execute {
                var sent = 0, finished = 0
                func next() {
                    guard sent < count else { return }
                    sent += 1
                    a.request(to: peer, command: id, payload: payload, transport: .udp).whenComplete { _ in
                        finished += 1
                        if finished == count { done.succeed(()) } else { next() }
                    }
                }
                for _ in 0..<concurrency { next() }
            }
            try await done.futureResult.get()
            let seconds = (clock.now - start).milliseconds / 1000
            let cpuPer = (processCPUSeconds() - cpu) * 1e6 / Double(count)
            print(String(format: "%@: %.0f round trips/s, %.1f µs CPU per round trip (%d in flight, %d-byte payload)",
                         mode == .insecure ? "insecure" : "secure  ", Double(count) / seconds, cpuPer, concurrency, bytes))
            await a.shutdown(); await b.shutdown()
        }
    }
}

/// What the costliest single requests make a storing peer do on its event loop: decoding, the
/// admission checks (signatures, writer proof) and the backend, as `dht.storage` runs them.
struct StorageBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "storage",
        abstract: "Milliseconds one hostile storage request holds a peer's event loop (median and worst of --rounds), on one core."
    )

    @Option(help: "Repetitions of each case (the median and the worst are reported).")
    var rounds = 5

    @Option(help: "Run only the cases whose name contains this text.")
    var only: String?

    @Flag(help: "Print one JSON object.")
    var json = false

    func validate() throws {
        guard (1...1000).contains(rounds) else { throw ValidationError("--rounds must be from 1 to 1000") }
    }

    func run() async throws {
        let clock = ContinuousClock()
        var results: [(name: String, median: Double, worst: Double)] = []
        func measure(_ name: String, setup: () throws -> (StoragePipeline, [Payload]), body: (StoragePipeline, [Payload]) throws -> Void) throws {
            if let only, !name.contains(only) { return }
            var times: [Double] = []
            for _ in 0..<rounds {
                let (pipe, payload) = try setup()
                let t0 = clock.now
                try body(pipe, payload)
                times.append((clock.now - t0).milliseconds)
            }
            times.sort()
            results.append((name, times[times.count / 2], times[times.count - 1]))
        }
        func pipeline(_ store: MemoryStorage) throws -> StoragePipeline {
            let registry = PluginRegistry()
            try registry.setStorageBackend(store)
            return StoragePipeline(registry: registry)
        }
        func serve(_ pipe: StoragePipeline, _ payload: [Payload]) throws {
            guard let (request, proof) = try? StorageCodec.decodeSignedRequest(payload, maxEntries: pipe.limits.maxEntriesPerRequest) else { return }
            _ = pipe.executeImmediately(request, proof: proof, sender: .zero)
        }
        let location = Number160(hashing: "bench")
        let key = Curve25519.Signing.PrivateKey()

        // The largest put a peer admits (1,000 entries), each a version of one item that already
        // has 8,999: fork detection over the whole item.
        /// A chain of versions of one item, each based on the one before.
        func versions(_ range: ClosedRange<Int>) -> [Number640: StoredValue] {
            var out: [Number640: StoredValue] = [:]
            for i in range { out[Number640(location: location, version: Number160(UInt32(i)))] = StoredValue([], basedOn: [Number160(UInt32(i - 1))]) }
            return out
        }
        try measure("put_1000_versions_onto_9000", setup: {
            let store = MemoryStorage()
            for batch in 0..<9 { _ = try store.execute(.put(versions(batch * 1_000 + 1...batch * 1_000 + 1_000), mode: .overwrite), now: 1) }
            return (try pipeline(store), StorageCodec.encode(.put(versions(9_001...10_000), mode: .overwrite)))
        }, body: { pipe, payload in
            let (request, proof) = try StorageCodec.decodeSignedRequest(payload)
            guard case .success? = pipe.executeImmediately(request, proof: proof, sender: .zero) else { throw CLIError.failed("the put failed") }
        })
        // Overwrites that change what each version is based on: each moves the item's heads.
        try measure("put_1000_overwrites_onto_10000", setup: {
            let store = MemoryStorage()
            for batch in 0..<10 { _ = try store.execute(.put(versions(batch * 1_000 + 1...batch * 1_000 + 1_000), mode: .overwrite), now: 1) }
            var rewired: [Number640: StoredValue] = [:]
            for i in stride(from: 2, through: 10_000, by: 10) {
                rewired[Number640(location: location, version: Number160(UInt32(i)))] = StoredValue([1], basedOn: [Number160(UInt32(i - 2))])
            }
            return (try pipeline(store), StorageCodec.encode(.put(rewired, mode: .overwrite)))
        }, body: serve)
        try measure("get_latest_of_10000_heads", setup: {
            let store = MemoryStorage()
            for batch in 0..<10 {
                var loose: [Number640: StoredValue] = [:]
                for i in batch * 1_000 + 1...batch * 1_000 + 1_000 { loose[Number640(location: location, version: Number160(UInt32(i)))] = StoredValue([5]) }
                _ = try store.execute(.put(loose, mode: .overwrite), now: 1)
            }
            return (try pipeline(store), StorageCodec.encode(.get(.latest(location: location, domain: .zero, content: .zero))))
        }, body: { pipe, payload in
            let (request, _) = try StorageCodec.decodeSignedRequest(payload)
            guard case .success(let result)? = pipe.executeImmediately(request) else { throw CLIError.failed("the get failed") }
            _ = StorageCodec.encode(result)
        })
        try measure("put_1_version_onto_9999", setup: {
            let store = MemoryStorage()
            for batch in 0..<10 { _ = try store.execute(.put(versions(batch * 1_000 + 1...batch * 1_000 + 999), mode: .overwrite), now: 1) }
            return (try pipeline(store), StorageCodec.encode(.put(versions(10_000...10_000), mode: .overwrite)))
        }, body: { pipe, payload in
            let (request, proof) = try StorageCodec.decodeSignedRequest(payload)
            guard case .success? = pipe.executeImmediately(request, proof: proof, sender: .zero) else { throw CLIError.failed("the put failed") }
        })
        try measure("put_1000_values", setup: {
            var values: [Number640: StoredValue] = [:]
            for i in 0..<1_000 { values[Number640(location: location, content: Number160(UInt32(i)))] = StoredValue(Array(repeating: 4, count: 100)) }
            return (try pipeline(MemoryStorage()), StorageCodec.encode(.put(values, mode: .overwrite)))
        }, body: serve)
        try measure("put_9000_versions_refused", setup: {
            (try pipeline(MemoryStorage()), StorageCodec.encode(.put(versions(1...9_000), mode: .overwrite)))
        }, body: serve)
        // The largest message a peer reads (4 MiB over TCP), a put of 20,000 values: the wire
        // decode every message pays, then the refusal before any value is decoded.
        let sender = PeerAddress(id: Number160(hashing: "sender"), socket: PeerSocketAddress(ip: .loopback, port: 4000))
        try measure("wire_decode_4mib_put_refused", setup: {
            var values: [Number640: StoredValue] = [:]
            for i in 0..<20_000 { values[Number640(location: location, content: Number160(UInt32(i)))] = StoredValue(Array(repeating: 3, count: 100)) }
            let message = Message(networkID: 1, id: 7, type: .request, command: CommandID.derive(from: "dht.storage"), sender: sender,
                                  recipientID: location, payload: StorageCodec.encode(.put(values, mode: .overwrite)))
            return (try pipeline(MemoryStorage()), [.bytes(try WireCodec.encode(message))])
        }, body: { pipe, wire in
            guard case .bytes(let bytes)? = wire.first else { return }
            let message = try WireCodec.decode(bytes, senderIP: .loopback)
            try serve(pipe, message.payload)
        })
        try measure("put_32_signed_values_with_proof", setup: {
            var values: [Number640: StoredValue] = [:]
            for i in 0..<31 {
                let k = Number640(location: location, content: Number160(UInt32(i)))
                values[k] = try StoredValue(Array(repeating: 1, count: 100), protectEntry: true).signed(at: k, by: key)
            }
            let request = StorageRequest.put(values, mode: .overwrite)
            return (try pipeline(MemoryStorage()), StorageCodec.encode(request, proof: try WriterProof(signing: request, with: key)))
        }, body: serve)
        try measure("put_1000_signed_values_refused", setup: {
            let proto = try StoredValue([1]).signed(at: Number640(location: location), by: key)
            var values: [Number640: StoredValue] = [:]
            for i in 0..<1_000 { values[Number640(location: location, content: Number160(UInt32(i)))] = proto }
            return (try pipeline(MemoryStorage()), StorageCodec.encode(.put(values, mode: .overwrite)))
        }, body: serve)
        try measure("get_whole_location_10000_entries", setup: {
            let store = MemoryStorage()
            for i in 0..<10_000 {
                _ = try store.execute(.put([Number640(location: location, content: Number160(UInt32(i))): StoredValue(Array(repeating: 2, count: 1_000))],
                                           mode: .overwrite), now: 1)
            }
            return (try pipeline(store), StorageCodec.encode(.get(.all(location: location))))
        }, body: { pipe, payload in
            let (request, _) = try StorageCodec.decodeSignedRequest(payload)
            guard case .success(let result)? = pipe.executeImmediately(request) else { throw CLIError.failed("the get failed") }
            _ = StorageCodec.encode(result)
        })
        try measure("remove_whole_location_10000_entries", setup: {
            let store = MemoryStorage()
            for i in 0..<10_000 {
                _ = try store.execute(.put([Number640(location: location, content: Number160(UInt32(i))): StoredValue(Array(repeating: 2, count: 100))],
                                           mode: .overwrite), now: 1)
            }
            return (try pipeline(store), StorageCodec.encode(.remove(.all(location: location), returnValues: false)))
        }, body: { pipe, payload in
            let (request, _) = try StorageCodec.decodeSignedRequest(payload)
            guard case .success(let result)? = pipe.executeImmediately(request) else { throw CLIError.failed("the remove failed") }
            _ = StorageCodec.encode(result)
        })
        try measure("sweep_100000_expired", setup: {
            let store = MemoryStorage()
            for i in 0..<100_000 {
                _ = try store.execute(.put([Number640(location: Number160(UInt32(i))): StoredValue([1], ttlSeconds: 1)], mode: .overwrite), now: 1)
            }
            return (try pipeline(store), [])
        }, body: { pipe, _ in
            _ = pipe.sweepOnce(now: 10_000_000_000)
        })
        func rounded(_ ms: Double) -> Double { (ms * 1000).rounded() / 1000 }
        if json {
            let fields = results.map { "\"\($0.name)_ms\":{\"median\":\(rounded($0.median)),\"worst\":\(rounded($0.worst))}" }.joined(separator: ",")
            print("{\"rounds\":\(rounds),\(fields)}")
        } else {
            print("\("request".padding(toLength: 36, withPad: " ", startingAt: 0))  median ms   worst ms  (of \(rounds))")
            for r in results {
                print("\(r.name.padding(toLength: 36, withPad: " ", startingAt: 0)) \(String(format: "%9.3f", r.median))  \(String(format: "%9.3f", r.worst))")
            }
        }
    }
}
