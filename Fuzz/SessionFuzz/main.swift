// libFuzzer entry for the session layer's decoders (handshake INIT, RESPONSE, FINISH, sealed
// packets, SESSION_UNKNOWN, REFUSED) and the replay window. Built by scripts/fuzz-session.sh with
// -sanitize=fuzzer,address.
//
// Every input must give a WireError or a packet whose header re-encodes to the input's own
// bytes (one encoding per packet); and the replay window, driven by the input as a sequence of
// counters, must never accept a counter twice.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSession(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    let bytes = Array(input)
    if let packet = try? SessionCodec.decode(input) {
        let header: [UInt8]
        switch packet {
        case .handshakeInit(let p): header = SessionCodec.encode(p)
        case .handshakeResponse(let p): header = SessionCodec.encode(p)
        case .handshakeFinish(let p, let offset):
            guard offset == SessionWire.finishHeaderBytes, size >= offset + SessionWire.tagBytes else { fail("FINISH body offset \(offset)") }
            header = SessionCodec.encode(p)
        case .sealed(let h):
            guard size >= SessionWire.sealedOverhead else { fail("short sealed packet accepted") }
            header = SessionCodec.encode(h)
        case .sessionUnknown(let i): header = SessionCodec.encodeSessionUnknown(index: i)
        case .refused(let r, let i): header = SessionCodec.encodeRefused(r, initiatorIndex: i)
        }
        guard header.count <= size, Array(bytes.prefix(header.count)) == header else { fail("re-encoding differs for \(size) bytes") }
    }
    // The replay window: counters from the input (8 bytes each); accepted ones are marked, and
    // none may be accepted again.
    var window = ReplayWindow()
    var accepted = Set<UInt64>()
    var i = 0
    while i + 8 <= size {
        var c: UInt64 = 0
        for j in 0..<8 { c = c << 8 | UInt64(bytes[i + j]) }
        // Keep counters near each other most of the time, so the window's edges are exercised.
        if bytes[i] & 0x80 == 0 { c &= 0xFF }
        if window.canAccept(c) {
            guard !accepted.contains(c) else { fail("counter \(c) accepted twice") }
            window.mark(c)
            accepted.insert(c)
        }
        i += 8
    }
    return 0
}

func fail(_ why: String) -> Never {
    print(why)
    abort()
}

@_silgen_name("abort") func abort() -> Never
