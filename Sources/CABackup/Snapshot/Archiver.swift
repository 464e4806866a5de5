import CABackupCore
import CABackupFormat
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

extension Repository {
    /// Backs up `paths` into a new snapshot.
    ///
    /// Relative paths are made absolute. Each is stored under its absolute path (restic's
    /// layout), so the snapshot's root tree holds their ancestors as directories. Only
    /// chunks the repository lacks are compressed and written. The snapshot record is
    /// written last: an interrupted run leaves only unreferenced packs, which the next
    /// run reuses.
    ///
    /// - Parameters:
    ///   - paths: files or directories to back up.
    ///   - options: tags, excludes, host name.
    ///   - progress: called on the calling thread a few times a second.
    /// - Returns: the snapshot and the entries that had to be skipped.
    /// - Throws: ``CABackupError/unreadableSource(path:reason:)`` when a top-level path is
    ///   missing or unreadable (nothing is written then); I/O errors from the repository.
    public func snapshot(
        paths: [String], options: SnapshotOptions = SnapshotOptions(),
        progress: ((SnapshotProgress) -> Void)? = nil
    ) throws -> SnapshotResult {
        guard !paths.isEmpty else {
            throw CABackupError.invalidArgument("no paths to back up: name at least one file or directory")
        }
        // Shared: snapshots only add, so they run side by side; prune (which deletes)
        // takes the lock exclusively and cannot run beside one.
        let rules = try ExcludeRules(
            excludes: options.excludes, caseInsensitiveExcludes: options.caseInsensitiveExcludes)
        let filter = try WalkFilter(options)
        let lock = try self.lock(exclusive: false)
        defer { withExtendedLifetime(lock) {} }
        return try index.sharingReads {
            let ((archiver, root), written) = try withBlobWriter(forSnapshot: true, dryRun: options.dryRun) { saver in
                let archiver = Archiver(
                    repository: self, saver: saver, options: options, excludes: rules, progress: progress)
                archiver.filter = filter
                return (archiver, try archiver.walk(paths: paths))
            }
            return try archiver.commit(root: root, written: written)
        }
    }
}

/// The identity of a file across its hard links.
struct HardLinkKey: Hashable {
    let device: UInt64
    let inode: UInt64

    init(_ node: Node) {
        device = node.device
        inode = node.inode
    }
}

/// Walks paths and turns them into trees and a snapshot.
///
/// Threads: the calling thread walks directories, reads files and cuts chunks (reading
/// from the page cache and the Gear loop are cheap); `workers` threads hash each chunk,
/// skip known ones, compress and pack new ones; the ``BlobSaver``'s writer thread stores
/// full packs. A directory's tree is encoded once all its files' chunks are hashed;
/// directories wait for that in a FIFO in post-order, so the walk never stalls on them.
/// Files of at most 1 MiB go to the workers whole: a worker opens, reads, chunks and stores
/// each (into a buffer of its own), so on a tree of small files the per-file system calls
/// run on both cores instead of all on the walking thread.
/// Memory is bounded by the two read windows, the queue and one small-file buffer per
/// worker.
// Safe: worker threads touch only `cond`-guarded jobs, the queue, the saver and atomics;
// everything else belongs to the calling thread.
final class Archiver: @unchecked Sendable {
    private let repo: Repository
    private let options: SnapshotOptions
    private let excludes: ExcludeRules
    var filter = WalkFilter.none
    private let progress: ((SnapshotProgress) -> Void)?
    private let saver: BlobSaver
    /// Reads files and stores their chunks; its `cond` guards every ``FileJob``.
    private let files: FileSaver
    /// Turns walked directories into tree blobs.
    private let trees: TreeSaver
    /// Files with more than one link whose other links are still to come: the job that
    /// read the file and how many links were seen. An entry goes when its last link is
    /// seen, so the map holds only links still expected.
    private var hardLinks: [HardLinkKey: (job: FileJob, seen: UInt64)] = [:]
    /// Every chunk of the parent snapshot is known to be indexed.
    private var parentIsComplete = false
    /// The parent snapshot records extended attributes, flags and holes, so an entry it
    /// has unchanged takes them from it; an older parent's are read again.
    private var parentHasMetadata = false
    private var warnings: [SnapshotWarning] = []
    private var summary = SnapshotSummary()
    private let start = monotonicSeconds()
    private var lastProgress = 0.0
    /// Every tree of this snapshot and the chunks of every file read by this run: what a
    /// server checks it holds before it accepts the record.
    private let scanner = SizeScanner()
    /// The root directory as the parent snapshot has it.
    private var rootParent: ParentDirectory?
    /// With a parent snapshot, its file and byte totals, shown instead of a scan's.
    private var parentTotals: (files: Int, bytes: Int64)?
    /// What the walk found out for the commit: when it began, the host, the absolute
    /// paths, the parent snapshot and the index's packs before it.
    private var startNs: Int64 = 0
    private var hostname = ""
    private var absolute: [String] = []
    private var parent: SnapshotID?
    private var packsAtStart: RepositoryIndex.PackState?

    init(
        repository: Repository, saver: BlobSaver, options: SnapshotOptions, excludes: ExcludeRules,
        progress: ((SnapshotProgress) -> Void)?
    ) {
        self.excludes = excludes
        self.repo = repository
        self.options = options
        self.progress = progress
        self.saver = saver
        self.files = FileSaver(repository: repository, writer: saver, workers: options.workers)
        self.trees = TreeSaver(files: files, writer: saver, codec: repository.makeCodec())
    }

    /// Walks `paths` and stores their files and trees; returns the root directory. The
    /// workers have stopped when it returns or throws (the blob writer's scope needs that).
    func walk(paths: [String]) throws -> Node {
        do {
            return try walkChecked(paths: paths)
        } catch {
            try? files.finish()
            throw error
        }
    }

    private func walkChecked(paths: [String]) throws -> Node {
        // A snapshot records the tree as of its time: the prefetch's start when listings
        // made ahead are used.
        startNs = min(wallClockNs(), options.prefetch?.startedNs ?? .max)
        // Check every top-level path first: a missing one is fatal and writes nothing.
        var absolute: [String] = []
        for p in paths {
            let abs = absolutePath(p)
            var st = stat()
            if lstat(abs, &st) != 0 { throw CABackupError.unreadableSource(path: p, reason: errnoDescription(errno)) }
            if (st.st_mode & S_IFMT) == S_IFDIR {
                guard let d = opendir(abs) else {
                    throw CABackupError.unreadableSource(path: p, reason: errnoDescription(errno))
                }
                closedir(d)
            } else if (st.st_mode & S_IFMT) == S_IFREG {
                let fd = open(abs, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW)
                if fd < 0 { throw CABackupError.unreadableSource(path: p, reason: errnoDescription(errno)) }
                close(fd)
            }
            if !absolute.contains(abs) { absolute.append(abs) }
        }
        let trie = PathTrie(paths: absolute)

        hostname = options.hostname ?? currentHostname()
        self.absolute = absolute
        packsAtStart = try? repo.index.packState()
        let parentSnapshot = try? repo.parentSnapshot(paths: absolute, hostname: hostname)
        parent = parentSnapshot?.id
        var scanThread: pthread_t?
        if progress != nil {
            if let parentSnapshot, !options.force {
                // The parent's totals estimate this run's: a scan would walk the tree a
                // second time beside the walk (+15-40% on an unchanged re-snapshot).
                let sum = parentSnapshot.summary
                parentTotals = (sum.filesTotal, sum.bytesTotal + sum.bytesUnchanged)
            } else {
                let scanner = scanner
                let (excludes, filter) = (excludes, filter)
                let roots = absolute
                scanThread = startThread { scanner.scan(PathTrie(paths: roots), excludes: excludes, filter: filter) }
            }
        }
        defer {
            scanner.stop.store(true, ordering: .relaxed)
            if let t = scanThread { joinThread(t) }
        }
        // A parent whose every chunk is known to be indexed (see RepositoryIndex.isComplete)
        // needs no lookup per chunk to trust its unchanged files.
        if let parentSnapshot, !options.force, (try? repo.index.isComplete(parentSnapshot.id)) == true {
            parentIsComplete = true
        }
        parentHasMetadata = parentSnapshot?.recordsExtendedMetadata ?? false
        // Without a parent every file is read and stated again before reading: listings
        // made ahead would only hold memory.
        if parentSnapshot == nil || options.force { options.prefetch?.finish() }
        let root: Node
        do {
            defer { options.prefetch?.finish() }
            root = try walkRoot(trie, parent: options.force ? nil : parentSnapshot)
        }
        try files.finish()
        return root
    }

    /// Commits the snapshot of `root` once the blob writer stored everything it was given.
    func commit(root: Node, written: BlobWriterTotals) throws -> SnapshotResult {
        // The last report has the final figures, however short the run was.
        reportProgress([], final: true)
        warnings += files.warnings

        summary.chunksAdded = files.chunksAdded.load(ordering: .relaxed)
        summary.filesTotal = trees.filesTotal
        summary.directoriesTotal = trees.directoriesTotal
        summary.bytesTotal = files.bytesRead + files.smallBytesRead.load(ordering: .relaxed)
        summary.errors = warnings.count
        summary.durationSeconds = monotonicSeconds() - start
        let snap = try repo.commitRecord(
            time: startNs, hostname: hostname, paths: absolute, tags: options.tags, parent: parent,
            tree: root.subtrees[0], summary: summary, written: written, dryRun: options.dryRun)
        if options.dryRun { return SnapshotResult(snapshot: snap, warnings: warnings) }
        // Every chunk it names was indexed when found, or stored and indexed by now. Only
        // an optimization for the next run: the snapshot is saved whatever happens here.
        if let packsAtStart { try? repo.index.markComplete(snap.id, since: packsAtStart) }
        return SnapshotResult(snapshot: snap, warnings: warnings)
    }

    // MARK: Walking (calling thread)

    private func walkRoot(_ trie: PathTrie, parent: Snapshot?) throws -> Node {
        rootParent = parent.flatMap { p in
            (try? repo.loadTree(p.tree)).map { ParentDirectory(entries: $0, trees: [p.tree]) }
        }
        var visitor = self
        guard let root = try FileSystemWalker(excludes: excludes, filter: filter).walk(trie, &visitor) else {
            throw CABackupError.invalidArgument("internal error: root directory not walked")
        }
        return try trees.finish(root: root.pending)
    }

    /// The entries of a directory of the parent snapshot; `nil` when there is none or it
    /// cannot be loaded (then everything below is read, as without a parent).
    private func parentDirectory(_ node: Node?) -> ParentDirectory? {
        guard let node, node.type == .directory,
            let entries = try? repo.loadDirectory(node)
        else { return nil }
        return ParentDirectory(entries: entries, trees: node.subtrees)
    }

    /// A file's content is the parent snapshot's when ``Node/hasUnchangedContent(since:)``
    /// says so and every chunk it names is still in the index.
    private func unchangedContent(_ node: Node, parent: Node?, missing: Set<BlobID>) -> [BlobID]? {
        guard let p = parent, node.hasUnchangedContent(since: p) else { return nil }
        if !missing.isEmpty && p.content.contains(where: missing.contains) { return nil }
        return p.content
    }

    // MARK: Helpers

    private func warn(_ path: [UInt8], _ message: String, outcome: SnapshotWarning.Outcome = .skipped) {
        warnings.append(SnapshotWarning(path: displayPath(path), message: message, outcome: outcome))
    }

    /// Calls the progress callback at most five times a second; `pending` counts bytes
    /// of the current file read so far. The `final` report (always made) has the whole
    /// run's figures as its totals.
    private func reportProgress(_ path: [UInt8], pending: Int64 = 0, final: Bool = false) {
        guard let progress else { return }
        let now = monotonicSeconds()
        if now - lastProgress < 0.2 && !final { return }
        lastProgress = now
        let filesDone = files.filesRead + files.smallFilesRead.load(ordering: .relaxed)
        let bytes = files.bytesRead + files.smallBytesRead.load(ordering: .relaxed) + pending
        var p = SnapshotProgress(
            filesDone: filesDone, bytesRead: bytes, filesUnchanged: summary.filesUnchanged,
            bytesUnchanged: summary.bytesUnchanged, bytesAdded: saver.bytesAdded.load(ordering: .relaxed),
            elapsedSeconds: now - start, currentPath: displayPath(path),
            totalFiles: parentTotals?.files ?? scanner.files.load(ordering: .relaxed),
            totalBytes: parentTotals?.bytes ?? scanner.bytes.load(ordering: .relaxed),
            scanFinished: parentTotals != nil || scanner.finished.load(ordering: .relaxed),
            totalsFromParent: parentTotals != nil)
        if final {
            p.totalFiles = filesDone + summary.filesUnchanged
            p.totalBytes = bytes + summary.bytesUnchanged
            p.scanFinished = true
        }
        progress(p)
    }
}

/// A directory being walked by the archiver.
struct BackupDirectory {
    let pending: PendingDirectory
    /// The same directory's entries in the parent snapshot (sorted by name), and how far
    /// the walk has got in them.
    let parentEntries: [Node]
    var cursor = 0
    /// Chunks the parent names but the index lacks (pruned, damaged): files using them
    /// are read again. Local to this directory (subdirectories have their own).
    let missing: Set<BlobID>

    /// The parent snapshot's entry named `name`. Names come in sorted order, so the
    /// cursor only moves forward; asking twice for one name gives the same entry.
    mutating func parentEntry(_ name: [UInt8]) -> Node? {
        while cursor < parentEntries.count && parentEntries[cursor].name.lexicographicallyPrecedes(name) {
            cursor += 1
        }
        return cursor < parentEntries.count && parentEntries[cursor].name == name ? parentEntries[cursor] : nil
    }
}

extension Archiver: FileSystemVisitor {
    func enter(
        _ directory: WalkDirectory, listing: inout DirectoryListing, parent: BackupDirectory?
    ) throws
        -> BackupDirectory?
    {
        var node = makeNode(name: directory.name, st: directory.stat)
        var parentNode: Node?
        if !directory.isRoot, var parent {
            // nil with --force: walkRoot passes no parent.
            parentNode = parent.parentEntry(directory.name)
        }
        if parentHasMetadata, let p = parentNode, p.hasUnchangedMetadata(since: node) {
            node.xattrs = p.xattrs
            node.flags = p.flags
        } else if let handle = directory.handle {
            node.xattrs = FileMetadata.xattrs(fd: handle.fd)
            node.flags = FileMetadata.flags(fd: handle.fd)
        } else {
            node.xattrs = FileMetadata.xattrs(of: directory.entry)
        }
        let pd = PendingDirectory(node: node, isRoot: directory.isRoot)
        pd.parent = directory.isRoot ? rootParent : parentDirectory(parentNode)
        if let error = listing.error {
            warn(directory.path, errnoText(error), outcome: .storedEmpty)
        }
        let entries = pd.parent?.entries ?? []
        let missing = parentIsComplete ? [] : try repo.index.missing(entries.flatMap(\.content))
        return BackupDirectory(pending: pd, parentEntries: entries, missing: missing)
    }

    func listing(ofOpenDirectory fd: Int32, path: [UInt8]) -> PrefetchedDirectory? {
        options.prefetch?.take(directory: fd, path: path)
    }

    /// Records an entry and, for a file that changed, queues it.
    func visit(_ entry: inout WalkEntry, in directory: inout BackupDirectory) throws -> WalkStep {
        let parent = directory.parentEntry(entry.name)
        let path = entry.path
        var node = makeNode(name: entry.name, st: entry.stat)
        if options.excludeNodump && (node.type == .file || node.type == .directory) {
            // The parent's flags when its ctime is the same (chattr moves the ctime).
            let nodump =
                if parentHasMetadata, let parent, parent.hasUnchangedMetadata(since: node) {
                    parent.flags & InodeFlags.nodump != 0
                } else {
                    FileMetadata.isNodump(entry.entry, directory: node.type == .directory)
                }
            if nodump { return .next }
        }
        switch node.type {
        case .file:
            if let content = unchangedContent(node, parent: parent, missing: directory.missing) {
                node.content = content
                // The same ctime: its attributes and flags are unchanged too (setting
                // either moves the ctime). A parent from before they were kept has none.
                if parentHasMetadata, let parent {
                    node.xattrs = parent.xattrs
                    node.flags = parent.flags
                    node.dataRanges = parent.dataRanges
                } else {
                    readExtras(of: &node, entry: entry.entry)
                }
                summary.filesUnchanged += 1
                summary.bytesUnchanged += Int64(node.size)
                options.onFile?(SnapshotFileEvent(action: .unchanged, pathBytes: path, size: Int64(node.size)))
                reportProgress(path)
                try add(.done(node), to: directory)
                return .next
            }
            if entry.statFromListing {
                // To be read: stat it now, so the check after reading compares with
                // what was current when reading began, not when the prefetch listed it.
                if let e = entry.restat() {
                    warn(path, errnoDescription(e))
                    return .next
                }
                return try visit(&entry, in: &directory)
            }
            if node.links > 1, let known = hardLinks[HardLinkKey(node)] {
                if known.seen + 1 >= node.links {
                    hardLinks[HardLinkKey(node)] = nil
                } else {
                    hardLinks[HardLinkKey(node)] = (known.job, known.seen + 1)
                }
                try add(.file(node, known.job), to: directory)
                return .next
            }
            let action: SnapshotFileEvent.Action = parent == nil ? .new : .changed
            options.onFile?(SnapshotFileEvent(action: action, pathBytes: path, size: Int64(node.size)))
            let job: FileJob
            if entry.stat.st_size <= FileSaver.smallFileLimit {
                job = FileJob()
                reportProgress(path)
                files.saveSmall(
                    SmallFileJob(
                        entry: entry.entry, path: path, size: Int64(entry.stat.st_size), mtimeNs: node.mtimeNs,
                        ctimeNs: node.ctimeNs, file: job))
            } else {
                let outcome = try files.save(path: path, entry: entry.entry, st: entry.stat) { done in
                    reportProgress(path, pending: done)
                }
                switch outcome {
                case .queued(let read): job = read
                case .skipped(let reason):
                    warn(path, reason)
                    return .next
                }
            }
            if node.links > 1 { hardLinks[HardLinkKey(node)] = (job, 1) }
            try add(.file(node, job), to: directory)
            return .next
        case .directory:
            return .descend
        case .symlink:
            guard let target = readLinkTarget(entry.entry) else {
                warn(path, "cannot read link: \(errnoDescription(errno))")
                return .next
            }
            node.linkTarget = target
            addXattrs(to: &node, entry: entry.entry, parent: parent)
            try add(.done(node), to: directory)
            return .next
        default:
            addXattrs(to: &node, entry: entry.entry, parent: parent)
            try add(.done(node), to: directory)
            return .next
        }
    }

    /// A symlink's or special file's extended attributes: the parent snapshot's when its
    /// ctime is the same, else read (by path, without opening it).
    private func addXattrs(to node: inout Node, entry: EntryRef, parent: Node?) {
        if parentHasMetadata, let parent, parent.hasUnchangedMetadata(since: node) {
            node.xattrs = parent.xattrs
        } else {
            node.xattrs = FileMetadata.xattrs(of: entry)
        }
    }

    /// An unchanged file's attributes, flags and holes, read once when the parent snapshot
    /// predates them (the file is opened, not read).
    private func readExtras(of node: inout Node, entry: EntryRef) {
        let flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK
        let fd = openAt(entry.fd, entry.relative, { open($0, flags) }, at: { openat($0, $1, flags) })
        guard fd >= 0 else {
            node.xattrs = FileMetadata.xattrs(of: entry)
            return
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return }
        let extras = FileExtras(fd: fd, st: st)
        node.xattrs = extras.xattrs
        node.flags = extras.flags
        node.dataRanges = extras.dataRanges
    }

    func cannotStat(_ path: [UInt8], name: [UInt8], reason: String, in directory: inout BackupDirectory) {
        warn(path, reason)
    }

    /// A subdirectory is walked: its tree is encoded once its files are hashed.
    func leave(_ child: BackupDirectory, into parent: inout BackupDirectory) throws {
        try trees.add(child.pending)
        try add(.directory(child.pending), to: parent)
    }

    private func add(_ entry: PendingDirectory.Entry, to directory: BackupDirectory) throws {
        directory.pending.entries.append(entry)
        try trees.entryAdded(to: directory.pending)
    }
}
