import ArgumentParser
import CABackup

#if canImport(Glibc)
    import Glibc
#endif

/// The exit codes, one table for `--help`, the docs and ``exitCode(for:)``.
let exitCodeTable = """
    EXIT CODES:
      0    success
      1    fatal error (nothing was saved, or a restore had failures)
      3    snapshot saved, but some entries were unreadable and skipped
      4    status --exit-code: there are changes
      10   repository does not exist
      11   repository is locked (prune beside a snapshot, or a snapshot beside prune)
      12   wrong or missing password (encrypted repository)
      13   not logged in to the server, or the server refused this device's token
      14   the server cannot be reached
      64   usage error
      130  interrupted
    """

@main
struct CABackupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cabackup",
        abstract: "Content-addressed, deduplicating backups.",
        discussion: exitCodeTable,
        version: cabackupVersion,
        subcommands: [
            InitCommand.self, SnapshotCommand.self, SnapshotsCommand.self, LsCommand.self, RestoreCommand.self,
            StatusCommand.self, DiffCommand.self, WatchCommand.self, CheckCommand.self, ForgetCommand.self,
            PruneCommand.self, RepairCommand.self, KeyCommand.self, ServerCommand.self, RegisterCommand.self,
            LoginCommand.self, LogoutCommand.self, DevicesCommand.self, RebindCommand.self, TrustCommand.self,
        ]
    )

    /// Parses, runs, and maps every error to its exit code in this one place.
    static func main() async {
        signal(SIGINT) { _ in _exit(130) }
        signal(SIGTERM) { _ in _exit(130) }
        signal(SIGPIPE, SIG_IGN)
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let error as CABackupError {
            printError("cabackup: \(error)")
            Glibc.exit(exitCode(for: error))
        } catch {
            exit(withError: error)
        }
    }

    static func exitCode(for error: CABackupError) -> Int32 {
        switch error {
        case .repositoryNotFound: return 10
        case .locked: return 11
        case .passwordRequired, .wrongPassword: return 12
        case .notLoggedIn: return 13
        case .network: return 14
        case .cancelled: return 130
        default: return 1
        }
    }
}

/// `--repo` or `CABACKUP_REPO`, and the password of an encrypted repository.
struct RepositoryOptions: ParsableArguments {
    @Option(
        name: [.short, .long],
        help: "Repository directory, or http(s)://NAME@HOST:PORT[/PREFIX] on a server (default: $CABACKUP_REPO).")
    var repo: String?

    @Option(
        name: .long,
        help:
            "Read the repository password from the first line of this file (default: $CABACKUP_PASSWORD, else a prompt)."
    )
    var passwordFile: String?

    var password: PasswordSource { PasswordSource(file: passwordFile) }

    func path() throws -> String {
        if let repo, !repo.isEmpty { return repo }
        if let env = getenv("CABACKUP_REPO"), env.pointee != 0 { return String(cString: env) }
        throw ValidationError("no repository given: pass --repo PATH or set CABACKUP_REPO")
    }

    func open() throws -> Repository {
        let path = try path()
        let location = RemoteLocation.isRemote(path) ? path : absolutePath(path)
        let repo = try Repository.open(path: path, passwordProvider: { try password.read(for: location) })
        for warning in repo.warnings { printError("cabackup: warning: \(warning)") }
        return repo
    }
}

/// `--exclude` and `--iexclude`, with restic's pattern rules (docs/excludes.md).
struct ExcludeOptions: ParsableArguments {
    @Option(
        name: [.short, .long],
        help: "Exclude paths matching a pattern such as *.log, docs/*.txt or /home/*/.cache (repeatable).")
    var exclude: [String] = []
    @Option(name: .long, help: "Like --exclude, ignoring case (repeatable).")
    var iexclude: [String] = []

    func validate() throws {
        do {
            _ = try ExcludeRules(excludes: exclude, caseInsensitiveExcludes: iexclude)
        } catch let error as CABackupError {
            throw ValidationError("\(error)")
        }
    }
}

/// `--host`, `--tag`, `--path` snapshot filters.
struct FilterOptions: ParsableArguments {
    @Option(name: .long, help: "Only snapshots from this host (repeatable).")
    var host: [String] = []
    @Option(name: .long, help: "Only snapshots with this tag (repeatable; all must match).")
    var tag: [String] = []
    @Option(name: .long, help: "Only snapshots of exactly these paths (repeatable).")
    var path: [String] = []

    var filter: SnapshotFilter { SnapshotFilter(hosts: host, tags: tag, paths: path) }
}

func printError(_ s: String) {
    let line = s + "\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
}

/// Whether stderr is a terminal (progress is shown only then).
let stderrIsTerminal = isatty(2) == 1
