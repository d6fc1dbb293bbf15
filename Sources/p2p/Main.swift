import ArgumentParser
import Foundation
import P2PKernel

/// The `p2p` tool. Argument errors (unknown flag, bad address, N < 1, port in use) print one line
/// and exit with code 2; failures of the work itself exit with code 1.
@main
struct Main {
    static func main() async {
        do {
            var command = try P2P.parseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let error as CLIError {
            FileHandle.standardError.write(Data("p2p: \(error.message)\n".utf8))
            exit(error.code)
        } catch let code as ExitCode {
            exit(code.rawValue)
        } catch {
            let code = P2P.exitCode(for: error)
            if code == .success {
                print(P2P.fullMessage(for: error))
                exit(0)
            }
            let message = P2P.message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
            FileHandle.standardError.write(Data("p2p: \(message)\n".utf8))
            exit(2)
        }
    }
}

/// An error with the exit code it stands for.
struct CLIError: Error {
    let message: String
    let code: Int32
    static func usage(_ m: String) -> CLIError { CLIError(message: m, code: 2) }
    static func failed(_ m: String) -> CLIError { CLIError(message: m, code: 1) }
}

struct P2P: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "p2p",
        abstract: "SwiftP2P: run a peer, talk to peers, or simulate a whole overlay in one process.",
        subcommands: [NodeCommand.self, KeygenCommand.self, IDCommand.self, PingCommand.self, LookupCommand.self, PutCommand.self, GetCommand.self,
                      RemoveCommand.self, SendCommand.self, CallCommand.self, NATCheckCommand.self, TrackerCommand.self, SimCommand.self, BenchCommand.self, PluginCommand.self]
    )
}

/// Parses `HOST:PORT` for argument parsing.
func parseAddress(_ text: String) throws -> PeerSocketAddress {
    try PeerSocketAddress(parsing: text)
}

/// Parses a key: `0x` and 40 hex digits is taken as is, anything else is hashed (SHA-1 of UTF-8).
func parseKey(_ text: String) throws -> Number160 {
    if text.hasPrefix("0x") || text.hasPrefix("0X") {
        guard text.count == 42 else { throw CLIError.usage("a literal key is 0x and 40 hex digits, '\(text)' has \(text.count - 2)") }
        do { return try Number160(hex: text) } catch { throw CLIError.usage("bad key '\(text)': \(error)") }
    }
    return Number160(hashing: text)
}

/// Starts a node, mapping a bind failure to a usage error (exit 2).
func startNode(_ builder: NodeBuilder) async throws -> Node {
    do {
        return try await builder.start()
    } catch let error as NodeStartError {
        throw CLIError.usage("\(error)")
    }
}

/// Prints to standard error (progress and diagnostics, so stdout stays machine-readable).
func note(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
}

/// Prints a line to standard output at once (unbuffered), so logs of long-running nodes show up
/// as events happen even when stdout is a file.
func say(_ text: String) {
    FileHandle.standardOutput.write(Data((text + "\n").utf8))
}
