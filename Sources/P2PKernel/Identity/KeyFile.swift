import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Why a key file could not be read or written.
public enum KeyFileError: Error, Equatable, CustomStringConvertible {
    case notFound(String)
    case unreadable(String, reason: String)
    /// Group or others may read it: a private key must be the owner's alone (as ssh insists).
    case tooOpen(String, mode: UInt32)
    case malformed(String, reason: String)
    /// `keygen` never overwrites a key: losing one loses a peer id for good.
    case exists(String)
    case cannotWrite(String, reason: String)

    public var description: String {
        switch self {
        case .notFound(let p): "key file \(p) does not exist (create one with: p2p keygen \(p))"
        case .unreadable(let p, let r): "cannot read key file \(p): \(r)"
        case .tooOpen(let p, let m): "key file \(p) has permissions 0\(String(m & 0o777, radix: 8)): others can read it; run chmod 600 \(p)"
        case .malformed(let p, let r): "key file \(p) is not a SwiftP2P key: \(r)"
        case .exists(let p): "\(p) already exists; refusing to overwrite a key"
        case .cannotWrite(let p, let r): "cannot write key file \(p): \(r)"
        }
    }
}

/// The key file format: a first line naming it, then the 32-byte Ed25519 private key in hex.
///
/// ```
/// swiftp2p-ed25519-private-key
/// 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
/// ```
extension PeerKeyPair {
    static let fileHeader = "swiftp2p-ed25519-private-key"
    /// Larger files are not key files; reading stops here.
    static let maxFileBytes = 4_096

    /// Reads a key written by `write(toFile:)`.
    public init(contentsOfFile path: String) throws(KeyFileError) {
        var info = stat()
        guard stat(path, &info) == 0 else {
            if errno == ENOENT { throw .notFound(path) }
            throw .unreadable(path, reason: String(cString: strerror(errno)))
        }
        guard info.st_mode & S_IFMT == S_IFREG else { throw .malformed(path, reason: "not a regular file") }
        guard info.st_mode & 0o077 == 0 else { throw .tooOpen(path, mode: UInt32(info.st_mode)) }
        guard Int(info.st_size) <= PeerKeyPair.maxFileBytes else {
            throw .malformed(path, reason: "\(info.st_size) bytes; a key file has about 95")
        }
        guard let handle = FileHandle(forReadingAtPath: path) else { throw .unreadable(path, reason: "permission denied") }
        defer { try? handle.close() }
        let data: Data
        do { data = try handle.read(upToCount: PeerKeyPair.maxFileBytes) ?? Data() } catch {
            throw .unreadable(path, reason: "\(error)")
        }
        guard let text = String(data: data, encoding: .utf8) else { throw .malformed(path, reason: "not UTF-8 text") }
        let lines = text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        guard lines.count == 2, lines[0] == PeerKeyPair.fileHeader else {
            throw .malformed(path, reason: "expected the line '\(PeerKeyPair.fileHeader)' and one line of 64 hex digits")
        }
        let hex = Array(lines[1].utf8)
        guard hex.count == 64 else { throw .malformed(path, reason: "the key has \(hex.count) hex digits, not 64") }
        var raw = [UInt8]()
        raw.reserveCapacity(32)
        for i in stride(from: 0, to: 64, by: 2) {
            guard let hi = PeerKeyPair.nibble(hex[i]), let lo = PeerKeyPair.nibble(hex[i + 1]) else {
                throw .malformed(path, reason: "'\(lines[1])' is not hexadecimal")
            }
            raw.append(hi << 4 | lo)
        }
        do { try self.init(rawPrivateKey: raw) } catch { throw .malformed(path, reason: "\(error)") }
    }

    /// Writes the key to a new file readable by its owner only (mode 0600); an existing file is
    /// never replaced.
    public func write(toFile path: String) throws(KeyFileError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0o600)
        guard fd >= 0 else {
            if errno == EEXIST { throw .exists(path) }
            throw .cannotWrite(path, reason: String(cString: strerror(errno)))
        }
        let hex = Array(privateKey.rawRepresentation).map { b in String(b >> 4, radix: 16) + String(b & 0xF, radix: 16) }.joined()
        let bytes = Array("\(PeerKeyPair.fileHeader)\n\(hex)\n".utf8)
        let handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        do {
            try handle.write(contentsOf: bytes)
            try handle.close()
        } catch {
            unlink(path)
            throw .cannotWrite(path, reason: "\(error)")
        }
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}
