import Crypto
import NIOConcurrencyHelpers
import NIOCore
import P2PDHT
import P2PKernel
import P2PTesting
import Testing
import P2PTestSupport

/// Watches an event loop: a task every 2 ms notes the longest gap between its runs, which is how
/// long the loop was blocked by anything else.
final class LoopWatch: Sendable {
    private let longest = NIOLockedValueBox<UInt64>(0)
    private let task: NIOLockedValueBox<RepeatedTask?> = NIOLockedValueBox(nil)

    init(_ loop: any EventLoop) {
        let last = NIOLockedValueBox<UInt64>(NIODeadline.now().uptimeNanoseconds)
        let longest = self.longest
        let t = loop.scheduleRepeatedTask(initialDelay: .milliseconds(2), delay: .milliseconds(2)) { _ in
            let now = NIODeadline.now().uptimeNanoseconds
            let gap = last.withLockedValue { l in defer { l = now }; return now - l }
            longest.withLockedValue { $0 = max($0, gap) }
        }
        task.withLockedValue { $0 = t }
    }

    /// The longest time the loop went without running the watch (beyond its 2 ms period).
    func stop() -> Duration {
        task.withLockedValue { $0?.cancel() }
        return .nanoseconds(Int64(longest.withLockedValue { $0 }))
    }
}

/// What one hostile peer with a valid identity can make a storing peer do, and the bound on it.
@Suite("Storage under attack", .serialized)
struct StorageHostileTests {
    typealias Key = Curve25519.Signing.PrivateKey
    static let storage = CommandID.derive(from: "dht.storage")
    /// How long one hostile request may hold a storing peer's event loop, in this debug build on a
    /// shared two-core machine (the release figures are in the benchmark notes: a few ms).
    static let maxStall: Duration = .seconds(1)

    /// Sends a storage request as-is to one peer and decodes its answer (a refusal is thrown typed).
    static func raw(_ from: Node, to: Node, _ payload: [Payload]) async throws -> StorageResult {
        let reply = try await from.request(to: to.address, command: storage, payload: payload).get()
        if let e = RPCError.from(reply: reply) { throw e }
        return try StorageCodec.decodeResult(reply.payload)
    }

    static func refusal(_ body: () async throws -> StorageResult) async -> StorageError? {
        do {
            _ = try await body()
            return nil
        } catch let e as StorageError {
            return e
        } catch RPCError.badRequest(let why) {
            // A malformed request is answered as a bad request.
            return .malformed(why)
        } catch {
            return .denied("not a storage refusal: \(error)")
        }
    }

    @Test("forged signatures are refused on every replica: tampered bytes, a signature for another key, the owner's public key on a stranger's signature")
    func forgedSignatures() async throws {
        let net = try await testnet(8)
        let (owner, stranger) = (Key(), Key())
        let k = key("signed")
        #expect(try await net.nodes[0].dht.put(k, Array("genuine".utf8), options: DHTOptions(signer: owner, protect: .entry)).isSuccess)

        var tampered = try StoredValue(Array("genuine".utf8)).signed(at: k, by: stranger)
        tampered.value = Array("tampered".utf8)
        let other = key("elsewhere")
        let movedSignature = try StoredValue(Array("moved".utf8)).signed(at: other, by: stranger)
        // TomP2P #104: the owner's key attached to data the owner never signed.
        let strangersSig = try StoredValue(Array("claims owner".utf8), protectEntry: true).signed(at: k, by: stranger)
        let claimsOwner = StoredValue(Array("claims owner".utf8), protectEntry: true,
                                      signature: ValueSignature(signer: SignerKey(owner.publicKey), signature: try #require(strangersSig.signature).signature))
        for (value, at) in [(tampered, k), (movedSignature, k), (claimsOwner, k)] {
            let r = try await net.nodes[1].dht.put([at: value], options: DHTOptions(signer: stranger))
            #expect(r.refusal == .badSignature(at))
        }
        for r in try SecurityTests.replicas(net, k) { #expect(try SecurityTests.stored(r, k)?.value == Array("genuine".utf8)) }
        await net.shutdown()
    }

    @Test("writer proofs: one re-aimed at another key, one from an hour ago, and one replayed by another peer are refused")
    func writerProofs() async throws {
        let net = try await testnet(8)
        let owner = Key()
        let k = key("owned")
        #expect(try await net.nodes[0].dht.put(k, Array("v1".utf8), options: DHTOptions(signer: owner, protect: .entry)).isSuccess)
        let replica = try #require(try SecurityTests.replicas(net, k).first { $0 !== net.nodes[0] && $0 !== net.nodes[1] })

        // The owner's signed remove of k, re-aimed at another key the owner holds.
        let other = Number640(location: k.location, content: Number160(hashing: "also owned"))
        #expect(try await net.nodes[0].dht.put(other, Array("keep".utf8), options: DHTOptions(signer: owner, protect: .entry)).isSuccess)
        let removeK = StorageRequest.remove(.keys([k]), returnValues: false)
        let proof = try WriterProof(signing: removeK, with: owner)
        let reaimed = await Self.refusal { try await Self.raw(net.nodes[1], to: replica, StorageCodec.encode(.remove(.keys([other]), returnValues: false), proof: proof)) }
        guard case .badWriterProof? = reaimed else { Issue.record("re-aimed proof: \(String(describing: reaimed))"); return }

        // A proof signed an hour ago.
        let old = try WriterProof(signing: removeK, with: owner, timestampMillis: WriterProof.nowMillis() - 3_600_000)
        let stale = await Self.refusal { try await Self.raw(net.nodes[0], to: replica, StorageCodec.encode(removeK, proof: old)) }
        guard case .badWriterProof? = stale else { Issue.record("stale proof: \(String(describing: stale))"); return }

        // The owner's put of v1, captured, then v2 written; another peer replays the v1 put.
        let v1 = try StoredValue(Array("v1".utf8), protectEntry: true).signed(at: k, by: owner)
        let putV1 = StorageRequest.put([k: v1], mode: .overwrite)
        let captured = StorageCodec.encode(putV1, proof: try WriterProof(signing: putV1, with: owner))
        _ = try await Self.raw(net.nodes[0], to: replica, captured)
        #expect(try await net.nodes[0].dht.put(k, Array("v2".utf8), options: DHTOptions(signer: owner, protect: .entry)).isSuccess)
        let replay = await Self.refusal { try await Self.raw(net.nodes[1], to: replica, captured) }
        guard case .badWriterProof? = replay else { Issue.record("replay: \(String(describing: replay))"); return }
        #expect(try SecurityTests.stored(replica, k)?.value == Array("v2".utf8))
        #expect(try SecurityTests.stored(replica, other)?.value == Array("keep".utf8))
        await net.shutdown()
    }

    @Test("floods are refused or bounded, the loop is never held longer than the named bound, and honest puts and gets still work")
    func floods() async throws {
        var limits = MemoryStorage.Limits()
        limits.maxBytesPerWriter = 200_000
        let bounded = limits
        let net = try await Testnet.start(peers: 6, routing: .perfect, plugins: { _ in builtIns(backend: MemoryStorage(limits: bounded)) })
        let attacker = net.nodes[1]
        let target = net.nodes[2]
        let mallory = Key()
        let watch = LoopWatch(target.eventLoop)

        // 1,000 signed values in one put: refused before any is verified.
        let location = Number160(hashing: "flood")
        var signed: [Number640: StoredValue] = [:]
        let proto = try StoredValue([1]).signed(at: Number640(location: location), by: mallory)
        for i in 0..<1_000 { signed[Number640(location: location, content: Number160(UInt32(i)))] = proto }
        let many = await Self.refusal { try await Self.raw(attacker, to: target, StorageCodec.encode(.put(signed, mode: .overwrite))) }
        guard case .denied? = many else { Issue.record("1,000 signatures: \(String(describing: many))"); return }

        // 9,000 versions of one item in one put: refused before any is decoded (1,000 per request).
        func versions(_ range: ClosedRange<Int>, basedOnBack: Int = 1, value: [UInt8] = []) -> [Number640: StoredValue] {
            var out: [Number640: StoredValue] = [:]
            for i in range {
                out[Number640(location: location, content: .zero, version: Number160(UInt32(i)))] =
                    StoredValue(value, basedOn: [Number160(UInt32(max(0, i - basedOnBack)))])
            }
            return out
        }
        let huge = await Self.refusal { try await Self.raw(attacker, to: target, StorageCodec.encode(.put(versions(1...9_000), mode: .overwrite))) }
        #expect(huge == .requestTooLarge(entries: 9_000, limit: 1_000))
        // The same item grown to the location's 10,000 entries in requests of 1,000 each, then
        // 1,000 overwrites that rewire what versions are based on (each moves the item's heads),
        // the item's heads, and the whole location read and removed: each request is bounded.
        for batch in 0..<10 {
            let r = try await Self.raw(attacker, to: target, StorageCodec.encode(.put(versions(batch * 1_000 + 1...batch * 1_000 + 1_000), mode: .overwrite)))
            guard case .statuses(let s, _) = r else { Issue.record("batch \(batch): \(r)"); return }
            #expect(s.count == 1_000)
        }
        let rewired = try await Self.raw(attacker, to: target, StorageCodec.encode(.put(
            versions(1...1_000, basedOnBack: 2, value: [1]).filter { $0.key.version.low % 2 == 0 }, mode: .overwrite)))
        guard case .statuses(let rs, _) = rewired else { Issue.record("rewired: \(rewired)"); return }
        #expect(rs.count == 500)
        // Every even version up to 1,000 now skips its odd predecessor, so each odd version up to
        // 999 became a head beside the chain's end (10,000).
        let latest = try await Self.raw(attacker, to: target, StorageCodec.encode(.get(.latest(location: location, domain: .zero, content: .zero))))
        guard case .values(let heads, _) = latest else { Issue.record("latest: \(latest)"); return }
        #expect(heads.count == 501)
        #expect(heads.keys.contains { $0.version == Number160(10_000) })
        let page = try await Self.raw(attacker, to: target, StorageCodec.encode(.get(.all(location: location))))
        guard case .values(let got, let resume) = page else { Issue.record("page: \(page)"); return }
        #expect(got.count == 1_000)
        #expect(resume != nil)
        let removed = try await Self.raw(attacker, to: target, StorageCodec.encode(.remove(.all(location: location), returnValues: false)))
        guard case .statuses(let gone, let more) = removed else { Issue.record("remove: \(removed)"); return }
        #expect(gone.count == 1_000)
        #expect(more != nil)

        // A range over every location: refused.
        let everything = await Self.refusal {
            try await Self.raw(attacker, to: target, StorageCodec.encode(.get(.range(from: .zero, to: .max, limit: .max, descending: false))))
        }
        guard case .malformed? = everything else { Issue.record("whole-range get: \(String(describing: everything))"); return }
        let removeAll = await Self.refusal {
            try await Self.raw(attacker, to: target, StorageCodec.encode(.remove(.range(from: .zero, to: .max, limit: .max, descending: false), returnValues: false)))
        }
        guard case .malformed? = removeAll else { Issue.record("whole-range remove: \(String(describing: removeAll))"); return }

        // A per-writer quota: mallory's signed writes stop at 200,000 bytes.
        var quota: StorageError?
        for i in 0..<100 where quota == nil {
            let k = Number640(location: location, domain: Number160(hashing: "quota"), content: Number160(UInt32(i)))
            let r = try await attacker.dht.put(k, Array(repeating: 0, count: 10_000), options: DHTOptions(signer: mallory))
            quota = r.refusal
        }
        guard case .quotaExceeded(let who, _, let limit)? = quota else { Issue.record("quota: \(String(describing: quota))"); return }
        #expect(who == SignerKey(mallory.publicKey))
        #expect(limit == 200_000)
        #expect(try SecurityTests.memory(target).bytes(writtenBy: SignerKey(mallory.publicKey)) <= 200_000)

        let stall = watch.stop()
        #expect(stall < Self.maxStall, "the storing peer's event loop was held \(stall)")
        print("storage floods: longest event-loop stall on the target \(stall)")

        // Honest users are unharmed.
        let k = key("honest")
        #expect(try await net.nodes[3].dht.put(k, Array("fine".utf8), options: DHTOptions(signer: Key())).isSuccess)
        #expect(text(try await net.nodes[4].dht.get(k).value) == "fine")
        await net.shutdown()
    }

    @Test("a request naming more entries than peers serve fails before it is sent; a remove of a whole location resolves it page by page")
    func requestBounds() async throws {
        let net = try await testnet(6)
        let location = Number160(hashing: "many entries")
        var entries: [Number640: StoredValue] = [:]
        for i in 0..<1_001 { entries[Number640(location: location, content: Number160(UInt32(i)))] = StoredValue([UInt8(i & 0xFF)]) }
        await #expect(throws: StorageError.requestTooLarge(entries: 1_001, limit: 1_000)) {
            try await net.nodes[0].dht.put(entries)
        }
        await #expect(throws: StorageError.requestTooLarge(entries: 1_001, limit: 1_000)) {
            try await net.nodes[0].dht.get(.keys(Array(entries.keys)))
        }
        // 2,500 entries in three puts; a remove of the location answers 1,000 at a time.
        let keys = (0..<2_500).map { Number640(location: location, content: Number160(UInt32($0))) }
        for chunk in stride(from: 0, to: keys.count, by: 1_000) {
            let part = keys[chunk..<min(chunk + 1_000, keys.count)]
            #expect(try await net.nodes[0].dht.put(Dictionary(uniqueKeysWithValues: part.map { ($0, StoredValue([7])) })).isSuccess)
        }
        #expect(net.nodes.contains { ((try? SecurityTests.memory($0).entryCount) ?? 0) > 1_000 })
        // The remove resolves the range page by page itself (each answer holds at most 1,000)
        // and writes removals for all 2,500, 1,000 per request.
        let r = try await net.nodes[1].dht.remove(.all(location: location))
        #expect(r.refusal == nil)
        #expect(r.resumeAfter == nil)
        for peer in net.nodes {
            guard case .values(let left, _) = try SecurityTests.memory(peer).execute(.get(.all(location: location)), now: StoragePipeline.now()) else {
                Issue.record("a get answered no values")
                continue
            }
            #expect(left.isEmpty, "\(peer.peerID) still holds \(left.count) values")
        }
        await net.shutdown()
    }

    @Test("a range get larger than a peer's answer bound comes in pages with a continuation, and the pages hold every entry")
    func pagedRange() async throws {
        let net = try await testnet(6)
        let location = Number160(hashing: "big range")
        let value = Array(repeating: UInt8(7), count: 20_000)
        for batch in 0..<10 {
            var entries: [Number640: StoredValue] = [:]
            for i in 0..<20 { entries[Number640(location: location, content: Number160(UInt32(batch * 20 + i)))] = StoredValue(value) }
            #expect(try await net.nodes[0].dht.put(entries).isSuccess)
        }
        // 200 × 20 kB = 4 MB: over the 2 MiB a peer puts in one answer.
        var seen = Set<Number640>()
        var from = Number640(location: location)
        var pages = 0
        while pages < 10 {
            pages += 1
            let page = try await net.nodes[3].dht.get(.range(from: from, to: Number640(location: location, domain: .max, content: .max, version: .max),
                                                              limit: 10_000, descending: false))
            seen.formUnion(page.entries.keys)
            guard let last = page.resumeAfter else { break }
            #expect(page.entries.count < 200)
            from = Number640(location: last.location, domain: last.domain, content: last.content, version: last.version.successor)
        }
        #expect(pages > 1)
        #expect(seen.count == 200)
        await net.shutdown()
    }
}

extension Number160 {
    /// The next number (for resuming after a key).
    var successor: Number160 {
        var bytes = self.bytes
        for i in stride(from: bytes.count - 1, through: 0, by: -1) {
            if bytes[i] == 0xFF { bytes[i] = 0 } else { bytes[i] += 1; break }
        }
        return Number160(bytes: bytes) ?? self
    }
}
