import P2PKernel
import P2PPluginABI
#if canImport(Glibc)
import Glibc
#endif

/// A plugin loaded from a shared object through the C ABI; to the node it is a plugin like any
/// other, and its callbacks are ordinary registry conformances.
public final class LoadedPlugin: Plugin, @unchecked Sendable {
    public let name: String
    public let version: String
    /// The file it came from.
    public let path: String
    /// The ABI version the plugin was built against; nil for a plain C library bound only
    /// through its manifest.
    public let abiVersion: UInt32?
    /// Manifest-declared C functions, each installed as a command.
    public let functions: [FFIFunction]
    private let descriptor: UnsafePointer<p2p_plugin_descriptor>?
    private let context: HostContext
    private let table: UnsafeMutablePointer<p2p_host_api>

    init(path: String, descriptor: UnsafePointer<p2p_plugin_descriptor>?, name: String, version: String,
         functions: [FFIFunction], context: HostContext, table: UnsafeMutablePointer<p2p_host_api>) {
        self.path = path
        self.descriptor = descriptor
        self.name = name
        self.version = version
        self.abiVersion = descriptor?.pointee.abi_version
        self.functions = functions
        self.context = context
        self.table = table
    }

    /// Runs the plugin's `initialize`, which registers its callbacks into `registry`.
    public func install(into registry: PluginRegistry) throws {
        for f in functions { try registry.register(command: FFICommand(function: f)) }
        guard let descriptor else { return }
        guard let initialize = descriptor.pointee.initialize else {
            throw PluginLoadError.badDescriptor(path: path, reason: "no initialize function")
        }
        context.registry = registry
        defer { context.registry = nil }
        var error = p2p_bytes(data: nil, len: 0)
        let code = initialize(table, &error)
        let message = String(decoding: take(&error), as: UTF8.self)
        guard code == ABI.ok else {
            // The plugin's own words, and the host's when a registration was refused.
            let parts = [message, context.registrationError ?? ""].filter { !$0.isEmpty }
            throw PluginLoadError.initFailed(plugin: name, code: code, message: parts.isEmpty ? "no reason given" : parts.joined(separator: ": "))
        }
    }

    public func start(node: Node) async throws {
        context.node = node
    }

    public func stop(node: Node) async {
        descriptor?.pointee.shutdown?()
        context.node = nil
    }
}

/// Loads `.so` plugins.
public enum PluginLoader {
    /// The ABI version this host speaks.
    public static let abiVersion = ABI.version

    /// Opens a shared object with `RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE`, calls its entry, and
    /// checks the ABI version before any of the plugin's own code runs.
    public static func load(_ path: String) throws(PluginLoadError) -> LoadedPlugin {
        guard access(path, F_OK) == 0 else { throw .fileMissing(path: path) }
        // dlopen searches the library path for a name without a slash; a plugin is always a file.
        let file = path.contains("/") ? path : "./" + path
        guard let handle = dlopen(file, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE) else {
            throw .notASharedObject(path: path, reason: dlerror().map { String(cString: $0) } ?? "unknown dlopen error")
        }
        let manifestPath = ManifestReader.path(for: path)
        let manifest = access(manifestPath, F_OK) == 0 ? try ManifestReader.read(manifestPath) : nil
        var functions: [FFIFunction] = []
        for declaration in manifest?.functions ?? [] {
            guard let symbol = dlsym(handle, declaration.symbol) else {
                throw .badManifest(path: manifestPath, reason: "\(declaration.command): symbol '\(declaration.symbol)' is not in \(path)")
            }
            do {
                functions.append(try FFIFunction(declaration, function: symbol))
            } catch {
                throw .badManifest(path: manifestPath, reason: "\(error)")
            }
        }
        let context = HostContext(pluginName: path)
        let table = HostAPI.table(for: context)
        guard let symbol = dlsym(handle, P2P_PLUGIN_ENTRY_SYMBOL) else {
            // A plain C library: its manifest is all there is.
            guard let manifest else { throw .noEntrySymbol(path: path) }
            context.displayName = manifest.name
            return LoadedPlugin(path: path, descriptor: nil, name: manifest.name, version: manifest.version,
                                functions: functions, context: context, table: table)
        }
        let entry = unsafeBitCast(symbol, to: p2p_plugin_entry_fn.self)
        guard let descriptor = entry(table, ABI.version) else {
            throw .badDescriptor(path: path, reason: "the entry returned no descriptor")
        }
        guard descriptor.pointee.abi_version == ABI.version else {
            throw .abiMismatch(path: path, plugin: descriptor.pointee.abi_version, host: ABI.version)
        }
        guard let namePointer = descriptor.pointee.name, let name = String(validatingCString: namePointer),
              !name.isEmpty, name.utf8.count <= 128 else {
            throw .badDescriptor(path: path, reason: "the name must be 1 to 128 bytes of UTF-8")
        }
        let version = descriptor.pointee.version.flatMap { String(validatingCString: $0) } ?? "?"
        context.displayName = name
        let loaded = LoadedPlugin(path: path, descriptor: descriptor, name: name, version: version,
                                  functions: functions, context: context, table: table)
        return loaded
    }
}

