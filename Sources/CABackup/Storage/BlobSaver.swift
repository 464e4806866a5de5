import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Stores new blobs: deduplicates them against the index and against blobs in flight,
/// appends them to open packs (one for data, one for trees), and hands full packs to a
/// writer thread that names, verifies, stores and indexes them.
///
/// Thread-safe: the archiver's workers call ``claim(_:)`` and ``add(_:type:compression:rawLength:bytes:)``
/// concurrently. Write order per pack: pack file durable → index rows → ids released
/// from the in-flight set.
final class BlobSaver: @unchecked Sendable {
    // Safe: `pending`, `packs` and `failure` are only touched with `lock` held.
    private struct OpenPack {
        var bytes: [UInt8] = []
        var entries: [PackEntry] = []
    }

    private struct SealedPack {
        var bytes: [UInt8]
        var entries: [PackEntry]
    }

    private let repo: Repository
    private let lock = Condition()
    private var pending = Set<BlobID>()
    /// The open pack per blob type, indexed by `BlobType.rawValue` (mutated in place:
    /// taking a 16 MiB array out of a dictionary to append would copy it).
    private var packs: [OpenPack] = [OpenPack(), OpenPack()]
    private var failure: CABackupError?
    /// Emptied pack buffers kept for reuse (see ``BufferPool`` for why reuse matters).
    private var spare: [[UInt8]] = []
    private let queue = BlockingQueue<SealedPack>(capacity: 2)
    private var writer: pthread_t?

    /// Bytes of packs stored, headers included.
    let bytesAdded = Atomic<Int64>(0)
    /// Packs stored.
    let packsAdded = Atomic<Int>(0)
    /// Writes performed, for the fault-injection hook `CABACKUP_FAIL_AFTER_WRITES`.
    private static let failAfterWrites: Int? = {
        guard let s = getenv("CABACKUP_FAIL_AFTER_WRITES") else { return nil }
        return Int(String(cString: s))
    }()

    init(repository: Repository) {
        self.repo = repository
        writer = startThread { [self] in self.writerLoop() }
    }

    /// Returns `true` when the caller must store the blob: no indexed pack holds it
    /// and no other thread is storing it. Exactly one caller gets `true` per new id.
    func claim(_ id: BlobID) throws -> Bool {
        lock.lock()
        defer { lock.unlock() }
        if let failure { throw failure }
        if pending.contains(id) { return false }
        if try repo.index.contains(id) { return false }
        pending.insert(id)
        return true
    }

    /// Appends a claimed blob's stored bytes to the open pack of its type.
    func add(
        _ id: BlobID, type: BlobType, compression: BlobCompression, rawLength: Int, bytes: UnsafeRawBufferPointer
    )
        throws
    {
        var sealed: SealedPack?
        lock.lock()
        if let failure {
            lock.unlock()
            throw failure
        }
        let t = Int(type.rawValue)
        if packs[t].bytes.capacity == 0 {
            packs[t].bytes = spare.popLast() ?? []
            // Room for the blob that crosses pack_size (up to one maximum chunk) and the header.
            packs[t].bytes.reserveCapacity(repo.config.packSize + repo.config.chunker.maxSize + (1 << 20))
        }
        let entry = PackEntry(
            id: id, type: type, compression: compression, offset: Int64(packs[t].bytes.count), length: bytes.count,
            rawLength: rawLength)
        packs[t].bytes.append(contentsOf: bytes)
        packs[t].entries.append(entry)
        if packs[t].bytes.count >= repo.config.packSize {
            var full = OpenPack()
            swap(&full, &packs[t])
            sealed = SealedPack(bytes: full.bytes, entries: full.entries)
        }
        lock.unlock()
        if let sealed { queue.push(sealed) }
    }

    /// Seals the open packs, waits until every pack is stored and indexed.
    /// - Throws: the first error any pack write hit.
    func finish() throws {
        let open: [OpenPack] = lock.locked {
            defer { packs = [OpenPack(), OpenPack()] }
            return packs
        }
        for p in open where !p.entries.isEmpty { queue.push(SealedPack(bytes: p.bytes, entries: p.entries)) }
        queue.close()
        if let w = writer {
            joinThread(w)
            writer = nil
        }
        if let failure = lock.locked({ failure }) { throw failure }
    }

    /// Stops the writer without storing open packs (after an error elsewhere).
    func abandon() {
        queue.close()
        if let w = writer {
            joinThread(w)
            writer = nil
        }
    }

    private func writerLoop() {
        while var pack = queue.pop() {
            if lock.locked({ failure }) != nil { continue }
            do {
                try store(&pack)
            } catch {
                lock.locked { if failure == nil { failure = CABackupError(error) } }
            }
        }
    }

    private func store(_ pack: inout SealedPack) throws {
        pack.bytes.append(contentsOf: PackFormat.encodeHeader(pack.entries))
        let size = pack.bytes.count
        // Verify before storing: the header must parse back to exactly what was meant.
        let hlen = try? PackFormat.parseTrailer(Array(pack.bytes.suffix(PackFormat.trailerSize)), packSize: Int64(size))
        let parsed = hlen.flatMap {
            try? PackFormat.parseHeader(
                Array(pack.bytes[size - PackFormat.trailerSize - $0..<size - PackFormat.trailerSize]),
                packSize: Int64(size))
        }
        guard parsed == pack.entries else {
            throw CABackupError.corrupt(what: "new pack", reason: "header did not parse back (a bug: please report it)")
        }
        let id = sha256(pack.bytes)
        if let limit = Self.failAfterWrites, packsAdded.load(ordering: .relaxed) >= limit {
            // Test-only fault injection: die before the N+1st pack write, as a crash would.
            _exit(137)
        }
        try pack.bytes.withUnsafeBytes { (raw) throws in
            try repo.backend.write(.pack, id.hex, raw)
        }
        try repo.index.addPack(id, size: Int64(size), entries: pack.entries)
        pack.bytes.removeAll(keepingCapacity: true)
        let emptied = pack.bytes
        pack.bytes = []
        lock.locked {
            for e in pack.entries { pending.remove(e.id) }
            if spare.count < 4 { spare.append(emptied) }
        }
        bytesAdded.add(Int64(size), ordering: .relaxed)
        packsAdded.add(1, ordering: .relaxed)
    }
}
