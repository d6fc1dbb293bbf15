import Dispatch
import GRDB
import NIOConcurrencyHelpers
import NIOCore
import P2PKernel
import P2PStorage

/// Keeps a node's routing table in its SQLite file, and its storage's commits flushed when it
/// stops. Install it after the DHT plugin that holds the `SQLiteStorage`.
///
/// ```swift
/// let database = try SQLiteDatabase(path: "node.db")
/// let storage = try SQLiteStorage(database: database)
/// let sqlite = SQLitePlugin(database: database, storage: storage)
/// let node = try await Node.builder().plugin(DHTPlugin(backend: storage)).plugin(sqlite).start()
/// let saved = try sqlite.savedPeers()                // the table of the last run
/// try await node.rejoin(from: saved)                 // joins through them, no seed needed
/// ```
/// The verified, directly reachable peers of the map are saved every `saveInterval` and when
/// the node stops: at most `maxSavedPeers`, the most recently verified first; peers not seen
/// for `forgetAfter` are dropped.
public struct SQLitePlugin: Plugin {
    public let name = "sqlite"
    public let version = "1.0.0"
    public let database: SQLiteDatabase
    public let storage: SQLiteStorage?
    public let saveInterval: Duration
    /// Most peers kept in the file (1,000): the join tries them, newest first.
    public let maxSavedPeers: Int
    /// Peers not verified for this long are forgotten (7 days).
    public let forgetAfter: Duration

    private let timer = NIOLockedValueBox<RepeatedTask?>(nil)

    public init(database: SQLiteDatabase, storage: SQLiteStorage? = nil, saveInterval: Duration = .seconds(30),
                maxSavedPeers: Int = 1_000, forgetAfter: Duration = .seconds(7 * 86_400)) {
        self.database = database
        self.storage = storage
        self.saveInterval = saveInterval
        self.maxSavedPeers = max(1, maxSavedPeers)
        self.forgetAfter = forgetAfter
    }

    public func install(into registry: PluginRegistry) throws {}

    public func start(node: Node) async throws {
        let interval = TimeAmount(saveInterval)
        let task = node.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in
            let peers = node.peerMap.verifiedPeers
            // Off the event loop: a save waits for the disk.
            DispatchQueue.global().async { _ = try? self.save(peers) }
        }
        timer.withLockedValue { old in
            old?.cancel()
            old = task
        }
    }

    public func stop(node: Node) async {
        timer.withLockedValue { t in
            t?.cancel()
            t = nil
        }
        let peers = node.peerMap.verifiedPeers
        let storage = self.storage
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().async {
                _ = try? self.save(peers)
                storage?.close()
                c.resume()
            }
        }
    }

    /// Writes `peers` (those directly reachable) as verified now, forgets the stale and keeps the
    /// newest `maxSavedPeers`. Returns how many the table holds.
    @discardableResult
    public func save(_ peers: [PeerAddress]) throws(SQLiteStorageError) -> Int {
        let now = SQLiteDatabase.wallMillis()
        let horizon = now - Int64(forgetAfter.components.seconds) * 1000
        let keep = maxSavedPeers
        return try database.write { db in
            for p in peers.prefix(keep) where p.isDirectlyReachable {
                try db.cachedStatement(sql: "INSERT OR REPLACE INTO peers (id, ip, udp, tcp, seen) VALUES (?, ?, ?, ?, ?)")
                    .execute(arguments: [p.id.bytes.data, p.ip.description, Int64(p.udpPort), Int64(p.tcpPort), now])
            }
            try db.execute(sql: "DELETE FROM peers WHERE seen < ?", arguments: [horizon])
            try db.execute(sql: "DELETE FROM peers WHERE id NOT IN (SELECT id FROM peers ORDER BY seen DESC LIMIT ?)", arguments: [keep])
            return try Int.fetchOne(db, sql: "SELECT count(*) FROM peers") ?? 0
        }
    }

    /// The saved table, most recently verified first. Rows that are not a peer (a bad id, address
    /// or port) are skipped.
    public func savedPeers() throws(SQLiteStorageError) -> [PeerAddress] {
        let keep = maxSavedPeers
        return try database.read { db in
            try Row.fetchAll(db, sql: "SELECT id, ip, udp, tcp FROM peers ORDER BY seen DESC LIMIT ?", arguments: [keep]).compactMap { row in
                guard let idBytes = row.blob(0), let id = Number160(bytes: idBytes[...]), let text = row.text(1), let ip = IPAddress(text),
                      let udp = row.int(2).flatMap(UInt16.init(exactly:)), let tcp = row.int(3).flatMap(UInt16.init(exactly:)) else { return nil }
                let socket = PeerSocketAddress(ip: ip, tcpPort: tcp, udpPort: udp)
                guard socket.isValidPeerRecord else { return nil }
                return PeerAddress(id: id, socket: socket)
            }
        }
    }
}

/// Why a rejoin found nobody.
public struct RejoinError: Error, CustomStringConvertible {
    public let tried: Int
    public var description: String { tried == 0 ? "no saved peers to rejoin through" : "none of \(tried) saved peers answered" }
}

extension Node {
    /// Joins the overlay through peers saved by an earlier run: pings up to `concurrency` of
    /// them at once (newest first) and, as soon as one answers with its saved id, looks up this node's id and
    /// refreshes its far buckets, as a bootstrap does. Throws when none answers. At most `limit`
    /// are tried, so a table of dead peers costs a few request timeouts (128 at 32 at once: 4),
    /// not minutes, before the caller falls back to its bootstrap addresses.
    @discardableResult
    public func rejoin(from saved: [PeerAddress], concurrency: Int = 32, limit: Int = 128) async throws -> BootstrapResult {
        let candidates = Array(saved.filter { $0.id != peerID }.prefix(max(1, limit)))
        guard !candidates.isEmpty else { throw RejoinError(tried: 0) }
        // The first answer wins; pings still out finish on their own (a dead peer's takes its
        // timeout), without holding the join.
        let promise = eventLoop.makePromise(of: PeerAddress?.self)
        let cursor = NIOLockedValueBox((next: 0, inFlight: 0, done: false))
        @Sendable func launch() {
            let index = cursor.withLockedValue { c -> Int? in
                guard !c.done, c.next < candidates.count else { return nil }
                c.next += 1
                c.inFlight += 1
                return c.next - 1
            }
            guard let index else { return }
            Task {
                // Only the saved peer itself is a way back in: an address now held by someone else
                // (this node itself, or a stranger that took the port) is not the overlay we left.
                let answer = (try? await self.ping(candidates[index].socket)).flatMap { $0.id == candidates[index].id ? $0 : nil }
                let finish = cursor.withLockedValue { c -> Bool? in
                    c.inFlight -= 1
                    guard !c.done else { return nil }
                    if answer != nil || (c.next >= candidates.count && c.inFlight == 0) {
                        c.done = true
                        return true
                    }
                    return false
                }
                if finish == true { promise.succeed(answer) } else if finish == false { launch() }
            }
        }
        for _ in 0..<min(max(1, concurrency), candidates.count) { launch() }
        let first = try await promise.futureResult.get()
        guard let seed = first else { throw RejoinError(tried: candidates.count) }
        // The answering peer is in the map now; the lookup fills the rest.
        let lookup = try await closestPeers(to: peerID)
        let refreshed = try await refreshBuckets()
        return BootstrapResult(seed: seed, lookup: lookup, refreshLookups: refreshed, verifiedPeers: peerMap.counts.verified)
    }
}
