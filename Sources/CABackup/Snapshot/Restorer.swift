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
        self.workers = workers ?? max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
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
    public var filesRestored: Int
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
    public var displayPath: String { CABackup.displayPath(path) }
}

extension Repository {
    /// Walks a snapshot depth-first in name order, calling `visit` for every entry at or
    /// below `path` (the whole snapshot when `nil`). Loads one directory at a time.
    ///
    /// - Throws: ``CABackupError/pathNotInSnapshot(_:)`` when `path` is not in the snapshot.
    public func list(_ snapshot: Snapshot, path: String? = nil, visit: (TreeEntry) throws -> Void) throws {
        var nodes = try loadTree(snapshot.tree)
        var prefix: [UInt8] = []
        if let path, absolutePath(path) != "/" {
            let comps = absolutePath(path).split(separator: "/").map { Array($0.utf8) }
            for (i, c) in comps.enumerated() {
                guard let n = nodes.first(where: { $0.name == c }) else { throw CABackupError.pathNotInSnapshot(path) }
                prefix += [0x2F] + c
                if i == comps.count - 1 {
                    try visit(TreeEntry(path: prefix, node: n))
                    nodes = n.type == .directory ? try loadDirectory(n) : []
                } else {
                    guard n.type == .directory else { throw CABackupError.pathNotInSnapshot(path) }
                    nodes = try loadDirectory(n)
                }
            }
        }
        try walk(nodes, prefix: prefix, visit: visit)
    }

    private func walk(_ nodes: [Node], prefix: [UInt8], visit: (TreeEntry) throws -> Void) throws {
        for n in nodes {
            let p = prefix + [0x2F] + n.name
            try visit(TreeEntry(path: p, node: n))
            if n.type == .directory { try walk(try loadDirectory(n), prefix: p, visit: visit) }
        }
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
        if fileExists(target) {
            guard isDirectory(target) else { throw CABackupError.targetNotEmpty(target) }
            let entries = try readDirectory(Array(target.utf8))
            if !options.overwrite && !entries.isEmpty {
                throw CABackupError.targetNotEmpty(target)
            }
        } else {
            try makeDirectories(target, mode: 0o755)
        }
        let restorer = try Restorer(
            repository: self, snapshot: snapshot, target: target, options: options, progress: progress)
        return try restorer.run()
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

struct RestoreJob: Sendable {
    let dir: DirectoryHandle
    let path: [UInt8]
    let node: Node
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
    private var lastProgress = 0.0

    struct HardLinkKey: Hashable {
        let device: UInt64
        let inode: UInt64
    }

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

        for link in deferredLinks {
            let rel = relative(link.path)
            let first = relative(link.first)
            if options.overwrite { _ = withCPath(rel) { unlinkat(targetFD.fd, $0, 0) } }
            let rc = withCPath(first) { f in withCPath(rel) { linkat(targetFD.fd, f, targetFD.fd, $0, 0) } }
            if rc != 0 { fail(link.path, "cannot create hard link: \(errnoDescription(errno))") }
        }
        // Directory metadata last, deepest first, so writing into them was never blocked
        // by their final modes and their mtimes are not disturbed by their contents.
        for d in directories.reversed() {
            applyMetadata(d.node, at: relative(d.path), dirFD: targetFD.fd)
        }
        let s = shared.withLock { $0 }
        return RestoreResult(
            filesRestored: s.files, directoriesRestored: directories.count, bytesWritten: s.bytes, failures: s.failures)
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
                    let key = HardLinkKey(device: node.device, inode: node.inode)
                    if let first = hardLinks[key] {
                        deferredLinks.append((childPath, first))
                        continue
                    }
                    hardLinks[key] = childPath
                }
                queue.push(RestoreJob(dir: dir, path: childPath, node: node))
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

    // MARK: Workers

    private func workerLoop() {
        let hasher = SHA256Hasher()
        var buf: [UInt8] = []
        var scratch: [UInt8] = []
        while let job = queue.pop() {
            restoreFile(job, hasher: hasher, buf: &buf, scratch: &scratch)
        }
    }

    private func restoreFile(_ job: RestoreJob, hasher: SHA256Hasher, buf: inout [UInt8], scratch: inout [UInt8]) {
        let name = job.node.name
        // With overwrite, the old entry is unlinked, never truncated: other hard links to
        // it keep their bytes, and a FIFO or symlink in its place is replaced, not followed.
        if options.overwrite && withCPath(name, { unlinkat(job.dir.fd, $0, 0) }) != 0 && errno != ENOENT {
            fail(job.path, "cannot replace existing entry: \(errnoDescription(errno))")
            return
        }
        let flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC
        let fd = withCPath(name) { openat(job.dir.fd, $0, flags, 0o600) }
        if fd < 0 {
            fail(job.path, "cannot create file: \(errnoDescription(errno))")
            return
        }
        var written: Int64 = 0
        do {
            var hole = false
            for id in job.node.content {
                try repo.loadBlob(id, into: &buf, scratch: &scratch, hasher: hasher)
                // All-zero chunks become holes: a sparse source is restored sparse and
                // zeros cost no disk writes.
                if buf.withUnsafeBytes(isAllZero) {
                    if lseek(fd, off_t(buf.count), SEEK_CUR) < 0 { throw ioError("seek", displayPath(job.path)) }
                    hole = true
                } else {
                    try buf.withUnsafeBytes { try writeAll(fd, $0, path: displayPath(job.path)) }
                    hole = false
                }
                written += Int64(buf.count)
            }
            if hole && ftruncate(fd, off_t(written)) != 0 { throw ioError("truncate", displayPath(job.path)) }
        } catch {
            // Never leave wrong or partial bytes behind: the damaged file goes.
            close(fd)
            _ = withCPath(name) { unlinkat(job.dir.fd, $0, 0) }
            fail(job.path, "\(error) (in snapshot \(snapshot.id.shortHex); the file was not restored)")
            return
        }
        if isRoot { fchown(fd, job.node.uid, job.node.gid) }
        fchmod(fd, mode_t(job.node.mode))
        var times = [timespecFrom(ns: job.node.mtimeNs), timespecFrom(ns: job.node.mtimeNs)]
        futimens(fd, &times)
        close(fd)
        let (files, bytes) = shared.withLock { s -> (Int, Int64) in
            s.files += 1
            s.bytes += written
            return (s.files, s.bytes)
        }
        if let progress, files % 64 == 0 {
            progress(RestoreProgress(filesDone: files, bytesWritten: bytes, elapsedSeconds: monotonicSeconds() - start))
        }
    }
}
