import Foundation
import WasmKit
import WasmParser

/// Why a `.wasm` plugin was refused. The node goes on without it (or, on a reload, with the
/// version it had).
public enum WasmPluginError: Error, Equatable, CustomStringConvertible {
    case fileMissing(path: String)
    case unreadable(path: String, reason: String)
    case notAModule(path: String, reason: String)
    /// The module imports something the host does not provide (or with another type).
    case unknownImport(path: String, name: String)
    case missingExport(path: String, name: String, type: String)
    case abiMismatch(path: String, plugin: Int32, host: Int32)
    /// The module declares more memory at start than the limit allows.
    case memoryTooLarge(path: String, bytes: UInt64, limit: Int)
    case instantiation(path: String, reason: String)
    case initFailed(plugin: String, code: Int32, message: String)
    /// A registration named an export that is missing or has the wrong type.
    case badRegistration(plugin: String, reason: String)
    case tooLarge(path: String, bytes: Int, limit: Int)

    public var description: String {
        switch self {
        case .fileMissing(let p): "plugin \(p): no such file"
        case .unreadable(let p, let r): "plugin \(p): cannot read: \(r)"
        case .notAModule(let p, let r): "plugin \(p) is not a WebAssembly module: \(r)"
        case .unknownImport(let p, let n): "plugin \(p) imports \(n), which this host does not provide"
        case .missingExport(let p, let n, let t): "plugin \(p) does not export \(n) \(t)"
        case .abiMismatch(let p, let plugin, let host): "plugin \(p) was built for Wasm plugin ABI version \(plugin), this node speaks version \(host)"
        case .memoryTooLarge(let p, let b, let l): "plugin \(p) declares \(b) bytes of memory at start, over the limit of \(l)"
        case .instantiation(let p, let r): "plugin \(p) cannot be instantiated: \(r)"
        case .initFailed(let n, let code, let m): "plugin \(n) failed to initialise (code \(code)): \(m)"
        case .badRegistration(let n, let r): "plugin \(n): \(r)"
        case .tooLarge(let p, let b, let l): "plugin \(p) is \(b) bytes, over the limit of \(l)"
        }
    }
}

/// A checked module: parsed once, instantiated per node (and again on every reload).
public struct WasmModuleFile: Sendable {
    public let path: String
    public let module: Module
    /// Bytes of the file, and what its memory section declares (pages of 64 KiB).
    public let size: Int
    public let initialMemoryPages: UInt64
    public let maximumMemoryPages: UInt64?
    public let imports: [String]
    public let exports: [String]

    /// Largest file accepted.
    public static let maxFileBytes = 32 << 20

    /// Reads and checks a module against the ABI: it imports only what the host provides, exports
    /// what every plugin must, and declares no more memory than `memoryLimit`.
    public static func read(_ path: String, memoryLimit: Int) throws(WasmPluginError) -> WasmModuleFile {
        guard FileManager.default.fileExists(atPath: path) else { throw .fileMissing(path: path) }
        let bytes: [UInt8]
        do {
            let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
            defer { try? handle.close() }
            let data = try handle.read(upToCount: maxFileBytes + 1) ?? Data()
            bytes = [UInt8](data)
        } catch {
            throw .unreadable(path: path, reason: "\(error)")
        }
        guard bytes.count <= maxFileBytes else { throw .tooLarge(path: path, bytes: bytes.count, limit: maxFileBytes) }
        return try check(bytes, path: path, memoryLimit: memoryLimit)
    }

    static func check(_ bytes: [UInt8], path: String, memoryLimit: Int) throws(WasmPluginError) -> WasmModuleFile {
        // The memory section first, with the plain parser: a module declaring gigabytes is
        // refused before anything is allocated for it.
        var pages: UInt64 = 0
        var maxPages: UInt64?
        do {
            var parser = WasmParser.Parser(bytes: bytes)
            while let payload = try parser.parseNext() {
                switch payload {
                case .memorySection(let memories):
                    for m in memories {
                        pages += m.type.min
                        maxPages = m.type.max
                        guard !m.type.isMemory64, !m.type.shared else { throw WasmPluginError.notAModule(path: path, reason: "64-bit or shared memory is not supported") }
                    }
                case .importSection(let imports):
                    for i in imports {
                        guard case .function = i.descriptor else { throw WasmPluginError.unknownImport(path: path, name: "\(i.module).\(i.name) (not a function)") }
                    }
                case .codeSection:
                    // Everything that sizes the module comes before the code.
                    break
                default: continue
                }
            }
        } catch let e as WasmPluginError {
            throw e
        } catch {
            throw .notAModule(path: path, reason: "\(error)")
        }
        let declared = pages.multipliedReportingOverflow(by: 65_536)
        guard !declared.overflow, declared.partialValue <= UInt64(memoryLimit) else {
            throw .memoryTooLarge(path: path, bytes: declared.overflow ? .max : declared.partialValue, limit: memoryLimit)
        }
        let module: Module
        do {
            module = try parseWasm(bytes: bytes)
        } catch {
            throw .notAModule(path: path, reason: "\(error)")
        }
        // Names here; the types are checked when the module is instantiated against the host's.
        for i in module.imports {
            guard i.module == WasmABI.importModule, WasmABI.imports[i.name] != nil, case .function = i.descriptor else {
                throw .unknownImport(path: path, name: "\(i.module).\(i.name)")
            }
        }
        let exports = module.exports.map(\.name)
        guard module.exports.contains(where: { if case .memory = $0.descriptor { $0.name == "memory" } else { false } }) else {
            throw .missingExport(path: path, name: "memory", type: "(a memory)")
        }
        for (name, _) in WasmABI.requiredExports where !exports.contains(name) {
            throw .missingExport(path: path, name: name, type: "(a function)")
        }
        return WasmModuleFile(path: path, module: module, size: bytes.count, initialMemoryPages: pages, maximumMemoryPages: maxPages,
                              imports: module.imports.map { "\($0.module).\($0.name)" }, exports: exports)
    }
}
