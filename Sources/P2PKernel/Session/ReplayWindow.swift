/// Accepts each message counter at most once while tolerating reordering: a counter is new if it
/// is above every counter seen, or within the last `size` below the highest and not seen yet
/// (the sliding window of IPsec and WireGuard).
///
/// Check with `canAccept` before opening a packet and `mark` only after it authenticated, so a
/// forged packet cannot move the window.
public struct ReplayWindow: Sendable, Equatable {
    /// How far below the highest counter a late packet is still accepted: 64 datagrams of
    /// reordering is far more than UDP shows between two hosts.
    public static let size: UInt64 = 64

    /// One above the highest counter marked; zero while none was.
    private var next: UInt64 = 0
    /// Bit i set: counter `next - 1 - i` was marked.
    private var seen: UInt64 = 0

    public init() {}

    /// Whether `counter` was not marked yet and is not too old.
    public func canAccept(_ counter: UInt64) -> Bool {
        // The last counter would wrap the window; no honest sender gets there.
        guard counter < .max else { return false }
        if counter >= next { return true }
        let age = next - 1 - counter
        guard age < ReplayWindow.size else { return false }
        return seen & (1 << age) == 0
    }

    /// Records `counter` as received (call after `canAccept` returned true and the packet opened).
    public mutating func mark(_ counter: UInt64) {
        if counter >= next {
            let shift = counter - next + 1
            seen = shift >= ReplayWindow.size ? 0 : seen << shift
            seen |= 1
            next = counter &+ 1
        } else {
            let age = next - 1 - counter
            if age < ReplayWindow.size { seen |= 1 << age }
        }
    }
}
