import ArgumentParser
import Foundation
import P2PKernel
import P2PLoader

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Micro-benchmarks (build with -c release).",
        subcommands: [CodecBench.self, FFIBench.self]
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
