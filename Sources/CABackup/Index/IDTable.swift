import CABackupCore
import CABackupFormat
#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A sorted file of every blob id the index held at one pack state: exact "stored"
/// answers for the dedup question without SQLite's B-tree.
///
/// The absent-id filter (``IDFilter``) answers "not stored" from memory, but every id it
/// lets through (every stored chunk of a backup that repeats data) costs a SQLite lookup:
/// a search down a 4-level B-tree and a 4 KiB page read, 3 µs on a 10M-id index, most of
/// it cache misses in the search and the kernel's page-cache path. Here the same question
/// costs a binary search of an in-memory array of one word per 1 KiB block (2.5 MB for
/// 10M ids), one 1 KiB `pread` and a search of 32 ids.
///
/// Trusted only as a list of ids that are stored: an id it holds is in a pack that was
/// indexed when the table was written, so it is stored as long as none of those packs
/// has been removed since, which ``RepositoryIndex`` checks against the pack state
/// recorded in the header before using it (see ``RepositoryIndex/PackState``). An id it
/// lacks may still be stored (indexed later): the caller asks SQLite. So a stale, torn or
/// damaged file can only cost lookups, never skip a blob.
///
/// Layout (`index.sqlite-ids`, little-endian): header (magic `CABIDT01`, index instance,
/// pack state: highest row, row count, id at the highest row or zeros, then the id
/// count), the ids sorted ascending (32 bytes each, no duplicates), the first word
/// (big-endian value of the first 8 bytes) of each block's first id as 8 bytes, and
/// SHA-256 of the header and those words. Written through a temporary file that is
/// synced before it is renamed into place.
final class IDTable {
    // Safe as a plain class: owned and used by RepositoryIndex under its lock.
    static let magic: [UInt8] = Array("CABIDT01".utf8)
    static let idsPerBlock = 32
    static let blockSize = idsPerBlock * 32
    static let headerSize = 8 + 32 + 8 + 8 + 32 + 8

    /// The index state the ids were read at.
    let state: RepositoryIndex.PackState
    /// How many ids the file holds.
    let count: Int
    private let fd: Int32
    private let path: String
    /// The first word of the first id of each block.
    private let fences: [UInt64]
    private let block = UnsafeMutableRawPointer.allocate(byteCount: IDTable.blockSize, alignment: 8)

    private init(fd: Int32, path: String, state: RepositoryIndex.PackState, count: Int, fences: [UInt64]) {
        self.fd = fd
        self.path = path
        self.state = state
        self.count = count
        self.fences = fences
    }

    deinit {
        close(fd)
        block.deallocate()
    }

    /// Whether the file lists `id`. `false` also when it cannot be read.
    func contains(_ id: ObjectID) -> Bool {
        // The last block whose first id's first word is at most id's.
        var lo = 0
        var hi = fences.count
        while lo < hi {
            let mid = (lo &+ hi) >> 1
            if fences[mid] <= id.w0 { lo = mid &+ 1 } else { hi = mid }
        }
        var b = lo - 1
        while b >= 0 {
            let n = min(IDTable.idsPerBlock, count - b * IDTable.idsPerBlock)
            let offset = Int64(IDTable.headerSize + b * IDTable.blockSize)
            guard (try? preadFully(fd, into: block, count: n * 32, offset: offset, path: path)) != nil else {
                return false
            }
            let ids = UnsafeRawBufferPointer(start: block, count: n * 32)
            func listed(_ i: Int) -> ObjectID { ObjectID(UnsafeRawBufferPointer(rebasing: ids[i * 32..<i * 32 + 32])) }
            var l = 0
            var h = n
            while l < h {
                let m = (l + h) >> 1
                if listed(m) < id { l = m + 1 } else { h = m }
            }
            if l < n, listed(l) == id { return true }
            // Ids sharing a first word can straddle blocks: only then look one block back.
            guard l == 0, fences[b] == id.w0 else { return false }
            b -= 1
        }
        return false
    }

    /// The table saved at `path` for `instance`, or `nil` when there is none or it is
    /// damaged or describes another index.
    static func load(path: String, instance: ObjectID) -> IDTable? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        var keep = false
        defer { if !keep { close(fd) } }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        guard let header = readDerivedHeader(fd, count: headerSize, magic: magic, instance: instance, path: path)
        else { return nil }
        func word(_ at: Int) -> UInt64 { littleEndianWord(header, at: at) }
        let last = ObjectID(bytes: Array(header[56..<88]))
        let state = RepositoryIndex.PackState(
            upTo: Int64(bitPattern: word(40)), count: Int64(bitPattern: word(48)), last: last == .zero ? nil : last)
        let count = Int(word(88))
        guard count >= 0, count < 1 << 40 else { return nil }
        let blocks = (count + idsPerBlock - 1) / idsPerBlock
        let fencesAt = Int64(headerSize + count * 32)
        guard Int(st.st_size) == Int(fencesAt) + blocks * 8 + 32 else { return nil }
        var raw = [UInt8](repeating: 0, count: blocks * 8 + 32)
        guard
            (try? raw.withUnsafeMutableBytes({
                try preadFully(fd, into: $0.baseAddress!, count: $0.count, offset: fencesAt, path: path)
            })) != nil
        else { return nil }
        let hasher = SHA256Hasher()
        header.withUnsafeBytes { hasher.update($0) }
        raw.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<blocks * 8])) }
        guard hasher.finish().bytes == Array(raw[(blocks * 8)...]) else { return nil }
        let fences = raw.withUnsafeBytes { r in
            (0..<blocks).map { UInt64(littleEndian: r.loadUnaligned(fromByteOffset: $0 * 8, as: UInt64.self)) }
        }
        keep = true
        return IDTable(fd: fd, path: path, state: state, count: count, fences: fences)
    }

    /// Writes a table from ids given in ascending order (repeats are skipped), then
    /// renames it into place at ``finish()``.
    final class Writer {
        private let path: String
        private let tmp: String
        private var fd: Int32
        private var header: [UInt8]
        private var buffer: [UInt8] = []
        private var fences: [UInt64] = []
        private var count = 0
        private var previous: ObjectID?
        private var written = Int64(IDTable.headerSize)

        init(path: String, instance: ObjectID, state: RepositoryIndex.PackState) throws {
            self.path = path
            tmp = path + ".tmp-\(getpid())"
            fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw ioError("create", tmp) }
            header = IDTable.magic + instance.bytes
            for v in [state.upTo, state.count] {
                withUnsafeBytes(of: UInt64(bitPattern: v).littleEndian) { header += $0 }
            }
            header += (state.last ?? .zero).bytes
            buffer.reserveCapacity(1 << 20)
        }

        deinit {
            // Not finished (an error): the temporary file goes.
            if fd >= 0 {
                close(fd)
                unlink(tmp)
            }
        }

        func append(_ id: ObjectID) throws {
            if let previous {
                if id == previous { return }
                precondition(previous < id, "IDTable.Writer needs ascending ids")
            }
            previous = id
            if count % IDTable.idsPerBlock == 0 { fences.append(id.w0) }
            count += 1
            id.withUnsafeBytes { buffer += $0 }
            if buffer.count >= 1 << 20 { try flush() }
        }

        private func flush() throws {
            try buffer.withUnsafeBytes { try pwriteAll(fd, $0, offset: written, path: tmp) }
            written += Int64(buffer.count)
            buffer.removeAll(keepingCapacity: true)
        }

        /// Completes the file (synced, so that a crash never leaves a named file whose
        /// ids are not the ones written) and opens it for lookups.
        func finish() throws -> IDTable {
            withUnsafeBytes(of: UInt64(count).littleEndian) { header += $0 }
            for f in fences { withUnsafeBytes(of: f.littleEndian) { buffer += $0 } }
            let hasher = SHA256Hasher()
            header.withUnsafeBytes { hasher.update($0) }
            buffer.withUnsafeBytes {
                hasher.update(UnsafeRawBufferPointer(rebasing: $0[(buffer.count - fences.count * 8)...]))
            }
            buffer += hasher.finish().bytes
            try flush()
            try header.withUnsafeBytes { try pwriteAll(fd, $0, offset: 0, path: tmp) }
            guard fsync(fd) == 0 else { throw ioError("fsync", tmp) }
            close(fd)
            fd = -1
            guard rename(tmp, path) == 0 else {
                let e = ioError("rename", tmp)
                unlink(tmp)
                throw e
            }
            let instance = ObjectID(bytes: Array(header[8..<40]))!
            guard let table = IDTable.load(path: path, instance: instance) else {
                throw CABackupError.index("the id table just written at \(path) does not read back")
            }
            return table
        }
    }
}
