import ArgumentParser
import CABackup

#if canImport(Glibc)
    import Glibc
#endif

struct InitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init", abstract: "Create a new repository.",
        discussion: discussion(
            "--repo is a new or empty local directory, or http(s)://NAME@HOST[:PORT][/PREFIX] for the space of an account on a cabackup server (see register). A local path with a colon in its first component is written ./name:x or absolute: a name like s3:… is taken for a storage cabackup does not have."
        ))

    @OptionGroup var repository: RepositoryOptions

    @Flag(name: .long, help: "Store data in the clear (local repositories you fully control only).")
    var noEncryption = false

    @Flag(
        name: .long,
        help: "Use the chunker parameters of --from-repo, so snapshots copied between the two deduplicate.")
    var copyChunkerParams = false

    @Option(name: .long, help: "The repository whose chunker parameters --copy-chunker-params copies.")
    var fromRepo: String?

    @Option(
        name: .long,
        help: "Password file of --from-repo (default: $CABACKUP_FROM_PASSWORD, else the new repository's password).")
    var fromPasswordFile: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "How new data is compressed, for the life of the repository.",
            discussion:
                "auto is zstd for a repository on a server or in S3 (fewer bytes to send and store) and lz4 in a local directory (faster). A zstd repository needs cabackup with zstd support to open it."
        ))
    var compression: CompressionChoice = .auto

    func validate() throws {
        if copyChunkerParams != (fromRepo != nil) {
            throw ValidationError("--copy-chunker-params and --from-repo go together: give both or neither")
        }
    }

    func run() throws {
        let path = try repository.path()
        let location = StorageRegistry.canonical(path)
        try Repository.checkCanInitialize(path: path)
        let password = noEncryption ? nil : try repository.password.readNew(for: location)
        var chunker: ChunkerParameters?
        if let fromRepo {
            var source = PasswordSource(file: fromPasswordFile, environmentVariable: "CABACKUP_FROM_PASSWORD")
            source.prompt = "enter password for \(fromRepo): "
            let from = try Repository.open(
                path: fromRepo,
                passwordProvider: {
                    if fromPasswordFile == nil, getenv("CABACKUP_FROM_PASSWORD") == nil, let password {
                        return password
                    }
                    return try source.read(for: absolutePath(fromRepo))
                })
            chunker = from.config.chunker
        }
        let repo = try Repository.initialize(
            path: path, password: password, chunker: chunker, kdf: kdfForNewKeys, compression: compression.codec)
        for warning in repo.warnings { printError("cabackup: warning: \(warning)") }
        let kind = repo.config.isEncrypted ? "encrypted" : "unencrypted"
        print(
            "created \(kind) repository \(repo.config.id.prefix(8)) at \(location) (compression: \(repo.config.compression.rawValue))"
        )
        if password != nil {
            print("the password cannot be recovered: without it, the data in this repository cannot be read")
        }
    }
}

/// `init --compression`: a codec, or `auto` to let the storage decide.
enum CompressionChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, zstd, lz4

    /// The codec to ask for; `nil` is the library's per-storage default.
    var codec: RepositoryCompression? {
        switch self {
        case .auto: return nil
        case .zstd: return .zstd
        case .lz4: return .lz4
        }
    }
}

struct RepairCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "repair", abstract: "Repair derived repository data.", subcommands: [RepairIndexCommand.self])
}

struct RepairIndexCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "index", abstract: "Rebuild the SQLite index from the pack headers and snapshot records.",
        discussion: discussion())

    @OptionGroup var repository: RepositoryOptions

    func run() throws {
        let repo = try repository.open()
        try repo.rebuildIndex()
        let c = try repo.indexCounts()
        print("index rebuilt: \(c.packs) packs, \(c.blobs) blobs, \(c.snapshots) snapshots")
    }
}

struct TrustCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trust",
        abstract: "Accept a repository's new config after re-creating the repository at the same location.",
        discussion: discussion(
            "Each device remembers the config of every repository it opens and refuses one that changed (a storage that serves another config may be hostile). When you re-created the repository yourself, this opens it with its password, checks the new config as any open does, and remembers it."
        ))

    @OptionGroup var repository: RepositoryOptions

    func run() throws {
        let path = try repository.path()
        let location = StorageRegistry.canonical(path)
        let repo = try Repository.trustNewConfig(
            path: path, passwordProvider: { try repository.password.read(for: location) })
        let kind = repo.config.isEncrypted ? "encrypted" : "unencrypted"
        print("trusting the config of \(kind) repository \(repo.config.id.prefix(8)) at \(location)")
    }
}
