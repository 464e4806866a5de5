import ArgumentParser
import CABackup

struct RewriteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rewrite",
        abstract: "Remove files from existing snapshots (a leaked secret, a huge file).",
        discussion: discussion(
            "Each snapshot (the named ones, or every snapshot matching --host, --tag and --path; at least one is required) that holds paths matching --exclude/--iexclude (the backup rules, docs/excludes.md) is written anew without them, under a new id naming its original; the trees above them are rewritten, everything else reused. --forget removes the originals (with an authenticated forget record); then `cabackup prune --max-unused 0%` deletes every byte of the removed files once no snapshot uses them (a plain prune leaves unused bytes in packs that are mostly used). --dry-run lists what would be removed and writes nothing."
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions
    @OptionGroup var excludes: ExcludeOptions

    @Flag(name: .long, help: "Remove the original snapshots once rewritten.")
    var forget = false

    @Flag(name: [.customShort("n"), .customLong("dry-run")], help: "List what would be removed; write nothing.")
    var dryRun = false

    @Argument(help: "Snapshots to rewrite (ids, prefixes or 'latest').")
    var snapshots: [String] = []

    func validate() throws {
        if excludes.exclude.isEmpty && excludes.iexclude.isEmpty {
            throw ValidationError("say what to remove with --exclude or --iexclude")
        }
        if snapshots.isEmpty && filters.host.isEmpty && filters.tag.isEmpty && filters.path.isEmpty {
            throw ValidationError("name the snapshots to rewrite, or select them with --host, --tag or --path")
        }
    }

    func run() throws {
        let repo = try repository.open()
        var changed = 0
        for snap in try filters.select(snapshots, in: repo) {
            let r = try repo.rewrite(
                snap, excluding: excludes.exclude, caseInsensitiveExcludes: excludes.iexclude, forgetOriginal: forget,
                dryRun: dryRun)
            guard !r.removed.isEmpty else { continue }
            changed += 1
            for path in r.removed { print("\(dryRun ? "would remove" : "removed") \(path)") }
            if let new = r.rewritten {
                let fate = forget ? ", original forgotten" : ""
                print("snapshot \(snap.id.shortHex) -> \(new.id.shortHex)\(fate)")
            }
        }
        if changed == 0 {
            print("no snapshot holds a matching path")
        } else if dryRun {
            print("\(changed) snapshots would be rewritten")
        } else {
            print(
                "\(changed) snapshots rewritten"
                    + (forget ? "; run 'cabackup prune --max-unused 0%' to delete their data" : ""))
        }
    }
}
