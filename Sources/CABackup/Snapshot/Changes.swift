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

    mutating func visit(old a: Node, new b: Node, path: [UInt8]) throws -> TreeDecision {
        let sameMeta = a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.mtimeNs == b.mtimeNs
        switch a.type {
        case .directory:
            // A directory's own mtime moves with its entries: those are reported, not it.
            if a.mode != b.mode || a.uid != b.uid || a.gid != b.gid {
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
        var changes = ChangeSet()
        changes.base = parent?.id
        let trie = PathTrie(paths: absolute)
        let walker = StatusWalker(repository: self, excludes: rules)
        let rootEntries = try parent.map { try loadTree($0.tree) } ?? []
        try walker.walk(trie: trie, path: [], parent: rootEntries, into: &changes)
        return changes
    }
}

/// Compares the file system with a snapshot's trees (for ``Repository/status(paths:options:)``).
struct StatusWalker {
    let repo: Repository
    let excludes: ExcludeRules
    let codec: BlobCodec

    init(repository: Repository, excludes: ExcludeRules) {
        self.repo = repository
        self.codec = repository.makeCodec()
        self.excludes = excludes
    }

    /// The ancestors part of the tree: only the named children are looked at.
    func walk(trie: PathTrie, path: [UInt8], parent: [Node], into c: inout ChangeSet) throws {
        let byName = Dictionary(parent.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        for (name, child) in trie.sortedChildren {
            let p = path + [0x2F] + name
            if child.isLeaf {
                try compareEntry(name: name, path: p, old: byName[name], into: &c)
            } else {
                let old = byName[name]
                let entries = old?.type == .directory ? try repo.loadDirectory(old!) : []
                try walk(trie: child, path: p, parent: entries, into: &c)
            }
        }
    }

    private func lstatNode(_ path: [UInt8], name: [UInt8]) -> Node? {
        var st = stat()
        guard withCPath(path, { lstat($0, &st) }) == 0 else { return nil }
        var n = makeNode(name: name, st: st)
        if n.type == .symlink { n.linkTarget = readLinkTarget(path) ?? [] }
        return n
    }

    private func compareEntry(name: [UInt8], path: [UInt8], old: Node?, into c: inout ChangeSet) throws {
        if excludes.isExcluded(path: path) { return }
        guard let now = lstatNode(path, name: name) else {
            if let old { try reportOld(old, path: path, into: &c) }
            return
        }
        guard let old, old.type == now.type else {
            if let old { try reportOld(old, path: path, into: &c) }
            try reportNew(now, path: path, into: &c)
            return
        }
        let sameOwnerAndMode = old.mode == now.mode && old.uid == now.uid && old.gid == now.gid
        switch now.type {
        case .directory:
            // A directory's own mtime moves with its entries: those are reported, not it.
            if !sameOwnerAndMode { c.metadataOnly.append(ChangedEntry(path: path, size: 0, type: .directory)) }
            try compareDirectory(path: path, old: try repo.loadDirectory(old), into: &c)
        case .file:
            if old.size != now.size {
                c.modified.append(ChangedEntry(path: path, size: now.size, type: .file))
            } else if now.hasUnchangedContent(since: old) {
                if !sameOwnerAndMode { c.metadataOnly.append(ChangedEntry(path: path, size: now.size, type: .file)) }
            } else if try contentIDs(path) != old.content {
                c.modified.append(ChangedEntry(path: path, size: now.size, type: .file))
            } else {
                c.metadataOnly.append(ChangedEntry(path: path, size: now.size, type: .file))
            }
        default:
            if old.linkTarget != now.linkTarget || old.rdev != now.rdev {
                c.modified.append(ChangedEntry(path: path, size: 0, type: now.type))
            } else if !sameOwnerAndMode || (now.type != .symlink && old.mtimeNs != now.mtimeNs) {
                c.metadataOnly.append(ChangedEntry(path: path, size: 0, type: now.type))
            }
        }
    }

    private func compareDirectory(path: [UInt8], old: [Node], into c: inout ChangeSet) throws {
        let names = (try? readDirectory(path)) ?? []
        var i = 0
        var j = 0
        while i < old.count || j < names.count {
            if j == names.count || (i < old.count && old[i].name.lexicographicallyPrecedes(names[j])) {
                let p = path + [0x2F] + old[i].name
                if !excludes.isExcluded(path: p) { try reportOld(old[i], path: p, into: &c) }
                i += 1
            } else if i == old.count || names[j].lexicographicallyPrecedes(old[i].name) {
                try compareEntry(name: names[j], path: path + [0x2F] + names[j], old: nil, into: &c)
                j += 1
            } else {
                try compareEntry(name: names[j], path: path + [0x2F] + names[j], old: old[i], into: &c)
                i += 1
                j += 1
            }
        }
    }

    private func reportOld(_ n: Node, path: [UInt8], into c: inout ChangeSet) throws {
        c.removed.append(ChangedEntry(path: path, size: n.size, type: n.type))
        if n.type == .directory {
            for child in try repo.loadDirectory(n) { try reportOld(child, path: path + [0x2F] + child.name, into: &c) }
        }
    }

    private func reportNew(_ n: Node, path: [UInt8], into c: inout ChangeSet) throws {
        c.added.append(ChangedEntry(path: path, size: n.size, type: n.type))
        if n.type == .directory {
            for name in (try? readDirectory(path)) ?? [] {
                let p = path + [0x2F] + name
                if excludes.isExcluded(path: p) { continue }
                if let child = lstatNode(p, name: name) { try reportNew(child, path: p, into: &c) }
            }
        }
    }

    /// The chunk ids the file's content has now (read and chunked as a snapshot would).
    private func contentIDs(_ path: [UInt8]) throws -> [BlobID] {
        let fd = withCPath(path) { open($0, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK) }
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
