import Foundation
import P2PKernel
import Testing

/// `p2p node` processes on loopback that can lose peers (SIGKILL: no quit, the ids stay in every
/// survivor's map) and take in new ones, so that one cluster serves many repetitions.
final class NodeCluster {
    struct Member {
        let id: Number160
        let port: String
        let process: NodeProcess
    }
    private(set) var members: [Member] = []

    init(size: Int) throws {
        let first = try Self.start(via: nil)
        members.append(first)
        try grow(by: size - 1)
    }

    /// Starts `count` nodes at once, each joining through a living member.
    func grow(by count: Int) throws {
        guard count > 0 else { return }
        let seeds = (0..<count).map { members[$0 % members.count].port }
        var started: [NodeProcess] = []
        for seed in seeds { started.append(try NodeProcess(["--port", "0", "--bootstrap", "127.0.0.1:\(seed)"])) }
        // A node is in the overlay once it knows it is reachable: until then it calls itself
        // firewalled, and peers keep it out of their maps.
        for p in started {
            guard p.waitFor("reachable via", seconds: 30), let m = Self.member(p) else {
                started.forEach { $0.stop() }
                throw CLIError("a node did not join: \(p.output)")
            }
            members.append(m)
        }
    }

    private static func start(via seed: String?) throws -> Member {
        let p = try NodeProcess(["--port", "0"] + (seed.map { ["--bootstrap", "127.0.0.1:\($0)"] } ?? []))
        guard p.waitFor(seed == nil ? "listening on" : "bootstrapped via", seconds: 30), let m = member(p) else {
            p.stop()
            throw CLIError("a node did not start: \(p.output)")
        }
        return m
    }

    /// The id and port from "node 0x… listening on HOST:PORT".
    private static func member(_ p: NodeProcess) -> Member? {
        let text = p.output
        guard let r = text.range(of: #"node 0x[0-9a-f]+ listening on [0-9.]+:\d+"#, options: .regularExpression) else { return nil }
        let words = text[r].split(separator: " ")
        guard words.count == 5, let id = try? Number160(hex: String(words[1])),
              let port = words[4].split(separator: ":").last else { return nil }
        return Member(id: id, port: String(port), process: p)
    }

    /// The living members closest to a key (as the CLI hashes it), closest first.
    func closest(to key: String, count: Int) -> [Member] {
        let location = Number160(hashing: key)
        return Array(members.sorted { location.isCloser($0.id, than: $1.id) }.prefix(count))
    }

    /// Kills members with SIGKILL and forgets them.
    func kill(_ victims: [Member]) {
        let ids = Set(victims.map(\.id))
        for m in members where ids.contains(m.id) { m.process.kill9() }
        members.removeAll { ids.contains($0.id) }
    }

    /// `--bootstrap` through one member.
    func via(_ m: Member) -> [String] { ["--bootstrap", "127.0.0.1:\(m.port)"] }

    func stop() {
        for m in members { m.process.stop() }
        members = []
    }
}

/// The three stories of stale reads and resurrections, told with real `p2p node` processes and
/// the CLI, many times each: the reader sees the newest value, or nothing after a remove — never
/// an older one. Each repetition uses a fresh key on a cluster of 12 that has lost the peers
/// killed before it (their ids still in the survivors' maps) and taken in as many new ones. The
/// three stories run side by side, each on a cluster of its own (most of their time is spent
/// waiting for processes).
///
/// Ten repetitions each in the default run; `P2P_STORIES=N` tells each story N times (20 as
/// issue 22 asks).
///
/// Found by it: peers that joined together through one seed met only the seed (none was in
/// its map yet) and stayed apart until the periodic refresh — a survivor asked for a key knew
/// nobody but a dead peer; and a peer whose ladder asked peers that had just died took the
/// silence for unreachability and went relayed, out of every map.
@Suite("Stories: updates and removes survive deaths", .serialized)
struct StoryTests {
    static let repetitions = ProcessInfo.processInfo.environment["P2P_STORIES"].flatMap { Int($0) }.map { max(1, min($0, 100)) } ?? 10

    @Test("overwrite through another node, then kill the 5 closest to the key: a survivor reads the newest value; an entry protected by its owner, written twice and removed by the owner: nothing; put, remove, kill the 3 closest: nothing — 10 times each (P2P_STORIES=N: N), side by side")
    func stories() throws {
        let alice = temporaryPath("story-alice.key")
        #expect(try P2PTool.run(["keygen", alice]).code == 0)
        let stories: [@Sendable () throws -> [String]] = [Self.overwriteThenKill, { try Self.protectedRemoved(owner: alice) }, Self.removeThenKill]
        let results = NSLock()
        nonisolated(unsafe) var problems: [[String]] = Array(repeating: [], count: stories.count)
        let group = DispatchGroup()
        for (i, story) in stories.enumerated() {
            DispatchQueue.global().async(group: group) {
                let found: [String]
                do { found = try story() } catch { found = ["\(error)"] }
                results.withLock { problems[i] = found }
            }
        }
        group.wait()
        for (name, found) in zip(["overwrite, then kill the 5 closest", "protected entry removed by its owner", "put, remove, kill the 3 closest"], problems) {
            #expect(found.isEmpty, "\(name): \(found)")
        }
    }

    /// A key put as v1 through one node, as v2 through another, then the 5 peers closest to it
    /// killed: a survivor must read v2.
    static func overwriteThenKill() throws -> [String] {
        let cluster = try NodeCluster(size: 12)
        defer { cluster.stop() }
        var problems: [String] = []
        for r in 0..<repetitions {
            let key = "story one \(r)"
            let others = cluster.members.filter { m in !cluster.closest(to: key, count: 5).contains { $0.id == m.id } }
            let (writer, rewriter, reader) = (others[0], others[1], others[2])
            for (via, value) in [(writer, "v1 of \(r)"), (rewriter, "v2 of \(r)")] {
                let put = try P2PTool.run(["put"] + cluster.via(via) + [key, value])
                if put.code != 0 { problems.append("\(r): put \(value): \(put.out) \(put.err)") }
            }
            let order = cluster.closest(to: key, count: 8).map { "\($0.id)".prefix(8) }
            cluster.kill(cluster.closest(to: key, count: 5))
            let got = try P2PTool.run(["get"] + cluster.via(reader) + [key])
            let value = got.out.trimmingCharacters(in: .whitespacesAndNewlines)
            if got.code != 0 || value != "v2 of \(r)" { problems.append("\(r): read exit \(got.code), \(value) \(got.err) order \(order) reader \("\(reader.id)".prefix(8))") }
            try cluster.grow(by: 5)
        }
        return problems
    }

    /// An entry protected and written by its owner (v1, then v2), removed by its owner: a get
    /// must find nothing.
    static func protectedRemoved(owner: String) throws -> [String] {
        let cluster = try NodeCluster(size: 12)
        defer { cluster.stop() }
        var problems: [String] = []
        for r in 0..<repetitions {
            let key = "story two \(r)"
            let m = cluster.members
            for (i, value) in ["v1 of \(r)", "v2 of \(r)"].enumerated() {
                let put = try P2PTool.run(["put"] + cluster.via(m[i]) + ["--key", owner, "--protect", "entry", key, value])
                if put.code != 0 { problems.append("\(r): put \(value): \(put.out) \(put.err)") }
            }
            let removed = try P2PTool.run(["remove"] + cluster.via(m[2]) + ["--key", owner, key])
            if removed.code != 0 { problems.append("\(r): remove: \(removed.out) \(removed.err)") }
            let got = try P2PTool.run(["get"] + cluster.via(m[3]) + [key])
            if got.code != 1 { problems.append("\(r): read exit \(got.code), \(got.out)") }
        }
        return problems
    }

    /// A key put, removed, then the 3 peers closest to it killed: a survivor must read nothing.
    static func removeThenKill() throws -> [String] {
        let cluster = try NodeCluster(size: 12)
        defer { cluster.stop() }
        var problems: [String] = []
        for r in 0..<repetitions {
            let key = "story three \(r)"
            let others = cluster.members.filter { m in !cluster.closest(to: key, count: 3).contains { $0.id == m.id } }
            let put = try P2PTool.run(["put"] + cluster.via(others[0]) + [key, "gone \(r)"])
            if put.code != 0 { problems.append("\(r): put: \(put.out) \(put.err)") }
            let removed = try P2PTool.run(["remove"] + cluster.via(others[1]) + [key])
            if removed.code != 0 { problems.append("\(r): remove: \(removed.out) \(removed.err) put: \(put.out)") }
            cluster.kill(cluster.closest(to: key, count: 3))
            let got = try P2PTool.run(["get"] + cluster.via(others[2]) + [key])
            if got.code != 1 { problems.append("\(r): read exit \(got.code), \(got.out) \(got.err) put: \(put.out) removed: \(removed.out) \(removed.err)") }
            try cluster.grow(by: 3)
        }
        return problems
    }
}
