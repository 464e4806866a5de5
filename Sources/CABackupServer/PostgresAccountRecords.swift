import CABackup
import NIOCore
import PostgresNIO

/// Accounts and device tokens in a PostgreSQL database shared by several server
/// instances, and the login-salt key in its `settings` table.
///
/// Behaves as ``SQLiteAccountRecords`` does, with every check-then-write one statement or
/// one transaction, so instances working at once cannot get between them: the first
/// instance's salt key is everyone's, a name is taken once, and an account never holds
/// more tokens than the limit.
final class PostgresAccountRecords: AccountRecords {
    private let db: PostgresDatabase

    /// The tables, created by ``PostgresDatabase/migrate()``; `disabled` and `quota_bytes`
    /// are for the administration tools.
    static let schema = [
        """
        CREATE TABLE IF NOT EXISTS accounts(name text PRIMARY KEY, email text NOT NULL, salt bytea NOT NULL,
            hash bytea NOT NULL, iterations integer NOT NULL, scheme integer NOT NULL, origin text NOT NULL,
            created_ns bigint NOT NULL, disabled boolean NOT NULL DEFAULT false, quota_bytes bigint NULL)
        """,
        """
        CREATE TABLE IF NOT EXISTS tokens(hash bytea PRIMARY KEY,
            user_name text NOT NULL REFERENCES accounts(name) ON DELETE CASCADE, device text NOT NULL,
            created_ns bigint NOT NULL, expires_ns bigint NOT NULL, last_used_ns bigint NOT NULL,
            can_delete boolean NOT NULL)
        """,
        "CREATE INDEX IF NOT EXISTS tokens_by_user ON tokens(user_name, created_ns)",
        "CREATE TABLE IF NOT EXISTS settings(key text PRIMARY KEY, value bytea NOT NULL)",
    ]

    /// Over `db`, whose schema ``PostgresDatabase/migrate()`` has made.
    init(_ db: PostgresDatabase) {
        self.db = db
    }

    func loginSaltKey() async throws -> [UInt8] {
        // Every instance offers a key; the first one stored stays, and all read that one.
        let offer = ByteBuffer(bytes: secureRandomBytes(32))
        try await db.query(
            "INSERT INTO settings(key, value) VALUES ('login-salt-key', \(offer)) ON CONFLICT (key) DO NOTHING")
        guard let row = try await db.query("SELECT value FROM settings WHERE key = 'login-salt-key'").first
        else { throw CABackupError.corrupt(what: "the settings table", reason: "the login-salt key vanished") }
        let key = Array(try row.decode(ByteBuffer.self).readableBytesView)
        guard key.count == 32 else {
            throw CABackupError.corrupt(what: "the settings table", reason: "the login-salt key is \(key.count) bytes")
        }
        return key
    }

    /// Replaces the login-salt key (a migration brings the one the devices' secrets were
    /// made with).
    func setLoginSaltKey(_ key: [UInt8]) async throws {
        try await db.query(
            """
            INSERT INTO settings(key, value) VALUES ('login-salt-key', \(ByteBuffer(bytes: key)))
            ON CONFLICT (key) DO UPDATE SET value = excluded.value
            """)
    }

    func insert(_ account: NewAccount) async throws -> Bool {
        let s = account.secret
        return try await !db.query(
            """
            INSERT INTO accounts(name, email, salt, hash, iterations, scheme, origin, created_ns)
            VALUES (\(account.name), \(account.email), \(ByteBuffer(bytes: s.salt)), \(ByteBuffer(bytes: s.hash)),
                \(s.iterations), \(s.scheme), \(s.origin), \(account.createdNs))
            ON CONFLICT (name) DO NOTHING RETURNING 1
            """
        ).isEmpty
    }

    func secret(of user: String) async throws -> StoredSecret? {
        try await db.query("SELECT salt, hash, iterations, scheme, origin FROM accounts WHERE name = \(user)")
            .first.map { row in
                let (salt, hash, iterations, scheme, origin) = try row.decode(
                    (ByteBuffer, ByteBuffer, Int, Int, String).self)
                return StoredSecret(
                    salt: Array(salt.readableBytesView), hash: Array(hash.readableBytesView), iterations: iterations,
                    scheme: scheme, origin: origin)
            }
    }

    func replaceSecret(of user: String, with secret: StoredSecret) async throws {
        try await db.query(
            """
            UPDATE accounts SET salt = \(ByteBuffer(bytes: secret.salt)), hash = \(ByteBuffer(bytes: secret.hash)),
                iterations = \(secret.iterations), scheme = \(secret.scheme), origin = \(secret.origin)
            WHERE name = \(user)
            """)
    }

    func add(_ token: TokenRecord, limit: Int) async throws -> Int {
        let t = token
        return try await db.transaction { c in
            // The account's row, locked until the commit: an instance adding a token to the
            // same account at once waits here, then counts this one too.
            guard try await !c.rows("SELECT 1 FROM accounts WHERE name = \(t.user) FOR UPDATE").isEmpty else {
                // Deleted since the login was checked (SQLite keeps no foreign key, and
                // deletes no accounts).
                throw APIError(401, "the account is gone: log in again")
            }
            let held =
                try await c.rows("SELECT count(*) FROM tokens WHERE user_name = \(t.user)")
                .first?.decode(Int.self) ?? 0
            guard held < limit else { return held }
            try await c.rows(
                """
                INSERT INTO tokens(hash, user_name, device, created_ns, expires_ns, last_used_ns, can_delete)
                VALUES (\(ByteBuffer(bytes: t.hash)), \(t.user), \(t.device), \(t.createdNs), \(t.expiresNs),
                    \(t.lastUsedNs), \(t.canDelete))
                """)
            return held
        }
    }

    /// The columns ``token(_:)`` reads, in its order.
    private static let tokenColumns = "hash, user_name, device, created_ns, expires_ns, last_used_ns, can_delete"

    private static func token(_ row: PostgresRow) throws -> TokenRecord {
        let (hash, user, device, created, expires, lastUsed, canDelete) = try row.decode(
            (ByteBuffer, String, String, Int64, Int64, Int64, Bool).self)
        return TokenRecord(
            hash: Array(hash.readableBytesView), user: user, device: device, createdNs: created, expiresNs: expires,
            lastUsedNs: lastUsed, canDelete: canDelete)
    }

    func token(hash: [UInt8]) async throws -> TokenRecord? {
        // SQL-safe: tokenColumns is a literal.
        try await db.query(
            "SELECT \(unescaped: Self.tokenColumns) FROM tokens WHERE hash = \(ByteBuffer(bytes: hash))"
        ).first.map(Self.token)
    }

    func touch(hash: [UInt8], ns: Int64) async throws {
        try await db.query("UPDATE tokens SET last_used_ns = \(ns) WHERE hash = \(ByteBuffer(bytes: hash))")
    }

    func tokens(of user: String) async throws -> [TokenRecord] {
        // SQL-safe: tokenColumns is a literal.
        try await db.query(
            "SELECT \(unescaped: Self.tokenColumns) FROM tokens WHERE user_name = \(user) ORDER BY created_ns, hash"
        ).map(Self.token)
    }

    func removeToken(hash: [UInt8], of user: String) async throws {
        try await db.query("DELETE FROM tokens WHERE hash = \(ByteBuffer(bytes: hash)) AND user_name = \(user)")
    }

    func checkReachable() async throws {
        _ = try await db.query("SELECT 1")
    }

    func state(of user: String) async throws -> AccountState? {
        try await db.query("SELECT disabled, quota_bytes FROM accounts WHERE name = \(user)").first.map { row in
            let (disabled, quota) = try row.decode((Bool, Int64?).self)
            return AccountState(disabled: disabled, quotaBytes: quota)
        }
    }

    func summaries() async throws -> [AccountSummary] {
        try await db.query(
            """
            SELECT a.name, a.email, a.created_ns, max(t.last_used_ns), count(t.hash), a.disabled, a.quota_bytes
            FROM accounts a LEFT JOIN tokens t ON t.user_name = a.name GROUP BY a.name ORDER BY a.name
            """
        ).map { row in
            let (name, email, created, last, devices, disabled, quota) = try row.decode(
                (String, String, Int64, Int64?, Int, Bool, Int64?).self)
            return AccountSummary(
                name: name, email: email, createdNs: created, lastActivityNs: last, devices: devices,
                disabled: disabled, quotaBytes: quota)
        }
    }

    func setQuota(of user: String, bytes: Int64?) async throws -> Bool {
        try await !db.query("UPDATE accounts SET quota_bytes = \(bytes) WHERE name = \(user) RETURNING 1").isEmpty
    }

    func setDisabled(_ user: String, _ disabled: Bool) async throws -> Bool {
        try await !db.query("UPDATE accounts SET disabled = \(disabled) WHERE name = \(user) RETURNING 1").isEmpty
    }

    func deleteAccount(_ user: String) async throws -> Bool {
        // Its tokens go with it (ON DELETE CASCADE).
        try await !db.query("DELETE FROM accounts WHERE name = \(user) RETURNING 1").isEmpty
    }

    func setting(_ key: String) async throws -> String? {
        try await db.query("SELECT value FROM settings WHERE key = \(key)").first.map { row in
            String(decoding: try row.decode(ByteBuffer.self).readableBytesView, as: UTF8.self)
        }
    }

    func setSetting(_ key: String, _ value: String) async throws {
        try await db.query(
            """
            INSERT INTO settings(key, value) VALUES (\(key), \(ByteBuffer(bytes: Array(value.utf8))))
            ON CONFLICT (key) DO UPDATE SET value = excluded.value
            """)
    }
}
