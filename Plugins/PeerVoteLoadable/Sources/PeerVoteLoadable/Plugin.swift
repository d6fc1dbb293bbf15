import P2PPluginSDK

/// PeerVote as a loadable plugin (built from the storage-interceptor template): in the domain
/// SHA-1("vote") — the built-in PeerVote's domain — a put adds its integer to the stored one.
/// Run a node with `--plugins dht,messaging,evaluation --plugin libPeerVoteLoadable.so` (not
/// together with the built-in peervote, or every vote would count twice).
struct VoteCounter: PluginPutInterceptor {
    /// SHA-1 of the UTF-8 bytes of "vote", as TomP2P's createHash.
    let domain: Key160? = Key160(bytes: [
        0xfd, 0x63, 0xf1, 0xed, 0x32, 0x8d, 0xa3, 0x40, 0x1a, 0x66,
        0x77, 0x0b, 0xeb, 0xa9, 0x58, 0x7e, 0x88, 0x29, 0xe1, 0xe1,
    ])

    func onPut(key: Key640, value: [UInt8], current: [UInt8]?) throws -> [UInt8]? {
        let text = String(decoding: value, as: UTF8.self).trimmingSpaces
        guard let add = Int64(text) else { throw PluginFailure(.badRequest, "a vote must be a decimal integer, got '\(text.prefix(40))'") }
        let before = current.flatMap { Int64(String(decoding: $0, as: UTF8.self).trimmingSpaces) } ?? 0
        let (sum, overflow) = before.addingReportingOverflow(add)
        guard !overflow else { throw PluginFailure(.denied, "the vote count would overflow") }
        return Array(String(sum).utf8)
    }
}

extension String {
    var trimmingSpaces: String {
        var s = Substring(self)
        while s.first?.isWhitespace == true { s = s.dropFirst() }
        while s.last?.isWhitespace == true { s = s.dropLast() }
        return String(s)
    }
}

/// `peervote.check`: a vote, normalised (the same small work in every PeerVote variant, to
/// compare what a call costs each).
struct CheckVote: PluginCommand {
    let name = "peervote.check"
    func handle(_ request: [UInt8], from sender: Key160) throws -> [UInt8] {
        let text = String(decoding: request, as: UTF8.self).trimmingSpaces
        guard let vote = Int64(text) else { throw PluginFailure(.badRequest, "a vote must be a decimal integer") }
        return Array(String(vote).utf8)
    }
}

struct Definition: Plugin {
    let name = "peervote-loadable"
    let version = "1.0.0"
    func register(into registrar: inout Registrar) throws {
        registrar.add(interceptor: VoteCounter())
        registrar.add(command: CheckVote())
    }
}

/// The entry point the node looks for.
@_cdecl("p2p_plugin_entry")
public func p2pPluginEntry(_ host: UnsafePointer<p2p_host_api>?, _ abi: UInt32) -> UnsafePointer<p2p_plugin_descriptor>? {
    PluginExport.entry(Definition(), host: host, abi: abi)
}
