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
    let isRoot = geteuid() == 0
    /// The directories created, in pre-order, for their metadata at the end.
    private let directories = Mutex<[(path: [UInt8], node: Node)]>([])
    /// Files with inode flags to set once everything else is done.
    private let flagged = Mutex<[(path: [UInt8], flags: UInt32)]>([])
    /// Metadata that could not be applied, per entry.
    private let metadataWarnings = Mutex<[RestoreFailure]>([])

    var warnings: [RestoreFailure] { metadataWarnings.withLock { $0 } }

    /// Records what of an entry's metadata could not be applied.
    func warn(_ path: [UInt8], _ messages: [String]) {
        guard !messages.isEmpty else { return }
        metadataWarnings.withLock {
            for m in messages { $0.append(RestoreFailure(path: displayPath(path), message: m)) }
        }
    }

    /// A file's inode flags, set by ``finish()``.
    func setFlagsLater(_ path: [UInt8], _ flags: UInt32) {
        flagged.withLock { $0.append((path, flags)) }
    }

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
        return LocalFile(fd: fd, dir: dir, node: node, path: path, sink: self)
    }

    func makeSymlink(_ node: Node, path: [UInt8], in dir: DirectoryHandle) throws {
        try prepare(node.name, in: dir)
        let rc = withCPath(node.linkTarget) { t in withCPath(node.name) { symlinkat(t, dir.fd, $0) } }
        if rc != 0 { throw RestoreEntryError("cannot create symlink: \(errnoDescription(errno))") }
        applyMetadata(node, at: node.name, dirFD: dir.fd, path: path, directory: dir)
    }

    func makeSpecial(_ node: Node, path: [UInt8], in dir: DirectoryHandle) throws {
        try prepare(node.name, in: dir)
        let kind: mode_t = node.type == .fifo ? S_IFIFO : node.type == .characterDevice ? S_IFCHR : S_IFBLK
        if node.type != .fifo && !isRoot { throw RestoreEntryError("device files can only be restored as root") }
        let rc = withCPath(node.name) { mknodat(dir.fd, $0, kind | 0o600, dev_t(node.rdev)) }
        if rc != 0 { throw RestoreEntryError("cannot create \(node.type): \(errnoDescription(errno))") }
        applyMetadata(node, at: node.name, dirFD: dir.fd, path: path, directory: dir)
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
            let rel = relative(d.path)
            if !d.node.xattrs.isEmpty || d.node.flags != 0 {
                let fd = withCPath(rel) { openat(root.fd, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
                if fd >= 0 {
                    // Default ACLs are set last: files created inside inherited none.
                    warn(d.path, FileMetadata.apply(d.node.xattrs, fd: fd))
                    close(fd)
                }
                if d.node.flags != 0 { setFlagsLater(d.path, d.node.flags) }
            }
            applyMetadata(d.node, at: rel, dirFD: root.fd)
        }
        // Flags last: an immutable or append-only entry refuses times, links and writes.
        for f in flagged.withLock({ $0 }) {
            let fd = withCPath(relative(f.path)) { openat(root.fd, $0, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK) }
            guard fd >= 0 else {
                warn(f.path, ["cannot set inode flags: \(errnoDescription(errno))"])
                continue
            }
            if let message = FileMetadata.apply(flags: f.flags, fd: fd) { warn(f.path, [message]) }
            close(fd)
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

    /// Owner, extended attributes (for a symlink or special file, named in `directory`),
    /// mode and times.
    private func applyMetadata(
        _ node: Node, at name: [UInt8], dirFD: Int32, path: [UInt8]? = nil, directory: DirectoryHandle? = nil
    ) {
        withCPath(name) { p in
            if isRoot { fchownat(dirFD, p, node.uid, node.gid, AT_SYMLINK_NOFOLLOW) }
            if let directory, let path, !node.xattrs.isEmpty {
                warn(path, FileMetadata.apply(node.xattrs, to: EntryRef(directory: directory, relative: name)))
            }
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
    private let sink: LocalFileSink
    /// Held around each write to `fd`.
    private let writeLock = Condition()

    init(fd: Int32, dir: DirectoryHandle, node: Node, path: [UInt8], sink: LocalFileSink) {
        self.fd = fd
        self.dir = dir
        self.node = node
        self.path = path
        self.sink = sink
    }

    /// Writes with `pwrite`; all-zero bytes are left as holes, so a sparse source is
    /// restored sparse and zeros cost no writes. With the file's hole map, only the
    /// bytes in its data ranges are written: the source's holes come back as holes.
    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws {
        guard !isAllZero(bytes) else { return }
        // One writer per file at a time: the kernel serializes writes to a file anyway
        // (inode lock), and a second writer waiting there spins; here it sleeps. Under
        // memory pressure the spinning was seconds of system time.
        writeLock.lock()
        defer { writeLock.unlock() }
        if node.dataRanges.isEmpty {
            try pwriteAll(fd, bytes, offset: offset, path: displayPath(path))
            return
        }
        let start = UInt64(offset)
        let end = start + UInt64(bytes.count)
        for r in node.dataRanges where r.offset < end && r.offset + r.length > start {
            let from = max(r.offset, start)
            let to = min(r.offset + r.length, end)
            let part = UnsafeRawBufferPointer(rebasing: bytes[Int(from - start)..<Int(to - start)])
            try pwriteAll(fd, part, offset: Int64(from), path: displayPath(path))
        }
    }

    func commit(length: Int64) throws {
        // Trailing all-zero chunks were skipped as holes: set the length explicitly.
        if ftruncate(fd, off_t(length)) != 0 {
            throw RestoreEntryError("cannot set file size: \(errnoDescription(errno))")
        }
        if sink.isRoot { fchown(fd, node.uid, node.gid) }
        // After the owner (a chown clears file capabilities), before the mode.
        sink.warn(path, FileMetadata.apply(node.xattrs, fd: fd))
        fchmod(fd, mode_t(node.mode))
        var times = [timespecFrom(ns: node.mtimeNs), timespecFrom(ns: node.mtimeNs)]
        futimens(fd, &times)
        close(fd)
        if node.flags != 0 { sink.setFlagsLater(path, node.flags) }
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
