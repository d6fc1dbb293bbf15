import NIOConcurrencyHelpers
import NIOCore
import P2PKernel

extension Node {
    /// The tracker operations of this node (requires `TrackerPlugin`).
    public var tracker: Tracker { Tracker(node: self) }
}

/// What an add did: which trackers list this node now, which refused, which did not answer, and
/// the other peers they listed (up to 35 each, less those in the known-peers filter).
public struct TrackerAddResult: Sendable {
    public let accepted: [PeerAddress]
    public let denied: [Number160: String]
    public let failed: [Number160: String]
    public let peers: [TrackerPeer]
}

/// What a get found: the peers listed (with attachments), the trackers that answered, and a
/// known-peers filter holding the asker's filter and every peer returned, for the next get.
public struct TrackerGetResult: Sendable {
    public let peers: [TrackerPeer]
    public let trackers: [PeerAddress]
    /// The most live entries one answering tracker said it holds for the key.
    public let listed: Int
    public let known: KnownPeersFilter
}

/// The tracker operations, routed to the peers closest to a key.
public struct Tracker: Sendable {
    public let node: Node

    private func service() throws(TrackerError) -> TrackerService {
        guard let plugin = node.registry.plugin(TrackerPlugin.self) else { throw .pluginNotInstalled }
        return plugin.service
    }

    private func routing(_ config: TrackerConfig, extra: Int) -> RoutingConfig {
        var routing = node.config.routing
        routing.resultSize = config.replicas + extra
        // One tracker per /24 (/48): a Sybil subnet cannot hold a key's whole list.
        routing.maxPerIPGroup = 1
        return routing
    }

    /// Lists this node under `key` on the `replicas` closest peers (this node among them when it
    /// is that close); a tracker that does not answer is replaced by the next closest. Throws when
    /// no tracker took the entry.
    @discardableResult
    public func add(_ key: Number160, attachment: [UInt8] = [], known: KnownPeersFilter? = nil) async throws -> TrackerAddResult {
        let service = try service()
        let config = service.config
        guard attachment.count <= config.maxAttachmentBytes else {
            throw TrackerError.badRequest("an attachment of \(attachment.count) bytes, over \(config.maxAttachmentBytes)")
        }
        let node = self.node
        let result = try await node.lookup(key, config: routing(config, extra: 5)).get()
        var candidates = result.peers.filter { $0.id != node.peerID }
        let me = node.address
        candidates.insert(me, at: candidates.firstIndex { key.isCloser(me.id, than: $0.id) } ?? candidates.count)
        let payload: [Payload] = [.keys([key]), .bytes(attachment), .bytes(known?.encoded ?? [])]

        var accepted: [PeerAddress] = []
        var denied: [Number160: String] = [:]
        var failed: [Number160: String] = [:]
        var learned: [Number160: TrackerPeer] = [:]
        var next = 0
        var wanted = config.replicas
        while wanted > 0, next < candidates.count, !Task.isCancelled {
            let wave = Array(candidates[next..<min(candidates.count, next + wanted)])
            next += wave.count
            wanted = 0
            let outcomes = await withTaskGroup(of: (PeerAddress, Result<[TrackerPeer], TrackerError>?, String?).self) { group in
                for peer in wave {
                    group.addTask {
                        if peer.id == node.peerID {
                            guard me.isContactable else { return (peer, .failure(.denied("this node is not reachable by others")), nil) }
                            if case .denied(let why) = service.store.add(key: key, peer: me, attachment: attachment, firstHand: true) {
                                return (peer, .failure(.denied(why)), nil)
                            }
                            return (peer, .success([]), nil)
                        }
                        do {
                            let reply = try await node.request(to: peer, command: TrackerAddCommand.id, payload: payload).get()
                            if reply.type == .denied { return (peer, .failure(.denied(Self.reason(reply))), nil) }
                            if let error = RPCError.from(reply: reply) { return (peer, nil, "\(error)") }
                            let entries = try TrackerCodec.decode(reply.payload, maxPeers: config.maxPeersPerMessage, maxAttachment: config.maxAttachmentBytes)
                            return (peer, .success(entries.map(\.0)), nil)
                        } catch {
                            return (peer, nil, "\(error)")
                        }
                    }
                }
                var all: [(PeerAddress, Result<[TrackerPeer], TrackerError>?, String?)] = []
                for await o in group { all.append(o) }
                return all
            }
            for (peer, outcome, failure) in outcomes {
                switch outcome {
                case .success(let peers)?:
                    accepted.append(peer)
                    for p in peers where p.id != node.peerID { learned[p.id] = p }
                case .failure(let error)?:
                    if case .denied(let why) = error { denied[peer.id] = why } else { denied[peer.id] = error.description }
                case nil:
                    failed[peer.id] = failure ?? "no answer"
                    wanted += 1
                }
            }
        }
        guard !accepted.isEmpty else {
            throw TrackerError.noTrackerAccepted(denied.map { "\($0.key): \($0.value)" } + failed.map { "\($0.key): \($0.value)" })
        }
        return TrackerAddResult(accepted: accepted, denied: denied, failed: failed, peers: Array(learned.values))
    }

    /// Lists this node under `key` now and again every `every` (0.75 × TTL by default) until the
    /// announcement is stopped or the node shuts down. Throws when the first add fails.
    public func announce(_ key: Number160, attachment: [UInt8] = [], every: Duration? = nil) async throws -> TrackerAnnouncement {
        let service = try service()
        let first = try await add(key, attachment: attachment)
        let announcement = TrackerAnnouncement(key: key, first: first)
        guard service.register(announcement) else { throw TrackerError.denied("the node is shutting down") }
        announcement.run(tracker: self, attachment: attachment, every: every ?? service.config.ttl * 3 / 4, service: service)
        return announcement
    }

    /// The peers listed under `key`: a lookup asks every peer on the way how many entries it
    /// holds, then `trackersPerGet` of those that hold some (closest first) are asked for their
    /// lists; peers in `known` are left out by the trackers themselves.
    public func get(_ key: Number160, known: KnownPeersFilter? = nil) async throws -> TrackerGetResult {
        let service = try service()
        let config = service.config
        let node = self.node
        var seen = known ?? KnownPeersFilter()
        var peers: [Number160: TrackerPeer] = [:]
        var trackers: [PeerAddress] = []
        var listed = 0
        var asked = 0

        let local = service.store.list(key: key, known: known, limit: config.maxPeersPerMessage)
        if local.total > 0 {
            trackers.append(node.address)
            listed = local.total
            asked = 1
            for p in local.peers { peers[p.id] = p }
        }
        // The lookup converges (no early stop on hits): only trackers among the key's closest
        // are asked, so peers on the path claiming entries cannot capture the answer.
        let question = RoutingQuestion(handlerName: TrackerDigestQuestion.handlerName, payload: [], isHit: TrackerDigestQuestion.isHit)
        let result = try await node.lookup(key, config: routing(config, extra: 0), question: question, initialHits: asked).get()
        let closest = Set(result.peers.map(\.id))
        let hits = result.answers.filter { $0.isHit && $0.peer.id != node.peerID && closest.contains($0.peer.id) }.map(\.peer).sorted { key.isCloser($0.id, than: $1.id) }
        let payload: [Payload] = [.keys([key]), .bytes(known?.encoded ?? [])]
        var next = 0
        while asked < config.trackersPerGet, next < hits.count {
            let wave = Array(hits[next..<min(hits.count, next + config.trackersPerGet - asked)])
            next += wave.count
            let answers = await withTaskGroup(of: (PeerAddress, [TrackerPeer], Int)?.self) { group in
                for peer in wave {
                    group.addTask {
                        guard let reply = try? await node.request(to: peer, command: TrackerGetCommand.id, payload: payload).get(),
                              reply.type == .ok,
                              let entries = try? TrackerCodec.decode(reply.payload, maxPeers: config.maxPeersPerMessage, maxAttachment: config.maxAttachmentBytes)
                        else { return nil }
                        let valid = entries.map(\.0).filter { $0.peer.socket.isValidPeerRecord && $0.peer.isContactable }
                        return (peer, valid, min(config.maxEntriesPerKey, Int(clamping: reply.firstInteger ?? 0)))
                    }
                }
                var all: [(PeerAddress, [TrackerPeer], Int)] = []
                for await a in group { if let a { all.append(a) } }
                return all
            }
            for (peer, list, total) in answers {
                asked += 1
                trackers.append(peer)
                listed = max(listed, total)
                for p in list where peers[p.id] == nil { peers[p.id] = p }
            }
        }
        for id in peers.keys { seen.insert(id) }
        return TrackerGetResult(peers: peers.values.sorted { $0.id < $1.id }, trackers: trackers, listed: listed, known: seen)
    }

    static func reason(_ reply: Message) -> String {
        reply.firstBytes.map { String(decoding: $0, as: UTF8.self) } ?? "\(reply.type)"
    }
}

/// A running announcement: re-adds its key until stopped (or its node stops).
public final class TrackerAnnouncement: Sendable {
    public let key: Number160
    private struct State {
        var task: Task<Void, Never>?
        var refreshes = 0
        var failures = 0
        var last: TrackerAddResult
        var lastError: String?
        var stopped = false
    }
    private let state: NIOLockedValueBox<State>

    init(key: Number160, first: TrackerAddResult) {
        self.key = key
        state = NIOLockedValueBox(State(last: first))
    }

    /// Re-adds made so far (the first add not counted), and those that failed.
    public var refreshes: Int { state.withLockedValue { $0.refreshes } }
    public var failures: Int { state.withLockedValue { $0.failures } }
    /// The last add that succeeded, and the last error since then.
    public var last: TrackerAddResult { state.withLockedValue { $0.last } }
    public var lastError: String? { state.withLockedValue { $0.lastError } }

    func run(tracker: Tracker, attachment: [UInt8], every: Duration, service: TrackerService) {
        let key = self.key
        let every = max(.seconds(1), every)
        let node = tracker.node
        let task = node.spawn { [self] in
            while !Task.isCancelled {
                do { try await node.clock.sleep(for: every) } catch { break }
                do {
                    let result = try await tracker.add(key, attachment: attachment)
                    state.withLockedValue { s in s.refreshes += 1; s.last = result; s.lastError = nil }
                } catch {
                    state.withLockedValue { s in s.failures += 1; s.lastError = "\(error)" }
                }
            }
            service.unregister(self)
        }
        let stopped = state.withLockedValue { s in
            if !s.stopped { s.task = task }
            return s.stopped
        }
        if stopped { task.cancel() }
    }

    /// Stops refreshing (the entries then expire by their TTL).
    public func stop() async {
        let task = state.withLockedValue { s in defer { s.task = nil; s.stopped = true }; return s.task }
        task?.cancel()
        await task?.value
    }
}
