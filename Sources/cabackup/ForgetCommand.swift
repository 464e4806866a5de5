import ArgumentParser
import CABackup

struct ForgetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "forget",
        abstract: "Remove snapshots, by id or by a keep policy; --prune also frees their data.",
        discussion: """
            Either name SNAPSHOTs, or give a policy: --keep-last N keeps the newest N;
            --keep-daily/--keep-weekly/--keep-monthly N keep the newest snapshot of each of the
            last N days/ISO weeks/months that have snapshots. Policies apply per host and path
            set; a snapshot any rule keeps is kept. Forgetting removes only the snapshot record;
            --prune (or `cabackup prune`) then removes the data nothing else uses.
            --dry-run shows what would happen and changes nothing.

            \(exitCodeTable)
            """)

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions

    @Option(name: .customLong("keep-last")) var keepLast: Int?
    @Option(name: .customLong("keep-daily")) var keepDaily: Int?
    @Option(name: .customLong("keep-weekly")) var keepWeekly: Int?
    @Option(name: .customLong("keep-monthly")) var keepMonthly: Int?

    @Flag(name: .long, help: "Also remove data no remaining snapshot uses.")
    var prune = false

    @Flag(name: .customLong("dry-run"), help: "Show what would be removed; change nothing.")
    var dryRun = false

    @Argument(help: "Snapshots to forget (ids or prefixes).")
    var snapshots: [String] = []

    var policy: ForgetPolicy {
        ForgetPolicy(last: keepLast, daily: keepDaily, weekly: keepWeekly, monthly: keepMonthly)
    }

    func validate() throws {
        if snapshots.isEmpty && policy.isEmpty {
            throw ValidationError("name SNAPSHOTs to forget or give a policy such as --keep-last 7")
        }
        if !snapshots.isEmpty && !policy.isEmpty {
            throw ValidationError("give either SNAPSHOTs or a --keep-* policy, not both")
        }
        for n in [keepLast, keepDaily, keepWeekly, keepMonthly].compactMap({ $0 }) where n < 0 {
            throw ValidationError("--keep-* values must be 0 or more")
        }
    }

    func run() throws {
        let repo = try repository.open()
        let remove: [Snapshot]
        if snapshots.isEmpty {
            let plan = try repo.forgetPlan(policy, matching: filters.filter)
            for s in plan.keep {
                print("keep   \(s.id.shortHex)  \(s.time.prefix(19))  \(s.paths.joined(separator: ", "))")
            }
            remove = plan.remove
        } else {
            remove = try snapshots.map { try repo.findSnapshot($0, matching: filters.filter) }
        }
        for s in remove { print("remove \(s.id.shortHex)  \(s.time.prefix(19))  \(s.paths.joined(separator: ", "))") }
        if dryRun {
            print("dry run: \(remove.count) snapshots would be removed")
        } else {
            try repo.forget(remove)
            print("\(remove.count) snapshots removed")
        }
        if prune { try runPrune(repo, dryRun: dryRun) }
    }
}

struct PruneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prune",
        abstract: "Remove data no snapshot uses, repacking mostly-empty packs.",
        discussion: """
            Walks every snapshot, deletes packs nothing uses, and copies the used blobs out of
            packs that are mostly unused (verifying each) before deleting them. New packs are
            durable before old ones go, so an interruption loses nothing. Prune cannot run
            while a snapshot runs (exit code 11), and a snapshot cannot start while prune runs.

            \(exitCodeTable)
            """)

    @OptionGroup var repository: RepositoryOptions

    @Flag(name: .customLong("dry-run"), help: "Show what would be removed; change nothing.")
    var dryRun = false

    func run() throws {
        try runPrune(try repository.open(), dryRun: dryRun)
    }
}

func runPrune(_ repo: Repository, dryRun: Bool) throws {
    let r = try repo.prune(dryRun: dryRun)
    let verb = dryRun ? "would delete" : "deleted"
    print(
        "prune: \(verb) \(r.packsDeleted) unused packs, repacked \(r.packsRepacked) (\(r.packsWritten) new), "
            + "\(r.blobsRemoved) unused blobs, \(formatBytes(r.bytesFreed)) freed")
    if r.temporaryFilesRemoved > 0 { print("removed \(r.temporaryFilesRemoved) leftover temporary files") }
}
