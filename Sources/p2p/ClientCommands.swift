import ArgumentParser
import Foundation
import P2PKernel

struct PingCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ping", abstract: "Ping a peer over UDP (or TCP).")

    @Argument(help: "The peer, HOST:PORT.", transform: parseAddress)
    var address: PeerSocketAddress

    @Flag(help: "Ping over TCP instead of UDP.")
    var tcp = false

    @Option(help: "How many pings.")
    var count: Int = 1

    @OptionGroup var identity: IdentityOptions

    func validate() throws {
        guard count >= 1 else { throw ValidationError("--count must be at least 1") }
    }

    func run() async throws {
        let node = try await startNode(try identity.apply(to: Node.builder().host("0.0.0.0").port(0)))
        defer { Task { await node.shutdown() } }
        var failures = 0
        var known: PeerAddress?
        for _ in 0..<count {
            let clock = ContinuousClock()
            let start = clock.now
            do {
                // The first ping proves who answers at the address (a handshake); later ones ask
                // that peer by id, in the session it opened.
                let peer: PeerAddress
                if let known {
                    let reply = try await node.request(to: known, command: KernelCommands.ping, transport: tcp ? .tcp : .udp)
                    peer = reply.sender
                } else {
                    peer = try await node.ping(address, over: tcp ? .tcp : .udp)
                    known = PeerAddress(id: peer.id, socket: address)
                }
                let ms = (clock.now - start).milliseconds
                print("reply from \(peer.id) at \(address) over \(tcp ? "tcp" : "udp"): \(String(format: "%.3f", ms)) ms")
            } catch {
                failures += 1
                note("no reply from \(address): \(error)")
            }
        }
        await node.shutdown()
        if failures == count { throw ExitCode(1) }
    }
}

struct LookupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "lookup", abstract: "Find the peers closest to a key.")

    @Option(name: .customLong("bootstrap"), help: "A peer to join through, HOST:PORT (repeatable).", transform: parseAddress)
    var seeds: [PeerSocketAddress] = []

    @Argument(help: "The key: hashed with SHA-1, unless given as 0x and 40 hex digits.")
    var key: String

    @OptionGroup var identity: IdentityOptions

    func validate() throws {
        guard !seeds.isEmpty else { throw ValidationError("--bootstrap HOST:PORT is required") }
    }

    func run() async throws {
        let target = try parseKey(key)
        // A client, as those of put and get: never routed to (it would be a dead peer in
        // every map it entered once it exits).
        let node = try await startNode(try identity.apply(to: Node.builder().host("0.0.0.0").port(0).flags([.firewalledUDP, .firewalledTCP])))
        do {
            try await node.bootstrap(to: seeds, fill: false)
            let result = try await node.closestPeers(to: target)
            print("key \(target)")
            for (i, p) in result.peers.enumerated() {
                print(String(format: "%2d  ", i + 1) + "\(p.id)  \(p.socket)  distance bits \((p.id ^ target).bitLength)")
            }
            print("\(result.peers.count) peers, \(result.hops) hops, \(result.messages) messages")
        } catch {
            await node.shutdown()
            throw CLIError.failed("lookup failed: \(error)")
        }
        await node.shutdown()
    }
}

extension Duration {
    var milliseconds: Double { Double(components.seconds) * 1000 + Double(components.attoseconds) / 1e15 }
}
