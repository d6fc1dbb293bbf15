import ArgumentParser
import Foundation
import P2PKernel

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Micro-benchmarks (build with -c release).",
        subcommands: [CodecBench.self]
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
