import CABackupCore
import CABackupFormat
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A regular file being restored, possibly by several workers at once, each writing a
/// run of its chunks at their offsets. The last piece to finish commits or discards it.
final class FileRestore<File: RestoreFile>: @unchecked Sendable {
    // Safe: `remaining`, `written` and `failure` are only touched with `lock` held;
    // the rest is immutable after init.
    let file: File
    let path: [UInt8]
    let node: Node
    let lock = Condition()
    var remaining: Int
    var written: Int64 = 0
    var failure: String?

    init(file: File, path: [UInt8], node: Node, pieces: Int) {
        self.file = file
        self.path = path
        self.node = node
        self.remaining = pieces
    }
}

/// Chunks `first..<end` of a file, written from `offset` on. `locations` is filled in
/// for files split into several pieces (their offsets needed the lengths up front).
struct RestoreJob<File: RestoreFile>: Sendable {
    let file: FileRestore<File>
    let first: Int
    let end: Int
    let offset: Int64
    let locations: [BlobLocation]?
}

/// The workers of a restore: they load, verify and write files' chunks through the sink,
/// and count what was restored and what failed.
// Safe: workers touch only the queue, `shared` (behind its Mutex), the repository
// (thread-safe), the files (`FileRestore` locks) and their own locals.
final class RestorePipeline<File: RestoreFile>: @unchecked Sendable {
    private let repo: Repository
    private let snapshot: SnapshotID
    private let progress: (@Sendable (RestoreProgress) -> Void)?
    private let queue = BlockingQueue<RestoreJob<File>>(capacity: 64)
    private let start = monotonicSeconds()

    struct Totals {
        var failures: [RestoreFailure] = []
        var files = 0
        var bytes: Int64 = 0
    }
    private let shared = Mutex(Totals())

    /// Chunks per piece when a file is split across workers (about 4 MiB of data).
    static var chunksPerPiece: Int { 4 }

    init(repository: Repository, snapshot: SnapshotID, progress: (@Sendable (RestoreProgress) -> Void)?) {
        self.repo = repository
        self.snapshot = snapshot
        self.progress = progress
    }

    /// Runs `body` (which queues files) beside `workers` threads, and returns once every
    /// queued file is committed or discarded.
    func run(workers: Int, _ body: () throws -> Void) throws {
        var threads: [pthread_t] = []
        for _ in 0..<max(1, workers) {
            threads.append(startThread { [self] in self.workerLoop() })
        }
        defer {
            queue.close()
            for t in threads { joinThread(t) }
        }
        try body()
    }

    /// What was restored and what failed so far.
    var totals: Totals { shared.withLock { $0 } }

    func fail(_ path: [UInt8], _ message: String) {
        shared.withLock { $0.failures.append(RestoreFailure(path: displayPath(path), message: message)) }
    }

    /// Queues a created file's pieces. Files of more than one piece are split so both
    /// cores work on one large file, instead of the last large file running alone.
    func enqueue(_ file: File, node: Node, path: [UInt8]) {
        let count = node.content.count
        if count <= Self.chunksPerPiece {
            let restore = FileRestore(file: file, path: path, node: node, pieces: 1)
            queue.push(RestoreJob(file: restore, first: 0, end: count, offset: 0, locations: nil))
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
            let restore = FileRestore(file: file, path: path, node: node, pieces: 0)
            restore.failure = "\(error)"
            finish(restore)
            return
        }
        let pieces = (count + Self.chunksPerPiece - 1) / Self.chunksPerPiece
        let restore = FileRestore(file: file, path: path, node: node, pieces: pieces)
        var offset: Int64 = 0
        for first in stride(from: 0, to: count, by: Self.chunksPerPiece) {
            let end = min(count, first + Self.chunksPerPiece)
            queue.push(RestoreJob(file: restore, first: first, end: end, offset: offset, locations: locations))
            for k in first..<end { offset += Int64(locations[k].rawLength) }
        }
    }

    /// Closes a file once its last piece is done: committed when it is whole, discarded
    /// (never wrong or partial bytes left behind) when any chunk failed.
    private func finish(_ restore: FileRestore<File>) {
        var failure = restore.failure
        if failure == nil {
            do {
                try restore.file.commit(length: restore.written)
            } catch {
                failure = "\(error)"
            }
        }
        if let failure {
            restore.file.discard()
            fail(restore.path, "\(failure) (in snapshot \(snapshot.shortHex); the file was not restored)")
            return
        }
        let (files, bytes) = shared.withLock { s -> (Int, Int64) in
            s.files += 1
            s.bytes += restore.written
            return (s.files, s.bytes)
        }
        if let progress, files % 64 == 0 {
            progress(RestoreProgress(filesDone: files, bytesWritten: bytes, elapsedSeconds: monotonicSeconds() - start))
        }
    }

    private func workerLoop() {
        let codec = repo.makeCodec()
        let buffers = BlobBuffers()
        while let job = queue.pop() {
            restorePiece(job, codec: codec, buffers: buffers)
        }
    }

    /// Loads, verifies and writes one run of chunks.
    private func restorePiece(_ job: RestoreJob<File>, codec: BlobCodec, buffers: BlobBuffers) {
        let restore = job.file
        var offset = job.offset
        var failure: String?
        do {
            for k in job.first..<job.end {
                let id = restore.node.content[k]
                let n: Int
                if let locs = job.locations {
                    n = try repo.loadBlob(id, at: locs[k], into: buffers, codec: codec)
                } else {
                    n = try repo.loadBlob(id, into: buffers, codec: codec)
                }
                try restore.file.write(buffers.bytes(n), at: offset)
                offset += Int64(n)
            }
        } catch {
            failure = "\(error)"
        }
        let done: Bool = restore.lock.locked {
            restore.written += offset - job.offset
            if let failure, restore.failure == nil { restore.failure = failure }
            restore.remaining -= 1
            return restore.remaining == 0
        }
        if done { finish(restore) }
    }
}
