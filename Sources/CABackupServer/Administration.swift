import CABackup
import CABackupRemote
import Foundation

/// What `cabackup server admin` does, on the server's stores directly (its data directory,
/// and with `storage` the bucket of the spaces' files) while instances run: they read
/// what is set here on every request, so a change holds at once.
public final class ServerAdministration: Sendable {
    let records: any AccountRecords
    let dataDirectory: String
    let bucket: S3Location?
    let database: PostgresDatabase?

    /// Opens the stores of a server that ran with `--data dataDirectory` (and
    /// `--storage storage`, `--database database`). Creates nothing; ``close()`` when done.
    /// - Throws: `CABackupError.invalidArgument` when the directory holds no server's
    ///   accounts, or the database cannot be used.
    public init(
        dataDirectory: String, storage: String? = nil, database url: String? = nil, databasePassword: String? = nil
    ) async throws {
        if url == nil, !FileManager.default.fileExists(atPath: dataDirectory + "/accounts.sqlite") {
            throw CABackupError.invalidArgument(
                "\(dataDirectory) holds no server's accounts: give the --data directory the server runs with")
        }
        database = try await url.asyncMap { try await PostgresDatabase.open($0, password: databasePassword) }
        try await database?.migrate()
        records = try accountRecords(dataDirectory: dataDirectory, database: database)
        self.dataDirectory = dataDirectory
        bucket = try storage.map { try S3Location(parsing: $0) }
    }

    /// Closes the database connection, if any.
    public func close() async { await database?.close() }

    /// Every account with its devices, last activity, quota and the bytes its space holds.
    public func accounts() async throws -> [AccountSummary] {
        var out = try await records.summaries()
        for i in out.indices {
            let storage = try spaceStorage(of: out[i].name, dataDirectory: dataDirectory, bucket: bucket)
            out[i].usedBytes = try Self.bytes(in: storage)
        }
        return out
    }

    /// The bytes of every file of a space (0 for a space never initialized).
    static func bytes(in storage: any Storage) throws -> Int64 {
        var total: Int64 = 0
        for kind in [FileKind.config, .key, .snapshot, .pack] {
            for name in try storage.list(kind) { total += try storage.stat(kind, name) ?? 0 }
        }
        return total
    }

    private func require(_ found: Bool, _ user: String) throws {
        guard found else {
            throw CABackupError.invalidArgument(
                "there is no account named '\(user)': 'cabackup server admin accounts' lists them")
        }
    }

    /// Sets an account's own quota in bytes, or clears it (nil: the server's
    /// `--quota-bytes` applies again).
    public func setQuota(_ user: String, bytes: Int64?) async throws {
        try require(try await records.setQuota(of: user, bytes: bytes), user)
    }

    /// Disables an account (its devices get 403 on their next request and it cannot log
    /// in) or enables it again.
    public func setDisabled(_ user: String, _ disabled: Bool) async throws {
        try require(try await records.setDisabled(user, disabled), user)
    }

    /// Deletes an account with all its data: first disabled (its devices are refused at
    /// once), then its space's files removed, then the account. Run again after a failure
    /// part way, it finishes.
    public func deleteAccount(_ user: String) async throws {
        try require(try await records.setDisabled(user, true), user)
        let storage = try spaceStorage(of: user, dataDirectory: dataDirectory, bucket: bucket)
        for kind in [FileKind.snapshot, .key, .pack, .lock, .config] {
            for name in try storage.list(kind) { try storage.remove(kind, name) }
        }
        let local = dataDirectory + "/spaces/" + user
        if FileManager.default.fileExists(atPath: local) { try FileManager.default.removeItem(atPath: local) }
        if let database { try await PostgresSpaceRecords.forget(space: user, in: database) }
        _ = try await records.deleteAccount(user)
    }

    /// What a reconciliation pass did to one space's records.
    public struct Reconciled: Sendable {
        public let user: String
        /// False when a device held the space's lock: the space was left alone.
        public let done: Bool
        /// The bytes stored the records counted before, and the bytes the space's files hold.
        public let countedBytes, storedBytes: Int64
        /// Packs indexed that were not, and rows of packs that are gone, dropped.
        public let packsAdded, packsDropped: Int
    }

    /// Brings the records of every space (or `user`'s) in line with the files its storage
    /// holds — the full pass an instance's start does only for additions: packs stored but
    /// not indexed (an instance killed between the two) are indexed, rows of packs gone are
    /// dropped, and the quota counter is set to the bytes stored. Each space is held under
    /// an exclusive lease of its lock for its pass, so no device prunes it meanwhile; a
    /// space whose lock a device holds is left alone (run again later).
    /// - Throws: `CABackupError.invalidArgument` for a single server's data directory,
    ///   which reconciles its spaces whenever it starts.
    public func reconcile(_ user: String? = nil) async throws -> [Reconciled] {
        guard let database else {
            throw CABackupError.invalidArgument(
                "a single server reconciles its spaces whenever it starts: restart it (this is for instances sharing --database)"
            )
        }
        let names = try await records.summaries().map(\.name).filter { user == nil || $0 == user }
        if let user { try require(!names.isEmpty, user) }
        var out: [Reconciled] = []
        for name in names {
            let storage = try spaceStorage(of: name, dataDirectory: dataDirectory, bucket: bucket)
            let space = PostgresSpaceRecords(database, space: name)
            guard let lease = try await space.acquire(exclusive: true, key: nil) else {
                out.append(
                    Reconciled(user: name, done: false, countedBytes: 0, storedBytes: 0, packsAdded: 0, packsDropped: 0)
                )
                continue
            }
            let found = FoundBox()
            do {
                let before = try await space.reconcile(holding: { indexed in
                    let f = try Space.scan(storage, indexed: indexed, full: true)
                    found.value = f
                    return f
                })
                _ = try? await space.releaseLease(lease)
                let f = found.value ?? ReconcileFound()
                out.append(
                    Reconciled(
                        user: name, done: true, countedBytes: before, storedBytes: f.usedBytes ?? 0,
                        packsAdded: f.add.count, packsDropped: f.drop.count))
            } catch {
                _ = try? await space.releaseLease(lease)
                throw error
            }
        }
        return out
    }

    /// The bytes stored and promised to uploads that a space's quota counts (nil for a
    /// single server: it counts in its memory).
    public func quotaUsage(of user: String) async throws -> (used: Int64, reserved: Int64)? {
        guard let database else { return nil }
        return try await PostgresSpaceRecords(database, space: user).usage()
    }

    /// Opens or closes registration: closed, `POST /v1/register` gets 403.
    public func setRegistration(open: Bool) async throws {
        try await records.setSetting("registration", open ? "open" : "closed")
    }

    public func registrationIsOpen() async throws -> Bool {
        try await records.setting("registration") != "closed"
    }
}

/// What the scan of a reconciliation found, kept for its report (the scan runs once, in
/// the records' transaction).
private final class FoundBox: @unchecked Sendable {
    // Safe: written by the scan, read after the transaction that ran it returned.
    var value: ReconcileFound?
}
