import ArgumentParser
import CABackup
import CABackupServer
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// `cabackup server admin …`: the operator's tools, on the server's stores directly.
struct ServerAdminCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "admin", abstract: "Manage the server's accounts (while it runs, or not).",
        discussion: discussion(
            "Works on the server's data directory (and with --storage its bucket) directly; a running server reads what is set here on every request, so a change holds at once. See docs/operations.md."
        ),
        subcommands: [
            AdminAccounts.self, AdminQuota.self, AdminDisable.self, AdminEnable.self, AdminDelete.self,
            AdminRegistration.self, AdminReconcile.self,
        ])
}

/// Where a server keeps its state besides `--data`: the options of `server run` that
/// `server admin` needs too.
struct ServerStateOptions: ParsableArguments {
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Keep the spaces' files in an S3 bucket instead of --data (credentials from AWS_*).",
            valueName: "s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]"))
    var storage: String?
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Keep the accounts in a PostgreSQL database that several instances share (password from PGPASSWORD or --database-password-file).",
            valueName: "postgresql://USER@HOST[:PORT]/DB"))
    var database: String?
    @Option(name: .long, help: "Read the database user's password from the first line of this file.")
    var databasePasswordFile: String?

    /// The database password: the file's first line, else `PGPASSWORD`, else none.
    func databasePassword() throws -> String? {
        guard let file = databasePasswordFile else { return ProcessInfo.processInfo.environment["PGPASSWORD"] }
        guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
            throw CABackupError.invalidArgument("cannot read the database password file \(file): check the path")
        }
        return String(text.split(separator: "\n", omittingEmptySubsequences: false).first ?? "")
    }

    func validate() throws {
        if databasePasswordFile != nil && database == nil {
            throw ValidationError("--database-password-file needs --database")
        }
    }
}

/// The server whose accounts `server admin` manages.
struct ServerStoreOptions: ParsableArguments {
    @Option(name: .long, help: "The server's data directory (its --data).")
    var data: String
    @OptionGroup var state: ServerStateOptions

    /// Runs `body` on the server's stores, closing them after.
    func with<T>(_ body: (ServerAdministration) async throws -> T) async throws -> T {
        let admin = try await ServerAdministration(
            dataDirectory: absolutePath(data), storage: state.storage, database: state.database,
            databasePassword: state.databasePassword())
        do {
            let result = try await body(admin)
            await admin.close()
            return result
        } catch {
            await admin.close()
            throw error
        }
    }
}

struct AdminAccounts: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "accounts", abstract: "List the accounts: devices, last activity, bytes stored, quota, state.")
    @OptionGroup var store: ServerStoreOptions
    @Flag(name: .long, help: "One JSON object per account.") var json = false

    func run() async throws {
        let accounts = try await store.with { try await $0.accounts() }
        if json {
            struct Line: Encodable {
                let name, email, created: String
                let last_activity: String?
                let devices: Int
                let used_bytes: Int64
                let quota_bytes: Int64?
                let disabled: Bool
            }
            for a in accounts {
                print(
                    jsonLine(
                        Line(
                            name: a.name, email: a.email, created: formatRFC3339(ns: a.createdNs),
                            last_activity: a.lastActivityNs.map { formatRFC3339(ns: $0) }, devices: a.devices,
                            used_bytes: a.usedBytes, quota_bytes: a.quotaBytes, disabled: a.disabled)))
            }
            return
        }
        let header = ["NAME", "E-MAIL", "CREATED", "LAST SEEN", "DEVICES", "STORED", "QUOTA", "STATE"]
        let rows = accounts.map { a in
            [
                a.name, a.email, String(formatRFC3339(ns: a.createdNs).prefix(10)),
                a.lastActivityNs.map { String(formatRFC3339(ns: $0).prefix(16)) } ?? "never", String(a.devices),
                formatBytes(a.usedBytes), a.quotaBytes.map(formatBytes) ?? "server's",
                a.disabled ? "disabled" : "active",
            ]
        }
        let widths = header.indices.map { i in ([header] + rows).map { $0[i].count }.max() ?? 0 }
        for row in [header] + rows {
            print(
                row.indices.map { i in row[i].padding(toLength: widths[i], withPad: " ", startingAt: 0) }
                    .joined(separator: "  ").trimmingCharacters(in: .whitespaces))
        }
        print("\(accounts.count) accounts")
    }
}

struct AdminQuota: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quota", abstract: "Set an account's own quota, or 'none' for the server's --quota-bytes.")
    @OptionGroup var store: ServerStoreOptions
    @Argument(help: "The account.") var user: String
    @Argument(help: "A size such as 50G or 500M, or 'none'.") var size: String

    func validate() throws {
        if size != "none", (parseSize(size) ?? 0) <= 0 {
            throw ValidationError("'\(size)' is not a size: give one such as 50G or 500M, or 'none'")
        }
    }

    func run() async throws {
        let bytes = size == "none" ? nil : parseSize(size)
        try await store.with { try await $0.setQuota(user, bytes: bytes) }
        print(bytes.map { "\(user): quota \(formatBytes($0))" } ?? "\(user): the server's quota applies")
    }
}

struct AdminDisable: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "disable", abstract: "Disable an account: its devices are refused (403) from their next request.")
    @OptionGroup var store: ServerStoreOptions
    @Argument(help: "The account.") var user: String

    func run() async throws {
        try await store.with { try await $0.setDisabled(user, true) }
        print("\(user): disabled")
    }
}

struct AdminEnable: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "enable", abstract: "Enable a disabled account again.")
    @OptionGroup var store: ServerStoreOptions
    @Argument(help: "The account.") var user: String

    func run() async throws {
        try await store.with { try await $0.setDisabled(user, false) }
        print("\(user): active")
    }
}

struct AdminDelete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete", abstract: "Delete an account with all its data (asks first).")
    @OptionGroup var store: ServerStoreOptions
    @Argument(help: "The account.") var user: String
    @Flag(name: .long, help: "Do not ask (for scripts).") var yes = false

    func run() async throws {
        try await store.with { admin in try await delete(with: admin) }
    }

    func delete(with admin: ServerAdministration) async throws {
        guard let account = try await admin.accounts().first(where: { $0.name == user }) else {
            throw CABackupError.invalidArgument(
                "there is no account named '\(user)': 'cabackup server admin accounts' lists them")
        }
        if !yes {
            guard isatty(0) == 1 else {
                throw CABackupError.invalidArgument(
                    "deleting '\(user)' needs a yes: give --yes, or run it in a terminal to be asked")
            }
            let question =
                "Delete the account '\(user)' (\(account.email)), its \(account.devices) devices and \(formatBytes(account.usedBytes)) of data? This cannot be undone. Type the account's name to confirm: "
            FileHandle.standardOutput.write(Data(question.utf8))
            guard readLine()?.trimmingCharacters(in: .whitespaces) == user else {
                print("not deleted")
                return
            }
        }
        try await admin.deleteAccount(user)
        print("\(user): deleted with \(formatBytes(account.usedBytes)) of data")
    }
}

struct AdminRegistration: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "registration", abstract: "Open or close registration of new accounts, or show which it is.")
    @OptionGroup var store: ServerStoreOptions
    @Argument(help: "open or closed (none: show it).") var state: String?

    func validate() throws {
        if let state, !["open", "closed"].contains(state) {
            throw ValidationError("'\(state)' is neither 'open' nor 'closed'")
        }
    }

    func run() async throws {
        let open = try await store.with { admin in
            if let state { try await admin.setRegistration(open: state == "open") }
            return try await admin.registrationIsOpen()
        }
        print("registration: \(open ? "open" : "closed")")
    }
}

struct AdminReconcile: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reconcile",
        abstract: "Bring the spaces' index and quota counters in line with the files stored.",
        discussion: discussion(
            "For instances sharing --database: after an instance was killed between storing a pack and recording it, its bytes count against no quota until this runs. Each space is held under its lock for its pass; a space a device is using is left alone (run again later, exit status 3). A single server does this for every space whenever it starts."
        ))
    @OptionGroup var store: ServerStoreOptions
    @Argument(help: "One account (default: all).") var user: String?

    func run() async throws {
        let done = try await store.with { try await $0.reconcile(user) }
        var busy = 0
        for r in done {
            guard r.done else {
                busy += 1
                print("\(r.user): in use (a device holds its lock): left alone, run again later")
                continue
            }
            let change = r.storedBytes - r.countedBytes
            print(
                "\(r.user): \(r.storedBytes) bytes stored, counted \(r.countedBytes) (corrected by \(change >= 0 ? "+" : "")\(change)); \(r.packsAdded) packs indexed, \(r.packsDropped) dropped"
            )
        }
        if busy > 0 { throw ExitCode(3) }
    }
}

/// `cabackup server migrate`: a single server's data directory into shared stores.
struct ServerMigrateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Move a single server's data directory into PostgreSQL and an S3 bucket.",
        discussion: discussion(
            "Copies every account (with its login and device tokens, so devices need not log in again if the address stays) into --database and every space's files into --storage, then indexes them. The source is only read; stop the server first. Run again after a failure, it finishes. See docs/operations.md."
        ))
    @Option(name: .long, help: "The single server's data directory.") var from: String
    @Option(name: .long, help: "The new instance's data directory (files pass through it).") var data: String
    @OptionGroup var state: ServerStateOptions

    func validate() throws {
        if state.storage == nil || state.database == nil {
            throw ValidationError("give --storage and --database: where the accounts and the spaces' files go")
        }
    }

    func run() async throws {
        let migration = try ServerMigration(
            from: absolutePath(from), scratch: absolutePath(data), storage: state.storage!, database: state.database!,
            databasePassword: try state.databasePassword())
        let summary = try await migration.run { print($0) }
        print(
            "moved \(summary.accounts) accounts, \(summary.tokens) device tokens, \(summary.files) files (\(formatBytes(summary.bytes)))"
        )
    }
}
