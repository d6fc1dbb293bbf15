import ArgumentParser
import Foundation
import P2PEvaluation
import P2PKernel
import P2PPluginHost
import P2PLoader
import P2PWasm

struct PluginCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plugin",
        abstract: "Create, build and inspect loadable plugins.",
        subcommands: [NewPluginCommand.self, BuildPluginCommand.self, InspectCommand.self]
    )
}

struct InspectCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Show a plugin's ABI version, name, version and what it registers."
    )

    @Argument(help: "The plugin's .so or .wasm file.")
    var file: String

    func run() async throws {
        if PluginFile.isWasm(file) { return try inspectWasm() }
        let plugin: LoadedPlugin
        do {
            plugin = try PluginLoader.load(file)
        } catch {
            throw CLIError.failed("\(error)")
        }
        // Initialise into a scratch registry to see what the plugin registers.
        let registry = PluginRegistry()
        do {
            try registry.install(plugin)
        } catch {
            throw CLIError.failed("plugin \(plugin.name) failed to initialise: \(error)")
        }
        say("file:          \(file)")
        say("abi version:   \(plugin.abiVersion.map(String.init) ?? "none (a C library bound by its manifest)") (this host: \(PluginLoader.abiVersion))")
        sayRegistered(plugin, in: registry, replyHandler: "raw")
        let functions = plugin.functions.map { f in
            let d = f.declaration
            return "\(d.command) = \(d.symbol)(\(d.params.map(\.rawValue).joined(separator: ", "))) -> \(d.returns.rawValue)"
        }
        say("manifest:      \(functions.isEmpty ? "none" : functions.joined(separator: "; "))")
        say("limits:        \(describe(plugin.limits))")
    }

    /// The plugin's name and version and what it registered into `registry`.
    func sayRegistered(_ plugin: any Plugin, in registry: PluginRegistry, replyHandler: String) {
        say("name:          \(plugin.name)")
        say("version:       \(plugin.version)")
        let commands = registry.commands.names
        say("commands:      \(commands.isEmpty ? "none" : commands.map { "\($0) (0x\(String(CommandID.derive(from: $0), radix: 16)))" }.joined(separator: ", "))")
        let interceptors = registry.interceptors(covering: nil).map { i -> String in
            switch i.scope {
            case .all: "all domains"
            case .domain(let d): "domain \(d)"
            }
        }
        say("interceptors:  \(interceptors.isEmpty ? "none" : interceptors.joined(separator: ", "))")
        say("reply handler: \(registry.rawReplyHandler == nil ? "none" : replyHandler)")
        say("schemes:       \(registry.schemeNames.isEmpty ? "none" : registry.schemeNames.joined(separator: ", "))")
    }

    func describe(_ l: PluginCallLimits) -> String {
        "request ≤ \(l.maxRequestBytes) bytes, result ≤ \(l.maxResultBytes) bytes, \(l.maxInFlight) calls in flight per callback, deadline \(l.deadline)"
    }

    func inspectWasm() throws {
        let limits = WasmLimits(watchInterval: nil)
        let module: WasmModuleFile
        let plugin: WasmPlugin
        do {
            module = try WasmModuleFile.read(file, memoryLimit: limits.memoryBytes)
            plugin = try WasmPlugin.load(file, limits: limits)
        } catch {
            throw CLIError.failed("\(error)")
        }
        let registry = PluginRegistry()
        do { try registry.install(plugin) } catch { throw CLIError.failed("plugin \(plugin.name) failed to install: \(error)") }
        say("file:          \(file) (\(module.size) bytes, WebAssembly)")
        say("abi version:   \(WasmABI.version) (this host: \(WasmABI.version))")
        sayRegistered(plugin, in: registry, replyHandler: "yes")
        say("imports:       \(module.imports.isEmpty ? "none" : module.imports.joined(separator: ", "))")
        say("exports:       \(module.exports.joined(separator: ", "))")
        let max = module.maximumMemoryPages.map { "\($0 * 64) KiB" } ?? "none"
        say("memory:        \(module.initialMemoryPages * 64) KiB at start (declared maximum \(max)), \(plugin.memoryBytes) bytes after init")
        say("limits:        \(limits.fuelPerCall) fuel per call, \(limits.memoryBytes >> 20) MiB memory, \(describe(limits.calls))")
    }
}

/// Where the SwiftP2P sources (and so Templates/ and the SDK) are: `P2P_SOURCE_ROOT`, or the
/// checkout this tool was built from.
func sourceRoot() throws -> URL {
    if let env = ProcessInfo.processInfo.environment["P2P_SOURCE_ROOT"], !env.isEmpty { return URL(fileURLWithPath: env) }
    let built = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    guard FileManager.default.fileExists(atPath: built.appendingPathComponent("Templates").path) else {
        throw CLIError.failed("cannot find the SwiftP2P sources (Templates/); set P2P_SOURCE_ROOT to the checkout")
    }
    return built
}

struct NewPluginCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "new",
        abstract: "Create a plugin from a template: a buildable package (or C sources) in its own folder."
    )

    static let kinds = ["storage-interceptor", "command", "reply-handler", "evaluation-scheme", "c-command", "wasm-c", "wasm-swift"]

    @Argument(help: "The plugin's name: lowercase letters, digits and dashes, starting with a letter.")
    var name: String

    @Option(help: "One of: \(kinds.joined(separator: ", ")).")
    var template: String

    @Option(help: "Where to create it (default: ./NAME); must not exist or be empty.")
    var output: String?

    func validate() throws {
        guard Self.kinds.contains(template) else {
            throw ValidationError("unknown template '\(template)' (one of: \(Self.kinds.joined(separator: ", ")))")
        }
        let ok = name.utf8.count <= 64 && name.first.map { $0.isLetter && $0.isLowercase } == true
            && name.allSatisfy { ($0.isLetter && $0.isLowercase && $0.isASCII) || ($0.isNumber && $0.isASCII) || $0 == "-" }
        guard ok else { throw ValidationError("'\(name)' is not a plugin name: lowercase letters, digits and dashes, starting with a letter") }
    }

    /// `my-vote` → `MyVote` (the Swift module and product name).
    var moduleName: String {
        name.split(separator: "-").map { $0.prefix(1).uppercased() + $0.dropFirst() }.joined()
    }

    func run() async throws {
        let fm = FileManager.default
        let root = try sourceRoot()
        let source = root.appendingPathComponent("Templates").appendingPathComponent(template)
        let target = URL(fileURLWithPath: output ?? name)
        if fm.fileExists(atPath: target.path), !((try? fm.contentsOfDirectory(atPath: target.path)) ?? []).isEmpty {
            throw CLIError.usage("\(target.path) exists and is not empty")
        }
        // The wasm templates' interceptor domain: SHA-1 of the plugin's name, as bytes.
        let domain = Number160(hashing: name).bytes.map { "0x" + String($0, radix: 16) }.joined(separator: ", ")
        let replacements = [("TEMPLATE_DOMAIN_BYTES", domain), ("TemplatePlugin", moduleName), ("template-plugin", name),
                            ("template_plugin", name.replacingOccurrences(of: "-", with: "_"))]
        func rename(_ s: String) -> String { replacements.reduce(s) { $0.replacingOccurrences(of: $1.0, with: $1.1) } }
        try fm.createDirectory(at: target, withIntermediateDirectories: true)
        func copy(_ from: URL, _ to: URL) throws {
            for item in try fm.contentsOfDirectory(atPath: from.path) where item != ".build" && !item.hasPrefix(".build") {
                let src = from.appendingPathComponent(item)
                let dst = to.appendingPathComponent(rename(item))
                if item == "SDK" {
                    // Only the SDK and the ABI header travel with a plugin, as real files.
                    for part in ["P2PPluginABI", "P2PPluginSDK"] {
                        try fm.createDirectory(at: dst, withIntermediateDirectories: true)
                        try fm.copyItem(at: root.appendingPathComponent("Sources").appendingPathComponent(part), to: dst.appendingPathComponent(part))
                    }
                    continue
                }
                var isDir: ObjCBool = false
                fm.fileExists(atPath: src.path, isDirectory: &isDir)
                if isDir.boolValue {
                    try fm.createDirectory(at: dst, withIntermediateDirectories: true)
                    try copy(src, dst)
                } else if let text = try? String(contentsOf: src, encoding: .utf8) {
                    try rename(text).write(to: dst, atomically: true, encoding: .utf8)
                } else {
                    try fm.copyItem(at: src, to: dst)
                }
            }
        }
        do {
            try copy(source, target)
            if template == "wasm-swift" {
                // The imports' declarations are the C template's header.
                let header = root.appendingPathComponent("Templates/wasm-c/p2p_wasm.h")
                try fm.copyItem(at: header, to: target.appendingPathComponent("p2p_wasm.h"))
            }
        } catch {
            throw CLIError.failed("could not create \(target.path): \(error)")
        }
        say("created \(template) plugin '\(name)' in \(target.path)")
        say("next: p2p plugin build \(target.path)")
    }
}

struct BuildPluginCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "build",
        abstract: "Build a plugin and print the path of its .so or .wasm (the last line)."
    )

    @Argument(help: "The plugin's folder (a Swift package, a folder with a Makefile, or one with a wasm-plugin.json).")
    var directory: String

    func run() async throws {
        let dir = URL(fileURLWithPath: directory).standardizedFileURL
        let fm = FileManager.default
        let wasmManifest = dir.appendingPathComponent(WasmBuildManifest.file)
        if fm.fileExists(atPath: wasmManifest.path) {
            let manifest: WasmBuildManifest
            do {
                manifest = try JSONDecoder().decode(WasmBuildManifest.self, from: Data(contentsOf: wasmManifest))
            } catch {
                throw CLIError.usage("\(wasmManifest.path): \(error)")
            }
            say(try manifest.build(in: dir))
            return
        }
        let isSwift = fm.fileExists(atPath: dir.appendingPathComponent("Package.swift").path)
        guard isSwift || fm.fileExists(atPath: dir.appendingPathComponent("Makefile").path) else {
            throw CLIError.usage("\(dir.path) has neither a Package.swift nor a Makefile")
        }
        let (tool, args): (String, [String]) = isSwift
            ? ("swift", ["build", "-c", "release", "--package-path", dir.path])
            : ("make", ["-C", dir.path])
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = [tool] + args
        p.standardOutput = FileHandle.standardError
        p.standardError = FileHandle.standardError
        do { try p.run() } catch { throw CLIError.failed("cannot run \(tool): \(error)") }
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw CLIError.failed("\(tool) failed with status \(p.terminationStatus)") }
        let folder = isSwift ? dir.appendingPathComponent(".build/release") : dir
        let libraries = ((try? fm.contentsOfDirectory(atPath: folder.path)) ?? []).filter { $0.hasPrefix("lib") && $0.hasSuffix(".so") }.sorted()
        guard let library = libraries.first else { throw CLIError.failed("the build produced no lib*.so in \(folder.path)") }
        say(folder.appendingPathComponent(library).path)
    }
}

struct CallCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "call",
        abstract: "Call a manifest-declared C command (typed arguments in, the typed result printed) or a WebAssembly plugin's command (bytes in, bytes out) on a peer."
    )

    @Option(name: .customLong("bootstrap"), help: "The peer to call, HOST:PORT.", transform: parseAddress)
    var peer: PeerSocketAddress

    @Argument(help: "The command, as its manifest names it.")
    var command: String

    @Argument(help: "The arguments, parsed by the command's declared types (bytes as hex); for a WebAssembly plugin's command, the request as text (joined by spaces).")
    var arguments: [String] = []

    @Flag(help: "For a WebAssembly plugin's command: the request is hex, not text.")
    var hex = false

    @OptionGroup var identity: IdentityOptions

    func run() async throws {
        let node = try await startNode(try identity.apply(to: Node.builder().host("0.0.0.0").port(0)))
        do {
            let target = try await node.ping(peer)
            let id = CommandID.derive(from: command)
            // Ask the command for its signature, then parse the arguments by it.
            let described = try await node.request(to: target, command: id, payload: [.bytes([0xFF])]).get()
            if let e = RPCError.from(reply: described) { throw CLIError.failed("\(command): \(e)") }
            guard let signature = try? JSONDecoder().decode(FFIDeclaration.self, from: Data(described.firstBytes ?? [])) else {
                throw CLIError.failed("\(command) is not a manifest-declared C command nor a WebAssembly command on \(peer)")
            }
            if signature.symbol == "wasm" {
                // A WebAssembly plugin's command: bytes in, bytes out.
                let request: [UInt8]
                if hex {
                    guard case .bytes(let b)? = try? FFIValue.parse(arguments.joined(), as: .bytes) else { throw CLIError.usage("--hex: not hex: \(arguments.joined())") }
                    request = b
                } else {
                    request = Array(arguments.joined(separator: " ").utf8)
                }
                let reply = try await node.request(to: target, command: id, payload: [.bytes(request)]).get()
                if let e = RPCError.from(reply: reply) { throw CLIError.failed("\(command): \(e)") }
                let bytes = reply.firstBytes ?? []
                if let text = String(validating: bytes, as: UTF8.self), !text.unicodeScalars.contains(where: { $0.value < 32 && $0 != "\n" && $0 != "\t" }) {
                    say(text)
                } else {
                    say(bytes.map { String(format: "%02x", $0) }.joined() + " (bytes)")
                }
                await node.shutdown()
                return
            }
            guard arguments.count == signature.params.count else {
                throw CLIError.usage("\(command) takes \(signature.params.count) argument(s) (\(signature.params.map(\.rawValue).joined(separator: ", "))), got \(arguments.count)")
            }
            var values: [FFIValue] = []
            for (text, type) in zip(arguments, signature.params) {
                do { values.append(try FFIValue.parse(text, as: type)) } catch { throw CLIError.usage("\(error)") }
            }
            let reply = try await node.request(to: target, command: id, payload: [.bytes(FFIValue.encode(values))]).get()
            if let e = RPCError.from(reply: reply) { throw CLIError.failed("\(command): \(e)") }
            guard let result = try? FFIValue.decode(reply.firstBytes ?? []).first else { throw CLIError.failed("malformed result") }
            say("\(result) (\(result.type.rawValue))")
        } catch {
            await node.shutdown()
            if error is CLIError { throw error }
            throw CLIError.failed("\(error)")
        }
        await node.shutdown()
    }
}
