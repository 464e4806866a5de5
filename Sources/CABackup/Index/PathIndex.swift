import CABackupCore
import CABackupFormat
import CSQLite
import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// One entry of a snapshot found by ``Repository/find(_:in:)`` or
/// ``Repository/history(of:in:)``.
public struct FoundEntry: Sendable, Equatable {
    public var snapshot: SnapshotID
    /// The absolute path inside the snapshot.
    public var path: [UInt8]
    public var type: NodeType
    public var size: UInt64
    public var mtimeNs: Int64
    /// For files: the first 16 bytes of the SHA-256 of the content ids in order, so two
    /// versions with the same value have the same bytes. Empty for other entries.
    public var contentDigest: [UInt8]

    public var displayPath: String { CABackupCore.displayPath(path) }
}

/// The file names of a repository's snapshots, in SQLite in the user's cache directory
/// (never in the repository: an encrypted repository's files must not reveal a name).
/// Derived like the chunk index: built from the trees of snapshots it lacks, each unique
/// directory once (an unchanged directory is shared by every snapshot that has it), and
/// rebuilt from scratch if deleted. Queries read no pack.
///
/// Tables: `dirs` gives each unique directory (its tree blob ids) a number; `entries` holds
/// its entries (name, type, size, mtime, content digest, and for a directory the number
/// of its own); `snapshots` maps each indexed snapshot to its root's number.
final class PathIndex {
    private let db: SQLiteDatabase
    static let schema = "1"

    /// Opens (creating) the index at `path`; a file of another schema is started over.
    init(path: String) throws {
        let directory = (path as NSString).deletingLastPathComponent
        try makeDirectories(directory, mode: 0o700)
        var db = try SQLiteDatabase(path: path)
        if try !Self.hasSchema(db) {
            db = try Self.recreate(path)
        }
        chmod(path, 0o600)
        self.db = db
    }

    private static func hasSchema(_ db: SQLiteDatabase) throws -> Bool {
        guard let q = try? db.prepare("SELECT value FROM meta WHERE key = 'schema'") else { return false }
        defer { q.reset() }
        return (try? q.step()) == true && q.text(0) == schema
    }

    private static func recreate(_ path: String) throws -> SQLiteDatabase {
        for suffix in ["", "-wal", "-shm", "-journal"] { unlink(path + suffix) }
        let db = try SQLiteDatabase(path: path)
        // SQL-safe: schema is a constant.
        try db.execute(
            """
            PRAGMA journal_mode=WAL;
            CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE dirs(id INTEGER PRIMARY KEY, trees BLOB NOT NULL UNIQUE);
            CREATE TABLE entries(
                dir INTEGER NOT NULL, name BLOB NOT NULL, type INTEGER NOT NULL, size INTEGER NOT NULL,
                mtime INTEGER NOT NULL, digest BLOB, child INTEGER, PRIMARY KEY(dir, name)) WITHOUT ROWID;
            CREATE TABLE snapshots(id BLOB PRIMARY KEY, root INTEGER NOT NULL) WITHOUT ROWID;
            INSERT INTO meta VALUES('schema', '\(schema)');
            """)
        return db
    }

    /// Indexes the snapshots it lacks and forgets those no longer in `snapshots`; each
    /// snapshot in one transaction, so an interruption leaves whole snapshots only.
    func update(_ snapshots: [Snapshot], loadTree: (BlobID) throws -> [Node]) throws {
        var indexed = Set<SnapshotID>()
        let all = try db.prepare("SELECT id FROM snapshots")
        while try all.step() { if let id = all.id(0) { indexed.insert(id) } }
        let current = Set(snapshots.map(\.id))
        let drop = try db.prepare("DELETE FROM snapshots WHERE id = ?1")
        for id in indexed.subtracting(current) {
            drop.bind(1, id)
            try drop.run()
        }
        let findDir = try db.prepare("SELECT id FROM dirs WHERE trees = ?1")
        let addDir = try db.prepare("INSERT INTO dirs(trees) VALUES(?1)")
        let addEntry = try db.prepare(
            "INSERT OR REPLACE INTO entries(dir, name, type, size, mtime, digest, child) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        )
        let addSnapshot = try db.prepare("INSERT OR REPLACE INTO snapshots(id, root) VALUES(?1, ?2)")

        /// The number of the directory made of `trees`, indexing it (and what is below)
        /// when it is new.
        func directory(_ trees: [BlobID]) throws -> Int64 {
            let key = trees.flatMap(\.bytes)
            findDir.reset()
            findDir.bind(1, bytes: key)
            let known = try findDir.step() ? findDir.int(0) : nil
            findDir.reset()
            if let known { return known }
            addDir.bind(1, bytes: key)
            try addDir.run()
            let id = sqlite3_last_insert_rowid(db.handle)
            for tree in trees {
                for node in try loadTree(tree) {
                    let child = node.type == .directory ? try directory(node.subtrees) : nil
                    addEntry.bind(1, id)
                    addEntry.bind(2, bytes: node.name)
                    addEntry.bind(3, Int64(node.type.rawValue))
                    addEntry.bind(4, Int64(bitPattern: node.size))
                    addEntry.bind(5, node.mtimeNs)
                    if node.type == .file {
                        addEntry.bind(6, bytes: Array(sha256(node.content.flatMap(\.bytes)).bytes.prefix(16)))
                    } else {
                        addEntry.bindNull(6)
                    }
                    if let child { addEntry.bind(7, child) } else { addEntry.bindNull(7) }
                    try addEntry.run()
                }
            }
            return id
        }

        for s in snapshots where !indexed.contains(s.id) {
            try db.execute("BEGIN IMMEDIATE")
            do {
                let root = try directory([s.tree])
                addSnapshot.bind(1, s.id)
                addSnapshot.bind(2, root)
                try addSnapshot.run()
                try db.execute("COMMIT")
            } catch {
                try? db.execute("ROLLBACK")
                throw error
            }
        }
    }

    /// The root directory's number of an indexed snapshot.
    func root(of snapshot: SnapshotID) throws -> Int64? {
        let q = try db.prepare("SELECT root FROM snapshots WHERE id = ?1")
        q.bind(1, snapshot)
        defer { q.reset() }
        return try q.step() ? q.int(0) : nil
    }

    struct Row {
        var name: [UInt8]
        var type: NodeType
        var size: UInt64
        var mtimeNs: Int64
        var digest: [UInt8]
        var child: Int64?
    }

    private lazy var listing = try? db.prepare(
        "SELECT name, type, size, mtime, digest, child FROM entries WHERE dir = ?1 ORDER BY name")
    private lazy var lookup = try? db.prepare(
        "SELECT name, type, size, mtime, digest, child FROM entries WHERE dir = ?1 AND name = ?2")

    private func row(_ q: SQLiteStatement) -> Row {
        Row(
            name: q.bytes(0), type: NodeType(rawValue: UInt8(truncatingIfNeeded: q.int(1))) ?? .file,
            size: UInt64(bitPattern: q.int(2)), mtimeNs: q.int(3), digest: q.isNull(4) ? [] : q.bytes(4),
            child: q.isNull(5) ? nil : q.int(5))
    }

    /// The entries of directory `dir`, by name.
    func entries(of dir: Int64) throws -> [Row] {
        guard let q = listing else { throw CABackupError.index("cannot query the path index") }
        q.reset()
        q.bind(1, dir)
        defer { q.reset() }
        var rows: [Row] = []
        while try q.step() { rows.append(row(q)) }
        return rows
    }

    /// The entry `name` of directory `dir`.
    func entry(_ name: [UInt8], in dir: Int64) throws -> Row? {
        guard let q = lookup else { throw CABackupError.index("cannot query the path index") }
        q.reset()
        q.bind(1, dir)
        q.bind(2, bytes: name)
        defer { q.reset() }
        return try q.step() ? row(q) : nil
    }
}

extension Repository {
    /// The path index of this repository, brought up to date with its snapshots.
    private func pathIndex() throws -> PathIndex {
        let index = try PathIndex(path: cacheDirectory(config.id) + "/paths.sqlite")
        try index.update(try snapshots()) { try loadTree($0) }
        return index
    }

    /// The entries of `snapshots` whose path matches `pattern` (the glob rules of
    /// `--exclude`, docs/excludes.md), in each snapshot's order; below a matching
    /// directory nothing more is reported. Answered from the path index in the cache
    /// directory, which is brought up to date first (reading only trees it lacks).
    public func find(_ pattern: String, in snapshots: [Snapshot]) throws -> [FoundEntry] {
        let rules = try ExcludeRules(excludes: [pattern])
        let index = try pathIndex()
        var found: [FoundEntry] = []
        func walk(_ dir: Int64, _ path: [UInt8], _ snapshot: SnapshotID) throws {
            for row in try index.entries(of: dir) {
                let p = path + [0x2F] + row.name
                if rules.isExcluded(path: p) {
                    found.append(
                        FoundEntry(
                            snapshot: snapshot, path: p, type: row.type, size: row.size, mtimeNs: row.mtimeNs,
                            contentDigest: row.digest))
                } else if let child = row.child {
                    try walk(child, p, snapshot)
                }
            }
        }
        for s in snapshots {
            guard let root = try index.root(of: s.id) else { continue }
            try walk(root, [], s.id)
        }
        return found
    }

    /// The entry at `path` in each of `snapshots` that has it, oldest snapshot first:
    /// every version of one file. Answered from the path index alone.
    public func history(of path: String, in snapshots: [Snapshot]) throws -> [FoundEntry] {
        let components = absolutePath(path).split(separator: "/").map { Array($0.utf8) }
        guard !components.isEmpty else { throw CABackupError.invalidArgument("name a file or directory, not /") }
        let index = try pathIndex()
        var found: [FoundEntry] = []
        for s in snapshots.sorted(by: { $0.timeNs < $1.timeNs }) {
            guard var dir = try index.root(of: s.id) else { continue }
            var hit: PathIndex.Row?
            for (i, name) in components.enumerated() {
                guard let row = try index.entry(name, in: dir) else { break }
                if i == components.count - 1 {
                    hit = row
                } else if let child = row.child {
                    dir = child
                } else {
                    break
                }
            }
            if let hit {
                found.append(
                    FoundEntry(
                        snapshot: s.id, path: Array(absolutePath(path).utf8), type: hit.type, size: hit.size,
                        mtimeNs: hit.mtimeNs, contentDigest: hit.digest))
            }
        }
        return found
    }
}
