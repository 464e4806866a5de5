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
    /// Set on the refusal of an upload that would exceed the space's quota.
    var refusesQuota = false

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
    /// The account's own quota, set by the operator (`server admin quota`); nil for the
    /// server's `--quota-bytes`.
    var quotaBytes: Int64? = nil

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

/// What an account store keeps of an account's login secret.
struct StoredSecret: Sendable {
    let salt: [UInt8]
    let hash: [UInt8]
    let iterations: Int
    let scheme: Int
    let origin: String
}

/// A new account, as registered.
struct NewAccount: Sendable {
    let name: String
    let email: String
    let secret: StoredSecret
    let createdNs: Int64
}

/// What the operator set for an account (`cabackup server admin`).
struct AccountState: Sendable {
    /// A disabled account's devices get 403 on every request, and it cannot log in.
    let disabled: Bool
    /// Its own quota; nil for the server's.
    let quotaBytes: Int64?
}

/// One account as the operator lists it.
public struct AccountSummary: Sendable, Encodable {
    public let name: String
    public let email: String
    public let createdNs: Int64
    /// The last time one of its devices was seen (tokens note it at most once a minute);
    /// nil when it has none.
    public let lastActivityNs: Int64?
    public let devices: Int
    public let disabled: Bool
    public let quotaBytes: Int64?
    /// Bytes its space holds (filled in from the space's files).
    public var usedBytes: Int64 = 0
}

/// A device token as stored: its SHA-256, never the token.
struct TokenRecord: Sendable {
    let hash: [UInt8]
    let user: String
    let device: String
    let createdNs: Int64
    let expiresNs: Int64
    let lastUsedNs: Int64
    let canDelete: Bool
}

/// Where the server keeps accounts and device tokens: the embedded default
/// (``SQLiteAccountRecords``, one file in the data directory) or a database shared by
/// several server instances. Only storage: what is checked, hashed and answered is
/// ``Accounts``', the same over every implementation.
protocol AccountRecords: Sendable {
    /// The key of the per-account login salts: made at the first start and the same for
    /// every instance afterwards.
    func loginSaltKey() async throws -> [UInt8]
    /// Adds an account; false when the name is taken.
    func insert(_ account: NewAccount) async throws -> Bool
    /// The stored login secret of `user`, nil for no such account.
    func secret(of user: String) async throws -> StoredSecret?
    /// Replaces the login secret of `user`.
    func replaceSecret(of user: String, with secret: StoredSecret) async throws
    /// Adds a token unless its account already holds `limit`; returns how many the account
    /// held before (the token was added when that is below `limit`).
    func add(_ token: TokenRecord, limit: Int) async throws -> Int
    /// The token with this hash, nil for none.
    func token(hash: [UInt8]) async throws -> TokenRecord?
    /// Records that the token was used at `ns`.
    func touch(hash: [UInt8], ns: Int64) async throws
    /// The tokens of `user`, oldest first.
    func tokens(of user: String) async throws -> [TokenRecord]
    /// Removes a token of `user`.
    func removeToken(hash: [UInt8], of user: String) async throws
    /// Throws when the store cannot be reached or read (for `/healthz`).
    func checkReachable() async throws

    // The operator's (`cabackup server admin`); every instance reads them per request.

    /// What the operator set for `user`; nil for no such account.
    func state(of user: String) async throws -> AccountState?
    /// Every account, by name.
    func summaries() async throws -> [AccountSummary]
    /// Sets or clears (nil) an account's own quota; false for no such account.
    func setQuota(of user: String, bytes: Int64?) async throws -> Bool
    /// Disables or enables an account; false for no such account.
    func setDisabled(_ user: String, _ disabled: Bool) async throws -> Bool
    /// Removes an account and its tokens; false for no such account.
    func deleteAccount(_ user: String) async throws -> Bool
    /// A server-wide setting (`registration`: `open` or `closed`); nil when never set.
    func setting(_ key: String) async throws -> String?
    func setSetting(_ key: String, _ value: String) async throws
}

/// Accounts and device tokens, over an ``AccountRecords`` store.
///
/// The server never sees a password: clients send a login secret derived from it
/// (scrypt, in a context of its own), which is stored only as a salted PBKDF2-HMAC-SHA-256
/// hash. Tokens are 32 random bytes, stored as their SHA-256.
///
/// Hashing runs on a thread of its own, outside any database lock, so a flood of logins
/// queues there while every other request goes on. An unknown name costs the same hash
/// as a known one and gets the same answer, and failed logins back off per client
/// address and name (``LoginBackoff``), so neither the answer, its time nor the back-off
/// tells whether an account exists, and nobody elsewhere can lock the owner out.
final class Accounts: Sendable {
    let records: any AccountRecords
    let tokenLifetimeNs: Int64
    let maxTokensPerAccount: Int
    static let iterations = 100_000
    private let hashing: NIOThreadPool
    private let backoff = LoginBackoff()
    /// The salt and hash an unknown name is checked against, so it costs what a known one does.
    private let decoy: (salt: [UInt8], hash: [UInt8])
    /// The key of the per-account login salts (``loginSalt(for:)``).
    private let saltKey: [UInt8]

    init(records: any AccountRecords, tokenLifetimeSeconds: Int64, maxTokensPerAccount: Int = 100) async throws {
        self.records = records
        saltKey = try await records.loginSaltKey()
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
        if try await records.setting("registration") == "closed" {
            throw APIError(403, "registration is closed on this server: ask its operator for an account")
        }
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
        let stored = StoredSecret(salt: salt, hash: hash, iterations: Self.iterations, scheme: scheme, origin: origin)
        guard try await records.insert(NewAccount(name: user, email: email, secret: stored, createdNs: Self.nowNs()))
        else { throw APIError(409, "user name '\(user)' is taken: choose another") }
    }

    /// Whether `secret`, sent under `scheme`, is the account's; an unknown account, or a
    /// secret of another scheme, costs the same hash and fails the same way.
    private func verify(_ stored: StoredSecret?, secret: [UInt8], scheme: Int) async throws -> Bool {
        let salt = stored?.salt ?? decoy.salt
        let computed = try await hash(secret, salt: salt, iterations: stored?.iterations ?? Self.iterations)
        guard let stored, stored.scheme == scheme else { return false }
        return constantTimeEqual(computed, stored.hash)
    }

    /// Checks a login and issues a device token. - Throws: 401 (wrong name or secret, one
    /// message for both), 429 while this address backs off for this name, 409 when the
    /// account holds its most tokens.
    func login(
        user: String, secret: String, scheme: Int, device: String, appendOnly: Bool, client: String
    ) async throws -> String {
        guard device.utf8.count <= 128 else { throw APIError(400, "device name is longer than 128 characters") }
        let s = try Self.decodeSecret(secret)
        let key = client + "\u{0}" + user
        if let wait = backoff.wait(key) {
            throw APIError(429, "too many failed logins from this address for this name: try again in \(wait) s")
        }
        guard try await verify(try await records.secret(of: user), secret: s, scheme: scheme) else {
            backoff.failed(key)
            throw APIError(401, "wrong user name or password")
        }
        backoff.succeeded(key)
        if try await records.state(of: user)?.disabled == true { throw Self.disabled(user) }
        let now = Self.nowNs()
        let token = hexString(secureRandomBytes(32))
        let record = TokenRecord(
            hash: Self.tokenHash(token), user: user, device: device.isEmpty ? "device" : device, createdNs: now,
            expiresNs: now + tokenLifetimeNs, lastUsedNs: now, canDelete: !appendOnly)
        let held = try await records.add(record, limit: maxTokensPerAccount)
        guard held < maxTokensPerAccount else {
            throw APIError(
                409,
                "the account holds \(held) device tokens, the most it may: revoke unused ones ('cabackup devices', then 'cabackup devices --revoke ID') and log in again"
            )
        }
        return token
    }

    /// The login scheme and origin an account's secret is bound to, for its own devices.
    func account(of caller: Caller) async throws -> (scheme: Int, origin: String) {
        guard let s = try await records.secret(of: caller.user) else {
            throw APIError(401, "the account is gone: log in again")
        }
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
        let stored = try await records.secret(of: caller.user)
        guard try await verify(stored, secret: p, scheme: stored?.scheme ?? 0) else {
            throw APIError(401, "the current password is wrong: nothing was changed")
        }
        let salt = secureRandomBytes(16)
        let hash = try await hash(n, salt: salt, iterations: Self.iterations)
        try await records.replaceSecret(
            of: caller.user,
            with: StoredSecret(salt: salt, hash: hash, iterations: Self.iterations, scheme: 2, origin: origin))
    }

    static func tokenHash(_ token: String) -> [UInt8] { sha256(Array(token.utf8)).withUnsafeBytes { Array($0) } }

    /// The caller of a request with `Authorization: Bearer TOKEN`. - Throws: 401.
    func authenticate(_ authorization: String?) async throws -> Caller {
        guard let a = authorization, a.hasPrefix("Bearer "), a.utf8.count < 200 else {
            throw APIError(401, "no token: log in first")
        }
        let hash = Self.tokenHash(String(a.dropFirst(7)))
        guard let t = try await records.token(hash: hash) else {
            throw APIError(401, "unknown or revoked token: log in again")
        }
        let now = Self.nowNs()
        guard now < t.expiresNs else { throw APIError(401, "the token has expired: log in again") }
        // Read on every request, so what the operator changes holds at once on every instance.
        guard let state = try await records.state(of: t.user) else {
            throw APIError(401, "the account is gone: register again or ask the server's operator")
        }
        if state.disabled { throw Self.disabled(t.user) }
        if now - t.lastUsedNs > 60_000_000_000 { try await records.touch(hash: hash, ns: now) }
        return Caller(user: t.user, tokenHash: hash, canDelete: t.canDelete, quotaBytes: state.quotaBytes)
    }

    static func disabled(_ user: String) -> APIError {
        APIError(403, "the account '\(user)' is disabled by the server's operator: ask them to enable it")
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

    func devices(of caller: Caller) async throws -> [Device] {
        try await records.tokens(of: caller.user).map { t in
            Device(
                id: String(hexString(t.hash).prefix(12)), device: t.device, created: formatRFC3339(ns: t.createdNs),
                last_used: formatRFC3339(ns: t.lastUsedNs), current: t.hash == caller.tokenHash,
                rights: t.canDelete ? "full" : "append-only")
        }
    }

    /// Revokes the caller's token whose public id is `id` (nil: the caller's own; another
    /// device's needs a full token).
    func revoke(_ caller: Caller, id: String?) async throws {
        if id != nil { try caller.requireFullRights("revoke other devices") }
        var target: [UInt8]? = id == nil ? caller.tokenHash : nil
        if let id, id.count >= 8 {
            target = try await records.tokens(of: caller.user).last { hexString($0.hash).hasPrefix(id.lowercased()) }?
                .hash
        }
        guard let target else { throw APIError(404, "no device of this account has the id '\(id ?? "")'") }
        try await records.removeToken(hash: target, of: caller.user)
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
        let now = Accounts.nowNs()
        guard let s = states.withLock({ $0[key] }), s.untilNs > now else { return nil }
        return (s.untilNs - now + 999_999_999) / 1_000_000_000
    }

    func failed(_ key: String) {
        let now = Accounts.nowNs()
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
        let now = Accounts.nowNs()
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
