import Foundation
import Testing
import NIOConcurrencyHelpers
@testable import P2PKernel

/// The NAT matrix against real NATs: `p2p` processes in network namespaces behind nftables
/// masquerade routers, with miniupnpd as the gateway where a case needs one (see `NATLab`).
@Suite("NAT lab", .serialized)
struct NATLabTests {
    /// Trials per case: 3 in the suite (each case's behaviour, with a spread of timings), 10
    /// when docs/NAT.md's timing figures are measured (`P2P_NAT_TRIALS=10 scripts/test --filter NATLab`).
    static let trials = Int(ProcessInfo.processInfo.environment["P2P_NAT_TRIALS"] ?? "") ?? 3

    /// Three public peers in `pub`, each joined to the first and reachable.
    final class World: @unchecked Sendable {
        let lab: NATLab
        var peers: [NodeProcess] = []
        var seed: String { "\(NATLab.publicPeers[0]):4000" }

        /// `extra` more public peers listen on ports 4001… of the same addresses.
        init(extra: Int = 0) throws {
            lab = try NATLab()
            do {
                let places = NATLab.publicPeers.map { ($0, 4000) } + (0..<extra).map { (NATLab.publicPeers[$0 % NATLab.publicPeers.count], 4001 + $0) }
                for (i, (ip, port)) in places.enumerated() {
                    let args = ["--port", "\(port)"] + (i == 0 ? [] : ["--bootstrap", "\(NATLab.publicPeers[0]):4000"])
                    let p = try NodeProcess(args, host: ip, launcher: lab.launcher(lab.pub))
                    peers.append(p)
                    guard p.waitFor("listening on", seconds: 30) else { throw NetLab.LabError(description: "public peer \(ip): \(p.output)") }
                }
                for p in peers.dropFirst() {
                    guard p.waitFor("reachable via direct", seconds: 30) else { throw NetLab.LabError(description: "public peer: \(p.output)") }
                }
            } catch {
                close()
                throw error
            }
        }

        /// Starts the public peer `i` again at its address (a new process, a new id) once it exited.
        func restart(_ i: Int) throws {
            let old = peers[i]
            guard let r = old.output.range(of: #"listening on [0-9.]+:\d+"#, options: .regularExpression) else { return }
            let place = old.output[r].dropFirst("listening on ".count).split(separator: ":")
            let p = try NodeProcess(["--port", String(place[1]), "--bootstrap", seed], host: String(place[0]), launcher: lab.launcher(lab.pub))
            peers[i] = p
            guard p.waitFor("reachable via direct", seconds: 30) else { throw NetLab.LabError(description: "restarted public peer: \(p.output)") }
        }

        func close() {
            for p in peers { p.stop() }
            lab.close()
        }

        /// `p2p nat-check --json` in `ns`, decoded.
        func natCheck(in ns: String, port: UInt16, extra: [String] = []) throws -> [String: Any] {
            let r = try P2PTool.run(launcher: lab.launcher(ns), ["nat-check", "--bootstrap", seed, "--port", "\(port)", "--json"] + extra, timeout: 60)
            guard r.code == 0, let data = r.out.split(separator: "\n").last.map({ Data($0.utf8) }),
                  let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                throw NetLab.LabError(description: "nat-check exit \(r.code): \(r.out) \(r.err)")
            }
            return object
        }

        /// Puts from `ns` and reads on a public peer, puts on a public peer and reads from `ns`,
        /// and sends to `id` (the peer in `ns`) from the public side: its own answer must come back.
        func exercise(from ns: String, id: String, tag: String) throws {
            let key = "nat-\(tag)-\(UInt32.random(in: 0...UInt32.max))"
            let inside = lab.launcher(ns), outside = lab.launcher(lab.pub)
            let put = try P2PTool.run(launcher: inside, ["put", "--bootstrap", seed, key, "from-inside"])
            #expect(put.code == 0, "put from \(ns): \(put.out) \(put.err)")
            let get = try P2PTool.run(launcher: outside, ["get", "--bootstrap", seed, key])
            #expect(get.out.contains("from-inside"), "public get: \(get.out) \(get.err)")
            let put2 = try P2PTool.run(launcher: outside, ["put", "--bootstrap", seed, key + "-out", "from-outside"])
            #expect(put2.code == 0, "public put: \(put2.out) \(put2.err)")
            let get2 = try P2PTool.run(launcher: inside, ["get", "--bootstrap", seed, key + "-out"])
            #expect(get2.out.contains("from-outside"), "get from \(ns): \(get2.out) \(get2.err)")
            let send = try P2PTool.run(launcher: outside, ["send", "--bootstrap", seed, "--replicas", "1", id, "hello"])
            #expect(send.out.contains("\(id) got: hello"), "send to \(id): \(send.out) \(send.err)")
            if !send.out.contains("\(id) got: hello") {
                let l = try P2PTool.run(launcher: outside, ["lookup", "--bootstrap", seed, id])
                print("send to \(id) missed it; a lookup of its id from outside found: \(l.out) \(l.err)")
            }
        }
    }

    /// A `p2p node` behind `rtr`, joined through the seed; returns it with its id once it logs
    /// how it is reachable.
    static func natedNode(_ world: World, port: UInt16 = 4000, expect: String, in ns: String? = nil) throws -> (NodeProcess, String, Double) {
        let started = Date()
        let node = try NodeProcess(["--port", "\(port)", "--bootstrap", world.seed], host: "0.0.0.0", launcher: world.lab.launcher(ns ?? world.lab.lan))
        let ok = node.waitFor(expect, seconds: 30)
        let seconds = Date().timeIntervalSince(started)
        guard ok, let r = node.output.range(of: #"node (0x[0-9a-f]{40})"#, options: .regularExpression) else {
            node.stop()
            throw NetLab.LabError(description: "expected '\(expect)': \(node.output)")
        }
        return (node, String(node.output[r].dropFirst(5)), seconds)
    }

    static func summary(_ label: String, _ ms: [Double], of what: String = "ladder") -> String {
        let s = ms.sorted()
        guard !s.isEmpty else { return "\(label): no samples" }
        return String(format: "%@: %d trials, %@ p50 %.1f ms, p95 %.1f ms", label as NSString, s.count, what as NSString,
                      s[s.count / 2], s[min(s.count - 1, s.count * 95 / 100)])
    }

    @Test("case 1: a public peer is reachable directly, confirmed by a probe-back")
    func publicPeer() throws {
        let world = try World()
        defer { world.close() }
        var times: [Double] = []
        for i in 0..<NATLabTests.trials {
            let r = try world.natCheck(in: world.lab.pub, port: UInt16(5000 + i))
            #expect(r["reachable"] as? Bool == true, "\(r)")
            #expect(r["method"] as? String == "direct", "\(r)")
            #expect(r["nat_type"] as? String == "none", "\(r)")
            times.append(r["elapsed_ms"] as? Double ?? -1)
        }
        print(NATLabTests.summary("case 1 public", times))
        let (node, id, _) = try NATLabTests.natedNode(world, port: 4100, expect: "reachable via direct", in: world.lab.pub)
        defer { node.stop() }
        try world.exercise(from: world.lab.pub, id: id, tag: "public")
    }

    @Test("case 2: behind a UPnP gateway: mapped, verified by a probe-back, deleted at exit; put, get and send work both ways")
    func upnp() throws {
        let world = try World()
        defer { world.close() }
        try world.lab.startGateway(upnp: true, natpmp: false)
        var times: [Double] = []
        for i in 0..<NATLabTests.trials {
            let port = UInt16(6000 + i)
            let r = try world.natCheck(in: world.lab.lan, port: port)
            #expect(r["reachable"] as? Bool == true, "\(r)")
            #expect(r["method"] as? String == "upnp", "\(r)")
            #expect(r["external"] as? String == "203.0.113.1:\(port)", "\(r)")
            #expect(r["nat_type"] as? String == "port-preserving", "\(r)")
            times.append(r["elapsed_ms"] as? Double ?? -1)
            #expect(world.lab.gatewayRules(port: port).isEmpty, "mapping of \(port) still on the gateway after exit")
        }
        print(NATLabTests.summary("case 2 upnp", times))
        let (node, id, seconds) = try NATLabTests.natedNode(world, expect: "reachable via upnp as 203.0.113.1:4000")
        print(String(format: "case 2: p2p node reachable %.2f s after start", seconds))
        #expect(world.lab.gatewayRules(port: 4000) == ["udp", "tcp"])
        try world.exercise(from: world.lab.lan, id: id, tag: "upnp")
        node.stop()
        #expect(world.lab.gatewayRules(port: 4000).isEmpty, "mapping left after the node stopped")
    }

    @Test("case 3: NAT-PMP/PCP only: mapped by PCP, verified; put, get and send work both ways")
    func pcp() throws {
        let world = try World()
        defer { world.close() }
        try world.lab.startGateway(upnp: false, natpmp: true)
        var times: [Double] = []
        for i in 0..<NATLabTests.trials {
            let port = UInt16(7000 + i)
            let r = try world.natCheck(in: world.lab.lan, port: port)
            #expect(r["reachable"] as? Bool == true, "\(r)")
            #expect(r["method"] as? String == "pcp", "\(r)")
            #expect(r["external"] as? String == "203.0.113.1:\(port)", "\(r)")
            times.append(r["elapsed_ms"] as? Double ?? -1)
            #expect(world.lab.gatewayRules(port: port).isEmpty, "mapping of \(port) still on the gateway after exit")
        }
        print(NATLabTests.summary("case 3 pcp", times))
        let (node, id, _) = try NATLabTests.natedNode(world, expect: "reachable via pcp as 203.0.113.1:4000")
        try world.exercise(from: world.lab.lan, id: id, tag: "pcp")
        node.stop()
        #expect(world.lab.gatewayRules(port: 4000).isEmpty, "mapping left after the node stopped")
    }

    @Test("case 9: the gateway restarts with its chains flushed: the mapping comes back (goal: < 5 s)")
    func gatewayRestart() throws {
        let world = try World()
        defer { world.close() }
        var gateway = try world.lab.startGateway()
        let (node, id, _) = try NATLabTests.natedNode(world, expect: "reachable via")
        defer { node.stop() }
        var restored: [Double] = []
        for _ in 0..<NATLabTests.trials {
            #expect(world.lab.gatewayRules(port: 4000) == ["udp", "tcp"])
            world.lab.stop(gateway)
            gateway = try world.lab.startGateway()
            let back = Date()
            #expect(world.lab.gatewayRules(port: 4000).isEmpty, "the restarted gateway kept the mapping")
            let deadline = Date().addingTimeInterval(30)
            while Date() < deadline, world.lab.gatewayRules(port: 4000) != ["udp", "tcp"] { Thread.sleep(forTimeInterval: 0.05) }
            let took = Date().timeIntervalSince(back)
            // The goal is < 5 s (docs/NAT.md reports what was measured); a busy machine may be
            // slower, so the test asserts only that the mapping came back.
            #expect(world.lab.gatewayRules(port: 4000) == ["udp", "tcp"], "mapping not restored after \(took) s")
            restored.append(took * 1000)
        }
        print(NATLabTests.summary("case 9 gateway restart (time to restore)", restored))
        try world.exercise(from: world.lab.lan, id: id, tag: "restored")
    }

    @Test("case 4: no mapping, the other side public: relayed, then direct by a reverse connection; put, get and send work both ways")
    func relayed() throws {
        // Six public peers: five become relays, the sixth reaches the node through them and gets
        // the reverse connection.
        let world = try World(extra: 3)
        defer { world.close() }
        var times: [Double] = []
        for i in 0..<NATLabTests.trials {
            let r = try world.natCheck(in: world.lab.lan, port: UInt16(8000 + i))
            #expect(r["reachable"] as? Bool == true, "\(r)")
            #expect(r["method"] as? String == "relay", "\(r)")
            #expect((r["relays"] as? [Any])?.count == 5, "\(r)")
            #expect(r["hole_punching"] as? String == "udp+tcp", "\(r)")
            times.append(r["elapsed_ms"] as? Double ?? -1)
        }
        print(NATLabTests.summary("case 4 relay", times))
        let (node, id, seconds) = try NATLabTests.natedNode(world, expect: "relayed via 5 relays")
        defer { node.stop() }
        print(String(format: "case 4: p2p node relayed %.2f s after start", seconds))
        try world.exercise(from: world.lab.lan, id: id, tag: "relay")
        // The public peer that is not a relay checks it through its relays (its peer map's
        // maintenance, within 10 s): the node connects back to it.
        #expect(node.waitFor("(reverse connection)", seconds: 30), "no reverse connection: \(node.output)")
        let send = try P2PTool.run(launcher: world.lab.launcher(world.lab.pub), ["send", "--bootstrap", world.seed, "--replicas", "1", id, "again"])
        #expect(send.out.contains("\(id) got: again"), "send after the reverse connection: \(send.out) \(send.err)")
    }

    @Test("case 4, found at once: a send from a public client to a freshly relayed peer's id is answered by that peer, not by a neighbour — P2P_NAT_TRIALS times, each a new node")
    func relayedFoundAtOnce() throws {
        let world = try World(extra: 3)
        defer { world.close() }
        var ms: [Double] = []
        for i in 0..<NATLabTests.trials {
            let (node, id, _) = try NATLabTests.natedNode(world, port: UInt16(4200 + i), expect: "relayed via")
            defer { node.stop() }
            // The moment the node logged "relayed via": the send starts then.
            let began = Date()
            let send = try P2PTool.run(launcher: world.lab.launcher(world.lab.pub), ["send", "--bootstrap", world.seed, "--replicas", "1", id, "hello \(i)"])
            ms.append(Date().timeIntervalSince(began) * 1000)
            #expect(send.code == 0 && send.out.contains("\(id) got: hello \(i)"), "trial \(i): answered by \(send.out) \(send.err)")
        }
        print(NATLabTests.summary("case 4 send after relayed", ms, of: "'relayed via' to the answer"))
    }

    /// The milliseconds in a node's line `direct path to ID over TRANSPORT by METHOD (ADDRESS…, N ms)`.
    static func pathMilliseconds(_ output: String, _ prefix: String) -> Double? {
        guard let start = output.range(of: prefix) else { return nil }
        let line = output[start.upperBound...].prefix { $0 != "\n" }
        guard let r = line.range(of: #", (\d+) ms\)"#, options: .regularExpression) else { return nil }
        return Double(line[r].dropFirst(2).prefix { $0.isNumber })
    }

    /// Two nodes behind NATs, `b` started anew for each trial (a new id, a new port): each trial
    /// waits for both sides to log the paths in `transports` by `method` (logged only once a ping
    /// in their session came back over the path), and for none in `absent`.
    static func punchTrials(_ world: World, method: String, transports: [String], absent: [String] = [], label: String) throws {
        let (a, idA, _) = try NATLabTests.natedNode(world, expect: "relayed via 3 relays")
        defer { a.stop() }
        var times: [String: [Double]] = [:]
        var direct: [Double] = []
        for i in 0..<NATLabTests.trials {
            let began = Date()
            let (b, idB, relayedAfter) = try NATLabTests.natedNode(world, port: UInt16(4100 + i), expect: "relayed via 3 relays", in: world.lab.lan2)
            defer {
                b.stop()
                print(String(format: "\(label) trial \(i): relayed %.1f s after start, %.1f s in all", relayedAfter, Date().timeIntervalSince(began)))
            }
            for t in transports {
                let fromB = "direct path to \(idA) over \(t) by \(method)", fromA = "direct path to \(idB) over \(t) by \(method)"
                #expect(b.waitFor(fromB, seconds: 20), "trial \(i), \(t): \(b.output.suffix(3000))")
                #expect(a.waitFor(fromA, seconds: 10), "trial \(i), \(t): \(a.output.suffix(3000))")
                if let ms = NATLabTests.pathMilliseconds(b.output, fromB) { times[t, default: []].append(ms) }
            }
            direct.append(Date().timeIntervalSince(began) * 1000)
            for t in absent {
                #expect(!b.output.contains("direct path to \(idA) over \(t)"), "trial \(i): a \(t) path: \(b.output.suffix(2000))")
            }
            if i == 0 {
                try world.exercise(from: world.lab.lan2, id: idB, tag: "\(label)-b")
                // From behind one NAT to the node behind the other.
                let send = try P2PTool.run(launcher: world.lab.launcher(world.lab.lan), ["send", "--bootstrap", world.seed, "--replicas", "1", idB, "across"])
                #expect(send.out.contains("\(idB) got: across"), "send across two NATs: \(send.out) \(send.err)")
            }
        }
        try world.exercise(from: world.lab.lan, id: idA, tag: "\(label)-a")
        for t in transports {
            print(NATLabTests.summary("\(label) \(t)", times[t] ?? [], of: "CONNECT to a proven path"))
        }
        print(NATLabTests.summary("\(label)", direct, of: "node start to every direct path"))
    }

    @Test("case 5: two port-preserving NATs: direct over UDP and over TCP by hole punching; put, get and send work")
    func twoPortPreserving() throws {
        let world = try World()
        defer { world.close() }
        try NATLabTests.punchTrials(world, method: "hole punching", transports: ["udp", "tcp"], label: "case 5")
    }

    @Test("case 6: one symmetric NAT and one port-preserving: direct over UDP by birthday probing, TCP stays relayed")
    func oneSymmetric() throws {
        let world = try World()
        defer { world.close() }
        try world.lab.configure(router: world.lab.rtr2, .init(masquerade: "random,fully-random"))
        try NATLabTests.punchTrials(world, method: "birthday probing", transports: ["udp"], absent: ["tcp"], label: "case 6")
    }

    @Test("case 7: both sides behind symmetric NATs: relayed, no punching; put, get and send work between them and with the public side")
    func bothSymmetric() throws {
        let world = try World()
        defer { world.close() }
        try world.lab.configure(router: world.lab.rtr, .init(masquerade: "random,fully-random"))
        try world.lab.configure(router: world.lab.rtr2, .init(masquerade: "random,fully-random"))
        var times: [Double] = []
        for i in 0..<NATLabTests.trials {
            let r = try world.natCheck(in: i % 2 == 0 ? world.lab.lan : world.lab.lan2, port: UInt16(8100 + i))
            #expect(r["reachable"] as? Bool == true, "\(r)")
            #expect(r["method"] as? String == "relay", "\(r)")
            #expect(r["nat_type"] as? String == "symmetric", "\(r)")
            #expect(r["hole_punching"] as? String == "udp by birthday probing", "\(r)")
            let steps = (r["steps"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
            #expect(!steps.contains { $0.contains("punch") }, "punching tried between symmetric NATs: \(steps)")
            times.append(r["elapsed_ms"] as? Double ?? -1)
        }
        print(NATLabTests.summary("case 7 both symmetric", times))
        let (a, idA, _) = try NATLabTests.natedNode(world, expect: "relayed via 3 relays")
        defer { a.stop() }
        let (b, idB, _) = try NATLabTests.natedNode(world, expect: "relayed via 3 relays", in: world.lab.lan2)
        defer { b.stop() }
        try world.exercise(from: world.lab.lan, id: idA, tag: "sym-a")
        try world.exercise(from: world.lab.lan2, id: idB, tag: "sym-b")
        // Between the two NATed sides: a client behind one sends to the node behind the other.
        let send = try P2PTool.run(launcher: world.lab.launcher(world.lab.lan2), ["send", "--bootstrap", world.seed, "--replicas", "1", idA, "across"])
        #expect(send.out.contains("\(idA) got: across"), "send across two NATs: \(send.out) \(send.err)")
        #expect(!a.output.contains("hole punching to") && !a.output.contains("direct path to \(idB)"), "punching tried: \(a.output)")
        #expect(!b.output.contains("hole punching to") && !b.output.contains("direct path to \(idA)"), "punching tried: \(b.output)")
    }

    @Test("case 8: a relay process is killed: a new relay is set up (goal: < 5 s) and no request is lost")
    func relayKilled() throws {
        let kills = NATLabTests.trials
        // Six public peers: five relays and a spare; each killed relay's process is started
        // again afterwards (a new id at the same address) and becomes the next spare.
        let world = try World(extra: 3)
        defer { world.close() }
        let (node, id, _) = try NATLabTests.natedNode(world, expect: "relayed via 5 relays")
        defer { node.stop() }
        var replaced: [Double] = []
        var lost = 0, sent = 0
        let outside = world.lab.launcher(world.lab.pub)
        for trial in 0..<kills {
            // The relays the node announced last; kill one that is not the seed.
            let line = node.output.split(separator: "\n").last { $0.contains("relayed via") }.map(String.init) ?? ""
            let relays = line.components(separatedBy: ": ").last?.components(separatedBy: ", ") ?? []
            guard let victimIndex = world.peers.indices.dropFirst().first(where: { i in
                let p = world.peers[i]
                return p.process.isRunning && relays.contains { p.output.contains("listening on \($0) ") }
            }) else {
                Issue.record("no relay to kill in \(line)")
                break
            }
            let victim = world.peers[victimIndex]
            let mark = node.output.count
            let killed = Date()
            victim.kill9()
            // Requests keep coming while the relay is gone (on another thread): each must be answered.
            let sends = DispatchGroup()
            let failures = NIOLockedValueBox(0)
            sends.enter()
            Thread.detachNewThread {
                defer { sends.leave() }
                for k in 0..<3 {
                    let r = try? P2PTool.run(launcher: outside, ["send", "--bootstrap", world.seed, "--replicas", "1", id, "t\(trial)-\(k)"])
                    if r?.out.contains("\(id) got: t\(trial)-\(k)") != true {
                        failures.withLockedValue { $0 += 1 }
                        print("case 8: lost: \(r?.out ?? "") \(r?.err ?? "")")
                    }
                }
            }
            let deadline = Date().addingTimeInterval(30)
            var back = false
            while Date() < deadline, !back {
                back = node.output.dropFirst(mark).contains("relayed via 5 relays")
                if !back { Thread.sleep(forTimeInterval: 0.01) }
            }
            replaced.append(Date().timeIntervalSince(killed) * 1000)
            #expect(back, "no new relay after a relay was killed: \(node.output.suffix(2000))")
            sends.wait()
            sent += 3
            lost += failures.withLockedValue { $0 }
            try world.restart(victimIndex)
        }
        #expect(lost == 0, "\(lost) of \(sent) requests lost while a relay was down")
        try world.exercise(from: world.lab.lan, id: id, tag: "relays-replaced")
        print(NATLabTests.summary("case 8 relay killed (time to a new relay, measured after the sends)", replaced))
    }
}
