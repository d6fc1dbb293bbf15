import ArgumentParser
import Foundation
import NIOCore
import P2PDHT
import P2PKernel
import P2PLoader
import P2PPeerVote
import P2PStorage
import P2PTesting
import P2PWasm

/// What one plugin call costs, by kind of plugin: PeerVote compiled in, as a `.so` and as `.wasm`
/// (C and Embedded Swift), each with the same put interceptor and the same `peervote.check` command.
struct PluginBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plugins",
        abstract: "Per-call cost of a put interceptor and a command: compiled in, .so and .wasm (PeerVote in each form); fuel, memory and reload time of the .wasm ones."
    )

    @Option(help: "The .so form (built with p2p plugin build Plugins/PeerVoteLoadable).")
    var so: String = "Plugins/PeerVoteLoadable/.build/release/libPeerVoteLoadable.so"

    @Option(help: "The .wasm forms (built with p2p plugin build Plugins/PeerVoteWasm, Plugins/PeerVoteSwiftWasm).")
    var wasm: [String] = ["Plugins/PeerVoteWasm/peervote.wasm", "Plugins/PeerVoteSwiftWasm/peervote-swift.wasm"]

    @Option(help: "Calls per measurement.")
    var calls: Int = 20_000

    @Option(help: "Instances loaded to measure the memory of one.")
    var instances: Int = 100

    @Flag(help: "Print one JSON object.")
    var json = false

    func validate() throws {
        guard calls > 0, calls <= 10_000_000 else { throw ValidationError("--calls must be 1 to 10,000,000") }
        guard instances > 0, instances <= 10_000 else { throw ValidationError("--instances must be 1 to 10,000") }
    }

    struct Row: Encodable {
        var form: String
        var putMicroseconds: Double
        var interceptorMicroseconds: Double
        var commandMicroseconds: Double?
        var fuelPerPut: UInt64?
        var fuelPerCommand: UInt64?
        var linearMemoryBytes: Int?
        var bytesPerInstance: Int?
        var reloadMilliseconds: Double?
    }

    func run() async throws {
        var forms: [(String, () throws -> (any Plugin)?)] = [
            ("none", { nil }),
            ("compiled in", { PeerVotePlugin() }),
            (".so (\(URL(fileURLWithPath: so).lastPathComponent))", { try PluginLoader.load(so) }),
        ]
        for w in wasm { forms.append((".wasm (\(URL(fileURLWithPath: w).lastPathComponent))", { try WasmPlugin.load(w, limits: WasmLimits(watchInterval: nil)) })) }
        var rows: [Row] = []
        var baseline = 0.0
        for (form, make) in forms {
            let plugin: (any Plugin)?
            do { plugin = try make() } catch { throw CLIError.failed("\(form): \(error)") }
            let node = try await Node.builder().host("127.0.0.1").port(0).security(.insecure).plugin(DHTPlugin()).plugins(plugin.map { [$0] } ?? []).start()
            let put = try await measurePuts(node)
            if plugin == nil { baseline = put }
            var row = Row(form: form, putMicroseconds: put, interceptorMicroseconds: max(0, put - baseline))
            let wasmPlugin = plugin as? WasmPlugin
            let fuelAfterPuts = wasmPlugin?.counters
            if plugin != nil { row.commandMicroseconds = try await measureCommand(node) }
            if let w = wasmPlugin, let before = fuelAfterPuts {
                let after = w.counters
                row.fuelPerPut = before.calls > 0 ? before.fuel / UInt64(before.calls) : nil
                row.fuelPerCommand = after.calls > before.calls ? (after.fuel - before.fuel) / UInt64(after.calls - before.calls) : nil
                row.linearMemoryBytes = w.memoryBytes
                row.bytesPerInstance = try perInstance(w.path)
                row.reloadMilliseconds = try reloadTime(w)
            }
            rows.append(row)
            await node.shutdown()
        }
        if json {
            let encoder = JSONEncoder()
            encoder.keyEncodingStrategy = .convertToSnakeCase
            print(String(decoding: try encoder.encode(rows), as: UTF8.self))
            return
        }
        print("one node, \(calls) sequential local puts into the vote domain and \(calls) local peervote.check calls per form")
        for r in rows {
            var line = "\(r.form.padding(toLength: 38, withPad: " ", startingAt: 0)) put \(f(r.putMicroseconds)) µs"
            if r.form != "none" { line += " (interceptor +\(f(r.interceptorMicroseconds)) µs)" }
            if let c = r.commandMicroseconds { line += ", command \(f(c)) µs" }
            print(line)
            if let fp = r.fuelPerPut, let m = r.linearMemoryBytes, let b = r.bytesPerInstance, let rl = r.reloadMilliseconds {
                print("    fuel per interceptor call \(fp), per command \(r.fuelPerCommand.map(String.init) ?? "?"); linear memory \(m / 1024) KiB, \(b / 1024) KiB per instance in all; reload \(f(rl)) ms (median of 20)")
            }
        }
    }

    func f(_ v: Double) -> String { String(format: "%.1f", v) }

    /// µs per sequential local put of "1" into the vote domain (a new key each time).
    func measurePuts(_ node: Node) async throws -> Double {
        var rng = SplitMix64(seed: 7)
        let keys = (0..<calls).map { _ in Number640(location: .random(using: &rng), domain: PeerVotePlugin.domain) }
        let value = StoredValue(Array("1".utf8))
        for k in keys.prefix(min(1000, calls)) { _ = try await node.storage.execute(.put([k: value], mode: .overwrite), sender: nil, node: node) }
        let clock = ContinuousClock()
        let start = clock.now
        for k in keys { _ = try await node.storage.execute(.put([k: value], mode: .overwrite), sender: nil, node: node) }
        return (clock.now - start).milliseconds * 1000 / Double(calls)
    }

    /// µs per local call of peervote.check (dispatch, the plugin's code, the reply).
    func measureCommand(_ node: Node) async throws -> Double {
        let id = CommandID.derive(from: "peervote.check")
        let payload: [Payload] = [.bytes(Array("42".utf8))]
        let first = try await node.handleLocally(command: id, payload: payload).get()
        guard first.type == .ok, first.firstBytes == Array("42".utf8) else { throw CLIError.failed("peervote.check answered \(first.type)") }
        let clock = ContinuousClock()
        let start = clock.now
        for _ in 0..<calls { _ = try await node.handleLocally(command: id, payload: payload).get() }
        return (clock.now - start).milliseconds * 1000 / Double(calls)
    }

    /// Resident bytes one more instance costs (module, store, memory), over `instances` loads.
    func perInstance(_ path: String) throws -> Int {
        // A first batch takes up memory the allocator has free from earlier forms; the second
        // batch is what more instances cost.
        var kept: [WasmPlugin] = []
        for _ in 0..<instances { kept.append(try WasmPlugin.load(path, limits: WasmLimits(watchInterval: nil))) }
        let before = residentMemoryBytes() ?? 0
        for _ in 0..<instances { kept.append(try WasmPlugin.load(path, limits: WasmLimits(watchInterval: nil))) }
        let after = residentMemoryBytes() ?? 0
        withExtendedLifetime(kept) {}
        return max(0, after - before) / instances
    }

    /// Median milliseconds of 20 reloads of the running plugin.
    func reloadTime(_ plugin: WasmPlugin) throws -> Double {
        var times: [Double] = []
        for _ in 0..<20 { times.append(try plugin.reload().took.milliseconds) }
        return times.sorted()[times.count / 2]
    }
}
