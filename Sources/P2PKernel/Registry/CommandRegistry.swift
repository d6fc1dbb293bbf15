import NIOConcurrencyHelpers

/// Why a command cannot be registered.
public enum RegistryError: Error, Equatable, CustomStringConvertible {
    case duplicateName(String)
    /// Two different names hash to the same 16-bit id.
    case idCollision(name: String, existing: String, id: UInt16)
    case emptyName

    public var description: String {
        switch self {
        case .duplicateName(let n): "a command named '\(n)' is already registered"
        case .idCollision(let n, let e, let id):
            "command '\(n)' derives wire id 0x\(String(id, radix: 16)), already taken by '\(e)'; rename one of them"
        case .emptyName: "a command needs a non-empty name"
        }
    }
}

/// The node's table of commands, by name and by wire id. Registration happens while a node is
/// assembled; lookups happen per message, so the table is read under a lock that is almost never
/// contended.
public final class CommandRegistry: Sendable {
    private struct Entry: Sendable {
        let name: String
        let handler: any CommandHandler
    }
    private let table = NIOLockedValueBox([UInt16: Entry]())

    public init() {}

    /// Registers a handler; a duplicate name or an id collision is an error and changes nothing.
    @discardableResult
    public func register(_ handler: any CommandHandler) throws(RegistryError) -> UInt16 {
        let name = handler.name
        guard !name.isEmpty else { throw .emptyName }
        let id = CommandID.derive(from: name)
        let error: RegistryError? = table.withLockedValue { t in
            if let existing = t[id] {
                return existing.name == name ? .duplicateName(name) : .idCollision(name: name, existing: existing.name, id: id)
            }
            t[id] = Entry(name: name, handler: handler)
            return nil
        }
        if let error { throw error }
        return id
    }

    /// The handler for a wire id.
    public func handler(for id: UInt16) -> (any CommandHandler)? {
        table.withLockedValue { $0[id]?.handler }
    }

    /// The name registered for a wire id.
    public func name(for id: UInt16) -> String? {
        table.withLockedValue { $0[id]?.name }
    }

    /// Removes every command whose name is not in `keep` (undoes a failed plugin install).
    func removeAll(except keep: Set<String>) {
        table.withLockedValue { t in t = t.filter { keep.contains($0.value.name) } }
    }

    /// All registered names, sorted.
    public var names: [String] {
        table.withLockedValue { $0.values.map(\.name).sorted() }
    }
}
