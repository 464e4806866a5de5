import CABackup
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import PostgresNIO
import Prometheus
import Synchronization

/// Where a shared PostgreSQL database is: `postgresql://USER@HOST[:PORT]/DATABASE`, or
/// `postgres://…`, with an optional `?sslmode=disable|prefer|require` (default `prefer`:
/// TLS when the server offers it, its certificate checked against the system's roots).
///
/// The password never comes from the URL, which shows in process lists and shell
/// histories: a URL holding one is refused.
struct PostgresLocation: Sendable, Equatable, CustomStringConvertible {
    enum TLSMode: String, Sendable {
        case disable, prefer, require
    }

    let user: String
    let host: String
    let port: Int
    let database: String
    let tls: TLSMode

    private static let form = "postgresql://USER@HOST[:PORT]/DATABASE"

    /// - Throws: ``CABackupError/invalidArgument(_:)`` for a URL of another form, or one
    ///   holding a password (whose text the message leaves out).
    init(_ url: String) throws {
        // Checked on the raw text, before anything else, so no message ever repeats a password.
        // A password may hold '/' or '?': look at everything before the last '@'.
        let rest = url.split(separator: "://", maxSplits: 1).last ?? ""
        if let at = rest.lastIndex(of: "@"), rest[..<at].contains(":") {
            throw CABackupError.invalidArgument(
                "the database URL holds a password, which would show in process lists: remove it from the URL and give it with PGPASSWORD or --database-password-file"
            )
        }
        let bad = CABackupError.invalidArgument("'\(url)' is not a PostgreSQL URL: use \(Self.form)")
        guard let c = URLComponents(string: url), c.scheme == "postgresql" || c.scheme == "postgres",
            c.fragment == nil
        else { throw bad }
        guard let user = c.user, !user.isEmpty else {
            throw CABackupError.invalidArgument("the database URL '\(url)' names no user: use \(Self.form)")
        }
        guard var host = c.host, !host.isEmpty else { throw bad }
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        let database = String(c.path.dropFirst())
        guard c.path.hasPrefix("/"), !database.isEmpty, !database.contains("/") else {
            throw CABackupError.invalidArgument("the database URL '\(url)' names no database: use \(Self.form)")
        }
        var tls = TLSMode.prefer
        for item in c.queryItems ?? [] {
            guard item.name == "sslmode", let mode = item.value.flatMap(TLSMode.init(rawValue:)) else {
                throw CABackupError.invalidArgument(
                    "the database URL '\(url)' has an unknown option '\(item.name)': the only one is sslmode=disable|prefer|require"
                )
            }
            tls = mode
        }
        self.user = user
        self.host = host
        port = c.port ?? 5432
        self.database = database
        self.tls = tls
        guard (1...65535).contains(port) else { throw bad }
    }

    /// The URL, without a password (it never has one).
    var description: String {
        let h = host.contains(":") ? "[\(host)]" : host
        return "postgresql://\(user)@\(h):\(port)/\(database)" + (tls == .prefer ? "" : "?sslmode=\(tls.rawValue)")
    }
}

/// The connection to a PostgreSQL database that several server instances share: a pool of
/// connections (postgres-nio's `PostgresClient`) whose background work runs from
/// ``open(_:password:)`` until ``close()``, the schema (``migrate()``), and helpers that run
/// queries and transactions and turn their failures into one-line ``CABackupError``s.
///
/// Values go into SQL only as bound parameters: `PostgresQuery` string interpolation binds
/// each interpolated value; never build SQL text from values.
final class PostgresDatabase: Sendable {
    let location: PostgresLocation
    private let client: PostgresClient
    /// Where statements and transactions are counted, for the server's metrics.
    private let metrics: ServerMetrics?
    /// The round-trip counter of the transaction running in this task, which
    /// ``PostgresConnection/rows(_:)`` counts each statement in.
    @TaskLocal static var roundTrips: Counter?
    /// The task running the client's pool; nil once closed.
    private let running: Mutex<Task<Void, Never>?>
    /// Logs nothing: the server reports failures through the errors thrown.
    static let logger = Logger(label: "cabackup.postgres") { _ in SwiftLogNoOpLogHandler() }

    /// How long a new connection may take, the probe's included.
    private static let connectTimeout = 10

    /// Connects to the database at `url` as its user with `password` (nil: the server
    /// must not ask for one), checks that it answers, and starts the connection pool.
    /// Statements and transactions are counted in `metrics`. Call ``close()`` when done.
    /// - Throws: ``CABackupError/invalidArgument(_:)`` for a bad URL, a refused login or a
    ///   missing database, ``CABackupError/network(_:)`` when the server cannot be reached.
    static func open(_ url: String, password: String?, metrics: ServerMetrics? = nil) async throws -> PostgresDatabase {
        let location = try PostgresLocation(url)
        // The pool retries a failing connection for a minute before it fails a query; one
        // connection made here fails at once, with the reason.
        let probe = try await PostgresDatabase.describingErrors(at: location) {
            try await PostgresConnection.connect(
                configuration: try connectionConfiguration(location, password: password), id: 0, logger: logger)
        }
        try? await probe.close()
        return PostgresDatabase(location, password: password, metrics: metrics)
    }

    private init(_ location: PostgresLocation, password: String?, metrics: ServerMetrics?) {
        self.location = location
        self.metrics = metrics
        var configuration = PostgresClient.Configuration(
            host: location.host, port: location.port, username: location.user, password: password,
            database: location.database, tls: Self.clientTLS(location.tls))
        configuration.options.connectTimeout = .seconds(Int64(Self.connectTimeout))
        let client = PostgresClient(configuration: configuration)
        self.client = client
        running = Mutex(Task { await client.run() })
    }

    deinit { running.withLock { $0?.cancel() } }

    /// Stops the connection pool: queries after this fail. Safe to call more than once.
    func close() async {
        let task = running.withLock { t in
            defer { t = nil }
            return t
        }
        task?.cancel()
        await task?.value
    }

    private static func clientTLS(_ mode: PostgresLocation.TLSMode) -> PostgresClient.Configuration.TLS {
        switch mode {
        case .disable: return .disable
        case .prefer: return .prefer(.makeClientConfiguration())
        case .require: return .require(.makeClientConfiguration())
        }
    }

    private static func connectionConfiguration(
        _ location: PostgresLocation, password: String?
    ) throws -> PostgresConnection.Configuration {
        let tls: PostgresConnection.Configuration.TLS
        switch location.tls {
        case .disable: tls = .disable
        case .prefer: tls = .prefer(try NIOSSLContext(configuration: .makeClientConfiguration()))
        case .require: tls = .require(try NIOSSLContext(configuration: .makeClientConfiguration()))
        }
        var c = PostgresConnection.Configuration(
            host: location.host, port: location.port, username: location.user, password: password,
            database: location.database, tls: tls)
        c.options.connectTimeout = .seconds(Int64(connectTimeout))
        return c
    }

    // MARK: Queries

    /// Runs one statement and returns all its rows.
    @discardableResult
    func query(_ query: PostgresQuery) async throws -> [PostgresRow] {
        metrics?.databaseRoundTrips.increment()
        return try await Self.describingErrors(at: location) {
            try await client.query(query, logger: Self.logger).collect()
        }
    }

    /// Runs `body` in a transaction on one connection: committed when it returns, rolled
    /// back when it throws (its error is rethrown as it was).
    func transaction<Result: Sendable>(
        _ body: (PostgresConnection) async throws -> Result
    ) async throws -> Result {
        metrics?.databaseTransactions.increment()
        metrics?.databaseRoundTrips.increment(by: Int64(2))  // BEGIN and COMMIT (or ROLLBACK)
        return try await Self.$roundTrips.withValue(metrics?.databaseRoundTrips) {
            try await Self.describingErrors(at: location) {
                try await client.withTransaction(logger: Self.logger) { try await body($0) }
            }
        }
    }

    // MARK: Schema

    /// One version of the schema: the statements that make it from the one before.
    struct Migration: Sendable {
        let version: Int
        let statements: [String]
    }

    /// The schema, version by version. Append a step to change it; never edit one that has
    /// shipped (databases that ran it will not run it again).
    static let migrations: [Migration] = [
        Migration(version: 1, statements: PostgresAccountRecords.schema),
        Migration(version: 2, statements: PostgresSpaceRecords.schema),
        // When a space's config was claimed, so a claim left by a dead instance lapses.
        Migration(
            version: 3,
            statements: ["ALTER TABLE space_usage ADD COLUMN IF NOT EXISTS config_claimed_ns bigint NOT NULL DEFAULT 0"]
        ),
    ]

    /// Any number, the same in every instance: the advisory lock that lets one instance at a
    /// time migrate.
    private static let migrationLock: Int64 = 0x6361_6261_636B_7570

    /// Brings the schema to the newest version, whichever instance gets there first; the
    /// others wait for it and find nothing to do. Recorded in `schema_version`, a row per
    /// version run.
    /// - Throws: ``CABackupError/invalidArgument(_:)`` when the database holds a newer
    ///   schema than this cabackup knows.
    func migrate() async throws {
        let newest = Self.migrations.last?.version ?? 0
        let location = location
        try await transaction { c in
            try await c.rows("SELECT pg_advisory_xact_lock(\(Self.migrationLock))")
            try await c.rows(
                "CREATE TABLE IF NOT EXISTS schema_version(version integer PRIMARY KEY, applied_ns bigint NOT NULL)")
            let current =
                try await c.rows("SELECT coalesce(max(version), 0) FROM schema_version")
                .first?.decode(Int.self) ?? 0
            guard current <= newest else {
                throw CABackupError.invalidArgument(
                    "the database \(location) holds schema version \(current), newer than this cabackup knows (\(newest)): upgrade cabackup"
                )
            }
            for m in Self.migrations where m.version > current {
                for s in m.statements { try await c.rows(PostgresQuery(unsafeSQL: s)) }
                try await c.rows(
                    "INSERT INTO schema_version(version, applied_ns) VALUES (\(m.version), \(Accounts.nowNs()))")
            }
        }
    }

    // MARK: Errors

    /// Runs `body`, turning what PostgreSQL or the network threw into one line saying what
    /// is wrong at `location` and what to do. Other errors pass as they are.
    private static func describingErrors<Result: Sendable>(
        at location: PostgresLocation, _ body: () async throws -> Result
    ) async throws -> Result {
        do {
            return try await body()
        } catch {
            throw describe(error, at: location)
        }
    }

    static func describe(_ error: any Error, at location: PostgresLocation) -> any Error {
        let at = "PostgreSQL at \(location.host):\(location.port)"
        switch error {
        case let e as PostgresTransactionError:
            return describe(e.closureError ?? e.beginError ?? e.commitError ?? e.rollbackError ?? e, at: location)
        case let e as PSQLError where e.code == .server:
            let state = e.serverInfo?[.sqlState] ?? ""
            let message = e.serverInfo?[.message] ?? "no message"
            switch state {
            case "28P01", "28000":
                return CABackupError.invalidArgument(
                    "\(at) refused the login of user '\(location.user)' (\(message)): check the password given with PGPASSWORD or --database-password-file, and the user in the database URL"
                )
            case "3D000":
                return CABackupError.invalidArgument(
                    "\(at) has no database '\(location.database)': create it ('createdb -O \(location.user) \(location.database)') or fix the database URL"
                )
            case "57P01", "57P02", "57P03", "08000", "08003", "08006":
                return CABackupError.network("\(at) is not available (\(message)): try again when it is back")
            default:
                return CABackupError.invalidArgument("\(at) refused a query: \(message) (SQLSTATE \(state))")
            }
        case let e as PSQLError where e.code == .authMechanismRequiresPassword:
            return CABackupError.invalidArgument(
                "\(at) asks for the password of user '\(location.user)': give it with PGPASSWORD or --database-password-file"
            )
        case let e as PSQLError where e.code == .sslUnsupported:
            return CABackupError.invalidArgument(
                "\(at) does not offer TLS, and the database URL has sslmode=require: enable ssl on the server, or use sslmode=disable on a trusted network"
            )
        case let e as PSQLError where e.code == .connectionError || e.code == .serverClosedConnection:
            return CABackupError.network(
                "cannot reach \(at) (\(reason(e.underlying))): start PostgreSQL, or check the host and port in the database URL"
            )
        case let e as PSQLError where e.code == .poolClosed:
            return CABackupError.network("the connection to \(at) is closed: the server is shutting down")
        case let e as PSQLError:
            return CABackupError.network("\(at): \(e.code)\(e.underlying.map { " (\(reason($0)))" } ?? "")")
        case is NIOConnectionError, is IOError, is ChannelError:
            return CABackupError.network(
                "cannot reach \(at) (\(reason(error))): start PostgreSQL, or check the host and port in the database URL"
            )
        default:
            return error
        }
    }

    /// Why a connection failed, in a few words.
    private static func reason(_ error: (any Error)?) -> String {
        switch error {
        case let e as NIOConnectionError:
            if e.dnsAError != nil || e.dnsAAAAError != nil { return "no such host" }
            return reason(e.connectionErrors.first?.error)
        case let e as IOError:
            return errnoDescription(e.errnoCode)
        case ChannelError.connectTimeout?:
            return "no answer in \(connectTimeout) s"
        case let e as PSQLError:
            return e.underlying.map { reason($0) } ?? "\(e.code)"
        case nil:
            return "connection lost"
        case let e?:
            return String(describing: e)
        }
    }
}

extension PostgresConnection {
    /// Runs one statement on this connection (in ``PostgresDatabase/transaction(_:)``) and
    /// returns all its rows.
    @discardableResult
    func rows(_ query: PostgresQuery) async throws -> [PostgresRow] {
        PostgresDatabase.roundTrips?.increment()
        return try await self.query(query, logger: PostgresDatabase.logger).collect()
    }
}
