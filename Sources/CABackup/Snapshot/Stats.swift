import CABackupCore
import CABackupFormat

/// What `stats` counts (restic's modes of the same names).
public enum StatsMode: String, Sendable, CaseIterable {
    /// The files a restore of the snapshots would write: their count and bytes.
    case restoreSize = "restore-size"
    /// The unique blobs the snapshots reference: their count, raw and stored bytes.
    case rawData = "raw-data"
}

/// The figures of ``Repository/stats(_:mode:)``.
public struct RepositoryStats: Sendable, Equatable {
    public var snapshots = 0
    /// restore-size: files (every name of a hard-linked file) and directories, and the
    /// bytes their restore writes (a hard-linked file's bytes once per snapshot).
    public var files = 0
    public var directories = 0
    public var restoreBytes: Int64 = 0
    /// raw-data: unique data and tree blobs the snapshots reference, their bytes before
    /// compression and as stored (compressed, and sealed when encrypted).
    public var blobs = 0
    public var rawBytes: Int64 = 0
    public var storedBytes: Int64 = 0
    /// Bytes a restore writes per byte stored (raw-data: counted over the same
    /// snapshots, so it is deduplication and compression together).
    public var spaceSaving: Double { restoreBytes > 0 ? 1 - Double(storedBytes) / Double(restoreBytes) : 0 }

    public init() {}
}

extension Repository {
    /// Counts the snapshots' files (`.restoreSize`) or the unique blobs they reference
    /// (`.rawData`; the restore size is counted too, for the deduplication ratio). Each
    /// tree is loaded once whatever the number of snapshots sharing it; the set of blobs
    /// seen moves to a temporary SQLite file past a million ids, so memory stays bounded.
    ///
    /// - Throws: ``CABackupError/corrupt(what:reason:)`` for a damaged tree; a blob the
    ///   index does not know (run `check`).
    public func stats(_ snapshots: [Snapshot], mode: StatsMode) throws -> RepositoryStats {
        // The index was brought up to date when the repository was opened.
        var counter = StatsCounter(repo: self, mode: mode, seen: SpillingIDSet(memoryLimit: 1_000_000))
        let walker = SnapshotTreeWalker(self)
        for s in snapshots {
            counter.hardLinks = []
            try walker.walk(trees: [s.tree], path: [], &counter)
            counter.stats.snapshots += 1
        }
        return counter.stats
    }
}

/// Walks trees for ``Repository/stats(_:mode:)``.
private struct StatsCounter: TreeVisitor {
    let repo: Repository
    let mode: StatsMode
    let seen: SpillingIDSet
    var stats = RepositoryStats()
    /// Hard-linked files of the snapshot being walked whose bytes were counted.
    var hardLinks: Set<HardLinkKey> = []

    mutating func enterTree(_ id: BlobID, path: [UInt8]) throws -> Bool {
        // raw-data: a tree counts once; restore-size walks it in every snapshot.
        if mode == .rawData { try count(id) }
        return true
    }

    mutating func visit(_ node: Node, path: [UInt8]) throws -> TreeDecision {
        switch node.type {
        case .directory:
            stats.directories += 1
            return .descend
        case .file:
            stats.files += 1
            if node.links <= 1 || hardLinks.insert(HardLinkKey(node)).inserted {
                stats.restoreBytes += Int64(node.size)
            }
            if mode == .rawData { for id in node.content { try count(id) } }
        default:
            break
        }
        return .skip
    }

    /// Adds a blob the first time it is met.
    private mutating func count(_ id: BlobID) throws {
        guard try seen.insert(id) else { return }
        guard let location = try repo.index.lookup(id) else {
            throw CABackupError.corrupt(what: "blob \(id.hex)", reason: "referenced but not in the index (run check)")
        }
        stats.blobs += 1
        stats.rawBytes += Int64(location.rawLength)
        stats.storedBytes += Int64(location.length)
    }
}
