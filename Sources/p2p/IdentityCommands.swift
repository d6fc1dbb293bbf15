import ArgumentParser
import Foundation
import P2PKernel

/// How a command's node identifies itself and talks to peers; every command that starts a node
/// takes these.
struct IdentityOptions: ParsableArguments {
    @Option(help: "The node's key file (p2p keygen FILE makes one); without it a fresh key, so a fresh id.")
    var key: String?

    @Flag(help: "Plaintext messages instead of authenticated sessions (for comparison only; such a node and a secure one refuse each other).")
    var insecure = false

    /// Applies the key and mode to a builder; a bad key file is a usage error (exit 2).
    func apply(to builder: NodeBuilder, keyFile: String? = nil, insecure fileInsecure: Bool? = nil) throws -> NodeBuilder {
        var b = builder.security(insecure || fileInsecure == true ? .insecure : .authenticated)
        if let path = key ?? keyFile {
            do { b = b.keyPair(try PeerKeyPair(contentsOfFile: path)) } catch { throw CLIError.usage("\(error)") }
        }
        return b
    }
}

struct KeygenCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keygen",
        abstract: "Write a new Ed25519 key to FILE (mode 0600; never overwrites) and print its peer id."
    )

    @Argument(help: "Where to write the key.")
    var file: String

    func run() throws {
        let pair = PeerKeyPair()
        do { try pair.write(toFile: file) } catch { throw CLIError.usage("\(error)") }
        print(pair.peerID)
    }
}

struct IDCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "id",
        abstract: "Print the peer id of the key in FILE (SHA-1 of its public key)."
    )

    @Argument(help: "A key file written by p2p keygen.")
    var file: String

    func run() throws {
        do { print(try PeerKeyPair(contentsOfFile: file).peerID) } catch { throw CLIError.usage("\(error)") }
    }
}
