import CABackup
import CABackupRemote
import Foundation
import NIOCore

#if canImport(Glibc)
    import Glibc
#endif

/// `cabackup server migrate`: moves a single server's data directory into the stores of
/// instances that share a PostgreSQL database and an S3 bucket, keeping every account,
/// its login and its device tokens (a device keeps working without logging in again when
/// the server's address stays). The source is only read. Run it with the single server
/// stopped; run again after a failure part way, it finishes (accounts already there are
/// not added twice, files already in the bucket are not sent again).
public struct ServerMigration: Sendable {
    /// What was moved.
    public struct Summary: Sendable {
        public var accounts = 0
        public var tokens = 0
        public var files = 0
        public var bytes: Int64 = 0
    }

    let source: String
    let scratch: String
    let bucket: S3Location
    let database: String
    let databasePassword: String?

    /// - Parameters:
    ///   - source: the single server's `--data` directory.
    ///   - scratch: the new instance's `--data` (files pass through it on their way).
    public init(
        from source: String, scratch: String, storage: String, database: String, databasePassword: String?
    )
        throws
    {
        guard FileManager.default.fileExists(atPath: source + "/accounts.sqlite") else {
            throw CABackupError.invalidArgument(
                "\(source) holds no server's accounts: give --from the --data directory of the server to move")
        }
        self.source = source
        self.scratch = scratch
        bucket = try S3Location(parsing: storage)
        self.database = database
        self.databasePassword = databasePassword
    }

    /// Moves everything; `progress` hears one line per account.
    public func run(progress: @Sendable (String) -> Void) async throws -> Summary {
        let db = try await PostgresDatabase.open(database, password: databasePassword)
        do {
            let summary = try await run(db, progress: progress)
            await db.close()
            return summary
        } catch {
            await db.close()
            throw error
        }
    }

    private func run(_ db: PostgresDatabase, progress: @Sendable (String) -> Void) async throws -> Summary {
        try await db.migrate()
        let from = try SQLiteAccountRecords(path: source + "/accounts.sqlite")
        let to = PostgresAccountRecords(db)
        // Login secrets are salted per account with a key of the server's: the instances
        // must use the one the devices' secrets were made with.
        try await to.adoptLoginSaltKey(try from.loginSaltKey())
        var summary = Summary()
        try makeDirectories(scratch + "/migrating")
        for account in try from.summaries() {
            let name = account.name
            guard let secret = try from.secret(of: name), let state = try from.state(of: name) else { continue }
            if try await to.insert(
                NewAccount(name: name, email: account.email, secret: secret, createdNs: account.createdNs))
            {
                summary.accounts += 1
            } else {
                // There already: this migration's earlier run, or somebody else who took the
                // name on the new instances, whose space must not get these devices or files.
                let there = try await to.secret(of: name)
                guard there?.salt == secret.salt, there?.hash == secret.hash else {
                    throw CABackupError.invalidArgument(
                        "the database already holds another account named '\(name)': nothing of it was moved; rename or delete that account, then run the migration again"
                    )
                }
            }
            _ = try await to.setQuota(of: name, bytes: state.quotaBytes)
            _ = try await to.setDisabled(name, state.disabled)
            let held = Set(try await to.tokens(of: name).map(\.hash))
            for token in try from.tokens(of: name) where !held.contains(token.hash) {
                _ = try await to.add(token, limit: .max)
                summary.tokens += 1
            }
            let moved = try await moveSpace(of: name, db: db)
            summary.files += moved.files
            summary.bytes += moved.bytes
            progress("\(name): \(moved.files) files, \(moved.bytes) bytes")
        }
        if let registration = try from.setting("registration") { try await to.setSetting("registration", registration) }
        return summary
    }

    /// Copies a space's files into the bucket (each once), then records them.
    private func moveSpace(of user: String, db: PostgresDatabase) async throws -> (files: Int, bytes: Int64) {
        let root = source + "/spaces/" + user
        guard FileManager.default.fileExists(atPath: root) else { return (0, 0) }
        let local = LocalStorage(path: root)
        let target = try spaceStorage(of: user, dataDirectory: scratch, bucket: bucket)
        var files = 0
        var bytes: Int64 = 0
        var used: Int64 = 0
        var packs: [(name: String, size: Int64, blobs: [BlobID])] = []
        for kind in [FileKind.key, .pack, .snapshot, .config] {
            for name in try local.list(kind) {
                let size = try local.size(kind, name)
                used += size
                if kind == .pack {
                    packs.append((name, size, try Space.clearEntries(of: name, size: size, in: local)))
                }
                if try target.stat(kind, name) == size { continue }
                // The storage consumes the file it is given: hand it a copy.
                let copy = scratch + "/migrating/" + name
                unlink(copy)
                try FileManager.default.copyItem(atPath: root + "/" + kind.relativePath(name), toPath: copy)
                try target.put(kind, name, file: copy)
                files += 1
                bytes += size
            }
        }
        let records = PostgresSpaceRecords(db, space: user)
        try await records.reconcile(
            add: packs, drop: [], usedBytes: used, hasConfig: try local.stat(.config, "config") != nil)
        return (files, bytes)
    }
}

extension PostgresAccountRecords {
    /// Makes `key` the login-salt key of the instances, unless they already use another
    /// and hold accounts made with it.
    func adoptLoginSaltKey(_ key: [UInt8]) async throws {
        let current = try await loginSaltKey()
        if current == key { return }
        guard try await summaries().isEmpty else {
            throw CABackupError.invalidArgument(
                "the database already holds accounts made with another login-salt key: migrate into an empty database")
        }
        try await setLoginSaltKey(key)
    }
}
