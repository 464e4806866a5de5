import CABackupCore
import CABackupFormat
import CSQLite

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// What prune did (or, with `dryRun`, would do).
public struct PruneReport: Sendable, Equatable {
    /// Packs deleted because nothing uses them.
    public var packsDeleted = 0
    /// Packs whose used blobs were copied into new packs before they were deleted.
    public var packsRepacked = 0
    /// New packs the repacking wrote.
    public var packsWritten = 0
    /// Bytes freed: deleted and repacked packs, less the new packs.
    public var bytesFreed: Int64 = 0
    /// Blobs no snapshot uses that are gone afterwards.
    public var blobsRemoved = 0
    /// Packs kept though some of their blobs are unused (used above the repack threshold).
    public var packsPartlyUsed = 0
    /// The stored bytes of unused blobs left inside those packs.
    public var bytesUnusedKept: Int64 = 0
    /// Leftover temporary files of crashed writers that were removed.
    public var temporaryFilesRemoved = 0
}

extension Repository {
    /// Splits snapshots (matching `filter`) into those `policy` keeps and those it removes,
    /// per group of snapshots that share what `groupBy` names (host and paths by default).
    public func forgetPlan(
        _ policy: ForgetPolicy, matching filter: SnapshotFilter = SnapshotFilter(),
        groupBy: SnapshotGrouping = .default
    ) throws -> ForgetPlan {
        ForgetPlan(try snapshots(matching: filter), policy: policy, groupBy: groupBy, now: wallClockNs())
    }

    /// Removes snapshot records (their data stays until ``prune(dryRun:repackBelow:assumingForgotten:)``).
    public func forget(_ snapshots: [Snapshot]) throws {
        guard !snapshots.isEmpty else { return }
        try checkCanDelete()
        // First the authenticated record of what is removed on purpose, so no device takes
        // these removals for a storage rolling the repository back.
        try writeForgetRecord(snapshots.map(\.id))
        for s in snapshots {
            try storage.remove(.snapshot, s.id.hex)
            try index.removeSnapshot(s.id)
        }
    }

    /// Removes data no snapshot references: packs with no used blob are deleted; packs
    /// with more than `repackBelow` of their bytes unused have their used blobs copied
    /// (verified) into new packs, then are deleted. New packs are durable and indexed
    /// before any old pack is deleted, so an interruption loses nothing. A blob stored in
    /// several packs is kept once (the copies an interrupted prune leaves).
    ///
    /// Takes the repository lock exclusively: it refuses to run beside a snapshot, so it
    /// can never delete a blob a running snapshot has just decided to reuse.
    ///
    /// - Throws: ``CABackupError/locked(_:)`` while a snapshot runs; a damaged tree aborts
    ///   prune before anything is deleted (run `check`).
    ///
    /// A dry run changes nothing and reports exactly what the run would do, figures
    /// included; `assumingForgotten` names snapshots it treats as already removed, so
    /// `forget --dry-run --prune` predicts what `forget --prune` frees.
    public func prune(
        dryRun: Bool = false, repackBelow usedFraction: Double = 0.8, assumingForgotten: Set<SnapshotID> = []
    ) throws -> PruneReport {
        try prune(
            dryRun: dryRun, repackBelow: usedFraction, assumingForgotten: assumingForgotten, idsInMemory: 1_000_000)
    }

    /// ``prune(dryRun:repackBelow:assumingForgotten:)`` keeping at most `idsInMemory` used
    /// blob ids in memory (about 70 bytes each) before the set moves to a temporary SQLite file.
    func prune(
        dryRun: Bool, repackBelow usedFraction: Double, assumingForgotten: Set<SnapshotID> = [], idsInMemory: Int
    ) throws -> PruneReport {
        precondition(dryRun || assumingForgotten.isEmpty, "only a dry run may assume snapshots are gone")
        if !dryRun { try checkCanDelete() }
        let lock = try self.lock(exclusive: true)
        defer { withExtendedLifetime(lock) {} }
        try synchronizeIndex()
        var report = PruneReport()

        // Everything any snapshot needs. A tree that cannot be read stops prune: deleting
        // on the strength of a partial walk could delete what that tree needs.
        let used = SpillingIDSet(memoryLimit: idsInMemory)
        var marker = UsedBlobMarker(used: used)
        let walker = SnapshotTreeWalker(self)
        for s in try snapshots() where !assumingForgotten.contains(s.id) {
            try walker.walk(trees: [s.tree], path: [], &marker)
        }

        var deletions: [(PackID, Int64)] = []
        var repacks: [(PackID, [PackEntry])] = []
        for pack in try storage.list(.pack).compactMap({ ObjectID(hex: $0) }).sorted() {
            let entries = try readPackHeader(pack)
            let size = try storage.size(.pack, pack.hex)
            // Each used blob is kept once: the first pack holding it claims it, and a copy
            // in a later pack counts as unused. Copies come from an interrupted prune (its
            // new packs were written, the old ones not yet deleted) or from two snapshots
            // storing the same new blob at once; kept as live, they would never go.
            let live = try entries.filter { try used.remove($0.id) }
            let liveBytes = live.reduce(0) { $0 + $1.length }
            let total = max(1, entries.reduce(0) { $0 + $1.length })
            report.blobsRemoved += entries.count - live.count
            if live.isEmpty {
                deletions.append((pack, size))
            } else if Double(liveBytes) / Double(total) < usedFraction {
                repacks.append((pack, live))
                deletions.append((pack, size))
            } else if live.count < entries.count {
                report.packsPartlyUsed += 1
                report.bytesUnusedKept += Int64(entries.reduce(0) { $0 + $1.length } - liveBytes)
            }
        }
        report.packsDeleted = deletions.count - repacks.count
        report.packsRepacked = repacks.count
        if dryRun {
            // The new packs the repacking would write, packed the way BlobSaver packs one
            // writer's blobs: per type, a pack is sealed once it reaches the pack size.
            let (packs, bytes) = repackedSizes(repacks.flatMap(\.1))
            report.packsWritten = packs
            report.bytesFreed = deletions.reduce(0) { $0 + $1.1 } - bytes
            return report
        }

        // Copy the live blobs of packs being repacked, verifying each on the way.
        if !repacks.isEmpty {
            let codec = makeCodec()
            let buffers = BlobBuffers()
            let (_, written) = try withBlobWriter { saver in
                for (pack, live) in repacks {
                    for e in live {
                        // Verified on the way; its stored bytes are copied as they are.
                        let loc = BlobLocation(pack: pack, entry: e)
                        _ = try loadBlob(e.id, at: loc, into: buffers, codec: codec)
                        try saver.add(
                            e.id, type: e.type, compression: e.compression, rawLength: e.rawLength,
                            bytes: buffers.stored)
                    }
                }
            }
            report.packsWritten = written.packsAdded
            report.bytesFreed -= written.bytesAdded
        }
        // The index forgets them first: a crash before a file is removed leaves a pack
        // the next open indexes again (a duplicate, never a blob the index places nowhere).
        try index.removePacks(deletions.map(\.0))
        for (pack, size) in deletions {
            try storage.remove(.pack, pack.hex)
            report.bytesFreed += size
        }
        // Leftovers in tmp/ of writers that were killed (a live writer's are locked).
        report.temporaryFilesRemoved = TemporaryFiles.removeStale(in: stagingDirectory)
        return report
    }
}

extension Repository {
    /// The number and total size of the packs one writer makes from `entries`, added in
    /// order (what ``BlobSaver`` does for prune's repacking).
    func repackedSizes(_ entries: [PackEntry]) -> (packs: Int, bytes: Int64) {
        var open: [BlobType: (bytes: Int, count: Int)] = [:]
        var packs = 0
        var bytes: Int64 = 0
        let sealed = makeAEAD() != nil
        func close(_ p: (bytes: Int, count: Int)) {
            packs += 1
            bytes += Int64(p.bytes + PackFormat.encodedHeaderSize(count: p.count, sealed: sealed))
        }
        for e in entries {
            var p = open[e.type] ?? (0, 0)
            p.bytes += e.length
            p.count += 1
            if PackFormat.isFull(bytes: p.bytes, blobs: p.count, packSize: config.packSize) {
                close(p)
                open[e.type] = nil
            } else {
                open[e.type] = p
            }
        }
        for (_, p) in open { close(p) }
        return (packs, bytes)
    }
}

/// Prune's mark: every tree and blob a snapshot needs goes into `used`; a tree already
/// there is not walked again. An unreadable tree throws (the default), so prune never
/// deletes on the strength of a partial walk.
private struct UsedBlobMarker: TreeVisitor {
    let used: SpillingIDSet

    mutating func enterTree(_ id: BlobID, path: [UInt8]) throws -> Bool { try used.insert(id) }

    mutating func visit(_ node: Node, path: [UInt8]) throws -> TreeDecision {
        if node.type == .directory { return .descend }
        for c in node.content { _ = try used.insert(c) }
        return .skip
    }
}

/// A set of blob ids kept in memory up to a limit, then moved to a private temporary
/// SQLite database (a file SQLite deletes when it closes) whose page cache bounds the
/// memory: prune's set of used blobs grows with the repository, ~70 bytes an id in a
/// Swift set, 0.7 GB for a 10M-blob repository.
final class SpillingIDSet {
    private var memory = Set<BlobID>()
    private let memoryLimit: Int
    private var disk: (db: SQLiteDatabase, insert: SQLiteStatement, remove: SQLiteStatement)?

    init(memoryLimit: Int) { self.memoryLimit = memoryLimit }

    /// Whether the set holds ids on disk.
    var spilled: Bool { disk != nil }

    /// Adds `id`; `false` when the set held it already.
    func insert(_ id: BlobID) throws -> Bool {
        if let disk {
            disk.insert.bind(1, id)
            try disk.insert.run()
            return sqlite3_changes(disk.db.handle) > 0
        }
        guard memory.insert(id).inserted else { return false }
        if memory.count > memoryLimit { try spill() }
        return true
    }

    /// Removes `id`; `false` when the set did not hold it.
    func remove(_ id: BlobID) throws -> Bool {
        if let disk {
            disk.remove.bind(1, id)
            try disk.remove.run()
            return sqlite3_changes(disk.db.handle) > 0
        }
        return memory.remove(id) != nil
    }

    private func spill() throws {
        let db = try SQLiteDatabase(path: "")
        try db.execute(
            """
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16384;
            CREATE TABLE ids(id BLOB PRIMARY KEY) WITHOUT ROWID; BEGIN
            """)
        let insert = try db.prepare("INSERT OR IGNORE INTO ids VALUES(?1)")
        for id in memory {
            insert.bind(1, id)
            try insert.run()
        }
        memory = []
        disk = (db, insert, try db.prepare("DELETE FROM ids WHERE id = ?1"))
    }
}
