import Crypto
import NIOCore
import P2PEvaluation
import P2PKernel
@_exported import P2PStorage

/// Per-request knobs, with TomP2P's defaults.
public struct DHTOptions: Sendable {
    /// How many peers must answer (TomP2P's minimum results): a put lands on this many of the
    /// peers closest to the key.
    public var replicas = 3
    /// Failed peers tolerated before giving up (each is replaced by the next closest).
    public var maxFailures = 3
    /// Extra requests sent in parallel beyond `replicas` (TomP2P's parallel difference).
    public var parallelDifference = 0
    /// Routing knobs; nil uses the node's, with `resultSize` sized for replicas and spares.
    public var routing: RoutingConfig?
    /// How several peers' answers become one (a registered `EvaluationScheme`'s name).
    public var evaluation = "majority"
    /// Time to live of stored values; nil keeps them until removed.
    public var ttl: Duration?
    /// The writer's key (the user's, which may differ from the peer's): write requests carry a
    /// proof signed by it, and the values a `put(_:_:)` or `add` stores are signed by it.
    public var signer: Curve25519.Signing.PrivateKey?
    /// What a signed put protects: its entry (every version of location, domain, content) and/or
    /// its domain (location, domain). Needs `signer`.
    public var protect: Protect = []
    /// How many peers a write goes to: the key's replica set. Nil: the replication factor of this
    /// node's replication policy, else `defaultReplicaSet` (never fewer than `replicas`).
    public var replicaSet: Int?
    /// How many of the replica set must acknowledge a write for it to succeed. Nil: a majority
    /// of the peers the write could reach (of the set, or of fewer when the overlay is smaller).
    public var quorum: Int?

    /// The replica set of a write when nothing says otherwise (TomP2P's replication factor).
    public static let defaultReplicaSet = 6

    /// What a signed put asks to protect.
    public struct Protect: OptionSet, Sendable, Hashable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let entry = Protect(rawValue: 1)
        public static let domain = Protect(rawValue: 2)
    }

    public init(replicas: Int = 3, maxFailures: Int = 3, parallelDifference: Int = 0, routing: RoutingConfig? = nil,
                evaluation: String = "majority", ttl: Duration? = nil, signer: Curve25519.Signing.PrivateKey? = nil,
                protect: Protect = [], replicaSet: Int? = nil, quorum: Int? = nil) {
        self.replicaSet = replicaSet.map { max(1, $0) }
        self.quorum = quorum.map { max(1, $0) }
        self.replicas = max(1, replicas)
        self.maxFailures = max(0, maxFailures)
        self.parallelDifference = max(0, parallelDifference)
        self.routing = routing
        self.evaluation = evaluation
        self.ttl = ttl
        self.signer = signer
        self.protect = protect
    }

    var ttlSeconds: UInt32 {
        guard let ttl else { return 0 }
        return UInt32(clamping: max(1, ttl.components.seconds + (ttl.components.attoseconds > 0 ? 1 : 0)))
    }
}

/// Why a DHT operation could not run.
public enum DHTError: Error, Equatable, CustomStringConvertible {
    case pluginNotInstalled
    case unknownEvaluationScheme(String, available: [String])
    case mixedLocations
    case noPeers
    /// Protection, signing a value or handing over ownership needs `DHTOptions.signer`.
    case needsSigner(String)
    /// A peer answered with something that is no storage result.
    case badAnswer(String)
    /// No peer responsible for the location took the subscription (`DHT.listen`).
    case notListening(String)

    public var description: String {
        switch self {
        case .pluginNotInstalled: "the DHT plugin is not installed on this node"
        case .unknownEvaluationScheme(let n, let a): "no evaluation scheme named '\(n)' (registered: \(a.isEmpty ? "none" : a.joined(separator: ", ")))"
        case .mixedLocations: "all keys of one request must share a location"
        case .noPeers: "no peer answered and this node stores no replicas"
        case .needsSigner(let what): "\(what) needs a signer key (DHTOptions.signer)"
        case .badAnswer(let why): "a peer's answer is no storage result: \(why)"
        case .notListening(let why): "no peer took the subscription: \(why)"
        }
    }
}

/// What one peer did with a request.
public struct PeerOutcome: Sendable {
    public let peer: PeerAddress
    public let result: Result<StorageResult, any Error>
    /// The peer's error, as text.
    public var failure: String? {
        if case .failure(let e) = result { return "\(e)" }
        return nil
    }
}

/// The answer of a put, putIfAbsent, add, confirm, putMeta or remove: what each peer of the
/// key's replica set did, and whether a quorum of them acknowledged.
public struct PutResult: Sendable {
    public let keys: [Number640]
    public let outcomes: [PeerOutcome]
    /// Acknowledgements the write needed (`DHTOptions.quorum`).
    public let quorum: Int

    public init(keys: [Number640], outcomes: [PeerOutcome], quorum: Int = 1) {
        self.keys = keys
        self.outcomes = outcomes
        self.quorum = quorum
    }

    /// Peers that stored every key of the write (ok or forked; a key they already held in this
    /// very version counts).
    public var acknowledged: Int {
        statuses.values.filter { s in keys.allSatisfy { [.ok, .versionFork].contains(s[$0]) } }.count
    }

    /// Statuses by peer (peers that answered).
    public var statuses: [PeerAddress: [Number640: StorageStatus]] {
        var out: [PeerAddress: [Number640: StorageStatus]] = [:]
        for o in outcomes { if case .success(.statuses(let s, _)) = o.result { out[o.peer, default: [:]].merge(s) { _, b in b } } }
        return out
    }

    /// Peers that failed, with why.
    public var failures: [PeerAddress: String] {
        var out: [PeerAddress: String] = [:]
        for o in outcomes { if let f = o.failure { out[o.peer] = f } }
        return out
    }

    /// One status per key over all peers: `ok` when every answering peer stored it; otherwise the
    /// most telling problem (version fork, not absent, superseded by a newer version, denied, not
    /// found, stamp ahead, failed).
    public func status(of key: Number640) -> StorageStatus {
        let all = statuses.values.compactMap { $0[key] }
        guard !all.isEmpty else { return .failed }
        for s in [StorageStatus.versionFork, .failedNotAbsent, .superseded, .denied, .notFound, .stampAhead, .failed] where all.contains(s) { return s }
        return .ok
    }

    /// Whether a quorum of the replica set stored every key, and no peer refused the request.
    public var isSuccess: Bool {
        refusal == nil && acknowledged >= max(1, quorum)
    }

    /// The first refusal a peer answered with (a protected entry or domain, a bad signature, a
    /// bound), if any.
    public var refusal: StorageError? {
        for o in outcomes { if case .failure(let e as StorageError) = o.result { return e } }
        return nil
    }

    /// The owner that refused the write, when a protected entry or domain did.
    public var deniedBy: SignerKey? {
        for o in outcomes { if case .failure(StorageError.protected(_, let owner, _)) = o.result { return owner } }
        return nil
    }
}

/// The answer of a get.
public struct GetResult: Sendable {
    /// The evaluated entries (by the request's scheme).
    public let entries: [Number640: [UInt8]]
    public let outcomes: [PeerOutcome]

    /// What each peer returned.
    public var perPeer: [PeerAddress: [Number640: StoredValue]] {
        var out: [PeerAddress: [Number640: StoredValue]] = [:]
        for o in outcomes { if case .success(.values(let v, _)) = o.result { out[o.peer] = v } }
        return out
    }

    /// Who signed the evaluated value under `key`, and whether the signature verifies here (nil
    /// when no answering peer returned it signed).
    public func signature(of key: Number640) -> (signer: SignerKey, verified: Bool)? {
        guard let bytes = entries[key] else { return nil }
        var unverified: SignerKey?
        for (_, values) in perPeer {
            guard let v = values[key], v.value == bytes, let s = v.signature else { continue }
            if v.verify(at: key) { return (s.signer, true) }
            unverified = s.signer
        }
        return unverified.map { ($0, false) }
    }

    /// The first refusal a peer answered with, if any.
    public var refusal: StorageError? {
        for o in outcomes { if case .failure(let e as StorageError) = o.result { return e } }
        return nil
    }

    /// Where to resume a range whose answers were cut at a peer's byte bound (the smallest
    /// continuation any peer gave); nil when the answers were whole.
    public var resumeAfter: Number640? {
        outcomes.compactMap { o -> Number640? in
            switch o.result {
            case .success(.values(_, let r)), .success(.statuses(_, let r)): r
            default: nil
            }
        }.min()
    }

    /// The value of the smallest key, for single-key gets.
    public var value: [UInt8]? { entries.min { $0.key < $1.key }?.value }
    public var isEmpty: Bool { entries.isEmpty }
}

/// The answer of a routed send.
public struct SendResult: Sendable {
    /// Replies by peer.
    public let replies: [PeerAddress: [UInt8]]
    /// The evaluated reply (by the request's scheme), if the scheme kept one.
    public let reply: [UInt8]?
    public let failures: [PeerAddress: String]
}

extension Node {
    /// The DHT operations of this node (requires `DHTPlugin`).
    public var dht: DHT { DHT(node: self) }
}

/// The DHT operations: put, putIfAbsent, add, get, getLatest, remove, digest, two-phase put,
/// putMeta, routed send. Each routes to the peers closest to the key's location and fans out to
/// `replicas` of them.
public struct DHT: Sendable {
    public let node: Node

    // MARK: puts

    /// Stores one value under a key.
    @discardableResult
    public func put(_ key: Number640, _ value: [UInt8], basedOn: [Number160] = [], options: DHTOptions = DHTOptions()) async throws -> PutResult {
        try await put([key: try self.value(key, StoredValue(value, ttlSeconds: options.ttlSeconds, basedOn: basedOn), options)], options: options)
    }

    /// Stores several values under one location at once. The values go as given (sign them with
    /// `StoredValue.signed(at:by:)`); with `options.signer` the request carries its writer proof,
    /// and `options.protect` containing `.domain` claims the domain.
    @discardableResult
    public func put(_ entries: [Number640: StoredValue], mode: PutMode = .overwrite, options: DHTOptions = DHTOptions()) async throws -> PutResult {
        let location = try sharedLocation(Array(entries.keys))
        var mode = mode
        if options.protect.contains(.domain) {
            guard options.signer != nil else { throw DHTError.needsSigner("domain protection") }
            mode.insert(.protectDomain)
        }
        // An unstamped value is stamped here, by the writer, so every replica holds the same version.
        var entries = entries
        for (key, v) in entries where v.stamp == 0 && v.signature == nil { entries[key]?.stamp = node.storage.versions.next() }
        let outcomes = try await routed(location, .put(entries, mode: mode), options: options)
        return PutResult(keys: entries.keys.sorted(), outcomes: outcomes, quorum: quorum(outcomes, options))
    }

    /// A value as a single-value put stores it: signed by `options.signer` when there is one, and
    /// asking for entry protection when `options.protect` says so.
    private func value(_ key: Number640, _ v: StoredValue, _ options: DHTOptions) throws -> StoredValue {
        var v = v
        v.protectEntry = options.protect.contains(.entry)
        if v.stamp == 0 { v.stamp = node.storage.versions.next() }
        guard let signer = options.signer else {
            if v.protectEntry { throw DHTError.needsSigner("entry protection") }
            return v
        }
        return try v.signed(at: key, by: signer)
    }

    /// Stores a value only where the key holds nothing yet; `failedNotAbsent` otherwise.
    @discardableResult
    public func putIfAbsent(_ key: Number640, _ value: [UInt8], options: DHTOptions = DHTOptions()) async throws -> PutResult {
        try await put([key: try self.value(key, StoredValue(value, ttlSeconds: options.ttlSeconds), options)], mode: .ifAbsent, options: options)
    }

    /// Adds a value under location and domain: its content key is the SHA-1 of the value, or a
    /// random key in list mode (so equal values are kept apart). Returns the key used.
    @discardableResult
    public func add(location: Number160, domain: Number160 = .zero, _ value: [UInt8], list: Bool = false,
                    options: DHTOptions = DHTOptions()) async throws -> (key: Number640, result: PutResult) {
        var rng = node.random.generator
        let content = list ? Number160.random(using: &rng) : Number160(sha1Of: value)
        let key = Number640(location: location, domain: domain, content: content)
        return (key, try await put(key, value, options: options))
    }

    /// First phase of a two-phase put: stored, but invisible to gets until `confirm`.
    @discardableResult
    public func prepare(_ key: Number640, _ value: [UInt8], options: DHTOptions = DHTOptions()) async throws -> PutResult {
        try await put([key: try self.value(key, StoredValue(value, ttlSeconds: options.ttlSeconds, prepared: true), options)], options: options)
    }

    /// Second phase of a two-phase put.
    @discardableResult
    public func confirm(_ keys: [Number640], options: DHTOptions = DHTOptions()) async throws -> PutResult {
        let outcomes = try await routed(try sharedLocation(keys), .confirm(keys), options: options)
        return PutResult(keys: keys, outcomes: outcomes, quorum: quorum(outcomes, options))
    }

    /// Changes the TTL of stored values without sending them again (nil = keep forever).
    ///
    /// A signed value's TTL is part of what its signature covers, so a signed value needs a new
    /// signature: with `signWith`, the current values are fetched, signed with the new TTL by that
    /// key and only the signatures are sent. A key other than the owner's hands a protected entry
    /// to that key (the request itself is signed by `options.signer`, who must own it).
    @discardableResult
    public func putMeta(_ keys: [Number640], ttl: Duration?, signWith newKey: Curve25519.Signing.PrivateKey? = nil,
                        options: DHTOptions = DHTOptions()) async throws -> PutResult {
        var o = options
        o.ttl = ttl
        let ttlSeconds = o.ttlSeconds
        guard let newKey else {
            let outcomes = try await routed(try sharedLocation(keys), .putMeta(keys, ttlSeconds: ttlSeconds), options: options)
            return PutResult(keys: keys, outcomes: outcomes, quorum: quorum(outcomes, options))
        }
        // A stamped value lives its TTL after its stamp, so the TTL signed is counted from
        // there: values written at different times get different TTLs, one request each.
        let location = try sharedLocation(keys)
        let current = try await get(.keys(keys), options: options)
        var groups: [UInt32: [Number640: ValueSignature]] = [:]
        var missing: [Number640] = []
        for key in keys {
            guard let bytes = current.entries[key],
                  let stored = current.perPeer.values.lazy.compactMap({ $0[key] }).first(where: { $0.value == bytes && !$0.isTombstone }) else {
                missing.append(key)
                continue
            }
            var v = stored
            let written = VersionStamp.millis(v.stamp), wall = node.storage.versions.wallMillis
            v.ttlSeconds = ttlSeconds == 0 || v.stamp == 0 ? ttlSeconds
                : UInt32(clamping: UInt64(ttlSeconds) + (wall > written ? (wall - written) / 1_000 : 0))
            v.remainingSeconds = nil
            groups[v.ttlSeconds, default: [:]][key] = try v.signed(at: key, by: newKey).signature
        }
        var outcomes: [PeerOutcome] = []
        var least = Int.max
        // Keys nobody returned are asked about too: the replicas answer what they hold.
        var requests = groups.sorted(by: { $0.key < $1.key }).map { (keys: $0.value.keys.sorted(), ttl: $0.key, signatures: $0.value) }
        if !missing.isEmpty { requests.append((missing, ttlSeconds, [:])) }
        for (keys, ttl, signatures) in requests {
            let o = try await routed(location, .putMeta(keys, ttlSeconds: ttl, signatures: signatures), options: options)
            outcomes += o
            least = min(least, quorum(o, options))
        }
        return PutResult(keys: keys, outcomes: outcomes, quorum: least == .max ? 1 : least)
    }

    /// Hands a protected domain to another key; `options.signer` must own it (or be its master key).
    @discardableResult
    public func transferDomain(location: Number160, domain: Number160, to newOwner: SignerKey,
                               options: DHTOptions = DHTOptions()) async throws -> PutResult {
        guard options.signer != nil else { throw DHTError.needsSigner("handing over a domain") }
        let key = Number640(location: location, domain: domain)
        let outcomes = try await routed(location, .transferDomain(location: location, domain: domain, to: newOwner), options: options)
        return PutResult(keys: [key], outcomes: outcomes, quorum: quorum(outcomes, options))
    }

    // MARK: gets

    /// The value under one key.
    public func get(_ key: Number640, options: DHTOptions = DHTOptions()) async throws -> GetResult {
        try await get(.keys([key]), options: options)
    }

    /// Values matching a query: several keys, a range, everything under a location and domain
    /// (`.all(location:domain:)`), or the latest versions (`.latest`).
    ///
    /// The get rides along the lookup (Kademlia's FIND_VALUE): every peer asked answers from its
    /// storage, and the answers of the `replicas` peers closest to the key are read — a peer that
    /// answered during the lookup is not asked again; one that could not (an intercepted domain)
    /// is asked afterwards. The lookup does not stop at the first holders: an old copy held off
    /// the replica set must not stand in for it.
    ///
    /// Answers carry removals as well as values; per key the newest version wins (see
    /// `evaluate`), and a peer that answered with an older version, or without a key it was
    /// asked for by name, is sent the newest (read repair) while the result is returned.
    public func get(_ query: StorageQuery, options: DHTOptions = DHTOptions()) async throws -> GetResult {
        let outcomes = try await routedGet(try location(of: query), .get(query), options: options)
        let result = GetResult(entries: try evaluate(outcomes, options: options), outcomes: outcomes)
        repair(outcomes, asked: query)
        return result
    }

    /// Sends the newest version of each key to the answering peers that hold an older one (or,
    /// for keys asked by name, none), at most `maxRepairsPerGet` keys per get.
    private func repair(_ outcomes: [PeerOutcome], asked query: StorageQuery) {
        let newest = Self.newest(outcomes, versions: node.storage.versions)
        guard !newest.isEmpty else { return }
        let named: [Number640]
        if case .keys(let k) = query { named = k } else { named = [] }
        var budget = Self.maxRepairsPerGet
        for o in outcomes {
            guard budget > 0, case .success(.values(let held, _)) = o.result else { continue }
            var stale: [Number640: StoredValue] = [:]
            for (key, n) in newest where budget > 0 {
                // Peers that hold other bytes under the newest stamp disagree on a version: the
                // vote decides what is read, and no side is pushed on the other.
                let mine = held[key]
                guard mine.map({ n.supersedes($0) && (n.stamp != $0.stamp || n.isTombstone != $0.isTombstone) }) ?? named.contains(key) else { continue }
                var v = n
                v.remainingSeconds = nil
                stale[key] = v
                budget -= 1
            }
            guard !stale.isEmpty else { continue }
            let request = StorageRequest.put(stale, mode: .overwrite)
            if o.peer.id == node.peerID {
                _ = DHT.executeLocally(request, proof: nil, sender: nil, node: node)
            } else {
                _ = node.request(to: o.peer, command: DHTPlugin.storageCommand, payload: StorageCodec.encode(request))
            }
        }
    }

    /// Keys one get repairs at most, over all the peers it sends them to.
    public static let maxRepairsPerGet = 64

    /// The current heads of a versioned item.
    public func getLatest(location: Number160, domain: Number160 = .zero, content: Number160 = .zero,
                          options: DHTOptions = DHTOptions()) async throws -> GetResult {
        var o = options
        if o.evaluation == "majority" { o.evaluation = "union" }
        return try await get(.latest(location: location, domain: domain, content: content), options: o)
    }

    /// Keys and their basedOn sets instead of values (union over the answering peers).
    public func digest(_ query: StorageQuery, options: DHTOptions = DHTOptions()) async throws -> [Number640: [Number160]] {
        let outcomes = try await routed(try location(of: query), .digest(query), options: options)
        var out: [Number640: [Number160]] = [:]
        for o in outcomes { if case .success(.digest(let d)) = o.result { out.merge(d) { a, _ in a } } }
        return out
    }

    // MARK: removes

    /// Removes what matches the query from the key's replica set; with `returnValues`, the result
    /// holds what was removed.
    ///
    /// A remove is a write of removals (tombstones) stamped now, to the whole replica set like
    /// any write: every replica keeps the removal for its tombstone lifetime, replication carries
    /// it to the replicas that missed it, and no older copy comes back. With `options.signer`
    /// each removal is signed, which is how the owner of a protected entry removes it on replicas
    /// that learn of the removal by replication. A range or `latest` query is resolved to keys
    /// by a get first (page by page, at most `maxRemovePages`).
    public func remove(_ query: StorageQuery, returnValues: Bool = false, options: DHTOptions = DHTOptions()) async throws -> GetResult {
        _ = try location(of: query)
        var o = options
        o.evaluation = "union"
        o.protect = []
        var keys: [Number640] = []
        var removed: [Number640: [UInt8]] = [:]
        var outcomes: [PeerOutcome] = []
        switch query {
        case .keys(let k):
            keys = k
            if returnValues { removed = try await get(query, options: o).entries }
        case .range, .latest:
            var next: StorageQuery? = query
            var pages = 0
            while let q = next, pages < Self.maxRemovePages {
                pages += 1
                let page = try await get(q, options: o)
                keys += page.entries.keys
                if returnValues { removed.merge(page.entries) { a, _ in a } }
                next = page.resumeAfter.flatMap { q.resuming(after: $0) }
            }
        }
        keys = Array(Set(keys)).sorted()
        guard !keys.isEmpty else { return GetResult(entries: [:], outcomes: outcomes) }
        // A signed removal costs a signature check on every replica: as many per request as a
        // peer checks (the request's own proof among them).
        let chunk = options.signer == nil ? node.storage.limits.maxEntriesPerRequest : max(1, node.storage.limits.maxSignaturesPerRequest - 1)
        var start = 0
        while start < keys.count {
            let part = keys[start..<min(keys.count, start + chunk)]
            start += part.count
            var removals: [Number640: StoredValue] = [:]
            for key in part {
                let t = StoredValue.tombstone(stamp: node.storage.versions.next())
                removals[key] = try options.signer.map { try t.signed(at: key, by: $0) } ?? t
            }
            let written = try await put(removals, options: o)
            outcomes += written.outcomes
            // What was removed: the keys a quorum of the replica set took the removal of.
            if !written.isSuccess { for key in part { removed[key] = nil } }
        }
        return GetResult(entries: returnValues ? removed : [:], outcomes: outcomes)
    }

    /// Pages of a range a remove resolves at most (each a get of up to a peer's answer bound).
    public static let maxRemovePages = 64

    // MARK: routed send

    /// Sends bytes to the peers closest to `key`; their raw reply handlers answer, and the
    /// replies are evaluated by `options.evaluation`.
    public func send(to key: Number160, _ bytes: [UInt8], options: DHTOptions = DHTOptions()) async throws -> SendResult {
        try await routedSend(key, command: DHTPlugin.sendCommand, payload: [.keys([key]), .bytes(bytes)], options: options)
    }

    /// Sends a request for a registered command (any plugin's, loaded ones included) to the peers
    /// closest to `key`: the command gets `bytes` as its byte section and answers with one.
    public func send(to key: Number160, command: String, _ bytes: [UInt8], options: DHTOptions = DHTOptions()) async throws -> SendResult {
        try await routedSend(key, command: CommandID.derive(from: command), payload: [.bytes(bytes)], options: options)
    }

    private func routedSend(_ key: Number160, command: UInt16, payload: [Payload], options: DHTOptions) async throws -> SendResult {
        let node = self.node
        let answer: @Sendable (Message) throws -> [UInt8] = { reply in
            if let e = RPCError.from(reply: reply) { throw e }
            return reply.firstBytes ?? []
        }
        let answers = try await fanOut(key, options: options, remote: { peer in
            node.request(to: peer, command: command, payload: payload).flatMapThrowing(answer)
        }, local: {
            node.handleLocally(command: command, payload: payload).flatMapThrowing(answer)
        }).get()
        var replies: [PeerAddress: [UInt8]] = [:]
        var failures: [PeerAddress: String] = [:]
        for (peer, r) in answers {
            switch r {
            case .success(let b): replies[peer] = b
            case .failure(let e): failures[peer] = "\(e)"
            }
        }
        let scheme = try scheme(options.evaluation)
        let evaluated = scheme.evaluate(replies.map { PeerAnswer(peer: $0.key, entries: [.zero: $0.value]) })
        return SendResult(replies: replies, reply: evaluated[.zero], failures: failures)
    }

    // MARK: the engine

    /// Runs a storage request on this peer (through the interceptors) and tells replication
    /// policies about stored data. Used for local replicas and by the `dht.storage` command.
    static func executeLocally(_ request: StorageRequest, proof: WriterProof?, sender: PeerAddress?, node: Node) -> EventLoopFuture<StorageResult> {
        node.storage.executeFuture(request, proof: proof, sender: sender, node: node).map { result in
            switch (request, result) {
            case (.get(let query), _):
                return withRemovals(result, query: query, node: node)
            case (.put(let entries, _), .statuses(let s, _)):
                let stored = s.filter { $0.value == .ok || $0.value == .versionFork }.map(\.key)
                if !stored.isEmpty {
                    node.replicate(.dataInserted(stored))
                    let removals = stored.filter { entries[$0]?.isTombstone == true }
                    let values = removals.isEmpty ? stored : stored.filter { entries[$0]?.isTombstone != true }
                    if let location = stored.first?.location { notifyListeners(of: location, stored: values, removed: removals, node: node) }
                }
            case (.confirm, .statuses(let s, _)):
                let stored = s.filter { $0.value == .ok || $0.value == .versionFork }.map(\.key)
                if !stored.isEmpty {
                    node.replicate(.dataInserted(stored))
                    if let location = stored.first?.location { notifyListeners(of: location, stored: stored, removed: [], node: node) }
                }
            case (.remove, .statuses(let s, _)):
                let removed = s.filter { $0.value == .ok }.map(\.key)
                if !removed.isEmpty {
                    node.replicate(.dataRemoved(removed))
                    if let location = removed.first?.location { notifyListeners(of: location, stored: [], removed: removed, node: node) }
                }
            case (.remove, .values(let v, _)):
                if !v.isEmpty {
                    node.replicate(.dataRemoved(Array(v.keys)))
                    if let location = v.keys.first?.location { notifyListeners(of: location, stored: [], removed: Array(v.keys), node: node) }
                }
            default: break
            }
            return result
        }
    }

    /// A get's answer with the removals this peer holds under the keys it asked for by name or
    /// within its range (as far as the answer reaches), so that a reader sees that a key was
    /// removed, not merely that this peer lacks it. Interceptors and backends see plain gets.
    static func withRemovals(_ result: StorageResult, query: StorageQuery, node: Node) -> StorageResult {
        guard case .values(var values, let resume) = result, let backend = node.registry.storageBackend else { return result }
        let now = node.clock.uptimeNanoseconds
        switch query {
        case .keys(let keys):
            let missing = keys.filter { k in values[k] == nil && (resume.map { k <= $0 } ?? true) }
            guard !missing.isEmpty else { return result }
            for (k, v) in backend.replicaEntries(missing, now: now) where v.isTombstone { values[k] = v }
        case .range(let from, let to, let limit, _):
            let upTo = resume ?? to
            var after = from.predecessor
            var seen = 0
            while seen < limit {
                let (page, more) = backend.versions(at: from.location, after: after, limit: 1_000, now: now)
                let removals = page.filter { $0.key <= upTo && $0.isTombstone }.map(\.key)
                if !removals.isEmpty {
                    for (k, v) in backend.replicaEntries(removals, now: now) where v.isTombstone { values[k] = v }
                }
                seen += page.count
                guard more, let last = page.last, last.key < upTo, seen < node.storage.limits.maxEntriesPerRequest else { break }
                after = last.key
            }
        case .latest:
            break
        }
        return .values(values, resumeAfter: resume)
    }

    /// A request naming more entries than peers serve at once fails here, before it is sent:
    /// the caller splits it (a put is all or nothing per request, so the DHT does not).
    private func checkSize(_ request: StorageRequest) throws(StorageError) {
        let limit = node.storage.limits.maxEntriesPerRequest
        guard request.namedEntries <= limit else { throw .requestTooLarge(entries: request.namedEntries, limit: limit) }
    }

    /// The peers a write goes to: the replica set (`DHTOptions.replicaSet`, else the replication
    /// policy's factor, else `defaultReplicaSet`), never fewer than `replicas`.
    func replicaSet(_ options: DHTOptions) -> Int {
        let set = options.replicaSet ?? node.registry.replicationPolicies.compactMap(\.replicaSetSize).max() ?? DHTOptions.defaultReplicaSet
        return max(options.replicas, set)
    }

    /// Acknowledgements a write needs: `options.quorum`, else a majority of the replica set as
    /// the writer found it — the peers that answered (stored it, or refused it), at most the set's
    /// size. A peer that did not answer (or answered garbage) was replaced by the next closest
    /// while there were any; when there were not, the overlay is smaller than the set (or cut
    /// off: during a partition the side a writer sees is its set).
    func quorum(_ outcomes: [PeerOutcome], _ options: DHTOptions) -> Int {
        if let q = options.quorum { return q }
        let answered = Set(outcomes.filter { DHT.answered($0.result) }.map(\.peer.id)).count
        return min(replicaSet(options), max(1, answered)) / 2 + 1
    }

    private func routed(_ location: Number160, _ request: StorageRequest, options: DHTOptions) async throws -> [PeerOutcome] {
        guard node.registry.plugin(DHTPlugin.self) != nil else { throw DHTError.pluginNotInstalled }
        try checkSize(request)
        var options = options
        // A write goes to the whole replica set, so that no replica is left with an older version.
        if request.isWrite { options.replicas = replicaSet(options) }
        let signedAt = node.clock.unixMilliseconds
        let proof = try request.isWrite ? options.signer.map { try WriterProof(signing: request, with: $0, timestampMillis: signedAt) } : nil
        let payload = StorageCodec.encode(request, proof: proof)
        let answers = try await fanOut(location, options: options, remote: { peer in
            node.request(to: peer, command: DHTPlugin.storageCommand, payload: payload).flatMapThrowing { reply in
                try DHT.decodeAnswer(reply)
            }
        }, local: {
            DHT.executeLocally(request, proof: proof, sender: nil, node: node)
        }, answered: DHT.answered).get()
        return answers.map { PeerOutcome(peer: $0.0, result: $0.1) }
    }

    /// A get with the question carried in the lookup; see `get(_:options:)`.
    private func routedGet(_ location: Number160, _ request: StorageRequest, options: DHTOptions) async throws -> [PeerOutcome] {
        guard let plugin = node.registry.plugin(DHTPlugin.self) else { throw DHTError.pluginNotInstalled }
        try checkSize(request)
        let node = self.node
        let payload = StorageCodec.encode(request)
        var known: [Number160: Result<StorageResult, any Error>] = [:]
        if plugin.acceptsReplicas, case .get(let query) = request, let mine = node.storage.executeImmediately(request) {
            known[node.peerID] = mine.map { DHT.withRemovals($0, query: query, node: node) }.mapError { $0 as any Error }
        }
        // The lookup runs to the key's closest peers, each answering the get as it is asked, and
        // the answers of the `replicas` closest are read: a peer on the way holding an old copy
        // (a former replica, one a write reached by a stale view) must not stand in for the set.
        let routing = routingConfig(options)
        let question = RoutingQuestion(handlerName: GetQuestion.handlerName, payload: payload, isHit: GetQuestion.isHit)
        let result = try await node.lookup(location, config: routing, question: question).get()
        for answer in result.answers {
            guard let decoded = try? StorageCodec.decodeResult(answer.payload) else { continue }
            known[answer.peer.id] = .success(decoded)
        }
        let answers = try await fanOut(location, candidates: candidates(result.peers, location: location), known: known, options: options,
                                       remote: { peer in
                                           node.request(to: peer, command: DHTPlugin.storageCommand, payload: payload).flatMapThrowing { reply in
                                               try DHT.decodeAnswer(reply)
                                           }
                                       }, local: { DHT.executeLocally(request, proof: nil, sender: nil, node: node) },
                                       answered: DHT.answered).get()
        return answers.map { PeerOutcome(peer: $0.0, result: $0.1) }
    }

    private func routingConfig(_ options: DHTOptions) -> RoutingConfig {
        var routing = options.routing ?? node.config.routing
        if options.routing == nil {
            routing.resultSize = options.replicas + options.parallelDifference + options.maxFailures
            // A key's replicas span subnets: one /24 (/48) holds at most one of them, so a Sybil
            // with thousands of ids on one subnet cannot take a put or outvote a get, and one
            // subnet's outage loses one copy (loopback is exempt: simulations share 127.0.0.1).
            routing.maxPerIPGroup = 1
        }
        return routing
    }

    /// The lookup's peers, with this node inserted by distance when it accepts replicas.
    private func candidates(_ peers: [PeerAddress], location: Number160) -> [PeerAddress] {
        var candidates = peers
        if node.registry.plugin(DHTPlugin.self)?.acceptsReplicas ?? false {
            let me = node.address
            let at = candidates.firstIndex { location.isCloser(me.id, than: $0.id) } ?? candidates.count
            candidates.insert(me, at: at)
        }
        return candidates
    }

    /// Looks up the peers closest to `location`, then asks `replicas` of them (closest first,
    /// this node among them when it accepts replicas), replacing failed ones from the spares.
    func fanOut<T: Sendable>(_ location: Number160, options: DHTOptions,
                                     remote: @escaping @Sendable (PeerAddress) -> EventLoopFuture<T>,
                                     local: @escaping @Sendable () -> EventLoopFuture<T>,
                                     answered: @escaping @Sendable (Result<T, any Error>) -> Bool = FanOut<T>.succeeded) -> EventLoopFuture<[(PeerAddress, Result<T, any Error>)]> {
        let dht = self
        return node.lookup(location, config: routingConfig(options)).flatMap { result in
            dht.fanOut(location, candidates: dht.candidates(result.peers, location: location), known: [:], options: options,
                       remote: remote, local: local, answered: answered)
        }
    }

    /// A peer's storage answer: its result, or the typed refusal it sent. An answer that does not
    /// decode is the peer failing (`DHTError.badAnswer`), not a refusal: the next peer is asked.
    static func decodeAnswer(_ reply: Message) throws -> StorageResult {
        if let e = RPCError.from(reply: reply) { throw e }
        do {
            return try StorageCodec.decodeResult(reply.payload)
        } catch {
            if StorageCodec.isRefusal(reply.payload) { throw error }
            throw DHTError.badAnswer("\(error)")
        }
    }

    /// Whether a peer's storage outcome is its answer. A refusal by protection, signature or
    /// shape is: the next peers are not asked instead (a write one replica refuses must not land
    /// on others). A full or busy peer, or one that did not answer, is replaced by the next.
    static func answered(_ r: Result<StorageResult, any Error>) -> Bool {
        switch r {
        case .success: return true
        case .failure(let e as StorageError):
            switch e {
            case .storageFull, .entryLimit, .tooManyEntries, .busy, .noBackend, .quotaExceeded: return false
            default: return true
            }
        case .failure: return false
        }
    }

    /// Asks `replicas` of the candidates; a candidate with a `known` answer is not asked again.
    private func fanOut<T: Sendable>(_ location: Number160, candidates: [PeerAddress], known: [Number160: Result<T, any Error>],
                                     options: DHTOptions,
                                     remote: @escaping @Sendable (PeerAddress) -> EventLoopFuture<T>,
                                     local: @escaping @Sendable () -> EventLoopFuture<T>,
                                     answered: @escaping @Sendable (Result<T, any Error>) -> Bool = FanOut<T>.succeeded) -> EventLoopFuture<[(PeerAddress, Result<T, any Error>)]> {
        let node = self.node
        return node.eventLoop.flatSubmit {
            FanOut<T>(node: node, candidates: candidates, options: options, answered: answered, remote: { peer in
                if let answer = known[peer.id] { return node.eventLoop.makeCompletedFuture(answer) }
                return remote(peer)
            }, local: {
                if let answer = known[node.peerID] { return node.eventLoop.makeCompletedFuture(answer) }
                return local()
            }).start()
        }
    }

    private func scheme(_ name: String) throws -> any EvaluationScheme {
        guard let s = node.registry.scheme(named: name) else {
            throw DHTError.unknownEvaluationScheme(name, available: node.registry.schemeNames)
        }
        return s
    }

    /// The answers' entries by the scheme, after versions: per key only the newest stamp any
    /// peer returned counts (`newest`), and a key whose newest version is a removal is left
    /// out. A peer holding an older version or none counts as holding the newest (read repair
    /// brings it there) when the answers of the newest stamp agree on its bytes; when they
    /// disagree it does not vote, and the scheme decides among them — so a minority of peers
    /// answering other bytes for the same version is outvoted.
    private func evaluate(_ outcomes: [PeerOutcome], options: DHTOptions) throws -> [Number640: [UInt8]] {
        let scheme = try scheme(options.evaluation)
        let newest = Self.newest(outcomes, versions: node.storage.versions)
        var bytesAtNewest: [Number640: Set<[UInt8]>] = [:]
        for o in outcomes {
            guard case .success(.values(let v, _)) = o.result else { continue }
            for (key, x) in v where !x.isTombstone && x.stamp == newest[key]?.stamp && newest[key]?.isTombstone == false {
                bytesAtNewest[key, default: []].insert(x.value)
            }
        }
        // Where the newest version's bytes are not in dispute, a peer that answered without the
        // key, or with an older version of it, counts as holding the newest: it is a replica
        // that missed the write (read repair brings it there), not a vote against it.
        let agreed = bytesAtNewest.compactMapValues { $0.count == 1 ? $0.first : nil }
        let answers = outcomes.compactMap { o -> PeerAnswer? in
            guard case .success(.values(let v, _)) = o.result else { return nil }
            var entries = agreed
            for (key, x) in v where !x.isTombstone && bytesAtNewest[key] != nil && x.stamp == newest[key]?.stamp {
                entries[key] = x.value
            }
            return PeerAnswer(peer: o.peer, entries: entries)
        }
        return scheme.evaluate(answers)
    }

    /// Per key, the newest version among the answers (`StoredValue.supersedes`), removals
    /// included. Not believed: a stamp further ahead than this node's clock accepts, and — where
    /// any answer holds a value whose verified signer protects its entry — any version not
    /// signed (verifiably) by that signer: a peer cannot outbid the owner's data with a forged
    /// "newer" version or removal.
    static func newest(_ outcomes: [PeerOutcome], versions: VersionClock) -> [Number640: StoredValue] {
        var candidates: [Number640: [StoredValue]] = [:]
        for o in outcomes {
            guard case .success(.values(let v, _)) = o.result else { continue }
            for (key, x) in v where !versions.isAhead(x.stamp) { candidates[key, default: []].append(x) }
        }
        var out: [Number640: StoredValue] = [:]
        for (key, all) in candidates {
            var pool = all
            if let owner = all.first(where: { $0.protectEntry && $0.verify(at: key) })?.signature?.signer {
                pool = all.filter { $0.signature?.signer == owner && $0.verify(at: key) }
            }
            var best: StoredValue?
            for x in pool where best.map({ x.supersedes($0) }) ?? true { best = x }
            if let best { out[key] = best }
        }
        return out
    }

    private func sharedLocation(_ keys: [Number640]) throws -> Number160 {
        guard let first = keys.first else { throw DHTError.mixedLocations }
        guard keys.allSatisfy({ $0.location == first.location }) else { throw DHTError.mixedLocations }
        return first.location
    }

    private func location(of query: StorageQuery) throws -> Number160 {
        switch query {
        case .keys(let keys): return try sharedLocation(keys)
        case .range(let from, let to, _, _):
            guard from.location == to.location else { throw DHTError.mixedLocations }
            return from.location
        case .latest(let location, _, _): return location
        }
    }
}

/// Asks candidates in order until `replicas` answered, at most `replicas + parallelDifference`
/// at once, giving up after `maxFailures` failures. Confined to the node's event loop.
final class FanOut<T: Sendable>: @unchecked Sendable {
    private let node: Node
    private let candidates: [PeerAddress]
    private let options: DHTOptions
    private let remote: @Sendable (PeerAddress) -> EventLoopFuture<T>
    private let local: @Sendable () -> EventLoopFuture<T>
    private let answered: @Sendable (Result<T, any Error>) -> Bool
    private let promise: EventLoopPromise<[(PeerAddress, Result<T, any Error>)]>
    private var next = 0, inFlight = 0, successes = 0, failures = 0
    private var outcomes: [(PeerAddress, Result<T, any Error>)] = []
    private var done = false
    /// Candidates (by index) whose request went past the suspicion time unanswered, and those answered.
    private var slow: Set<Int> = []
    private var settled: Set<Int> = []
    private var pumping = false
    private var again = false

    /// A success is an answer; anything else replaces the peer with the next candidate.
    @Sendable static func succeeded(_ r: Result<T, any Error>) -> Bool {
        if case .success = r { return true }
        return false
    }

    init(node: Node, candidates: [PeerAddress], options: DHTOptions, answered: @escaping @Sendable (Result<T, any Error>) -> Bool = FanOut<T>.succeeded,
         remote: @escaping @Sendable (PeerAddress) -> EventLoopFuture<T>, local: @escaping @Sendable () -> EventLoopFuture<T>) {
        self.node = node
        self.answered = answered
        self.candidates = candidates
        self.options = options
        self.remote = remote
        self.local = local
        self.promise = node.eventLoop.makePromise()
    }

    func start() -> EventLoopFuture<[(PeerAddress, Result<T, any Error>)]> {
        pump()
        return promise.futureResult
    }

    /// Launches requests while there is room, and finishes when enough answered, too many
    /// failed, or no candidate is left. Not reentrant: a future that is already complete runs its
    /// callback inline, and that callback's `pump()` only asks the running one to go round again.
    private func pump() {
        guard !done else { return }
        if pumping {
            again = true
            return
        }
        pumping = true
        defer { pumping = false }
        let width = options.replicas + options.parallelDifference
        repeat {
            again = false
            while !done, next < candidates.count, inFlight < width, successes + inFlight < width {
                let peer = candidates[next]
                let index = next
                next += 1
                inFlight += 1
                let future = peer.id == node.peerID ? local() : remote(peer)
                // A peer that stays silent past the node's suspicion time frees its slot: the next
                // candidate is asked at once (its answer still counts should it come), so a dead
                // peer costs a round trip's worth of waiting, not a request timeout.
                let suspect = peer.id == node.peerID ? nil : node.scheduleTimer(in: node.suspectAfter()) { [self] in
                    guard !done, !settled.contains(index) else { return }
                    slow.insert(index)
                    inFlight -= 1
                    pump()
                }
                future.hop(to: node.eventLoop).whenComplete { [self] result in
                    node.cancelTimer(suspect)
                    settled.insert(index)
                    if slow.remove(index) == nil { inFlight -= 1 }
                    guard !done else { return }
                    outcomes.append((peer, result))
                    if answered(result) { successes += 1 } else { failures += 1 }
                    pump()
                }
            }
            if !done, successes >= options.replicas || failures > options.maxFailures || (inFlight == 0 && slow.isEmpty && next >= candidates.count) {
                done = true
                promise.succeed(outcomes)
            }
        } while again && !done
    }
}
