import ArgumentParser
import CABackup

struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Back up files and directories into a new snapshot.",
        discussion: discussion(
            "Prints the snapshot id; the last line of output is `snapshot <id> saved`, or with --json one JSON object with snapshot_id, files_total, bytes_total, bytes_added, chunks_added, files_unchanged, bytes_unchanged and duration_s. Unreadable entries below PATH are reported on stderr, skipped, and the snapshot is saved with exit code 3.",
            "The latest snapshot of the same paths from the same host is the parent: files whose size, mtime, ctime and inode are unchanged since then are not read again (--force reads everything)."
        ),
        aliases: ["backup"])

    @OptionGroup var repository: RepositoryOptions

    @Option(name: .long, help: "Tag the snapshot (repeatable).")
    var tag: [String] = []

    @OptionGroup var excludes: ExcludeOptions

    @Option(name: .long, help: "Host name to record (default: this machine's).")
    var host: String?

    @Flag(name: .long, help: "Print the result as JSON.")
    var json = false

    @Flag(name: .long, help: "Read every file, even those unchanged since the parent snapshot.")
    var force = false

    @Argument(help: "Files and directories to back up.")
    var paths: [String] = []

    func validate() throws {
        if paths.isEmpty { throw ValidationError("name at least one PATH to back up") }
    }

    struct Output: Encodable {
        let snapshot_id: String
        let files_total: Int
        let dirs_total: Int
        let bytes_total: Int64
        let bytes_added: Int64
        let chunks_added: Int
        let files_unchanged: Int
        let bytes_unchanged: Int64
        let errors: Int
        let duration_s: Double
    }

    func run() throws {
        // The tree is listed on another core while the repository opens (key derivation).
        let prefetch = TreePrefetch(
            paths: paths, excludes: excludes.exclude, caseInsensitiveExcludes: excludes.iexclude)
        let repo = try repository.open()
        Interrupt.duringSnapshot()
        let line = ProgressLine()
        var options = SnapshotOptions(
            tags: tag, excludes: excludes.exclude, caseInsensitiveExcludes: excludes.iexclude, hostname: host,
            force: force)
        options.prefetch = prefetch
        // Progress (and the size scan behind its ETA) only when someone watches.
        let progress: ((SnapshotProgress) -> Void)? =
            !stderrIsTerminal
            ? nil
            : { p in
                // Unchanged files count as done (they need no reading); with a parent the
                // totals are its totals, an estimate ("~").
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
                line.update(
                    "[\(formatDuration(p.elapsedSeconds))] \(files)\(of) files\(unchanged), \(formatBytes(bytes))\(ofBytes), "
                        + "read \(formatBytes(Int64(rate)))/s\(eta), \(formatBytes(p.bytesAdded)) added  \(p.currentPath)"
                )
            }
        let result = try repo.snapshot(paths: paths, options: options, progress: progress)
        line.clear()
        for w in result.warnings { printError("warning: cannot read \(w)") }
        let s = result.snapshot.summary
        if json {
            print(
                jsonLine(
                    Output(
                        snapshot_id: result.snapshot.id.hex, files_total: s.filesTotal, dirs_total: s.directoriesTotal,
                        bytes_total: s.bytesTotal, bytes_added: s.bytesAdded, chunks_added: s.chunksAdded,
                        files_unchanged: s.filesUnchanged, bytes_unchanged: s.bytesUnchanged, errors: s.errors,
                        duration_s: s.durationSeconds)))
        } else {
            let unchanged = s.filesUnchanged > 0 ? " (\(s.filesUnchanged) unchanged, not read)" : ""
            print(
                "\(s.filesTotal) files\(unchanged), \(s.directoriesTotal) directories, \(formatBytes(s.bytesTotal)) read, "
                    + "\(formatBytes(s.bytesAdded)) added (\(s.chunksAdded) new chunks) in \(formatDuration(s.durationSeconds))"
            )
            print("snapshot \(result.snapshot.id.hex) saved")
        }
        if !result.warnings.isEmpty {
            printError("cabackup: " + describeWarnings(result.warnings))
            throw ExitCode(3)
        }
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
