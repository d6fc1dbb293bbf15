import CFFI
import P2PKernel
import P2PPluginHost
#if canImport(Glibc)
import Glibc
#endif

/// One manifest entry: a plain C function exposed as a command.
public struct FFIDeclaration: Codable, Sendable, Equatable {
    /// The command name peers call.
    public var command: String
    /// The exported C symbol.
    public var symbol: String
    public var params: [FFIType]
    public var returns: FFIType
    /// For `string` results: free the returned pointer with free() after copying it.
    public var freeResult: Bool?

    enum CodingKeys: String, CodingKey {
        case command, symbol, params, returns
        case freeResult = "free_result"
    }
}

/// The JSON manifest beside a `.so` (`libNAME.json` for `libNAME.so`).
public struct FFIManifest: Codable, Sendable {
    public var name: String
    public var version: String
    public var functions: [FFIDeclaration]
    /// The bounds of every function's command (`limits` in the manifest; defaults otherwise).
    public var limits: PluginCallLimits = .default
}

/// A C function with its libffi call interface prepared once, at load.
public final class FFIFunction: @unchecked Sendable {
    public let declaration: FFIDeclaration
    private let function: UnsafeMutableRawPointer
    private let cif: UnsafeMutablePointer<ffi_cif>
    private let argTypes: UnsafeMutablePointer<UnsafeMutablePointer<ffi_type>?>
    /// C arguments per declared parameter: `bytes` is a pointer and a length.
    private let cArgCount: Int

    init(_ declaration: FFIDeclaration, function: UnsafeMutableRawPointer) throws(FFIError) {
        self.declaration = declaration
        self.function = function
        guard declaration.returns != .bytes else {
            throw .unsupported("\(declaration.command): a bytes result needs a length; return a string or a number")
        }
        guard !declaration.params.contains(.void) else { throw .unsupported("\(declaration.command): void is not a parameter type") }
        var types: [UnsafeMutablePointer<ffi_type>?] = []
        for p in declaration.params {
            if p == .bytes {
                types += [cffi_pointer(), cffi_uint64()]
            } else {
                types.append(FFIFunction.ffiType(p))
            }
        }
        cArgCount = types.count
        argTypes = .allocate(capacity: max(1, types.count))
        argTypes.initialize(from: types, count: types.count)
        cif = .allocate(capacity: 1)
        let status = ffi_prep_cif(cif, cffi_default_abi(), UInt32(types.count), FFIFunction.ffiType(declaration.returns), argTypes)
        guard status == FFI_OK else { throw .unsupported("\(declaration.command): libffi cannot prepare the call (status \(status.rawValue))") }
    }

    static func ffiType(_ t: FFIType) -> UnsafeMutablePointer<ffi_type> {
        switch t {
        case .i8: cffi_sint8()
        case .i16: cffi_sint16()
        case .i32: cffi_sint32()
        case .i64: cffi_sint64()
        case .u8: cffi_uint8()
        case .u16: cffi_uint16()
        case .u32: cffi_uint32()
        case .u64: cffi_uint64()
        case .f32: cffi_float()
        case .f64: cffi_double()
        case .bool: cffi_uint8()
        case .string, .bytes: cffi_pointer()
        case .void: cffi_void()
        }
    }

    /// Checks the arguments against the declaration; a mismatch is an error and no call happens.
    public func check(_ args: [FFIValue]) throws(FFIError) {
        guard args.count == declaration.params.count else {
            throw .argumentCount(command: declaration.command, expected: declaration.params.count, got: args.count)
        }
        for (i, (a, p)) in zip(args, declaration.params).enumerated() where a.type != p {
            throw .argumentType(command: declaration.command, index: i, expected: p, got: a.type)
        }
    }

    /// Calls the function with checked arguments.
    public func call(_ args: [FFIValue]) throws(FFIError) -> FFIValue {
        try check(args)
        // One 16-byte slot per C argument holds its value; strings and bytes point into copies
        // that live until the call returns.
        let slots = UnsafeMutableRawPointer.allocate(byteCount: max(1, cArgCount) * 16, alignment: 16)
        let values = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: max(1, cArgCount))
        var owned: [UnsafeMutableRawPointer] = []
        defer {
            for p in owned { free(p) }
            slots.deallocate()
            values.deallocate()
        }
        var slot = 0
        func next() -> UnsafeMutableRawPointer {
            let p = slots + slot * 16
            values[slot] = p
            slot += 1
            return p
        }
        for a in args {
            switch a {
            case .int(let v, let t):
                let p = next()
                switch t {
                case .i8: p.storeBytes(of: Int8(truncatingIfNeeded: v), as: Int8.self)
                case .i16: p.storeBytes(of: Int16(truncatingIfNeeded: v), as: Int16.self)
                case .i32: p.storeBytes(of: Int32(truncatingIfNeeded: v), as: Int32.self)
                default: p.storeBytes(of: v, as: Int64.self)
                }
            case .uint(let v, let t):
                let p = next()
                switch t {
                case .u8: p.storeBytes(of: UInt8(truncatingIfNeeded: v), as: UInt8.self)
                case .u16: p.storeBytes(of: UInt16(truncatingIfNeeded: v), as: UInt16.self)
                case .u32: p.storeBytes(of: UInt32(truncatingIfNeeded: v), as: UInt32.self)
                default: p.storeBytes(of: v, as: UInt64.self)
                }
            case .float(let v): next().storeBytes(of: v, as: Float.self)
            case .double(let v): next().storeBytes(of: v, as: Double.self)
            case .bool(let v): next().storeBytes(of: v ? 1 : 0, as: UInt8.self)
            case .string(let s):
                guard let c = strdup(s) else { throw .unsupported("out of memory") }
                owned.append(UnsafeMutableRawPointer(c))
                next().storeBytes(of: UnsafeMutableRawPointer(c), as: UnsafeMutableRawPointer.self)
            case .bytes(let b):
                guard let copy = malloc(max(1, b.count)) else { throw .unsupported("out of memory") }
                owned.append(copy)
                b.withUnsafeBytes { src in if let base = src.baseAddress { copy.copyMemory(from: base, byteCount: b.count) } }
                next().storeBytes(of: copy, as: UnsafeMutableRawPointer.self)
                next().storeBytes(of: UInt64(b.count), as: UInt64.self)
            case .void:
                throw .unsupported("void is not an argument")
            }
        }
        // A result narrower than a register still needs an ffi_arg-sized buffer.
        var result: UInt64 = 0
        let fn = unsafeBitCast(function, to: (@convention(c) () -> Void).self)
        withUnsafeMutableBytes(of: &result) { r in
            ffi_call(cif, fn, r.baseAddress, values)
        }
        return convert(result)
    }

    private func convert(_ raw: UInt64) -> FFIValue {
        let t = declaration.returns
        switch t {
        case .i8: return .int(Int64(Int8(truncatingIfNeeded: raw)), t)
        case .i16: return .int(Int64(Int16(truncatingIfNeeded: raw)), t)
        case .i32: return .int(Int64(Int32(truncatingIfNeeded: raw)), t)
        case .i64: return .int(Int64(bitPattern: raw), t)
        case .u8: return .uint(UInt64(UInt8(truncatingIfNeeded: raw)), t)
        case .u16: return .uint(UInt64(UInt16(truncatingIfNeeded: raw)), t)
        case .u32: return .uint(UInt64(UInt32(truncatingIfNeeded: raw)), t)
        case .u64: return .uint(raw, t)
        case .f32: return .float(Float(bitPattern: UInt32(truncatingIfNeeded: raw)))
        case .f64: return .double(Double(bitPattern: raw))
        case .bool: return .bool(UInt8(truncatingIfNeeded: raw) != 0)
        case .string:
            guard let p = UnsafeMutablePointer<CChar>(bitPattern: UInt(raw)) else { return .string("") }
            let s = String(cString: p)
            if declaration.freeResult == true { free(p) }
            return .string(s)
        case .bytes, .void: return .void
        }
    }
}
