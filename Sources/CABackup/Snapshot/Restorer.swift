import CABackupCore
import CABackupFormat

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Options for ``Repository/restore(_:to:options:progress:events:)``.
public struct RestoreOptions: Sendable {
    /// Restore only what these patterns select (restic's `--include`), with the rules of
    /// snapshot excludes (`docs/excludes.md`): an entry is selected when a pattern matches it
    /// or one of its ancestors, so a selected directory comes with everything below it, and
    /// the directories above a selected entry are created too. An absolute path is also
    /// taken as written, as before patterns: `/home/a/docs` selects that entry and everything
    /// below it even when its name holds `*`, `?`, `[` or `\`; one without those characters
    /// must be in the snapshot. Empty selects everything.
    public var includes: [String]
    /// Like ``includes``, ignoring case (`--iinclude`).
    public var caseInsensitiveIncludes: [String]
    /// Leave out the entries these patterns match and everything below them (restic's
    /// `--exclude`, the rules of snapshot excludes). Applied after ``includes``.
    public var excludes: [String]
    /// Like ``excludes``, ignoring case (`--iexclude`).
    public var caseInsensitiveExcludes: [String]
    /// Restore into a non-empty target, replacing entries of the same name.
    public var overwrite: Bool
    /// Make the target equal to the snapshot (restic's `--delete`): in every directory the
    /// restore creates or enters, delete the entries the snapshot's directory lacks, when the
    /// include and exclude patterns select them. Implies ``overwrite``. Deletion never
    /// follows a symlink and never leaves the target.
    public var delete: Bool
    /// Once everything is written, read every restored file back and compare each chunk with
    /// its id (the repository's id function: HMAC-SHA-256 under its id key when encrypted);
    /// a file that differs is reported in ``RestoreResult/verifyFailures``.
    public var verify: Bool
    /// Report (through the events) what would be restored and deleted; write nothing, read
    /// no pack, create not even the target.
    public var dryRun: Bool
    /// Threads writing files; by default one per core.
    public var workers: Int

    public init(
        includes: [String] = [], caseInsensitiveIncludes: [String] = [], excludes: [String] = [],
        caseInsensitiveExcludes: [String] = [], overwrite: Bool = false, delete: Bool = false,
        verify: Bool = false, dryRun: Bool = false, workers: Int? = nil
    ) {
        self.includes = includes
        self.caseInsensitiveIncludes = caseInsensitiveIncludes
        self.excludes = excludes
        self.caseInsensitiveExcludes = caseInsensitiveExcludes
        self.overwrite = overwrite
        self.delete = delete
        self.verify = verify
        self.dryRun = dryRun
        self.workers = workers ?? usableCPUCount()
    }
}

/// Progress of a running restore.
public struct RestoreProgress: Sendable {
    public var filesDone: Int
    public var bytesWritten: Int64
    public var elapsedSeconds: Double
}

/// What happens to one entry during a restore, reported as it happens (from several
/// threads: the callback must be thread-safe). Paths are absolute paths in the snapshot.
public enum RestoreEvent: Sendable {
    /// The walk selected a regular file of `size` bytes: the totals grow as the walk goes.
    case selected(path: [UInt8], size: Int64)
    /// An entry was created (a regular file once all its bytes are written), or in a dry
    /// run would be.
    case restored(path: [UInt8], type: NodeType, size: Int64)
    /// `delete`: an entry of the target the snapshot lacks was removed (with everything
    /// below it), or in a dry run would be.
    case deleted(path: [UInt8])
    /// An entry could not be restored, or deleted.
    case failed(RestoreFailure)
    /// `verify`: a restored file was read back and matches the snapshot.
    case verified(path: [UInt8], size: Int64)
    /// `verify`: a restored file differs from the snapshot.
    case verifyFailed(RestoreFailure)
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
    /// `filesTotal` counts them); in a dry run, those that would be.
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
    /// `delete`: entries of the target removed (or in a dry run to be removed), each
    /// counted once with everything below it.
    public var entriesDeleted: Int = 0
    /// `verify`: files read back that match the snapshot.
    public var filesVerified: Int = 0
    /// `verify`: files that differ from the snapshot, one message each.
    public var verifyFailures: [RestoreFailure] = []
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
    /// `progress` is called from the writing threads every 64 files; `events` as each entry
    /// is selected, restored, deleted, verified or fails (see ``RestoreEvent``), from several
    /// threads.
    ///
    /// Every blob is verified against its id as it is read. A file whose data is missing
    /// or damaged is removed and reported in ``RestoreResult/failures``; the rest of the
    /// restore goes on. Names are checked (no `/`, `.`, `..`), entries are created
    /// relative to directory descriptors without following symlinks, so nothing is ever
    /// written outside `target`. Only the packs holding selected files are read.
    ///
    /// - Throws: ``CABackupError/targetNotEmpty(_:)`` unless `options.overwrite` or
    ///   `options.delete`; ``CABackupError/invalidArgument(_:)`` for a malformed pattern, a
    ///   target that is not a directory, or `delete` into `/` without a pattern;
    ///   ``CABackupError/pathNotInSnapshot(_:)`` for an absolute include without wildcards
    ///   that the snapshot lacks. Nothing is written then.
    public func restore(
        _ snapshot: Snapshot, to target: String, options: RestoreOptions = RestoreOptions(),
        progress: (@Sendable (RestoreProgress) -> Void)? = nil,
        events: (@Sendable (RestoreEvent) -> Void)? = nil
    ) throws -> RestoreResult {
        let target = absolutePath(target)
        let selection = try RestoreSelection(options)
        // An --include path that names nothing is a typo, not an empty restore.
        for include in options.includes
        where include.hasPrefix("/") && absolutePath(include) != "/" && !RestoreSelection.hasWildcard(include) {
            _ = try entry(in: snapshot, at: include)
        }
        if fileExists(target) && !isDirectory(target) {
            throw CABackupError.invalidArgument(
                "restore target \(target) is not a directory: name a directory (created if missing)")
        }
        if options.delete && target == "/" && selection.selectsEverything {
            throw CABackupError.invalidArgument(
                "restoring into / with delete needs an include or exclude pattern: it would delete everything else")
        }
        let overwrite = options.overwrite || options.delete
        func run<Sink: RestoreSink>(_ sink: Sink) throws -> RestoreResult {
            try index.sharingReads {
                var restorer = Restorer(
                    repository: self, snapshot: snapshot, sink: sink, selection: selection, options: options,
                    progress: progress, events: events)
                return try restorer.run()
            }
        }
        if options.dryRun { return try run(DryRunSink(target: target, overwrite: overwrite)) }
        return try run(LocalFileSink(target: target, overwrite: overwrite))
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

/// Which entries a restore selects: those the includes (patterns, and absolute paths taken
/// as written) select, less those the excludes match.
struct RestoreSelection: Sendable {
    private let includes: IncludeRules
    /// The absolute includes as written, each selecting itself and everything below it.
    private let literals: [[UInt8]]
    private let excludes: ExcludeRules

    init(_ options: RestoreOptions) throws {
        includes = try IncludeRules(
            includes: options.includes, caseInsensitiveIncludes: options.caseInsensitiveIncludes)
        literals = options.includes.filter { $0.hasPrefix("/") }.map { Array(absolutePath($0).utf8) }
        excludes = try ExcludeRules(
            excludes: options.excludes, caseInsensitiveExcludes: options.caseInsensitiveExcludes)
    }

    /// Whether there is no pattern: everything is selected.
    var selectsEverything: Bool { includes.isEmpty && excludes.isEmpty }

    /// Whether a pattern has a character with a meaning in patterns (`*`, `?`, `[`, `\`).
    static func hasWildcard(_ pattern: String) -> Bool {
        pattern.utf8.contains { $0 == 0x2A || $0 == 0x3F || $0 == 0x5B || $0 == 0x5C }
    }

    /// Whether the entry at `path` is restored, and whether a walk must look below it (a
    /// selected directory, or one a pattern may select something below).
    func select(_ path: [UInt8], isDirectory: Bool) -> (restore: Bool, descend: Bool) {
        if excludes.isExcluded(path: path) { return (false, false) }
        if includes.isEmpty || includes.selects(path: path) || literals.contains(where: { isAtOrBelow(path, $0) }) {
            return (true, isDirectory)
        }
        let below =
            isDirectory
            && (includes.maySelectBelow(directory: path)
                || literals.contains { $0.count > path.count && isAtOrBelow($0, path) })
        return (false, below)
    }

    /// Whether `path` is `ancestor` or below it.
    private func isAtOrBelow(_ path: [UInt8], _ ancestor: [UInt8]) -> Bool {
        ancestor == [0x2F] || path == ancestor
            || (path.count > ancestor.count && path.starts(with: ancestor) && path[ancestor.count] == 0x2F)
    }
}

/// A restore: plans what to create while walking the snapshot (selection, name checks,
/// hard links, file pieces) and creates it through the sink, file bytes on the
/// pipeline's workers; then deletes what the snapshot lacks and verifies, when asked.
struct Restorer<Sink: RestoreSink>: TreeVisitor {
    private let repo: Repository
    private let snapshot: Snapshot
    private let sink: Sink
    private let options: RestoreOptions
    private let selection: RestoreSelection
    private let events: (@Sendable (RestoreEvent) -> Void)?
    private let pipeline: RestorePipeline<Sink.File>

    /// A directory of the snapshot on the way from the root to the entry being visited.
    private struct Level {
        var node: Node?
        var path: [UInt8]
        /// The sink's directory once created. A directory that is not selected itself but
        /// lies above a selected entry is created when the first entry below it is.
        var directory: Sink.Directory?
        /// Creating it failed (reported once): nothing below it is restored.
        var failed = false
        /// A tree of it could not be read: `delete` does not know all its names.
        var incomplete = false
        /// `delete`: the names the snapshot has in this directory.
        var names: Set<[UInt8]> = []
    }
    private var levels: [Level]
    private var directoriesRestored = 0
    private var entriesDeleted = 0
    /// A dry run's files and bytes (a real restore counts what the workers wrote).
    private var plannedFiles = 0
    private var plannedBytes: Int64 = 0
    /// The first name restored of each hard-linked file.
    private var hardLinks: [HardLinkKey: [UInt8]] = [:]
    /// Further names of hard-linked files, linked once every file is written.
    private var deferredLinks: [(path: [UInt8], first: [UInt8])] = []

    init(
        repository: Repository, snapshot: Snapshot, sink: Sink, selection: RestoreSelection, options: RestoreOptions,
        progress: (@Sendable (RestoreProgress) -> Void)?, events: (@Sendable (RestoreEvent) -> Void)?
    ) {
        self.repo = repository
        self.snapshot = snapshot
        self.sink = sink
        self.options = options
        self.selection = selection
        self.events = events
        self.pipeline = RestorePipeline(
            repository: repository, snapshot: snapshot.id, progress: progress, events: events)
        self.levels = [Level(node: nil, path: [], directory: sink.root)]
    }

    mutating func run() throws -> RestoreResult {
        if options.dryRun {
            try walk()
        } else {
            try pipeline.run(workers: options.workers) { try walk() }
        }
        var links = 0
        for link in deferredLinks {
            do {
                if !options.dryRun { try sink.hardLink(link.path, to: link.first) }
                links += 1
                events?(.restored(path: link.path, type: .file, size: 0))
            } catch {
                pipeline.fail(link.path, "\(error)")
            }
        }
        try sink.finish()
        let t = pipeline.totals
        var result = RestoreResult(
            filesRestored: (options.dryRun ? plannedFiles : t.files) + links, hardLinksRestored: links,
            directoriesRestored: directoriesRestored, bytesWritten: options.dryRun ? plannedBytes : t.bytes,
            failures: t.failures, warnings: sink.warnings, entriesDeleted: entriesDeleted)
        if options.verify && !options.dryRun {
            var verifier = RestoreVerifier(
                repository: repo, sink: sink, selection: selection, failed: Set(t.failures.map(\.path)),
                events: events)
            (result.filesVerified, result.verifyFailures) = try verifier.run(
                tree: snapshot.tree, workers: options.workers)
        }
        return result
    }

    private mutating func walk() throws {
        try SnapshotTreeWalker(repo).walk(trees: [snapshot.tree], path: [], &self)
        deleteUnexpected(levels[0])
    }

    /// The sink's directory for the entry being visited, creating the directories above it
    /// that are not created yet; nil when one cannot be.
    private mutating func directory() -> Sink.Directory? {
        var first = levels.count - 1
        while levels[first].directory == nil && !levels[first].failed { first -= 1 }
        if levels[first].failed { return nil }
        for k in (first + 1)..<levels.count {
            let level = levels[k]
            do {
                levels[k].directory = try sink.makeDirectory(
                    level.node!, path: level.path, in: levels[k - 1].directory!)
                directoriesRestored += 1
                events?(.restored(path: level.path, type: .directory, size: 0))
            } catch {
                levels[k].failed = true
                pipeline.fail(level.path, "\(error)")
                return nil
            }
        }
        return levels[levels.count - 1].directory
    }

    mutating func visit(_ node: Node, path: [UInt8]) throws -> TreeDecision {
        if options.delete { levels[levels.count - 1].names.insert(node.name) }
        guard isSafeName(node.name) else {
            pipeline.fail(path, "unsafe name refused")
            return .skip
        }
        let choice = selection.select(path, isDirectory: node.type == .directory)
        if node.type == .directory {
            guard choice.restore || choice.descend else { return .skip }
            levels.append(Level(node: node, path: path))
            // A selected directory is created even when nothing below it is selected.
            if choice.restore && directory() == nil {
                levels.removeLast()
                return .skip
            }
            return .descend
        }
        guard choice.restore, let dir = directory() else { return .skip }
        do {
            // `delete`: a directory standing where this entry goes goes too (overwrite only
            // replaces non-directories).
            if options.delete && !options.dryRun && node.type != .socket { try sink.remove(node.name, in: dir) }
            switch node.type {
            case .directory:
                break  // above
            case .file:
                let size = Int64(node.size)
                if node.links > 1 {
                    let key = HardLinkKey(node)
                    if let first = hardLinks[key] {
                        deferredLinks.append((path, first))
                        events?(.selected(path: path, size: 0))
                        return .skip
                    }
                    hardLinks[key] = path
                }
                events?(.selected(path: path, size: size))
                if options.dryRun {
                    plannedFiles += 1
                    plannedBytes += size
                    events?(.restored(path: path, type: .file, size: size))
                } else {
                    try pipeline.add(node: node, path: path) { try sink.createFile(node, path: path, in: dir) }
                }
            case .symlink:
                if !options.dryRun { try sink.makeSymlink(node, path: path, in: dir) }
                events?(.restored(path: path, type: .symlink, size: 0))
            case .fifo, .characterDevice, .blockDevice:
                if !options.dryRun { try sink.makeSpecial(node, path: path, in: dir) }
                events?(.restored(path: path, type: node.type, size: 0))
            case .socket:
                break  // Sockets are recreated by the programs that own them.
            }
        } catch {
            pipeline.fail(path, "\(error)")
        }
        return .skip
    }

    mutating func leaveDirectory(_ node: Node, path: [UInt8]) throws {
        deleteUnexpected(levels.removeLast())
    }

    /// A directory whose entries cannot be read is restored empty and reported (and
    /// `delete` leaves it alone); the snapshot's root cannot be restored at all.
    mutating func unreadable(_ id: BlobID, path: [UInt8], error: any Error) throws {
        if path.isEmpty { throw error }
        levels[levels.count - 1].incomplete = true
        pipeline.fail(path, "\(error)")
    }

    /// `delete`: removes the entries of a directory the restore created or entered that
    /// the snapshot's directory lacks, when the selection selects them (restic's rule:
    /// nothing outside the include patterns, nothing an exclude matches).
    private mutating func deleteUnexpected(_ level: Level) {
        guard options.delete, !level.incomplete, let dir = level.directory else { return }
        let present: [[UInt8]]
        do {
            present = try sink.names(in: dir)
        } catch {
            pipeline.fail(level.path.isEmpty ? [0x2F] : level.path, "cannot list for --delete: \(error)")
            return
        }
        for name in present where !level.names.contains(name) {
            let path = level.path + [0x2F] + name
            guard selection.select(path, isDirectory: false).restore else { continue }
            do {
                if !options.dryRun { try sink.remove(name, in: dir) }
                entriesDeleted += 1
                events?(.deleted(path: path))
            } catch {
                pipeline.fail(path, "\(error)")
            }
        }
    }
}
