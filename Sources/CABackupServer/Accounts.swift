import CABackup
import Foundation
import Synchronization

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
    let canDelete: Bool
}

/// Accounts and device tokens, in `DIR/accounts.sqlite`.
///
/// The server never sees a password: clients send a login secret derived from it
/// (scrypt, in a context of its own), which is stored only as a salted PBKDF2-HMAC-SHA-256
/// hash. Tokens are 32 random bytes, stored as their SHA-256. Failed logins back off per
/// account (not per address: many devices share a NAT).
final class AccountStore: Sendable {
    private let db: Mutex<SQLiteDatabase>
    let tokenLifetimeNs: Int64
    static let iterations = 100_000
    /// Failures allowed before the account backs off: 1 s, then doubling up to 15 minutes.
    static let freeFailures = 5

    init(path: String, tokenLifetimeSeconds: Int64) throws {
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
        db = Mutex(d)
        tokenLifetimeNs = tokenLifetimeSeconds * 1_000_000_000
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

    /// Creates an account. - Throws: 400 for invalid fields, 409 for a taken name.
    func register(user: String, email: String, secret: String) throws {
        guard isValidUserName(user) else {
            throw APIError(400, "user name must be 1-64 characters of a-z 0-9 . _ - (and not . or ..)")
        }
        try Self.checkEmail(email)
        let s = try Self.decodeSecret(secret)
        let salt = secureRandomBytes(16)
        let hash = pbkdf2SHA256(s, salt: salt, iterations: Self.iterations)
        try db.withLock { db in
            let q = try db.prepare("SELECT 1 FROM users WHERE name = ?")
            q.bind(1, user)
            if try q.step() { throw APIError(409, "user name '\(user)' is taken: choose another") }
            let ins = try db.prepare(
                "INSERT INTO users(name, email, salt, hash, iterations, created_ns) VALUES (?, ?, ?, ?, ?, ?)")
            ins.bind(1, user)
            ins.bind(2, email)
            ins.bind(3, bytes: salt)
            ins.bind(4, bytes: hash)
            ins.bind(5, Self.iterations)
            ins.bind(6, Self.nowNs())
            try ins.run()
        }
    }

    /// Checks a login and issues a device token. - Throws: 401 (wrong name or secret, one
    /// message for both), 429 while the account backs off.
    func login(user: String, secret: String, device: String) throws -> String {
        guard device.utf8.count <= 128 else { throw APIError(400, "device name is longer than 128 characters") }
        let s = try Self.decodeSecret(secret)
        return try db.withLock { db in
            let q = try db.prepare("SELECT salt, hash, iterations, failed, locked_until_ns FROM users WHERE name = ?")
            q.bind(1, user)
            guard try q.step() else { throw APIError(401, "wrong user name or password") }
            let salt = q.bytes(0)
            let hash = q.bytes(1)
            let iterations = Int(q.int(2))
            let failed = q.int(3)
            let lockedUntil = q.int(4)
            q.reset()
            let now = Self.nowNs()
            if now < lockedUntil {
                let wait = (lockedUntil - now + 999_999_999) / 1_000_000_000
                throw APIError(429, "too many failed logins for '\(user)': try again in \(wait) s")
            }
            guard constantTimeEqual(pbkdf2SHA256(s, salt: salt, iterations: iterations), hash) else {
                let f = failed + 1
                var until: Int64 = 0
                if f >= Int64(Self.freeFailures) {
                    until = now + min(900, 1 << min(f - Int64(Self.freeFailures), 10)) * 1_000_000_000
                }
                let u = try db.prepare("UPDATE users SET failed = ?, locked_until_ns = ? WHERE name = ?")
                u.bind(1, f)
                u.bind(2, until)
                u.bind(3, user)
                try u.run()
                throw APIError(401, "wrong user name or password")
            }
            let reset = try db.prepare("UPDATE users SET failed = 0, locked_until_ns = 0 WHERE name = ?")
            reset.bind(1, user)
            try reset.run()
            let token = hexString(secureRandomBytes(32))
            let ins = try db.prepare(
                "INSERT INTO tokens(hash, user, device, created_ns, expires_ns, last_used_ns) VALUES (?, ?, ?, ?, ?, ?)"
            )
            ins.bind(1, bytes: Self.tokenHash(token))
            ins.bind(2, user)
            ins.bind(3, device.isEmpty ? "device" : device)
            ins.bind(4, now)
            ins.bind(5, now + tokenLifetimeNs)
            ins.bind(6, now)
            try ins.run()
            return token
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
    }

    func devices(of caller: Caller) throws -> [Device] {
        try db.withLock { db in
            let q = try db.prepare(
                "SELECT hash, device, created_ns, last_used_ns FROM tokens WHERE user = ? ORDER BY created_ns")
            q.bind(1, caller.user)
            var out: [Device] = []
            while try q.step() {
                let h = q.bytes(0)
                out.append(
                    Device(
                        id: String(hexString(h).prefix(12)), device: q.text(1), created: formatRFC3339(ns: q.int(2)),
                        last_used: formatRFC3339(ns: q.int(3)), current: h == caller.tokenHash))
            }
            return out
        }
    }

    /// Revokes the caller's token whose public id is `id` (nil: the caller's own).
    func revoke(_ caller: Caller, id: String?) throws {
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
