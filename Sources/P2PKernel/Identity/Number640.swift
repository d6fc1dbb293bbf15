/// A full storage key: location (where in the overlay), domain, content and version.
///
/// Orders lexicographically by location, domain, content, then version, which is the order range
/// queries walk.
public struct Number640: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The routing key: which peers are responsible.
    public var location: Number160
    /// A namespace under the location (zero by default).
    public var domain: Number160
    /// Which item under location and domain (zero by default).
    public var content: Number160
    /// Which version of that item (zero by default).
    public var version: Number160

    /// Creates a key; everything but the location defaults to zero.
    public init(location: Number160, domain: Number160 = .zero, content: Number160 = .zero, version: Number160 = .zero) {
        self.location = location
        self.domain = domain
        self.content = content
        self.version = version
    }

    /// The smallest and largest keys.
    public static let zero = Number640(location: .zero)
    public static let max = Number640(location: .max, domain: .max, content: .max, version: .max)

    public static func < (a: Number640, b: Number640) -> Bool {
        if a.location != b.location { return a.location < b.location }
        if a.domain != b.domain { return a.domain < b.domain }
        if a.content != b.content { return a.content < b.content }
        return a.version < b.version
    }

    public var description: String { "[\(location), \(domain), \(content), \(version)]" }
}
