import ArgumentParser
import CABackup
import Foundation
import Synchronization

struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Back up files and directories into a new snapshot.",
        discussion: discussion(
            "Prints the snapshot id; the last line of output is `snapshot <id> saved`. With --json, stdout is a stream of JSON lines, restic's: `status` about every second, `verbose_status` per file with -v (unchanged files with -vv), `error` per unreadable entry, and last one `summary` object with snapshot_id, files_total, bytes_total, bytes_added, chunks_added, files_unchanged, bytes_unchanged and duration_s. Unreadable entries below PATH are reported on stderr, skipped, and the snapshot is saved with exit code 3.",
            "The latest snapshot of the same paths from the same host is the parent: files whose size, mtime, ctime and inode are unchanged since then are not read again (--force reads everything).",
            "--files-from takes literal paths (restic reads patterns there): no wildcards; relative paths are resolved against the current directory."
        ),
        aliases: ["backup"])

    @OptionGroup var repository: RepositoryOptions

    @Option(name: .long, help: "Tag the snapshot (repeatable).")
    var tag: [String] = []

    @OptionGroup var excludes: ExcludeOptions

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Leave out the contents of directories holding a file NAME (starting with HEADER, when given), except that file (repeatable).",
            valueName: "NAME[:HEADER]"))
    var excludeIfPresent: [String] = []

    @Flag(
        name: .long,
        help:
            "Leave out the contents of directories tagged as caches (a CACHEDIR.TAG file with the standard signature), except the tag."
    )
    var excludeCaches = false

    @Flag(name: .long, help: "Leave out files and directories with the nodump flag (chattr +d).")
    var excludeNodump = false

    @Option(name: .long, help: ArgumentHelp("Leave out files larger than SIZE (such as 512K, 2G).", valueName: "SIZE"))
    var excludeLargerThan: String?

    @Flag(
        name: [.customShort("x"), .long],
        help: "Do not cross into other file systems below the paths: mount points are stored as empty directories.")
    var oneFileSystem = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Back up the paths listed in FILE, one per line, taken literally (no patterns); relative paths are resolved against the current directory; blank lines and lines starting with # are ignored (repeatable).",
            valueName: "FILE"))
    var filesFrom: [String] = []

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Back up the paths listed in FILE, separated by NUL bytes, exactly as they are (UTF-8; repeatable).",
            valueName: "FILE"))
    var filesFromRaw: [String] = []

    @Flag(name: .long, help: "Back up what is read from standard input as one file (see --stdin-filename).")
    var stdin = false

    @Option(
        name: .long,
        help: ArgumentHelp("The name of the file --stdin stores, as /NAME (default: stdin).", valueName: "NAME"))
    var stdinFilename: String?

    @Flag(
        name: [.customShort("n"), .long],
        help: "Read and chunk everything and report what would be stored, but write nothing to the repository.")
    var dryRun = false

    @Option(
        name: .long,
        help: "Host name to record, and whose snapshots the parent is taken from (default: this machine's).")
    var host: String?

    @Flag(name: .long, help: "Print a stream of JSON lines ending with the summary object.")
    var json = false

    @Flag(name: .long, help: "Read every file, even those unchanged since the parent snapshot.")
    var force = false

    @OptionGroup var verbosity: VerbosityOptions

    @Argument(help: "Files and directories to back up.")
    var paths: [String] = []

    func validate() throws {
        if let excludeLargerThan, parseSize(excludeLargerThan) == nil {
            throw ValidationError(
                "--exclude-larger-than takes a size such as 512K, 100M or 2G, not '\(excludeLargerThan)'")
        }
        if let stdinFilename {
            guard stdin else { throw ValidationError("--stdin-filename names the file read with --stdin: add --stdin") }
            if stdinFilename.isEmpty || stdinFilename.contains("/") || stdinFilename == "." || stdinFilename == ".." {
                throw ValidationError("--stdin-filename takes a file name without '/', not '\(stdinFilename)'")
            }
        }
        do {
            try options().validate()
        } catch let error as CABackupError {
            throw ValidationError("\(error)")
        }
        if stdin {
            if !paths.isEmpty || !filesFrom.isEmpty || !filesFromRaw.isEmpty {
                throw ValidationError("--stdin backs up standard input only: name no PATH and no --files-from")
            }
        } else if try allPaths().isEmpty {
            throw ValidationError("name at least one PATH to back up (or --files-from FILE)")
        }
    }

    /// The PATH arguments, then the paths of the --files-from and --files-from-raw files.
    func allPaths() throws -> [String] {
        var all = paths
        func read(_ files: [String], _ option: String, _ reader: (String) throws -> [String]) throws {
            for file in files {
                do {
                    all += try reader(file)
                } catch CABackupError.unreadableSource(_, let reason) {
                    throw ValidationError("\(option): cannot read \(file): \(reason)")
                } catch let error as CABackupError {
                    throw ValidationError("\(option): \(error)")
                }
            }
        }
        try read(filesFrom, "--files-from", ListFile.paths)
        try read(filesFromRaw, "--files-from-raw", ListFile.rawPaths)
        return all
    }

    func options() throws -> SnapshotOptions {
        let patterns = try excludes.patterns()
        var options = SnapshotOptions(
            tags: tag, excludes: patterns.exclude, caseInsensitiveExcludes: patterns.iexclude, hostname: host,
            force: force)
        options.excludeLargerThan = excludeLargerThan.flatMap(parseSize)
        options.oneFileSystem = oneFileSystem
        options.excludeNodump = excludeNodump
        options.excludeCaches = excludeCaches
        options.excludeIfPresent = excludeIfPresent
        options.dryRun = dryRun
        return options
    }

    struct Output: Encodable {
        let snapshot_id: String?
        let files_total: Int
        let dirs_total: Int
        let bytes_total: Int64
        let bytes_added: Int64
        let chunks_added: Int
        let files_unchanged: Int
        let bytes_unchanged: Int64
        let errors: Int
        let duration_s: Double
        let files_new: Int
        let files_changed: Int
        let dry_run: Bool?
    }

    func run() throws {
        var options = try options()
        let paths = stdin ? [] : try allPaths()
        // The tree is listed on another core while the repository opens (key derivation).
        if !stdin { options.prefetch = TreePrefetch(paths: paths, options: options) }
        let repo = try repository.open()
        Interrupt.duringSnapshot()
        let level = verbosity.level
        let line = ProgressLine()
        let counts = FileCounts()
        let json = json
        // Only when asked for: a plain run keeps the walk free of a call per file.
        if json || dryRun || level >= 2 {
            options.onFile = { event in
                counts.add(event.action)
                guard level >= (event.action == .unchanged ? 3 : 2) else { return }
                if json {
                    JSONMessages.emit(
                        "verbose_status",
                        VerboseStatus(action: event.action.rawValue, item: event.path, data_size: event.size))
                } else {
                    line.clear()
                    print("\(event.action == .changed ? "modified" : event.action.rawValue) \(event.path)")
                }
            }
        }
        let status = json && level >= 1 ? StatusStream() : nil
        let progress: ((SnapshotProgress) -> Void)?
        if let status {
            progress = { status.update($0) }
        } else if stderrIsTerminal && level >= 1 {
            // Progress (and the size scan behind its ETA) only when someone watches.
            progress = { line.update(progressText($0)) }
        } else {
            progress = nil
        }
        status?.start()
        let result: SnapshotResult
        do {
            defer { status?.stop() }
            result =
                try stdin
                ? repo.snapshot(stdin: 0, filename: stdinFilename ?? "stdin", options: options, progress: progress)
                : repo.snapshot(paths: paths, options: options, progress: progress)
        }
        line.clear()
        let s = result.snapshot.summary
        let id = dryRun ? nil : result.snapshot.id.hex
        // On stderr as ever, and with --json also in the stream.
        for w in result.warnings { printError("warning: cannot read \(w)") }
        if json {
            for w in result.warnings {
                JSONMessages.emit(
                    "error",
                    ErrorMessage(
                        error: .init(
                            message: w.message + (w.outcome == .storedEmpty ? " (stored as an empty directory)" : "")),
                        during: "archival", item: w.path))
            }
            JSONMessages.emit(
                "summary",
                Output(
                    snapshot_id: id, files_total: s.filesTotal, dirs_total: s.directoriesTotal,
                    bytes_total: s.bytesTotal, bytes_added: s.bytesAdded, chunks_added: s.chunksAdded,
                    files_unchanged: s.filesUnchanged, bytes_unchanged: s.bytesUnchanged, errors: s.errors,
                    duration_s: s.durationSeconds, files_new: counts.new, files_changed: counts.changed,
                    dry_run: dryRun ? true : nil))
        } else {
            if level >= 1 {
                let unchanged = s.filesUnchanged > 0 ? " (\(s.filesUnchanged) unchanged, not read)" : ""
                let added = dryRun ? "would be added" : "added"
                print(
                    "\(s.filesTotal) files\(unchanged), \(s.directoriesTotal) directories, \(formatBytes(s.bytesTotal)) read, "
                        + "\(formatBytes(s.bytesAdded)) \(added) (\(s.chunksAdded) new chunks) in \(formatDuration(s.durationSeconds))"
                )
            }
            if let id {
                print("snapshot \(id) saved")
            } else {
                print(
                    "dry run: \(counts.new) new, \(counts.changed) changed, \(counts.unchanged) unchanged files; "
                        + "\(formatBytes(s.bytesAdded)) would be added; nothing was written")
            }
        }
        if !result.warnings.isEmpty {
            printError("cabackup: " + describeWarnings(result.warnings))
            throw ExitCode(3)
        }
    }

    struct VerboseStatus: Encodable {
        let action: String
        let item: String
        let data_size: Int64
    }

    struct ErrorMessage: Encodable {
        struct Inner: Encodable { let message: String }
        let error: Inner
        let during: String
        let item: String
    }
}

/// The one-line progress text on a terminal.
private func progressText(_ p: SnapshotProgress) -> String {
    // Unchanged files count as done (they need no reading); with a parent the totals
    // are its totals, an estimate ("~").
    let files = p.filesDone + p.filesUnchanged
    let bytes = p.bytesRead + p.bytesUnchanged
    let known = p.scanFinished && p.totalFiles >= files && p.totalBytes >= bytes
    let approx = p.totalsFromParent ? "~" : ""
    let of = known ? " of \(approx)\(p.totalFiles)" : ""
    let ofBytes = known ? " of \(approx)\(formatBytes(p.totalBytes))" : ""
    let rate = p.elapsedSeconds > 0 ? Double(p.bytesRead) / p.elapsedSeconds : 0
    let pace = p.elapsedSeconds > 0 ? Double(bytes) / p.elapsedSeconds : 0
    var eta = ""
    if known && pace > 0 && p.totalBytes > bytes {
        eta = " ETA \(formatDuration(Double(p.totalBytes - bytes) / pace))"
    }
    let unchanged = p.filesUnchanged > 0 ? " (\(p.filesUnchanged) unchanged)" : ""
    return "[\(formatDuration(p.elapsedSeconds))] \(files)\(of) files\(unchanged), \(formatBytes(bytes))\(ofBytes), "
        + "read \(formatBytes(Int64(rate)))/s\(eta), \(formatBytes(p.bytesAdded)) added  \(p.currentPath)"
}

/// Files by what a snapshot did with them, counted as the walk reports them.
final class FileCounts: Sendable {
    private let counts = Mutex<(new: Int, changed: Int, unchanged: Int)>((0, 0, 0))

    func add(_ action: SnapshotFileEvent.Action) {
        counts.withLock { c in
            switch action {
            case .new: c.new += 1
            case .changed: c.changed += 1
            case .unchanged: c.unchanged += 1
            }
        }
    }

    var new: Int { counts.withLock { $0.new } }
    var changed: Int { counts.withLock { $0.changed } }
    var unchanged: Int { counts.withLock { $0.unchanged } }
}

/// restic's `status` lines of `backup --json`: the latest progress, written by a timer
/// thread about every second whether or not anyone watches, and once more at the end
/// (the final figures, `percent_done` 1).
final class StatusStream: Sendable {
    private let latest = Mutex<SnapshotProgress?>(nil)
    /// Signalled by stop(); the timer waits on it a second at a time.
    private let wake = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)

    struct Status: Encodable {
        let percent_done: Double
        let total_files: Int
        let files_done: Int
        let total_bytes: Int64
        let bytes_done: Int64
        let seconds_elapsed: Int
        let seconds_remaining: Int?
        let current_files: [String]
    }

    func update(_ p: SnapshotProgress) { latest.withLock { $0 = p } }

    func start() {
        Thread.detachNewThread { [self] in
            while wake.wait(timeout: .now() + 1) == .timedOut {
                if let p = latest.withLock({ $0 }) { emit(p) }
            }
            finished.signal()
        }
    }

    /// Stops the timer and writes the last status, when there was any progress.
    func stop() {
        wake.signal()
        finished.wait()
        if let p = latest.withLock({ $0 }) { emit(p) }
    }

    private func emit(_ p: SnapshotProgress) {
        let files = p.filesDone + p.filesUnchanged
        let bytes = p.bytesRead + p.bytesUnchanged
        let totalFiles = max(p.totalFiles, files)
        let totalBytes = max(p.totalBytes, bytes)
        // While the totals are still being counted (or unknown, as for stdin) the share
        // of what is counted so far; 0 when nothing is.
        let known = p.scanFinished ? totalBytes : p.totalBytes
        let done = known > 0 ? Double(bytes) / Double(known) : (p.scanFinished ? 1 : 0)
        var remaining: Int?
        if p.scanFinished && bytes > 0 && p.elapsedSeconds > 0 {
            remaining = Int((Double(totalBytes - bytes) / (Double(bytes) / p.elapsedSeconds)).rounded())
        }
        JSONMessages.emit(
            "status",
            Status(
                percent_done: min(1, done), total_files: totalFiles, files_done: files, total_bytes: totalBytes,
                bytes_done: bytes, seconds_elapsed: Int(p.elapsedSeconds), seconds_remaining: remaining,
                current_files: p.currentPath.isEmpty ? [] : [p.currentPath]))
    }
}

/// One line saying what became of the entries a snapshot could not read: "2 entries could
/// not be read and are not in the snapshot; 1 directory could not be listed and is stored
/// empty".
func describeWarnings(_ warnings: [SnapshotWarning]) -> String {
    let empty = warnings.filter { $0.outcome == .storedEmpty }.count
    let skipped = warnings.count - empty
    var parts: [String] = []
    if skipped > 0 {
        parts.append(
            skipped == 1
                ? "1 entry could not be read and is not in the snapshot"
                : "\(skipped) entries could not be read and are not in the snapshot")
    }
    if empty > 0 {
        parts.append(
            empty == 1
                ? "1 directory could not be listed and is stored empty"
                : "\(empty) directories could not be listed and are stored empty")
    }
    return parts.joined(separator: "; ")
}
