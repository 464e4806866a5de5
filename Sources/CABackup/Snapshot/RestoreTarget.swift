import CABackupCore
import CABackupFormat
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// What `delete` and `verify` need of a local target: listing, removing and reading back
/// entries relative to directory descriptors, never following a symlink.
extension LocalFileSink {
    func names(in dir: DirectoryHandle) throws -> [[UInt8]] {
        try readDirectory(fd: dir.fd, path: [])
    }

    func remove(_ name: [UInt8], in dir: DirectoryHandle) throws {
        try removeEntry(name, in: dir.fd)
    }

    func openRestored(_ path: [UInt8]) throws -> Int32 {
        try openBelow(root.fd, path)
    }
}

/// Removes `name` from the directory `dirFD` and, for a directory, everything below it. A
/// symlink is removed, never followed; a directory on another file system (a mount point)
/// is refused rather than emptied.
func removeEntry(_ name: [UInt8], in dirFD: Int32) throws {
    if withCPath(name, { unlinkat(dirFD, $0, 0) }) == 0 || errno == ENOENT { return }
    let unlinkError = errno
    let fd = withCPath(name) { openat(dirFD, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
    guard fd >= 0 else { throw RestoreEntryError("cannot delete: \(errnoDescription(unlinkError))") }
    let dir = DirectoryHandle(fd)
    var parent = stat()
    var this = stat()
    guard fstat(dirFD, &parent) == 0, fstat(dir.fd, &this) == 0 else {
        throw RestoreEntryError("cannot delete: \(errnoDescription(errno))")
    }
    if parent.st_dev != this.st_dev { throw RestoreEntryError("not deleted: a file system is mounted there") }
    for child in try readDirectory(fd: dir.fd, path: name) { try removeEntry(child, in: dir.fd) }
    if withCPath(name, { unlinkat(dirFD, $0, AT_REMOVEDIR) }) != 0 && errno != ENOENT {
        throw RestoreEntryError("cannot delete: \(errnoDescription(errno))")
    }
}

/// Opens the regular file at `path` (absolute in the snapshot: `/a/b/c` is `a/b/c` below
/// `rootFD`) for reading, without following a symlink at any step.
private func openBelow(_ rootFD: Int32, _ path: [UInt8]) throws -> Int32 {
    let components = path.split(separator: 0x2F).map(Array.init)
    guard let last = components.last else { throw RestoreEntryError("not a file") }
    var dir: DirectoryHandle?
    for name in components.dropLast() {
        let fd = withCPath(name) { openat(dir?.fd ?? rootFD, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        if fd < 0 { throw RestoreEntryError("cannot open its directory: \(errnoDescription(errno))") }
        dir = DirectoryHandle(fd)
    }
    // Non-blocking: a FIFO put in the file's place must not hang the restore.
    let fd = withCPath(last) { openat(dir?.fd ?? rootFD, $0, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC) }
    if fd < 0 { throw RestoreEntryError("cannot open: \(errnoDescription(errno))") }
    var st = stat()
    if fstat(fd, &st) != 0 || (st.st_mode & S_IFMT) != S_IFREG {
        close(fd)
        throw RestoreEntryError("is no longer a regular file")
    }
    return fd
}

/// A dry run's sink: creates nothing. It opens the target's existing directories read-only,
/// so `delete` can tell what it would remove.
struct DryRunSink: RestoreSink {
    /// A directory of the target, or nil where the restore would create it.
    struct Directory: Sendable {
        let handle: DirectoryHandle?
    }

    let root: Directory
    /// Nothing is created, so no metadata goes missing.
    var warnings: [RestoreFailure] { [] }

    /// Checks `target` as ``LocalFileSink`` does (a directory, empty unless `overwrite`)
    /// without creating it.
    init(target: String, overwrite: Bool) throws {
        guard fileExists(target) else {
            root = Directory(handle: nil)
            return
        }
        let present = try readDirectory(Array(target.utf8))
        if !overwrite && !present.isEmpty { throw CABackupError.targetNotEmpty(target) }
        let fd = open(target, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0 { throw ioError("open", target) }
        root = Directory(handle: DirectoryHandle(fd))
    }

    func makeDirectory(_ node: Node, path: [UInt8], in dir: Directory) throws -> Directory {
        guard let parent = dir.handle else { return Directory(handle: nil) }
        let fd = withCPath(node.name) { openat(parent.fd, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        return Directory(handle: fd < 0 ? nil : DirectoryHandle(fd))
    }

    func createFile(_ node: Node, path: [UInt8], in dir: Directory) throws -> LocalFile {
        throw RestoreEntryError("a dry run creates no file")
    }

    func makeSymlink(_ node: Node, path: [UInt8], in dir: Directory) throws {}
    func makeSpecial(_ node: Node, path: [UInt8], in dir: Directory) throws {}
    func hardLink(_ path: [UInt8], to first: [UInt8]) throws {}
    func finish() throws {}

    func names(in dir: Directory) throws -> [[UInt8]] {
        guard let handle = dir.handle else { return [] }
        return try readDirectory(fd: handle.fd, path: [])
    }

    func remove(_ name: [UInt8], in dir: Directory) throws {}

    func openRestored(_ path: [UInt8]) throws -> Int32 {
        throw RestoreEntryError("a dry run restores nothing")
    }
}

/// `verify`: reads the restored files back on several threads and compares each chunk with
/// its id. It walks the snapshot again with the restore's selection (the trees are cached),
/// so it holds nothing per file.
struct RestoreVerifier<Sink: RestoreSink>: TreeVisitor {
    private let checker: FileChecker<Sink>
    private let selection: RestoreSelection
    /// The display paths the restore reported as failed: nothing at or below them to verify.
    private let failed: Set<String>
    private let queue = BlockingQueue<(path: [UInt8], node: Node)>(capacity: 1024)

    init(
        repository: Repository, sink: Sink, selection: RestoreSelection, failed: Set<String>,
        events: (@Sendable (RestoreEvent) -> Void)?
    ) {
        self.checker = FileChecker(repo: repository, sink: sink, events: events, tally: VerifyTally())
        self.selection = selection
        self.failed = failed
    }

    /// Verifies every selected regular file below `tree`: how many match, and one failure
    /// per file that does not.
    mutating func run(tree: BlobID, workers: Int) throws -> (Int, [RestoreFailure]) {
        let checker = checker
        let queue = queue
        var threads: [pthread_t] = []
        for _ in 0..<max(1, workers) {
            threads.append(
                startThread {
                    let codec = checker.repo.makeCodec()
                    var buffer: [UInt8] = []
                    while let item = queue.pop() { checker.check(item.path, item.node, codec: codec, buffer: &buffer) }
                })
        }
        defer {
            queue.close()
            for t in threads { joinThread(t) }
        }
        try SnapshotTreeWalker(checker.repo).walk(trees: [tree], path: [], &self)
        queue.close()
        for t in threads { joinThread(t) }
        threads = []
        return checker.tally.state.withLock { ($0.verified, $0.failures) }
    }

    mutating func visit(_ node: Node, path: [UInt8]) throws -> TreeDecision {
        guard isSafeName(node.name) else { return .skip }
        let choice = selection.select(path, isDirectory: node.type == .directory)
        if node.type == .directory { return choice.restore || choice.descend ? .descend : .skip }
        if choice.restore && node.type == .file && !wasFailed(path) { _ = queue.push((path, node)) }
        return .skip
    }

    /// The restore reported it already.
    mutating func unreadable(_ id: BlobID, path: [UInt8], error: any Error) throws {}

    /// Whether the restore failed `path` or a directory above it.
    private func wasFailed(_ path: [UInt8]) -> Bool {
        guard !failed.isEmpty else { return false }
        for (i, b) in path.enumerated() where b == 0x2F && i > 0 && failed.contains(displayPath(Array(path[..<i]))) {
            return true
        }
        return failed.contains(displayPath(path))
    }
}

/// What the verifying threads count.
private final class VerifyTally: Sendable {
    let state = Mutex<(verified: Int, failures: [RestoreFailure])>((0, []))
}

/// Reads one restored file back at a time and compares it with its node.
private struct FileChecker<Sink: RestoreSink>: Sendable {
    let repo: Repository
    let sink: Sink
    let events: (@Sendable (RestoreEvent) -> Void)?
    let tally: VerifyTally

    /// Verifies one file and records the outcome.
    func check(_ path: [UInt8], _ node: Node, codec: BlobCodec, buffer: inout [UInt8]) {
        if let problem = mismatch(path, node, codec: codec, buffer: &buffer) {
            let failure = RestoreFailure(path: displayPath(path), message: problem)
            tally.state.withLock { $0.failures.append(failure) }
            events?(.verifyFailed(failure))
        } else {
            tally.state.withLock { $0.verified += 1 }
            events?(.verified(path: path, size: Int64(node.size)))
        }
    }

    /// What differs between the restored file and the snapshot, or nil.
    private func mismatch(_ path: [UInt8], _ node: Node, codec: BlobCodec, buffer: inout [UInt8]) -> String? {
        let fd: Int32
        do {
            fd = try sink.openRestored(path)
        } catch {
            return "cannot read the restored file back: \(error)"
        }
        defer { close(fd) }
        #if CABACKUP_TEST_HOOKS
            alterForTest(fd, node)
        #endif
        var offset: Int64 = 0
        for (k, id) in node.content.enumerated() {
            guard let location = try? repo.index.lookup(id) else { return "chunk \(k + 1) is not in the index" }
            let n = location.rawLength
            if buffer.count < n { buffer = [UInt8](repeating: 0, count: n) }
            let got = buffer.withUnsafeMutableBytes { readUpTo(fd, $0.baseAddress!, n, at: offset) }
            if got < 0 { return "cannot read the restored file back: \(errnoDescription(errno))" }
            if got < n { return "is shorter than in the snapshot: \(offset + Int64(got)) of \(node.size) bytes" }
            let same = buffer.withUnsafeBytes { codec.id(UnsafeRawBufferPointer(rebasing: $0[0..<n])) } == id
            if !same {
                return "differs from the snapshot in bytes \(offset)..<\(offset + Int64(n)) "
                    + "(chunk \(k + 1) of \(node.content.count))"
            }
            offset += Int64(n)
        }
        var st = stat()
        if fstat(fd, &st) != 0 { return "cannot read the restored file back: \(errnoDescription(errno))" }
        if Int64(st.st_size) != offset { return "has \(st.st_size) bytes; the snapshot has \(offset)" }
        return nil
    }

    #if CABACKUP_TEST_HOOKS
        /// Test-only: `CABACKUP_TEST_ALTER_BEFORE_VERIFY=NAME` flips the last byte of every
        /// restored file named NAME just before it is read back, so a test sees `verify` fail.
        private func alterForTest(_ fd: Int32, _ node: Node) {
            guard let s = getenv("CABACKUP_TEST_ALTER_BEFORE_VERIFY"), Array(String(cString: s).utf8) == node.name,
                node.size > 0
            else { return }
            let writer = open("/proc/self/fd/\(fd)", O_WRONLY | O_CLOEXEC)
            guard writer >= 0 else { return }
            defer { close(writer) }
            var byte: UInt8 = 0
            _ = pread(fd, &byte, 1, off_t(node.size - 1))
            byte ^= 0xFF
            _ = pwrite(writer, &byte, 1, off_t(node.size - 1))
        }
    #endif
}

/// Reads up to `count` bytes at `offset`, fewer only at the end of the file; -1 on an error.
private func readUpTo(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int, at offset: Int64) -> Int {
    var done = 0
    while done < count {
        let n = pread(fd, buf + done, count - done, off_t(offset) + off_t(done))
        if n < 0 {
            if errno == EINTR { continue }
            return -1
        }
        if n == 0 { break }
        done += n
    }
    return done
}
