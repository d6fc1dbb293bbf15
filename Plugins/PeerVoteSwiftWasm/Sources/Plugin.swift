// PeerVote as a WebAssembly plugin in Embedded Swift (built from the wasm-swift template): in the
// domain SHA-1("vote") a put adds its integer to the stored one.
//   p2p plugin build Plugins/PeerVoteSwiftWasm
//   p2p node --plugins dht,messaging,evaluation --plugin Plugins/PeerVoteSwiftWasm/peervote-swift.wasm
// (the guest runtime, P2PGuest.swift, and p2p_wasm.h come from Templates/ when the folder has none.)

let voteDomain: [UInt8] = [
    0xfd, 0x63, 0xf1, 0xed, 0x32, 0x8d, 0xa3, 0x40, 0x1a, 0x66, 0x77, 0x0b, 0xeb, 0xa9, 0x58, 0x7e, 0x88, 0x29, 0xe1, 0xe1,
]

func pluginInit() -> Int32 {
    describe(name: "peervote-swift-wasm", version: "1.0.0")
    guard registerPutInterceptor(domain: voteDomain, export: "count_votes") == Code.ok else { return Code.failed }
    return registerCommand("peervote.check", export: "check")
}

/// peervote.check: a vote, normalised (the same small work in every PeerVote variant).
@_expose(wasm, "check")
@_cdecl("check")
public func check(_ sender: UnsafePointer<UInt8>?, _ request: UnsafePointer<UInt8>?, _ len: UInt32) -> Int32 {
    guard let vote = integer(bytes(request, len) ?? []) else { return fail(Code.badRequest, "a vote must be a decimal integer") }
    output(decimal(vote))
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
