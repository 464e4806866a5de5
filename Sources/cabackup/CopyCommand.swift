import ArgumentParser
import CABackup

struct CopyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "copy",
        abstract: "Copy snapshots from another repository into this one (a second copy of your backups).",
        discussion: discussion(
            "Copies the named snapshots of --from-repo, or every one matching --host, --tag and --path, into --repo: any two repositories (local, server space, S3). Ids are keyed per repository, so the first copy reads all the data and rewrites the trees; a map of ids in this device's cache then makes the next copy read only what is new, and a snapshot copied before is skipped. With repositories made with `init --copy-chunker-params`, chunk boundaries match, so data the destination has is not stored twice. The source's password: --from-password-file, else CABACKUP_FROM_PASSWORD, else a prompt."
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions

    @Option(name: .long, help: "The repository to copy from (local path, server space or s3: location).")
    var fromRepo: String

    @Option(name: .long, help: "Read the source repository's password from the first line of this file.")
    var fromPasswordFile: String?

    @Argument(help: "Snapshots of the source to copy (ids, prefixes or 'latest'; default: all).")
    var snapshots: [String] = []

    func run() throws {
        let sourcePassword = PasswordSource(
            file: fromPasswordFile, environmentVariable: "CABACKUP_FROM_PASSWORD",
            prompt: "enter password for the source repository: ")
        let location = StorageRegistry.canonical(fromRepo)
        let source = try Repository.open(path: fromRepo, passwordProvider: { try sourcePassword.read(for: location) })
        let destination = try repository.open()
        let selected = try filters.select(snapshots, in: source)
        let r = try destination.copy(selected, from: source)
        print(
            "copied \(r.snapshotsCopied) snapshots (\(r.snapshotsSkipped) copied before), read \(r.blobsRead) blobs "
                + "(\(formatBytes(r.bytesRead))) from the source, \(formatBytes(r.bytesAdded)) added")
    }
}
