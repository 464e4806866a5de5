import CABackupCore
import CABackupFormat
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The content of a regular file as its chunks are hashed: filled in by workers.
final class FileJob: @unchecked Sendable {
    // Safe: every field is read and written with the file saver's `cond` mutex held.
    var ids: [BlobID] = []
    var pending = 0
    var sealed = false
    var size: Int64 = 0
    var failed = false
    /// What the file carries besides its bytes, read from the open file.
    var extras = FileExtras()
    var isComplete: Bool { sealed && pending == 0 }
}

/// A file's extended attributes, inode flags and data extents (when it has holes), read
/// through the descriptor its content is read from.
struct FileExtras: Sendable {
    var xattrs: [ExtendedAttribute] = []
    var flags: UInt32 = 0
    var dataRanges: [FileRange] = []

    init() {}

    /// Reads them from the open file `fd`, whose `fstat` is `st`.
    init(fd: Int32, st: stat) {
        xattrs = FileMetadata.xattrs(fd: fd)
        flags = FileMetadata.flags(fd: fd)
        // Only a file with fewer blocks than bytes can have holes: the others cost no
        // lseek (a file stored inline in its inode has no blocks and is looked at).
        if Int64(st.st_blocks) * 512 < Int64(st.st_size) {
            dataRanges = FileMetadata.dataRanges(fd: fd, size: Int64(st.st_size))
        }
    }
}

struct ChunkJob: Sendable {
    let buffer: SharedBuffer
    let offset: Int
    let length: Int
    let file: FileJob
    let index: Int
}

/// A file of at most ``FileSaver/smallFileLimit`` bytes for a worker to open, read, chunk
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

/// Reads files and stores their chunks through a blob writer: the archiver's part that
/// turns a file into a list of chunk ids.
///
/// Large files are read and cut on the calling thread (``save(path:entry:st:progress:)``),
/// into two pooled windows; `workers` threads hash each chunk, skip known ones, compress
/// and pack new ones. Files of at most ``smallFileLimit`` bytes go to the workers whole
/// (``saveSmall(_:)``): a worker opens, reads, chunks and stores each into a buffer of its
/// own, so on a tree of small files the per-file system calls run on every core. A file
/// that changes while it is read is not stored. ``FileJob``s fill in as the workers go;
/// `cond` guards them and is broadcast when one completes.
// Safe: worker threads touch only `cond`-guarded jobs, the queue, the blob writer and
// atomics; `bytesRead` and `filesRead` belong to the calling thread.
final class FileSaver: @unchecked Sendable {
    /// Guards every ``FileJob``; broadcast when one completes.
    let cond = Condition()
    private let queue = BlockingQueue<WorkItem>(capacity: 256)
    private let pool: BufferPool
    private let writer: BlobSaver
    private let chunker: Chunker
    private let repo: Repository
    private var threads: [pthread_t] = []
    let chunksAdded = Atomic<Int>(0)
    /// Files and bytes read by workers (small files), and what could not be read there.
    let smallFilesRead = Atomic<Int>(0)
    let smallBytesRead = Atomic<Int64>(0)
    private let workerWarnings = Mutex<[SnapshotWarning]>([])
    private let failure = Mutex<CABackupError?>(nil)
    /// Large files read on the calling thread, and their bytes.
    private(set) var bytesRead: Int64 = 0
    private(set) var filesRead = 0

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

    /// Starts `workers` threads storing through `writer`.
    init(repository: Repository, writer: BlobSaver, workers: Int) {
        self.repo = repository
        self.writer = writer
        self.chunker = repository.chunker
        self.pool = BufferPool(
            bufferSize: max(
                Self.windowSize, ChunkingReader.minimumWindow(maxChunk: repository.config.chunker.maxSize)),
            maxCount: Self.windowCount)
        for _ in 0..<max(1, workers) {
            threads.append(startThread { [self] in self.workerLoop() })
        }
    }

    /// Stops and joins the workers (idempotent), then throws the first repository error
    /// a worker hit. Called before the blob writer is finished or abandoned.
    func finish() throws {
        queue.close()
        for t in threads { joinThread(t) }
        threads = []
        if let e = failure.withLock({ $0 }) { throw e }
    }

    /// What workers could not read (each file left out of the snapshot).
    var warnings: [SnapshotWarning] { workerWarnings.withLock { $0 } }

    /// Queues a file of at most ``smallFileLimit`` bytes for a worker.
    func saveSmall(_ job: SmallFileJob) {
        queue.push(.smallFile(job))
    }

    /// What became of a file read on the calling thread.
    enum Outcome {
        case queued(FileJob)
        /// Not stored, with the reason (the file is left out of the snapshot).
        case skipped(String)
    }

    /// Reads a regular file and queues its chunks; `.skipped` when it cannot be opened or
    /// read, or changed while it was read. `progress` gets the bytes read so far, after
    /// opening and after each large window. Repository errors are thrown.
    func save(path: [UInt8], entry: EntryRef, st: stat, progress: (Int64) -> Void) throws -> Outcome {
        let fd = openForReading(entry)
        if fd < 0 { return .skipped(errnoDescription(errno)) }
        defer { close(fd) }
        var fst = stat()
        if fstat(fd, &fst) != 0 || (fst.st_mode & S_IFMT) != S_IFREG {
            return .skipped("changed type while being backed up")
        }
        progress(0)
        let job = FileJob()
        let extras = FileExtras(fd: fd, st: fst)
        let reader = ChunkingReader(
            chunker: chunker, fd: fd, path: path, sizeHint: Int64(st.st_size), windowSize: pool.bufferSize,
            pool: pool)
        func fail(_ message: String) -> Outcome {
            cond.locked {
                job.failed = true
                job.sealed = true
            }
            bytesRead += reader.bytesRead
            return .skipped(message)
        }
        do {
            while let window = try reader.nextWindow() {
                for cut in window.cuts {
                    let index: Int = cond.locked {
                        job.ids.append(.zero)
                        job.pending += 1
                        return job.ids.count - 1
                    }
                    queue.push(
                        .chunk(
                            ChunkJob(
                                buffer: window.buffer, offset: cut.offset, length: cut.length, file: job, index: index))
                    )
                }
                if let e = failure.withLock({ $0 }) { throw e }
                if window.buffer.count > 4 << 20 { progress(reader.bytesRead) }
                Self.modifyForTests(path)
            }
            // A file that changed while it was read would be stored half old, half new.
            if !isUnchanged(
                fd, size: Int64(st.st_size), mtimeNs: nanoseconds(st.st_mtim), ctimeNs: nanoseconds(st.st_ctim))
            {
                return fail("changed while being read; not stored (back it up again)")
            }
        } catch {
            let error = CABackupError(error)
            if case .io = error { return fail(errnoText(error)) }
            throw error
        }
        bytesRead += reader.bytesRead
        filesRead += 1
        cond.locked {
            job.size = reader.bytesRead
            job.extras = extras
            job.sealed = true
        }
        return .queued(job)
    }

    // MARK: Workers

    private func workerLoop() {
        let codec = repo.makeCodec()
        let small = UnsafeMutableRawPointer.allocate(byteCount: Self.smallFileLimit + 1, alignment: 64)
        defer { small.deallocate() }
        while let item = queue.pop() {
            switch item {
            case .chunk(let job):
                let id = store(job.buffer.bytes(job.offset, job.length), codec: codec)
                cond.lock()
                job.file.ids[job.index] = id
                job.file.pending -= 1
                if job.file.isComplete { cond.broadcast() }
                cond.unlock()
            case .smallFile(let job):
                let (ids, size, extras) = readSmallFile(job, into: small, codec: codec) ?? ([], -1, FileExtras())
                cond.lock()
                job.file.ids = ids
                job.file.extras = extras
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
            if try writer.claim(id) {
                try writer.addEncoding(id, type: .data, raw: raw, codec: codec)
                chunksAdded.add(1, ordering: .relaxed)
            }
        } catch {
            failure.withLock { if $0 == nil { $0 = CABackupError(error) } }
        }
        return id
    }

    /// Opens, reads and stores a small file on a worker; returns its chunk ids, size and
    /// extras, or `nil` (with a warning) when it cannot be read or changed while it was
    /// read.
    private func readSmallFile(
        _ job: SmallFileJob, into buffer: UnsafeMutableRawPointer, codec: BlobCodec
    ) -> ([BlobID], Int64, FileExtras)? {
        func skip(_ message: String) -> ([BlobID], Int64, FileExtras)? {
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
        let extras = FileExtras(fd: fd, st: st)
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
            let length = chunker.nextCut(in: rest, isFinal: true)!
            ids.append(store(UnsafeRawBufferPointer(rebasing: rest[..<length]), codec: codec))
            offset += length
        }
        smallFilesRead.add(1, ordering: .relaxed)
        smallBytesRead.add(Int64(n), ordering: .relaxed)
        return (ids, Int64(n), extras)
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
