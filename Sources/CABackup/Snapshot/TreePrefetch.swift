import CABackupCore
import CABackupFormat
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Lists and `lstat`s the directories of a backup ahead of its walk, on a thread of its
/// own, so that the system calls of the walk overlap with opening the repository.
///
/// Opening an encrypted repository derives the key (scrypt, ~0.2 s of one core); on a tree
/// of 50,000 unchanged files, listing and stating them takes about as long again on the
/// walking thread. Start a prefetch before ``Repository/open(path:passwordProvider:durable:)``
/// and pass it in ``SnapshotOptions/prefetch``: the walk then takes each directory's
/// listing from it instead of reading the directory, when the listing describes the same
/// directory (device, inode, mtime and ctime as the walk's own `fstat` of it); otherwise it
/// reads the directory itself, as without a prefetch.
///
/// Both go depth first in the same order, so the listings wait in a queue; at most
/// `budget` entries are held (the prefetch waits for the walk to take some before it lists
/// more, and the walk waits for the prefetch when it has caught up). A file that changes between the
/// prefetch and the walk is recorded as it was when listed (unless it is read: a file to
/// be read is stated again first), as if the walk had reached it that much earlier; the
/// snapshot's time is then the prefetch's start, and the next snapshot sees the change.
public final class TreePrefetch: Sendable {
    private let state: PrefetchState
    private let thread: Mutex<pthread_t?>
    /// When listing began (wall clock, ns): a snapshot using the listings is as of then.
    let startedNs = wallClockNs()

    /// Starts listing `paths` (as a snapshot of them would walk them), skipping what
    /// `excludes` and `caseInsensitiveExcludes` would exclude (malformed patterns exclude
    /// nothing here: the snapshot reports them).
    public convenience init(
        paths: [String], excludes: [String] = [], caseInsensitiveExcludes: [String] = [], budget: Int = 16_384
    ) {
        self.init(
            paths: paths,
            options: SnapshotOptions(excludes: excludes, caseInsensitiveExcludes: caseInsensitiveExcludes),
            budget: budget)
    }

    /// Starts listing `paths` as a snapshot with `options` would walk them (its excludes
    /// and other exclusions; invalid ones exclude nothing here: the snapshot reports them).
    public init(paths: [String], options: SnapshotOptions, budget: Int = 16_384) {
        let state = PrefetchState(budget: budget)
        self.state = state
        let roots = paths.map { absolutePath($0) }
        let excludes = try? ExcludeRules(
            excludes: options.excludes, caseInsensitiveExcludes: options.caseInsensitiveExcludes)
        let filter = (try? WalkFilter(options)) ?? .none
        thread = Mutex(startThread { state.run(roots: roots, excludes: excludes, filter: filter) })
    }

    /// Stops the prefetch and drops what the walk did not take.
    public func finish() {
        state.stop()
        if let t = thread.withLock({ t in
            defer { t = nil }; return t
        }) {
            joinThread(t)
        }
    }

    deinit { finish() }

    /// Tests: waits until the prefetch has listed all it will.
    func waitUntilListed() { state.waitUntilDone() }

    /// Tests: how many listings the walk has used.
    var directoriesTaken: Int { state.taken }

    /// The listing of directory `path`, open as `fd`, if the prefetch made one of the same
    /// directory in the same state (waiting for it when the prefetch is behind).
    func take(directory fd: Int32, path: [UInt8]) -> PrefetchedDirectory? {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        let key = PrefetchState.Key(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        return state.take(path: path, key: key, mtimeNs: nanoseconds(st.st_mtim), ctimeNs: nanoseconds(st.st_ctim))
    }
}

/// One directory as the prefetch saw it: its sorted names and each one's `lstat`, packed
/// (one buffer of name bytes; entries of 72 bytes instead of a `stat`'s 144), since the
/// listings are held while the key is derived, when the process uses the most memory.
struct PrefetchedDirectory: Sendable {
    let mtimeNs: Int64
    let ctimeNs: Int64
    /// The names, back to back; name `i` ends at `nameEnds[i]`.
    let nameBytes: [UInt8]
    let nameEnds: [UInt32]
    /// Parallel to the names: each entry's metadata, or why there is none.
    let entries: [PrefetchedEntry]

    init(directory st: stat, names: [[UInt8]], entries: [PrefetchedEntry]) {
        mtimeNs = nanoseconds(st.st_mtim)
        ctimeNs = nanoseconds(st.st_ctim)
        var bytes: [UInt8] = []
        bytes.reserveCapacity(names.reduce(0) { $0 + $1.count })
        nameEnds = names.map { name in
            bytes += name
            return UInt32(bytes.count)
        }
        nameBytes = bytes
        self.entries = entries
    }

    /// The names, sorted bytewise (as ``readDirectory(fd:path:)`` returns them).
    var names: [[UInt8]] {
        var start = 0
        return nameEnds.map { end in
            defer { start = Int(end) }
            return Array(nameBytes[start..<Int(end)])
        }
    }
}

/// The fields of an `lstat` result that a snapshot records.
struct PrefetchedEntry: Sendable {
    var mode: UInt32
    var uid: UInt32
    var gid: UInt32
    /// 0: the fields are valid; > 0: the `errno` of a failed `fstatat`; -1: not stated
    /// (excluded).
    var error: Int32
    /// `st_nlink`, saturated at 2^32 - 1.
    var links: UInt32
    var size: Int64
    var mtimeNs: Int64
    var ctimeNs: Int64
    var inode: UInt64
    var device: UInt64
    var rdev: UInt64

    init(_ st: stat) {
        mode = UInt32(st.st_mode)
        uid = st.st_uid
        gid = st.st_gid
        error = 0
        links = UInt32(clamping: st.st_nlink)
        size = Int64(st.st_size)
        mtimeNs = nanoseconds(st.st_mtim)
        ctimeNs = nanoseconds(st.st_ctim)
        inode = UInt64(st.st_ino)
        device = UInt64(st.st_dev)
        rdev = UInt64(st.st_rdev)
    }

    init(error: Int32) {
        self.init(stat())
        self.error = error
    }

    /// The `stat` the walk would have got (the fields a snapshot uses).
    func makeStat() -> stat {
        var st = stat()
        st.st_mode = mode_t(mode)
        st.st_uid = uid
        st.st_gid = gid
        st.st_size = off_t(size)
        st.st_mtim = timespecFrom(ns: mtimeNs)
        st.st_ctim = timespecFrom(ns: ctimeNs)
        st.st_ino = ino_t(inode)
        st.st_dev = dev_t(device)
        st.st_nlink = nlink_t(links)
        st.st_rdev = dev_t(rdev)
        return st
    }
}

/// Splits a path into its components (empty ones dropped).
private func components(_ path: [UInt8]) -> [ArraySlice<UInt8>] {
    path.split(separator: 0x2F)
}

/// Whether directory `a` comes before `b` in the walk's order: depth first, each
/// directory's entries sorted bytewise, a directory before what is inside it.
func precedesInWalk(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    components(a).lexicographicallyPrecedes(components(b)) { $0.lexicographicallyPrecedes($1) }
}

/// The listings between the prefetch thread and the walk: a queue in walk order.
final class PrefetchState: @unchecked Sendable {
    // Safe: `queue`, `head`, `held`, `stopped` and `done` are only touched with `cond` locked.
    struct Key: Hashable {
        let device: UInt64
        let inode: UInt64
    }

    private let cond = Condition()
    private var queue: [(path: [UInt8], key: Key, listing: PrefetchedDirectory)] = []
    private var head = 0
    /// Entries in the queue.
    private var held = 0
    private var stopped = false
    /// The prefetch thread has listed everything it will.
    private var done = false
    /// Listings handed to the walk.
    private var takenCount = 0
    let budget: Int

    init(budget: Int) { self.budget = budget }

    /// Stops the prefetch thread (at its next directory) and frees the listings.
    func stop() {
        cond.locked {
            stopped = true
            queue = []
            head = 0
            held = 0
        }
        cond.broadcast()
    }

    fileprivate var isStopped: Bool { cond.locked { stopped } }

    var taken: Int { cond.locked { takenCount } }

    func waitUntilDone() {
        cond.locked { while !done { cond.wait() } }
    }

    /// The listing of directory `path` (device and inode `key`, mtime and ctime as given),
    /// waiting for the prefetch when it has not got there yet. Listings before it in walk
    /// order are dropped (the walk did not go there); `nil` when the prefetch skipped it,
    /// saw another inode, or the directory changed since.
    func take(path: [UInt8], key: Key, mtimeNs: Int64, ctimeNs: Int64) -> PrefetchedDirectory? {
        let found = cond.locked { () -> PrefetchedDirectory? in
            while true {
                // Both sides build paths the same way: the next listing is normally this
                // one, found without splitting paths into components.
                while head < queue.count && queue[head].path != path && precedesInWalk(queue[head].path, path) {
                    pop()
                }
                if head < queue.count {
                    guard queue[head].path == path else { return nil }  // skipped: the head is past it
                    let entry = queue[head]
                    pop()
                    guard entry.key == key, entry.listing.mtimeNs == mtimeNs, entry.listing.ctimeNs == ctimeNs
                    else { return nil }
                    takenCount += 1
                    return entry.listing
                }
                if stopped || done { return nil }
                cond.wait()
            }
        }
        cond.broadcast()
        return found
    }

    /// Removes the head of the queue. Called with `cond` locked.
    private func pop() {
        held -= queue[head].listing.entries.count
        head += 1
        if head > 64 && head * 2 > queue.count {
            queue.removeFirst(head)
            head = 0
        }
    }

    /// Appends a listing once the budget has room for it; `false` when stopped.
    fileprivate func publish(_ path: [UInt8], _ key: Key, _ listing: PrefetchedDirectory) -> Bool {
        let published = cond.locked { () -> Bool in
            while !stopped && held + listing.entries.count > budget { cond.wait() }
            if stopped { return false }
            queue.append((path, key, listing))
            held += listing.entries.count
            return true
        }
        cond.broadcast()
        return published
    }

    /// Lists the directories of `roots` in walk order, through the walk a snapshot makes
    /// (``FileSystemWalker``), so both see the same directories in the same order.
    func run(roots: [String], excludes: ExcludeRules?, filter: WalkFilter) {
        defer {
            cond.locked { done = true }
            cond.broadcast()
        }
        var visitor = Visitor(state: self, excludes: excludes)
        _ = try? FileSystemWalker(excludes: excludes ?? .none, filter: filter).walk(PathTrie(paths: roots), &visitor)
    }

    /// States each listed directory's entries, publishes the listing, then descends.
    private struct Visitor: FileSystemVisitor {
        struct Directory {}
        let state: PrefetchState
        let excludes: ExcludeRules?
        var isStopped = false

        mutating func enter(
            _ directory: WalkDirectory, listing: inout DirectoryListing, parent: Directory?
        )
            -> Directory?
        {
            if state.isStopped { isStopped = true }
            if directory.isAncestor { return isStopped ? nil : Directory() }
            var dst = stat()
            // A directory larger than the budget, and what is below it, is left to the walk
            // (which then finds the next listing later in walk order and reads these itself).
            guard !isStopped, let fd = directory.handle?.fd, listing.error == nil, fstat(fd, &dst) == 0,
                listing.names.count <= state.budget
            else { return nil }
            listing.statAll(fd, excludes: excludes, path: directory.path)
            let key = Key(device: UInt64(dst.st_dev), inode: UInt64(dst.st_ino))
            let made = PrefetchedDirectory(directory: dst, names: listing.names, entries: listing.known ?? [])
            if !state.publish(directory.path, key, made) {
                isStopped = true
                return nil
            }
            return Directory()
        }

        func visit(_ entry: inout WalkEntry, in directory: inout Directory) -> WalkStep {
            (entry.stat.st_mode & S_IFMT) == S_IFDIR ? .descend : .next
        }

        func leave(_ child: Directory, into parent: inout Directory) {}
    }
}
