/// A type a manifest may declare for a C function's parameter or result.
public enum FFIType: String, Sendable, CaseIterable, Codable {
    case i8, i16, i32, i64, u8, u16, u32, u64, f32, f64, bool, string, bytes, void

    var tag: UInt8 { UInt8(FFIType.allCases.firstIndex(of: self) ?? 0) }
    static func from(tag: UInt8) -> FFIType? { Int(tag) < allCases.count ? allCases[Int(tag)] : nil }
}

/// A typed value of a call: what travels between peers and what the node passes through libffi.
public enum FFIValue: Sendable, Equatable, CustomStringConvertible {
    case int(Int64, FFIType)
    case uint(UInt64, FFIType)
    case float(Float)
    case double(Double)
    case bool(Bool)
    case string(String)
    case bytes([UInt8])
    case void

    public var type: FFIType {
        switch self {
        case .int(_, let t), .uint(_, let t): t
        case .float: .f32
        case .double: .f64
        case .bool: .bool
        case .string: .string
        case .bytes: .bytes
        case .void: .void
        }
    }

    public var description: String {
        switch self {
        case .int(let v, _): "\(v)"
        case .uint(let v, _): "\(v)"
        case .float(let v): "\(v)"
        case .double(let v): "\(v)"
        case .bool(let v): "\(v)"
        case .string(let s): s
        case .bytes(let b): "0x" + b.map { String(format2: $0) }.joined()
        case .void: "(void)"
        }
    }

    /// Parses command-line text as a value of `type` (numbers in range, true/false, text, hex).
    public static func parse(_ text: String, as type: FFIType) throws(FFIError) -> FFIValue {
        func bad() -> FFIError { .badArgument(text: text, type: type) }
        switch type {
        case .i8: guard let v = Int8(text) else { throw bad() }; return .int(Int64(v), type)
        case .i16: guard let v = Int16(text) else { throw bad() }; return .int(Int64(v), type)
        case .i32: guard let v = Int32(text) else { throw bad() }; return .int(Int64(v), type)
        case .i64: guard let v = Int64(text) else { throw bad() }; return .int(v, type)
        case .u8: guard let v = UInt8(text) else { throw bad() }; return .uint(UInt64(v), type)
        case .u16: guard let v = UInt16(text) else { throw bad() }; return .uint(UInt64(v), type)
        case .u32: guard let v = UInt32(text) else { throw bad() }; return .uint(UInt64(v), type)
        case .u64: guard let v = UInt64(text) else { throw bad() }; return .uint(v, type)
        case .f32: guard let v = Float(text) else { throw bad() }; return .float(v)
        case .f64: guard let v = Double(text) else { throw bad() }; return .double(v)
        case .bool:
            switch text { case "true", "1": return .bool(true); case "false", "0": return .bool(false); default: throw bad() }
        case .string: return .string(text)
        case .bytes:
            var hex = Substring(text)
            if hex.hasPrefix("0x") { hex = hex.dropFirst(2) }
            guard hex.count % 2 == 0 else { throw bad() }
            var out: [UInt8] = []
            var i = hex.startIndex
            while i < hex.endIndex {
                let j = hex.index(i, offsetBy: 2)
                guard let b = UInt8(hex[i..<j], radix: 16) else { throw bad() }
                out.append(b)
                i = j
            }
            return .bytes(out)
        case .void: throw bad()
        }
    }

    // MARK: wire encoding: u8 count, then per value: u8 type tag, payload

    /// Encodes values: integers as 8 bytes, f32 as 4, f64 as 8, bool as 1, text and bytes as
    /// u32 length and bytes; all big-endian.
    public static func encode(_ values: [FFIValue]) -> [UInt8] {
        var out: [UInt8] = [UInt8(min(values.count, 255))]
        func be(_ v: UInt64, _ n: Int) { for s in stride(from: (n - 1) * 8, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: v >> UInt64(s))) } }
        for v in values.prefix(255) {
            out.append(v.type.tag)
            switch v {
            case .int(let x, _): be(UInt64(bitPattern: x), 8)
            case .uint(let x, _): be(x, 8)
            case .float(let x): be(UInt64(x.bitPattern), 4)
            case .double(let x): be(x.bitPattern, 8)
            case .bool(let x): out.append(x ? 1 : 0)
            case .string(let s): be(UInt64(s.utf8.count), 4); out += Array(s.utf8)
            case .bytes(let b): be(UInt64(b.count), 4); out += b
            case .void: break
            }
        }
        return out
    }

    /// Decodes what `encode` wrote; every length is checked against the bytes present.
    public static func decode(_ bytes: [UInt8]) throws(FFIError) -> [FFIValue] {
        var at = 0
        func take(_ n: Int) throws(FFIError) -> ArraySlice<UInt8> {
            guard n >= 0, at + n <= bytes.count else { throw .malformed("truncated at byte \(at)") }
            defer { at += n }
            return bytes[at..<at + n]
        }
        func be(_ n: Int) throws(FFIError) -> UInt64 { try take(n).reduce(0) { $0 << 8 | UInt64($1) } }
        let count = Int(try be(1))
        var out: [FFIValue] = []
        for _ in 0..<count {
            let tag = UInt8(try be(1))
            guard let type = FFIType.from(tag: tag) else { throw .malformed("unknown type tag \(tag)") }
            switch type {
            case .i8, .i16, .i32, .i64: out.append(.int(Int64(bitPattern: try be(8)), type))
            case .u8, .u16, .u32, .u64: out.append(.uint(try be(8), type))
            case .f32: out.append(.float(Float(bitPattern: UInt32(try be(4)))))
            case .f64: out.append(.double(Double(bitPattern: try be(8))))
            case .bool: out.append(.bool(try be(1) != 0))
            case .string:
                let n = Int(try be(4))
                guard let s = String(validating: try take(n), as: UTF8.self) else { throw .malformed("string is not UTF-8") }
                out.append(.string(s))
            case .bytes: out.append(.bytes(Array(try take(Int(try be(4))))))
            case .void: out.append(.void)
            }
        }
        guard at == bytes.count else { throw .malformed("\(bytes.count - at) bytes after the last value") }
        return out
    }
}

extension String {
    init(format2 byte: UInt8) {
        let s = String(byte, radix: 16)
        self = s.count == 1 ? "0" + s : s
    }
}

/// Why a manifest-declared call was refused.
public enum FFIError: Error, Equatable, CustomStringConvertible {
    case badArgument(text: String, type: FFIType)
    case malformed(String)
    case argumentCount(command: String, expected: Int, got: Int)
    case argumentType(command: String, index: Int, expected: FFIType, got: FFIType)
    case unsupported(String)

    public var description: String {
        switch self {
        case .badArgument(let t, let type): "'\(t)' is not a valid \(type.rawValue) value"
        case .malformed(let m): "malformed call: \(m)"
        case .argumentCount(let c, let e, let g): "\(c) takes \(e) argument\(e == 1 ? "" : "s"), got \(g)"
        case .argumentType(let c, let i, let e, let g): "argument \(i + 1) of \(c) must be \(e.rawValue), got \(g.rawValue)"
        case .unsupported(let m): m
        }
    }
}
