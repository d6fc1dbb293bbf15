import Foundation
import GRDB

/// Why a SQLite database could not be opened or used. Every case names the file; none of them
/// leaves the file changed.
public enum SQLiteStorageError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The file (or the folder it would be made in) cannot be opened or created.
    case cannotOpen(path: String, reason: String)
    /// The file is not a SQLite database at all (a wrong path, or its header was overwritten).
    case notADatabase(path: String)
    /// SQLite says the file is damaged (its integrity check failed, or a row cannot be read).
    case corrupt(path: String, detail: String)
    /// A SQLite database, but not one of SwiftP2P's storage (other tables, another application id).
    case foreignDatabase(path: String, detail: String)
    /// Written by a newer SwiftP2P whose layout this one does not know.
    case newerLayout(path: String, version: Int)
    /// The file or its folder is read-only: the node needs to write it.
    case readOnly(path: String, reason: String)
    /// The disk holding the file is full.
    case diskFull(path: String)
    /// Another process (another node) has the file open for writing.
    case inUse(path: String)
    /// Anything else SQLite reported.
    case failed(path: String, reason: String)

    public var description: String {
        switch self {
        case .cannotOpen(let p, let r): "cannot open storage \(p): \(r)"
        case .notADatabase(let p): "storage \(p) is not a SQLite database (left untouched; move it away or choose another path)"
        case .corrupt(let p, let d): "storage \(p) is damaged: \(d) (left untouched; restore it from a copy or choose another path)"
        case .foreignDatabase(let p, let d): "storage \(p) is a SQLite database of something else: \(d) (left untouched)"
        case .newerLayout(let p, let v): "storage \(p) has layout version \(v), newer than this build knows (\(SQLiteDatabase.layoutVersion))"
        case .readOnly(let p, let r): "storage \(p) is read-only: \(r)"
        case .diskFull(let p): "the disk holding storage \(p) is full"
        case .inUse(let p): "storage \(p) is in use by another process"
        case .failed(let p, let r): "storage \(p): \(r)"
        }
    }
}

/// One SQLite file holding a node's storage and its saved routing table, opened once and shared
/// by `SQLiteStorage` and `PeerTablePlugin`. WAL mode; the file is locked for this process while
/// open, so two nodes never write one file.
///
/// Opening never changes a file that is not a SwiftP2P storage file: a file that is not a
/// database, fails SQLite's integrity check, or holds other tables is refused with a typed
/// error (`SQLiteStorageError`) and left as it was.
public final class SQLiteDatabase: Sendable {
    /// The layout this build writes (`PRAGMA user_version`).
    /// 2: entries carry a version stamp and may be removals (a file of layout 1 is brought up
    /// to 2 when opened: its entries unstamped, none a removal).
    public static let layoutVersion = 2
    /// Marks the file as SwiftP2P's (`PRAGMA application_id`, "P2PS").
    public static let applicationID: Int32 = 0x5032_5053

    /// How commits reach the disk.
    public enum Sync: String, Sendable {
        /// Each commit is on the disk before it is acknowledged (fsync of the log): survives a
        /// crash of the process and of the machine. The default.
        case full
        /// Each commit is in the operating system before it is acknowledged: survives a crash
        /// (kill -9) of the process, not a power loss; several times faster on slow disks.
        case normal
    }

    public let path: String
    public let sync: Sync
    let queue: DatabaseQueue

    /// Opens (or creates) the file at `path`.
    public init(path: String, sync: Sync = .full) throws(SQLiteStorageError) {
        self.path = path
        self.sync = sync
        var isDirectory: ObjCBool = false
        let exists = FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory)
        if exists, isDirectory.boolValue { throw .cannotOpen(path: path, reason: "it is a directory") }
        if !exists {
            let folder = (path as NSString).deletingLastPathComponent
            var folderIsDirectory: ObjCBool = false
            if !folder.isEmpty, !FileManager.default.fileExists(atPath: folder, isDirectory: &folderIsDirectory) || !folderIsDirectory.boolValue {
                throw .cannotOpen(path: path, reason: "folder \(folder) does not exist")
            }
        }
        // SQLite reports a read-only file system as an I/O error or "unable to open": asked
        // first, the system names it (root included: a read-only mount refuses everyone).
        let target = exists ? path : ((path as NSString).deletingLastPathComponent.isEmpty ? "." : (path as NSString).deletingLastPathComponent)
        if access(target, W_OK) != 0 {
            let code = errno
            let reason = String(cString: strerror(code))
            if code == EROFS || code == EACCES || code == EPERM {
                throw .readOnly(path: path, reason: exists ? "the file cannot be written (\(reason))" : "its folder cannot be written (\(reason))")
            }
        }
        var config = Configuration()
        // WAL is switched on once the file is known to be ours (it rewrites the header).
        config.busyMode = .immediateError
        config.label = "p2p.sqlite"
        let syncPragma = sync == .full ? "FULL" : "NORMAL"
        config.prepareDatabase { db in
            // The file stays locked by this process from its first write on: a second node
            // opening it fails (inUse) instead of interleaving writes.
            try db.execute(sql: "PRAGMA locking_mode = EXCLUSIVE")
            try db.execute(sql: "PRAGMA synchronous = \(syncPragma)")
        }
        do {
            queue = try DatabaseQueue(path: path, configuration: config)
        } catch {
            throw Self.mapped(error, path: path, opening: true)
        }
        try prepare()
    }

    /// Checks what the file is, then creates the tables in a new file.
    private func prepare() throws(SQLiteStorageError) {
        let path = self.path
        do {
            try queue.writeWithoutTransaction { db in
                // Taking the write lock at once: another process holding the file fails here.
                // Nothing is written unless the file is new (no tables) or already ours.
                try db.execute(sql: "BEGIN IMMEDIATE")
                do {
                    let appID = try Int32(truncatingIfNeeded: Int64.fetchOne(db, sql: "PRAGMA application_id") ?? 0)
                    let version = try Int.fetchOne(db, sql: "PRAGMA user_version") ?? 0
                    let tables = try String.fetchAll(db, sql: "SELECT name FROM sqlite_master WHERE type = 'table'")
                    if appID == 0, tables.isEmpty {
                        try Self.createLayout(db)
                    } else if appID != Self.applicationID {
                        throw SQLiteStorageError.foreignDatabase(path: path, detail: appID == 0
                            ? "it holds tables \(tables.prefix(5).joined(separator: ", "))"
                            : "its application id is \(String(UInt32(bitPattern: appID), radix: 16))")
                    } else if version > Self.layoutVersion {
                        throw SQLiteStorageError.newerLayout(path: path, version: version)
                    } else {
                        for table in ["entries", "entry_owners", "domain_owners", "peers"] where !tables.contains(table) {
                            throw SQLiteStorageError.corrupt(path: path, detail: "table \(table) is missing")
                        }
                        if version < 2 {
                            try db.execute(sql: """
                                ALTER TABLE entries ADD COLUMN stamp INTEGER NOT NULL DEFAULT 0;
                                ALTER TABLE entries ADD COLUMN tombstone INTEGER NOT NULL DEFAULT 0;
                                PRAGMA user_version = \(Self.layoutVersion);
                                """)
                        }
                    }
                    try db.execute(sql: "COMMIT")
                } catch {
                    try? db.execute(sql: "ROLLBACK")
                    throw error
                }
            }
            let check = try queue.read { db in try String.fetchAll(db, sql: "PRAGMA quick_check(5)") }
            if check != ["ok"] { throw SQLiteStorageError.corrupt(path: path, detail: check.joined(separator: "; ")) }
            let mode = try queue.writeWithoutTransaction { db in try String.fetchOne(db, sql: "PRAGMA journal_mode = WAL") }
            if mode?.lowercased() != "wal" { throw SQLiteStorageError.failed(path: path, reason: "cannot switch to WAL mode (got \(mode ?? "nothing"))") }
        } catch let e as SQLiteStorageError {
            throw e
        } catch {
            throw Self.mapped(error, path: path, opening: true)
        }
    }

    private static func createLayout(_ db: Database) throws {
        try db.execute(sql: """
            CREATE TABLE entries (
                key BLOB PRIMARY KEY NOT NULL,      -- location, domain, content, version: 80 bytes
                value BLOB NOT NULL,
                ttl INTEGER NOT NULL,               -- seconds as written (signed over)
                based_on BLOB NOT NULL,             -- 20 bytes per version
                prepared INTEGER NOT NULL,
                protect_entry INTEGER NOT NULL,
                signer BLOB,                        -- 32-byte Ed25519 key, with signature
                signature BLOB,                     -- 64 bytes
                expires_at INTEGER NOT NULL,        -- Unix milliseconds; 0 never
                writer BLOB,                        -- the request's proven writer (quota)
                stamp INTEGER NOT NULL DEFAULT 0,   -- version stamp (hybrid logical clock)
                tombstone INTEGER NOT NULL DEFAULT 0 -- 1: a removal, kept to refuse older copies
            ) WITHOUT ROWID;
            CREATE INDEX entries_expiry ON entries (expires_at) WHERE expires_at > 0;
            CREATE TABLE entry_owners (item BLOB PRIMARY KEY NOT NULL, owner BLOB NOT NULL) WITHOUT ROWID;
            CREATE TABLE domain_owners (domain BLOB PRIMARY KEY NOT NULL, owner BLOB NOT NULL) WITHOUT ROWID;
            CREATE TABLE peers (
                id BLOB PRIMARY KEY NOT NULL,
                ip TEXT NOT NULL,
                udp INTEGER NOT NULL,
                tcp INTEGER NOT NULL,
                seen INTEGER NOT NULL               -- Unix milliseconds it was last verified
            ) WITHOUT ROWID;
            PRAGMA application_id = \(applicationID);
            PRAGMA user_version = \(layoutVersion);
            """)
    }

    /// Closes the file (after a checkpoint, so the log is folded in). Later use fails with a
    /// typed error.
    public func close() {
        try? queue.close()
    }

    /// Runs `body` in one write transaction.
    func write<T>(_ body: (Database) throws -> T) throws(SQLiteStorageError) -> T {
        do { return try queue.write(body) } catch let e as SQLiteStorageError { throw e } catch {
            throw Self.mapped(error, path: path, opening: false)
        }
    }

    /// Runs `body` reading.
    func read<T>(_ body: (Database) throws -> T) throws(SQLiteStorageError) -> T {
        do { return try queue.read(body) } catch let e as SQLiteStorageError { throw e } catch {
            throw Self.mapped(error, path: path, opening: false)
        }
    }

    /// A SQLite failure as the typed error.
    static func mapped(_ error: any Error, path: String, opening: Bool) -> SQLiteStorageError {
        guard let e = error as? DatabaseError else { return .failed(path: path, reason: "\(error)") }
        let reason = e.message ?? "\(e.resultCode)"
        switch e.resultCode {
        case .SQLITE_NOTADB: return .notADatabase(path: path)
        case .SQLITE_CORRUPT: return .corrupt(path: path, detail: reason)
        case .SQLITE_READONLY: return .readOnly(path: path, reason: reason)
        case .SQLITE_FULL: return .diskFull(path: path)
        case .SQLITE_BUSY, .SQLITE_LOCKED: return .inUse(path: path)
        case .SQLITE_CANTOPEN, .SQLITE_PERM, .SQLITE_AUTH: return .cannotOpen(path: path, reason: reason)
        case .SQLITE_IOERR:
            // A read-only file system shows as an I/O error on some writes.
            if reason.localizedCaseInsensitiveContains("read-only") || reason.localizedCaseInsensitiveContains("readonly") {
                return .readOnly(path: path, reason: reason)
            }
            return .failed(path: path, reason: "I/O error: \(reason)")
        default: return opening ? .cannotOpen(path: path, reason: reason) : .failed(path: path, reason: reason)
        }
    }

    /// Wall-clock Unix milliseconds.
    static func wallMillis() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }
}

extension Array where Element == UInt8 {
    var data: Data { Data(self) }
}

/// Safe reads of one row's columns: a value of the wrong type is nil, never a crash.
extension Row {
    func blob(_ i: Int) -> [UInt8]? {
        if case .blob(let d) = (self[i] as DatabaseValue).storage { return [UInt8](d) }
        return nil
    }
    func int(_ i: Int) -> Int64? {
        if case .int64(let v) = (self[i] as DatabaseValue).storage { return v }
        return nil
    }
    func text(_ i: Int) -> String? {
        if case .string(let s) = (self[i] as DatabaseValue).storage { return s }
        return nil
    }
    func isNull(_ i: Int) -> Bool {
        if case .null = (self[i] as DatabaseValue).storage { return true }
        return false
    }
}
