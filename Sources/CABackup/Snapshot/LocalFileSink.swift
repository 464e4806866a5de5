import CABackupCore
import CABackupFormat
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Restores into a local directory. Every entry is created relative to its directory's
/// descriptor without following symlinks, so nothing is ever written outside the target.
final class LocalFileSink: RestoreSink {
    let root: DirectoryHandle
    private let overwrite: Bool
    private let isRoot = geteuid() == 0
    /// The directories created, in pre-order, for their metadata at the end.
    private let directories = Mutex<[(path: [UInt8], node: Node)]>([])

    /// Opens `target` (absolute), creating it if needed.
    ///
    /// - Throws: ``CABackupError/targetNotEmpty(_:)`` for a target that is not a directory,
    ///   or not empty unless `overwrite`.
    init(target: String, overwrite: Bool) throws {
        if fileExists(target) {
            guard isDirectory(target) else { throw CABackupError.targetNotEmpty(target) }
            let entries = try readDirectory(Array(target.utf8))
            if !overwrite && !entries.isEmpty {
                throw CABackupError.targetNotEmpty(target)
            }
        } else {
            try makeDirectories(target, mode: 0o755)
        }
        let fd = open(target, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0 { throw ioError("open", target) }
        self.root = DirectoryHandle(fd)
        self.overwrite = overwrite
    }

    /// Creates (or, with overwrite, reuses) a directory and opens it without following links.
    func makeDirectory(_ node: Node, path: [UInt8], in dir: DirectoryHandle) throws -> DirectoryHandle {
        let name = node.name
        var rc = withCPath(name) { mkdirat(dir.fd, $0, 0o700) }
        if rc != 0 && errno == EEXIST && overwrite {
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
        if rc != 0 { throw RestoreEntryError("cannot create directory: \(errnoDescription(errno))") }
        let fd = withCPath(name) { openat(dir.fd, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        if fd < 0 { throw RestoreEntryError("cannot open directory: \(errnoDescription(errno))") }
        directories.withLock { $0.append((path, node)) }
        return DirectoryHandle(fd)
    }

    /// Creates a file, never opening one that exists. With overwrite, the old entry is
    /// unlinked, never truncated: other hard links to it keep their bytes, and a FIFO or
    /// symlink in its place is replaced, not followed.
    func createFile(_ node: Node, path: [UInt8], in dir: DirectoryHandle) throws -> LocalFile {
        if overwrite && withCPath(node.name, { unlinkat(dir.fd, $0, 0) }) != 0 && errno != ENOENT {
            throw RestoreEntryError("cannot replace existing entry: \(errnoDescription(errno))")
        }
        let flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC
        let fd = withCPath(node.name) { openat(dir.fd, $0, flags, 0o600) }
        if fd < 0 { throw RestoreEntryError("cannot create file: \(errnoDescription(errno))") }
        return LocalFile(fd: fd, dir: dir, node: node, path: path, isRoot: isRoot)
    }

    func makeSymlink(_ node: Node, path: [UInt8], in dir: DirectoryHandle) throws {
        try prepare(node.name, in: dir)
        let rc = withCPath(node.linkTarget) { t in withCPath(node.name) { symlinkat(t, dir.fd, $0) } }
        if rc != 0 { throw RestoreEntryError("cannot create symlink: \(errnoDescription(errno))") }
        applyMetadata(node, at: node.name, dirFD: dir.fd)
    }

    func makeSpecial(_ node: Node, path: [UInt8], in dir: DirectoryHandle) throws {
        try prepare(node.name, in: dir)
        let kind: mode_t = node.type == .fifo ? S_IFIFO : node.type == .characterDevice ? S_IFCHR : S_IFBLK
        if node.type != .fifo && !isRoot { throw RestoreEntryError("device files can only be restored as root") }
        let rc = withCPath(node.name) { mknodat(dir.fd, $0, kind | 0o600, dev_t(node.rdev)) }
        if rc != 0 { throw RestoreEntryError("cannot create \(node.type): \(errnoDescription(errno))") }
        applyMetadata(node, at: node.name, dirFD: dir.fd)
    }

    func hardLink(_ path: [UInt8], to first: [UInt8]) throws {
        let rel = relative(path)
        if overwrite { _ = withCPath(rel) { unlinkat(root.fd, $0, 0) } }
        let rc = withCPath(relative(first)) { f in withCPath(rel) { linkat(root.fd, f, root.fd, $0, 0) } }
        if rc != 0 { throw RestoreEntryError("cannot create hard link: \(errnoDescription(errno))") }
    }

    /// Directory metadata last, deepest first, so writing into them was never blocked by
    /// their final modes and their mtimes are not disturbed by their contents.
    func finish() {
        for d in directories.withLock({ $0 }).reversed() {
            applyMetadata(d.node, at: relative(d.path), dirFD: root.fd)
        }
    }

    /// A snapshot path relative to the target.
    private func relative(_ path: [UInt8]) -> [UInt8] { Array(path.dropFirst()) }

    /// With overwrite, removes a non-directory of the same name.
    private func prepare(_ name: [UInt8], in dir: DirectoryHandle) throws {
        guard overwrite else { return }
        if withCPath(name, { unlinkat(dir.fd, $0, 0) }) != 0 && errno != ENOENT {
            throw RestoreEntryError("cannot replace existing entry: \(errnoDescription(errno))")
        }
    }

    private func applyMetadata(_ node: Node, at name: [UInt8], dirFD: Int32) {
        withCPath(name) { p in
            if isRoot { fchownat(dirFD, p, node.uid, node.gid, AT_SYMLINK_NOFOLLOW) }
            if node.type != .symlink { fchmodat(dirFD, p, mode_t(node.mode), 0) }
            var times = [timespecFrom(ns: node.mtimeNs), timespecFrom(ns: node.mtimeNs)]
            utimensat(dirFD, p, &times, AT_SYMLINK_NOFOLLOW)
        }
    }
}

/// A file below the target, open for writing until it is committed or discarded.
final class LocalFile: RestoreFile {
    private let fd: Int32
    /// Keeps the directory open until the file is closed (and, on failure, removed).
    private let dir: DirectoryHandle
    private let node: Node
    /// The snapshot path, for messages.
    private let path: [UInt8]
    private let isRoot: Bool
    /// Held around each write to `fd`.
    private let writeLock = Condition()

    init(fd: Int32, dir: DirectoryHandle, node: Node, path: [UInt8], isRoot: Bool) {
        self.fd = fd
        self.dir = dir
        self.node = node
        self.path = path
        self.isRoot = isRoot
    }

    /// Writes with `pwrite`; all-zero bytes are left as holes, so a sparse source is
    /// restored sparse and zeros cost no writes.
    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
        guard !isAllZero(bytes) else { return }
        // One writer per file at a time: the kernel serializes writes to a file anyway
        // (inode lock), and a second writer waiting there spins; here it sleeps. Under
        // memory pressure the spinning was seconds of system time.
        writeLock.lock()
        defer { writeLock.unlock() }
        try pwriteAll(fd, bytes, offset: offset, path: displayPath(path))
    }

    func commit(length: Int64) throws {
        // Trailing all-zero chunks were skipped as holes: set the length explicitly.
        if ftruncate(fd, off_t(length)) != 0 {
            throw RestoreEntryError("cannot set file size: \(errnoDescription(errno))")
        }
        if isRoot { fchown(fd, node.uid, node.gid) }
        fchmod(fd, mode_t(node.mode))
        var times = [timespecFrom(ns: node.mtimeNs), timespecFrom(ns: node.mtimeNs)]
        futimens(fd, &times)
        close(fd)
    }

    func discard() {
        close(fd)
        _ = withCPath(node.name) { unlinkat(dir.fd, $0, 0) }
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
