import CABackupCore
import CABackupFormat

/// Options for ``Repository/snapshot(paths:options:progress:)``.
public struct SnapshotOptions: Sendable {
    /// Tags recorded with the snapshot.
    public var tags: [String]
    /// Exclude patterns, restic's rules (see `docs/excludes.md`): `*.log`, `docs/*.txt`,
    /// `/home/*/.cache`, `**/node_modules`, `!keep.log`.
    public var excludes: [String]
    /// Exclude patterns matched without regard to case (`--iexclude`).
    public var caseInsensitiveExcludes: [String]
    /// The host name recorded; the machine's by default.
    public var hostname: String?
    /// Worker threads that hash and compress; by default one per CPU the process may use
    /// (affinity mask and cgroup quota, see `usableCPUCount()`).
    public var workers: Int
    /// Read every file, even those unchanged since the parent snapshot.
    public var force: Bool
    /// Directory listings made ahead of the walk (see ``TreePrefetch``); finished when
    /// the walk is done.
    public var prefetch: TreePrefetch?
    /// Leave out regular files larger than this many bytes (restic's `--exclude-larger-than`).
    public var excludeLargerThan: Int64?
    /// Do not cross into other file systems below the paths: a mount point is stored as
    /// an empty directory (restic's `--one-file-system`).
    public var oneFileSystem = false
    /// Leave out the contents of directories tagged with a `CACHEDIR.TAG` file that starts
    /// with the standard signature, keeping the tag file (restic's `--exclude-caches`).
    public var excludeCaches = false
    /// `NAME` or `NAME:HEADER`: leave out the contents of a directory holding a file
    /// `NAME` (that starts with `HEADER`, when given), except that file (restic's
    /// `--exclude-if-present`).
    public var excludeIfPresent: [String] = []
    /// Leave out files and directories with the Linux nodump flag (`chattr +d`), as
    /// borg's `--exclude-nodump` and dump(8) do.
    public var excludeNodump = false
    /// Walk, read and chunk everything, count what would be added, but write nothing to
    /// the repository: the result's snapshot is not stored.
    public var dryRun = false
    /// Called on the walking thread for each regular file: read (new or changed) or
    /// found unchanged since the parent snapshot.
    public var onFile: (@Sendable (SnapshotFileEvent) -> Void)?

    public init(
        tags: [String] = [], excludes: [String] = [], caseInsensitiveExcludes: [String] = [],
        hostname: String? = nil, force: Bool = false, workers: Int? = nil
    ) {
        self.tags = tags
        self.excludes = excludes
        self.caseInsensitiveExcludes = caseInsensitiveExcludes
        self.hostname = hostname
        self.force = force
        self.workers = workers ?? usableCPUCount()
    }

    /// Checks the patterns and exclusion options without walking anything.
    /// - Throws: ``CABackupError/invalidArgument(_:)`` naming the first bad one.
    public func validate() throws {
        _ = try ExcludeRules(excludes: excludes, caseInsensitiveExcludes: caseInsensitiveExcludes)
        _ = try WalkFilter(self)
    }
}

/// A regular file a snapshot reached (see ``SnapshotOptions/onFile``).
public struct SnapshotFileEvent: Sendable {
    public enum Action: String, Sendable {
        /// Not in the parent snapshot: read.
        case new
        /// In the parent snapshot but changed since: read.
        case changed
        /// Unchanged since the parent snapshot: not read.
        case unchanged
    }

    public var action: Action
    /// The absolute path's bytes.
    public var pathBytes: [UInt8]
    /// Its size in bytes.
    public var size: Int64

    /// The absolute path, names that are not UTF-8 escaped as `\xNN` (made when asked
    /// for: the walk only passes the bytes it has).
    public var path: String { displayPath(pathBytes) }
}

/// Progress of a running snapshot, reported a few times a second.
public struct SnapshotProgress: Sendable {
    /// Files read so far, and their bytes.
    public var filesDone: Int
    public var bytesRead: Int64
    /// Files found unchanged since the parent snapshot (not read), and their bytes.
    public var filesUnchanged: Int = 0
    public var bytesUnchanged: Int64 = 0
    public var bytesAdded: Int64
    public var elapsedSeconds: Double
    /// The file being read.
    public var currentPath: String
    /// Files and bytes below the paths, for a rate and an ETA: without a parent snapshot,
    /// counted by a scan running beside the backup (final once ``scanFinished`` is
    /// `true`); with one, the parent's totals (``totalsFromParent``), an estimate that
    /// costs no second walk of the tree.
    public var totalFiles: Int
    public var totalBytes: Int64
    public var scanFinished: Bool
    public var totalsFromParent: Bool = false
}

/// An entry that could not be read, and what the snapshot holds for it instead.
public struct SnapshotWarning: Sendable, CustomStringConvertible {
    /// What the snapshot holds for an entry that could not be read.
    public enum Outcome: Sendable, Equatable {
        /// The entry is not in the snapshot.
        case skipped
        /// A directory that could not be listed: stored with its metadata and no entries.
        case storedEmpty
    }

    public var path: String
    public var message: String
    public var outcome: Outcome = .skipped
    public var description: String {
        "\(path): \(message)" + (outcome == .storedEmpty ? " (stored as an empty directory)" : "")
    }
}

/// The outcome of a snapshot.
public struct SnapshotResult: Sendable {
    /// The committed snapshot, with its summary.
    public var snapshot: Snapshot
    /// Entries skipped because they could not be read (exit code 3 in the CLI).
    public var warnings: [SnapshotWarning]
}
