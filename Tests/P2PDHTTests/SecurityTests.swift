import Crypto
import P2PDHT
import P2PKernel
import P2PTesting
import Testing
import P2PTestSupport

/// TomP2P's security scenarios (TestSecurity), rewritten against this API, each on a real
/// network of peers talking over loopback, with the outcome checked on every replica's backend.
@Suite("Security", .serialized)
struct SecurityTests {
    typealias Key = Curve25519.Signing.PrivateKey

    /// The peers that hold a key's replicas (the 3 closest, as a put with 3 replicas reaches them).
    static func replicas(_ net: Testnet, _ k: Number640) throws -> [Node] {
        let byID = Dictionary(uniqueKeysWithValues: net.nodes.map { ($0.peerID, $0) })
        return try net.trueClosest(to: k.location, count: 3).map { try #require(byID[$0]) }
    }

    static func stored(_ node: Node, _ k: Number640) throws -> StoredValue? {
        guard let backend = node.registry.storageBackend,
              case .values(let v, _) = try backend.execute(.get(.keys([k])), now: StoragePipeline.now()) else { return nil }
        return v[k]
    }

    static func memory(_ node: Node) throws -> MemoryStorage { try #require(node.registry.storageBackend as? MemoryStorage) }

    static func as_(_ key: Key?, _ protect: DHTOptions.Protect = [], ttl: Duration? = nil) -> DHTOptions {
        DHTOptions(ttl: ttl, signer: key, protect: protect)
    }

    static func net() async throws -> Testnet { try await testnet(8) }

    @Test("S2 domain protection: the first signer owns the domain, a stranger is refused naming the owner, the master key takes over")
    func domainProtection() async throws {
        let net = try await Self.net()
        let (k1, k2, k3) = (Key(), Key(), Key())
        let domain = SignerKey(k3.publicKey).id
        let location = Number160(hashing: "protected domain")
        func at(_ c: Int) -> Number640 { Number640(location: location, domain: domain, content: Number160(UInt32(c))) }

        #expect(try await net.nodes[0].dht.put(at(10), Array("ten".utf8), options: Self.as_(k1, .domain)).isSuccess)
        for r in try Self.replicas(net, at(10)) { #expect(try Self.memory(r).owner(ofDomain: domain, at: location) == SignerKey(k1.publicKey)) }

        let stranger = try await net.nodes[1].dht.put(at(11), Array("eleven".utf8), options: Self.as_(k2, .domain))
        #expect(!stranger.isSuccess)
        #expect(stranger.deniedBy == SignerKey(k1.publicKey))
        if case .protected(_, _, let isDomain)? = stranger.refusal { #expect(isDomain) } else { Issue.record("not a protection refusal: \(String(describing: stranger.refusal))") }
        // An unsigned write into the protected domain is refused too.
        #expect(try await net.nodes[1].dht.put(at(13), Array("x".utf8)).deniedBy == SignerKey(k1.publicKey))

        let master = try await net.nodes[2].dht.put(at(12), Array("twelve".utf8), options: Self.as_(k3, .domain))
        #expect(master.isSuccess, "the domain's master key claims it: \(String(describing: master.refusal))")
        for r in try Self.replicas(net, at(10)) {
            #expect(try Self.memory(r).owner(ofDomain: domain, at: location) == SignerKey(k3.publicKey))
            #expect(try Self.stored(r, at(11)) == nil)
            #expect(try Self.stored(r, at(13)) == nil)
        }
        let all = try await net.nodes[5].dht.get(.all(location: location, domain: domain))
        #expect(Set(all.entries.keys) == [at(10), at(12)])
        await net.shutdown()
    }

    @Test("S3 + a domain that becomes empty becomes unprotected: a stranger's remove is refused, the owner's works, then anyone may claim it")
    func domainRemoveAndEmpty() async throws {
        let net = try await Self.net()
        let (k1, k2) = (Key(), Key())
        let location = Number160(hashing: "removal"), domain = Number160(hashing: "d")
        let k = Number640(location: location, domain: domain, content: Number160(hashing: "c"))
        #expect(try await net.nodes[0].dht.put(k, Array("v".utf8), options: Self.as_(k1, .domain)).isSuccess)

        let strangerRemove = try await net.nodes[1].dht.remove(.all(location: location, domain: domain), returnValues: true, options: Self.as_(k2))
        #expect(strangerRemove.isEmpty)
        #expect(strangerRemove.refusal != nil)
        for r in try Self.replicas(net, k) { #expect(try Self.stored(r, k)?.value == Array("v".utf8)) }

        let ownerRemove = try await net.nodes[2].dht.remove(.all(location: location, domain: domain), returnValues: true, options: Self.as_(k1))
        #expect(ownerRemove.entries.keys.contains(k))
        for r in try Self.replicas(net, k) {
            #expect(try Self.stored(r, k) == nil)
            #expect(try Self.memory(r).owner(ofDomain: domain, at: location) == nil, "an empty domain is unprotected")
        }
        #expect(try await net.nodes[3].dht.put(k, Array("mine".utf8), options: Self.as_(k2, .domain)).isSuccess)
        for r in try Self.replicas(net, k) { #expect(try Self.memory(r).owner(ofDomain: domain, at: location) == SignerKey(k2.publicKey)) }
        await net.shutdown()
    }

    @Test("S5/S6/S16 entry protection: foreign overwrites and removes (direct and range, signed or not) are refused on every replica; the owner updates and removes; removal clears protection")
    func entryProtection() async throws {
        let net = try await Self.net()
        let (k1, k2) = (Key(), Key())
        let k = Number640(location: Number160(hashing: "location"), content: Number160(hashing: "content"))
        let put = try await net.nodes[0].dht.put(k, Array("data1".utf8), options: Self.as_(k1, .entry))
        #expect(put.isSuccess)
        for r in try Self.replicas(net, k) { #expect(try Self.memory(r).owner(ofEntry: k) == SignerKey(k1.publicKey)) }

        // Unsigned, and signed by another key: refused, naming the owner.
        #expect(try await net.nodes[1].dht.put(k, Array("data2".utf8)).deniedBy == SignerKey(k1.publicKey))
        #expect(try await net.nodes[1].dht.put(k, Array("data3".utf8), options: Self.as_(k2, .entry)).deniedBy == SignerKey(k1.publicKey))
        let got = try await net.nodes[4].dht.get(k)
        #expect(text(got.value) == "data1")
        #expect(got.signature(of: k)?.signer == SignerKey(k1.publicKey))
        #expect(got.signature(of: k)?.verified == true)

        // Removes by others: direct and range, unsigned and signed; none removes anything.
        let range = StorageQuery.range(from: Number640(location: k.location, domain: k.domain, content: k.content),
                                       to: Number640(location: k.location, domain: k.domain, content: k.content, version: .max), limit: 100, descending: false)
        for (query, signer) in [(StorageQuery.keys([k]), nil), (.keys([k]), k2), (range, nil), (range, k2)] as [(StorageQuery, Key?)] {
            let r = try await net.nodes[2].dht.remove(query, returnValues: true, options: Self.as_(signer))
            #expect(r.isEmpty)
            #expect(r.refusal != nil)
        }
        // A stranger's putMeta (a TTL to expire it) and confirm are refused too.
        #expect(try await net.nodes[2].dht.putMeta([k], ttl: .seconds(1), options: Self.as_(k2)).deniedBy == SignerKey(k1.publicKey))
        #expect(try await net.nodes[2].dht.confirm([k], options: Self.as_(k2)).deniedBy == SignerKey(k1.publicKey))
        for r in try Self.replicas(net, k) {
            let v = try Self.stored(r, k)
            #expect(v?.value == Array("data1".utf8))
            #expect(v?.ttlSeconds == 0)
        }

        // The owner's signed update and remove.
        #expect(try await net.nodes[3].dht.put(k, Array("Juhuu".utf8), options: Self.as_(k1, .entry)).isSuccess)
        #expect(text(try await net.nodes[5].dht.get(k).value) == "Juhuu")
        let removed = try await net.nodes[3].dht.remove(range, returnValues: true, options: Self.as_(k1))
        #expect(removed.entries[k] == Array("Juhuu".utf8))
        for r in try Self.replicas(net, k) {
            #expect(try Self.stored(r, k) == nil)
            #expect(try Self.memory(r).owner(ofEntry: k) == nil, "removing the entry clears its protection")
        }
        #expect(try await net.nodes[1].dht.put(k, Array("free".utf8), options: Self.as_(k2, .entry)).isSuccess)
        await net.shutdown()
    }

    @Test("S5 master key: an entry whose content key is SHA-1 of a public key can always be claimed by that key")
    func masterKeyEntry() async throws {
        let net = try await Self.net()
        let (k1, k2) = (Key(), Key())
        let k = Number640(location: Number160(hashing: "50"), content: SignerKey(k1.publicKey).id)
        #expect(try await net.nodes[1].dht.put(k, Array("test1".utf8), options: Self.as_(k2, .entry)).isSuccess)
        let claim = try await net.nodes[0].dht.put(k, Array("test1".utf8), options: Self.as_(k1, .entry))
        #expect(claim.isSuccess, "\(String(describing: claim.refusal))")
        for r in try Self.replicas(net, k) { #expect(try Self.memory(r).owner(ofEntry: k) == SignerKey(k1.publicKey)) }
        #expect(try await net.nodes[1].dht.put(k, Array("back".utf8), options: Self.as_(k2, .entry)).deniedBy == SignerKey(k1.publicKey))
        await net.shutdown()
    }

    @Test("S7 protection spans versions; the owner hands the entry over with a put signed by the new key")
    func versionsAndHandover() async throws {
        let net = try await Self.net()
        let (k1, k2) = (Key(), Key())
        let base = Number640(location: Number160(hashing: "versions"), content: Number160(hashing: "doc"))
        func v(_ n: Number160) -> Number640 { Number640(location: base.location, domain: base.domain, content: base.content, version: n) }
        #expect(try await net.nodes[0].dht.put(v(.zero), Array("v0".utf8), options: Self.as_(k1, .entry)).isSuccess)
        #expect(try await net.nodes[1].dht.put(v(Number160(1)), Array("v1".utf8), options: Self.as_(k2, .entry)).deniedBy == SignerKey(k1.publicKey))

        // Request signed by the owner k1, value signed by k2: the entry passes to k2.
        let handed = try StoredValue(Array("vmax".utf8), protectEntry: true).signed(at: v(.max), by: k2)
        let handover = try await net.nodes[0].dht.put([v(.max): handed], options: Self.as_(k1))
        #expect(handover.isSuccess, "\(handover.statuses.values.map { $0.values.map(\.description) }) \(handover.failures.values)")
        for r in try Self.replicas(net, base) { #expect(try Self.memory(r).owner(ofEntry: base) == SignerKey(k2.publicKey)) }
        #expect(try await net.nodes[1].dht.put(v(Number160(1)), Array("v1".utf8), options: Self.as_(k2, .entry)).isSuccess)
        #expect(try await net.nodes[0].dht.put(v(Number160(2)), Array("v2".utf8), options: Self.as_(k1, .entry)).deniedBy == SignerKey(k2.publicKey))
        await net.shutdown()
    }

    @Test("S8 the owner hands a domain to another key; the old owner is then refused")
    func domainHandover() async throws {
        let net = try await Self.net()
        let (k1, k2) = (Key(), Key())
        let k = Number640(location: Number160(hashing: "key1"), content: Number160(7))
        #expect(try await net.nodes[0].dht.put(k, Array("a".utf8), options: Self.as_(k1, .domain)).isSuccess)
        #expect(try await net.nodes[1].dht.put(k, Array("b".utf8), options: Self.as_(k2, .domain)).deniedBy == SignerKey(k1.publicKey))
        // A stranger cannot hand it over.
        #expect(try await net.nodes[1].dht.transferDomain(location: k.location, domain: k.domain, to: SignerKey(k2.publicKey), options: Self.as_(k2)).deniedBy
                == SignerKey(k1.publicKey))
        #expect(try await net.nodes[0].dht.transferDomain(location: k.location, domain: k.domain, to: SignerKey(k2.publicKey), options: Self.as_(k1)).isSuccess)
        for r in try Self.replicas(net, k) { #expect(try Self.memory(r).owner(ofDomain: k.domain, at: k.location) == SignerKey(k2.publicKey)) }
        #expect(try await net.nodes[1].dht.put(k, Array("b".utf8), options: Self.as_(k2, .domain)).isSuccess)
        #expect(try await net.nodes[0].dht.put(k, Array("c".utf8), options: Self.as_(k1)).deniedBy == SignerKey(k2.publicKey))
        await net.shutdown()
    }

    @Test("S9/S10/S11 putMeta with a new key's signature moves the entry and swaps the signature without resending the value")
    func putMetaHandover() async throws {
        let net = try await Self.net()
        let (k1, k2) = (Key(), Key())
        let k = Number640(location: Number160(hashing: "location"), domain: Number160(hashing: "domain"), content: Number160(hashing: "content"))
        #expect(try await net.nodes[0].dht.put(k, Array("data".utf8), options: Self.as_(k1, .entry)).isSuccess)
        #expect(try await net.nodes[1].dht.put(k, [], options: Self.as_(k2, .entry)).deniedBy == SignerKey(k1.publicKey))

        let meta = try await net.nodes[0].dht.putMeta([k], ttl: nil, signWith: k2, options: Self.as_(k1))
        #expect(meta.isSuccess, "\(String(describing: meta.refusal))")
        for r in try Self.replicas(net, k) {
            #expect(try Self.memory(r).owner(ofEntry: k) == SignerKey(k2.publicKey))
            let v = try #require(try Self.stored(r, k))
            #expect(v.value == Array("data".utf8))
            #expect(v.signature?.signer == SignerKey(k2.publicKey))
            #expect(v.verify(at: k))
        }
        let got = try await net.nodes[4].dht.get(k)
        #expect(got.signature(of: k)?.signer == SignerKey(k2.publicKey))
        #expect(got.signature(of: k)?.verified == true)
        // The old owner is refused; the new one writes.
        #expect(try await net.nodes[0].dht.put(k, Array("new".utf8), options: Self.as_(k1, .entry)).deniedBy == SignerKey(k2.publicKey))
        #expect(try await net.nodes[1].dht.put(k, Array("new data".utf8), options: Self.as_(k2, .entry)).isSuccess)
        #expect(text(try await net.nodes[6].dht.get(k).value) == "new data")
        await net.shutdown()
    }

    @Test("S12, decided: a putMeta that fails (a version that does not exist) moves no ownership")
    func failedPutMetaChangesNothing() async throws {
        let net = try await Self.net()
        let (k1, k2) = (Key(), Key())
        let base = Number640(location: Number160(hashing: "versioned"), content: Number160(hashing: "item"))
        func v(_ n: UInt32) -> Number640 { Number640(location: base.location, domain: base.domain, content: base.content, version: Number160(n)) }
        #expect(try await net.nodes[0].dht.put(v(1), Array("data1v1".utf8), options: Self.as_(k1, .entry)).isSuccess)
        #expect(try await net.nodes[0].dht.put(v(2), Array("data1v2".utf8), basedOn: [Number160(1)], options: Self.as_(k1, .entry)).isSuccess)
        #expect(try await net.nodes[1].dht.put(v(3), Array("v3".utf8), options: Self.as_(k2, .entry)).deniedBy == SignerKey(k1.publicKey))

        let meta = try await net.nodes[0].dht.putMeta([v(0)], ttl: nil, signWith: k2, options: Self.as_(k1))
        #expect(meta.status(of: v(0)) == .notFound)
        for r in try Self.replicas(net, base) {
            #expect(try Self.memory(r).owner(ofEntry: base) == SignerKey(k1.publicKey))
            #expect(try Self.stored(r, v(1))?.signature?.signer == SignerKey(k1.publicKey))
        }
        // Unlike TomP2P, k2 still may not write v4.
        #expect(try await net.nodes[1].dht.put(v(4), Array("v4".utf8), basedOn: [Number160(2)], options: Self.as_(k2, .entry)).deniedBy
                == SignerKey(k1.publicKey))
        await net.shutdown()
    }

    @Test("S14/S15 TTL: only the owner changes it; answers carry the time left, never 0 for a value about to expire")
    func ttlByOwnerOnly() async throws {
        let net = try await Self.net()
        let (k1, k2) = (Key(), Key())
        let k = Number640(location: Number160(hashing: "ttl"))
        #expect(try await net.nodes[0].dht.put(k, Array("data".utf8), options: Self.as_(k1, .entry, ttl: .seconds(4))).isSuccess)
        let got = try await net.nodes[3].dht.get(k)
        for (_, values) in got.perPeer {
            let left = try #require(values[k]?.remainingSeconds)
            #expect((1...4).contains(left))
            #expect(values[k]?.ttlSeconds == 4)
        }
        // A stranger may not keep it alive (nor expire it); a signed value's new TTL needs a new signature.
        #expect(try await net.nodes[1].dht.putMeta([k], ttl: .seconds(100), options: Self.as_(k2)).deniedBy == SignerKey(k1.publicKey))
        let unsignedTTL = try await net.nodes[0].dht.putMeta([k], ttl: .seconds(100), options: Self.as_(k1))
        #expect(!unsignedTTL.isSuccess)
        let owner = try await net.nodes[0].dht.putMeta([k], ttl: .seconds(100), signWith: k1, options: Self.as_(k1))
        #expect(owner.isSuccess, "\(String(describing: owner.refusal))")
        for r in try Self.replicas(net, k) {
            let v = try #require(try Self.stored(r, k))
            #expect(v.ttlSeconds == 100)
            #expect(v.verify(at: k))
        }
        // Past the first TTL, the value lives on every replica.
        let start = ContinuousClock.now
        while ContinuousClock.now - start < .seconds(5) { try await Task.sleep(for: .milliseconds(200)) }
        for r in try Self.replicas(net, k) { #expect(try Self.stored(r, k)?.value == Array("data".utf8)) }
        // An unprotected, unsigned value's TTL is anyone's to change (TomP2P's testTTLUpdate).
        let open = Number640(location: Number160(hashing: "open ttl"))
        #expect(try await net.nodes[2].dht.put(open, Array("x".utf8), options: DHTOptions(ttl: .seconds(5))).isSuccess)
        let reopened = try await net.nodes[5].dht.putMeta([open], ttl: .seconds(100))
        #expect(reopened.isSuccess, "\(reopened.statuses.values.map { $0.values.map(\.description) }) \(reopened.failures.values)")
        // (Stored as the TTL counted from the value's stamp: the time left is what was asked.)
        for r in try Self.replicas(net, open) { #expect((95...100).contains(try Self.stored(r, open)?.remainingSeconds ?? 0)) }
        await net.shutdown()
    }

    @Test("removeDomainProtection: a domain that must never be protected stays open even to a signed put asking for it")
    func unprotectableDomain() async throws {
        let open = Number160(hashing: "public")
        let net = try await Testnet.start(peers: 6, routing: .perfect, plugins: { _ in
            builtIns(backend: MemoryStorage(protection: ProtectionPolicy(unprotectableDomains: [open])))
        })
        let (k1, k2) = (Key(), Key())
        let k = Number640(location: Number160(hashing: "board"), domain: open, content: Number160(1))
        #expect(try await net.nodes[0].dht.put(k, Array("a".utf8), options: Self.as_(k1, .domain)).isSuccess)
        for r in try Self.replicas(net, k) { #expect(try Self.memory(r).owner(ofDomain: open, at: k.location) == nil) }
        #expect(try await net.nodes[1].dht.put(k, Array("b".utf8), options: Self.as_(k2)).isSuccess)
        await net.shutdown()
    }
    @Test("ProtectionPolicy .none: only master keys may protect; anyone else's request to protect is stored unprotected")
    func protectionModeNone() throws {
        let store = MemoryStorage(protection: ProtectionPolicy(domains: .none, entries: .none))
        let (k1, k2) = (Key(), Key())
        let (w1, w2) = (SignerKey(k1.publicKey), SignerKey(k2.publicKey))
        let k = Number640(location: Number160(hashing: "mode"), domain: Number160(hashing: "d"), content: Number160(hashing: "c"))
        let v = try StoredValue([1], protectEntry: true).signed(at: k, by: k1)
        _ = try store.execute(.put([k: v], mode: .protectDomain), writer: w1, now: 1)
        #expect(store.owner(ofEntry: k) == nil)
        #expect(store.owner(ofDomain: k.domain, at: k.location) == nil)
        // The content's master key protects its entry; the domain's master key claims its domain.
        let entry = Number640(location: k.location, domain: k.domain, content: w2.id)
        _ = try store.execute(.put([entry: try StoredValue([2], protectEntry: true).signed(at: entry, by: k2)], mode: .overwrite), writer: w2, now: 1)
        #expect(store.owner(ofEntry: entry) == w2)
        let domain = Number640(location: k.location, domain: w2.id)
        _ = try store.execute(.put([domain: StoredValue([3])], mode: .protectDomain), writer: w2, now: 1)
        #expect(store.owner(ofDomain: w2.id, at: k.location) == w2)
        let intruder = Number640(location: k.location, domain: w2.id, content: Number160(9))
        #expect(throws: StorageError.protected(key: intruder, owner: w2, domain: true)) {
            try store.execute(.put([intruder: StoredValue([4])], mode: .overwrite), writer: w1, now: 1)
        }
    }

    @Test("a mass expiry is swept in rounds of a bounded size, from the heap, and every expired value is invisible at once")
    func boundedSweep() throws {
        var limits = MemoryStorage.Limits()
        limits.maxSweptPerRound = 10
        let store = MemoryStorage(limits: limits)
        for i in 0..<25 { _ = try store.execute(.put([key("expiring \(i)"): StoredValue([1], ttlSeconds: 1)], mode: .overwrite), now: 1) }
        _ = try store.execute(.put([key("lasting"): StoredValue([2])], mode: .overwrite), now: 1)
        let later: UInt64 = 3_000_000_000
        guard case .values(let seen, _) = try store.execute(.get(.keys((0..<25).map { key("expiring \($0)") })), now: later) else {
            Issue.record("no values answer")
            return
        }
        #expect(seen.isEmpty)
        #expect([store.sweepExpired(now: later), store.sweepExpired(now: later), store.sweepExpired(now: later), store.sweepExpired(now: later)] == [10, 10, 5, 0])
        #expect(store.entryCount == 1)
    }
}

