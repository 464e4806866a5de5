import CABackup
import Foundation
import NIOPosix
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// An error answered to the client: an HTTP status and a one-line message that says what
/// is wrong and what to do. Never contains a password, secret or token.
struct APIError: Error {
    let status: Int
    let message: String

    init(_ status: Int, _ message: String) {
        self.status = status
        self.message = message
    }
}

/// Who a request is from, once its token checked out.
struct Caller: Sendable {
    let user: String
    let tokenHash: [UInt8]
    /// False for an append-only token: it may read, add and lock, never delete or change
    /// the account.
    let canDelete: Bool

    /// Refuses an append-only token with 403.
    func requireFullRights(_ what: String) throws {
        guard canDelete else {
            throw APIError(
                403,
                "this device's token is append-only: it may add data but not \(what); do that from a device logged in without --append-only"
            )
        }
    }
}

/// Accounts and device tokens, in `DIR/accounts.sqlite` (mode 0600, with its WAL).
///
/// The server never sees a password: clients send a login secret derived from it
/// (scrypt, in a context of its own), which is stored only as a salted PBKDF2-HMAC-SHA-256
/// hash. Tokens are 32 random bytes, stored as their SHA-256.
///
/// Hashing runs on a thread of its own, outside the database lock, so a flood of logins
/// queues there while every other request goes on. An unknown name costs the same hash
/// as a known one and gets the same answer, and failed logins back off per client
/// address and name (``LoginBackoff``), so neither the answer, its time nor the back-off
/// tells whether an account exists, and nobody elsewhere can lock the owner out.
final class AccountStore: Sendable {
    private let db: Mutex<SQLiteDatabase>
    let tokenLifetimeNs: Int64
    let maxTokensPerAccount: Int
    static let iterations = 100_000
    private let hashing: NIOThreadPool
    private let backoff = LoginBackoff()
    /// The salt and hash an unknown name is checked against, so it costs what a known one does.
    private let decoy: (salt: [UInt8], hash: [UInt8])

    /// The key of the per-account login salts (``loginSalt(for:)``), 32 random bytes made
    /// at the first start and kept in `DATA/login-salt-key` (0600).
    private let saltKey: [UInt8]

    init(path: String, tokenLifetimeSeconds: Int64, maxTokensPerAccount: Int = 100) throws {
        let keyPath = (path as NSString).deletingLastPathComponent + "/login-salt-key"
        if let key = FileManager.default.contents(atPath: keyPath), key.count == 32 {
            saltKey = Array(key)
        } else {
            let key = secureRandomBytes(32)
            guard
                FileManager.default.createFile(
                    atPath: keyPath, contents: Data(key), attributes: [.posixPermissions: 0o600])
            else { throw CABackupError.io(operation: "create", path: keyPath, errno: errno) }
            saltKey = key
        }
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
        for suffix in ["-wal", "-shm"] { chmod(path + suffix, 0o600) }
        db = Mutex(d)
        tokenLifetimeNs = tokenLifetimeSeconds * 1_000_000_000
        self.maxTokensPerAccount = maxTokensPerAccount
        hashing = NIOThreadPool(numberOfThreads: 1)
        hashing.start()
        let salt = secureRandomBytes(16)
        decoy = (salt, pbkdf2SHA256(secureRandomBytes(32), salt: salt, iterations: Self.iterations))
    }

    deinit { try? hashing.syncShutdownGracefully() }

    /// PBKDF2 of a login secret, on the hashing thread.
    private func hash(_ secret: [UInt8], salt: [UInt8], iterations: Int) async throws -> [UInt8] {
        try await hashing.runIfActive { pbkdf2SHA256(secret, salt: salt, iterations: iterations) }
    }

    static func nowNs() -> Int64 { Int64(Date().timeIntervalSince1970 * 1e9) }

    static func checkEmail(_ e: String) throws {
        guard e.utf8.count <= 254 else { throw APIError(400, "e-mail address is longer than 254 characters") }
        let parts = e.split(separator: "@", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, parts[1].contains("."), !parts[1].hasPrefix("."),
            !parts[1].hasSuffix("."), !e.contains(where: { $0.isWhitespace || $0.isNewline })
        else {
            throw APIError(400, "'\(e.prefix(80))' is not an e-mail address: use name@example.org")
        }
    }

    static func decodeSecret(_ s: String) throws -> [UInt8] {
        guard s.utf8.count == 64, let id = ObjectID(hex: s) else {
            throw APIError(400, "the login secret must be 64 hex digits (derive it with a cabackup client)")
        }
        return id.withUnsafeBytes { Array($0) }
    }

    /// The salt a client mixes into the login secret of `user` on this server: a keyed
    /// hash of the name (PBKDF2-HMAC-SHA-256 with one iteration under ``saltKey``), the
    /// same for every name whether or not it has an account, so handing it out reveals
    /// nothing.
    func loginSalt(for user: String) -> [UInt8] {
        pbkdf2SHA256(saltKey, salt: Array("cabackup login salt\u{0}".utf8) + Array(user.utf8), iterations: 1)
    }

    /// Creates an account. - Throws: 400 for invalid fields, 409 for a taken name.
    func register(user: String, email: String, secret: String, scheme: Int, origin: String) async throws {
        guard scheme == 1 || scheme == 2, origin.utf8.count <= 300 else {
            throw APIError(400, "unknown login scheme or origin: upgrade cabackup")
        }
        guard isValidUserName(user) else {
            throw APIError(400, "user name must be 1-64 characters of a-z 0-9 . _ - (and not . or ..)")
        }
        try Self.checkEmail(email)
        let s = try Self.decodeSecret(secret)
        let salt = secureRandomBytes(16)
        let hash = try await hash(s, salt: salt, iterations: Self.iterations)
        try db.withLock { db in
            let q = try db.prepare("SELECT 1 FROM users WHERE name = ?")
            q.bind(1, user)
            if try q.step() { throw APIError(409, "user name '\(user)' is taken: choose another") }
            let ins = try db.prepare(
                "INSERT INTO users(name, email, salt, hash, iterations, created_ns, scheme, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            )
            ins.bind(1, user)
            ins.bind(2, email)
            ins.bind(3, bytes: salt)
            ins.bind(4, bytes: hash)
            ins.bind(5, Self.iterations)
            ins.bind(6, Self.nowNs())
            ins.bind(7, scheme)
            ins.bind(8, origin)
            try ins.run()
        }
    }

    /// Checks a login and issues a device token. - Throws: 401 (wrong name or secret, one
    /// message for both), 429 while this address backs off for this name, 409 when the
    /// account holds its most tokens.
    /// What is stored for an account's login secret.
    private struct StoredSecret {
        let salt: [UInt8]
        let hash: [UInt8]
        let iterations: Int
        let scheme: Int
        let origin: String
    }

    private func storedSecret(_ user: String) throws -> StoredSecret? {
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

    /// Whether `secret`, sent under `scheme`, is the account's; an unknown account, or a
    /// secret of another scheme, costs the same hash and fails the same way.
    private func verify(_ stored: StoredSecret?, secret: [UInt8], scheme: Int) async throws -> Bool {
        let salt = stored?.salt ?? decoy.salt
        let computed = try await hash(secret, salt: salt, iterations: stored?.iterations ?? Self.iterations)
        guard let stored, stored.scheme == scheme else { return false }
        return constantTimeEqual(computed, stored.hash)
    }

    func login(
        user: String, secret: String, scheme: Int, device: String, appendOnly: Bool, client: String
    ) async throws -> String {
        guard device.utf8.count <= 128 else { throw APIError(400, "device name is longer than 128 characters") }
        let s = try Self.decodeSecret(secret)
        let key = client + "\u{0}" + user
        if let wait = backoff.wait(key) {
            throw APIError(429, "too many failed logins from this address for this name: try again in \(wait) s")
        }
        guard try await verify(try storedSecret(user), secret: s, scheme: scheme) else {
            backoff.failed(key)
            throw APIError(401, "wrong user name or password")
        }
        backoff.succeeded(key)
        return try db.withLock { db in
            let count = try db.prepare("SELECT count(*) FROM tokens WHERE user = ?")
            count.bind(1, user)
            _ = try count.step()
            let held = count.int(0)
            count.reset()
            guard held < Int64(maxTokensPerAccount) else {
                throw APIError(
                    409,
                    "the account holds \(held) device tokens, the most it may: revoke unused ones ('cabackup devices', then 'cabackup devices --revoke ID') and log in again"
                )
            }
            let now = Self.nowNs()
            let token = hexString(secureRandomBytes(32))
            let ins = try db.prepare(
                "INSERT INTO tokens(hash, user, device, created_ns, expires_ns, last_used_ns, can_delete) VALUES (?, ?, ?, ?, ?, ?, ?)"
            )
            ins.bind(1, bytes: Self.tokenHash(token))
            ins.bind(2, user)
            ins.bind(3, device.isEmpty ? "device" : device)
            ins.bind(4, now)
            ins.bind(5, now + tokenLifetimeNs)
            ins.bind(6, now)
            ins.bind(7, appendOnly ? 0 : 1)
            try ins.run()
            return token
        }
    }

    /// The login scheme and origin an account's secret is bound to, for its own devices.
    func account(of caller: Caller) throws -> (scheme: Int, origin: String) {
        guard let s = try storedSecret(caller.user) else { throw APIError(401, "the account is gone: log in again") }
        return (s.scheme, s.origin)
    }

    /// Replaces the account's login secret (scheme 2, bound to `origin`) when `proof` is the
    /// secret stored now: how a logged-in device moves an account to the current scheme or
    /// to a new server address. Needs a full token. - Throws: 403, 401 for a wrong proof.
    func rebind(_ caller: Caller, proof: String, secret: String, origin: String) async throws {
        try caller.requireFullRights("change the account's login")
        guard origin.utf8.count <= 300 else { throw APIError(400, "the origin is longer than 300 bytes") }
        let p = try Self.decodeSecret(proof)
        let n = try Self.decodeSecret(secret)
        let stored = try storedSecret(caller.user)
        guard try await verify(stored, secret: p, scheme: stored?.scheme ?? 0) else {
            throw APIError(401, "the current password is wrong: nothing was changed")
        }
        let salt = secureRandomBytes(16)
        let hash = try await hash(n, salt: salt, iterations: Self.iterations)
        try db.withLock { db in
            let u = try db.prepare(
                "UPDATE users SET salt = ?, hash = ?, iterations = ?, scheme = 2, origin = ? WHERE name = ?")
            u.bind(1, bytes: salt)
            u.bind(2, bytes: hash)
            u.bind(3, Self.iterations)
            u.bind(4, origin)
            u.bind(5, caller.user)
            try u.run()
        }
    }

    static func tokenHash(_ token: String) -> [UInt8] { sha256(Array(token.utf8)).withUnsafeBytes { Array($0) } }

    /// The caller of a request with `Authorization: Bearer TOKEN`. - Throws: 401.
    func authenticate(_ authorization: String?) throws -> Caller {
        guard let a = authorization, a.hasPrefix("Bearer "), a.utf8.count < 200 else {
            throw APIError(401, "no token: log in first")
        }
        let hash = Self.tokenHash(String(a.dropFirst(7)))
        return try db.withLock { db in
            let q = try db.prepare("SELECT user, expires_ns, can_delete, last_used_ns FROM tokens WHERE hash = ?")
            q.bind(1, bytes: hash)
            guard try q.step() else { throw APIError(401, "unknown or revoked token: log in again") }
            let user = q.text(0)
            let expires = q.int(1)
            let canDelete = q.int(2) != 0
            let lastUsed = q.int(3)
            q.reset()
            let now = Self.nowNs()
            guard now < expires else { throw APIError(401, "the token has expired: log in again") }
            if now - lastUsed > 60_000_000_000 {
                let u = try db.prepare("UPDATE tokens SET last_used_ns = ? WHERE hash = ?")
                u.bind(1, now)
                u.bind(2, bytes: hash)
                try u.run()
            }
            return Caller(user: user, tokenHash: hash, canDelete: canDelete)
        }
    }

    struct Device: Encodable {
        let id: String
        let device: String
        let created: String
        let last_used: String
        let current: Bool
        /// `full` or `append-only`.
        let rights: String
    }

    func devices(of caller: Caller) throws -> [Device] {
        try db.withLock { db in
            let q = try db.prepare(
                "SELECT hash, device, created_ns, last_used_ns, can_delete FROM tokens WHERE user = ? ORDER BY created_ns"
            )
            q.bind(1, caller.user)
            var out: [Device] = []
            while try q.step() {
                let h = q.bytes(0)
                out.append(
                    Device(
                        id: String(hexString(h).prefix(12)), device: q.text(1), created: formatRFC3339(ns: q.int(2)),
                        last_used: formatRFC3339(ns: q.int(3)), current: h == caller.tokenHash,
                        rights: q.int(4) != 0 ? "full" : "append-only"))
            }
            return out
        }
    }

    /// Revokes the caller's token whose public id is `id` (nil: the caller's own; another
    /// device's needs a full token).
    func revoke(_ caller: Caller, id: String?) throws {
        if id != nil { try caller.requireFullRights("revoke other devices") }
        try db.withLock { db in
            var target: [UInt8]? = id == nil ? caller.tokenHash : nil
            if let id, id.count >= 8 {
                let q = try db.prepare("SELECT hash FROM tokens WHERE user = ?")
                q.bind(1, caller.user)
                while try q.step() {
                    let h = q.bytes(0)
                    if hexString(h).hasPrefix(id.lowercased()) { target = h }
                }
                q.reset()
            }
            guard let target else { throw APIError(404, "no device of this account has the id '\(id ?? "")'") }
            let d = try db.prepare("DELETE FROM tokens WHERE hash = ?")
            d.bind(1, bytes: target)
            try d.run()
        }
    }
}

/// Failed logins per client address and account name: 5 free, then a wait of 1 s that
/// doubles with each further failure up to 15 minutes. A failure an hour after the last
/// starts the count again, and a success clears it. Keyed by address too, so a guesser
/// elsewhere never delays the owner; unknown names back off exactly like known ones.
/// At most 100,000 keys are kept (expired ones go first).
final class LoginBackoff: Sendable {
    private struct State {
        var failures: Int
        var lastNs: Int64
        var untilNs: Int64
    }
    private let states = Mutex<[String: State]>([:])
    static let freeFailures = 5
    static let capacity = 100_000

    /// Seconds to wait before the next try, or nil when one may be made now.
    func wait(_ key: String) -> Int64? {
        let now = AccountStore.nowNs()
        guard let s = states.withLock({ $0[key] }), s.untilNs > now else { return nil }
        return (s.untilNs - now + 999_999_999) / 1_000_000_000
    }

    func failed(_ key: String) {
        let now = AccountStore.nowNs()
        states.withLock { all in
            var s = all[key] ?? State(failures: 0, lastNs: now, untilNs: 0)
            if now - s.lastNs > 3600 * 1_000_000_000 { s.failures = 0 }
            s.failures += 1
            s.lastNs = now
            if s.failures >= Self.freeFailures {
                s.untilNs = now + min(900, 1 << min(s.failures - Self.freeFailures, 10)) * 1_000_000_000
            }
            all[key] = s
            if all.count > Self.capacity {
                all = all.filter { $0.value.untilNs > now || now - $0.value.lastNs < 3600 * 1_000_000_000 }
                if all.count > Self.capacity { all.removeAll() }
            }
        }
    }

    func succeeded(_ key: String) { states.withLock { _ = $0.removeValue(forKey: key) } }
}

/// At most `limit` events per key (a client address) in each window of `windowSeconds`.
/// At most 100,000 keys are kept; past that, windows that ended are dropped.
final class RateLimiter: Sendable {
    private let counts = Mutex<[String: (startNs: Int64, count: Int)]>([:])
    let limit: Int
    let windowNs: Int64

    init(limit: Int, windowSeconds: Int64) {
        self.limit = limit
        windowNs = windowSeconds * 1_000_000_000
    }

    /// Counts one event; false when the key is over its limit in this window.
    func allow(_ key: String) -> Bool {
        let now = AccountStore.nowNs()
        return counts.withLock { all in
            var entry = all[key] ?? (now, 0)
            if now - entry.startNs >= windowNs { entry = (now, 0) }
            entry.count += 1
            all[key] = entry
            if all.count > 100_000 {
                all = all.filter { now - $0.value.startNs < windowNs }
            }
            return entry.count <= limit
        }
    }
}
