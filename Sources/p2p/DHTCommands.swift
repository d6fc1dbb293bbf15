import ArgumentParser
import Crypto
import Foundation
import P2PDHT
import P2PKernel
import P2PStorage
import UnixSignals

/// Options every DHT client command shares.
struct DHTClientOptions: ParsableArguments {
    @Option(name: .customLong("bootstrap"), help: "A peer to join through, HOST:PORT (repeatable).", transform: parseAddress)
    var seeds: [PeerSocketAddress] = []

    @Option(help: "Domain: hashed like KEY unless 0x and 40 hex digits (default: zero).")
    var domain: String?

    @Option(help: "How many of the closest peers to ask.")
    var replicas: Int = 3

    @OptionGroup var identity: IdentityOptions

    func validate() throws {
        guard !seeds.isEmpty else { throw ValidationError("--bootstrap HOST:PORT is required") }
        guard (1...20).contains(replicas) else { throw ValidationError("--replicas must be from 1 to 20, got \(replicas)") }
    }

    /// The value under KEY, or with `all` every value under its location and domain.
    func query(key: String, all: Bool) throws -> StorageQuery {
        let location = try parseKey(key)
        let domain = try domainKey()
        return all ? .all(location: location, domain: domain) : .keys([Number640(location: location, domain: domain)])
    }

    func domainKey() throws -> Number160 {
        guard let domain else { return .zero }
        return try parseKey(domain)
    }

    /// The key that signs values and write requests: the one given with --key, if any.
    func signer() throws -> Curve25519.Signing.PrivateKey? {
        guard let path = identity.key else { return nil }
        do { return try PeerKeyPair(contentsOfFile: path).privateKey } catch { throw CLIError.usage("\(error)") }
    }

    /// Starts a client node, joins, runs `body`, and always leaves.
    func withClient<T: Sendable>(_ body: @Sendable (Node) async throws -> T) async throws -> T {
        // A client is never routed to: it says so, and stays out of peer maps.
        let node = try await startNode(try identity.apply(to: Node.builder().host("0.0.0.0").port(0).flags([.firewalledUDP, .firewalledTCP]).plugins(BuiltInPlugins.client)))
        do {
            // One question needs no place in the overlay: the seed answers, and the command's
            // own lookup starts there (a full join's lookups of our id and of empty buckets
            // only add waits on whatever dead peers the seed still lists).
            try await node.bootstrap(to: seeds, fill: false)
            let value = try await body(node)
            await node.shutdown()
            return value
        } catch {
            await node.shutdown()
            if error is CLIError || error is ExitCode { throw error }
        if case DHTError.needsSigner(let what) = error { throw CLIError.usage("\(what) needs --key FILE (p2p keygen FILE makes one)") }
            throw CLIError.failed("\(error)")
        }
    }
}

struct PutCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "put", abstract: "Store a value under a key on the peers closest to it.")

    @OptionGroup var dht: DHTClientOptions
    @Option(help: "Seconds until the value expires (default: never).")
    var ttl: Int?
    @Option(help: "With --key: protect the entry (only this key may change or remove it) or the whole domain.")
    var protect: ProtectMode?
    @Argument(help: "The key: hashed with SHA-1, unless given as 0x and 40 hex digits.")
    var key: String
    @Argument(help: "The value (stored as its UTF-8 bytes).")
    var value: String

    enum ProtectMode: String, ExpressibleByArgument, CaseIterable {
        case entry, domain
    }

    func validate() throws {
        if let ttl { guard ttl > 0 else { throw ValidationError("--ttl must be positive, got \(ttl)") } }
        if protect != nil, dht.identity.key == nil { throw ValidationError("--protect needs --key FILE (p2p keygen FILE makes one)") }
    }

    func run() async throws {
        let k = Number640(location: try parseKey(key), domain: try dht.domainKey())
        let options = DHTOptions(replicas: dht.replicas, ttl: ttl.map { .seconds($0) }, signer: try dht.signer(),
                                 protect: protect == .entry ? .entry : protect == .domain ? .domain : [])
        let bytes = Array(value.utf8)
        let result = try await dht.withClient { node in try await node.dht.put(k, bytes, options: options) }
        try refuseDenied(result, what: "put of \(key)")
        for (peer, statuses) in result.statuses.sorted(by: { $0.key.id < $1.key.id }) {
            say("\(peer.socket)  \(statuses[k]?.description ?? "?")")
        }
        for (peer, why) in result.failures { note("\(peer.socket)  failed: \(why)") }
        guard result.isSuccess else { throw CLIError.failed("put of \(k.location) did not succeed: \(result.refusal.map { "\($0)" } ?? "\(result.status(of: k))")") }
        say("stored on \(result.statuses.count) peers\(options.signer.map { ", signed by \(SignerKey($0.publicKey).id)" } ?? "")")
    }
}

/// A write a protected entry or domain refused: one line naming the owner, exit 1.
func refuseDenied(_ result: PutResult, what: String) throws {
    guard let owner = result.deniedBy else { return }
    var domain = false
    if case .protected(_, _, let d)? = result.refusal { domain = d }
    throw CLIError.failed("denied: \(what): the \(domain ? "domain" : "entry") is owned by \(owner.id)")
}

struct GetCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get",
        abstract: "Fetch the value under a key: printed on stdout (exit 0), or a message on stderr when not found (exit 1).")

    @OptionGroup var dht: DHTClientOptions
    @Flag(help: "Every value under the key's location and domain.")
    var all = false
    @Flag(help: "Print JSON: {\"key\": …, \"values\": {content key: value}, \"signers\": {content key: {\"signer\": peer id, \"verified\": bool}}}.")
    var json = false
    @Flag(help: "After the current value, print each new value stored under the key as the responsible peers report it (removals go to stderr), until SIGINT or SIGTERM.")
    var follow = false
    @Argument(help: "The key: hashed with SHA-1, unless given as 0x and 40 hex digits.")
    var key: String

    func validate() throws {
        if follow, json { throw ValidationError("--follow prints lines; it does not combine with --json") }
    }

    func run() async throws {
        let location = try parseKey(key)
        let domain = try dht.domainKey()
        let query = try dht.query(key: key, all: all)
        let options = DHTOptions(replicas: dht.replicas)
        if follow { return try await self.follow(location: location, domain: domain, query: query, options: options) }
        let result = try await dht.withClient { node in try await node.dht.get(query, options: options) }
        guard !result.isEmpty else {
            note("not found: \(key) (\(location)) on \(result.outcomes.count) peers")
            throw ExitCode(1)
        }
        if json {
            var values: [String: String] = [:]
            var signers: [String: Any] = [:]
            for (k, v) in result.entries {
                values[k.content.description] = String(decoding: v, as: UTF8.self)
                if let s = result.signature(of: k) {
                    signers[k.content.description] = ["signer": s.signer.id.description, "verified": s.verified]
                } else {
                    signers[k.content.description] = ["signer": NSNull(), "verified": false]
                }
            }
            var object: [String: Any] = ["key": location.description, "domain": domain.description, "values": values, "signers": signers]
            if let more = result.resumeAfter { object["resumeAfter"] = more.description }
            let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
            say(String(decoding: data, as: UTF8.self))
        } else if all {
            for (k, v) in result.entries.sorted(by: { $0.key < $1.key }) { say("\(k.content)  \(String(decoding: v, as: UTF8.self))") }
        } else {
            say(String(decoding: result.value ?? [], as: UTF8.self))
        }
    }
}

extension GetCommand {
    /// `--follow`: subscribes first (so nothing put meanwhile is missed), prints what is there,
    /// then every value the responsible peers report.
    func follow(location: Number160, domain: Number160, query: StorageQuery, options: DHTOptions) async throws {
        let all = self.all
        let signals = await UnixSignalsSequence(trapping: [.sigterm, .sigint])
        try await dht.withClient { node in
            let events = node.dht.listen(location, options: options)
            let current = try await node.dht.get(query, options: options)
            let matches: @Sendable (Number640) -> Bool = { k in k.domain == domain && (all || k.content == .zero) }
            for (k, v) in current.entries.sorted(by: { $0.key < $1.key }) where matches(k) {
                say(all ? "\(k.content)  \(String(decoding: v, as: UTF8.self))" : String(decoding: v, as: UTF8.self))
            }
            note("following \(location): new values are printed as they are stored (SIGINT stops)")
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    for try await event in events {
                        switch event {
                        case .stored(let k, let v) where matches(k):
                            say(all ? "\(k.content)  \(String(decoding: v, as: UTF8.self))" : String(decoding: v, as: UTF8.self))
                        case .removed(let k) where matches(k):
                            note("removed: \(k.content)")
                        default: break
                        }
                    }
                }
                group.addTask {
                    for await _ in signals { return }
                }
                _ = try await group.next()
                group.cancelAll()
            }
        }
    }
}

struct RemoveCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "remove", abstract: "Remove the value under a key from the peers closest to it.")

    @OptionGroup var dht: DHTClientOptions
    @Flag(help: "Every value under the key's location and domain.")
    var all = false
    @Argument(help: "The key: hashed with SHA-1, unless given as 0x and 40 hex digits.")
    var key: String

    /// Pages a `--all` remove goes through at most (a location holds at most 10,000 entries by
    /// default, a peer removes 1,000 per request).
    static let maxPages = 64

    func run() async throws {
        let query = try dht.query(key: key, all: all)
        let options = DHTOptions(replicas: dht.replicas, signer: try dht.signer())
        // Peers remove a bounded page per request; a whole location is removed page by page
        // (at most `maxPages`, each strictly after the last).
        let (removed, peers, refusal) = try await dht.withClient { node in
            var next: StorageQuery? = query
            var removed = 0, peers = 0, pages = 0
            while let q = next, pages < Self.maxPages {
                pages += 1
                let result = try await node.dht.remove(q, returnValues: true, options: options)
                if let refusal = result.refusal, result.isEmpty { return (removed, peers, Optional(refusal)) }
                removed += result.entries.count
                peers = max(peers, result.outcomes.filter { if case .success = $0.result { true } else { false } }.count)
                next = result.resumeAfter.flatMap { q.resuming(after: $0) }
            }
            return (removed, peers, StorageError?.none)
        }
        if case .protected(_, let owner, let domain)? = refusal {
            throw CLIError.failed("denied: remove of \(key): the \(domain ? "domain" : "entry") is owned by \(owner.id)")
        }
        guard removed > 0 else {
            note("not found: \(key)\(refusal.map { " (\($0))" } ?? "")")
            throw ExitCode(1)
        }
        say("removed \(removed) value(s) from \(peers) peers")
    }
}

struct SendCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "send", abstract: "Send text to the peers closest to a key and print their replies.")

    @OptionGroup var dht: DHTClientOptions
    @Argument(help: "The key: hashed with SHA-1, unless given as 0x and 40 hex digits.")
    var key: String
    @Argument(help: "The text to send.")
    var text: String

    func run() async throws {
        let target = try parseKey(key)
        let options = DHTOptions(replicas: dht.replicas, evaluation: "union")
        let bytes = Array(text.utf8)
        let result = try await dht.withClient { node in try await node.dht.send(to: target, bytes, options: options) }
        for (peer, reply) in result.replies.sorted(by: { $0.key.id < $1.key.id }) {
            say("\(peer.socket)  \(String(decoding: reply, as: UTF8.self))")
        }
        for (peer, why) in result.failures { note("\(peer.socket)  failed: \(why)") }
        guard !result.replies.isEmpty else { throw CLIError.failed("no peer replied") }
    }
}
