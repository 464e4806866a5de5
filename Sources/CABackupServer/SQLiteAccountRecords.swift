import CABackup
import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Accounts and device tokens of a single server in `DIR/accounts.sqlite` (mode 0600, with
/// its WAL), and the login-salt key in `DIR/login-salt-key` (0600): the embedded default.
final class SQLiteAccountRecords: AccountRecords {
    private let db: Mutex<SQLiteDatabase>
    private let saltKeyPath: String

    init(path: String) throws {
        saltKeyPath = (path as NSString).deletingLastPathComponent + "/login-salt-key"
        // Created 0600 before SQLite opens it: its WAL and shared-memory files take the
        // same mode.
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        if fd >= 0 { close(fd) }
        chmod(path, 0o600)
        let d = try SQLiteDatabase(path: path)
        try d.execute(
            """
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS users(name TEXT PRIMARY KEY, email TEXT NOT NULL, salt BLOB NOT NULL,
                hash BLOB NOT NULL, iterations INTEGER NOT NULL, created_ns INTEGER NOT NULL,
                failed INTEGER NOT NULL DEFAULT 0, locked_until_ns INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE IF NOT EXISTS tokens(hash BLOB PRIMARY KEY, user TEXT NOT NULL, device TEXT NOT NULL,
                created_ns INTEGER NOT NULL, expires_ns INTEGER NOT NULL, last_used_ns INTEGER NOT NULL,
                can_delete INTEGER NOT NULL DEFAULT 1);
            CREATE INDEX IF NOT EXISTS tokens_by_user ON tokens(user);
            """)
        // Accounts made before login secrets were bound to the server's origin have
        // scheme 1 and no origin (see ``LoginScheme``).
        var columns = Set<String>()
        let info = try d.prepare("PRAGMA table_info(users)")
        while try info.step() { columns.insert(info.text(1)) }
        info.reset()
        if !columns.contains("scheme") {
            try d.execute(
                """
                ALTER TABLE users ADD COLUMN scheme INTEGER NOT NULL DEFAULT 1;
                ALTER TABLE users ADD COLUMN origin TEXT NOT NULL DEFAULT '';
                """)
        }
        // What the operator sets (`server admin`), added after the first release.
        if !columns.contains("disabled") {
            try d.execute(
                """
                ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
                ALTER TABLE users ADD COLUMN quota_bytes INTEGER;
                """)
        }
        try d.execute("CREATE TABLE IF NOT EXISTS settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);")
        for suffix in ["-wal", "-shm"] { chmod(path + suffix, 0o600) }
        db = Mutex(d)
    }

    func loginSaltKey() throws -> [UInt8] {
        if let key = FileManager.default.contents(atPath: saltKeyPath), key.count == 32 { return Array(key) }
        let key = secureRandomBytes(32)
        guard
            FileManager.default.createFile(
                atPath: saltKeyPath, contents: Data(key), attributes: [.posixPermissions: 0o600])
        else { throw CABackupError.io(operation: "create", path: saltKeyPath, errno: errno) }
        return key
    }

    func insert(_ account: NewAccount) throws -> Bool {
        try db.withLock { db in
            let q = try db.prepare("SELECT 1 FROM users WHERE name = ?")
            q.bind(1, account.name)
            if try q.step() { return false }
            let ins = try db.prepare(
                "INSERT INTO users(name, email, salt, hash, iterations, created_ns, scheme, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            )
            ins.bind(1, account.name)
            ins.bind(2, account.email)
            ins.bind(3, bytes: account.secret.salt)
            ins.bind(4, bytes: account.secret.hash)
            ins.bind(5, account.secret.iterations)
            ins.bind(6, account.createdNs)
            ins.bind(7, account.secret.scheme)
            ins.bind(8, account.secret.origin)
            try ins.run()
            return true
        }
    }

    func secret(of user: String) throws -> StoredSecret? {
        try db.withLock { db in
            let q = try db.prepare("SELECT salt, hash, iterations, scheme, origin FROM users WHERE name = ?")
            q.bind(1, user)
            defer { q.reset() }
            guard try q.step() else { return nil }
            return StoredSecret(
                salt: q.bytes(0), hash: q.bytes(1), iterations: Int(q.int(2)), scheme: Int(q.int(3)),
                origin: q.text(4))
        }
    }

    func replaceSecret(of user: String, with secret: StoredSecret) throws {
        try db.withLock { db in
            let u = try db.prepare(
                "UPDATE users SET salt = ?, hash = ?, iterations = ?, scheme = ?, origin = ? WHERE name = ?")
            u.bind(1, bytes: secret.salt)
            u.bind(2, bytes: secret.hash)
            u.bind(3, secret.iterations)
            u.bind(4, secret.scheme)
            u.bind(5, secret.origin)
            u.bind(6, user)
            try u.run()
        }
    }

    func add(_ token: TokenRecord, limit: Int) throws -> Int {
        try db.withLock { db in
            let count = try db.prepare("SELECT count(*) FROM tokens WHERE user = ?")
            count.bind(1, token.user)
            _ = try count.step()
            let held = Int(count.int(0))
            count.reset()
            guard held < limit else { return held }
            let ins = try db.prepare(
                "INSERT INTO tokens(hash, user, device, created_ns, expires_ns, last_used_ns, can_delete) VALUES (?, ?, ?, ?, ?, ?, ?)"
            )
            ins.bind(1, bytes: token.hash)
            ins.bind(2, token.user)
            ins.bind(3, token.device)
            ins.bind(4, token.createdNs)
            ins.bind(5, token.expiresNs)
            ins.bind(6, token.lastUsedNs)
            ins.bind(7, token.canDelete ? 1 : 0)
            try ins.run()
            return held
        }
    }

    private static let tokenColumns = "hash, user, device, created_ns, expires_ns, last_used_ns, can_delete"

    private static func token(_ q: SQLiteStatement) -> TokenRecord {
        TokenRecord(
            hash: q.bytes(0), user: q.text(1), device: q.text(2), createdNs: q.int(3), expiresNs: q.int(4),
            lastUsedNs: q.int(5), canDelete: q.int(6) != 0)
    }

    func token(hash: [UInt8]) throws -> TokenRecord? {
        try db.withLock { db in
            // SQL-safe: tokenColumns is a literal.
            let q = try db.prepare("SELECT \(Self.tokenColumns) FROM tokens WHERE hash = ?")
            q.bind(1, bytes: hash)
            defer { q.reset() }
            return try q.step() ? Self.token(q) : nil
        }
    }

    func touch(hash: [UInt8], ns: Int64) throws {
        try db.withLock { db in
            let u = try db.prepare("UPDATE tokens SET last_used_ns = ? WHERE hash = ?")
            u.bind(1, ns)
            u.bind(2, bytes: hash)
            try u.run()
        }
    }

    func tokens(of user: String) throws -> [TokenRecord] {
        try db.withLock { db in
            // SQL-safe: tokenColumns is a literal.
            let q = try db.prepare("SELECT \(Self.tokenColumns) FROM tokens WHERE user = ? ORDER BY created_ns")
            q.bind(1, user)
            var out: [TokenRecord] = []
            while try q.step() { out.append(Self.token(q)) }
            return out
        }
    }

    func removeToken(hash: [UInt8], of user: String) throws {
        try db.withLock { db in
            let d = try db.prepare("DELETE FROM tokens WHERE hash = ? AND user = ?")
            d.bind(1, bytes: hash)
            d.bind(2, user)
            try d.run()
        }
    }

    func checkReachable() throws {
        try db.withLock { db in
            let q = try db.prepare("SELECT count(*) FROM users")
            _ = try q.step()
            q.reset()
        }
    }

    func state(of user: String) throws -> AccountState? {
        try db.withLock { db in
            let q = try db.prepare("SELECT disabled, quota_bytes FROM users WHERE name = ?")
            q.bind(1, user)
            defer { q.reset() }
            guard try q.step() else { return nil }
            return AccountState(disabled: q.int(0) != 0, quotaBytes: q.isNull(1) ? nil : q.int(1))
        }
    }

    func summaries() throws -> [AccountSummary] {
        try db.withLock { db in
            let q = try db.prepare(
                """
                SELECT u.name, u.email, u.created_ns, max(t.last_used_ns), count(t.hash), u.disabled, u.quota_bytes
                FROM users u LEFT JOIN tokens t ON t.user = u.name GROUP BY u.name ORDER BY u.name
                """)
            var out: [AccountSummary] = []
            while try q.step() {
                out.append(
                    AccountSummary(
                        name: q.text(0), email: q.text(1), createdNs: q.int(2),
                        lastActivityNs: q.isNull(3) ? nil : q.int(3),
                        devices: Int(q.int(4)), disabled: q.int(5) != 0, quotaBytes: q.isNull(6) ? nil : q.int(6)))
            }
            return out
        }
    }

    /// Runs one UPDATE or DELETE with `user` bound last; true when it changed a row.
    private func change(
        _ sql: String, _ bind: (SQLiteStatement) -> Void = { _ in }, user: String, at index: Int32
    )
        throws -> Bool
    {
        try db.withLock { db in
            // SQL-safe: every caller passes a literal; values are bound.
            let u = try db.prepare(sql)
            bind(u)
            u.bind(index, user)
            try u.run()
            return db.changes > 0
        }
    }

    func setQuota(of user: String, bytes: Int64?) throws -> Bool {
        try change(
            "UPDATE users SET quota_bytes = ? WHERE name = ?",
            { u in
                if let bytes { u.bind(1, bytes) } else { u.bindNull(1) }
            }, user: user, at: 2)
    }

    func setDisabled(_ user: String, _ disabled: Bool) throws -> Bool {
        try change("UPDATE users SET disabled = ? WHERE name = ?", { $0.bind(1, disabled ? 1 : 0) }, user: user, at: 2)
    }

    func deleteAccount(_ user: String) throws -> Bool {
        _ = try change("DELETE FROM tokens WHERE user = ?", user: user, at: 1)
        return try change("DELETE FROM users WHERE name = ?", user: user, at: 1)
    }

    func setting(_ key: String) throws -> String? {
        try db.withLock { db in
            let q = try db.prepare("SELECT value FROM settings WHERE key = ?")
            q.bind(1, key)
            defer { q.reset() }
            return try q.step() ? q.text(0) : nil
        }
    }

    func setSetting(_ key: String, _ value: String) throws {
        try db.withLock { db in
            let u = try db.prepare(
                "INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
            u.bind(1, key)
            u.bind(2, value)
            try u.run()
        }
    }
}
