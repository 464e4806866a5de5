import ArgumentParser
import CABackup
import CABackupRemote
import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The exit codes, one table for the main `--help` (README.md lists the same codes) and
/// ``exitCode(for:)``. Each line fits 80 columns, so it is never wrapped.
let exitCodeTable = """
    EXIT CODES:
      0    success
      1    fatal error (nothing was saved, or a restore had failures)
      3    snapshot saved, but some entries were unreadable and skipped
      4    status --exit-code: there are changes
      10   repository does not exist, or --repo is not a repository
      11   repository is locked (prune and snapshot cannot run at once)
      12   wrong or missing password (encrypted repository)
      13   not logged in to the server, or the server refused this device's token
      14   the server cannot be reached
      64   usage error
      130  interrupted
    """

/// What every subcommand's `--help` says of exit codes instead of repeating the table.
let exitCodesNote = "Exit codes: see cabackup --help."

/// A subcommand's discussion: its paragraphs, each one line (ArgumentParser wraps them to
/// the terminal), then ``exitCodesNote``.
func discussion(_ paragraphs: String...) -> String {
    (paragraphs + [exitCodesNote]).joined(separator: "\n\n")
}

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
            PruneCommand.self, StatsCommand.self, TagCommand.self, DumpCommand.self, FindCommand.self,
            RewriteCommand.self, CopyCommand.self, MountCommand.self, UICommand.self,
            RepairCommand.self,
            KeyCommand.self,
            ServerCommand.self,
            RegisterCommand.self,
            LoginCommand.self, LogoutCommand.self, DevicesCommand.self, RebindCommand.self, TrustCommand.self,
        ]
    )

    /// Parses, runs, and maps every error to its exit code in this one place.
    static func main() async {
        Interrupt.install()
        signal(SIGPIPE, SIG_IGN)
        CABackupRemote.register()
        // A command waiting out a network outage says so, at most every 10 s.
        let lastWait = Mutex<Double>(-100)
        NetworkWaits.onWait { message in
            let now = ProcessInfo.processInfo.systemUptime  // monotonic
            let due = lastWait.withLock { last in
                guard now - last >= 10 else { return false }
                last = now
                return true
            }
            if due { printError("cabackup: \(message)") }
        }
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
            exitForUsage(error)
        }
    }

    static func exitCode(for error: CABackupError) -> Int32 {
        switch error {
        case .repositoryNotFound, .notARepository: return 10
        case .unsupportedLocation: return 64
        case .locked: return 11
        case .passwordRequired, .wrongPassword: return 12
        case .notLoggedIn: return 13
        case .network: return 14
        case .cancelled: return 130
        default: return 1
        }
    }

    /// Exits 64 for an unknown command, and shows a usage error thrown by a subcommand's
    /// `run()` with that subcommand's usage (ArgumentParser would show the root's); other
    /// errors go to `exit(withError:)`.
    static func exitForUsage(_ error: any Error) -> Never {
        let arguments = Array(CommandLine.arguments.dropFirst())
        if let message = unknownCommandMessage(arguments) {
            printError(message)
            Glibc.exit(64)
        }
        if let validation = error as? ValidationError, let command = try? parseAsRoot(arguments),
            type(of: command) != Self.self
        {
            let type = type(of: command)
            printError(
                "Error: \(validation.message)\nUsage: \(usageString(for: type))\n"
                    + "  See '\(commandPath(to: type).joined(separator: " ")) --help' for more information.")
            Glibc.exit(64)
        }
        exit(withError: error)
    }

    /// The names from the root to `command`: `["cabackup", "key", "add"]`.
    static func commandPath(to command: any ParsableCommand.Type) -> [String] {
        func search(_ node: any ParsableCommand.Type, _ path: [String]) -> [String]? {
            let here = path + [node.configuration.commandName ?? ""]
            if node == command { return here }
            return node.configuration.subcommands.lazy.compactMap { search($0, here) }.first
        }
        return search(Self.self, []) ?? ["cabackup"]
    }

    /// The message for a word where a command is expected that names none (`cabackup
    /// snapshott`, `cabackup key lst`), with the nearest command when one is close; nil
    /// when the arguments name commands all the way down.
    static func unknownCommandMessage(_ arguments: [String]) -> String? {
        var command: any ParsableCommand.Type = Self.self
        var path = ["cabackup"]
        for word in arguments {
            let subcommands = command.configuration.subcommands
            guard !subcommands.isEmpty, !word.hasPrefix("-"), word != "help" else { return nil }
            if let next = subcommands.first(where: { commandNames($0).contains(word) }) {
                command = next
                path.append(next.configuration.commandName ?? word)
                continue
            }
            let candidates = subcommands.compactMap { $0.configuration.commandName }
            let see = "(see \(path.joined(separator: " ")) --help)"
            if let near = nearest(word, among: candidates) {
                return "\(path.joined(separator: " ")): unknown command '\(word)': did you mean '\(near)'? \(see)"
            }
            return "\(path.joined(separator: " ")): unknown command '\(word)' \(see)"
        }
        return nil
    }

    private static func commandNames(_ command: any ParsableCommand.Type) -> [String] {
        [command.configuration.commandName].compactMap { $0 } + command.configuration.aliases
    }
}

/// The candidate closest to `word`: at most two edits away (fewer than `word` has
/// characters), or starting with it; the first of equally close ones.
func nearest(_ word: String, among candidates: [String]) -> String? {
    func distance(_ a: [Character], _ b: [Character]) -> Int {
        var row = Array(0...b.count)
        for (i, x) in a.enumerated() {
            var diagonal = row[0]
            row[0] = i + 1
            for (j, y) in b.enumerated() {
                let next = min(diagonal + (x == y ? 0 : 1), row[j + 1] + 1, row[j] + 1)
                diagonal = row[j + 1]
                row[j + 1] = next
            }
        }
        return row[b.count]
    }
    let scored = candidates.map { c -> (String, Int) in
        let d = distance(Array(word), Array(c))
        return (c, word.count >= 3 && c.hasPrefix(word) ? min(d, 2) : d)
    }
    guard let best = scored.min(by: { $0.1 < $1.1 }), best.1 <= 2, best.1 < word.count else { return nil }
    return best.0
}

/// `--repo` or `CABACKUP_REPO`, and the password of an encrypted repository.
struct RepositoryOptions: ParsableArguments {
    @Option(
        name: [.short, .long],
        help:
            "Repository directory, http(s)://NAME@HOST:PORT[/PREFIX] on a server, or s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX] (default: $CABACKUP_REPO)."
    )
    var repo: String?

    @Option(
        name: .long,
        help:
            "Read the repository password from the first line of this file (default: $CABACKUP_PASSWORD, else a prompt)."
    )
    var passwordFile: String?

    @Option(
        name: [.customShort("o"), .long],
        help: "Set a storage option KEY=VALUE (repeatable): s3.bucket-lookup=auto|dns|path.")
    var option: [String] = []

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Keep at most SIZE of tree packs in this device's cache for a repository not on a local disk (default 1G; 0 keeps none).",
            valueName: "SIZE"))
    var cacheSize: String?

    @Flag(name: .long, help: "Keep no cache for this repository (like --cache-size 0).")
    var noCache = false

    var password: PasswordSource { PasswordSource(file: passwordFile) }

    func validate() throws {
        if let cacheSize, parseSize(cacheSize) == nil {
            throw ValidationError("--cache-size takes a size such as 512M, 2G or 0, not '\(cacheSize)'")
        }
        for o in option {
            guard let eq = o.firstIndex(of: "="), eq != o.startIndex else {
                throw ValidationError("-o takes KEY=VALUE, not '\(o)'")
            }
            do {
                try StorageRegistry.setOption(String(o[..<eq]), String(o[o.index(after: eq)...]))
            } catch let error as CABackupError {
                throw ValidationError("\(error)")
            }
        }
    }

    func path() throws -> String {
        if let repo, !repo.isEmpty { return repo }
        if let env = getenv("CABACKUP_REPO"), env.pointee != 0 { return String(cString: env) }
        throw ValidationError("no repository given: pass --repo PATH or set CABACKUP_REPO")
    }

    func open() throws -> Repository {
        let path = try path()
        let location = StorageRegistry.canonical(path)
        let repo = try Repository.open(path: path, passwordProvider: { try password.read(for: location) })
        for warning in repo.warnings { printError("cabackup: warning: \(warning)") }
        if noCache {
            repo.cacheLimit = 0
        } else if let size = cacheSize.flatMap(parseSize) {
            repo.cacheLimit = size
        }
        return repo
    }
}

/// `--exclude` and `--iexclude`, with restic's pattern rules (docs/excludes.md), and the
/// files `--exclude-file` and `--iexclude-file` that hold more of them.
struct ExcludeOptions: ParsableArguments {
    @Option(
        name: [.short, .long],
        help: "Exclude paths matching a pattern such as *.log, docs/*.txt or /home/*/.cache (repeatable).")
    var exclude: [String] = []
    @Option(name: .long, help: "Like --exclude, ignoring case (repeatable).")
    var iexclude: [String] = []
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Read --exclude patterns from FILE, one per line; blank lines and lines starting with # are ignored (repeatable).",
            valueName: "FILE"))
    var excludeFile: [String] = []
    @Option(
        name: .long,
        help: ArgumentHelp("Like --exclude-file, for --iexclude patterns (repeatable).", valueName: "FILE"))
    var iexcludeFile: [String] = []

    func validate() throws {
        do {
            let p = try patterns()
            _ = try ExcludeRules(excludes: p.exclude, caseInsensitiveExcludes: p.iexclude)
        } catch let error as CABackupError {
            throw ValidationError("\(error)")
        }
    }

    /// The patterns of the options and of the files they name, in that order.
    func patterns() throws -> (exclude: [String], iexclude: [String]) {
        func read(_ files: [String], _ option: String) throws -> [String] {
            try files.flatMap { file in
                do {
                    return try ListFile.patterns(file)
                } catch CABackupError.unreadableSource(_, let reason) {
                    throw CABackupError.invalidArgument("\(option): cannot read \(file): \(reason)")
                }
            }
        }
        return (
            exclude + (try read(excludeFile, "--exclude-file")), iexclude + (try read(iexcludeFile, "--iexclude-file"))
        )
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

    /// The snapshots named by `references` (ids, prefixes, `latest`), each once, or with
    /// none every snapshot matching the filters.
    func select(_ references: [String], in repo: Repository) throws -> [Snapshot] {
        guard !references.isEmpty else { return try repo.snapshots(matching: filter) }
        var seen = Set<SnapshotID>()
        return try references.map { try repo.findSnapshot($0, matching: filter) }.filter { seen.insert($0.id).inserted }
    }
}

func printError(_ s: String) {
    let line = s + "\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
}

/// Whether stderr is a terminal (progress is shown only then).
let stderrIsTerminal = isatty(2) == 1

/// A size such as `512M`, `2G`, `1.5GiB` or `0` in bytes (K, M, G, T are powers of 1024;
/// a trailing `B` or `iB` is allowed), or nil.
func parseSize(_ text: String) -> Int64? {
    var s = text.trimmingCharacters(in: .whitespaces).uppercased()
    if s.hasSuffix("IB") { s.removeLast(2) } else if s.hasSuffix("B") { s.removeLast() }
    var factor: Double = 1
    if let last = s.last, let k = "KMGT".firstIndex(of: last) {
        factor = pow(1024, Double("KMGT".distance(from: "KMGT".startIndex, to: k) + 1))
        s.removeLast()
    }
    guard let n = Double(s), n >= 0, n * factor < 9e18 else { return nil }
    return Int64(n * factor)
}
