import ArgumentParser
import CABackup

struct RestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Restore a snapshot below a target directory.",
        discussion: discussion(
            "The snapshot's absolute paths are recreated below the target: /home/a/docs becomes TARGET/home/a/docs. Every chunk is verified against its hash; a file that cannot be restored intact is removed and reported, and the exit code is 1."
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions

    @Option(name: [.short, .long], help: "Directory to restore into (created if missing; must be empty).")
    var target: String

    @Option(name: [.short, .long], help: "Restore only this path of the snapshot (repeatable).")
    var include: [String] = []

    @Flag(name: .long, help: "Restore into a non-empty target, replacing entries of the same name.")
    var overwrite = false

    @Argument(help: "Snapshot id, prefix or 'latest'.")
    var snapshot: String

    func run() throws {
        let repo = try repository.open()
        let snap = try repo.findSnapshot(snapshot, matching: filters.filter)
        let line = ProgressLine()
        let total = Int64(snap.summary.bytesTotal)
        let result = try repo.restore(
            snap, to: target, options: RestoreOptions(includes: include, overwrite: overwrite)
        ) { p in
            guard stderrIsTerminal else { return }
            let rate = p.elapsedSeconds > 0 ? Double(p.bytesWritten) / p.elapsedSeconds : 0
            let eta =
                rate > 0 && total > p.bytesWritten
                ? " ETA \(formatDuration(Double(total - p.bytesWritten) / rate))" : ""
            line.update(
                "[\(formatDuration(p.elapsedSeconds))] \(p.filesDone) files, \(formatBytes(p.bytesWritten)) of \(formatBytes(total)), "
                    + "\(formatBytes(Int64(rate)))/s\(eta)")
        }
        line.clear()
        for w in result.warnings { printError("warning: \(w)") }
        for f in result.failures { printError("error: \(f)") }
        let links = result.hardLinksRestored > 0 ? " (\(result.hardLinksRestored) as hard links)" : ""
        print(
            "restored \(result.filesRestored) files\(links), \(result.directoriesRestored) directories, "
                + "\(formatBytes(result.bytesWritten)) from snapshot \(snap.id.shortHex) to \(absolutePath(target))")
        if !result.failures.isEmpty {
            printError("cabackup: \(result.failures.count) entries could not be restored")
            throw ExitCode(1)
        }
    }
}
