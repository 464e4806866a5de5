import ArgumentParser
import CABackup
import Foundation

struct RestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Restore a snapshot below a target directory.",
        discussion: discussion(
            "The snapshot's absolute paths are recreated below the target: /home/a/docs becomes TARGET/home/a/docs. Every chunk is verified against its hash; a file that cannot be restored intact is removed and reported, and the exit code is 1.",
            "--include selects what to restore with the pattern rules of snapshot --exclude (docs/excludes.md): a selected directory comes with everything below it, and the directories above a selected entry are created. An absolute path such as /home/a/docs is also taken as written; without wildcards it must be in the snapshot. --exclude leaves out what its patterns match and everything below. Only the packs holding selected files are read.",
            "--delete makes the target equal to the snapshot: in every directory restored, entries the snapshot lacks are deleted (only those the patterns select), without following symlinks; it implies --overwrite. --verify reads every restored file back and compares it with the snapshot's chunk ids; each file that differs is reported and the exit code is 1. --dry-run says what would be restored (with -v, each entry) and deleted, and touches nothing.",
            "--json prints one JSON object per line, each with a message_type: status (percent_done, total_files, files_restored, total_bytes, bytes_restored, files_deleted, seconds_elapsed) every second and once at the end, verbose_status for each entry with -v (action restored or deleted, item, size), error for each failure (during restore or verify), and last a summary."
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions
    @OptionGroup var verbosity: VerbosityOptions

    @Option(
        name: [.short, .long],
        help: "Directory to restore into (created if missing; empty unless --overwrite or --delete).")
    var target: String

    @Option(
        name: [.short, .long],
        help: "Restore only what a path or pattern such as /home/a/docs, *.txt or /home/*/docs selects (repeatable).")
    var include: [String] = []

    @Option(name: .long, help: "Like --include, ignoring case (repeatable).")
    var iinclude: [String] = []

    @Option(
        name: [.short, .long], help: "Leave out what a pattern such as *.log or /home/*/.cache matches (repeatable).")
    var exclude: [String] = []

    @Option(name: .long, help: "Like --exclude, ignoring case (repeatable).")
    var iexclude: [String] = []

    @Option(name: .customLong("include-file"), help: "Read --include patterns from a file, one a line (repeatable).")
    var includeFile: [String] = []

    @Option(name: .customLong("iinclude-file"), help: "Read --iinclude patterns from a file (repeatable).")
    var iincludeFile: [String] = []

    @Option(name: .customLong("exclude-file"), help: "Read --exclude patterns from a file, one a line (repeatable).")
    var excludeFile: [String] = []

    @Option(name: .customLong("iexclude-file"), help: "Read --iexclude patterns from a file (repeatable).")
    var iexcludeFile: [String] = []

    @Flag(name: .long, help: "Restore into a non-empty target, replacing entries of the same name.")
    var overwrite = false

    @Flag(name: .long, help: "Delete entries of the target the snapshot lacks (implies --overwrite).")
    var delete = false

    @Flag(name: .long, help: "Read every restored file back and compare it with the snapshot.")
    var verify = false

    @Flag(name: .customLong("dry-run"), help: "Show what would be restored and deleted; change nothing.")
    var dryRun = false

    @Flag(name: .long, help: "Print JSON status lines and a summary.")
    var json = false

    @Argument(help: "Snapshot id, prefix or 'latest'.")
    var snapshot: String

    func validate() throws {
        if dryRun && verify { throw ValidationError("--dry-run and --verify cannot be used together") }
        let options = try restoreOptions()
        if delete && absolutePath(target) == "/" && options.includes.isEmpty && options.caseInsensitiveIncludes.isEmpty
            && options.excludes.isEmpty && options.caseInsensitiveExcludes.isEmpty
        {
            throw ValidationError(
                "--target / --delete needs an --include or --exclude: it would delete everything else")
        }
    }

    /// The options, patterns from the files included; a ValidationError names a malformed
    /// pattern or an unreadable file.
    func restoreOptions() throws -> RestoreOptions {
        let options = RestoreOptions(
            includes: include + (try patterns(includeFile, "--include-file")),
            caseInsensitiveIncludes: iinclude + (try patterns(iincludeFile, "--iinclude-file")),
            excludes: exclude + (try patterns(excludeFile, "--exclude-file")),
            caseInsensitiveExcludes: iexclude + (try patterns(iexcludeFile, "--iexclude-file")),
            overwrite: overwrite, delete: delete, verify: verify, dryRun: dryRun)
        do {
            _ = try IncludeRules(includes: options.includes, caseInsensitiveIncludes: options.caseInsensitiveIncludes)
            _ = try ExcludeRules(excludes: options.excludes, caseInsensitiveExcludes: options.caseInsensitiveExcludes)
        } catch let error as CABackupError {
            throw ValidationError("\(error)")
        }
        return options
    }

    func run() throws {
        let repo = try repository.open()
        let snap = try repo.findSnapshot(snapshot, matching: filters.filter)
        let report = RestoreReport(json: json, level: verbosity.level, dryRun: dryRun)
        let line = ProgressLine()
        let options = try restoreOptions()
        // With patterns the snapshot's total overstates the restore: count what the walk selects.
        let filtered =
            !(options.includes + options.caseInsensitiveIncludes + options.excludes
            + options.caseInsensitiveExcludes).isEmpty
        let snapshotTotal = Int64(snap.summary.bytesTotal)
        let showProgress = stderrIsTerminal && !json && verbosity.level > 0
        let ticker = json && verbosity.level > 0 ? Ticker(every: 1) { report.status() } : nil
        let result: RestoreResult
        do {
            defer { ticker?.stop() }
            result = try repo.restore(
                snap, to: target, options: options,
                progress: { p in
                    guard showProgress else { return }
                    let total = filtered ? report.selectedBytes : snapshotTotal
                    let rate = p.elapsedSeconds > 0 ? Double(p.bytesWritten) / p.elapsedSeconds : 0
                    let eta =
                        rate > 0 && total > p.bytesWritten
                        ? " ETA \(formatDuration(Double(total - p.bytesWritten) / rate))" : ""
                    line.update(
                        "[\(formatDuration(p.elapsedSeconds))] \(p.filesDone) files, \(formatBytes(p.bytesWritten)) of \(formatBytes(total)), "
                            + "\(formatBytes(Int64(rate)))/s\(eta)")
                }, events: { report.handle($0) })
        }
        line.clear()
        for w in result.warnings { printError("warning: \(w)") }
        if json {
            if verbosity.level > 0 { report.status() }
            report.summary(result)
        } else {
            printText(result, snap)
        }
        if !result.failures.isEmpty {
            printError("cabackup: \(result.failures.count) entries could not be restored")
        }
        if !result.verifyFailures.isEmpty {
            printError("cabackup: \(result.verifyFailures.count) restored files differ from the snapshot")
        }
        if !result.failures.isEmpty || !result.verifyFailures.isEmpty { throw ExitCode(1) }
    }

    private func printText(_ result: RestoreResult, _ snap: Snapshot) {
        for f in result.failures { printError("error: \(f)") }
        for f in result.verifyFailures { printError("verify failed: \(f)") }
        let links = result.hardLinksRestored > 0 ? " (\(result.hardLinksRestored) as hard links)" : ""
        var text =
            "\(result.filesRestored) files\(links), \(result.directoriesRestored) directories, "
            + "\(formatBytes(result.bytesWritten)) from snapshot \(snap.id.shortHex) to \(absolutePath(target))"
        if delete {
            text += "; \(dryRun ? "would delete" : "deleted") \(result.entriesDeleted) entries not in the snapshot"
        }
        print(dryRun ? "dry run: would restore \(text)" : "restored \(text)")
        if verify && result.verifyFailures.isEmpty {
            print("verified \(result.filesVerified) files: all match the snapshot")
        }
    }

    /// The patterns of `files`: one a line, surrounding blanks dropped, empty lines and lines
    /// starting with `#` skipped (restic's rules, without its expansion of `$VARIABLES`).
    private func patterns(_ files: [String], _ option: String) throws -> [String] {
        try files.flatMap { file -> [String] in
            guard let data = FileManager.default.contents(atPath: file) else {
                throw ValidationError("\(option): cannot read \(file)")
            }
            return String(decoding: data, as: UTF8.self).split(whereSeparator: \.isNewline)
                .map { $0.trimmingCharacters(in: .whitespaces) }
                .filter { !$0.isEmpty && !$0.hasPrefix("#") }
        }
    }
}

/// What a restore reports as it goes: per-entry lines with -v, and with --json restic's
/// status, verbose_status, error and summary messages.
// Safe: the counters are only touched with `lock` held; events come from several threads.
final class RestoreReport: @unchecked Sendable {
    private let json: Bool
    private let level: Int
    private let dryRun: Bool
    private let lock = NSLock()
    private let start = monotonicSeconds()
    private var totalFiles = 0
    private var totalBytes: Int64 = 0
    private var filesRestored = 0
    private var bytesRestored: Int64 = 0
    private var filesDeleted = 0

    init(json: Bool, level: Int, dryRun: Bool) {
        self.json = json
        self.level = level
        self.dryRun = dryRun
    }

    struct Status: Encodable {
        let seconds_elapsed: Int
        let percent_done: Double
        let total_files: Int
        let files_restored: Int
        let files_deleted: Int
        let total_bytes: Int64
        let bytes_restored: Int64
    }

    struct Item: Encodable {
        let action: String
        let item: String
        let item_b64: String?
        let size: Int64
    }

    struct ErrorMessage: Encodable {
        struct Inner: Encodable { let message: String }
        let error: Inner
        let during: String
        let item: String
    }

    struct Summary: Encodable {
        let seconds_elapsed: Int
        let dry_run: Bool
        let total_files: Int
        let files_restored: Int
        let files_deleted: Int
        let files_failed: Int
        let total_bytes: Int64
        let bytes_restored: Int64
        let files_verified: Int?
        let files_verify_failed: Int?
    }

    func handle(_ event: RestoreEvent) {
        switch event {
        case .selected(_, let size):
            lock.withLock {
                totalFiles += 1
                totalBytes += size
            }
        case .restored(let path, let type, let size):
            if type == .file {
                lock.withLock {
                    filesRestored += 1
                    bytesRestored += size
                }
            }
            item(dryRun ? "would restore" : "restored", "restored", path, size)
        case .deleted(let path):
            lock.withLock { filesDeleted += 1 }
            item(dryRun ? "would delete" : "deleted", "deleted", path, 0)
        case .failed(let f):
            if json {
                JSONMessages.emit(
                    "error", ErrorMessage(error: .init(message: f.message), during: "restore", item: f.path))
            }
        case .verified(let path, let size):
            item("verified", "verified", path, size)
        case .verifyFailed(let f):
            if json {
                JSONMessages.emit(
                    "error", ErrorMessage(error: .init(message: f.message), during: "verify", item: f.path))
            }
        }
    }

    /// A `-v` line: text, or a verbose_status message.
    private func item(_ text: String, _ action: String, _ path: [UInt8], _ size: Int64) {
        guard level >= 2 else { return }
        if json {
            let p = JSONPath(path)
            JSONMessages.emit("verbose_status", Item(action: action, item: p.path, item_b64: p.pathB64, size: size))
        } else {
            let line = "\(text) \(displayPath(path))\n"
            lock.withLock { FileHandle.standardOutput.write(Data(line.utf8)) }
        }
    }

    /// The bytes of the files selected so far.
    var selectedBytes: Int64 { lock.withLock { totalBytes } }

    /// One status message.
    func status() {
        let s = lock.withLock {
            let done =
                totalBytes > 0
                ? Double(bytesRestored) / Double(totalBytes)
                : totalFiles > 0 ? Double(filesRestored) / Double(totalFiles) : 1
            return Status(
                seconds_elapsed: Int(monotonicSeconds() - start), percent_done: min(1, done), total_files: totalFiles,
                files_restored: filesRestored, files_deleted: filesDeleted, total_bytes: totalBytes,
                bytes_restored: bytesRestored)
        }
        JSONMessages.emit("status", s)
    }

    /// The summary message, last.
    func summary(_ r: RestoreResult) {
        let verified = r.filesVerified > 0 || !r.verifyFailures.isEmpty
        let s = lock.withLock {
            Summary(
                seconds_elapsed: Int(monotonicSeconds() - start), dry_run: dryRun, total_files: totalFiles,
                files_restored: r.filesRestored, files_deleted: r.entriesDeleted, files_failed: r.failures.count,
                total_bytes: totalBytes, bytes_restored: r.bytesWritten,
                files_verified: verified ? r.filesVerified : nil,
                files_verify_failed: verified ? r.verifyFailures.count : nil)
        }
        JSONMessages.emit("summary", s)
    }
}

/// Calls `tick` every `seconds` on a thread of its own until stopped; no call starts after
/// ``stop()`` returns.
// Safe: `stopped` is only touched with `condition` locked.
final class Ticker: @unchecked Sendable {
    private let condition = NSCondition()
    private var stopped = false
    private var running = true

    init(every seconds: Double, _ tick: @escaping @Sendable () -> Void) {
        Thread.detachNewThread { [self] in
            condition.lock()
            while !stopped {
                if !condition.wait(until: Date(timeIntervalSinceNow: seconds)) && !stopped {
                    tick()  // under the lock, so stop() waits for it
                }
            }
            running = false
            condition.broadcast()
            condition.unlock()
        }
    }

    func stop() {
        condition.lock()
        stopped = true
        condition.broadcast()
        while running { condition.wait() }
        condition.unlock()
    }
}
