/// A hash index from 64-bit keys to slots of a dense array: open addressing with linear probing,
/// 4 bytes per bucket, at most half full.
///
/// Session indexes are random and peer ids are SHA-1 outputs, so their low bits are already
/// uniform and need no hashing. A bucket holds the slot (16 bits) and the key's top 16 bits, so
/// a probe touches the array the slots point into only when those match: a lookup is a load and
/// a compare. It costs about 8 bytes a session where a `Dictionary<UInt64, Int32>` costs about 24.
struct SlotIndex {
    /// Most slots it can address.
    static let maxSlots = Int(UInt16.max)
    private static let empty = UInt32.max

    private var buckets: [UInt32] = []
    private(set) var count = 0
    private var mask: Int { buckets.count - 1 }

    @inline(__always) private static func tag(_ key: UInt64) -> UInt32 { UInt32(truncatingIfNeeded: key >> 48) << 16 }
    @inline(__always) private static func slot(_ bucket: UInt32) -> Int { Int(bucket & 0xFFFF) }

    /// The slot stored for `key`, if any; `keyOf` reads a slot's full key.
    @inline(__always)
    func find(_ key: UInt64, key keyOf: (Int) -> UInt64) -> Int? {
        guard !buckets.isEmpty else { return nil }
        let tag = SlotIndex.tag(key)
        var i = Int(truncatingIfNeeded: key) & mask
        while true {
            let b = buckets[i]
            if b == SlotIndex.empty { return nil }
            if b & 0xFFFF_0000 == tag, keyOf(SlotIndex.slot(b)) == key { return SlotIndex.slot(b) }
            i = (i + 1) & mask
        }
    }

    /// Stores `slot` for `key`, replacing the slot stored for it before.
    mutating func set(_ key: UInt64, to slot: Int, key keyOf: (Int) -> UInt64) {
        if (count + 1) * 2 > buckets.count { grow(keyOf) }
        let tag = SlotIndex.tag(key)
        var i = Int(truncatingIfNeeded: key) & mask
        while buckets[i] != SlotIndex.empty {
            if buckets[i] & 0xFFFF_0000 == tag, keyOf(SlotIndex.slot(buckets[i])) == key {
                buckets[i] = tag | UInt32(slot)
                return
            }
            i = (i + 1) & mask
        }
        buckets[i] = tag | UInt32(slot)
        count += 1
    }

    /// Points the entry of `key` that holds `from` at `to` (the array moved an element).
    mutating func move(_ key: UInt64, from: Int, to: Int) {
        guard !buckets.isEmpty else { return }
        let tag = SlotIndex.tag(key)
        var i = Int(truncatingIfNeeded: key) & mask
        while buckets[i] != SlotIndex.empty {
            if buckets[i] == tag | UInt32(from) {
                buckets[i] = tag | UInt32(to)
                return
            }
            i = (i + 1) & mask
        }
    }

    /// Removes the entry of `key` if it holds `slot` (backward-shift deletion: no tombstones).
    mutating func remove(_ key: UInt64, slot: Int, key keyOf: (Int) -> UInt64) {
        guard !buckets.isEmpty else { return }
        let entry = SlotIndex.tag(key) | UInt32(slot)
        var i = Int(truncatingIfNeeded: key) & mask
        while buckets[i] != entry {
            if buckets[i] == SlotIndex.empty { return }
            i = (i + 1) & mask
        }
        buckets[i] = SlotIndex.empty
        count -= 1
        var j = i
        while true {
            j = (j + 1) & mask
            guard buckets[j] != SlotIndex.empty else { return }
            let home = Int(truncatingIfNeeded: keyOf(SlotIndex.slot(buckets[j]))) & mask
            // Move the entry back into the hole unless its home lies between the hole and it.
            let between = i <= j ? (i < home && home <= j) : (i < home || home <= j)
            if !between {
                buckets[i] = buckets[j]
                buckets[j] = SlotIndex.empty
                i = j
            }
        }
    }

    /// Every slot stored (for consistency checks).
    var slots: [Int] { buckets.filter { $0 != SlotIndex.empty }.map(SlotIndex.slot) }

    mutating func removeAll() {
        buckets = []
        count = 0
    }

    private mutating func grow(_ keyOf: (Int) -> UInt64) {
        let old = buckets
        buckets = [UInt32](repeating: SlotIndex.empty, count: max(16, old.count * 2))
        count = 0
        for b in old where b != SlotIndex.empty {
            var i = Int(truncatingIfNeeded: keyOf(SlotIndex.slot(b))) & mask
            while buckets[i] != SlotIndex.empty { i = (i + 1) & mask }
            buckets[i] = b
            count += 1
        }
    }
}
