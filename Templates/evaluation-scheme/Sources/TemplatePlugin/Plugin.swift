import P2PPluginSDK

/// An evaluation scheme named "template-plugin.longest": per key, the longest value any peer
/// returned (choose it per request with `DHTOptions(evaluation: "template-plugin.longest")`).
struct Longest: PluginEvaluationScheme {
    let name = "template-plugin.longest"

    func evaluate(_ answers: [PeerAnswer]) -> [Key640: [UInt8]] {
        var best: [Key640: [UInt8]] = [:]
        for answer in answers {
            for (key, value) in answer.entries where value.count > (best[key]?.count ?? -1) {
                best[key] = value
            }
        }
        return best
    }
}

struct Definition: Plugin {
    let name = "template-plugin"
    let version = "0.1.0"
    func register(into registrar: inout Registrar) throws {
        registrar.add(scheme: Longest())
    }
}

/// The entry point the node looks for.
@_cdecl("p2p_plugin_entry")
public func p2pPluginEntry(_ host: UnsafePointer<p2p_host_api>?, _ abi: UInt32) -> UnsafePointer<p2p_plugin_descriptor>? {
    PluginExport.entry(Definition(), host: host, abi: abi)
}
