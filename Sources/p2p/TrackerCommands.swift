import ArgumentParser
import Foundation
import P2PKernel
import P2PTracker

struct TrackerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tracker",
        abstract: "List this peer under a key (add) or ask who is listed (get).",
        subcommands: [TrackerAddCLI.self, TrackerGetCLI.self])
}

/// Where a tracker command joins the overlay.
struct TrackerJoinOptions: ParsableArguments {
    @Option(name: .customLong("bootstrap"), help: "A peer to join through, HOST:PORT (repeatable).", transform: parseAddress)
    var seeds: [PeerSocketAddress] = []

    func validate() throws {
        guard !seeds.isEmpty else { throw ValidationError("--bootstrap HOST:PORT is required") }
    }
}

struct TrackerAddCLI: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "add",
        abstract: "Run a peer that lists itself under KEY on the 20 peers closest to it and re-adds every 45 s until interrupted (or once, with --once).")

    @OptionGroup var join: TrackerJoinOptions
    @Option(help: "UDP and TCP port this peer listens on (default: any free one).")
    var port: UInt16 = 0
    @Option(help: "Address to listen on (default 0.0.0.0).")
    var host = "0.0.0.0"
    @Option(help: "Text attached to the entry (at most 1,024 bytes).")
    var attachment: String?
    @Flag(help: "Add once and exit without announcing quit, leaving the entry to expire by its TTL (60 s).")
    var once = false
    @OptionGroup var identity: IdentityOptions
    @Argument(help: "The key: hashed with SHA-1, unless given as 0x and 40 hex digits.")
    var key: String

    func validate() throws {
        if let attachment, attachment.utf8.count > TrackerConfig().maxAttachmentBytes {
            throw ValidationError("--attachment is \(attachment.utf8.count) bytes, over \(TrackerConfig().maxAttachmentBytes)")
        }
    }

    func run() async throws {
        let location = try parseKey(key)
        let bytes = Array((attachment ?? "").utf8)
        let plugins = try BuiltInPlugins.make(BuiltInPlugins.names, peerID: { "" })
        let node = try await startNode(try identity.apply(to: Node.builder().host(host).port(port).plugins(plugins)))
        do {
            try await node.bootstrap(to: join.seeds)
            if once {
                let result = try await node.tracker.add(location, attachment: bytes)
                say(Self.describe(result, key: key, location: location, node: node))
                await node.shutdown(announce: false)
                return
            }
            let announcement = try await node.tracker.announce(location, attachment: bytes)
            say(Self.describe(announcement.last, key: key, location: location, node: node))
            say("re-adding every \(TrackerConfig().ttl * 3 / 4) until interrupted")
            var reported = 0
            while true {
                try await Task.sleep(for: .seconds(1))
                let (refreshes, failures) = (announcement.refreshes, announcement.failures)
                if refreshes + failures > reported {
                    reported = refreshes + failures
                    if let error = announcement.lastError { say("re-add failed: \(error)") } else { say("re-added: \(announcement.last.accepted.count) trackers") }
                }
            }
        } catch {
            await node.shutdown()
            if error is CLIError { throw error }
            throw CLIError.failed("\(error)")
        }
    }

    static func describe(_ result: TrackerAddResult, key: String, location: Number160, node: Node) -> String {
        "listed \(node.peerID) at \(node.address.socket) under \(key) (\(location)) on \(result.accepted.count) trackers"
            + (result.denied.isEmpty ? "" : ", \(result.denied.count) refused (\(result.denied.values.first ?? ""))")
            + (result.failed.isEmpty ? "" : ", \(result.failed.count) did not answer")
            + "; \(result.peers.count) other peers listed there"
    }
}

struct TrackerGetCLI: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get",
        abstract: "Print the peers listed under KEY, one per line: id, address, attachment (exit 1 when nobody is).")

    @OptionGroup var join: TrackerJoinOptions
    @Flag(help: "Print JSON: {\"key\", \"trackers\", \"listed\", \"peers\": [{\"id\", \"address\", \"attachment\"}]}.")
    var json = false
    @OptionGroup var identity: IdentityOptions
    @Argument(help: "The key: hashed with SHA-1, unless given as 0x and 40 hex digits.")
    var key: String

    func run() async throws {
        let location = try parseKey(key)
        let node = try await startNode(try identity.apply(to: Node.builder().host("0.0.0.0").port(0).flags([.firewalledUDP, .firewalledTCP]).plugins(BuiltInPlugins.client)))
        let result: TrackerGetResult
        do {
            try await node.bootstrap(to: join.seeds)
            result = try await node.tracker.get(location)
            await node.shutdown()
        } catch {
            await node.shutdown()
            throw CLIError.failed("\(error)")
        }
        if json {
            let peers: [[String: String]] = result.peers.map { p in
                ["id": p.id.description, "address": p.peer.socket.description, "attachment": String(decoding: p.attachment, as: UTF8.self)]
            }
            let object: [String: Any] = ["key": location.description, "trackers": result.trackers.count, "listed": result.listed, "peers": peers]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
            say(String(decoding: data, as: UTF8.self))
        } else {
            for p in result.peers { say("\(p.id) \(p.peer.socket) \(String(decoding: p.attachment, as: UTF8.self))") }
        }
        if result.peers.isEmpty {
            note("nobody is listed under \(key) (\(location)); \(result.trackers.count) trackers answered")
            throw ExitCode(1)
        }
    }
}
