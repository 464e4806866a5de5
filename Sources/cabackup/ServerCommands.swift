import ArgumentParser
import CABackup
import CABackupRemote
import CABackupServer
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// `cabackup server`: runs the server (`server run`, the default), or manages it.
struct ServerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "server", abstract: "Run the private-data-space server, or manage its accounts.",
        discussion: discussion(
            "'cabackup server --data DIR [options]' runs it (the same as 'cabackup server run'; its options: 'cabackup server run --help'); 'cabackup server admin' manages its accounts. Running it: docs/operations.md."
        ),
        subcommands: [ServerRunCommand.self, ServerAdminCommand.self, ServerMigrateCommand.self],
        defaultSubcommand: ServerRunCommand.self)
}

struct ServerRunCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "Run the private-data-space server.",
        discussion: discussion(
            "Hosts one encrypted repository (a private data space) per registered user in the --data directory. Devices register and log in with 'cabackup register' and 'cabackup login', then use --repo http://NAME@HOST:PORT. The API is documented in docs/http-api.md; running it in docs/operations.md."
        ))

    @Option(name: .long, help: "Address and port to listen on (port 0: any free port).")
    var listen = "127.0.0.1:8443"
    @Option(name: .long, help: "Directory for accounts and spaces (created if missing).")
    var data: String
    @OptionGroup var state: ServerStateOptions
    @Option(name: .long, help: "PEM certificate chain: serve HTTPS (with --tls-key).")
    var tlsCert: String?
    @Option(name: .long, help: "PEM private key of --tls-cert.")
    var tlsKey: String?
    @Option(name: .long, help: "Bytes each user's space may hold (default: no limit).")
    var quotaBytes: Int64?
    @Option(name: .long, help: ArgumentHelp("Seconds a device token stays valid.", visibility: .hidden))
    var tokenLifetime: Int64 = 365 * 24 * 3600
    @Option(name: .long, help: "Seconds a connection may send and receive nothing before it is closed.")
    var idleTimeout: Int64 = 30
    @Option(name: .long, help: "Connections served at once (more wait to be accepted).")
    var maxConnections = 1000
    @Option(name: .long, help: "Uploads one space may have in progress (more get 503 and retry).")
    var maxUploadsPerSpace = 8
    @Option(name: .long, help: "Login attempts per client address per minute.")
    var loginsPerMinute = 30
    @Option(name: .long, help: "Registrations per client address per hour.")
    var registrationsPerHour = 10
    @Option(
        name: .long,
        help: "Address of a reverse proxy whose X-Forwarded-For names the client (repeatable; others are ignored).")
    var trustedProxy: [String] = []
    @Option(name: .long, help: "Device tokens one account may hold.")
    var maxTokensPerAccount = 100
    @Option(
        name: .long,
        help:
            "Address and port to serve Prometheus metrics on (GET /metrics), apart from the API (default: none). Keep it private: 127.0.0.1 or an internal network."
    )
    var metricsListen: String?
    @Option(name: .long, help: "Log lines on stderr: 'text', or 'json' (one object per line).")
    var logFormat = ServerLogFormat.text

    func validate() throws {
        if (tlsCert == nil) != (tlsKey == nil) { throw ValidationError("give --tls-cert and --tls-key together") }
        let api = try hostAndPort(listen, option: "--listen", example: "127.0.0.1:8443")
        if let metricsListen {
            let metrics = try hostAndPort(metricsListen, option: "--metrics-listen", example: "127.0.0.1:9464")
            if metrics.port != 0 && metrics == api {
                throw ValidationError(
                    "--metrics-listen \(metricsListen) is the API's own address: give the metrics a port of their own, for example 127.0.0.1:9464"
                )
            }
        }
        if let q = quotaBytes, q <= 0 { throw ValidationError("--quota-bytes must be positive") }
        for (name, value) in [
            ("--idle-timeout", Int(idleTimeout)), ("--max-connections", maxConnections),
            ("--max-uploads-per-space", maxUploadsPerSpace), ("--logins-per-minute", loginsPerMinute),
            ("--registrations-per-hour", registrationsPerHour), ("--max-tokens-per-account", maxTokensPerAccount),
        ] where value <= 0 {
            throw ValidationError("\(name) must be positive")
        }
    }

    func run() async throws {
        let (host, port) = try hostAndPort(listen, option: "--listen", example: "127.0.0.1:8443")
        var options = ServerOptions(host: host, port: port, dataDirectory: absolutePath(data))
        options.storage = state.storage
        options.database = state.database
        options.databasePassword = try state.databasePassword()
        options.tlsCertificate = tlsCert
        options.tlsKey = tlsKey
        options.quotaBytes = quotaBytes
        options.tokenLifetimeSeconds = tokenLifetime
        options.idleTimeoutSeconds = idleTimeout
        options.maxConnections = maxConnections
        options.maxUploadsPerSpace = maxUploadsPerSpace
        options.loginsPerMinute = loginsPerMinute
        options.registrationsPerHour = registrationsPerHour
        options.trustedProxies = Set(trustedProxy)
        options.maxTokensPerAccount = maxTokensPerAccount
        if let metricsListen {
            (options.metricsHost, options.metricsPort) = try hostAndPort(
                metricsListen, option: "--metrics-listen", example: "127.0.0.1:9464")
        }
        options.logFormat = logFormat
        // Written with write(2), unbuffered: a script waiting for these lines sees them at once.
        @Sendable func say(_ line: String) { _ = line.withCString { Glibc.write(1, $0, strlen($0)) } }
        try await runServer(options) { url in
            say("cabackup server listening on \(url)\n")
        } onMetricsListening: { url in
            say("cabackup server metrics at \(url)\n")
        }
    }

    /// `HOST:PORT` (`[::1]:PORT` for IPv6) split in two, or a message naming the option.
    func hostAndPort(_ value: String, option: String, example: String) throws -> (host: String, port: Int) {
        guard let colon = value.lastIndex(of: ":"), let port = Int(value[value.index(after: colon)...]),
            (0...65535).contains(port), colon > value.startIndex
        else {
            throw ValidationError("\(option) takes HOST:PORT, for example \(example); '\(value)' is not one")
        }
        var host = String(value[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host, port)
    }
}

extension ServerLogFormat: ExpressibleByArgument {}

/// `--password-file` of the account commands.
struct AccountPasswordOptions: ParsableArguments {
    @Option(
        name: .long,
        help: "Read the password from the first line of this file (default: $CABACKUP_PASSWORD, else a prompt).")
    var passwordFile: String?

    func source(for user: String) -> PasswordSource {
        var source = PasswordSource(file: passwordFile)
        source.prompt = "password for \(user): "
        return source
    }
}

/// `--server URL --user NAME` of the account commands.
struct AccountOptions: ParsableArguments {
    @Option(name: .long, help: "The server, e.g. http://127.0.0.1:8443 (https with TLS).")
    var server: String
    @Option(name: .long, help: "The account name (1-64 characters a-z 0-9 . _ -).")
    var user: String
    @Option(name: .long, help: "A PEM certificate to trust, for a self-signed server (default: $CABACKUP_CACERT).")
    var cacert: String?
}

struct RegisterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "register", abstract: "Create an account (and its empty private data space) on a server.",
        discussion: discussion())

    @OptionGroup var account: AccountOptions
    @Option(name: .long, help: "The account's e-mail address.")
    var email: String
    @OptionGroup var password: AccountPasswordOptions

    /// The name's form before the password is asked for; whether it is taken only the
    /// registration itself can tell (see `RemoteAccount.register`).
    func validate() throws {
        do {
            try RemoteAccount.checkUserName(account.user)
        } catch let error as CABackupError {
            throw ValidationError("\(error)")
        }
    }

    func run() throws {
        try warnIfClear(account.server)
        let password = try self.password.source(for: account.user).readNew(for: account.server)
        try RemoteAccount.register(
            server: account.server, user: account.user, email: email, password: password,
            caCertificate: account.cacert)
        try RemoteAccount.login(
            server: account.server, user: account.user, password: password, caCertificate: account.cacert)
        let url = try RemoteLocation(parsing: account.server, requireUser: false)
        print("registered '\(account.user)' and logged in this device")
        print(
            "next: cabackup init --repo \(url.scheme)://\(account.user)@\(url.serverURL.dropFirst(url.scheme.count + 3))"
        )
    }
}

struct LoginCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "login", abstract: "Log this device in to an account; the token is kept in ~/.config/cabackup.",
        discussion: discussion())

    @OptionGroup var account: AccountOptions
    @OptionGroup var password: AccountPasswordOptions
    @Option(name: .long, help: "A name for this device in 'cabackup devices' (default: the host name).")
    var device: String?
    @Flag(
        name: .long,
        help:
            "Issue a token that may read, add snapshots and lock, but never forget, prune or remove keys (for unattended devices)."
    )
    var appendOnly = false
    @Option(
        name: .long,
        help:
            "With --append-only: the repository password file this device will use; warns when it holds the account password."
    )
    var repoPasswordFile: String?

    func run() throws {
        try warnIfClear(account.server)
        let password = try self.password.source(for: account.user).read(for: account.server)
        if appendOnly {
            let fromEnvironment = self.password.passwordFile == nil && getenv("CABACKUP_PASSWORD") != nil
            let repoPassword = try repoPasswordFile.map(readPasswordFile)
            if fromEnvironment || repoPassword == password {
                printError(
                    "cabackup: warning: the account password \(fromEnvironment ? "came from CABACKUP_PASSWORD, which repository commands read too" : "is the repository password in \(repoPasswordFile ?? "")"): whoever can read this device's repository password can log in with full rights and delete backups; give the account its own password"
                )
            }
        }
        try RemoteAccount.login(
            server: account.server, user: account.user, password: password, device: device ?? currentHostname(),
            appendOnly: appendOnly, caCertificate: account.cacert)
        print("logged in to \(account.server) as '\(account.user)'\(appendOnly ? " (append-only token)" : "")")
    }
}

struct RebindCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rebind",
        abstract: "Bind the account's login to this server address (after a server upgrade or an address change).",
        discussion: discussion(
            "Login secrets are bound to the server's address as the user gives it (scheme://host:port). Accounts made before that, and accounts whose server moved to a new address, log in from new devices only after this runs once on a device still logged in, with the account password and a token without --append-only."
        ))

    @OptionGroup var account: AccountOptions
    @OptionGroup var password: AccountPasswordOptions

    func run() throws {
        try warnIfClear(account.server)
        let password = try self.password.source(for: account.user).read(for: account.server)
        try RemoteAccount.rebind(
            server: account.server, user: account.user, password: password, caCertificate: account.cacert)
        print("the login of '\(account.user)' is now bound to \(account.server)")
    }
}

/// Warns before a login secret goes over plain http:// to another machine.
func warnIfClear(_ server: String) throws {
    if try RemoteLocation(parsing: server, requireUser: false).sendsSecretsInClear {
        printError(
            "cabackup: warning: \(server) is plain http:// to another machine: anyone on the way can read the login secret and the token; use https:// (--tls-cert on the server)"
        )
    }
}

struct LogoutCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "logout", abstract: "Revoke this device's token and forget it.", discussion: discussion())

    @OptionGroup var account: AccountOptions

    func run() throws {
        try RemoteAccount.logout(server: account.server, user: account.user, caCertificate: account.cacert)
        print("logged out of \(account.server) as '\(account.user)'")
    }
}

struct DevicesCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "devices", abstract: "List the devices logged in to an account, or revoke one.",
        discussion: discussion())

    @OptionGroup var account: AccountOptions
    @Option(name: .long, help: "Revoke the device with this id (see the list).")
    var revoke: String?

    func run() throws {
        if let revoke {
            try RemoteAccount.revoke(
                server: account.server, user: account.user, device: revoke, caCertificate: account.cacert)
            print("revoked device \(revoke)")
            return
        }
        print("   ID            DEVICE            RIGHTS       CREATED                              LAST USED")
        for d in try RemoteAccount.devices(server: account.server, user: account.user, caCertificate: account.cacert) {
            let device = d.device.padding(toLength: 16, withPad: " ", startingAt: 0)
            let rights = d.rights.padding(toLength: 11, withPad: " ", startingAt: 0)
            print("\(d.current ? "*" : " ")  \(d.id)  \(device)  \(rights)  \(d.created)  \(d.lastUsed)")
        }
    }
}
