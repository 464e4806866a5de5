import CABackupCore
import CABackupFormat
import CABackupStorage
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Whole tree packs of a repository that is not on a local disk (a server space, a
/// bucket), kept in the user's cache directory beside the index, so walking snapshots
/// (an incremental backup's parent, `ls`, `diff`, a restore's plan) reads trees from
/// the local disk instead of one request per directory.
///
/// - The first tree the process cannot find in the cache fetches every tree pack of the
///   repository it lacks, many at once, so a walk costs a few round trips whatever the
///   number of directories; a tree pack written later is fetched alone when needed.
/// - Tree packs this device uploads are linked into the cache as they are stored.
/// - A pack is verified against its name (its SHA-256) when fetched; every blob read from
///   it is still opened and verified against its id by the reader, as from the storage.
/// - The cache holds at most `limit` bytes; the packs used least recently go first.
///   Packs the repository no longer holds are dropped when the index notices.
///
/// Thread-safe.
final class PackCache: @unchecked Sendable {
    // Safe: `warmed`, `touched`, `total` and `known` are only touched with `lock` held.
    let directory: String
    private let storage: any Storage
    private let lock = Condition()
    private let limitBytes: Atomic<Int64>
    private var warmed = false
    /// Packs whose modification time was set by this process (their last use).
    private var touched = Set<PackID>()
    /// Bytes of the cached packs, counted on first use.
    private var total: Int64?

    /// The default bound: tree packs are a small share of a repository (about 0.5% of a
    /// home directory's bytes), so 1 GiB holds the trees of some 200 GB of files.
    static let defaultLimit: Int64 = 1 << 30
    /// Requests in flight while filling the cache.
    static let parallelFetches = 8
    /// The largest piece of a pack fetched in one request (and held in memory).
    static let pieceSize = 8 << 20

    init(directory: String, storage: any Storage, limit: Int64 = PackCache.defaultLimit) {
        self.directory = directory
        self.storage = storage
        self.limitBytes = Atomic(limit)
    }

    /// The most bytes the cache holds; 0 turns it off (nothing is read from or added to it).
    var limit: Int64 {
        get { limitBytes.load(ordering: .relaxed) }
        set { limitBytes.store(max(0, newValue), ordering: .relaxed) }
    }

    func path(_ id: PackID) -> String { directory + "/" + id.hex.prefix(2) + "/" + id.hex }

    /// Reads a blob's stored bytes from the cached copy of its pack, fetching the
    /// repository's tree packs first when this one is not cached. Returns `false` when
    /// the pack cannot be cached (the caller then reads it from the storage).
    func read(
        _ pack: PackID, offset: Int64, length: Int, into buffer: UnsafeMutableRawPointer,
        treePacks: () throws -> [(PackID, Int64)]
    ) -> Bool {
        guard limit > 0 else { return false }
        if readCached(pack, offset: offset, length: length, into: buffer) { return true }
        let warm = lock.locked { () -> Bool in
            defer { warmed = true }
            return !warmed
        }
        if warm, let packs = try? treePacks() {
            fill(packs)
        } else if let size = try? storage.stat(.pack, pack.hex) {
            fill([(pack, size)])
        }
        return readCached(pack, offset: offset, length: length, into: buffer)
    }

    private func readCached(_ pack: PackID, offset: Int64, length: Int, into buffer: UnsafeMutableRawPointer) -> Bool {
        let p = path(pack)
        let fd = open(p, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard (try? preadFully(fd, into: buffer, count: length, offset: offset, path: p)) != nil else {
            return false
        }
        let first = lock.locked { touched.insert(pack).inserted }
        if first { utimensat(AT_FDCWD, p, nil, 0) }  // now: its last use, for eviction
        return true
    }

    /// Fetches the packs not cached yet, several at once, then trims the cache.
    func fill(_ packs: [(PackID, Int64)]) {
        let cap = min(limit / 2, Int64(FileKind.pack.maxWholeFileSize))
        var wanted = packs.filter { $0.1 > 0 && $0.1 <= cap && access(path($0.0), F_OK) != 0 }
        // Never fetch more than the cache can hold: the newest packs are the likeliest used.
        var budget = limit
        wanted = wanted.reversed().filter { p in
            budget -= p.1
            return budget >= 0
        }
        guard !wanted.isEmpty else { return }
        let next = Atomic<Int>(0)
        let items = wanted
        var threads: [pthread_t] = []
        for _ in 0..<min(Self.parallelFetches, items.count) {
            threads.append(
                startThread { [self] in
                    while true {
                        let i = next.add(1, ordering: .relaxed).oldValue
                        if i >= items.count { return }
                        try? fetch(items[i].0, size: items[i].1)
                    }
                })
        }
        for t in threads { joinThread(t) }
        trim()
    }

    /// Downloads one pack into the cache, in pieces, checking it against its name.
    private func fetch(_ pack: PackID, size: Int64) throws {
        let dir = directory + "/" + pack.hex.prefix(2)
        if !isDirectory(dir) { try makeDirectories(dir) }
        let (fd, tmp) = try TemporaryFiles.create(in: directory, prefix: "cache")
        var keep = false
        defer {
            close(fd)
            if !keep { unlink(tmp) }
            TemporaryFiles.forget(tmp)
        }
        let hasher = SHA256Hasher()
        let piece = Int(min(size, Int64(Self.pieceSize)))
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: piece, alignment: 64)
        defer { buffer.deallocate() }
        var offset: Int64 = 0
        while offset < size {
            let n = Int(min(Int64(piece), size - offset))
            try storage.read(.pack, pack.hex, offset: offset, length: n, into: buffer)
            let bytes = UnsafeRawBufferPointer(start: buffer, count: n)
            hasher.update(bytes)
            try writeAll(fd, bytes, path: tmp)
            offset += Int64(n)
        }
        guard hasher.finish() == pack else { return }  // not what its name says: not cached
        guard rename(tmp, path(pack)) == 0 else { throw ioError("rename", tmp) }
        keep = true
        lock.locked { total = total.map { $0 + size } }
    }

    /// Links a tree pack this device just built into the cache, before it is uploaded
    /// (and its staging file consumed).
    func adopt(_ pack: PackID, file: String, size: Int64) {
        guard limit > 0, size <= limit / 2 else { return }
        let dir = directory + "/" + pack.hex.prefix(2)
        if !isDirectory(dir) { try? makeDirectories(dir) }
        guard link(file, path(pack)) == 0 else { return }
        lock.locked { total = total.map { $0 + size } }
    }

    /// Drops cached copies of packs the repository no longer holds.
    func remove(_ packs: some Collection<PackID>) {
        for p in packs where unlink(path(p)) == 0 {
            lock.locked { total = nil }
        }
    }

    /// Removes the least recently used packs until the cache is within its limit.
    func trim() {
        let limit = limit
        let known = lock.locked { total }
        if let known, known <= limit { return }
        var files: [(path: String, size: Int64, used: Int)] = []
        var sum: Int64 = 0
        for sub in (try? readDirectory(Array(directory.utf8))) ?? [] where sub.count == 2 {
            let subdir = directory + "/" + String(decoding: sub, as: UTF8.self)
            for name in (try? readDirectory(Array(subdir.utf8))) ?? [] {
                let p = subdir + "/" + String(decoding: name, as: UTF8.self)
                var st = stat()
                guard lstat(p, &st) == 0 else { continue }
                #if canImport(Darwin)
                    let used = Int(st.st_mtimespec.tv_sec)
                #else
                    let used = Int(st.st_mtim.tv_sec)
                #endif
                files.append((p, Int64(st.st_size), used))
                sum += Int64(st.st_size)
            }
        }
        files.sort { $0.used < $1.used }
        for f in files where sum > limit {
            if unlink(f.path) == 0 { sum -= f.size }
        }
        lock.locked { total = sum }
    }
}
