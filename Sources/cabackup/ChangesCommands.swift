import ArgumentParser
import CABackup
import CABackupUI
import Foundation

/// Prints a change set as text (`+`, `-`, `M`, `U` lines, `note` if any, and a summary
/// line, of two snapshots when `betweenSnapshots`) or as one JSON object.
func printChanges(_ c: ChangeSet, json: Bool, betweenSnapshots: Bool = false, note: String? = nil) {
    if json {
        struct Item: Encodable {
            let path: String
            let path_b64: String?
            let size: UInt64
            let type: String
        }
        struct Output: Encodable {
            let base: String?
            let added: [Item]
            let removed: [Item]
            let modified: [Item]
            let metadata_only: [Item]
            let files_to_sync: Int
            let bytes_to_sync: UInt64

            func encode(to encoder: any Encoder) throws {
                enum K: String, CodingKey {
                    case base, added, removed, modified, metadata_only, files_to_sync, bytes_to_sync
                }
                var k = encoder.container(keyedBy: K.self)
                try k.encode(base, forKey: .base)  // null when there is no earlier snapshot
                try k.encode(added, forKey: .added)
                try k.encode(removed, forKey: .removed)
                try k.encode(modified, forKey: .modified)
                try k.encode(metadata_only, forKey: .metadata_only)
                try k.encode(files_to_sync, forKey: .files_to_sync)
                try k.encode(bytes_to_sync, forKey: .bytes_to_sync)
            }
        }
        func items(_ list: [ChangedEntry]) -> [Item] {
            list.map {
                let p = JSONPath($0.path)
                return Item(path: p.path, path_b64: p.pathB64, size: $0.size, type: $0.type.description)
            }
        }
        print(
            jsonLine(
                Output(
                    base: c.base?.hex, added: items(c.added), removed: items(c.removed), modified: items(c.modified),
                    metadata_only: items(c.metadataOnly), files_to_sync: c.filesToSync, bytes_to_sync: c.bytesToSync)))
        return
    }
    for e in c.added { print("+ \(e.displayPath)") }
    for e in c.removed { print("- \(e.displayPath)") }
    for e in c.modified { print("M \(e.displayPath)") }
    for e in c.metadataOnly { print("U \(e.displayPath)") }
    if let note { print(note) }
    print(summaryLine(c, betweenSnapshots: betweenSnapshots))
}

/// `2 added, …; 3 files (1.20 KiB) to sync` for status and watch; between two snapshots,
/// where nothing is synced, `3 files new or changed (1.20 KiB)`.
func summaryLine(_ c: ChangeSet, betweenSnapshots: Bool = false) -> String {
    let size = formatBytes(Int64(c.bytesToSync))
    return "\(c.added.count) added, \(c.removed.count) removed, \(c.modified.count) modified, "
        + "\(c.metadataOnly.count) metadata-only; "
        + (betweenSnapshots
            ? "\(c.filesToSync) files new or changed (\(size))" : "\(c.filesToSync) files (\(size)) to sync")
}

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show what changed since the last snapshot of PATHs.",
        discussion: discussion(
            "Compares PATHs with their latest snapshot from this host: + added, - removed, M modified (content), U metadata only (mode, owner, times). Without such a snapshot everything shows as added, and a line says so.",
            "--json prints one object with the arrays added, removed, modified, metadata_only (each entry {path, size, type}, plus path_b64 for names that are not UTF-8) and the totals files_to_sync and bytes_to_sync. Exit code 0; with --exit-code, 4 when something changed."
        ))

    @OptionGroup var repository: RepositoryOptions

    @OptionGroup var excludes: ExcludeOptions

    @Option(name: .long, help: "Compare with snapshots of this host (default: this machine).")
    var host: String?

    @Flag(name: .long, help: "Print one JSON object.")
    var json = false

    @Flag(name: .customLong("exit-code"), help: "Exit with 4 when there are changes.")
    var exitCode = false

    @Argument(help: "Files and directories to check.")
    var paths: [String] = []

    func validate() throws {
        if paths.isEmpty { throw ValidationError("name at least one PATH to check") }
    }

    func run() throws {
        let patterns = try excludes.patterns()
        let repo = try repository.open()
        let changes = try repo.status(
            paths: paths,
            options: StatusOptions(
                excludes: patterns.exclude, caseInsensitiveExcludes: patterns.iexclude, hostname: host))
        // Without a parent everything shows as added: say why.
        let from = host.map { "host \($0)" } ?? "this host"
        let note =
            changes.base == nil ? "no earlier snapshot of these paths from \(from); everything would be stored" : nil
        printChanges(changes, json: json, note: note)
        if exitCode && !changes.isEmpty { throw ExitCode(4) }
    }
}

struct DiffCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "diff",
        abstract: "Show the differences between two snapshots.",
        discussion: discussion(
            "Lists entries added (+), removed (-), modified (M: content or type) and changed in metadata only (U) from SNAPSHOT1 to SNAPSHOT2, then how many files SNAPSHOT2 has new or changed and their size. --json prints one object as `status --json` does."
        ))

    @OptionGroup var repository: RepositoryOptions

    @Flag(name: .long, help: "Print one JSON object.")
    var json = false

    @Argument(help: "The older snapshot (id, prefix or 'latest').")
    var snapshot1: String

    @Argument(help: "The newer snapshot (id, prefix or 'latest').")
    var snapshot2: String

    func run() throws {
        let repo = try repository.open()
        let a = try repo.findSnapshot(snapshot1)
        let b = try repo.findSnapshot(snapshot2)
        printChanges(try repo.diff(a, b), json: json, betweenSnapshots: true)
    }
}

struct WatchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "watch",
        abstract: "Check PATHs for changes periodically and offer to sync them.",
        discussion: discussion(
            "Every DURATION (--every, 24h by default) it compares PATHs with their last snapshot. When something changed it prints a summary and, on a terminal, asks \"Sync N changed files (SIZE) now? [y/N]\". On y, or with --yes, it takes a new snapshot in which only changed files are read (unchanged ones are reused from the previous snapshot, so the new snapshot is complete). Without a terminal and without --yes it only reports. Nothing changed: no snapshot. --once checks once and exits. Without PATHs it watches every repository of the device configuration file (--config, default ~/.config/cabackup/device.json, the file `cabackup ui` writes; docs/ui.md): each with its paths, its excludes (and --exclude's) and its `every` (else --every), its lines starting with [NAME]; each repository's password comes from --password-file or CABACKUP_PASSWORD (the same for all), else a prompt naming it."
        ))

    @OptionGroup var repository: RepositoryOptions

    @Option(name: .long, help: ArgumentHelp("Time between checks: 90s, 15m, 24h or 7d.", valueName: "duration"))
    var every: String = "24h"

    @Flag(name: .long, help: "Check once, then exit.")
    var once = false

    @Flag(name: [.short, .long], help: "Sync without asking.")
    var yes = false

    @OptionGroup var excludes: ExcludeOptions

    @Option(name: .long, help: "Tag new snapshots (repeatable).")
    var tag: [String] = []

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Without PATHs: the device configuration file whose repositories to watch (default: $XDG_CONFIG_HOME/cabackup/device.json).",
            valueName: "file"))
    var config: String?

    @Argument(help: "Files and directories to watch (none: every repository of the device configuration).")
    var paths: [String] = []

    func validate() throws {
        if !paths.isEmpty && config != nil {
            throw ValidationError("give PATHs to watch with --repo, or --config without PATHs, not both")
        }
        if paths.isEmpty && repository.repo != nil {
            throw ValidationError(
                "name at least one PATH to watch in --repo (without --repo and PATHs, watch reads the device configuration)"
            )
        }
        if parseDuration(every) == nil {
            throw ValidationError("--every '\(every)' is not a duration: use 90s, 15m, 24h or 7d")
        }
    }

    /// One repository watched: its paths, excludes and interval.
    struct Watched {
        let label: String
        let repo: Repository
        let paths: [String]
        let exclude: [String]
        let iexclude: [String]
        let interval: Double
        var due: Double = 0
    }

    func run() throws {
        let interval = parseDuration(every)!
        let patterns = try excludes.patterns()
        var watched: [Watched]
        if paths.isEmpty {
            let file = config.map(absolutePath) ?? DeviceConfiguration.defaultPath
            let configured = try DeviceConfiguration.load(file).repositories
            guard !configured.isEmpty else {
                throw ValidationError(
                    "nothing to watch: \(file) configures no repository (add one with 'cabackup ui', or give --repo and PATHs)"
                )
            }
            watched = try configured.map { entry in
                var source = repository.password
                source.prompt = "enter password for repository \(entry.name) (\(entry.repo)): "
                let location = StorageRegistry.canonical(entry.repo)
                let repo = try Repository.open(path: entry.repo, passwordProvider: { try source.read(for: location) })
                for warning in repo.warnings { printError("cabackup: warning: [\(entry.name)] \(warning)") }
                return Watched(
                    label: "[\(entry.name)] ", repo: repo, paths: entry.paths,
                    exclude: (entry.exclude ?? []) + patterns.exclude, iexclude: patterns.iexclude,
                    interval: entry.interval ?? interval)
            }
        } else {
            watched = [
                Watched(
                    label: "", repo: try repository.open(), paths: paths, exclude: patterns.exclude,
                    iexclude: patterns.iexclude, interval: interval)
            ]
        }
        var warned = false
        while true {
            let now = monotonicSeconds()
            for i in watched.indices where watched[i].due <= now {
                try check(watched[i], warned: &warned)
                watched[i].due = monotonicSeconds() + watched[i].interval
            }
            if once { return }
            let next = watched.map(\.due).min()! - monotonicSeconds()
            if next > 0 { usleep(UInt32(min(next, 3600) * 1e6)) }
        }
    }

    /// Checks one repository's paths and, when they changed, offers to sync them (or does,
    /// with --yes).
    func check(_ w: Watched, warned: inout Bool) throws {
        // Each check's lines reach a log or a pipe as it ends, not when a buffer fills.
        defer { fflush(nil) }
        let repo = w.repo
        try repo.synchronizeIndex()
        let changes = try repo.status(
            paths: w.paths, options: StatusOptions(excludes: w.exclude, caseInsensitiveExcludes: w.iexclude))
        let stamp = formatRFC3339(ns: Int64(Date().timeIntervalSince1970 * 1e9)).prefix(19)
        if changes.isEmpty {
            print("\(stamp) \(w.label)no changes since snapshot \(changes.base?.shortHex ?? "-")")
            return
        }
        print("\(stamp) \(w.label)\(summaryLine(changes))")
        var sync = yes
        if !yes {
            if isatty(0) == 1 {
                let question =
                    "\(w.label)Sync \(changes.filesToSync) changed files (\(formatBytes(Int64(changes.bytesToSync)))) now? [y/N] "
                FileHandle.standardOutput.write(Data(question.utf8))
                let answer = readLine()?.trimmingCharacters(in: .whitespaces).lowercased() ?? ""
                sync = answer == "y" || answer == "yes"
            } else if !warned {
                print("not syncing: no terminal to ask; pass --yes to sync unattended")
                warned = true
            }
        }
        guard sync else { return }
        let result = try repo.snapshot(
            paths: w.paths,
            options: SnapshotOptions(tags: tag, excludes: w.exclude, caseInsensitiveExcludes: w.iexclude))
        for warning in result.warnings { printError("warning: cannot read \(warning)") }
        let s = result.snapshot.summary
        print(
            "\(w.label)snapshot \(result.snapshot.id.hex) saved: \(s.filesTotal - s.filesUnchanged) files read, "
                + "\(formatBytes(s.bytesAdded)) added")
    }
}
