import CABackupCore
import CABackupFormat
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Figures for the whole process, across savers and repositories.
package enum ProcessCounters {
    /// Bytes of packs this process stored: what an interrupted program says the next
    /// run reuses.
    package static let packBytesStored = Atomic<Int64>(0)
}

/// Stores new blobs: deduplicates them against the index and against blobs in flight,
/// streams them into open packs (one for data, one for trees), and hands full packs to
/// a writer thread that verifies, names, stores and indexes them.
///
/// A pack is written to a temporary file as its blobs arrive, hashed on the way, so no
/// pack is ever held in memory; sealing appends the header, and the writer thread makes
/// the file durable and moves it to its final name.
///
/// Thread-safe: the archiver's workers call ``claim(_:)`` and ``addEncoding(_:type:raw:codec:)``
/// concurrently. Each takes an open pack of the blob's type from a free list, appends and
/// hashes without holding a lock, and puts it back (or seals it when full): two workers
/// fill two packs side by side instead of queueing for one. Write order per pack: pack
/// file durable → index rows → ids released from the in-flight set.
final class BlobSaver: @unchecked Sendable {
    // Safe: `pending` and `failure` are only touched with `lock` held; `freePacks` only
    // with `packLock` held. An OpenPack taken off the free list belongs to one thread
    // until it is put back or queued. `lock` is never taken while `packLock` is held.
    private final class OpenPack {
        let fd: Int32
        let path: String
        let hasher = SHA256Hasher()
        var entries: [PackEntry] = []
        var size = 0

        init(fd: Int32, path: String) {
            self.fd = fd
            self.path = path
        }

        /// Writes a blob's stored bytes at the end, hashes them, and records the entry
        /// (its offset and length are where the bytes landed).
        func append(_ bytes: UnsafeRawBufferPointer, as entry: PackEntry) throws {
            try writeAll(fd, bytes, path: path)
            hasher.update(bytes)
            var e = entry
            e.offset = Int64(size)
            e.length = bytes.count
            entries.append(e)
            size += bytes.count
        }
    }

    private let repo: Repository
    private let lock = Condition()
    private let packLock = Condition()
    private var pending = Set<BlobID>()
    /// Open packs not in use, by blob type.
    private var freePacks: [[OpenPack]] = [[], []]
    private var failure: CABackupError?
    /// Sealed packs, in the order they were filled.
    private let queue = BlockingQueue<OpenPack>(capacity: 2)
    /// On a server: packs some of whose blobs the space lacks, for the uploaders.
    private let uploads = BlockingQueue<OpenPack>(capacity: 4)
    /// The thread asking a server which blobs it lacks, a batch of packs per question.
    private var asker: pthread_t?
    private var writers: [pthread_t] = []
    /// Counts what it would store and stores nothing (a snapshot's `dryRun`).
    private let dryRun: Bool

    /// Every blob id claimed or reused, for a snapshot commit that names its references
    /// (see ``Repository/commitNeedsReferences``); nil when nothing needs them. Touched
    /// with `lock` held.
    private var referenced: [BlobID]?

    /// Bytes of packs stored, headers included.
    let bytesAdded = Atomic<Int64>(0)
    /// Packs stored.
    let packsAdded = Atomic<Int>(0)
    /// Test-only fault injection: `CABACKUP_FAIL_AFTER_WRITES=N` kills the process
    /// (as a crash would) before it stores its pack number N+1. Compiled only into builds
    /// with the test hooks (debug builds, see `Package.swift`).
    private static let failAfterWrites: Int? = {
        #if CABACKUP_TEST_HOOKS
            guard let s = getenv("CABACKUP_FAIL_AFTER_WRITES") else { return nil }
            return Int(String(cString: s))
        #else
            return nil
        #endif
    }()

    /// - Parameter snapshot: the saver writes a snapshot, so it remembers what the
    ///   snapshot references when the commit needs that.
    fileprivate init(repository: Repository, snapshot: Bool = false, dryRun: Bool = false) {
        self.repo = repository
        self.dryRun = dryRun
        if dryRun { return }  // no threads, no files: add() only counts
        if snapshot && repository.commitNeedsReferences { referenced = [] }
        // What a killed writer left; a running one's files are locked and stay.
        TemporaryFiles.removeStale(in: repository.stagingDirectory)
        // A local disk takes one pack at a time; over a network several are in flight,
        // so the link is not idle while a pack's answer is awaited.
        let remote = repository.storage.workingDirectory == nil
        // A snapshot skips packs whose blobs the space holds already (another device
        // stored them). Prune must not: the blobs it rewrites are in the very packs it
        // deletes next, so the space always says it holds them.
        let asks = snapshot && repository.storage.space != nil
        if asks { asker = startThread { [self] in self.askerLoop() } }
        for _ in 0..<(remote ? Self.uploadsInFlight : 1) {
            writers.append(startThread { [self] in self.writerLoop(from: asks ? uploads : queue) })
        }
    }

    /// Packs uploaded at once to a storage that is not a local disk.
    static let uploadsInFlight = 4

    /// Returns `true` when the caller must store the blob: no indexed pack holds it
    /// and no other thread is storing it. Exactly one caller gets `true` per new id.
    func claim(_ id: BlobID) throws -> Bool {
        lock.lock()
        defer { lock.unlock() }
        if let failure { throw failure }
        referenced?.append(id)
        if pending.contains(id) { return false }
        if try repo.index.contains(id) { return false }
        pending.insert(id)
        return true
    }

    /// Notes blobs a snapshot references without storing them (the trees of an
    /// unchanged directory, taken from the parent).
    func reuse(_ ids: [BlobID]) {
        lock.locked { referenced?.append(contentsOf: ids) }
    }

    /// The blobs claimed or reused so far, when the snapshot commit needs them.
    var references: [BlobID] { lock.locked { referenced ?? [] } }

    /// Appends a claimed blob's stored bytes to the open pack of its type.
    func add(
        _ id: BlobID, type: BlobType, compression: BlobCompression, rawLength: Int, bytes: UnsafeRawBufferPointer
    )
        throws
    {
        if let failure = lock.locked({ failure }) { throw failure }
        if dryRun {
            bytesAdded.add(Int64(bytes.count), ordering: .relaxed)
            return
        }
        let t = Int(type.rawValue)
        let pack: OpenPack
        do {
            pack = try packLock.locked { freePacks[t].popLast() } ?? openPack()
        } catch {
            fail(CABackupError(error))
            throw error
        }
        do {
            try pack.append(
                bytes,
                as: PackEntry(
                    id: id, type: type, compression: compression, offset: 0, length: bytes.count, rawLength: rawLength))
            if PackFormat.isFull(bytes: pack.size, blobs: pack.entries.count, packSize: repo.config.packSize) {
                try seal(pack)
                queue.push(pack)
            } else {
                packLock.locked { freePacks[t].append(pack) }
            }
        } catch {
            discard(pack)
            fail(CABackupError(error))
            throw error
        }
    }

    /// Compresses (and in an encrypted repository seals) a claimed blob with the
    /// calling thread's `codec`, and appends it.
    func addEncoding(_ id: BlobID, type: BlobType, raw: UnsafeRawBufferPointer, codec: BlobCodec) throws {
        let (compression, stored) = codec.encode(raw)
        try add(id, type: type, compression: compression, rawLength: raw.count, bytes: stored)
    }

    /// Seals the open packs, waits until every pack is stored and indexed.
    /// - Throws: the first error any pack write hit.
    fileprivate func finish() throws {
        let byType: [[OpenPack]] = packLock.locked {
            defer { freePacks = [[], []] }
            return freePacks
        }
        var open: [OpenPack] = []
        for packs in byType {
            do {
                open += try coalesce(packs)
            } catch {
                fail(CABackupError(error))  // coalesce discarded the packs it could not finish
            }
        }
        for p in open {
            do {
                try seal(p)
                queue.push(p)
            } catch {
                discard(p)
                fail(CABackupError(error))
            }
        }
        stopThreads()
        if let failure = lock.locked({ failure }) { throw failure }
    }

    /// Stops the writer and removes unsealed packs (after an error elsewhere).
    fileprivate func abandon() {
        let open: [OpenPack] = packLock.locked {
            defer { freePacks = [[], []] }
            return freePacks.flatMap { $0 }
        }
        for p in open { discard(p) }
        stopThreads()
    }

    /// Lets the threads drain what is queued, and joins them.
    private func stopThreads() {
        queue.close()
        if let asker {
            joinThread(asker)
            self.asker = nil
        }
        uploads.close()
        for w in writers { joinThread(w) }
        writers = []
    }

    /// Merges the partly filled packs of one type (one per worker that wrote at the same
    /// time) into the fullest one while it stays within the pack size, so a small snapshot
    /// leaves one small pack, not one per worker. Returns the packs left to seal.
    private func coalesce(_ packs: [OpenPack]) throws -> [OpenPack] {
        guard packs.count > 1 else { return packs }
        var rest = packs.sorted { $0.size > $1.size }
        let target = rest.removeFirst()
        var kept = [target]
        var buffer = [UInt8]()
        while !rest.isEmpty {
            let other = rest.removeFirst()
            guard target.size + other.size <= repo.config.packSize,
                target.entries.count + other.entries.count <= PackFormat.maxBlobsPerPack
            else {
                kept.append(other)
                continue
            }
            do {
                for e in other.entries {
                    if buffer.count < max(1, e.length) { buffer = [UInt8](repeating: 0, count: max(1, e.length)) }
                    try buffer.withUnsafeMutableBytes { raw in
                        try preadFully(
                            other.fd, into: raw.baseAddress!, count: e.length, offset: e.offset, path: other.path)
                        try target.append(UnsafeRawBufferPointer(rebasing: raw[..<e.length]), as: e)
                    }
                }
            } catch {
                for p in kept + [other] + rest { discard(p) }
                throw error
            }
            discard(other)
        }
        return kept
    }

    private func fail(_ error: CABackupError) {
        lock.locked { if failure == nil { failure = error } }
    }

    private func openPack() throws -> OpenPack {
        // Read and write: finish() may copy one partly filled pack into another.
        let (fd, path) = try TemporaryFiles.create(in: repo.stagingDirectory, prefix: "pack")
        return OpenPack(fd: fd, path: path)
    }

    private func discard(_ pack: OpenPack) {
        unlink(pack.path)
        TemporaryFiles.forget(pack.path)
        close(pack.fd)
    }

    /// Appends the header and trailer, after checking they parse back to exactly the
    /// entries meant.
    private func seal(_ pack: OpenPack) throws {
        // A cipher context per pack: packs are sealed on whichever worker filled them.
        let headerAEAD = repo.makeAEAD()
        let header = PackFormat.encodeHeader(pack.entries, aead: headerAEAD)
        let total = Int64(pack.size + header.count)
        let hlen = try PackFormat.parseTrailer(Array(header.suffix(PackFormat.trailerSize)), packSize: total)
        let parsed = try PackFormat.parseHeader(Array(header.prefix(hlen)), packSize: total, aead: headerAEAD)
        guard parsed == pack.entries else {
            throw CABackupError.corrupt(what: "new pack", reason: "header did not parse back (a bug: please report it)")
        }
        try header.withUnsafeBytes { raw in
            try writeAll(pack.fd, raw, path: pack.path)
            pack.hasher.update(raw)
        }
        pack.size += header.count
    }

    /// Asks the space which blobs it lacks once for every batch of sealed packs (all that
    /// are waiting, up to 16), and passes on the packs that hold any: when another device
    /// stored every blob of a pack meanwhile, it is not uploaded (the next open indexes
    /// that device's packs).
    private func askerLoop() {
        guard let space = repo.storage.space else { return }
        while let first = queue.pop() {
            let batch = [first] + queue.popAvailable(limit: 15)
            if lock.locked({ failure }) != nil {
                for p in batch { discard(p) }
                continue
            }
            let missing: Set<BlobID>
            do {
                missing = Set(try space.missing(batch.flatMap { $0.entries.map(\.id) }))
            } catch {
                for p in batch { discard(p) }
                fail(CABackupError(error))
                continue
            }
            for p in batch {
                if p.entries.contains(where: { missing.contains($0.id) }) {
                    uploads.push(p)
                } else {
                    discard(p)
                    release(p)
                }
            }
        }
    }

    private func writerLoop(from queue: BlockingQueue<OpenPack>) {
        while let pack = queue.pop() {
            if lock.locked({ failure }) != nil {
                discard(pack)
                continue
            }
            do {
                try store(pack)
            } catch {
                discard(pack)
                fail(CABackupError(error))
            }
        }
    }

    private func store(_ pack: OpenPack) throws {
        let id = pack.hasher.finish()
        if let limit = Self.failAfterWrites, packsAdded.load(ordering: .relaxed) >= limit {
            _exit(137)
        }
        if let cache = repo.packCache, pack.entries.allSatisfy({ $0.type == .tree }) {
            cache.adopt(id, file: pack.path, size: Int64(pack.size))
        }
        try repo.storage.put(.pack, id.hex, file: pack.path)
        TemporaryFiles.forget(pack.path)
        close(pack.fd)
        try repo.index.addPack(id, size: Int64(pack.size), entries: pack.entries)
        release(pack)
        bytesAdded.add(Int64(pack.size), ordering: .relaxed)
        ProcessCounters.packBytesStored.add(Int64(pack.size), ordering: .relaxed)
        packsAdded.add(1, ordering: .relaxed)
    }

    /// Takes a stored (or not needed) pack's ids out of the in-flight set.
    private func release(_ pack: OpenPack) {
        lock.locked {
            for e in pack.entries { pending.remove(e.id) }
        }
    }
}

/// What a blob writer stored, read once its last pack is stored and indexed.
struct BlobWriterTotals {
    /// Bytes of packs stored, headers included.
    var bytesAdded: Int64
    /// Packs stored.
    var packsAdded: Int
    /// Every blob claimed or reused, when the snapshot commit needs them (see
    /// ``Repository/commitNeedsReferences``); empty otherwise.
    var references: [BlobID]
}

extension Repository {
    /// Runs `body` with a blob writer, the only way to get one: the writer starts here,
    /// and when `body` returns its open packs are sealed, stored and indexed before the
    /// totals are read; when `body` throws, its unsealed packs are removed and the error
    /// is rethrown. Whatever feeds the writer from other threads must have stopped when
    /// `body` returns or throws.
    ///
    /// - Parameter forSnapshot: the blobs make up a snapshot, so the writer remembers
    ///   what it references when the commit needs that.
    ///   - dryRun: nothing is stored: blobs the repository lacks are only counted, as
    ///     ``BlobWriterTotals/bytesAdded`` (their stored size, without pack headers).
    func withBlobWriter<R>(
        forSnapshot: Bool = false, dryRun: Bool = false, _ body: (BlobSaver) throws -> R
    ) throws -> (R, BlobWriterTotals) {
        let saver = BlobSaver(repository: self, snapshot: forSnapshot, dryRun: dryRun)
        let result: R
        do {
            result = try body(saver)
            try saver.finish()
        } catch {
            saver.abandon()
            throw error
        }
        let totals = BlobWriterTotals(
            bytesAdded: saver.bytesAdded.load(ordering: .relaxed),
            packsAdded: saver.packsAdded.load(ordering: .relaxed), references: saver.references)
        return (result, totals)
    }
}
