import CABackupCore
import CABackupFormat
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// See ``RestorePipeline/maxOpenFiles``.
private let restoreOpenFiles = min(4096, max(64, ((raiseDescriptorLimit() ?? 1024) - 256) / 2))

/// A regular file being restored: its chunks are written by whichever workers read the
/// runs of packs holding them. The last chunk written commits or discards it.
final class FileRestore<File: RestoreFile>: @unchecked Sendable {
    // Safe: `remaining`, `written` and `failure` are only touched with `lock` held;
    // the rest is immutable after init.
    let file: File
    let path: [UInt8]
    let lock = Condition()
    var remaining: Int
    var written: Int64 = 0
    var failure: String?

    init(file: File, path: [UInt8], chunks: Int) {
        self.file = file
        self.path = path
        self.remaining = chunks
    }
}

/// Where one chunk of a file goes: the blob's location and the file offset.
struct ChunkTarget<File: RestoreFile> {
    let id: BlobID
    let location: BlobLocation
    let file: FileRestore<File>
    let offset: Int64
}

/// One read of a pack: `length` bytes at `offset`, holding the blobs of `targets`
/// (sorted by their place in the pack; a blob needed at several places appears once per
/// place).
struct RunJob<File: RestoreFile>: Sendable {
    let pack: PackID
    let offset: Int64
    let length: Int
    let targets: [ChunkTarget<File>]
}

extension ChunkTarget: @unchecked Sendable {}  // FileRestore is thread-safe; the rest are values.

/// The workers of a restore, planned by pack: files are gathered in batches as the
/// snapshot is walked; each batch's chunks are grouped by the pack holding them and read
/// in runs of adjacent blobs (one request per run, not per blob), many runs at once, and
/// each blob is verified and written to every place that needs it as its run arrives.
///
/// Bounds: a batch holds at most ``batchChunks`` chunks and ``batchBytes`` stored bytes,
/// at most ``maxOpenFiles`` files are open at once, a run is at most ``maxRunBytes``
/// (or one blob), and each worker holds one run: memory does not grow with the snapshot.
// Safe: workers touch only the queue, `shared` (behind its Mutex), the repository
// (thread-safe), the files (`FileRestore` locks) and their own locals; the batch is only
// touched by the walking thread.
final class RestorePipeline<File: RestoreFile>: @unchecked Sendable {
    private let repo: Repository
    private let snapshot: SnapshotID
    private let progress: (@Sendable (RestoreProgress) -> Void)?
    private let events: (@Sendable (RestoreEvent) -> Void)?
    private let queue = BlockingQueue<RunJob<File>>(capacity: 256)
    private let start = monotonicSeconds()

    struct Totals {
        var failures: [RestoreFailure] = []
        var files = 0
        var bytes: Int64 = 0
    }
    private let shared = Mutex(Totals())
    /// Files created and not yet committed or discarded.
    private let openFiles = Condition()
    private var openCount = 0

    /// The batch being gathered: chunk targets by pack, packs in the order first needed.
    private var batch: [PackID: [ChunkTarget<File>]] = [:]
    private var batchOrder: [PackID] = []
    private var batchChunkCount = 0
    private var batchStoredBytes = 0

    /// Files open at once: a batch spans this many files, so with many small files it
    /// sets how many runs a pack is read in. Each holds a descriptor, and its directory
    /// may hold another: half the descriptor limit (raised to the hard one), 256 kept
    /// for everything else, between 64 and 4,096.
    static var maxOpenFiles: Int { restoreOpenFiles }
    static var batchChunks: Int { 16_384 }
    /// Two packs' worth: big enough that a pack is read in runs of several MiB, small
    /// enough that the first reads start while the walk is still creating files.
    static var batchBytes: Int { 32 << 20 }
    /// A batch this large is read at once when the workers have nothing left to read.
    static var eagerBytes: Int { 1 << 20 }
    /// Blobs closer than this in a pack are read in one run (the gap is read and dropped).
    static var maxGap: Int64 { 64 << 10 }
    static var maxRunBytes: Int { 4 << 20 }

    init(
        repository: Repository, snapshot: SnapshotID, progress: (@Sendable (RestoreProgress) -> Void)?,
        events: (@Sendable (RestoreEvent) -> Void)? = nil
    ) {
        self.repo = repository
        self.snapshot = snapshot
        self.progress = progress
        self.events = events
    }

    /// Runs `body` (which adds files) beside the workers, and returns once every file is
    /// committed or discarded. A storage that is not a local disk gets more threads: most
    /// of their time is spent waiting for answers.
    func run(workers: Int, _ body: () throws -> Void) throws {
        let count = repo.storage.workingDirectory == nil ? max(workers, 12) : max(1, workers)
        var threads: [pthread_t] = []
        for _ in 0..<count {
            threads.append(startThread { [self] in self.workerLoop() })
        }
        defer {
            queue.close()
            for t in threads { joinThread(t) }
        }
        try body()
        flush()
    }

    /// What was restored and what failed so far.
    var totals: Totals { shared.withLock { $0 } }

    func fail(_ path: [UInt8], _ message: String) {
        let failure = RestoreFailure(path: displayPath(path), message: message)
        shared.withLock { $0.failures.append(failure) }
        events?(.failed(failure))
    }

    /// Creates a file with `create` once fewer than ``maxOpenFiles`` are open, and plans
    /// its chunks. Throws what `create` throws (nothing is planned then).
    func add(node: Node, path: [UInt8], create: () throws -> File) throws {
        if openFiles.locked({ openCount >= Self.maxOpenFiles }) {
            // The open files' chunks must be on their way before waiting for one to close.
            flush()
            openFiles.lock()
            while openCount >= Self.maxOpenFiles { openFiles.wait() }
            openFiles.unlock()
        }
        openFiles.locked { openCount += 1 }
        let file: File
        do {
            file = try create()
        } catch {
            closed()
            throw error
        }
        let restore = FileRestore(file: file, path: path, chunks: node.content.count)
        var targets: [ChunkTarget<File>] = []
        targets.reserveCapacity(node.content.count)
        do {
            var offset: Int64 = 0
            for id in node.content {
                guard let loc = try repo.index.lookup(id) else { throw CABackupError.blobNotFound(id) }
                targets.append(ChunkTarget(id: id, location: loc, file: restore, offset: offset))
                offset += Int64(loc.rawLength)
            }
        } catch {
            restore.failure = "\(error)"
            finish(restore)
            return
        }
        if targets.isEmpty {
            finish(restore)
            return
        }
        for t in targets {
            if batch[t.location.pack] == nil { batchOrder.append(t.location.pack) }
            batch[t.location.pack, default: []].append(t)
            batchStoredBytes += t.location.length
        }
        batchChunkCount += targets.count
        // A full batch goes; so does a smaller one when the workers have run out of
        // runs, so the link (or the disk) is never idle while the walk creates files.
        if batchChunkCount >= Self.batchChunks || batchStoredBytes >= Self.batchBytes
            || (batchStoredBytes >= Self.eagerBytes && queue.count == 0)
        {
            flush()
        }
    }

    /// Turns the batch into runs and queues them, packs in the order they were first needed.
    private func flush() {
        for pack in batchOrder {
            guard var targets = batch[pack] else { continue }
            targets.sort { $0.location.offset < $1.location.offset }
            var i = 0
            while i < targets.count {
                let first = targets[i].location
                var end = first.offset + Int64(first.length)
                var j = i + 1
                while j < targets.count {
                    let loc = targets[j].location
                    let newEnd = max(end, loc.offset + Int64(loc.length))
                    guard loc.offset - end <= Self.maxGap, newEnd - first.offset <= Int64(Self.maxRunBytes) else {
                        break
                    }
                    end = newEnd
                    j += 1
                }
                queue.push(
                    RunJob(
                        pack: pack, offset: first.offset, length: Int(end - first.offset),
                        targets: Array(targets[i..<j])))
                i = j
            }
        }
        batch = [:]
        batchOrder = []
        batchChunkCount = 0
        batchStoredBytes = 0
    }

    private func closed() {
        openFiles.locked {
            openCount -= 1
            openFiles.signal()
        }
    }

    /// Closes a file once its last chunk is done: committed when it is whole, discarded
    /// (never wrong or partial bytes left behind) when any chunk failed.
    private func finish(_ restore: FileRestore<File>) {
        defer { closed() }
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
        events?(.restored(path: restore.path, type: .file, size: restore.written))
        if let progress, files % 64 == 0 {
            progress(RestoreProgress(filesDone: files, bytesWritten: bytes, elapsedSeconds: monotonicSeconds() - start))
        }
    }

    private func workerLoop() {
        let codec = repo.makeCodec()
        let buffers = BlobBuffers()
        var run = UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 64)
        var capacity = 1
        defer { run.deallocate() }
        while let job = queue.pop() {
            if job.length > capacity {
                run.deallocate()
                capacity = max(job.length, min(capacity * 2, Self.maxRunBytes))
                run = .allocate(byteCount: capacity, alignment: 64)
            }
            restoreRun(job, into: run, codec: codec, buffers: buffers)
            if capacity > Self.maxRunBytes {  // one outsized blob: do not keep its buffer
                run.deallocate()
                capacity = 1
                run = .allocate(byteCount: 1, alignment: 64)
            }
        }
    }

    /// Reads one run of a pack, then verifies each of its blobs and writes it wherever it
    /// goes. A blob that fails fails the files needing it; the others are written.
    private func restoreRun(
        _ job: RunJob<File>, into run: UnsafeMutableRawPointer, codec: BlobCodec, buffers: BlobBuffers
    ) {
        var readFailure: String?
        if job.length > 0 {
            do {
                try repo.storage.read(.pack, job.pack.hex, offset: job.offset, length: job.length, into: run)
            } catch {
                readFailure = "\(error)"
            }
        }
        var k = 0
        while k < job.targets.count {
            let loc = job.targets[k].location
            let id = job.targets[k].id
            var end = k + 1
            while end < job.targets.count && job.targets[end].id == id && job.targets[end].location == loc { end += 1 }
            var failure = readFailure
            var plain = UnsafeRawBufferPointer(start: nil, count: 0)
            if failure == nil {
                do {
                    let stored = UnsafeRawBufferPointer(
                        start: run + Int(loc.offset - job.offset), count: loc.length)
                    plain = try repo.decodeBlob(id, at: loc, stored: stored, into: buffers, codec: codec)
                } catch {
                    failure = "\(error)"
                }
            }
            for t in job.targets[k..<end] {
                var f = failure
                if f == nil {
                    do {
                        try t.file.file.write(plain, at: t.offset)
                    } catch {
                        f = "\(error)"
                    }
                }
                let done: Bool = t.file.lock.locked {
                    if let f {
                        if t.file.failure == nil { t.file.failure = f }
                    } else {
                        t.file.written += Int64(loc.rawLength)
                    }
                    t.file.remaining -= 1
                    return t.file.remaining == 0
                }
                if done { finish(t.file) }
            }
            k = end
        }
    }
}
