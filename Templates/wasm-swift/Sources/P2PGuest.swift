// SwiftP2P WebAssembly plugin ABI, version 1: the guest side, for Embedded Swift.
//
// Compiled with the plugin's own code into one wasm32 module (`p2p plugin build` runs
// swiftc -target wasm32-unknown-none-wasm -enable-experimental-feature Embedded and wasm-ld).
// It declares the host's imports (module "p2p"), exports memory, p2p_abi_version, p2p_alloc,
// p2p_free and p2p_init (which calls the plugin's `pluginInit()`), and gives Embedded Swift the
// allocator and memory functions it needs, since there is no libc here. docs/PLUGINS.md has the ABI.

import Builtin

/// Result codes of handlers and host functions (P2P_OK … in p2p_wasm.h).
public enum Code {
    public static let ok: Int32 = 0
    public static let denied: Int32 = 1
    public static let notFound: Int32 = 2
    public static let badRequest: Int32 = 3
    public static let failed: Int32 = 4
}

// The host's imports (module "p2p") come from p2p_wasm.h, the header C plugins use, given to
// swiftc as the bridging header: that way they are called with the C convention the ABI has.

// MARK: Swift wrappers

/// Text from a static string, without copying.
func withText<R>(_ s: StaticString, _ body: (UnsafePointer<CChar>, UInt32) -> R) -> R {
    body(UnsafeRawPointer(s.utf8Start).assumingMemoryBound(to: CChar.self), UInt32(s.utf8CodeUnitCount))
}

/// Writes a line to the node's log.
public func log(_ text: StaticString, level: Int32 = 1) {
    withText(text) { p2p_log(level, $0, $1) }
}

/// The plugin's name and version (during `pluginInit` only).
public func describe(name: StaticString, version: StaticString) {
    withText(name) { n, nl in withText(version) { v, vl in _ = p2p_describe(n, nl, v, vl) } }
}

/// Registers the exported function `export` as the command `name`.
public func registerCommand(_ name: StaticString, export: StaticString) -> Int32 {
    withText(name) { n, nl in withText(export) { e, el in p2p_register_command(n, nl, e, el) } }
}

/// Registers the exported function `export` as the put interceptor of a 20-byte domain.
public func registerPutInterceptor(domain: [UInt8], export: StaticString) -> Int32 {
    domain.withUnsafeBufferPointer { d in withText(export) { e, el in p2p_register_put_interceptor(d.baseAddress, e, el) } }
}

/// Registers the exported function `export` as the evaluation scheme `name`.
public func registerEvaluationScheme(_ name: StaticString, export: StaticString) -> Int32 {
    withText(name) { n, nl in withText(export) { e, el in p2p_register_evaluation_scheme(n, nl, e, el) } }
}

/// Hands the call's result to the host.
@discardableResult
public func output(_ bytes: [UInt8]) -> Int32 {
    bytes.withUnsafeBufferPointer { p2p_output(UnsafeRawPointer($0.baseAddress), UInt32($0.count)) }
}

/// Hands a reason to the host and returns the error code.
public func fail(_ code: Int32, _ reason: StaticString) -> Int32 {
    withText(reason) { p, n in _ = p2p_output(p, n) }
    return code
}

/// The bytes a handler was given (nil pointer or the no-value length give nil).
public func bytes(_ p: UnsafePointer<UInt8>?, _ len: UInt32) -> [UInt8]? {
    guard len != UInt32.max else { return nil }
    guard let p, len > 0 else { return [] }
    return Array(UnsafeBufferPointer(start: p, count: Int(len)))
}

// MARK: the exports every plugin has

@_expose(wasm, "p2p_abi_version")
@_cdecl("p2p_abi_version")
public func p2pABIVersion() -> Int32 { 1 }

@_expose(wasm, "p2p_alloc")
@_cdecl("p2p_alloc")
public func p2pAlloc(_ len: UInt32) -> UnsafeMutableRawPointer? { Heap.allocate(Int(len)) }

@_expose(wasm, "p2p_free")
@_cdecl("p2p_free")
public func p2pFree(_ p: UnsafeMutableRawPointer?) { Heap.release(p) }

@_expose(wasm, "p2p_init")
@_cdecl("p2p_init")
public func p2pInit() -> Int32 { pluginInit() }

// MARK: the runtime Embedded Swift needs (no libc)

/// Blocks in power-of-two size classes from 16 bytes, each class a free list; new blocks from
/// the end of the heap, growing the memory when it runs out.
enum Heap {
    nonisolated(unsafe) static var top: UInt = 0
    nonisolated(unsafe) static var freeLists = (UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0),
                                                UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0),
                                                UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0),
                                                UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0), UInt(0))

    static func list(_ cls: Int) -> UnsafeMutablePointer<UInt> {
        withUnsafeMutablePointer(to: &freeLists) { UnsafeMutableRawPointer($0).assumingMemoryBound(to: UInt.self) + cls }
    }

    static func allocate(_ size: Int) -> UnsafeMutableRawPointer? {
        var cls = 4
        while (1 << cls) < size + 16 && cls < 31 { cls += 1 }
        guard (1 << cls) >= size + 16 else { return nil }
        let head = list(cls)
        var block: UInt
        if head.pointee != 0 {
            block = head.pointee
            head.pointee = UnsafeMutablePointer<UInt>(bitPattern: block)?.pointee ?? 0
        } else {
            if top == 0 { top = (UInt(bitPattern: heapBase()) + 15) & ~15 }
            let end = top + UInt(1 << cls)
            let have = UInt(memoryPages()) * 65536
            if end > have {
                let pages = Int32((end - have + 65535) / 65536)
                guard growMemory(pages) >= 0 else { return nil }
            }
            block = top
            top = end
        }
        UnsafeMutablePointer<UInt>(bitPattern: block)?.pointee = UInt(cls)
        return UnsafeMutableRawPointer(bitPattern: block + 16)
    }

    static func release(_ p: UnsafeMutableRawPointer?) {
        guard let p else { return }
        let block = UInt(bitPattern: p) - 16
        guard let header = UnsafeMutablePointer<UInt>(bitPattern: block) else { return }
        let cls = Int(header.pointee)
        guard cls >= 4, cls <= 31 else { return }
        header.pointee = list(cls).pointee
        list(cls).pointee = block
    }

    static func memoryPages() -> Int32 { Int32(Builtin.int_wasm_memory_size_Int32(Int32(0)._value)) }
    static func growMemory(_ pages: Int32) -> Int32 { Int32(Builtin.int_wasm_memory_grow_Int32(Int32(0)._value, pages._value)) }
    static func heapBase() -> UnsafeMutableRawPointer? { withUnsafeMutablePointer(to: &__heap_base_marker) { UnsafeMutableRawPointer($0) } }
}

/// Where the heap starts: the linker's `__heap_base`.
@_extern(c, "__heap_base") nonisolated(unsafe) var __heap_base_marker: UInt8

@_cdecl("posix_memalign")
public func posix_memalign(_ out: UnsafeMutablePointer<UnsafeMutableRawPointer?>, _ alignment: Int, _ size: Int) -> Int32 {
    guard alignment <= 16, let p = Heap.allocate(size) else { return 12 }
    out.pointee = p
    return 0
}

@_cdecl("free")
public func free(_ p: UnsafeMutableRawPointer?) { Heap.release(p) }

@_cdecl("memcpy")
public func memcpy(_ dst: UnsafeMutableRawPointer, _ src: UnsafeRawPointer, _ n: Int) -> UnsafeMutableRawPointer {
    var i = 0
    while i < n { dst.storeBytes(of: src.load(fromByteOffset: i, as: UInt8.self), toByteOffset: i, as: UInt8.self); i += 1 }
    return dst
}

@_cdecl("memmove")
public func memmove(_ dst: UnsafeMutableRawPointer, _ src: UnsafeRawPointer, _ n: Int) -> UnsafeMutableRawPointer {
    if UInt(bitPattern: dst) < UInt(bitPattern: src) { return memcpy(dst, src, n) }
    var i = n
    while i > 0 { i -= 1; dst.storeBytes(of: src.load(fromByteOffset: i, as: UInt8.self), toByteOffset: i, as: UInt8.self) }
    return dst
}

@_cdecl("memset")
public func memset(_ dst: UnsafeMutableRawPointer, _ c: Int32, _ n: Int) -> UnsafeMutableRawPointer {
    var i = 0
    while i < n { dst.storeBytes(of: UInt8(truncatingIfNeeded: c), toByteOffset: i, as: UInt8.self); i += 1 }
    return dst
}

/// 128-bit multiplication, which overflow-checked 64-bit arithmetic needs on wasm32 (the low
/// 128 bits of a × b, from 32-bit limbs so that it needs nothing wider itself).
@_cdecl("__multi3")
public func __multi3(_ result: UnsafeMutablePointer<UInt64>, _ aLow: UInt64, _ aHigh: UInt64, _ bLow: UInt64, _ bHigh: UInt64) {
    let a0 = aLow & 0xFFFF_FFFF, a1 = aLow >> 32, b0 = bLow & 0xFFFF_FFFF, b1 = bLow >> 32
    let p00 = a0 &* b0, p01 = a0 &* b1, p10 = a1 &* b0, p11 = a1 &* b1
    let middle = (p00 >> 32) &+ (p01 & 0xFFFF_FFFF) &+ (p10 & 0xFFFF_FFFF)
    let low = (p00 & 0xFFFF_FFFF) | (middle << 32)
    let high = p11 &+ (p01 >> 32) &+ (p10 >> 32) &+ (middle >> 32) &+ aLow &* bHigh &+ aHigh &* bLow
    result[0] = low
    result[1] = high
}
