/// A 160-bit number: peer ids and keys of the overlay, compared by the XOR metric.
///
/// Stored as three fixed-width words (most significant first) so that it is a plain value with no
/// heap storage, cheap to copy, hash and XOR.
///
/// ```swift
/// let key = Number160(hashing: "hello")          // SHA-1 of the UTF-8 bytes, as TomP2P's createHash
/// let d = key ^ node.id                          // XOR distance
/// let id = try Number160(hex: "0x1f")            // 40 hex digits at most
/// ```
public struct Number160: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The number of bits.
    public static let bitCount = 160
    /// The number of bytes in the big-endian encoding.
    public static let byteCount = 20

    /// Bits 159…96.
    public var high: UInt64
    /// Bits 95…32.
    public var middle: UInt64
    /// Bits 31…0.
    public var low: UInt32

    /// Creates a number from its three words, most significant first.
    @inlinable
    public init(high: UInt64, middle: UInt64, low: UInt32) {
        self.high = high
        self.middle = middle
        self.low = low
    }

    /// Creates a number from a small integer.
    public init(_ value: UInt32) {
        self.init(high: 0, middle: 0, low: value)
    }

    /// Zero.
    public static let zero = Number160(high: 0, middle: 0, low: 0)
    /// All 160 bits set.
    public static let max = Number160(high: .max, middle: .max, low: .max)

    /// Creates a number from exactly 20 big-endian bytes; `nil` for any other count.
    public init?<Bytes: Collection>(bytes: Bytes) where Bytes.Element == UInt8 {
        guard bytes.count == Number160.byteCount else { return nil }
        // Contiguous bytes (arrays and their slices, as the codec has them): read the words directly.
        if let words = bytes.withContiguousStorageIfAvailable({ b -> (UInt64, UInt64, UInt32) in
            var h: UInt64 = 0, m: UInt64 = 0, l: UInt32 = 0
            for i in 0..<8 { h = h << 8 | UInt64(b[i]) }
            for i in 8..<16 { m = m << 8 | UInt64(b[i]) }
            for i in 16..<20 { l = l << 8 | UInt32(b[i]) }
            return (h, m, l)
        }) {
            self.init(high: words.0, middle: words.1, low: words.2)
            return
        }
        var h: UInt64 = 0, m: UInt64 = 0, l: UInt32 = 0
        for (i, b) in bytes.enumerated() {
            switch i {
            case 0..<8: h = h << 8 | UInt64(b)
            case 8..<16: m = m << 8 | UInt64(b)
            default: l = l << 8 | UInt32(b)
            }
        }
        self.init(high: h, middle: m, low: l)
    }

    /// The 20 big-endian bytes.
    public var bytes: [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(Number160.byteCount)
        for s in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: high >> UInt64(s))) }
        for s in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: middle >> UInt64(s))) }
        for s in stride(from: 24, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: low >> UInt32(s))) }
        return out
    }

    /// Parses hexadecimal digits, with or without a `0x` prefix: 1 to 40 digits.
    public init(hex text: String) throws(Number160.ParseError) {
        var digits = Substring(text)
        if digits.hasPrefix("0x") || digits.hasPrefix("0X") { digits = digits.dropFirst(2) }
        guard !digits.isEmpty else { throw .empty }
        guard digits.count <= 40 else { throw .tooLong(digits.count) }
        var value = Number160.zero
        for ch in digits.unicodeScalars {
            guard let nibble = Number160.nibble(ch) else { throw .notHex(Character(ch)) }
            value = value.shiftedLeft(4)
            value.low |= UInt32(nibble)
        }
        self = value
    }

    /// Why a hex string is not a `Number160`.
    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case empty
        case tooLong(Int)
        case notHex(Character)
        public var description: String {
            switch self {
            case .empty: "no hex digits"
            case .tooLong(let n): "\(n) hex digits exceed the 40 a 160-bit number holds"
            case .notHex(let c): "'\(c)' is not a hex digit"
            }
        }
    }

    private static func nibble(_ c: Unicode.Scalar) -> UInt8? {
        switch c.value {
        case 0x30...0x39: UInt8(c.value - 0x30)
        case 0x61...0x66: UInt8(c.value - 0x61 + 10)
        case 0x41...0x46: UInt8(c.value - 0x41 + 10)
        default: nil
        }
    }

    /// 40 lowercase hex digits, no prefix.
    public var hexString: String {
        let digits: [UInt8] = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(40)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0xF)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// `0x` followed by 40 hex digits.
    public var description: String { "0x" + hexString }

    /// The XOR distance between two numbers.
    @inlinable
    public static func ^ (a: Number160, b: Number160) -> Number160 {
        Number160(high: a.high ^ b.high, middle: a.middle ^ b.middle, low: a.low ^ b.low)
    }

    /// Unsigned ordering.
    @inlinable
    public static func < (a: Number160, b: Number160) -> Bool {
        if a.high != b.high { return a.high < b.high }
        if a.middle != b.middle { return a.middle < b.middle }
        return a.low < b.low
    }

    /// The position of the highest set bit plus one (0 for zero, 160 when bit 159 is set).
    @inlinable
    public var bitLength: Int {
        if high != 0 { return 160 - high.leadingZeroBitCount }
        if middle != 0 { return 96 - middle.leadingZeroBitCount }
        return 32 - low.leadingZeroBitCount
    }

    /// Whether bit `index` (0 = least significant) is set.
    public func bit(_ index: Int) -> Bool {
        precondition((0..<160).contains(index), "bit index out of range")
        if index < 32 { return low >> UInt32(index) & 1 == 1 }
        if index < 96 { return middle >> UInt64(index - 32) & 1 == 1 }
        return high >> UInt64(index - 96) & 1 == 1
    }

    /// The number shifted left by `n` bits (0…160), high bits dropped.
    public func shiftedLeft(_ n: Int) -> Number160 {
        var v = self
        var n = n
        while n > 0 {
            let s = Swift.min(n, 32)
            v.high = v.high << UInt64(s) | v.middle >> UInt64(64 - s)
            v.middle = v.middle << UInt64(s) | UInt64(v.low) >> UInt64(32 - s)
            v.low = s == 32 ? 0 : v.low << UInt32(s)
            n -= s
        }
        return v
    }

    /// Whether `a` is strictly closer to `self` than `b` under XOR.
    @inlinable
    public func isCloser(_ a: Number160, than b: Number160) -> Bool {
        (a ^ self) < (b ^ self)
    }

    /// A uniformly random number.
    public static func random<G: RandomNumberGenerator>(using generator: inout G) -> Number160 {
        Number160(high: generator.next(), middle: generator.next(), low: UInt32(truncatingIfNeeded: generator.next() as UInt64))
    }

    /// A uniformly random number from the system generator.
    public static func random() -> Number160 {
        var g = SystemRandomNumberGenerator()
        return random(using: &g)
    }
}

extension Number160 {
    /// A random number whose bit length is exactly `bitLength` (1…160): a random distance that
    /// falls into bucket `bitLength - 1`.
    public static func random<G: RandomNumberGenerator>(bitLength: Int, using generator: inout G) -> Number160 {
        precondition((1...160).contains(bitLength), "bit length out of range")
        var bytes = random(using: &generator).bytes
        let top = bitLength - 1
        let topByte = 19 - top / 8
        for i in 0..<topByte { bytes[i] = 0 }
        let bitInByte = top % 8
        bytes[topByte] &= UInt8((1 << (bitInByte + 1)) - 1)
        bytes[topByte] |= UInt8(1 << bitInByte)
        return Number160(bytes: bytes) ?? .zero
    }
}
