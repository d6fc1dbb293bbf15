import P2PEvaluation
import P2PKernel
/// The result codes both plugin ABIs share (`P2P_OK` … `P2P_ERR_FAILED` in p2p_plugin.h and
/// p2p_wasm.h), and what they stand for on the wire.
public enum PluginResultCode {
    public static let ok: Int32 = 0
    public static let denied: Int32 = 1
    public static let notFound: Int32 = 2
    public static let badRequest: Int32 = 3
    public static let failed: Int32 = 4

    /// The reply type a plugin's result code stands for.
    public static func replyType(_ code: Int32) -> MessageType {
        switch code {
        case ok: .ok
        case denied: .denied
        case notFound: .notFound
        case badRequest: .badRequest
        default: .exception
        }
    }

    /// The code a plugin is handed for a failed send.
    public static func code(for error: any Error) -> Int32 {
        switch error as? RPCError {
        case .denied?: denied
        case .notFound?, .unknownCommand?: notFound
        case .badRequest?: badRequest
        default: failed
        }
    }
}

/// How both plugin ABIs pass an evaluation scheme its input and take its choice (big-endian):
/// answers `u32 peers, per peer: 20-byte id, u32 entries, per entry: 80-byte key, u32 length,
/// bytes`; the choice `u32 entries, per entry: 80-byte key, u32 length, bytes`.
public enum SchemeEncoding {
    /// What a plugin's scheme returned does not parse.
    public struct Malformed: Error, CustomStringConvertible {
        public let description: String
    }

    public static func encode(_ answers: [PeerAnswer]) -> [UInt8] {
        var out: [UInt8] = []
        put(UInt32(answers.count), &out)
        for a in answers {
            out += a.peer.id.bytes
            put(UInt32(a.entries.count), &out)
            for (k, v) in a.entries.sorted(by: { $0.key < $1.key }) {
                out += k.location.bytes + k.domain.bytes + k.content.bytes + k.version.bytes
                put(UInt32(v.count), &out)
                out += v
            }
        }
        return out
    }

    /// Reads a choice; every count and length is checked against the bytes there are.
    public static func decodeEntries(_ bytes: [UInt8]) throws(Malformed) -> [Number640: [UInt8]] {
        var at = 0
        func u32() throws(Malformed) -> Int {
            guard at + 4 <= bytes.count else { throw Malformed(description: "truncated at byte \(at)") }
            defer { at += 4 }
            return Int(bytes[at]) << 24 | Int(bytes[at + 1]) << 16 | Int(bytes[at + 2]) << 8 | Int(bytes[at + 3])
        }
        func key160() throws(Malformed) -> Number160 {
            guard at + 20 <= bytes.count, let n = Number160(bytes: bytes[at..<at + 20]) else { throw Malformed(description: "truncated key") }
            at += 20
            return n
        }
        let count = try u32()
        guard count <= bytes.count / 84 else { throw Malformed(description: "\(count) entries in \(bytes.count) bytes") }
        var out: [Number640: [UInt8]] = [:]
        for _ in 0..<count {
            let key = Number640(location: try key160(), domain: try key160(), content: try key160(), version: try key160())
            let len = try u32()
            guard at + len <= bytes.count else { throw Malformed(description: "value of \(len) bytes past the end") }
            out[key] = Array(bytes[at..<at + len])
            at += len
        }
        return out
    }

    private static func put(_ v: UInt32, _ out: inout [UInt8]) {
        out += [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)]
    }
}
