import ArgumentParser
import Foundation
import P2PKernel
import P2PLoader

struct PluginCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plugin",
        abstract: "Inspect loadable plugins.",
        subcommands: [InspectCommand.self]
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
        say("abi version:   \(plugin.abiVersion) (this host: \(PluginLoader.abiVersion))")
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
    }
}
