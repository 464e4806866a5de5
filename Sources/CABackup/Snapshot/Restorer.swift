import CABackupCore
import CABackupFormat

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Options for ``Repository/restore(_:to:options:progress:)``.
public struct RestoreOptions: Sendable {
    /// Absolute paths inside the snapshot to restore (with everything below them);
    /// empty restores everything.
    public var includes: [String]
    /// Restore into a non-empty target, replacing entries of the same name.
    public var overwrite: Bool
    /// Threads writing files; by default one per core.
    public var workers: Int

    public init(includes: [String] = [], overwrite: Bool = false, workers: Int? = nil) {
        self.includes = includes
        self.overwrite = overwrite
        self.workers = workers ?? usableCPUCount()
    }
}

/// Progress of a running restore.
public struct RestoreProgress: Sendable {
    public var filesDone: Int
    public var bytesWritten: Int64
    public var elapsedSeconds: Double
}

/// An entry that could not be restored.
public struct RestoreFailure: Sendable, CustomStringConvertible {
    /// The path inside the snapshot.
    public var path: String
    public var message: String
    public var description: String { "\(path): \(message)" }
}

/// The outcome of a restore.
public struct RestoreResult: Sendable {
    /// Regular files restored, each name of a hard-linked file counted (as a snapshot's
    /// `filesTotal` counts them).
    public var filesRestored: Int
    /// Of those, names created as hard links to a file restored before.
    public var hardLinksRestored: Int
    public var directoriesRestored: Int
    public var bytesWritten: Int64
    /// Entries that failed; a damaged file is removed rather than left with wrong bytes.
    public var failures: [RestoreFailure]
    /// Entries restored without some of their metadata: an extended attribute or inode
    /// flag this process has no right to set (`security.capability` needs root), or one
    /// the target's file system does not support. Their bytes are restored.
    public var warnings: [RestoreFailure] = []
}

/// One entry met while walking a snapshot: its absolute path in the snapshot (bytes)
/// and its node.
public struct TreeEntry: Sendable {
    public var path: [UInt8]
    public var node: Node
    /// The path as text, invalid UTF-8 escaped as `\xNN`.
    public var displayPath: String { CABackupCore.displayPath(path) }
}

extension Repository {
    /// Walks a snapshot depth-first in name order, calling `visit` for every entry at or
    /// below `path` (the whole snapshot when `nil`). Loads one directory at a time.
    ///
    /// - Throws: ``CABackupError/pathNotInSnapshot(_:)`` when `path` is not in the snapshot.
    public func list(_ snapshot: Snapshot, path: String? = nil, visit: (TreeEntry) throws -> Void) throws {
        try withoutActuallyEscaping(visit) { visit in
            var lister = Lister(body: visit)
            let walker = SnapshotTreeWalker(self)
            guard let path, absolutePath(path) != "/" else {
                try walker.walk(trees: [snapshot.tree], path: [], &lister)
                return
            }
            let entry = try entry(in: snapshot, at: path)
            try walker.walk(entry.node, path: entry.path, &lister)
        }
    }

    /// The entry at an absolute path inside a snapshot.
    ///
    /// - Throws: ``CABackupError/pathNotInSnapshot(_:)`` when there is none.
    public func entry(in snapshot: Snapshot, at path: String) throws -> TreeEntry {
        let comps = absolutePath(path).split(separator: "/").map { Array($0.utf8) }
        guard !comps.isEmpty else { throw CABackupError.pathNotInSnapshot(path) }
        var nodes = try loadTree(snapshot.tree)
        var prefix: [UInt8] = []
        for (i, c) in comps.enumerated() {
            guard let n = nodes.first(where: { $0.name == c }) else { throw CABackupError.pathNotInSnapshot(path) }
            prefix += [0x2F] + c
            if i == comps.count - 1 { return TreeEntry(path: prefix, node: n) }
            guard n.type == .directory else { throw CABackupError.pathNotInSnapshot(path) }
            nodes = try loadDirectory(n)
        }
        throw CABackupError.pathNotInSnapshot(path)
    }

    /// Restores a snapshot below `target`: the snapshot path `/home/a/docs` becomes
    /// `target/home/a/docs`.
    ///
    /// `progress` is called from the writing threads every 64 files.
    ///
    /// Every blob is verified against its id as it is read. A file whose data is missing
    /// or damaged is removed and reported in ``RestoreResult/failures``; the rest of the
    /// restore goes on. Names are checked (no `/`, `.`, `..`), entries are created
    /// relative to directory descriptors without following symlinks, so nothing is ever
    /// written outside `target`.
    ///
    /// - Throws: ``CABackupError/targetNotEmpty(_:)`` unless `options.overwrite`.
    public func restore(
        _ snapshot: Snapshot, to target: String, options: RestoreOptions = RestoreOptions(),
        progress: (@Sendable (RestoreProgress) -> Void)? = nil
    ) throws -> RestoreResult {
        let target = absolutePath(target)
        // An --include that names nothing is a typo, not an empty restore.
        for include in options.includes { _ = try entry(in: snapshot, at: include) }
        let sink = try LocalFileSink(target: target, overwrite: options.overwrite)
        return try index.sharingReads {
            var restorer = Restorer(
                repository: self, snapshot: snapshot, sink: sink, options: options, progress: progress)
            return try restorer.run()
        }
    }
}

/// `ls`: every entry, everything below every directory.
private struct Lister: TreeVisitor {
    let body: (TreeEntry) throws -> Void

    mutating func visit(_ node: Node, path: [UInt8]) throws -> TreeDecision {
        try body(TreeEntry(path: path, node: node))
        return .descend
    }
}

/// An open directory descriptor, closed when the last user lets go.
final class DirectoryHandle: Sendable {
    let fd: Int32
    init(_ fd: Int32) { self.fd = fd }
    deinit { close(fd) }
}

/// A restore: plans what to create while walking the snapshot (includes, name checks,
/// hard links, file pieces) and creates it through the sink, file bytes on the
/// pipeline's workers.
struct Restorer<Sink: RestoreSink>: TreeVisitor {
    private let repo: Repository
    private let snapshot: Snapshot
    private let sink: Sink
    private let workers: Int
    private let includes: [[UInt8]]
    private let pipeline: RestorePipeline<Sink.File>
    /// The sink's directories from the root to the one being walked.
    private var directories: [Sink.Directory]
    private var directoriesRestored = 0
    /// The first name restored of each hard-linked file.
    private var hardLinks: [HardLinkKey: [UInt8]] = [:]
    /// Further names of hard-linked files, linked once every file is written.
    private var deferredLinks: [(path: [UInt8], first: [UInt8])] = []

    init(
        repository: Repository, snapshot: Snapshot, sink: Sink, options: RestoreOptions,
        progress: (@Sendable (RestoreProgress) -> Void)?
    ) {
        self.repo = repository
        self.snapshot = snapshot
        self.sink = sink
        self.workers = options.workers
        self.includes = options.includes.map { Array(absolutePath($0).utf8) }
        self.pipeline = RestorePipeline(repository: repository, snapshot: snapshot.id, progress: progress)
        self.directories = [sink.root]
    }

    mutating func run() throws -> RestoreResult {
        try pipeline.run(workers: workers) {
            try SnapshotTreeWalker(repo).walk(trees: [snapshot.tree], path: [], &self)
        }
        var links = 0
        for link in deferredLinks {
            do {
                try sink.hardLink(link.path, to: link.first)
                links += 1
            } catch {
                pipeline.fail(link.path, "\(error)")
            }
        }
        try sink.finish()
        let t = pipeline.totals
        return RestoreResult(
            filesRestored: t.files + links, hardLinksRestored: links, directoriesRestored: directoriesRestored,
            bytesWritten: t.bytes, failures: t.failures, warnings: sink.warnings)
    }

    /// Whether `path` is included, and whether its children must be filtered.
    private func selection(_ path: [UInt8]) -> (include: Bool, descendOnly: Bool) {
        if includes.isEmpty { return (true, false) }
        for inc in includes {
            if path == inc || (path.count > inc.count && path.starts(with: inc) && path[inc.count] == 0x2F) {
                return (true, false)
            }
        }
        for inc in includes where inc.count > path.count && inc.starts(with: path) && inc[path.count] == 0x2F {
            return (true, true)
        }
        return (false, false)
    }

    mutating func visit(_ node: Node, path: [UInt8]) throws -> TreeDecision {
        guard isSafeName(node.name) else {
            pipeline.fail(path, "unsafe name refused")
            return .skip
        }
        let sel = selection(path)
        guard sel.include else { return .skip }
        if sel.descendOnly && node.type != .directory { return .skip }
        let dir = directories[directories.count - 1]
        do {
            switch node.type {
            case .directory:
                directories.append(try sink.makeDirectory(node, path: path, in: dir))
                directoriesRestored += 1
                return .descend
            case .file:
                if node.links > 1 {
                    let key = HardLinkKey(node)
                    if let first = hardLinks[key] {
                        deferredLinks.append((path, first))
                        return .skip
                    }
                    hardLinks[key] = path
                }
                try pipeline.add(node: node, path: path) { try sink.createFile(node, path: path, in: dir) }
            case .symlink:
                try sink.makeSymlink(node, path: path, in: dir)
            case .fifo, .characterDevice, .blockDevice:
                try sink.makeSpecial(node, path: path, in: dir)
            case .socket:
                break  // Sockets are recreated by the programs that own them.
            }
        } catch {
            pipeline.fail(path, "\(error)")
        }
        return .skip
    }

    mutating func leaveDirectory(_ node: Node, path: [UInt8]) throws {
        directories.removeLast()
    }

    /// A directory whose entries cannot be read is restored empty and reported; the
    /// snapshot's root cannot be restored at all.
    mutating func unreadable(_ id: BlobID, path: [UInt8], error: any Error) throws {
        if path.isEmpty { throw error }
        pipeline.fail(path, "\(error)")
    }
}
