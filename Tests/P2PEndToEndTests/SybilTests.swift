import Foundation
import NIOCore
@testable import P2PDHT
import Testing
@testable import P2PKernel

/// A Sybil: one operator with one /24 and thousands of identities, against a victim and four
/// honest peers on other subnets — real addresses, in network namespaces.
@Suite("Sybil", .serialized)
struct SybilTests {
    /// What every Sybil answers: its own ids closest to any key asked, acceptance of every put,
    /// and a forged value for every get (in the lookup and after it).
    static func handler(_ all: [PeerAddress]) -> HostilePeer.Handler {
        let neighbors = CommandID.derive(from: KernelCommands.neighbors), storage = CommandID.derive(from: "dht.storage")
        let forged = StoredValue(Array("forged".utf8))
        return { request, _ in
            func fake(_ r: StorageRequest) -> [Payload] {
                switch r {
                case .put(let entries, _): return StorageCodec.encode(.statuses(entries.mapValues { _ in .ok }))
                case .get(.keys(let keys)): return StorageCodec.encode(.values(Dictionary(uniqueKeysWithValues: keys.map { ($0, forged) })))
                default: return []
                }
            }
            switch request.command {
            case neighbors:
                let key = request.firstKeys?.first ?? .zero
                var payload: [Payload] = [.peers(Array(all.sorted { ($0.id ^ key) < ($1.id ^ key) }.prefix(20)))]
                if request.payload.count > 1, case .integer(let q) = request.payload[1],
                   let r = try? StorageCodec.decodeRequest(Array(request.payload.dropFirst(2))) {
                    payload += [.integer(q)] + fake(r)
                }
                return payload
            case storage:
                return (try? StorageCodec.decodeRequest(request.payload)).map(fake) ?? []
            default:
                return []
            }
        }
    }

    @Test("a Sybil answering as 2,000 ids from one /24 holds at most 8 places in a peer map, 3 in a lookup, and one replica of a key")
    func sybil() async throws {
        let lab = try NetLab()
        defer { lab.close() }
        let v = try lab.addHost("v", addresses: ["10.77.1.1"])
        let a = try lab.addHost("a", addresses: (1...8).map { "10.77.2.\($0)" })
        var honest: [String] = []
        for i in 1...4 { honest.append(try lab.addHost("h\(i)", addresses: ["10.77.\(10 + i).1"])) }
        let victim = try Victim(host: "10.77.1.1", port: 4000, launcher: lab.launcher(v))
        defer { victim.stop() }
        var nodes: [NodeProcess] = []
        defer { for n in nodes { n.stop() } }
        for (i, ns) in honest.enumerated() {
            let n = try NodeProcess(["--port", "4000", "--bootstrap", "10.77.1.1:4000"], host: "10.77.\(11 + i).1", launcher: lab.launcher(ns))
            nodes.append(n)
            #expect(n.waitFor("bootstrapped via", seconds: 30), "\(n.output)")
        }

        // Eight sockets on eight addresses of one /24, 250 identities each.
        var sybils: [HostilePeer] = []
        defer { for s in sybils { Task { await s.close() } } }
        for k in 1...8 {
            let fd = try NetLab.udpSocket(in: a, address: "10.77.2.\(k)", port: 4000)
            let s = try await HostilePeer(boundSocket: NIOBSDSocket.Handle(fd))
            for _ in 0..<249 { s.addIdentity(PeerKeyPair()) }
            sybils.append(s)
        }
        let all = sybils.flatMap { s in s.allIdentities.map { PeerAddress(id: $0, socket: s.address) } }
        #expect(all.count == 2_000)
        for s in sybils { s.serve(SybilTests.handler(all)) }

        // Every id opens a session with the victim and pings it, for ten seconds.
        let target = victim.address
        let peers = sybils
        let usage = try await victim.underAttack {
            let end = ContinuousClock.now + .seconds(10)
            await withTaskGroup(of: Void.self) { group in
                for s in peers {
                    group.addTask {
                        for who in s.allIdentities where ContinuousClock.now < end {
                            guard (try? await s.handshake(with: target, as: who, within: .milliseconds(400))) != nil else { continue }
                            _ = try? await s.send(s.message(command: KernelCommands.ping, as: who), to: target, as: who, awaitReply: true, within: .seconds(2))
                        }
                    }
                }
            }
        }
        print("hostile sybil: \(usage)")
        #expect(victim.isAlive)
        #expect(usage.peakRSS - usage.baseRSS < HostileTests.rssBound, "\(usage)")
        #expect(usage.cores < 1.3, "\(usage)")

        // The victim's map, as its neighbor lists show it: at most 8 of the Sybil's ids.
        let asker = sybils[0]
        var seen = Set<Number160>()
        for key in all.prefix(40).map(\.id) + (0..<40).map({ _ in Number160.random() }) {
            let reply = try await asker.send(asker.message(command: KernelCommands.neighbors, payload: [.keys([key])]), to: target, awaitReply: true, within: .seconds(5))
            for p in reply?.firstPeers ?? [] where p.ip.sybilGroup == IPAddress("10.77.2.1")?.sybilGroup { seen.insert(p.id) }
        }
        #expect(seen.count <= PeerMapConfig().maxPeersPerIPGroup, "the victim lists \(seen.count) Sybil ids")

        // An honest peer's lookup holds at most 3 of them; its put lands on at most one, and a
        // get from another honest peer returns the honest value, not the forged one.
        let seed = "10.77.1.1:4000"
        let lookup = try P2PTool.run(launcher: lab.launcher(honest[0]), ["lookup", "--bootstrap", seed, "eclipse me"], timeout: 60)
        #expect(lookup.code == 0, "\(lookup.err)")
        let inLookup = lookup.out.split(separator: "\n").filter { $0.contains("10.77.2.") }.count
        #expect(inLookup <= RoutingConfig().maxPerIPGroup, "\(lookup.out)")
        let put = try P2PTool.run(launcher: lab.launcher(honest[0]), ["put", "--bootstrap", seed, "the key", "honest"], timeout: 60)
        #expect(put.code == 0, "\(put.out) \(put.err)")
        #expect(put.out.split(separator: "\n").filter { $0.contains("10.77.2.") }.count <= 1, "\(put.out)")
        let get = try P2PTool.run(launcher: lab.launcher(honest[1]), ["get", "--bootstrap", "10.77.11.1:4000", "the key"], timeout: 60)
        #expect(get.code == 0 && get.out.trimmingCharacters(in: .whitespacesAndNewlines) == "honest", "\(get.out) \(get.err)")
        try victim.legitimateClientsWork(launcher: lab.launcher(honest[2]))
    }
}
