import ArgumentParser
import CABackup

struct InitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init", abstract: "Create a new repository.", discussion: exitCodeTable)

    @OptionGroup var repository: RepositoryOptions

    func run() throws {
        let path = try repository.path()
        let repo = try Repository.initialize(path: path)
        print("created repository \(repo.config.id.prefix(8)) at \(absolutePath(path))")
    }
}

struct RepairCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "repair", abstract: "Repair derived repository data.", subcommands: [RepairIndexCommand.self])
}

struct RepairIndexCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "index", abstract: "Rebuild the SQLite index from the pack headers and snapshot records.")

    @OptionGroup var repository: RepositoryOptions

    func run() throws {
        let repo = try repository.open()
        try repo.rebuildIndex()
        let c = try repo.indexCounts()
        print("index rebuilt: \(c.packs) packs, \(c.blobs) blobs, \(c.snapshots) snapshots")
    }
}
