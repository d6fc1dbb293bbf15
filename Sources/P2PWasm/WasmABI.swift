import P2PKernel
import P2PPluginHost
import WasmKit

/// The WebAssembly plugin ABI, version 1 (docs/PLUGINS.md has the whole of it).
///
/// A plugin is a module that exports `memory`, `p2p_abi_version() -> i32`, `p2p_alloc(i32) -> i32`
/// and `p2p_init() -> i32`, and imports only functions of the module `"p2p"` listed here. Bytes
/// cross the boundary through the plugin's own memory: the host asks `p2p_alloc` for room, writes
/// the input there, calls the handler with pointers and lengths, and takes the result the plugin
/// hands over with `p2p.output`. Nothing the plugin does reaches outside its memory except
/// through these imports.
public enum WasmABI {
    public static let version: Int32 = 1

    /// Result codes, the same as the C ABI's.
    public static let ok = PluginResultCode.ok
    public static let denied = PluginResultCode.denied
    public static let notFound = PluginResultCode.notFound
    public static let badRequest = PluginResultCode.badRequest
    public static let failed = PluginResultCode.failed

    /// The exports every plugin has, with their types.
    static let requiredExports: [(String, FunctionType)] = [
        ("p2p_abi_version", FunctionType(parameters: [], results: [.i32])),
        ("p2p_alloc", FunctionType(parameters: [.i32], results: [.i32])),
        ("p2p_init", FunctionType(parameters: [], results: [.i32])),
    ]
    /// Optional exports.
    static let free = ("p2p_free", FunctionType(parameters: [.i32], results: []))
    static let onReply = ("p2p_on_reply", FunctionType(parameters: [.i32, .i32, .i32, .i32], results: []))

    /// The handler shapes, by what they are registered as.
    static let commandType = FunctionType(parameters: [.i32, .i32, .i32], results: [.i32])
    static let interceptorType = FunctionType(parameters: [.i32, .i32, .i32, .i32, .i32], results: [.i32])
    static let schemeType = FunctionType(parameters: [.i32, .i32], results: [.i32])

    /// Every import the host provides (module "p2p"), with its type.
    static let imports: [String: FunctionType] = [
        "log": FunctionType(parameters: [.i32, .i32, .i32]),
        "describe": FunctionType(parameters: [.i32, .i32, .i32, .i32], results: [.i32]),
        "register_command": FunctionType(parameters: [.i32, .i32, .i32, .i32], results: [.i32]),
        "register_put_interceptor": FunctionType(parameters: [.i32, .i32, .i32], results: [.i32]),
        "register_reply_handler": FunctionType(parameters: [.i32, .i32], results: [.i32]),
        "register_evaluation_scheme": FunctionType(parameters: [.i32, .i32, .i32, .i32], results: [.i32]),
        "output": FunctionType(parameters: [.i32, .i32], results: [.i32]),
        "storage_get": FunctionType(parameters: [.i32, .i32, .i32], results: [.i32]),
        "storage_put": FunctionType(parameters: [.i32, .i32, .i32, .i32], results: [.i32]),
        "send_direct": FunctionType(parameters: [.i32, .i32, .i32, .i32, .i32], results: [.i32]),
        "routed_send": FunctionType(parameters: [.i32, .i32, .i32, .i32], results: [.i32]),
    ]
    static let importModule = "p2p"
}

/// The bounds of one WebAssembly plugin instance. Every call gets a fresh fuel budget; the
/// memory limit holds for the instance's whole life.
public struct WasmLimits: Sendable, Equatable {
    /// Fuel for one call: about one unit per WebAssembly operator. Used up → `outOfFuel`.
    public var fuelPerCall: UInt64
    /// Fuel for `p2p_init` (and the start function).
    public var fuelForInit: UInt64
    /// Largest linear memory (initial or grown); asking for more stops the call with `memoryLimit`
    /// (a module that declares more at its start is refused at load).
    public var memoryBytes: Int
    /// Sizes, calls in flight and the deadline of every handler (as for native plugins).
    public var calls: PluginCallLimits
    /// Sends a plugin may start in one call, and have waiting for replies at once.
    public var sendsPerCall: Int
    public var sendsInFlight: Int
    /// How often the file is checked for a new version (nil: only `reload()` or a signal).
    public var watchInterval: Duration?

    public init(fuelPerCall: UInt64 = 5_000_000, fuelForInit: UInt64 = 50_000_000, memoryBytes: Int = 16 << 20,
                calls: PluginCallLimits = .default, sendsPerCall: Int = 8, sendsInFlight: Int = 64,
                watchInterval: Duration? = .seconds(1)) {
        self.fuelPerCall = fuelPerCall
        self.fuelForInit = fuelForInit
        self.memoryBytes = memoryBytes
        self.calls = calls
        self.sendsPerCall = sendsPerCall
        self.sendsInFlight = sendsInFlight
        self.watchInterval = watchInterval
    }
}
