#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import P2PKernel

/// A manifest-declared C function as a command: typed arguments in, the typed result out.
/// A request of the single byte 0xFF asks for the signature instead (what `p2p call` uses to
/// parse its arguments).
struct FFICommand: CommandHandler {
    let function: FFIFunction
    var name: String { function.declaration.command }

    static let describeRequest: [UInt8] = [0xFF]

    func handle(_ request: Message, context: CommandContext) -> CommandResult {
        let bytes = request.firstBytes ?? []
        if bytes == Self.describeRequest {
            let signature = (try? JSONEncoder().encode(function.declaration)).map { Array($0) } ?? []
            return .reply(Reply(payload: [.bytes(signature)]))
        }
        do {
            let result = try function.call(try FFIValue.decode(bytes))
            return .reply(Reply(payload: [.bytes(FFIValue.encode([result]))]))
        } catch {
            return .reply(.error(.badRequest, "\(error)"))
        }
    }
}

/// Reads and checks a manifest: every type must be known, every symbol present.
enum ManifestReader {
    /// The manifest path for a shared object: `libNAME.json` beside `libNAME.so`.
    static func path(for library: String) -> String {
        (library.hasSuffix(".so") ? String(library.dropLast(3)) : library) + ".json"
    }

    /// The raw shape, with types as text so that an unknown one gets a clear message.
    private struct Raw: Decodable {
        struct Function: Decodable {
            var command: String
            var symbol: String
            var params: [String]
            var returns: String
            var free_result: Bool?
        }
        var name: String
        var version: String?
        var functions: [Function]
    }

    static func read(_ path: String) throws(PluginLoadError) -> FFIManifest {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch { throw .badManifest(path: path, reason: "cannot read: \(error)") }
        let raw: Raw
        do { raw = try JSONDecoder().decode(Raw.self, from: data) } catch { throw .badManifest(path: path, reason: "not a manifest: \(error)") }
        guard !raw.name.isEmpty else { throw .badManifest(path: path, reason: "empty name") }
        var functions: [FFIDeclaration] = []
        let known = FFIType.allCases.filter { $0 != .void }.map(\.rawValue).joined(separator: ", ")
        for f in raw.functions {
            var params: [FFIType] = []
            for p in f.params {
                guard let t = FFIType(rawValue: p), t != .void else {
                    throw .badManifest(path: path, reason: "\(f.command): unknown parameter type '\(p)' (one of: \(known))")
                }
                params.append(t)
            }
            guard let r = FFIType(rawValue: f.returns) else {
                throw .badManifest(path: path, reason: "\(f.command): unknown return type '\(f.returns)' (one of: \(known), void)")
            }
            functions.append(FFIDeclaration(command: f.command, symbol: f.symbol, params: params, returns: r, freeResult: f.free_result))
        }
        return FFIManifest(name: raw.name, version: raw.version ?? "?", functions: functions)
    }
}
