#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOConcurrencyHelpers
import P2PKernel
import P2PPluginHost
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
    /// The bounds of every command and callback of this plugin.
    public let limits: PluginCallLimits
    private let claimed = NIOLockedValueBox(false)
    private let descriptor: UnsafePointer<p2p_plugin_descriptor>?
    private let context: HostContext
    private let table: UnsafeMutablePointer<p2p_host_api>

    init(path: String, descriptor: UnsafePointer<p2p_plugin_descriptor>?, name: String, version: String,
         functions: [FFIFunction], limits: PluginCallLimits, context: HostContext, table: UnsafeMutablePointer<p2p_host_api>) {
        self.path = path
        self.limits = limits
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
        // Its image and globals belong to one node: a second node loads the file again.
        guard claimed.withLockedValue({ c in defer { c = true }; return !c }) else {
            throw PluginError.installFailed(plugin: name, reason: "this loaded plugin is installed in another registry already; load the file once per node")
        }
        for f in functions { try registry.register(command: FFICommand(function: f, limits: limits, executor: context.executor)) }
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

    /// Opens a private copy of a shared object with `RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE`, calls
    /// its entry, and checks the ABI version before any of the plugin's own code runs.
    ///
    /// Every load maps its own copy of the file (copied, opened, then unlinked): the plugin's
    /// globals belong to one node, so two nodes of one process that load the same `.so` keep
    /// separate state, and stopping one (its `shutdown`) leaves the other's plugin running.
    /// `limits` bound every command and callback it registers (a manifest's `limits` win for
    /// its functions); its C code runs on `executor`.
    public static func load(_ path: String, limits: PluginCallLimits = .default, executor: PluginExecutor = .shared) throws(PluginLoadError) -> LoadedPlugin {
        guard access(path, F_OK) == 0 else { throw .fileMissing(path: path) }
        let manifestPath = ManifestReader.path(for: path)
        let manifest = access(manifestPath, F_OK) == 0 ? try ManifestReader.read(manifestPath) : nil
        let copy = try privateCopy(of: path)
        defer { unlink(copy) }
        guard let handle = dlopen(copy, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE) else {
            let reason = dlerror().map { String(cString: $0) } ?? "unknown dlopen error"
            throw .notASharedObject(path: path, reason: reason.replacingOccurrences(of: copy, with: path))
        }
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
        let context = HostContext(pluginName: path, limits: limits, executor: executor)
        let table = HostAPI.table(for: context)
        guard let symbol = dlsym(handle, P2P_PLUGIN_ENTRY_SYMBOL) else {
            // A plain C library: its manifest is all there is.
            guard let manifest else { throw .noEntrySymbol(path: path) }
            context.displayName = manifest.name
            return LoadedPlugin(path: path, descriptor: nil, name: manifest.name, version: manifest.version,
                                functions: functions, limits: manifest.limits, context: context, table: table)
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
        return LoadedPlugin(path: path, descriptor: descriptor, name: name, version: version,
                            functions: functions, limits: manifest?.limits ?? limits, context: context, table: table)
    }

    /// Copies the file into a fresh private file (mode 0700, in `TMPDIR` or /tmp) and returns its path.
    private static func privateCopy(of path: String) throws(PluginLoadError) -> String {
        let dir = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        var template = Array("\(dir)/swiftp2p-plugin-XXXXXX.so".utf8CString)
        let out = template.withUnsafeMutableBufferPointer { buffer -> Int32 in
            guard let base = buffer.baseAddress else { return -1 }
            return mkstemps(base, 3)
        }
        guard out >= 0 else { throw .notASharedObject(path: path, reason: "cannot make a private copy in \(dir): \(String(cString: strerror(errno)))") }
        let copyPath = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let input = open(path, O_RDONLY)
        defer { close(out) }
        guard input >= 0 else {
            unlink(copyPath)
            throw .notASharedObject(path: path, reason: "cannot read: \(String(cString: strerror(errno)))")
        }
        defer { close(input) }
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
            if n == 0 { break }
            guard n > 0 else {
                unlink(copyPath)
                throw .notASharedObject(path: path, reason: "cannot read: \(String(cString: strerror(errno)))")
            }
            var written = 0
            while written < n {
                let w = buffer.withUnsafeBytes { write(out, $0.baseAddress.map { $0 + written }, n - written) }
                guard w > 0 else {
                    unlink(copyPath)
                    throw .notASharedObject(path: path, reason: "cannot copy: \(String(cString: strerror(errno)))")
                }
                written += w
            }
        }
        return copyPath
    }
}
