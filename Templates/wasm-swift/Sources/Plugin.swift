// template-plugin: a WebAssembly plugin in Embedded Swift (the wasm-swift template).
//
//   - the command "template-plugin.hello" answers "hello, <request>";
//   - a put interceptor on the domain SHA-1("template-plugin") counts votes: each value put is a
//     decimal integer added to the one stored.
// Build: p2p plugin build .   Load: p2p node --plugin template-plugin.wasm

/// SHA-1 of "template-plugin", written in by `p2p plugin new`.
let voteDomain: [UInt8] = [TEMPLATE_DOMAIN_BYTES]

/// Registers the handlers (called by p2p_init).
func pluginInit() -> Int32 {
    describe(name: "template-plugin", version: "1.0.0")
    guard registerCommand("template-plugin.hello", export: "hello") == Code.ok else { return fail(Code.failed, "cannot register the command") }
    guard registerPutInterceptor(domain: voteDomain, export: "count_votes") == Code.ok else { return fail(Code.failed, "cannot register the interceptor") }
    return Code.ok
}

@_expose(wasm, "hello")
@_cdecl("hello")
public func hello(_ sender: UnsafePointer<UInt8>?, _ request: UnsafePointer<UInt8>?, _ len: UInt32) -> Int32 {
    guard len <= 1024, let name = bytes(request, len) else { return fail(Code.badRequest, "a name of at most 1024 bytes") }
    output(Array("hello, ".utf8) + name)
    return Code.ok
}

@_expose(wasm, "count_votes")
@_cdecl("count_votes")
public func countVotes(_ key: UnsafePointer<UInt8>?, _ value: UnsafePointer<UInt8>?, _ len: UInt32,
                       _ current: UnsafePointer<UInt8>?, _ currentLen: UInt32) -> Int32 {
    guard let vote = integer(bytes(value, len) ?? []) else { return fail(Code.badRequest, "a vote must be a decimal integer") }
    let before = bytes(current, currentLen).flatMap(integer) ?? 0
    let (sum, overflow) = before.addingReportingOverflow(vote)
    guard !overflow else { return fail(Code.denied, "the vote count would overflow") }
    output(decimal(sum))
    return Code.ok
}

/// A decimal integer with an optional sign and surrounding blanks, or nil.
func integer(_ text: [UInt8]) -> Int64? {
    var s = text[...]
    while let f = s.first, f == 32 || f == 10 || f == 9 { s = s.dropFirst() }
    while let l = s.last, l == 32 || l == 10 || l == 9 { s = s.dropLast() }
    var negative = false
    if let f = s.first, f == 45 || f == 43 { negative = f == 45; s = s.dropFirst() }
    guard !s.isEmpty else { return nil }
    var v: Int64 = 0
    for c in s {
        guard c >= 48, c <= 57 else { return nil }
        let digit = Int64(c - 48)
        guard v <= (Int64.max - digit) / 10 else { return nil }
        v = v * 10 + digit
    }
    return negative ? -v : v
}

func decimal(_ v: Int64) -> [UInt8] {
    var digits: [UInt8] = []
    var u = v.magnitude
    repeat { digits.append(UInt8(48 + u % 10)); u /= 10 } while u > 0
    if v < 0 { digits.append(45) }
    return digits.reversed()
}
