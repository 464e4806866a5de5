import CABackupCore
import CABackupFormat
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

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
        let lock = try self.lock(exclusive: false)
        defer { withExtendedLifetime(lock) {} }
        return try index.sharingReads {
            let ((archiver, root), written) = try withBlobWriter(forSnapshot: true) { saver in
                let archiver = Archiver(
                    repository: self, saver: saver, options: options, excludes: rules, progress: progress)
                return (archiver, try archiver.walk(paths: paths))
            }
            return try archiver.commit(root: root, written: written)
        }
    }
}

/// The content of a regular file as its chunks are hashed: filled in by workers.
final class FileJob: @unchecked Sendable {
    // Safe: every field is read and written with the archiver's `cond` mutex held.
    var ids: [BlobID] = []
    var pending = 0
    var sealed = false
    var size: Int64 = 0
    var failed = false
    var isComplete: Bool { sealed && pending == 0 }
}

struct ChunkJob: Sendable {
    let buffer: SharedBuffer
    let offset: Int
    let length: Int
    let file: FileJob
    let index: Int
}

/// A file of at most ``Archiver/smallFileLimit`` bytes for a worker to open, read, chunk
/// and store whole; `size`, `mtimeNs` and `ctimeNs` are what the walk's `fstatat` saw.
struct SmallFileJob: Sendable {
    let entry: EntryRef
    let path: [UInt8]
    let size: Int64
    let mtimeNs: Int64
    let ctimeNs: Int64
    let file: FileJob
}

/// What the walk hands the workers.
enum WorkItem: Sendable {
    case chunk(ChunkJob)
    case smallFile(SmallFileJob)
}

/// A directory as the parent snapshot has it: its entries and the tree blobs holding them.
struct ParentDirectory {
    var entries: [Node]
    var trees: [BlobID]
}

/// A directory whose entries are known but whose files may still be in the pipeline.
final class PendingDirectory {
    enum Entry {
        case done(Node)
        case file(Node, FileJob)
        case directory(PendingDirectory)
    }

    var node: Node
    var entries: [Entry] = []
    /// The same directory in the parent snapshot, until finalized: when every entry
    /// turns out equal to its entries, its trees are reused instead of encoded again.
    var parent: ParentDirectory?
    var result: Node?
    var readyCursor = 0
    let isRoot: Bool

    init(node: Node, isRoot: Bool = false) {
        self.node = node
        self.isRoot = isRoot
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
    private let progress: ((SnapshotProgress) -> Void)?
    private let cond = Condition()
    private let chunkQueue: BlockingQueue<WorkItem>
    private let pool: BufferPool
    private let saver: BlobSaver
    private var workers: [pthread_t] = []
    private let chunksAdded = Atomic<Int>(0)
    /// Files and bytes read by workers (small files), and what could not be read there.
    private let smallFilesRead = Atomic<Int>(0)
    private let smallBytesRead = Atomic<Int64>(0)
    private let workerWarnings = Mutex<[SnapshotWarning]>([])
    private let workerFailure = Mutex<CABackupError?>(nil)

    private var finalizeQueue: [PendingDirectory] = []
    private var finalizeHead = 0
    /// Files with more than one link whose other links are still to come: the job that
    /// read the file and how many links were seen. An entry goes when its last link is
    /// seen, so the map holds only links still expected.
    private var hardLinks: [HardLinkKey: (job: FileJob, seen: UInt64)] = [:]
    /// Every chunk of the parent snapshot is known to be indexed.
    private var parentIsComplete = false
    private var warnings: [SnapshotWarning] = []
    private var summary = SnapshotSummary()
    private var bytesRead: Int64 = 0
    private var filesRead = 0
    private let start = monotonicSeconds()
    private var lastProgress = 0.0
    /// The walk's codec, for the trees it stores (parent trees load through the
    /// repository's pool of codecs and buffers).
    private let treeCodec: BlobCodec
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

    /// Test-only: `CABACKUP_TEST_MODIFY_DURING_READ=NAME` appends a byte to a file whose
    /// path ends in NAME after its first read window, to prove the change is caught.
    /// Compiled only into builds with the test hooks (debug builds, see `Package.swift`).
    static let modifyDuringReadForTests: [UInt8]? = {
        #if CABACKUP_TEST_HOOKS
            guard let s = getenv("CABACKUP_TEST_MODIFY_DURING_READ") else { return nil }
            return Array(String(cString: s).utf8)
        #else
            return nil
        #endif
    }()

    /// The size of a read window: the smallest that always makes progress with the
    /// default 8 MiB maximum chunk (see ``ChunkingReader/minimumWindow(maxChunk:readSize:)``).
    static let windowSize = 12 << 20
    /// Pooled windows: one hashed by the workers while the reader fills the other (it
    /// reads from the page cache far faster than two workers hash and compress). A third
    /// window measured no faster and cost 16 MB of peak RSS.
    static let windowCount = 2
    /// Files up to this size are read whole by a worker (see ``SmallFileJob``).
    static let smallFileLimit = 1 << 20

    init(
        repository: Repository, saver: BlobSaver, options: SnapshotOptions, excludes: ExcludeRules,
        progress: ((SnapshotProgress) -> Void)?
    ) {
        self.excludes = excludes
        self.repo = repository
        self.options = options
        self.progress = progress
        self.chunkQueue = BlockingQueue(capacity: 256)
        self.pool = BufferPool(
            bufferSize: max(
                Self.windowSize, ChunkingReader.minimumWindow(maxChunk: repository.config.chunker.maxSize)),
            maxCount: Self.windowCount)
        self.saver = saver
        self.treeCodec = repository.makeCodec()
    }

    /// Walks `paths` and stores their files and trees; returns the root directory. The
    /// workers have stopped when it returns or throws (the blob writer's scope needs that).
    func walk(paths: [String]) throws -> Node {
        do {
            return try walkChecked(paths: paths)
        } catch {
            shutdownWorkers()
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

        for _ in 0..<max(1, options.workers) {
            workers.append(startThread { [self] in self.workerLoop() })
        }
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
                let excludes = excludes
                let roots = absolute
                scanThread = startThread { scanner.scan(PathTrie(paths: roots), excludes: excludes) }
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
        // Without a parent every file is read and stated again before reading: listings
        // made ahead would only hold memory.
        if parentSnapshot == nil || options.force { options.prefetch?.finish() }
        let root: Node
        do {
            defer { options.prefetch?.finish() }
            root = try walkRoot(trie, parent: options.force ? nil : parentSnapshot)
        }
        shutdownWorkers()
        if let e = workerFailure.withLock({ $0 }) { throw e }
        return root
    }

    /// Commits the snapshot of `root` once the blob writer stored everything it was given.
    func commit(root: Node, written: BlobWriterTotals) throws -> SnapshotResult {
        // The last report has the final figures, however short the run was.
        reportProgress([], final: true)
        warnings += workerWarnings.withLock { $0 }
        bytesRead += smallBytesRead.load(ordering: .relaxed)
        filesRead += smallFilesRead.load(ordering: .relaxed)

        summary.chunksAdded = chunksAdded.load(ordering: .relaxed)
        summary.bytesTotal = bytesRead
        summary.errors = warnings.count
        summary.durationSeconds = monotonicSeconds() - start
        // bytes_added counts the record itself too; its size depends on the number, so
        // settle it by iterating until it is stable.
        var added = written.bytesAdded
        var record: [UInt8] = []
        for _ in 0..<4 {
            summary.bytesAdded = added
            record = Snapshot.encodeRecord(
                time: formatRFC3339(ns: startNs), hostname: hostname, username: currentUsername(), paths: absolute,
                tags: options.tags, parent: parent, tree: root.subtrees[0], summary: summary)
            let total = written.bytesAdded + Int64(record.count)
            if total == added { break }
            added = total
        }
        let snap = try repo.commitSnapshot(record, references: written.references)
        // Every chunk it names was indexed when found, or stored and indexed by now. Only
        // an optimization for the next run: the snapshot is saved whatever happens here.
        if let packsAtStart { try? repo.index.markComplete(snap.id, since: packsAtStart) }
        return SnapshotResult(snapshot: snap, warnings: warnings)
    }

    /// Stops and joins the workers (idempotent).
    private func shutdownWorkers() {
        chunkQueue.close()
        for w in workers { joinThread(w) }
        workers = []
    }

    // MARK: Walking (calling thread)

    private func walkRoot(_ trie: PathTrie, parent: Snapshot?) throws -> Node {
        rootParent = parent.flatMap { p in
            (try? repo.loadTree(p.tree)).map { ParentDirectory(entries: $0, trees: [p.tree]) }
        }
        var visitor = self
        guard let root = try FileSystemWalker(excludes: excludes).walk(trie, &visitor) else {
            throw CABackupError.invalidArgument("internal error: root directory not walked")
        }
        finalizeQueue.append(root.pending)
        try drainFinalizeQueue(blocking: true)
        guard let result = root.pending.result else {
            throw CABackupError.invalidArgument("internal error: root tree not finalized")
        }
        return result
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

    /// Reads a regular file and queues its chunks; `nil` (with a warning) when it
    /// cannot be opened or read.
    private func readFile(path: [UInt8], entry: EntryRef, st: stat) throws -> FileJob? {
        let fd = openForReading(entry)
        if fd < 0 {
            warn(path, errnoDescription(errno))
            return nil
        }
        defer { close(fd) }
        var fst = stat()
        if fstat(fd, &fst) != 0 || (fst.st_mode & S_IFMT) != S_IFREG {
            warn(path, "changed type while being backed up")
            return nil
        }
        reportProgress(path)
        let job = FileJob()
        let reader = ChunkingReader(
            chunker: repo.chunker, fd: fd, path: path, sizeHint: Int64(st.st_size), windowSize: pool.bufferSize,
            pool: pool)
        do {
            while let window = try reader.nextWindow() {
                for cut in window.cuts {
                    let index: Int = cond.locked {
                        job.ids.append(.zero)
                        job.pending += 1
                        return job.ids.count - 1
                    }
                    chunkQueue.push(
                        .chunk(
                            ChunkJob(
                                buffer: window.buffer, offset: cut.offset, length: cut.length, file: job, index: index))
                    )
                }
                if let e = workerFailure.withLock({ $0 }) { throw e }
                if window.buffer.count > 4 << 20 { reportProgress(path, pending: reader.bytesRead) }
                Self.modifyForTests(path)
            }
            // A file that changed while it was read would be stored half old, half new.
            if !isUnchanged(
                fd, size: Int64(st.st_size), mtimeNs: nanoseconds(st.st_mtim), ctimeNs: nanoseconds(st.st_ctim))
            {
                warn(path, "changed while being read; not stored (back it up again)")
                cond.locked {
                    job.failed = true
                    job.sealed = true
                }
                bytesRead += reader.bytesRead
                return nil
            }
        } catch {
            let error = CABackupError(error)
            if case .io = error {
                warn(path, errnoText(error))
                cond.locked {
                    job.failed = true
                    job.sealed = true
                }
                bytesRead += reader.bytesRead
                return nil
            }
            throw error
        }
        bytesRead += reader.bytesRead
        filesRead += 1
        cond.locked {
            job.size = reader.bytesRead
            job.sealed = true
        }
        return job
    }

    // MARK: Finalizing directories

    /// Encodes and stores the trees of directories whose files are all hashed, in
    /// post-order. With `blocking`, waits for all of them.
    private func drainFinalizeQueue(blocking: Bool) throws {
        while finalizeHead < finalizeQueue.count {
            let pd = finalizeQueue[finalizeHead]
            if !isReady(pd) {
                if !blocking { break }
                cond.lock()
                while !isReadyLocked(pd) { cond.wait() }
                cond.unlock()
            }
            try finalize(pd)
            finalizeHead += 1
            if finalizeHead > 1024 {
                finalizeQueue.removeFirst(finalizeHead)
                finalizeHead = 0
            }
        }
    }

    private func isReady(_ pd: PendingDirectory) -> Bool {
        cond.locked { isReadyLocked(pd) }
    }

    private func isReadyLocked(_ pd: PendingDirectory) -> Bool {
        while pd.readyCursor < pd.entries.count {
            if case .file(_, let job) = pd.entries[pd.readyCursor], !job.isComplete { return false }
            pd.readyCursor += 1
        }
        return true
    }

    private func finalize(_ pd: PendingDirectory) throws {
        var nodes: [Node] = []
        nodes.reserveCapacity(pd.entries.count)
        for e in pd.entries {
            switch e {
            case .done(let n):
                nodes.append(n)
                if n.type == .file { summary.filesTotal += 1 }
            case .file(var n, let job):
                let (ids, size, failed) = cond.locked { (job.ids, job.size, job.failed) }
                if failed { continue }
                n.content = ids
                n.size = UInt64(size)
                nodes.append(n)
                summary.filesTotal += 1
            case .directory(let sub):
                guard let r = sub.result else { continue }
                nodes.append(r)
                summary.directoriesTotal += 1
            }
        }
        pd.entries = []
        var node = pd.node
        if !pd.isRoot, let parent = pd.parent, nodes == parent.entries {
            // Nothing in it changed: the parent's trees, which were just loaded from the
            // repository, are this directory's too (equal entries encode to equal bytes).
            node.subtrees = parent.trees
            saver.reuse(parent.trees)
        } else {
            let parts = pd.isRoot ? [TreeCodec.encodeSingle(nodes)] : TreeCodec.encodeParts(nodes)
            node.subtrees = try parts.map { (p) throws in try storeTree(p) }
        }
        pd.parent = nil
        pd.result = node
    }

    private func storeTree(_ bytes: [UInt8]) throws -> BlobID {
        try bytes.withUnsafeBytes { (raw) throws in
            let id = treeCodec.id(raw)
            if try saver.claim(id) { try saver.addEncoding(id, type: .tree, raw: raw, codec: treeCodec) }
            return id
        }
    }

    // MARK: Workers

    private func workerLoop() {
        let codec = repo.makeCodec()
        let small = UnsafeMutableRawPointer.allocate(byteCount: Self.smallFileLimit + 1, alignment: 64)
        defer { small.deallocate() }
        while let item = chunkQueue.pop() {
            switch item {
            case .chunk(let job):
                let id = store(job.buffer.bytes(job.offset, job.length), codec: codec)
                cond.lock()
                job.file.ids[job.index] = id
                job.file.pending -= 1
                if job.file.isComplete { cond.broadcast() }
                cond.unlock()
            case .smallFile(let job):
                let (ids, size) = readSmallFile(job, into: small, codec: codec) ?? ([], -1)
                cond.lock()
                job.file.ids = ids
                job.file.size = max(0, size)
                job.file.failed = size < 0
                job.file.sealed = true
                cond.broadcast()
                cond.unlock()
            }
        }
    }

    /// Hashes a chunk and stores it when the repository lacks it. A repository error is
    /// kept for the walk to throw; the id is returned either way.
    private func store(_ raw: UnsafeRawBufferPointer, codec: BlobCodec) -> BlobID {
        let id = codec.id(raw)
        do {
            if try saver.claim(id) {
                try saver.addEncoding(id, type: .data, raw: raw, codec: codec)
                chunksAdded.add(1, ordering: .relaxed)
            }
        } catch {
            workerFailure.withLock { if $0 == nil { $0 = CABackupError(error) } }
        }
        return id
    }

    /// Opens, reads and stores a small file on a worker; returns its chunk ids and size,
    /// or `nil` (with a warning) when it cannot be read or changed while it was read.
    private func readSmallFile(
        _ job: SmallFileJob, into buffer: UnsafeMutableRawPointer, codec: BlobCodec
    ) -> ([BlobID], Int64)? {
        func skip(_ message: String) -> ([BlobID], Int64)? {
            workerWarnings.withLock { $0.append(SnapshotWarning(path: displayPath(job.path), message: message)) }
            return nil
        }
        let fd = openForReading(job.entry)
        if fd < 0 { return skip(errnoDescription(errno)) }
        defer { close(fd) }
        var st = stat()
        if fstat(fd, &st) != 0 || (st.st_mode & S_IFMT) != S_IFREG {
            return skip("changed type while being backed up")
        }
        // One byte more than expected: a file that grew is seen without a second read.
        let n: Int
        do {
            n = try readFully(fd, into: buffer, count: Int(job.size) + 1, path: job.path)
        } catch {
            return skip(errnoText(CABackupError(error)))
        }
        Self.modifyForTests(job.path)
        // A file that changed while it was read would be stored half old, half new.
        if Int64(n) != job.size || !isUnchanged(fd, size: job.size, mtimeNs: job.mtimeNs, ctimeNs: job.ctimeNs) {
            return skip("changed while being read; not stored (back it up again)")
        }
        let raw = UnsafeRawBufferPointer(start: buffer, count: n)
        var ids: [BlobID] = []
        var offset = 0
        while offset < n {
            let rest = UnsafeRawBufferPointer(rebasing: raw[offset...])
            let length = repo.chunker.nextCut(in: rest, isFinal: true)!
            ids.append(store(UnsafeRawBufferPointer(rebasing: rest[..<length]), codec: codec))
            offset += length
        }
        smallFilesRead.add(1, ordering: .relaxed)
        smallBytesRead.add(Int64(n), ordering: .relaxed)
        return (ids, Int64(n))
    }

    // MARK: Helpers

    /// Opens a regular file for reading, with `O_NOATIME` where the kernel allows it.
    /// `O_NONBLOCK`: if the entry was swapped for a FIFO since the walk's stat, the open
    /// must not hang (regular files ignore the flag; see ``readFully(_:into:count:path:)``).
    private func openForReading(_ entry: EntryRef) -> Int32 {
        func openEntry(_ flags: Int32) -> Int32 {
            openAt(entry.fd, entry.relative, { open($0, flags) }, at: { openat($0, $1, flags) })
        }
        let flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK
        let fd = openEntry(flags | openNoAtime)
        return fd < 0 && errno == EPERM ? openEntry(flags) : fd
    }

    /// Whether the open file still has the size, mtime and ctime the walk saw.
    private func isUnchanged(_ fd: Int32, size: Int64, mtimeNs: Int64, ctimeNs: Int64) -> Bool {
        var st = stat()
        return fstat(fd, &st) == 0 && Int64(st.st_size) == size && nanoseconds(st.st_mtim) == mtimeNs
            && nanoseconds(st.st_ctim) == ctimeNs
    }

    /// Test-only: appends a byte to the file named by `CABACKUP_TEST_MODIFY_DURING_READ`.
    private static func modifyForTests(_ path: [UInt8]) {
        guard let victim = modifyDuringReadForTests, path.count >= victim.count,
            Array(path.suffix(victim.count)) == victim
        else { return }
        _ = withCPath(path) { p in
            let wfd = open(p, O_WRONLY | O_APPEND)
            defer { close(wfd) }
            return write(wfd, "!", 1)
        }
    }

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
        let files = filesRead + smallFilesRead.load(ordering: .relaxed)
        let bytes = bytesRead + smallBytesRead.load(ordering: .relaxed) + pending
        var p = SnapshotProgress(
            filesDone: files, bytesRead: bytes, filesUnchanged: summary.filesUnchanged,
            bytesUnchanged: summary.bytesUnchanged, bytesAdded: saver.bytesAdded.load(ordering: .relaxed),
            elapsedSeconds: now - start, currentPath: displayPath(path),
            totalFiles: parentTotals?.files ?? scanner.files.load(ordering: .relaxed),
            totalBytes: parentTotals?.bytes ?? scanner.bytes.load(ordering: .relaxed),
            scanFinished: parentTotals != nil || scanner.finished.load(ordering: .relaxed),
            totalsFromParent: parentTotals != nil)
        if final {
            p.totalFiles = files + summary.filesUnchanged
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
        let pd = PendingDirectory(node: makeNode(name: directory.name, st: directory.stat), isRoot: directory.isRoot)
        if directory.isRoot {
            pd.parent = rootParent
        } else if var parent {
            // nil with --force: walkRoot passes no parent.
            pd.parent = parentDirectory(parent.parentEntry(directory.name))
        }
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
        switch node.type {
        case .file:
            if let content = unchangedContent(node, parent: parent, missing: directory.missing) {
                node.content = content
                summary.filesUnchanged += 1
                summary.bytesUnchanged += Int64(node.size)
                reportProgress(path)
                directory.pending.entries.append(.done(node))
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
                directory.pending.entries.append(.file(node, known.job))
                return .next
            }
            let job: FileJob
            if entry.stat.st_size <= Self.smallFileLimit {
                job = FileJob()
                reportProgress(path)
                chunkQueue.push(
                    .smallFile(
                        SmallFileJob(
                            entry: entry.entry, path: path, size: Int64(entry.stat.st_size), mtimeNs: node.mtimeNs,
                            ctimeNs: node.ctimeNs, file: job)))
            } else {
                guard let read = try readFile(path: path, entry: entry.entry, st: entry.stat) else { return .next }
                job = read
            }
            if node.links > 1 { hardLinks[HardLinkKey(node)] = (job, 1) }
            directory.pending.entries.append(.file(node, job))
            return .next
        case .directory:
            return .descend
        case .symlink:
            guard let target = readLinkTarget(entry.entry) else {
                warn(path, "cannot read link: \(errnoDescription(errno))")
                return .next
            }
            node.linkTarget = target
            directory.pending.entries.append(.done(node))
            return .next
        default:
            directory.pending.entries.append(.done(node))
            return .next
        }
    }

    func cannotStat(_ path: [UInt8], name: [UInt8], reason: String, in directory: inout BackupDirectory) {
        warn(path, reason)
    }

    /// A subdirectory is walked: its tree is encoded once its files are hashed.
    func leave(_ child: BackupDirectory, into parent: inout BackupDirectory) throws {
        finalizeQueue.append(child.pending)
        try drainFinalizeQueue(blocking: finalizeQueue.count - finalizeHead > 4096)
        parent.pending.entries.append(.directory(child.pending))
    }
}

/// The text of an I/O error without its path (the warning names the path already).
func errnoText(_ e: CABackupError) -> String {
    if case .io(let op, _, let code) = e { return "\(op): \(errnoDescription(code))" }
    return e.description
}

/// `O_NOATIME`: reading for a backup should not change access times (Linux only; the
/// caller retries without it when the kernel refuses, as it does for others' files).
#if os(Linux)
    let openNoAtime: Int32 = 0o1000000
#else
    let openNoAtime: Int32 = 0
#endif
