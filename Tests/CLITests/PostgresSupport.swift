import CABackup
import Foundation
import Testing

@testable import CABackupServer

#if canImport(Glibc)
    import Glibc
#endif

/// A throwaway PostgreSQL cluster (Debian's `postgresql` package, which
/// `scripts/ensure-deps` installs) for one test: made with `initdb` in a directory of its
/// own, listening on a free port of 127.0.0.1 only, with a role ``user`` (password
/// ``password``) owning a database ``database``. Stopped and deleted when dropped, and it
/// can be stopped and started again on the same port and data meanwhile.
///
/// Run as root, the cluster belongs to the `postgres` user (PostgreSQL refuses to run as
/// root). Its superuser logs in over the cluster's own Unix socket without a password; the
/// role logs in over TCP with SCRAM, as a server instance would.
final class PostgresServer {
    static let user = "cabackup"
    static let password = "pg test password"
    static let database = "cabackup"

    private(set) var port: Int
    private let dir = Scratch()
    private let bin: String

    private var data: String { dir.file("data") }
    private var socketDirectory: String { dir.file("socket") }

    /// The database's URL (no TLS: the cluster has no certificate).
    var url: String { "postgresql://\(Self.user)@127.0.0.1:\(port)/\(Self.database)?sslmode=disable" }

    /// Makes and starts the cluster. - Throws: when PostgreSQL is not installed (the test
    /// fails: it is never skipped) or does not start.
    init() async throws {
        guard let bin = Self.binDirectory() else {
            Issue.record(
                "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run scripts/ensure-deps, or apt-get install postgresql"
            )
            throw CABackupError.invalidArgument("PostgreSQL is not installed")
        }
        self.bin = bin
        port = try freePorts(1)[0]
        try FileManager.default.createDirectory(atPath: socketDirectory, withIntermediateDirectories: false)
        if getuid() == 0 { try check(await runOffPool("/bin/chown", ["-R", "postgres:postgres", dir.path]), "chown") }
        try await asOwner(
            "initdb", "-D", data, "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync", "--auth-local=trust",
            "--auth-host=scram-sha-256")
        // Another test may bind the chosen port between its choice and the postmaster's
        // bind: then the cluster starts again on a new one (up to three ports).
        for attempt in 1...3 {
            do {
                try await start(recordingFailure: attempt == 3)
                break
            } catch {
                let log = (try? String(contentsOfFile: dir.file("log"), encoding: .utf8)) ?? ""
                guard attempt < 3, log.contains("Address already in use") else { throw error }
                port = try freePorts(1)[0]
            }
        }
        try await superuser("CREATE ROLE \(Self.user) LOGIN PASSWORD '\(Self.password)'")
        try await superuser("CREATE DATABASE \(Self.database) OWNER \(Self.user)")
    }

    deinit { stop() }

    /// Starts the cluster (again) on its port, waiting until it accepts connections.
    func start(recordingFailure: Bool = true) async throws {
        // The postmaster outlives pg_ctl and would keep every descriptor it inherits, the
        // one Foundation's Process watches for the child's exit among them (and then the
        // wait never ends): pg_ctl starts with only stdin, stdout and stderr.
        try await asOwner(
            "pg_ctl", "-D", data, "-l", dir.file("log"), "-w", "-t", "60", "-o",
            "-p \(port) -c listen_addresses=127.0.0.1 -k \(socketDirectory) -c fsync=off", "start",
            closingDescriptors: true, recordingFailure: recordingFailure)
    }

    /// Stops the cluster at once, as a crash would (what `pg_ctl stop -m immediate` does:
    /// SIGQUIT to the postmaster), and waits until it is gone: its clients' connections
    /// drop, and the next start recovers from the write-ahead log. Without a child to wait
    /// for, so it may run anywhere, `deinit` included.
    func stop() {
        let pidFile = data + "/postmaster.pid"
        guard let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
            let pid = text.split(separator: "\n").first.flatMap({ Int32($0) })
        else { return }
        kill(pid, SIGQUIT)
        // The postmaster removes its pid file last, once its backends are gone.
        for _ in 0..<3000 where FileManager.default.fileExists(atPath: pidFile) { usleep(10_000) }
    }

    /// Stops and starts the cluster on the same port and data.
    func restart() async throws {
        stop()
        try await start()
    }

    /// Opens the database as ``user`` and brings its schema up to date, as a server
    /// instance does.
    func open() async throws -> PostgresDatabase {
        let db = try await PostgresDatabase.open(url, password: Self.password)
        try await db.migrate()
        return db
    }

    /// Runs `sql` as the superuser.
    func superuser(_ sql: String, database: String = "postgres") async throws {
        try await asOwner(
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", socketDirectory, "-p", "\(port)", "-U", "postgres",
            "-d", database, "-c", sql)
    }

    /// Runs one of PostgreSQL's programs as the cluster's owner; a failure fails the test.
    private func asOwner(
        _ program: String, _ args: String..., closingDescriptors: Bool = false, recordingFailure: Bool = true
    ) async throws {
        var command = (getuid() == 0 ? ["/usr/sbin/runuser", "-u", "postgres", "--"] : []) + [bin + "/" + program]
        if closingDescriptors {
            command =
                [
                    "/usr/bin/python3", "-c",
                    "import os, sys; os.closerange(3, os.sysconf('SC_OPEN_MAX')); os.execv(sys.argv[1], sys.argv[1:])",
                ] + command
        }
        try check(await runOffPool(command[0], Array(command.dropFirst()) + args), program, recording: recordingFailure)
    }

    private func check(_ r: RunResult, _ what: String, recording: Bool = true) throws {
        guard r.status == 0 else {
            let log = (try? String(contentsOfFile: dir.file("log"), encoding: .utf8)) ?? ""
            if recording { Issue.record("\(what) failed (\(r.status)): \(r.stderr)\(r.stdout)\n\(log.suffix(2000))") }
            throw CABackupError.invalidArgument("\(what) failed")
        }
    }

    /// The newest installed PostgreSQL's programs.
    private static func binDirectory() -> String? {
        let root = "/usr/lib/postgresql"
        let versions = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        return versions.compactMap(Int.init).sorted().reversed().map { "\(root)/\($0)/bin" }.first {
            FileManager.default.isExecutableFile(atPath: $0 + "/initdb")
        }
    }
}

/// ``run(_:_:env:cwd:)`` on a thread of its own, for async tests: waiting for a child on
/// the cooperative pool (two threads on two cores) can starve the queue that reports its
/// exit, and then nothing moves.
func runOffPool(_ executable: String, _ args: [String]) async throws -> RunResult {
    try await offPool { try run(executable, args) }
}
