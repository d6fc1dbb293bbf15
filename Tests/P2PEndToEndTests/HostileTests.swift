import Foundation
import NIOCore
import Testing
@testable import P2PKernel

/// One hostile peer against a real `p2p node` process: for each attack the node stays up, its
/// memory and CPU stay under the bound the test names, and a legitimate peer's ping, lookup, put
/// and get (separate client processes) still work. The attacker has a valid identity of its own
/// (it handshakes like any peer) or sends raw garbage.
@Suite("Hostile peers", .serialized)
struct HostileTests {
    /// Memory an attack may add to the victim.
    static let rssBound = 256 << 20

    @Test("floods of handshakes (from one socket, as hundreds of ids), garbage and discovers are rate-limited")
    func floods() async throws {
        let victim = try Victim()
        defer { victim.stop() }
        let hostile = try await HostilePeer()
        hostile.serve { _, _ in [] }
        for _ in 0..<300 { hostile.addIdentity(PeerKeyPair()) }
        let target = victim.address
        let usage = try await victim.underAttack {
            // One socket sends INITs and random bytes as fast as it can, for 4 s.
            let initiator = InitiatorHandshake(network: 1, index: 1, expected: .zero, random: RandomSource())
            let flood = Flood(to: target, for: 4) { i in i % 2 == 0 ? initiator.initPacket : (0..<64).map { _ in UInt8.random(in: 0...255) } }
            // Meanwhile another tries to open a session as each of its 301 ids at once.
            let opened = await withTaskGroup(of: Bool.self) { group in
                for who in hostile.allIdentities {
                    group.addTask { (try? await hostile.handshake(with: target, as: who, within: .seconds(2))) != nil }
                }
                var n = 0
                for await ok in group where ok { n += 1 }
                return n
            }
            // And over TCP: connections that send frames of garbage are closed at their first frame.
            var garbage: [RawTCP] = []
            for _ in 0..<20 {
                guard let c = RawTCP(port: target.tcpPort) else { continue }
                let junk = (0..<200).map { _ in UInt8.random(in: 0...255) }
                c.write(Array(withUnsafeBytes(of: UInt32(junk.count).bigEndian, Array.init)) + junk)
                garbage.append(c)
            }
            let stillOpen = await RawTCP.waitUntilClosed(garbage, within: .seconds(10))
            #expect(stillOpen == 0, "\(stillOpen) connections sending garbage were kept")
            for c in garbage { c.close() }
            let (sent, answers) = await flood.wait()
            let responses = answers.filter { $0 == PacketKind.handshakeResponse.rawValue }.count
            // A source earns 20 handshakes a second after a burst of 40 (NodeLimits): far fewer
            // than it asks for, and each costs the victim a signature.
            #expect(sent > 1_000, "the flood sent \(sent)")
            #expect(responses <= 40 + 20 * 5, "the victim answered \(responses) of \(sent / 2) flooded INITs")
            #expect(opened <= 40 + 20 * 3, "\(opened) of 301 handshakes were answered")
            // Its own session, once its bucket has refilled a little.
            var ready = false
            for _ in 0..<20 where !ready {
                ready = (try? await hostile.handshake(with: target, within: .seconds(1))) != nil
            }
            #expect(ready)
            print("hostile floods: \(sent) datagrams flooded, \(responses) INITs answered; \(opened) of 301 identities got a session")
            // Discovers, 200 at once: a few a second per source are answered (each sends two probes
            // to the source); the rest are refused at once.
            let answered = await withTaskGroup(of: Bool.self) { group in
                for _ in 0..<200 {
                    group.addTask {
                        let r = try? await hostile.send(hostile.message(command: KernelCommands.discover), to: target, awaitReply: true, within: .seconds(10))
                        return r?.type == .ok
                    }
                }
                var n = 0
                for await ok in group where ok { n += 1 }
                return n
            }
            #expect(answered <= 15, "\(answered) of 200 discovers were answered")
            print("hostile floods: \(answered) of 200 concurrent discovers answered")
        }
        #expect(victim.isAlive, "the victim exited: \(victim.node.output.suffix(12000))")
        print("hostile floods: \(usage)")
        #expect(usage.peakRSS - usage.baseRSS < HostileTests.rssBound, "\(usage)")
        // One event loop serves a node: a flood can take one core, not the machine.
        #expect(usage.cores < 1.3, "\(usage)")
        try victim.legitimateClientsWork()
        await hostile.close()
    }

    @Test("port 0 in every place a port travels: request headers, reply headers, peer records, discover")
    func portZero() async throws {
        // The victim joins through the hostile peer, so it asks it for neighbors and learns its records.
        let hostile = try await HostilePeer()
        let bogus = (0..<20).map { i -> PeerAddress in
            PeerAddress(id: .random(), socket: i % 3 == 0 ? PeerSocketAddress(ip: .loopback, tcpPort: 0, udpPort: 0)
                                                 : i % 3 == 1 ? PeerSocketAddress(ip: .loopback, tcpPort: 4000, udpPort: 0)
                                                 : PeerSocketAddress(ip: .v4(0xE000_0001), port: 4000))  // multicast
        }
        hostile.serve { request, _ in
            // Every answer claims ports 0 in its header and lists unreachable records.
            request.command == CommandID.derive(from: KernelCommands.neighbors) ? [.peers(bogus)] : []
        }
        hostile.replyPorts = (0, 0)
        let victim = try Victim(["--bootstrap", "\(hostile.address)"])
        defer { victim.stop() }
        let usage = try await victim.underAttack {
            #expect(victim.node.waitFor("bootstrapped via", seconds: 30))
            // Requests announcing port 0, and a discover from a peer announcing port 0 everywhere.
            try await hostile.handshake(with: victim.address)
            for ports: (UInt16, UInt16) in [(0, 0), (0, 4000), (4000, 0)] {
                for command in [KernelCommands.ping, KernelCommands.neighbors, KernelCommands.discover] {
                    let payload: [Payload] = command == KernelCommands.neighbors ? [.keys([.random()])] : []
                    _ = try await hostile.send(hostile.message(command: command, ports: (ports.0, ports.1), payload: payload), to: victim.address,
                                               awaitReply: true, within: .seconds(5))
                }
            }
        }
        #expect(victim.isAlive)
        print("hostile portZero: \(usage)")
        #expect(!victim.node.output.contains("UDP socket closed"), "the victim's UDP socket failed: \(victim.node.output)")
        #expect(usage.peakRSS - usage.baseRSS < HostileTests.rssBound, "\(usage)")
        try victim.legitimateClientsWork()
        await hostile.close()
    }

    @Test("500 requests over one TCP connection whose replies are never read")
    func unreadReplies() async throws {
        let victim = try Victim()
        defer { victim.stop() }
        let hostile = try await HostilePeer()
        hostile.serve { _, _ in [] }  // it is in the victim's map now: answer, so lookups need not wait for it
        try await hostile.handshake(with: victim.address)
        _ = try await hostile.send(hostile.message(command: KernelCommands.ping), to: victim.address, awaitReply: true)
        // Each request echoes 1 MiB: unanswered, 500 of them would hold half a gigabyte of replies.
        let big = [UInt8](repeating: 0x41, count: 1 << 20)
        let frame = try hostile.seal(hostile.message(command: "messaging.raw", payload: [.bytes(big)]), transport: .tcp)
        let port = victim.address.tcpPort
        let usage = try await victim.underAttack {
            guard let tcp = RawTCP(port: port, sendTimeout: 3) else { Issue.record("no connection"); return }
            var written = 0
            for _ in 0..<500 {
                var f = frame
                // A fresh counter per frame: reseal (the window would drop repeats).
                f = (try? hostile.seal(hostile.message(command: "messaging.raw", payload: [.bytes(big)]), transport: .tcp)) ?? f
                let n = tcp.write(Array(withUnsafeBytes(of: UInt32(f.count).bigEndian, Array.init)) + f)
                written += n
                if n < f.count + 4 { break }  // the victim stopped reading: back-pressure
            }
            #expect(written < 200 << 20, "the victim read \(written >> 20) MiB of requests it cannot answer")
            // Hold the connection, unread, while the victim's replies pile up, then see it closed
            // (16 MiB of unread replies, or 10 s without reading).
            let waitStart = ContinuousClock.now
            let deadline = waitStart + .seconds(30)
            while !tcp.closedByPeer, ContinuousClock.now < deadline { try? await Task.sleep(for: .milliseconds(100)) }
            print("hostile unreadReplies: wrote \(written >> 20) MiB; closed after \(ContinuousClock.now - waitStart)")
            #expect(tcp.closedByPeer, "the victim kept a connection whose replies are not read")
            tcp.close()
        }
        #expect(victim.isAlive)
        print("hostile unreadReplies: \(usage)")
        #expect(usage.peakRSS - usage.baseRSS < HostileTests.rssBound, "\(usage)")
        try victim.legitimateClientsWork()
        await hostile.close()
    }

    @Test("100 partial maximum-size frames hold at most the partial-frame budget, and only until their deadline")
    func partialFrames() async throws {
        let victim = try Victim()
        defer { victim.stop() }
        let port = victim.address.tcpPort
        let usage = try await victim.underAttack {
            // Every frame announces the largest size and stops one byte short.
            let length = UInt32(FrameDecoder.maxFrameBytes)
            let body = [UInt8](repeating: 0x84, count: Int(length) - 1)
            let header = Array(withUnsafeBytes(of: length.bigEndian, Array.init))
            var connections: [RawTCP] = []
            for _ in 0..<100 {
                guard let c = RawTCP(port: port, sendTimeout: 0.5) else { continue }
                c.write(header)
                c.write(body)
                connections.append(c)
            }
            #expect(connections.count >= 50)
            // The budget (64 MiB) refuses most; the deadline (8 s) or the unauthenticated-connection
            // deadline closes the rest.
            let held = await RawTCP.waitUntilClosed(connections, within: .seconds(30))
            #expect(held == 0, "\(held) partial frames still held")
            for c in connections { c.close() }
        }
        #expect(victim.isAlive)
        print("hostile partialFrames: \(usage)")
        #expect(usage.peakRSS - usage.baseRSS < 160 << 20, "\(usage)")
        try victim.legitimateClientsWork()
    }

    @Test("2,000 idle TCP connections: at most the inbound limit is held, and only until the authentication deadline")
    func idleConnections() async throws {
        let victim = try Victim()
        defer { victim.stop() }
        let port = victim.address.tcpPort
        let usage = try await victim.underAttack {
            var connections: [RawTCP] = []
            for _ in 0..<2_000 {
                if let c = RawTCP(port: port) { connections.append(c) }
            }
            #expect(connections.count >= 1_000)
            // While they are held, the node works, over TCP too: a newcomer takes the place of
            // the oldest connection that has not authenticated (without it, every slot stays
            // taken and a probe-back of the node's own TCP port fails: it would call itself
            // firewalled and drop out of lookups).
            let tcpPing = try P2PTool.run(["ping", "--tcp", "\(victim.address)"], timeout: 30)
            #expect(tcpPing.code == 0, "ping --tcp: \(tcpPing.err)")
            try victim.legitimateClientsWork()
            #expect(!victim.node.output.contains("not reachable"), "\(victim.node.output.suffix(1500))")
            #expect((ProcessUsage.openFiles(victim.pid) ?? 0) < NodeLimits().maxInboundTCP + 100)
            let open = await RawTCP.waitUntilClosed(connections, within: .seconds(30))
            #expect(open == 0, "\(open) idle connections still open")
            for c in connections { c.close() }
        }
        #expect(victim.isAlive)
        print("hostile idleConnections: \(usage)")
        #expect(usage.peakRSS - usage.baseRSS < HostileTests.rssBound, "\(usage)")
        try victim.legitimateClientsWork()
    }

    @Test("at the file-descriptor limit the node backs off accepting instead of spinning, and recovers")
    func fdLimit() async throws {
        // 200 descriptors: below the inbound connection limit, so the process runs out first.
        let victim = try Victim(launcher: ["/usr/bin/prlimit", "--nofile=200:200", "--"])
        defer { victim.stop() }
        let port = victim.address.tcpPort
        var connections: [RawTCP] = []
        for _ in 0..<400 {
            if let c = RawTCP(port: port) { connections.append(c) }
        }
        // Hold them while the node is out of descriptors: the accept loop must not spin.
        let usage = try await victim.underAttack {
            try? await Task.sleep(for: .seconds(2))
        }
        #expect(victim.isAlive)
        print("hostile fdLimit: \(usage)")
        #expect(usage.cores < 0.5, "at the fd limit the node used \(usage)")
        for c in connections { c.close() }
        // Descriptors free again: TCP works (a TCP ping, then the UDP-based clients).
        var ok = false
        for _ in 0..<20 where !ok {
            ok = try P2PTool.run(["ping", "--tcp", "\(victim.address)"], timeout: 30).code == 0
            if !ok { try await Task.sleep(for: .milliseconds(500)) }
        }
        #expect(ok)
        try victim.legitimateClientsWork()
    }

    @Test("forged replies with every message id a peer can guess change nothing a legitimate peer sees")
    func forgedReplies() async throws {
        let victim = try Victim()
        defer { victim.stop() }
        let hostile = try await HostilePeer()
        try await hostile.handshake(with: victim.address)
        let target = victim.address
        let fakes = (0..<20).map { _ in PeerAddress(id: .random(), socket: hostile.address) }
        let usage = try await victim.underAttack {
            // A background task sprays replies with random ids, in the hostile peer's own session.
            let spray = Task {
                var n = 0
                while !Task.isCancelled {
                    _ = try? await hostile.send(hostile.message(id: .random(in: 1...UInt32.max), type: .ok, command: KernelCommands.neighbors,
                                                                payload: [.peers(fakes)]), to: target)
                    n += 1
                    if n % 64 == 0 { await Task.yield() }
                }
            }
            try victim.legitimateClientsWork()
            spray.cancel()
            _ = await spray.value
        }
        #expect(victim.isAlive)
        print("hostile forgedReplies: \(usage)")
        #expect(usage.peakRSS - usage.baseRSS < HostileTests.rssBound, "\(usage)")
        await hostile.close()
    }
}
