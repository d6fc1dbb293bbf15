import NIOConcurrencyHelpers
import P2PKernel
import P2PPluginHost
import P2PPluginABI
#if canImport(Glibc)
import Glibc
#endif

/// What the host functions of one loaded plugin reach through the table's opaque `context`:
/// the registry while the plugin initialises, the node once it runs.
final class HostContext: @unchecked Sendable {
    private let path: String
    private var _displayName: String?
    /// The plugin's name once its descriptor is read (its path before).
    var pluginName: String { lock.withLock { _displayName ?? path } }
    var displayName: String? {
        get { lock.withLock { _displayName } }
        set { lock.withLock { _displayName = newValue } }
    }
    private let lock = NIOLock()
    private var _registry: PluginRegistry?
    private var _node: Node?
    /// The first registration error, reported when init fails.
    private var _registrationError: String?

    /// The bounds of every callback the plugin registers.
    let limits: PluginCallLimits
    /// Where its C code runs.
    let executor: PluginExecutor

    init(pluginName: String, limits: PluginCallLimits, executor: PluginExecutor) {
        self.path = pluginName
        self.limits = limits
        self.executor = executor
    }

    /// A callback of this plugin behind the plugin's limits.
    func bounded(_ name: String) -> BoundedCallback {
        BoundedCallback(name: name, limits: limits, executor: executor)
    }

    var registry: PluginRegistry? {
        get { lock.withLock { _registry } }
        set { lock.withLock { _registry = newValue } }
    }
    var node: Node? {
        get { lock.withLock { _node } }
        set { lock.withLock { _node = newValue } }
    }
    var registrationError: String? {
        get { lock.withLock { _registrationError } }
        set { lock.withLock { if _registrationError == nil { _registrationError = newValue } } }
    }

    /// Recovers the context from the table's opaque pointer (kept alive by the loaded plugin).
    static func from(_ pointer: UnsafeMutableRawPointer?) -> HostContext? {
        guard let pointer else { return nil }
        return Unmanaged<HostContext>.fromOpaque(pointer).takeUnretainedValue()
    }
}

// MARK: conversions between the C types and the kernel's

extension p2p_key160 {
    var number: Number160 {
        withUnsafeBytes(of: bytes) { Number160(bytes: $0) } ?? .zero
    }
    init(_ n: Number160) {
        self.init()
        let b = n.bytes
        withUnsafeMutableBytes(of: &bytes) { raw in
            for i in 0..<20 { raw[i] = b[i] }
        }
    }
}

extension p2p_key640 {
    var number: Number640 {
        Number640(location: location.number, domain: domain.number, content: content.number, version: version.number)
    }
    init(_ n: Number640) {
        self.init(location: p2p_key160(n.location), domain: p2p_key160(n.domain), content: p2p_key160(n.content), version: p2p_key160(n.version))
    }
}

/// Calls `body` with a borrowed slice of `bytes`.
func withSlice<R>(_ bytes: [UInt8], _ body: (p2p_slice) throws -> R) rethrows -> R {
    try bytes.withUnsafeBufferPointer { buffer in
        try body(p2p_slice(data: buffer.baseAddress, len: buffer.count))
    }
}

extension p2p_slice {
    var array: [UInt8] {
        guard let data, len > 0 else { return [] }
        return Array(UnsafeBufferPointer(start: data, count: len))
    }
}

/// Takes ownership of bytes a plugin allocated with `host->alloc`: copies and frees them.
func take(_ bytes: inout p2p_bytes) -> [UInt8] {
    defer {
        free(bytes.data)
        bytes = p2p_bytes(data: nil, len: 0)
    }
    guard let data = bytes.data, bytes.len > 0 else { return [] }
    return Array(UnsafeBufferPointer(start: data, count: bytes.len))
}

/// Bytes allocated for the plugin side (freed by whoever the ABI says).
func hostAllocated(_ bytes: [UInt8]) -> p2p_bytes {
    guard !bytes.isEmpty, let p = malloc(bytes.count)?.assumingMemoryBound(to: UInt8.self) else { return p2p_bytes(data: nil, len: 0) }
    bytes.withUnsafeBufferPointer { src in
        if let base = src.baseAddress { p.update(from: base, count: bytes.count) }
    }
    return p2p_bytes(data: p, len: bytes.count)
}

/// The ABI's constants as Swift values.
enum ABI {
    static let version = UInt32(P2P_PLUGIN_ABI_VERSION)
    static let ok = Int32(P2P_OK)
    static let denied = Int32(P2P_ERR_DENIED)
    static let notFound = Int32(P2P_ERR_NOT_FOUND)
    static let badRequest = Int32(P2P_ERR_BAD_REQUEST)
    static let failed = Int32(P2P_ERR_FAILED)
}
