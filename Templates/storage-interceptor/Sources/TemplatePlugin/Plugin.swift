import P2PPluginSDK

/// Counts votes: in the domain "votes", a put adds its integer to the one stored instead of
/// replacing it. (The domain is the first 20 bytes of the UTF-8 name, zero-padded, so that this
/// template needs no hash function; `p2p put --domain 0x…` reaches it.)
struct VoteCounter: PluginPutInterceptor {
    let domain: Key160? = Key160(bytes: Array("votes".utf8))

    func onPut(key: Key640, value: [UInt8], current: [UInt8]?) throws -> [UInt8]? {
        guard let add = Int(String(decoding: value, as: UTF8.self)) else {
            throw PluginFailure(.badRequest, "a vote must be an integer")
        }
        let before = current.flatMap { Int(String(decoding: $0, as: UTF8.self)) } ?? 0
        // Votes come from the network: a sum past Int.max is refused, never trapped on.
        let (sum, overflow) = before.addingReportingOverflow(add)
        guard !overflow else { throw PluginFailure(.badRequest, "the vote count would overflow") }
        return Array(String(sum).utf8)
    }
}

struct Definition: Plugin {
    let name = "template-plugin"
    let version = "0.1.0"
    func register(into registrar: inout Registrar) throws {
        registrar.add(interceptor: VoteCounter())
    }
}

/// The entry point the node looks for.
@_cdecl("p2p_plugin_entry")
public func p2pPluginEntry(_ host: UnsafePointer<p2p_host_api>?, _ abi: UInt32) -> UnsafePointer<p2p_plugin_descriptor>? {
    PluginExport.entry(Definition(), host: host, abi: abi)
}
