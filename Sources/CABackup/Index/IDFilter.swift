import CABackupCore
import CABackupFormat
#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A blocked Bloom filter over blob ids: "certainly not stored" answers without SQLite.
///
/// A new chunk's id is looked up before it is stored; in a first snapshot nearly every
/// answer is "absent", and each costs a B-tree leaf read through SQLite (3–4 µs on a 10M-id
/// index). The filter answers most of them from memory: one 64-byte block per id, chosen
/// by the id's first word, with eight bits set in it from the next words (ids are SHA-256
/// or HMAC-SHA-256 values, so their words are uniform). "Maybe" answers still go to SQLite,
/// so a false positive costs one lookup and never skips a blob.
///
/// Sized at 12 bits per id of capacity (about 0.3% false positives when full); grown by
/// rebuilding from the index when more ids than its capacity have been added. Removed
/// blobs keep their bits (a filter can only over-approximate), until the next rebuild.
///
/// Persisted next to the index (`index.sqlite-filter`) with the index's instance id and
/// generation, and trusted on load only when both still match and its checksum holds:
/// see ``RepositoryIndex`` for how the generation is kept in step.
final class IDFilter {
    // Safe as a plain class: owned and used by RepositoryIndex under its lock.
    static let bitsPerID = 12
    static let minimumCapacity = 65_536
    static let magic: [UInt8] = Array("CABFLT01".utf8)
    /// magic, instance, generation, capacity, inserted, block count.
    static let headerSize = 8 + 32 + 8 + 8 + 8 + 8

    /// The index instance and generation the bits describe.
    let instance: ObjectID
    var generation: Int64
    /// How many ids the filter was sized for, and how many have been inserted.
    let capacity: Int
    private(set) var inserted: Int
    let blockCount: Int
    /// `blockCount` blocks of eight words.
    private let words: UnsafeMutablePointer<UInt64>

    /// An empty filter for `capacity` ids (its bits left uninitialized when `zeroed` is
    /// false, for ``load(path:instance:generation:)`` to fill).
    init(capacity: Int, instance: ObjectID, generation: Int64, zeroed: Bool = true) {
        self.capacity = max(capacity, IDFilter.minimumCapacity)
        blockCount = (self.capacity * IDFilter.bitsPerID + 511) / 512
        words = .allocate(capacity: blockCount * 8)
        if zeroed { words.initialize(repeating: 0, count: blockCount * 8) }
        inserted = 0
        self.instance = instance
        self.generation = generation
    }

    deinit { words.deallocate() }

    /// The first word of the block that holds `id`'s bits (multiply-shift: no modulo bias).
    @inline(__always)
    private func block(_ id: ObjectID) -> Int {
        Int(id.w0.multipliedFullWidth(by: UInt64(blockCount)).high) &* 8
    }

    /// The eight bit positions (0..<512) for `id` inside its block.
    @inline(__always)
    private func forEachBit(_ id: ObjectID, _ body: (Int) -> Void) {
        var w = id.w1
        for _ in 0..<7 {
            body(Int(w & 511))
            w >>= 9
        }
        body(Int(id.w2 & 511))
    }

    /// Records `id` as stored.
    func insert(_ id: ObjectID) {
        let b = words + block(id)
        forEachBit(id) { b[$0 >> 6] |= 1 << UInt64($0 & 63) }
        inserted += 1
    }

    /// `false`: `id` was never inserted. `true`: it may have been.
    func mayContain(_ id: ObjectID) -> Bool {
        let b = words + block(id)
        var all = true
        forEachBit(id) { all = all && b[$0 >> 6] & (1 << UInt64($0 & 63)) != 0 }
        return all
    }

    /// Reads the first word of each id's block, so that the misses of a batch overlap
    /// (independent loads: the CPU keeps several in flight) instead of costing a full
    /// memory latency each when the ids are then tested one by one. Returns a value
    /// derived from the loads, for the caller to keep (so they are not optimized away).
    func touch(_ ids: [ObjectID]) -> UInt64 {
        var acc: UInt64 = 0
        for id in ids { acc ^= words[block(id)] }
        return acc
    }

    // MARK: Persistence

    /// Writes the filter to `path` (through a temporary file and a rename, mode 0600).
    /// A torn or stale file is harmless: ``load(path:instance:generation:)`` rejects it.
    func save(to path: String) throws {
        var header = [UInt8]()
        header.reserveCapacity(IDFilter.headerSize)
        header += IDFilter.magic
        header += instance.bytes
        for v in [UInt64(bitPattern: generation), UInt64(capacity), UInt64(inserted), UInt64(blockCount)] {
            withUnsafeBytes(of: v.littleEndian) { header += $0 }
        }
        let body = UnsafeRawBufferPointer(start: words, count: blockCount * 64)
        let hasher = SHA256Hasher()
        header.withUnsafeBytes { hasher.update($0) }
        hasher.update(body)
        let sum = hasher.finish().bytes
        let tmp = path + ".tmp-\(getpid())"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ioError("create", tmp) }
        do {
            defer { close(fd) }
            try header.withUnsafeBytes { try writeAll(fd, $0, path: tmp) }
            try writeAll(fd, body, path: tmp)
            try sum.withUnsafeBytes { try writeAll(fd, $0, path: tmp) }
        } catch {
            unlink(tmp)
            throw error
        }
        guard rename(tmp, path) == 0 else {
            let e = ioError("rename", tmp)
            unlink(tmp)
            throw e
        }
    }

    /// The filter saved at `path`, or `nil` when there is none, it is damaged, or it
    /// describes another index instance or generation.
    static func load(path: String, instance: ObjectID, generation: Int64) -> IDFilter? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        guard let header = readDerivedHeader(fd, count: headerSize, magic: magic, instance: instance, path: path)
        else { return nil }
        func field(_ i: Int) -> UInt64 { littleEndianWord(header, at: 40 + 8 * i) }
        let (gen, capacity, inserted, blocks) = (
            Int64(bitPattern: field(0)), Int(field(1)), Int(field(2)), Int(field(3))
        )
        guard gen == generation, capacity >= minimumCapacity, capacity < 1 << 40, inserted >= 0,
            blocks == (capacity * bitsPerID + 511) / 512, Int(st.st_size) == headerSize + blocks * 64 + 32
        else { return nil }
        let filter = IDFilter(capacity: capacity, instance: instance, generation: gen, zeroed: false)
        var sum = [UInt8](repeating: 0, count: 32)
        do {
            try preadFully(fd, into: filter.words, count: blocks * 64, offset: Int64(headerSize), path: path)
            try sum.withUnsafeMutableBytes {
                try preadFully(
                    fd, into: $0.baseAddress!, count: 32, offset: Int64(headerSize + blocks * 64), path: path)
            }
        } catch { return nil }
        let hasher = SHA256Hasher()
        header.withUnsafeBytes { hasher.update($0) }
        hasher.update(UnsafeRawBufferPointer(start: filter.words, count: blocks * 64))
        guard hasher.finish().bytes == sum else { return nil }
        filter.inserted = inserted
        return filter
    }
}
