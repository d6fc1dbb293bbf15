// P2PPluginSDK: write SwiftP2P plugins in Swift against the C ABI (p2p_plugin.h).
//
// The SDK is compiled into each plugin (it depends on nothing but the ABI header), so a plugin
// built with any Swift version loads into any host that speaks the same ABI version. No Swift
// type crosses between plugin and host: only the C types of the header.
//
//     struct Tally: StoragePlugin { … }
//     @_cdecl("p2p_plugin_entry")
//     public func p2pPluginEntry(_ host: UnsafePointer<p2p_host_api>?, _ abi: UInt32) -> UnsafePointer<p2p_plugin_descriptor>? {
//         PluginExport.entry(Tally(), host: host, abi: abi)
//     }

@_exported import P2PPluginABI
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A 160-bit id or key, as 20 big-endian bytes.
public struct Key160: Hashable, Sendable, CustomStringConvertible {
    public var bytes: [UInt8]
    public init(bytes: [UInt8]) { self.bytes = Array((bytes + [UInt8](repeating: 0, count: 20)).prefix(20)) }
    init(_ k: p2p_key160) { bytes = withUnsafeBytes(of: k.bytes) { Array($0) } }
    var c: p2p_key160 {
        var k = p2p_key160()
        withUnsafeMutableBytes(of: &k.bytes) { raw in for i in 0..<20 { raw[i] = bytes[i] } }
        return k
    }
    public var description: String { "0x" + bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined() }
}

/// A storage key: location, domain, content, version.
public struct Key640: Hashable, Sendable {
    public var location, domain, content, version: Key160
    init(_ k: p2p_key640) {
        location = Key160(k.location); domain = Key160(k.domain); content = Key160(k.content); version = Key160(k.version)
    }
    init(bytes: ArraySlice<UInt8>) {
        let b = Array(bytes)
        location = Key160(bytes: Array(b[0..<20])); domain = Key160(bytes: Array(b[20..<40]))
        content = Key160(bytes: Array(b[40..<60])); version = Key160(bytes: Array(b[60..<80]))
    }
    var bytes: [UInt8] { location.bytes + domain.bytes + content.bytes + version.bytes }
}

/// An error a plugin callback returns: the result code and a message for the requesting peer.
public struct PluginFailure: Error {
    public enum Code: Int32, Sendable { case denied = 1, notFound = 2, badRequest = 3, failed = 4 }
    public var code: Code
    public var message: String
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
}

/// A command other peers can call by name.
public protocol PluginCommand: Sendable {
    var name: String { get }
    func handle(_ request: [UInt8], from sender: Key160) throws -> [UInt8]
}

/// Answers direct messages and routed sends.
public protocol PluginReplyHandler: Sendable {
    func reply(to request: [UInt8], from sender: Key160) throws -> [UInt8]
}

/// Sees every value put into its domain (all domains when `domain` is nil) and says what to
/// store: the new value as is (return nil), another value, or a refusal (throw).
public protocol PluginPutInterceptor: Sendable {
    var domain: Key160? { get }
    func onPut(key: Key640, value: [UInt8], current: [UInt8]?) throws -> [UInt8]?
}

/// What one peer answered, for evaluation schemes.
public struct PeerAnswer: Sendable {
    public var peer: Key160
    public var entries: [Key640: [UInt8]]
}

/// Turns several peers' answers into one.
public protocol PluginEvaluationScheme: Sendable {
    var name: String { get }
    func evaluate(_ answers: [PeerAnswer]) -> [Key640: [UInt8]]
}

/// What a plugin registers, collected by `Plugin.register`.
public struct Registrar {
    var commands: [any PluginCommand] = []
    var replyHandler: (any PluginReplyHandler)?
    var interceptors: [any PluginPutInterceptor] = []
    var schemes: [any PluginEvaluationScheme] = []

    public mutating func add(command: any PluginCommand) { commands.append(command) }
    public mutating func set(replyHandler: any PluginReplyHandler) { self.replyHandler = replyHandler }
    public mutating func add(interceptor: any PluginPutInterceptor) { interceptors.append(interceptor) }
    public mutating func add(scheme: any PluginEvaluationScheme) { schemes.append(scheme) }
}

/// A plugin: a name, a version, and what it registers.
public protocol Plugin: Sendable {
    var name: String { get }
    var version: String { get }
    func register(into registrar: inout Registrar) throws
}

/// The host's services for a running plugin.
public enum Host {
    nonisolated(unsafe) static var api: UnsafePointer<p2p_host_api>?

    /// Writes a line to the node's log.
    public static func log(_ message: String, level: Int32 = Int32(P2P_LOG_INFO)) {
        guard let api, let log = api.pointee.log else { return }
        var m = message
        m.withUTF8 { log(api.pointee.context, level, UnsafeRawPointer($0.baseAddress)?.assumingMemoryBound(to: CChar.self), $0.count) }
    }
}
