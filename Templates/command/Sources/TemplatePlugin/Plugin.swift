import P2PPluginSDK

/// A command other peers call by name ("template-plugin.reverse"): it answers with the request's
/// text reversed, and says which peer asked. Route it with `node.dht.send(to:command:_:)`.
struct Reverse: PluginCommand {
    let name = "template-plugin.reverse"

    func handle(_ request: [UInt8], from sender: Key160) throws -> [UInt8] {
        guard !request.isEmpty else { throw PluginFailure(.badRequest, "send some text to reverse") }
        return Array(String(String(decoding: request, as: UTF8.self).reversed()).utf8)
    }
}

struct Definition: Plugin {
    let name = "template-plugin"
    let version = "0.1.0"
    func register(into registrar: inout Registrar) throws {
        registrar.add(command: Reverse())
    }
}

/// The entry point the node looks for.
@_cdecl("p2p_plugin_entry")
public func p2pPluginEntry(_ host: UnsafePointer<p2p_host_api>?, _ abi: UInt32) -> UnsafePointer<p2p_plugin_descriptor>? {
    PluginExport.entry(Definition(), host: host, abi: abi)
}
