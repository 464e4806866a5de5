import CABackupCore
import CABackupFormat
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The one walk of the file system: backup (``Archiver``), its size scan
/// (``SizeScanner``), the listings made ahead of it (``TreePrefetch``) and `status`
/// (``StatusVisitor``) all go through it, so they see the same entries in the same order.
///
/// The walk starts at `/`. Ancestors of the paths (inner nodes of the ``PathTrie``) are
/// stated by path, following links, and only their named children are visited; the paths
/// themselves and everything below them are listed. A listed directory is opened with
/// `O_NOFOLLOW` relative to its parent's descriptor, so a directory renamed or swapped for a
/// link meanwhile cannot redirect the walk; its names are sorted bytewise; each is checked
/// against the excludes *before* it is stated (an excluded entry costs no system call),
/// then stated with `fstatat` relative to the open directory (or taken from a listing made
/// ahead, see ``FileSystemVisitor/listing(ofOpenDirectory:path:)``). A directory entry the
/// visitor descends into is walked at its position (depth first, pre-order), and handed
/// back to its parent's state in post-order (``FileSystemVisitor/leave(_:into:)``).
///
/// Generic over the visitor, so each walk is specialized: no existential or closure per
/// entry on the backup's hot path.
struct FileSystemWalker {
    let excludes: ExcludeRules
    /// Size, file system and tag-file exclusions (``WalkFilter``).
    var filter = WalkFilter.none

    /// Walks the paths of `roots` from `/`; returns the state of `/` (`nil` when the
    /// visitor skipped it).
    func walk<V: FileSystemVisitor>(_ roots: PathTrie, _ visitor: inout V) throws -> V.Directory? {
        var st = stat()
        if stat("/", &st) != 0 { throw ioError("stat", "/") }
        let root = WalkDirectory(
            path: [0x2F], name: [0x2F], stat: st, entry: EntryRef(path: [0x2F]), isAncestor: !roots.isLeaf,
            isRoot: true, fileSystem: UInt64(st.st_dev))
        return try walk(root, trie: roots.isLeaf ? nil : roots, parent: nil, &visitor)
    }

    private func walk<V: FileSystemVisitor>(
        _ directory: WalkDirectory, trie: PathTrie?, parent: V.Directory?, _ visitor: inout V
    ) throws -> V.Directory? {
        if let trie { return try walkAncestor(directory, trie: trie, parent: parent, &visitor) }
        var listing = DirectoryListing()
        if filter.oneFileSystem && UInt64(directory.stat.st_dev) != directory.fileSystem {
            // A mount point: stored as an empty directory, as restic's --one-file-system does.
            return try visitor.enter(directory, listing: &listing, parent: parent)
        }
        var directory = directory
        let entry = directory.entry
        let fd = openAt(entry.fd, entry.relative) {
            open($0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        } at: {
            openat($0, $1, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        }
        let openErrno = errno
        if fd >= 0 {
            let handle = DirectoryHandle(fd)
            directory.handle = handle
            if let made = visitor.listing(ofOpenDirectory: fd, path: directory.path) {
                listing.names = made.names
                listing.known = made.entries
            } else {
                do {
                    listing.names = try readDirectory(fd: fd, path: directory.path)
                } catch {
                    listing.error = CABackupError(error)
                }
            }
            if !filter.tags.isEmpty && listing.error == nil { filter.applyTags(to: &listing, fd: fd) }
        } else {
            listing.error = ioError("open directory", directory.path, openErrno)
        }
        guard var state = try visitor.enter(directory, listing: &listing, parent: parent) else { return nil }
        guard let handle = directory.handle else { return state }
        for (i, name) in listing.names.enumerated() {
            if visitor.isStopped { break }
            let path = joinPath(directory.path, name)
            if excludes.isExcluded(path: path) { continue }
            let ref = EntryRef(directory: handle, relative: name)
            var st = stat()
            var fromListing = false
            if let known = listing.known?[i], known.error >= 0 {
                if known.error > 0 {
                    visitor.cannotStat(path, name: name, reason: errnoDescription(known.error), in: &state)
                    continue
                }
                st = known.makeStat()
                fromListing = true
            } else if withCPath(name, { fstatat(handle.fd, $0, &st, AT_SYMLINK_NOFOLLOW) }) != 0 {
                visitor.cannotStat(path, name: name, reason: errnoDescription(errno), in: &state)
                continue
            }
            if filter.checksEntries && filter.excludes(st, fileSystem: directory.fileSystem) { continue }
            var e = WalkEntry(path: path, name: name, entry: ref, stat: st, statFromListing: fromListing)
            if try visitor.visit(&e, in: &state) == .descend, (e.stat.st_mode & S_IFMT) == S_IFDIR {
                let sub = WalkDirectory(
                    path: path, name: name, stat: e.stat, entry: ref, fileSystem: directory.fileSystem)
                if let child = try walk(sub, trie: nil, parent: state, &visitor) {
                    try visitor.leave(child, into: &state)
                }
            }
        }
        return state
    }

    /// An ancestor of the paths: only its children named in `trie` are visited.
    private func walkAncestor<V: FileSystemVisitor>(
        _ directory: WalkDirectory, trie: PathTrie, parent: V.Directory?, _ visitor: inout V
    ) throws -> V.Directory? {
        let children = trie.sortedChildren
        var listing = DirectoryListing(names: children.map(\.0))
        guard var state = try visitor.enter(directory, listing: &listing, parent: parent) else { return nil }
        for (name, child) in children {
            if visitor.isStopped { break }
            let path = joinPath(directory.path, name)
            let ref = EntryRef(path: path)
            var st = stat()
            if child.isLeaf {
                if excludes.isExcluded(path: path) { continue }
                if withCPath(path, { lstat($0, &st) }) != 0 {
                    visitor.cannotStat(path, name: name, reason: errnoDescription(errno), in: &state)
                    continue
                }
                // A path to back up sets the file system its walk stays on.
                let device = UInt64(st.st_dev)
                if filter.checksEntries && filter.excludes(st, fileSystem: device) { continue }
                var e = WalkEntry(path: path, name: name, entry: ref, stat: st, statFromListing: false)
                if try visitor.visit(&e, in: &state) == .descend, (e.stat.st_mode & S_IFMT) == S_IFDIR {
                    let sub = WalkDirectory(path: path, name: name, stat: e.stat, entry: ref, fileSystem: device)
                    if let s = try walk(sub, trie: nil, parent: state, &visitor) { try visitor.leave(s, into: &state) }
                }
            } else {
                // An ancestor of a backed-up path: stored with its own metadata (links
                // followed, as a path through it is).
                let rc = withCPath(path) { stat($0, &st) }
                if rc != 0 || (st.st_mode & S_IFMT) != S_IFDIR {
                    let reason = rc != 0 ? errnoDescription(errno) : "not a directory"
                    visitor.cannotStat(path, name: name, reason: reason, in: &state)
                    continue
                }
                let sub = WalkDirectory(path: path, name: name, stat: st, entry: ref, isAncestor: true)
                if let s = try walkAncestor(sub, trie: child, parent: state, &visitor) {
                    try visitor.leave(s, into: &state)
                }
            }
        }
        return state
    }
}

/// What a walk does with each entry, and the state it keeps per directory.
protocol FileSystemVisitor {
    /// What the visitor keeps for a directory while its entries are visited.
    associatedtype Directory

    /// A directory is entered: `listing` holds its names (for an ancestor, only the
    /// named children; empty with ``DirectoryListing/error`` set when it could not be
    /// opened or read). The visitor may state all entries ahead
    /// (``DirectoryListing/statAll(_:excludes:path:)``). `nil` skips the directory.
    mutating func enter(
        _ directory: WalkDirectory, listing: inout DirectoryListing, parent: Directory?
    ) throws
        -> Directory?

    /// An entry, stated. `.descend` on a directory walks it now.
    mutating func visit(_ entry: inout WalkEntry, in directory: inout Directory) throws -> WalkStep

    /// An entry that could not be stated (`reason`), or an ancestor that is not a directory.
    mutating func cannotStat(_ path: [UInt8], name: [UInt8], reason: String, in directory: inout Directory)

    /// A subdirectory's walk is complete (post-order): hand it to its parent.
    mutating func leave(_ child: Directory, into parent: inout Directory) throws

    /// A listing of the open directory made ahead (see ``TreePrefetch``), or `nil` to
    /// read it now.
    mutating func listing(ofOpenDirectory fd: Int32, path: [UInt8]) -> PrefetchedDirectory?

    /// Stops the walk at the next entry.
    var isStopped: Bool { get }
}

extension FileSystemVisitor {
    mutating func listing(ofOpenDirectory fd: Int32, path: [UInt8]) -> PrefetchedDirectory? { nil }
    var isStopped: Bool { false }
    mutating func cannotStat(_ path: [UInt8], name: [UInt8], reason: String, in directory: inout Directory) {}
}

/// Whether the walk goes into a directory entry.
enum WalkStep {
    case next
    case descend
}

/// A directory the walk enters.
struct WalkDirectory {
    let path: [UInt8]
    let name: [UInt8]
    /// Its `lstat` (`stat` for `/` and ancestors of the paths).
    let stat: stat
    /// How it is reached: relative to its parent's descriptor, or by its path.
    let entry: EntryRef
    /// An ancestor of the paths: only the named children are visited.
    var isAncestor = false
    /// `/`.
    var isRoot = false
    /// The directory, open (`nil` for ancestors, or when it could not be opened).
    var handle: DirectoryHandle?
    /// The device of the path to back up it is below (see ``WalkFilter/oneFileSystem``).
    var fileSystem: UInt64 = 0
}

/// The names of a directory, sorted bytewise, and their metadata when already known.
struct DirectoryListing {
    var names: [[UInt8]] = []
    /// Parallel to `names`: each entry's `lstat` made ahead (error -1: excluded).
    var known: [PrefetchedEntry]?
    /// Why the directory could not be opened or listed (`names` is empty then).
    var error: CABackupError?

    /// States every name not excluded, relative to the open directory `fd`, so the walk
    /// uses these instead of stating each entry itself.
    mutating func statAll(_ fd: Int32, excludes: ExcludeRules?, path: [UInt8]) {
        var entries: [PrefetchedEntry] = []
        entries.reserveCapacity(names.count)
        for name in names {
            if let excludes, !excludes.isEmpty, excludes.isExcluded(path: joinPath(path, name)) {
                entries.append(PrefetchedEntry(error: -1))
                continue
            }
            var st = stat()
            if withCPath(name, { fstatat(fd, $0, &st, AT_SYMLINK_NOFOLLOW) }) != 0 {
                entries.append(PrefetchedEntry(error: errno))
            } else {
                entries.append(PrefetchedEntry(st))
            }
        }
        known = entries
    }
}

/// An entry the walk found, with its metadata.
struct WalkEntry {
    let path: [UInt8]
    let name: [UInt8]
    /// How to open it: relative to its directory's descriptor, or by path.
    let entry: EntryRef
    var stat: stat
    /// `stat` comes from a listing made ahead of the walk, not from now.
    var statFromListing: Bool

    /// States it again now; the `errno` when that fails.
    mutating func restat() -> Int32? {
        var st = emptyStat()
        if openAt(entry.fd, entry.relative, { lstat($0, &st) }, at: { fstatat($0, $1, &st, AT_SYMLINK_NOFOLLOW) })
            != 0
        {
            return errno
        }
        stat = st
        statFromListing = false
        return nil
    }
}

/// A zeroed `stat`, for where the name `stat` means a property.
private func emptyStat() -> stat { stat() }

/// Paths to back up, merged into a tree of path components. Inner nodes are ancestors
/// (stored as directories); leaves are walked in full.
final class PathTrie {
    var children: [[UInt8]: PathTrie] = [:]
    var isLeaf = false

    init() {}

    /// The trie of absolute paths.
    convenience init(paths: [String]) {
        self.init()
        for p in paths { insert(p.split(separator: "/").map { Array($0.utf8) }) }
    }

    func insert(_ components: [[UInt8]]) {
        if isLeaf { return }
        guard let first = components.first else {
            isLeaf = true
            children = [:]
            return
        }
        let child = children[first] ?? PathTrie()
        children[first] = child
        child.insert(Array(components.dropFirst()))
    }

    var sortedChildren: [([UInt8], PathTrie)] {
        children.sorted { $0.key.lexicographicallyPrecedes($1.key) }.map { ($0.key, $0.value) }
    }
}

/// A directory entry to open or stat: `relative` to an open directory, or, without one,
/// an absolute path. The directory stays open while any entry (a queued small file)
/// refers to it.
struct EntryRef: Sendable {
    let directory: DirectoryHandle?
    let relative: [UInt8]

    init(directory: DirectoryHandle, relative: [UInt8]) {
        self.directory = directory
        self.relative = relative
    }

    /// An entry named by its absolute path (top-level paths and their ancestors).
    init(path: [UInt8]) {
        directory = nil
        relative = path
    }

    /// The directory's descriptor, or `AT_FDCWD` for an absolute path.
    var fd: Int32 { directory?.fd ?? AT_FDCWD }
}

/// Calls `byPath` with the absolute path when `fd` is `AT_FDCWD`, else `at` with the
/// descriptor and the relative name, both as C strings.
func openAt<R>(
    _ fd: Int32, _ relative: [UInt8], _ byPath: (UnsafePointer<CChar>) -> R,
    at: (Int32, UnsafePointer<CChar>) -> R
) -> R {
    withCPath(relative) { fd == AT_FDCWD ? byPath($0) : at(fd, $0) }
}

/// A node with the metadata of an `lstat` result (no content, target or subtrees yet).
func makeNode(name: [UInt8], st: stat) -> Node {
    let type: NodeType
    switch st.st_mode & S_IFMT {
    case S_IFREG: type = .file
    case S_IFDIR: type = .directory
    case S_IFLNK: type = .symlink
    case S_IFIFO: type = .fifo
    case S_IFCHR: type = .characterDevice
    case S_IFBLK: type = .blockDevice
    default: type = .socket
    }
    var n = Node(name: name, type: type)
    n.mode = UInt32(st.st_mode & 0o7777)
    n.uid = st.st_uid
    n.gid = st.st_gid
    n.size = type == .file ? UInt64(st.st_size) : 0
    n.mtimeNs = nanoseconds(st.st_mtim)
    n.ctimeNs = nanoseconds(st.st_ctim)
    n.inode = UInt64(st.st_ino)
    n.device = UInt64(st.st_dev)
    n.links = type == .directory ? 1 : UInt64(st.st_nlink)
    n.rdev = UInt64(st.st_rdev)
    return n
}

/// A symlink's target bytes; `nil` when it cannot be read.
func readLinkTarget(_ entry: EntryRef) -> [UInt8]? {
    var buf = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = buf.withUnsafeMutableBufferPointer { b in
        b.baseAddress!.withMemoryRebound(to: CChar.self, capacity: b.count) { out in
            openAt(entry.fd, entry.relative, { readlink($0, out, b.count) }, at: { readlinkat($0, $1, out, b.count) })
        }
    }
    return n < 0 ? nil : Array(buf[0..<n])
}

/// Counts the files and bytes a snapshot will read, on its own thread, so progress can
/// show an ETA. Only directory reads and `fstatat`: cheap beside the backup itself.
final class SizeScanner: Sendable {
    let files = Atomic<Int>(0)
    let bytes = Atomic<Int64>(0)
    let finished = Atomic<Bool>(false)
    let stop = Atomic<Bool>(false)

    private struct Visitor: FileSystemVisitor {
        struct Directory {}
        let scanner: SizeScanner

        func enter(_ directory: WalkDirectory, listing: inout DirectoryListing, parent: Directory?) -> Directory? {
            Directory()
        }

        func visit(_ entry: inout WalkEntry, in directory: inout Directory) -> WalkStep {
            switch entry.stat.st_mode & S_IFMT {
            case S_IFREG:
                scanner.files.add(1, ordering: .relaxed)
                scanner.bytes.add(Int64(entry.stat.st_size), ordering: .relaxed)
                return .next
            case S_IFDIR: return .descend
            default: return .next
            }
        }

        func leave(_ child: Directory, into parent: inout Directory) {}

        var isStopped: Bool { scanner.stop.load(ordering: .relaxed) }
    }

    func scan(_ roots: PathTrie, excludes: ExcludeRules, filter: WalkFilter = .none) {
        var visitor = Visitor(scanner: self)
        _ = try? FileSystemWalker(excludes: excludes, filter: filter).walk(roots, &visitor)
        finished.store(true, ordering: .relaxed)
    }
}
