import CABackupCore
import CABackupFormat

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// One changed entry: its absolute path (bytes) and size.
public struct ChangedEntry: Sendable, Equatable {
    public var path: [UInt8]
    public var size: UInt64
    public var type: NodeType
    /// The path as text, invalid UTF-8 escaped as `\xNN`.
    public var displayPath: String { CABackupCore.displayPath(path) }
}

/// What differs between two states of a tree: a snapshot and a newer snapshot
/// (``Repository/diff(_:_:)``), or a snapshot and the files now (``Repository/status(paths:options:)``).
public struct ChangeSet: Sendable, Equatable {
    /// Entries only in the newer state.
    public var added: [ChangedEntry] = []
    /// Entries only in the older state.
    public var removed: [ChangedEntry] = []
    /// Entries whose content (or type) changed.
    public var modified: [ChangedEntry] = []
    /// Entries whose content is the same but whose mode, owner or times changed.
    public var metadataOnly: [ChangedEntry] = []
    /// The snapshot compared against (for status: the parent), if any.
    public var base: SnapshotID?

    public init() {}

    /// Whether nothing changed.
    public var isEmpty: Bool { added.isEmpty && removed.isEmpty && modified.isEmpty && metadataOnly.isEmpty }

    /// Regular files that a snapshot would read: added and modified files.
    public var filesToSync: Int { (added + modified).filter { $0.type == .file }.count }

    /// Bytes a snapshot would read: the sizes of added and modified files.
    public var bytesToSync: UInt64 { (added + modified).filter { $0.type == .file }.reduce(0) { $0 + $1.size } }
}

extension Repository {
    /// The differences between two snapshots, walking both trees in name order and
    /// skipping subtrees whose tree blobs are identical.
    public func diff(_ old: Snapshot, _ new: Snapshot) throws -> ChangeSet {
        var differ = SnapshotDiff()
        differ.comparesExtendedMetadata = old.recordsExtendedMetadata && new.recordsExtendedMetadata
        try SnapshotTreeWalker(self).compare([old.tree], [new.tree], path: [], &differ)
        var changes = differ.changes
        changes.base = old.id
        changes.removed = differ.old.entries
        changes.added = differ.new.entries
        return changes
    }
}

/// `diff`: modified and metadata-only entries of both trees; entries only in one tree,
/// with everything below them, are removed or added.
private struct SnapshotDiff: TreePairVisitor {
    /// Every entry met, and everything below it.
    struct Collector: TreeVisitor {
        var entries: [ChangedEntry] = []

        mutating func visit(_ node: Node, path: [UInt8]) throws -> TreeDecision {
            entries.append(ChangedEntry(path: path, size: node.size, type: node.type))
            return .descend
        }
    }

    var old = Collector()
    var new = Collector()
    var changes = ChangeSet()
    /// Both snapshots record extended attributes and flags (an older one has none).
    var comparesExtendedMetadata = false

    mutating func visit(old a: Node, new b: Node, path: [UInt8]) throws -> TreeDecision {
        let sameExtended = !comparesExtendedMetadata || (a.xattrs == b.xattrs && a.flags == b.flags)
        let sameMeta =
            a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.mtimeNs == b.mtimeNs && sameExtended
        switch a.type {
        case .directory:
            // A directory's own mtime moves with its entries: those are reported, not it.
            if a.mode != b.mode || a.uid != b.uid || a.gid != b.gid || !sameExtended {
                changes.metadataOnly.append(ChangedEntry(path: path, size: 0, type: .directory))
            }
            return .descend
        default:
            let sameContent =
                a.content == b.content && a.size == b.size && a.linkTarget == b.linkTarget && a.rdev == b.rdev
            if !sameContent {
                changes.modified.append(ChangedEntry(path: path, size: b.size, type: b.type))
            } else if !sameMeta {
                changes.metadataOnly.append(ChangedEntry(path: path, size: b.size, type: b.type))
            }
            return .skip
        }
    }
}

/// Options for ``Repository/status(paths:options:)``.
public struct StatusOptions: Sendable {
    /// Exclude patterns, as for snapshots.
    public var excludes: [String]
    /// Exclude patterns matched without regard to case, as for snapshots.
    public var caseInsensitiveExcludes: [String]
    /// The host whose snapshots are compared against; this machine's by default.
    public var hostname: String?

    public init(excludes: [String] = [], caseInsensitiveExcludes: [String] = [], hostname: String? = nil) {
        self.excludes = excludes
        self.caseInsensitiveExcludes = caseInsensitiveExcludes
        self.hostname = hostname
    }
}

extension Repository {
    /// What changed in `paths` since their latest snapshot from this host: what the next
    /// snapshot would store.
    ///
    /// Cheap checks first: a file whose size, mtime, ctime and inode match is unchanged,
    /// unread. A file of the same size whose times or inode changed is read and chunked,
    /// and reported as modified only if its content differs (so `touch` or `chmod` is
    /// metadata-only, and a same-size rewrite whose mtime was put back is modified). With
    /// no earlier snapshot, everything is added.
    ///
    /// - Throws: ``CABackupError/unreadableSource(path:reason:)`` for a missing top-level path.
    public func status(paths: [String], options: StatusOptions = StatusOptions()) throws -> ChangeSet {
        guard !paths.isEmpty else { throw CABackupError.invalidArgument("name at least one PATH") }
        let rules = try ExcludeRules(
            excludes: options.excludes, caseInsensitiveExcludes: options.caseInsensitiveExcludes)
        var absolute: [String] = []
        for p in paths {
            let abs = absolutePath(p)
            var st = stat()
            if lstat(abs, &st) != 0 { throw CABackupError.unreadableSource(path: p, reason: errnoDescription(errno)) }
            if !absolute.contains(abs) { absolute.append(abs) }
        }
        let hostname = options.hostname ?? currentHostname()
        let parent = try parentSnapshot(paths: absolute, hostname: hostname)
        var visitor = StatusVisitor(repository: self, excludes: rules)
        visitor.changes.base = parent?.id
        visitor.comparesExtendedMetadata = parent?.recordsExtendedMetadata ?? false
        visitor.rootEntries = try parent.map { try loadTree($0.tree) } ?? []
        if var root = try FileSystemWalker(excludes: rules).walk(PathTrie(paths: absolute), &visitor) {
            try visitor.reportRemaining(in: &root)
        }
        return visitor.changes
    }
}

/// Compares the file system with a snapshot's trees as the walk goes (for
/// ``Repository/status(paths:options:)``): each directory's names are merged with the
/// same directory's entries in the snapshot, both sorted by name.
struct StatusVisitor: FileSystemVisitor {
    struct Directory {
        /// The same directory's entries in the snapshot, and how far the merge has got.
        var old: [Node]
        var cursor = 0
        let path: [UInt8]
        /// Only the named children of an ancestor are compared: its other entries are
        /// not reported removed.
        let isAncestor: Bool
    }

    let repo: Repository
    let excludes: ExcludeRules
    let codec: BlobCodec
    var changes = ChangeSet()
    /// The snapshot's root directory.
    var rootEntries: [Node] = []
    /// The snapshot records extended attributes and flags (an older one has none).
    var comparesExtendedMetadata = false
    /// The snapshot's entries of the directory the walk is about to enter.
    private var descending: [Node] = []

    init(repository: Repository, excludes: ExcludeRules) {
        self.repo = repository
        self.codec = repository.makeCodec()
        self.excludes = excludes
    }

    mutating func enter(
        _ directory: WalkDirectory, listing: inout DirectoryListing, parent: Directory?
    ) throws
        -> Directory?
    {
        var old = descending
        if directory.isRoot {
            old = rootEntries
        } else if directory.isAncestor, let parent {
            let node = parent.old.first { $0.name == directory.name }
            old = node?.type == .directory ? try repo.loadDirectory(node!) : []
        }
        descending = []
        // A directory that cannot be listed reads as empty: what the snapshot has in it
        // is reported removed.
        return Directory(old: old, path: directory.path, isAncestor: directory.isAncestor)
    }

    /// The snapshot's entry named `name`; the entries passed on the way are reported
    /// removed (unless excluded), except in an ancestor.
    private mutating func match(_ name: [UInt8], in d: inout Directory) throws -> Node? {
        while d.cursor < d.old.count && d.old[d.cursor].name.lexicographicallyPrecedes(name) {
            if !d.isAncestor { try reportRemoved(d.old[d.cursor], in: d.path) }
            d.cursor += 1
        }
        guard d.cursor < d.old.count && d.old[d.cursor].name == name else { return nil }
        d.cursor += 1
        return d.old[d.cursor - 1]
    }

    /// Reports the snapshot's entries after the last name of the directory removed.
    mutating func reportRemaining(in d: inout Directory) throws {
        if d.isAncestor { return }
        while d.cursor < d.old.count {
            try reportRemoved(d.old[d.cursor], in: d.path)
            d.cursor += 1
        }
    }

    private mutating func reportRemoved(_ n: Node, in directory: [UInt8]) throws {
        let p = joinPath(directory, n.name)
        if !excludes.isExcluded(path: p) { try reportOld(n, path: p) }
    }

    mutating func visit(_ entry: inout WalkEntry, in d: inout Directory) throws -> WalkStep {
        let path = entry.path
        let old = try match(entry.name, in: &d)
        var now = makeNode(name: entry.name, st: entry.stat)
        if now.type == .symlink { now.linkTarget = readLinkTarget(entry.entry) ?? [] }
        guard let old, old.type == now.type else {
            if let old { try reportOld(old, path: path) }
            changes.added.append(ChangedEntry(path: path, size: now.size, type: now.type))
            // Everything below a new directory is new: compared with no entries.
            descending = []
            return now.type == .directory ? .descend : .next
        }
        var sameOwnerAndMode = old.mode == now.mode && old.uid == now.uid && old.gid == now.gid
        if comparesExtendedMetadata && now.type != .file && !now.hasUnchangedMetadata(since: old) {
            // Attributes and flags move the ctime; a file's are compared with its content.
            sameOwnerAndMode = sameOwnerAndMode && sameExtendedMetadata(old, entry.entry, type: now.type)
        }
        switch now.type {
        case .directory:
            // A directory's own mtime moves with its entries: those are reported, not it.
            if !sameOwnerAndMode { changes.metadataOnly.append(ChangedEntry(path: path, size: 0, type: .directory)) }
            descending = try repo.loadDirectory(old)
            return .descend
        case .file:
            let changed = ChangedEntry(path: path, size: now.size, type: .file)
            if old.size != now.size {
                changes.modified.append(changed)
            } else if now.hasUnchangedContent(since: old) {
                if !sameOwnerAndMode { changes.metadataOnly.append(changed) }
            } else if try contentIDs(entry.entry, path: path) != old.content {
                changes.modified.append(changed)
            } else {
                changes.metadataOnly.append(changed)
            }
        default:
            if old.linkTarget != now.linkTarget || old.rdev != now.rdev {
                changes.modified.append(ChangedEntry(path: path, size: 0, type: now.type))
            } else if !sameOwnerAndMode || (now.type != .symlink && old.mtimeNs != now.mtimeNs) {
                changes.metadataOnly.append(ChangedEntry(path: path, size: 0, type: now.type))
            }
        }
        return .next
    }

    /// Whether an entry's extended attributes and flags are those of `old`.
    private func sameExtendedMetadata(_ old: Node, _ entry: EntryRef, type: NodeType) -> Bool {
        guard type == .directory else { return FileMetadata.xattrs(of: entry) == old.xattrs }
        let fd = openAt(entry.fd, entry.relative) {
            open($0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        } at: {
            openat($0, $1, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        }
        guard fd >= 0 else { return true }
        defer { close(fd) }
        return FileMetadata.xattrs(fd: fd) == old.xattrs && FileMetadata.flags(fd: fd) == old.flags
    }

    /// An entry that is gone by the time it is stated: what the snapshot had is removed.
    mutating func cannotStat(_ path: [UInt8], name: [UInt8], reason: String, in d: inout Directory) {
        guard let old = try? match(name, in: &d) else { return }
        try? reportOld(old, path: path)
    }

    mutating func leave(_ child: Directory, into parent: inout Directory) throws {
        var child = child
        try reportRemaining(in: &child)
    }

    private mutating func reportOld(_ n: Node, path: [UInt8]) throws {
        changes.removed.append(ChangedEntry(path: path, size: n.size, type: n.type))
        if n.type == .directory {
            for child in try repo.loadDirectory(n) { try reportOld(child, path: joinPath(path, child.name)) }
        }
    }

    /// The chunk ids the file's content has now (read and chunked as a snapshot would).
    private func contentIDs(_ entry: EntryRef, path: [UInt8]) throws -> [BlobID] {
        let flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK
        let fd = openAt(entry.fd, entry.relative, { open($0, flags) }, at: { openat($0, $1, flags) })
        if fd < 0 { return [] }
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        let reader = ChunkingReader(chunker: repo.chunker, fd: fd, path: path, sizeHint: Int64(st.st_size))
        var ids: [BlobID] = []
        while let w = try reader.nextWindow() {
            for cut in w.cuts { ids.append(codec.id(w.buffer.bytes(cut.offset, cut.length))) }
        }
        return ids
    }
}
