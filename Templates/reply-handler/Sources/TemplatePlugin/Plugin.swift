import P2PPluginSDK

/// Answers direct messages and routed sends: "hello" gets "world", anything else is echoed back
/// in upper case.
struct Greeter: PluginReplyHandler {
    func reply(to request: [UInt8], from sender: Key160) throws -> [UInt8] {
        let text = String(decoding: request, as: UTF8.self)
        return Array((text == "hello" ? "world" : text.uppercased()).utf8)
    }
}

struct Definition: Plugin {
    let name = "template-plugin"
    let version = "0.1.0"
    func register(into registrar: inout Registrar) throws {
        registrar.set(replyHandler: Greeter())
    }
}

/// The entry point the node looks for.
@_cdecl("p2p_plugin_entry")
public func p2pPluginEntry(_ host: UnsafePointer<p2p_host_api>?, _ abi: UInt32) -> UnsafePointer<p2p_plugin_descriptor>? {
    PluginExport.entry(Definition(), host: host, abi: abi)
}
