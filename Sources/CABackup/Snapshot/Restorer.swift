import CABackupCore
import CABackupFormat
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Options for ``Repository/restore(_:to:options:progress:)``.
public struct RestoreOptions: Sendable {
    /// Absolute paths inside the snapshot to restore (with everything below them);
    /// empty restores everything.
    public var includes: [String]
    /// Restore into a non-empty target, replacing entries of the same name.
    public var overwrite: Bool
    /// Threads writing files; by default one per core.
    public var workers: Int

    public init(includes: [String] = [], overwrite: Bool = false, workers: Int? = nil) {
        self.includes = includes
        self.overwrite = overwrite
        self.workers = workers ?? usableCPUCount()
    }
}

/// Progress of a running restore.
public struct RestoreProgress: Sendable {
    public var filesDone: Int
    public var bytesWritten: Int64
    public var elapsedSeconds: Double
}

/// An entry that could not be restored.
public struct RestoreFailure: Sendable, CustomStringConvertible {
    /// The path inside the snapshot.
    public var path: String
    public var message: String
    public var description: String { "\(path): \(message)" }
}

/// The outcome of a restore.
public struct RestoreResult: Sendable {
    /// Regular files restored, each name of a hard-linked file counted (as a snapshot's
    /// `filesTotal` counts them).
    public var filesRestored: Int
    /// Of those, names created as hard links to a file restored before.
    public var hardLinksRestored: Int
    public var directoriesRestored: Int
    public var bytesWritten: Int64
    /// Entries that failed; a damaged file is removed rather than left with wrong bytes.
    public var failures: [RestoreFailure]
}

/// One entry met while walking a snapshot: its absolute path in the snapshot (bytes)
/// and its node.
public struct TreeEntry: Sendable {
    public var path: [UInt8]
    public var node: Node
    /// The path as text, invalid UTF-8 escaped as `\xNN`.
    public var displayPath: String { CABackupCore.displayPath(path) }
}

extension Repository {
    /// Walks a snapshot depth-first in name order, calling `visit` for every entry at or
    /// below `path` (the whole snapshot when `nil`). Loads one directory at a time.
    ///
    /// - Throws: ``CABackupError/pathNotInSnapshot(_:)`` when `path` is not in the snapshot.
    public func list(_ snapshot: Snapshot, path: String? = nil, visit: (TreeEntry) throws -> Void) throws {
        try withoutActuallyEscaping(visit) { visit in
            var lister = Lister(body: visit)
            let walker = SnapshotTreeWalker(self)
            guard let path, absolutePath(path) != "/" else {
                try walker.walk(trees: [snapshot.tree], path: [], &lister)
                return
            }
            let entry = try entry(in: snapshot, at: path)
            try walker.walk(entry.node, path: entry.path, &lister)
        }
    }

    /// The entry at an absolute path inside a snapshot.
    ///
    /// - Throws: ``CABackupError/pathNotInSnapshot(_:)`` when there is none.
    public func entry(in snapshot: Snapshot, at path: String) throws -> TreeEntry {
        let comps = absolutePath(path).split(separator: "/").map { Array($0.utf8) }
        guard !comps.isEmpty else { throw CABackupError.pathNotInSnapshot(path) }
        var nodes = try loadTree(snapshot.tree)
        var prefix: [UInt8] = []
        for (i, c) in comps.enumerated() {
            guard let n = nodes.first(where: { $0.name == c }) else { throw CABackupError.pathNotInSnapshot(path) }
            prefix += [0x2F] + c
            if i == comps.count - 1 { return TreeEntry(path: prefix, node: n) }
            guard n.type == .directory else { throw CABackupError.pathNotInSnapshot(path) }
            nodes = try loadDirectory(n)
        }
        throw CABackupError.pathNotInSnapshot(path)
    }

    /// Restores a snapshot below `target`: the snapshot path `/home/a/docs` becomes
    /// `target/home/a/docs`.
    ///
    /// `progress` is called from the writing threads every 64 files.
    ///
    /// Every blob is verified against its id as it is read. A file whose data is missing
    /// or damaged is removed and reported in ``RestoreResult/failures``; the rest of the
    /// restore goes on. Names are checked (no `/`, `.`, `..`), entries are created
    /// relative to directory descriptors without following symlinks, so nothing is ever
    /// written outside `target`.
    ///
    /// - Throws: ``CABackupError/targetNotEmpty(_:)`` unless `options.overwrite`.
    public func restore(
        _ snapshot: Snapshot, to target: String, options: RestoreOptions = RestoreOptions(),
        progress: (@Sendable (RestoreProgress) -> Void)? = nil
    ) throws -> RestoreResult {
        let target = absolutePath(target)
        // An --include that names nothing is a typo, not an empty restore.
        for include in options.includes { _ = try entry(in: snapshot, at: include) }
        if fileExists(target) {
            guard isDirectory(target) else { throw CABackupError.targetNotEmpty(target) }
            let entries = try readDirectory(Array(target.utf8))
            if !options.overwrite && !entries.isEmpty {
                throw CABackupError.targetNotEmpty(target)
            }
        } else {
            try makeDirectories(target, mode: 0o755)
        }
        return try index.sharingReads {
            let restorer = try Restorer(
                repository: self, snapshot: snapshot, target: target, options: options, progress: progress)
            return try restorer.run()
        }
    }
}

/// `ls`: every entry, everything below every directory.
private struct Lister: TreeVisitor {
    let body: (TreeEntry) throws -> Void

    mutating func visit(_ node: Node, path: [UInt8]) throws -> TreeDecision {
        try body(TreeEntry(path: path, node: node))
        return .descend
    }
}

/// Whether every byte is zero (word at a time).
func isAllZero(_ buf: UnsafeRawBufferPointer) -> Bool {
    let words = buf.count / 8
    var acc: UInt64 = 0
    var i = 0
    while i < words {
        acc |= buf.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)
        if acc != 0 { return false }
        i += 1
    }
    for j in words * 8..<buf.count where buf[j] != 0 { return false }
    return true
}

/// An open directory descriptor, closed when the last user lets go.
final class DirectoryHandle: Sendable {
    let fd: Int32
    init(_ fd: Int32) { self.fd = fd }
    deinit { close(fd) }
}

/// A regular file being restored, possibly by several workers at once, each writing a
/// run of its chunks at their offsets. The last piece to finish closes it.
final class FileRestore: @unchecked Sendable {
    // Safe: `remaining`, `written` and `failure` are only touched with `lock` held;
    // the rest is immutable after init.
    let dir: DirectoryHandle
    let path: [UInt8]
    let node: Node
    let fd: Int32
    let lock = Condition()
    /// Held around each write to `fd`.
    let writeLock = Condition()
    var remaining: Int
    var written: Int64 = 0
    var failure: String?

    init(dir: DirectoryHandle, path: [UInt8], node: Node, fd: Int32, pieces: Int) {
        self.dir = dir
        self.path = path
        self.node = node
        self.fd = fd
        self.remaining = pieces
    }
}

/// Chunks `first..<end` of a file, written from `offset` on. `locations` is filled in
/// for files split into several pieces (their offsets needed the lengths up front).
struct RestoreJob: Sendable {
    let file: FileRestore
    let first: Int
    let end: Int
    let offset: Int64
    let locations: [BlobLocation]?
}

// Safe: workers touch only the queue, `results` (behind its Mutex), the repository
// (thread-safe) and their own locals.
final class Restorer: @unchecked Sendable {
    private let repo: Repository
    private let snapshot: Snapshot
    private let target: String
    private let targetFD: DirectoryHandle
    private let options: RestoreOptions
    private let progress: (@Sendable (RestoreProgress) -> Void)?
    private let includes: [[UInt8]]
    private let queue = BlockingQueue<RestoreJob>(capacity: 64)
    private let isRoot = geteuid() == 0

    private struct Shared {
        var failures: [RestoreFailure] = []
        var files = 0
        var bytes: Int64 = 0
    }
    private let shared = Mutex(Shared())
    private var directories: [(path: [UInt8], node: Node)] = []
    private var hardLinks: [HardLinkKey: [UInt8]] = [:]
    private var deferredLinks: [(path: [UInt8], first: [UInt8])] = []
    private let start = monotonicSeconds()

    init(
        repository: Repository, snapshot: Snapshot, target: String, options: RestoreOptions,
        progress: (@Sendable (RestoreProgress) -> Void)?
    ) throws {
        self.repo = repository
        self.snapshot = snapshot
        self.target = target
        self.options = options
        self.progress = progress
        self.includes = options.includes.map { Array(absolutePath($0).utf8) }
        let fd = open(target, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0 { throw ioError("open", target) }
        targetFD = DirectoryHandle(fd)
    }

    func run() throws -> RestoreResult {
        var threads: [pthread_t] = []
        for _ in 0..<max(1, options.workers) {
            threads.append(startThread { [self] in self.workerLoop() })
        }
        do {
            try restoreDirectory(try repo.loadTree(snapshot.tree), dir: targetFD, path: [])
        } catch {
            queue.close()
            for t in threads { joinThread(t) }
            throw error
        }
        queue.close()
        for t in threads { joinThread(t) }

        var links = 0
        for link in deferredLinks {
            let rel = relative(link.path)
            let first = relative(link.first)
            if options.overwrite { _ = withCPath(rel) { unlinkat(targetFD.fd, $0, 0) } }
            let rc = withCPath(first) { f in withCPath(rel) { linkat(targetFD.fd, f, targetFD.fd, $0, 0) } }
            if rc != 0 {
                fail(link.path, "cannot create hard link: \(errnoDescription(errno))")
            } else {
                links += 1
            }
        }
        // Directory metadata last, deepest first, so writing into them was never blocked
        // by their final modes and their mtimes are not disturbed by their contents.
        for d in directories.reversed() {
            applyMetadata(d.node, at: relative(d.path), dirFD: targetFD.fd)
        }
        let s = shared.withLock { $0 }
        return RestoreResult(
            filesRestored: s.files + links, hardLinksRestored: links, directoriesRestored: directories.count,
            bytesWritten: s.bytes, failures: s.failures)
    }

    private func relative(_ path: [UInt8]) -> [UInt8] { Array(path.dropFirst()) }

    /// Whether `path` is included, and whether its children must be filtered.
    private func selection(_ path: [UInt8]) -> (include: Bool, descendOnly: Bool) {
        if includes.isEmpty { return (true, false) }
        for inc in includes {
            if path == inc || (path.count > inc.count && path.starts(with: inc) && path[inc.count] == 0x2F) {
                return (true, false)
            }
        }
        for inc in includes where inc.count > path.count && inc.starts(with: path) && inc[path.count] == 0x2F {
            return (true, true)
        }
        return (false, false)
    }

    private func restoreDirectory(_ nodes: [Node], dir: DirectoryHandle, path: [UInt8]) throws {
        for node in nodes {
            let childPath = path + [0x2F] + node.name
            guard isSafeName(node.name) else {
                fail(childPath, "unsafe name refused")
                continue
            }
            let sel = selection(childPath)
            guard sel.include else { continue }
            if sel.descendOnly && node.type != .directory { continue }
            switch node.type {
            case .directory:
                guard let sub = makeDirectory(node.name, in: dir, path: childPath) else { continue }
                directories.append((childPath, node))
                let children: [Node]
                do {
                    children = try repo.loadDirectory(node)
                } catch {
                    fail(childPath, "\(error)")
                    continue
                }
                try restoreDirectory(children, dir: sub, path: childPath)
            case .file:
                if node.links > 1 {
                    let key = HardLinkKey(node)
                    if let first = hardLinks[key] {
                        deferredLinks.append((childPath, first))
                        continue
                    }
                    hardLinks[key] = childPath
                }
                startFile(node, in: dir, path: childPath)
            case .symlink:
                guard prepare(node.name, in: dir, path: childPath) else { continue }
                let rc = withCPath(node.linkTarget) { t in withCPath(node.name) { symlinkat(t, dir.fd, $0) } }
                if rc != 0 {
                    fail(childPath, "cannot create symlink: \(errnoDescription(errno))")
                    continue
                }
                applyMetadata(node, at: node.name, dirFD: dir.fd)
            case .fifo, .characterDevice, .blockDevice:
                guard prepare(node.name, in: dir, path: childPath) else { continue }
                let kind: mode_t =
                    node.type == .fifo ? S_IFIFO : node.type == .characterDevice ? S_IFCHR : S_IFBLK
                if node.type != .fifo && !isRoot {
                    fail(childPath, "device files can only be restored as root")
                    continue
                }
                let rc = withCPath(node.name) { mknodat(dir.fd, $0, kind | 0o600, dev_t(node.rdev)) }
                if rc != 0 {
                    fail(childPath, "cannot create \(node.type): \(errnoDescription(errno))")
                    continue
                }
                applyMetadata(node, at: node.name, dirFD: dir.fd)
            case .socket:
                continue  // Sockets are recreated by the programs that own them.
            }
        }
    }

    /// Creates (or, with overwrite, reuses) a directory and opens it without following links.
    private func makeDirectory(_ name: [UInt8], in dir: DirectoryHandle, path: [UInt8]) -> DirectoryHandle? {
        var rc = withCPath(name) { mkdirat(dir.fd, $0, 0o700) }
        if rc != 0 && errno == EEXIST && options.overwrite {
            var st = stat()
            if withCPath(name, { fstatat(dir.fd, $0, &st, AT_SYMLINK_NOFOLLOW) }) == 0
                && (st.st_mode & S_IFMT) != S_IFDIR
            {
                _ = withCPath(name) { unlinkat(dir.fd, $0, 0) }
                rc = withCPath(name) { mkdirat(dir.fd, $0, 0o700) }
            } else {
                rc = 0
            }
        }
        if rc != 0 {
            fail(path, "cannot create directory: \(errnoDescription(errno))")
            return nil
        }
        let fd = withCPath(name) { openat(dir.fd, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        if fd < 0 {
            fail(path, "cannot open directory: \(errnoDescription(errno))")
            return nil
        }
        return DirectoryHandle(fd)
    }

    /// With overwrite, removes a non-directory of the same name. `false` if that fails.
    private func prepare(_ name: [UInt8], in dir: DirectoryHandle, path: [UInt8]) -> Bool {
        guard options.overwrite else { return true }
        if withCPath(name, { unlinkat(dir.fd, $0, 0) }) != 0 && errno != ENOENT {
            fail(path, "cannot replace existing entry: \(errnoDescription(errno))")
            return false
        }
        return true
    }

    private func applyMetadata(_ node: Node, at name: [UInt8], dirFD: Int32) {
        withCPath(name) { p in
            if isRoot { fchownat(dirFD, p, node.uid, node.gid, AT_SYMLINK_NOFOLLOW) }
            if node.type != .symlink { fchmodat(dirFD, p, mode_t(node.mode), 0) }
            var times = [timespecFrom(ns: node.mtimeNs), timespecFrom(ns: node.mtimeNs)]
            utimensat(dirFD, p, &times, AT_SYMLINK_NOFOLLOW)
        }
    }

    private func fail(_ path: [UInt8], _ message: String) {
        shared.withLock { $0.failures.append(RestoreFailure(path: displayPath(path), message: message)) }
    }

    // MARK: Files

    /// Chunks per piece when a file is split across workers (about 4 MiB of data).
    static let chunksPerPiece = 4

    /// Creates a file and queues its pieces. Files of more than one piece are split so
    /// both cores work on one large file, instead of the last large file running alone.
    private func startFile(_ node: Node, in dir: DirectoryHandle, path: [UInt8]) {
        // With overwrite, the old entry is unlinked, never truncated: other hard links to
        // it keep their bytes, and a FIFO or symlink in its place is replaced, not followed.
        if options.overwrite && withCPath(node.name, { unlinkat(dir.fd, $0, 0) }) != 0 && errno != ENOENT {
            fail(path, "cannot replace existing entry: \(errnoDescription(errno))")
            return
        }
        let flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC
        let fd = withCPath(node.name) { openat(dir.fd, $0, flags, 0o600) }
        if fd < 0 {
            fail(path, "cannot create file: \(errnoDescription(errno))")
            return
        }
        let count = node.content.count
        if count <= Self.chunksPerPiece {
            let file = FileRestore(dir: dir, path: path, node: node, fd: fd, pieces: 1)
            queue.push(RestoreJob(file: file, first: 0, end: count, offset: 0, locations: nil))
            return
        }
        var locations: [BlobLocation] = []
        locations.reserveCapacity(count)
        do {
            for id in node.content {
                guard let loc = try repo.index.lookup(id) else { throw CABackupError.blobNotFound(id) }
                locations.append(loc)
            }
        } catch {
            let file = FileRestore(dir: dir, path: path, node: node, fd: fd, pieces: 0)
            file.failure = "\(error)"
            finish(file)
            return
        }
        let pieces = (count + Self.chunksPerPiece - 1) / Self.chunksPerPiece
        let file = FileRestore(dir: dir, path: path, node: node, fd: fd, pieces: pieces)
        var offset: Int64 = 0
        for first in stride(from: 0, to: count, by: Self.chunksPerPiece) {
            let end = min(count, first + Self.chunksPerPiece)
            queue.push(RestoreJob(file: file, first: first, end: end, offset: offset, locations: locations))
            for k in first..<end { offset += Int64(locations[k].rawLength) }
        }
    }

    /// Closes a file once its last piece is done: metadata when it is whole, removal
    /// (never wrong or partial bytes left behind) when any chunk failed.
    private func finish(_ file: FileRestore) {
        let node = file.node
        var failure = file.failure
        // Trailing all-zero chunks were skipped as holes: set the length explicitly.
        if failure == nil && ftruncate(file.fd, off_t(file.written)) != 0 {
            failure = "cannot set file size: \(errnoDescription(errno))"
        }
        if let failure {
            close(file.fd)
            _ = withCPath(node.name) { unlinkat(file.dir.fd, $0, 0) }
            fail(file.path, "\(failure) (in snapshot \(snapshot.id.shortHex); the file was not restored)")
            return
        }
        if isRoot { fchown(file.fd, node.uid, node.gid) }
        fchmod(file.fd, mode_t(node.mode))
        var times = [timespecFrom(ns: node.mtimeNs), timespecFrom(ns: node.mtimeNs)]
        futimens(file.fd, &times)
        close(file.fd)
        let (files, bytes) = shared.withLock { s -> (Int, Int64) in
            s.files += 1
            s.bytes += file.written
            return (s.files, s.bytes)
        }
        if let progress, files % 64 == 0 {
            progress(RestoreProgress(filesDone: files, bytesWritten: bytes, elapsedSeconds: monotonicSeconds() - start))
        }
    }

    // MARK: Workers

    private func workerLoop() {
        let codec = repo.makeCodec()
        let buffers = BlobBuffers()
        while let job = queue.pop() {
            restorePiece(job, codec: codec, buffers: buffers)
        }
    }

    /// Loads, verifies and writes one run of chunks with `pwrite`; all-zero chunks are
    /// left as holes, so a sparse source is restored sparse and zeros cost no writes.
    private func restorePiece(_ job: RestoreJob, codec: BlobCodec, buffers: BlobBuffers) {
        let file = job.file
        var offset = job.offset
        var failure: String?
        do {
            for k in job.first..<job.end {
                let id = file.node.content[k]
                let n: Int
                if let locs = job.locations {
                    n = try repo.loadBlob(id, at: locs[k], into: buffers, codec: codec)
                } else {
                    n = try repo.loadBlob(id, into: buffers, codec: codec)
                }
                let bytes = buffers.bytes(n)
                if !isAllZero(bytes) {
                    // One writer per file at a time: the kernel serializes writes to a file
                    // anyway (inode lock), and a second writer waiting there spins; here it
                    // sleeps. Under memory pressure the spinning was seconds of system time.
                    file.writeLock.lock()
                    defer { file.writeLock.unlock() }
                    try pwriteAll(file.fd, bytes, offset: offset, path: displayPath(file.path))
                }
                offset += Int64(n)
            }
        } catch {
            failure = "\(error)"
        }
        let done: Bool = file.lock.locked {
            file.written += offset - job.offset
            if let failure, file.failure == nil { file.failure = failure }
            file.remaining -= 1
            return file.remaining == 0
        }
        if done { finish(file) }
    }
}
