import Foundation
import Testing
@testable import P2PKernel

/// The NAT matrix against real NATs: `p2p` processes in network namespaces behind nftables
/// masquerade routers, with miniupnpd as the gateway where a case needs one (see `NATLab`).
@Suite("NAT lab", .serialized)
struct NATLabTests {
    static let trials = 10

    /// Three public peers in `pub`, each joined to the first and reachable.
    final class World: @unchecked Sendable {
        let lab: NATLab
        var peers: [NodeProcess] = []
        var seed: String { "\(NATLab.publicPeers[0]):4000" }

        init() throws {
            lab = try NATLab()
            do {
                for (i, ip) in NATLab.publicPeers.enumerated() {
                    let args = ["--port", "4000"] + (i == 0 ? [] : ["--bootstrap", "\(NATLab.publicPeers[0]):4000"])
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
        }
    }

    /// A `p2p node` behind `rtr`, joined through the seed; returns it with its id once it logs
    /// how it is reachable.
    static func natedNode(_ world: World, port: UInt16 = 4000, expect: String) throws -> (NodeProcess, String, Double) {
        let started = Date()
        let node = try NodeProcess(["--port", "\(port)", "--bootstrap", world.seed], host: "0.0.0.0", launcher: world.lab.launcher(world.lab.lan))
        let ok = node.waitFor(expect, seconds: 30)
        let seconds = Date().timeIntervalSince(started)
        guard ok, let r = node.output.range(of: #"node (0x[0-9a-f]{40})"#, options: .regularExpression) else {
            node.stop()
            throw NetLab.LabError(description: "expected '\(expect)': \(node.output)")
        }
        return (node, String(node.output[r].dropFirst(5)), seconds)
    }

    static func summary(_ label: String, _ ms: [Double]) -> String {
        let s = ms.sorted()
        guard !s.isEmpty else { return "\(label): no samples" }
        return String(format: "%@: %d trials, ladder p50 %.1f ms, p95 %.1f ms", label as NSString, s.count, s[s.count / 2], s[min(s.count - 1, s.count * 95 / 100)])
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
        let (node, _, _) = try NATLabTests.natedNode(world, expect: "reachable via")
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
    }
}
