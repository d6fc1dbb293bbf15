// libFuzzer entry for the wire decoder: any input must give a WireError or a message that
// re-encodes and decodes to itself. Built by scripts/fuzz-wire.sh with -sanitize=fuzzer,address.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzWire(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    guard let message = try? WireCodec.decode(input, senderIP: .loopback) else { return 0 }
    // A decoded message must survive a round trip unchanged.
    guard let again = try? WireCodec.encode(message),
          let back = try? WireCodec.decode(again, senderIP: .loopback),
          back == message else {
        print("round trip mismatch for an input of \(size) bytes")
        abort()
    }
    return 0
}

@_silgen_name("abort") func abort() -> Never
