import ArgumentParser
import CABackup

struct TagCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tag",
        abstract: "Add, remove or set the tags of snapshots.",
        discussion: discussion(
            "Changes the tags of the named snapshots, or without SNAPSHOT of every snapshot matching --host, --tag and --path (at least one filter or snapshot is required). A snapshot whose tags change gets a new id: its record is written anew, naming the original, and the old record is removed with an authenticated forget record, so other devices do not mistake it for a rollback. Prints one line per changed snapshot, old id -> new id."
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions

    @Option(name: .customLong("add"), help: "Add this tag (repeatable; a,b adds both).")
    var add: [String] = []

    @Option(name: .customLong("remove"), help: "Remove this tag (repeatable; a,b removes both).")
    var remove: [String] = []

    @Option(name: .customLong("set"), help: "Replace the tags with these (repeatable; --set '' removes all).")
    var set: [String] = []

    @Argument(help: "Snapshots to change (ids, prefixes or 'latest').")
    var snapshots: [String] = []

    func validate() throws {
        if add.isEmpty && remove.isEmpty && set.isEmpty {
            throw ValidationError("say what to change: --add, --remove or --set")
        }
        if !set.isEmpty && (!add.isEmpty || !remove.isEmpty) {
            throw ValidationError("--set replaces the tags: use it without --add and --remove")
        }
        if snapshots.isEmpty && filters.host.isEmpty && filters.tag.isEmpty && filters.path.isEmpty {
            throw ValidationError("name the snapshots to change, or select them with --host, --tag or --path")
        }
    }

    /// `a,b` → `a`, `b` (restic's comma lists); empty parts dropped.
    private func split(_ values: [String]) -> [String] {
        values.flatMap { $0.split(separator: ",").map(String.init) }
    }

    func run() throws {
        let repo = try repository.open()
        let selected = try filters.select(snapshots, in: repo)
        let change = TagChange(add: split(add), remove: split(remove), set: set.isEmpty ? nil : split(set))
        let changed = try repo.changeTags(selected, change)
        for (old, new) in changed {
            let tags = new.tags.isEmpty ? "no tags" : "tags " + new.tags.joined(separator: ",")
            print("snapshot \(old.id.shortHex) -> \(new.id.shortHex): \(tags)")
        }
        print(changed.isEmpty ? "no snapshot changed" : "\(changed.count) snapshots changed")
    }
}
