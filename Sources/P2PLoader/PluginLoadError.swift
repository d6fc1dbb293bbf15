/// Why a `.so` plugin was refused. The node goes on without it.
public enum PluginLoadError: Error, Equatable, CustomStringConvertible {
    case fileMissing(path: String)
    case notASharedObject(path: String, reason: String)
    case noEntrySymbol(path: String)
    case abiMismatch(path: String, plugin: UInt32, host: UInt32)
    case badDescriptor(path: String, reason: String)
    case initFailed(plugin: String, code: Int32, message: String)
    case badManifest(path: String, reason: String)

    public var description: String {
        switch self {
        case .fileMissing(let p): "plugin \(p): no such file"
        case .notASharedObject(let p, let r): "plugin \(p) is not a loadable shared object: \(r)"
        case .noEntrySymbol(let p): "plugin \(p) does not export p2p_plugin_entry (nor has a manifest)"
        case .abiMismatch(let p, let plugin, let host):
            "plugin \(p) was built for plugin ABI version \(plugin), this node speaks version \(host)"
        case .badDescriptor(let p, let r): "plugin \(p) returned a bad descriptor: \(r)"
        case .initFailed(let n, let code, let m): "plugin \(n) failed to initialise (code \(code)): \(m)"
        case .badManifest(let p, let r): "manifest \(p): \(r)"
        }
    }
}
