import ArgumentParser
import Foundation
import P2PKernel

struct NATCheckCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nat-check",
        abstract: "Join through a peer, find out how this host is reached (observe, probe-back, gateway port mapping) and print the report; mappings made are deleted at exit."
    )

    @Option(name: .customLong("bootstrap"), help: "A peer to join through, HOST:PORT (repeatable).", transform: parseAddress)
    var seeds: [PeerSocketAddress] = []

    @Option(help: "UDP and TCP port to check (default: one the system picks).")
    var port: UInt16 = 0

    @Option(help: "Address to listen on (default 0.0.0.0).")
    var host: String = "0.0.0.0"

    @Flag(help: "Do not ask the gateway for port mappings.")
    var noMapping = false

    @Flag(help: "Print one JSON object instead of text.")
    var json = false

    @OptionGroup var identity: IdentityOptions

    func validate() throws {
        guard !seeds.isEmpty else { throw ValidationError("--bootstrap HOST:PORT is required") }
    }

    func run() async throws {
        var nat = NATConfig(mode: .off)
        nat.portMapping = !noMapping
        let builder = try identity.apply(to: Node.builder()).host(host).port(port).nat(nat).flags([.firewalledUDP, .firewalledTCP])
        let node = try await startNode(builder)
        let report: ReachabilityReport
        do {
            try await node.bootstrap(to: seeds)
            report = try await node.nat.makeReachable()
        } catch {
            await node.shutdown()
            throw CLIError.failed("\(error)")
        }
        await node.shutdown()
        if json {
            say(report.json)
            return
        }
        say(report.summary)
        say("NAT: \(report.natType.rawValue); observed by \(report.observations.filter { $0.udp != nil }.count) peers")
        for o in report.observations {
            say("  \(o.peer.socket.ip): udp \(o.udp.map { "\($0.ip):\($0.udpPort)" } ?? "-"), tcp \(o.tcp.map { "\($0.ip):\($0.tcpPort)" } ?? "-")")
        }
        for m in report.mappings {
            say("mapping: \(m.method.rawValue) \(m.proto) \(m.internalPort) → \(m.externalPort), lease \(m.lifetime) s")
        }
        for s in report.steps {
            say(String(format: "  %-28@ %8.1f ms  %@", s.name as NSString, s.milliseconds, s.outcome as NSString))
        }
        say(String(format: "elapsed %.1f ms", report.elapsedMilliseconds))
    }
}
