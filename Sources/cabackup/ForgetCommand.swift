import ArgumentParser
import CABackup
import Foundation

struct ForgetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "forget",
        abstract: "Remove snapshots, by id or by a keep policy; --prune also frees their data.",
        discussion: discussion(
            "Either name SNAPSHOTs, or give a policy (restic's). Snapshots are first grouped by --group-by (host and path set unless told otherwise); the policy applies to each group on its own, and a snapshot any rule keeps is kept.",
            "--keep-hourly N keeps the newest snapshot of each of the last N hours that have snapshots (local time); likewise --keep-daily, --keep-weekly (ISO weeks), --keep-monthly and --keep-yearly. 'unlimited' keeps one of every bucket. A rule with buckets left over also keeps the oldest snapshot.",
            "--keep-within D keeps all made less than D (e.g. 1y5m7d2h: years, months, days, hours) before the group's newest snapshot; snapshots dated in the future are kept and never count as the newest. --keep-tag a,b keeps all that have both tags a and b (repeatable: any of the lists); '' keeps untagged snapshots.",
            "Each kept snapshot is listed with the rules that keep it, under its group when there are several. If a group would lose all its snapshots, forget fails and removes nothing: forget those by id. Forgetting removes only the snapshot record; --prune (or `cabackup prune`) then removes the data nothing else uses. --dry-run shows what would happen and changes nothing.",
            "--json prints one JSON array (as restic does): an object per group with host, paths and tags (null when not grouped by them), keep and remove (snapshots as `snapshots --json` prints them) and reasons ({snapshot, matches} for each kept one); with --prune, prune's JSON summary follows on a line of its own. -q prints only the number of snapshots removed."
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions
    @OptionGroup var verbosity: VerbosityOptions

    @Option(name: .customLong("keep-last"), help: keepHelp("the newest N snapshots"))
    var keepLast: String?
    @Option(name: .customLong("keep-hourly"), help: keepHelp("the newest snapshot of each of the last N hours"))
    var keepHourly: String?
    @Option(name: .customLong("keep-daily"), help: keepHelp("the newest snapshot of each of the last N days"))
    var keepDaily: String?
    @Option(name: .customLong("keep-weekly"), help: keepHelp("the newest snapshot of each of the last N ISO weeks"))
    var keepWeekly: String?
    @Option(name: .customLong("keep-monthly"), help: keepHelp("the newest snapshot of each of the last N months"))
    var keepMonthly: String?
    @Option(name: .customLong("keep-yearly"), help: keepHelp("the newest snapshot of each of the last N years"))
    var keepYearly: String?

    @Option(
        name: .customLong("keep-within"),
        help: ArgumentHelp(
            "Keep every snapshot made within DURATION (e.g. 1y5m7d2h) of the group's newest.",
            valueName: "duration"))
    var keepWithin: String?

    @Option(
        name: .customLong("keep-tag"),
        help: ArgumentHelp(
            "Keep every snapshot that has all these comma-separated tags (repeatable: any list).",
            valueName: "tags"))
    var keepTag: [String] = []

    @Option(
        name: .customLong("group-by"),
        help: ArgumentHelp(
            "Apply the policy per group of snapshots sharing these (any of host,paths,tags; '' for one group).",
            valueName: "fields"))
    var groupBy = SnapshotGrouping.default.description

    @Flag(name: .long, help: "Also remove data no remaining snapshot uses.")
    var prune = false

    @Flag(name: .customLong("dry-run"), help: "Show what would be removed; change nothing.")
    var dryRun = false

    @Flag(name: .long, help: "Print what is kept and removed as one JSON array.")
    var json = false

    @Argument(help: "Snapshots to forget (ids or prefixes).")
    var snapshots: [String] = []

    static func keepHelp(_ what: String) -> ArgumentHelp {
        ArgumentHelp("Keep \(what) ('unlimited': no limit).", valueName: "n")
    }

    /// The policy the options give; a ValidationError names a malformed value.
    func policy() throws -> ForgetPolicy {
        func count(_ value: String?, _ option: String) throws -> Int? {
            guard let value else { return nil }
            if value == "unlimited" { return ForgetPolicy.unlimited }
            guard let n = Int(value), n >= 0 else {
                throw ValidationError("\(option) '\(value)' is not a count: use 0 or more, or 'unlimited' (e.g. 7)")
            }
            return n
        }
        var within: KeepDuration?
        if let keepWithin {
            guard let d = KeepDuration(keepWithin) else {
                throw ValidationError(
                    "--keep-within '\(keepWithin)' is not a duration: use numbers with units y, m, d, h (e.g. 1y5m7d2h)"
                )
            }
            within = d
        }
        return ForgetPolicy(
            last: try count(keepLast, "--keep-last"), hourly: try count(keepHourly, "--keep-hourly"),
            daily: try count(keepDaily, "--keep-daily"), weekly: try count(keepWeekly, "--keep-weekly"),
            monthly: try count(keepMonthly, "--keep-monthly"), yearly: try count(keepYearly, "--keep-yearly"),
            within: within, tags: keepTag.map(Self.tagList))
    }

    /// `a, b` → `["a", "b"]` (restic's tag list); `''` → `[]`, which matches untagged snapshots.
    static func tagList(_ value: String) -> [String] {
        value.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    func grouping() throws -> SnapshotGrouping {
        guard let g = SnapshotGrouping(parsing: groupBy) else {
            throw ValidationError(
                "--group-by '\(groupBy)' is not a grouping: use any of host,paths,tags (e.g. host,tags)")
        }
        return g
    }

    func validate() throws {
        let policy = try policy()
        _ = try grouping()
        let hasKeep =
            [keepLast, keepHourly, keepDaily, keepWeekly, keepMonthly, keepYearly, keepWithin]
            .contains { $0 != nil } || !keepTag.isEmpty
        if snapshots.isEmpty && policy.isEmpty {
            throw ValidationError("name SNAPSHOTs to forget or give a policy such as --keep-last 7")
        }
        if !snapshots.isEmpty && hasKeep {
            throw ValidationError("give either SNAPSHOTs or a --keep-* policy, not both")
        }
    }

    /// One group of `--json`, restic's fields.
    struct JSONGroup: Encodable {
        struct Reason: Encodable {
            let snapshot: SnapshotsCommand.Item
            let matches: [String]
        }
        let host: String?
        let paths: [String]?
        let tags: [String]?
        let keep: [SnapshotsCommand.Item]
        let remove: [SnapshotsCommand.Item]
        let reasons: [Reason]

        func encode(to encoder: any Encoder) throws {
            enum K: String, CodingKey { case host, paths, tags, keep, remove, reasons }
            var c = encoder.container(keyedBy: K.self)
            try c.encode(host, forKey: .host)  // null when not grouped by it
            try c.encode(paths, forKey: .paths)
            try c.encode(tags, forKey: .tags)
            try c.encode(keep, forKey: .keep)
            try c.encode(remove, forKey: .remove)
            try c.encode(reasons, forKey: .reasons)
        }
    }

    func run() throws {
        let repo = try repository.open()
        let remove: [Snapshot]
        var groups: [JSONGroup] = []
        let listing = !json && verbosity.level > 0
        if snapshots.isEmpty {
            let plan = try repo.forgetPlan(policy(), matching: filters.filter, groupBy: grouping())
            if let emptied = plan.groups.first(where: { $0.kept.isEmpty }) {
                throw CABackupError.invalidArgument(
                    "refusing to remove every snapshot of \(emptied): no --keep-* rule keeps any of them; "
                        + "forget them by id to remove them all")
            }
            for group in plan.groups {
                groups.append(
                    JSONGroup(
                        host: group.hostname, paths: group.paths, tags: group.tags,
                        keep: group.kept.map { SnapshotsCommand.Item($0.snapshot) },
                        remove: group.remove.map(SnapshotsCommand.Item.init),
                        reasons: group.kept.map {
                            JSONGroup.Reason(
                                snapshot: SnapshotsCommand.Item($0.snapshot), matches: $0.reasons.map(\.description))
                        }))
                guard listing else { continue }
                if plan.groups.count > 1 { print("snapshots for \(group):") }
                for k in group.kept {
                    print(line("keep  ", k.snapshot) + "  (\(k.reasons.map(\.description).joined(separator: ", ")))")
                }
                for s in group.remove { print(line("remove", s)) }
            }
            remove = plan.remove
        } else {
            remove = try snapshots.map { try repo.findSnapshot($0, matching: filters.filter) }
            groups = [
                JSONGroup(
                    host: nil, paths: nil, tags: nil, keep: [], remove: remove.map(SnapshotsCommand.Item.init),
                    reasons: [])
            ]
            if listing { for s in remove { print(line("remove", s)) } }
        }
        if !dryRun { try repo.forget(remove) }
        if json {
            print(jsonLine(groups))
            fflush(nil)  // prune's line is written directly, after this one
        } else if dryRun {
            print("dry run: \(remove.count) snapshots would be removed")
        } else {
            print("\(remove.count) snapshots removed")
        }
        // A dry run removed nothing: prune is told which snapshots to treat as gone.
        if prune {
            try runPrune(
                repo, dryRun: dryRun, assumingForgotten: dryRun ? Set(remove.map(\.id)) : [], json: json,
                quiet: verbosity.level == 0)
        }
    }

    private func line(_ verb: String, _ s: Snapshot) -> String {
        "\(verb) \(s.id.shortHex)  \(s.time.prefix(19))  \(s.paths.joined(separator: ", "))"
    }
}

struct PruneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prune",
        abstract: "Remove data no snapshot uses, repacking mostly-empty packs.",
        discussion: discussion(
            "Walks every snapshot, deletes packs nothing uses, and copies the used blobs out of packs that are mostly unused (verifying each) before deleting them. New packs are durable before old ones go, so an interruption loses nothing. Prune cannot run while a snapshot runs (exit code 11), and a snapshot cannot start while prune runs.",
            "--json prints one JSON object with message_type summary: dry_run, packs_deleted, packs_repacked, packs_written, blobs_removed, bytes_freed, packs_partly_used, bytes_unused_kept, temporary_files_removed."
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var verbosity: VerbosityOptions

    @Flag(name: .customLong("dry-run"), help: "Show what would be removed; change nothing.")
    var dryRun = false

    @Flag(name: .long, help: "Print the result as one JSON object.")
    var json = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Repack a pack once more than this share of its bytes is unused: 0% repacks every pack holding unused data (all of a removed file's bytes go), 'unlimited' only deletes packs nothing uses.",
            valueName: "N%"))
    var maxUnused: String = "20%"

    /// The used share below which a pack is repacked.
    var repackBelow: Double? {
        if maxUnused == "unlimited" { return 0 }
        guard maxUnused.hasSuffix("%"), let n = Double(maxUnused.dropLast()), n >= 0, n < 100 else { return nil }
        return 1 - n / 100
    }

    func validate() throws {
        if repackBelow == nil {
            throw ValidationError("--max-unused takes a percentage from 0% to 99%, or unlimited, not '\(maxUnused)'")
        }
    }

    func run() throws {
        try runPrune(
            try repository.open(), dryRun: dryRun, json: json, quiet: verbosity.level == 0,
            repackBelow: repackBelow ?? 0.8)
    }
}

/// `prune --json`'s summary.
struct PruneSummary: Encodable {
    let dry_run: Bool
    let packs_deleted: Int
    let packs_repacked: Int
    let packs_written: Int
    let blobs_removed: Int
    let bytes_freed: Int64
    let packs_partly_used: Int
    let bytes_unused_kept: Int64
    let temporary_files_removed: Int
}

func runPrune(
    _ repo: Repository, dryRun: Bool, assumingForgotten: Set<SnapshotID> = [], json: Bool = false, quiet: Bool = false,
    repackBelow: Double = 0.8
) throws {
    let r = try repo.prune(dryRun: dryRun, repackBelow: repackBelow, assumingForgotten: assumingForgotten)
    if json {
        JSONMessages.emit(
            "summary",
            PruneSummary(
                dry_run: dryRun, packs_deleted: r.packsDeleted, packs_repacked: r.packsRepacked,
                packs_written: r.packsWritten, blobs_removed: r.blobsRemoved, bytes_freed: r.bytesFreed,
                packs_partly_used: r.packsPartlyUsed, bytes_unused_kept: r.bytesUnusedKept,
                temporary_files_removed: r.temporaryFilesRemoved))
        return
    }
    let (delete, repack, free) =
        dryRun ? ("would delete", "would repack", "would be freed") : ("deleted", "repacked", "freed")
    var line =
        "prune: \(delete) \(r.packsDeleted) unused packs, \(repack) \(r.packsRepacked) (\(r.packsWritten) new), "
        + "\(r.blobsRemoved) unused blobs, \(formatBytes(r.bytesFreed)) \(free)"
    if r.packsPartlyUsed > 0 {
        line += "; \(formatBytes(r.bytesUnusedKept)) unused left in \(r.packsPartlyUsed) partly used packs"
    }
    print(line)
    if r.temporaryFilesRemoved > 0 && !quiet { print("removed \(r.temporaryFilesRemoved) leftover temporary files") }
}
