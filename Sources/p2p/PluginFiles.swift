import Foundation
import P2PKernel
import P2PLoader
import P2PWasm

/// A plugin file given on the command line: a `.wasm` module or a `.so` (with its manifest).
enum PluginFile {
    static func isWasm(_ path: String) -> Bool { path.hasSuffix(".wasm") }

    /// Loads one plugin file, by its kind.
    static func load(_ path: String) throws -> any Plugin {
        if isWasm(path) { return try WasmPlugin.load(path) }
        return try PluginLoader.load(path)
    }

    /// One line about a loaded plugin, for the node's output.
    static func summary(_ plugin: any Plugin) -> String {
        switch plugin {
        case let w as WasmPlugin:
            "\(w.name) \(w.version) (WebAssembly, ABI \(WasmABI.version), \(w.limits.fuelPerCall) fuel per call, \(w.limits.memoryBytes >> 20) MiB memory)"
        case let l as LoadedPlugin:
            "\(l.name) \(l.version) (\(l.abiVersion.map { "ABI \($0)" } ?? "manifest only"), \(l.functions.count) C functions)"
        default:
            "\(plugin.name) \(plugin.version)"
        }
    }
}

/// Where clang, wasm-ld and swiftc are: beside the `swift` that runs (resolving links), else on PATH.
enum WasmToolchain {
    static func find(_ tool: String) throws -> String {
        let env = ProcessInfo.processInfo.environment
        var dirs: [String] = []
        if let toolchain = env["P2P_TOOLCHAIN_BIN"], !toolchain.isEmpty { dirs.append(toolchain) }
        let path = (env["PATH"] ?? "").split(separator: ":").map(String.init)
        for dir in path where FileManager.default.isExecutableFile(atPath: dir + "/swift") {
            let resolved = URL(fileURLWithPath: dir + "/swift").resolvingSymlinksInPath().deletingLastPathComponent().path
            dirs.append(resolved)
        }
        dirs += path
        for dir in dirs where FileManager.default.isExecutableFile(atPath: dir + "/" + tool) {
            return dir + "/" + tool
        }
        throw CLIError.failed("cannot find \(tool) (it comes with the Swift toolchain; set P2P_TOOLCHAIN_BIN to its bin folder)")
    }
}

/// `wasm-plugin.json`: what `p2p plugin build` needs to build a `.wasm` plugin.
struct WasmBuildManifest: Decodable {
    var name: String
    /// "c" or "swift".
    var language: String
    var sources: [String]

    static let file = "wasm-plugin.json"

    /// Builds the module into DIR/NAME.wasm and returns its path.
    func build(in dir: URL) throws -> String {
        guard name.range(of: "^[a-z][a-z0-9-]{0,63}$", options: .regularExpression) != nil else {
            throw CLIError.usage("\(Self.file): '\(name)' is not a plugin name")
        }
        let sources = try self.sources.map { s -> String in
            guard !s.hasPrefix("/"), !s.split(separator: "/").contains("..") else { throw CLIError.usage("\(Self.file): source \(s) must be inside the plugin's folder") }
            let path = dir.appendingPathComponent(s).path
            guard FileManager.default.fileExists(atPath: path) else { throw CLIError.usage("\(Self.file): no source \(s)") }
            return path
        }
        let output = dir.appendingPathComponent("\(name).wasm").path
        // The guest side of the ABI: the plugin's own copy (what `p2p plugin new` gives it), else
        // the checkout's templates.
        let fm = FileManager.default
        let templates = (try? sourceRoot())?.appendingPathComponent("Templates")
        let header = fm.fileExists(atPath: dir.appendingPathComponent("p2p_wasm.h").path) ? dir.appendingPathComponent("p2p_wasm.h").path
            : templates?.appendingPathComponent("wasm-c/p2p_wasm.h").path
        guard let header, fm.fileExists(atPath: header) else { throw CLIError.failed("no p2p_wasm.h in \(dir.path) nor in the SwiftP2P templates") }
        let headerDir = URL(fileURLWithPath: header).deletingLastPathComponent().path
        switch language {
        case "c":
            try run(try WasmToolchain.find("clang"), ["--target=wasm32", "-O2", "-nostdlib", "-ffreestanding", "-Wall",
                                                       "-I", dir.path, "-I", headerDir, "-Wl,--no-entry", "-Wl,--strip-debug", "-o", output] + sources)
        case "swift":
            let object = dir.appendingPathComponent(".build-wasm").path
            try FileManager.default.createDirectory(atPath: object, withIntermediateDirectories: true)
            let o = object + "/\(name).o"
            var sources = sources
            if !sources.contains(where: { $0.hasSuffix("/P2PGuest.swift") }) {
                guard let guest = templates?.appendingPathComponent("wasm-swift/Sources/P2PGuest.swift").path, fm.fileExists(atPath: guest) else {
                    throw CLIError.failed("no P2PGuest.swift among the sources nor in the SwiftP2P templates")
                }
                sources.append(guest)
            }
            try run(try WasmToolchain.find("swiftc"), ["-target", "wasm32-unknown-none-wasm", "-enable-experimental-feature", "Embedded",
                                                        "-enable-experimental-feature", "Extern", "-enable-experimental-feature", "BuiltinModule",
                                                        "-wmo", "-Osize", "-parse-as-library", "-Xfrontend", "-disable-stack-protector",
                                                        // The host's imports, with the C convention, from the C header.
                                                        "-import-objc-header", header, "-Xcc", "-DP2P_WASM_NO_RUNTIME",
                                                        "-module-name", name.replacingOccurrences(of: "-", with: "_"), "-c", "-o", o] + sources)
            try run(try WasmToolchain.find("wasm-ld"), ["--no-entry", "--strip-debug", o, "-o", output])
        default:
            throw CLIError.usage("\(Self.file): language must be c or swift, not '\(language)'")
        }
        return output
    }

    private func run(_ tool: String, _ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = args
        p.standardOutput = FileHandle.standardError
        p.standardError = FileHandle.standardError
        do { try p.run() } catch { throw CLIError.failed("cannot run \(tool): \(error)") }
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw CLIError.failed("\(URL(fileURLWithPath: tool).lastPathComponent) failed with status \(p.terminationStatus)") }
    }
}
