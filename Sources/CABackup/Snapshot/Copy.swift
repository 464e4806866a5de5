import CABackupCore
import CABackupFormat
import CSQLite
import Foundation

/// What ``Repository/copy(_:from:)`` did.
public struct CopyResult: Sendable, Equatable {
    /// Snapshots written into this repository, and those it had already (copied before).
    public var snapshotsCopied = 0
    public var snapshotsSkipped = 0
    /// Blobs read from the source (data and trees its id map did not know) and their
    /// bytes before compression.
    public var blobsRead = 0
    public var bytesRead: Int64 = 0
    /// Bytes this repository grew by.
    public var bytesAdded: Int64 = 0

    public init() {}
}

extension Repository {
    /// Copies `snapshots` of `source` into this repository. Ids are keyed per repository,
    /// so every blob is read from the source, hashed with this repository's id function
    /// and stored unless this repository has it; the trees are rewritten with the new ids.
    /// A map from source to destination ids in this repository's cache directory makes a
    /// later copy read only what is new (an entry counts only while this repository still
    /// holds its blob). A snapshot copied before (one here names it as its `original`) is
    /// skipped. With repositories made with `init --copy-chunker-params`, chunk
    /// boundaries are the same, so data stored here already is not stored twice.
    public func copy(_ snapshots: [Snapshot], from source: Repository) throws -> CopyResult {
        var result = CopyResult()
        let present = Set(try self.snapshots().map { $0.original ?? $0.id })
        let map = try CopyMap(path: cacheDirectory(config.id) + "/copy-\(source.config.id).sqlite")
        let lock = try self.lock(exclusive: false)
        defer { withExtendedLifetime(lock) {} }
        for snapshot in snapshots {
            if present.contains(snapshot.original ?? snapshot.id) {
                result.snapshotsSkipped += 1
                continue
            }
            let (root, written) = try withBlobWriter(forSnapshot: true) { saver -> BlobID in
                let codec = makeCodec()
                /// The id here of a source blob, storing it when new.
                func mapped(_ id: BlobID, type: BlobType, bytes: () throws -> [UInt8]) throws -> BlobID {
                    if let known = try map.destination(of: id), try index.contains(known) {
                        saver.reuse([known])
                        return known
                    }
                    let raw = try bytes()
                    let new = raw.withUnsafeBytes { codec.id($0) }
                    if try saver.claim(new) {
                        try raw.withUnsafeBytes { try saver.addEncoding(new, type: type, raw: $0, codec: codec) }
                    }
                    try map.record(id, new)
                    return new
                }
                func tree(_ id: BlobID) throws -> BlobID {
                    try mapped(id, type: .tree) {
                        var nodes = try source.loadTree(id)
                        for i in nodes.indices {
                            switch nodes[i].type {
                            case .file:
                                nodes[i].content = try nodes[i].content.map { c in
                                    try mapped(c, type: .data) {
                                        let raw = try source.loadBlob(c)
                                        result.blobsRead += 1
                                        result.bytesRead += Int64(raw.count)
                                        return raw
                                    }
                                }
                            case .directory:
                                nodes[i].subtrees = try nodes[i].subtrees.map(tree)
                            default:
                                break
                            }
                        }
                        result.blobsRead += 1
                        // One source part is one part here: ids have the same length, so
                        // the entries split at the same places.
                        return TreeCodec.encodeSingle(nodes)
                    }
                }
                return try tree(snapshot.tree)
            }
            let record = Snapshot.encodeRecord(retagging: snapshot, tags: snapshot.tags, tree: root)
            _ = try commitSnapshot(record, references: written.references)
            try map.commit()
            result.snapshotsCopied += 1
            result.bytesAdded += written.bytesAdded
        }
        return result
    }
}

/// Source id → destination id, in SQLite in the destination's cache directory.
final class CopyMap {
    private let db: SQLiteDatabase
    private let find: SQLiteStatement
    private let insert: SQLiteStatement

    init(path: String) throws {
        try makeDirectories((path as NSString).deletingLastPathComponent, mode: 0o700)
        db = try SQLiteDatabase(path: path)
        try db.execute(
            """
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS map(src BLOB PRIMARY KEY, dst BLOB NOT NULL) WITHOUT ROWID;
            BEGIN
            """)
        find = try db.prepare("SELECT dst FROM map WHERE src = ?1")
        insert = try db.prepare("INSERT OR REPLACE INTO map(src, dst) VALUES(?1, ?2)")
    }

    func destination(of id: BlobID) throws -> BlobID? {
        find.reset()
        find.bind(1, id)
        defer { find.reset() }
        return try find.step() ? find.id(0) : nil
    }

    func record(_ source: BlobID, _ destination: BlobID) throws {
        insert.reset()
        insert.bind(1, source)
        insert.bind(2, destination)
        try insert.run()
    }

    /// Makes the entries so far durable (after their blobs are).
    func commit() throws { try db.execute("COMMIT; BEGIN") }

    deinit { try? db.execute("COMMIT") }
}
