import ArgumentParser
import Foundation
import P2PKernel
import P2PLoader

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

    @Argument(help: "The plugin's .so file.")
    var file: String

    func run() async throws {
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
        say("reply handler: \(registry.rawReplyHandler == nil ? "none" : "raw")")
        say("schemes:       \(registry.schemeNames.isEmpty ? "none" : registry.schemeNames.joined(separator: ", "))")
        let functions = plugin.functions.map { f in
            let d = f.declaration
            return "\(d.command) = \(d.symbol)(\(d.params.map(\.rawValue).joined(separator: ", "))) -> \(d.returns.rawValue)"
        }
        say("manifest:      \(functions.isEmpty ? "none" : functions.joined(separator: "; "))")
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

    static let kinds = ["storage-interceptor", "command", "reply-handler", "evaluation-scheme", "c-command"]

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
        let replacements = [("TemplatePlugin", moduleName), ("template-plugin", name), ("template_plugin", name.replacingOccurrences(of: "-", with: "_"))]
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
        abstract: "Build a plugin in release mode and print the path of its .so (the last line)."
    )

    @Argument(help: "The plugin's folder (a Swift package, or a folder with a Makefile).")
    var directory: String

    func run() async throws {
        let dir = URL(fileURLWithPath: directory).standardizedFileURL
        let fm = FileManager.default
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
        abstract: "Call a manifest-declared C command on a peer: typed arguments in, the typed result printed."
    )

    @Option(name: .customLong("bootstrap"), help: "The peer to call, HOST:PORT.", transform: parseAddress)
    var peer: PeerSocketAddress

    @Argument(help: "The command, as its manifest names it.")
    var command: String

    @Argument(help: "The arguments, parsed by the command's declared types (bytes as hex).")
    var arguments: [String] = []

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
                throw CLIError.failed("\(command) is not a manifest-declared C command on \(peer)")
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
