import CABackup
import Foundation
import Testing

@testable import CABackupServer

/// Where a test keeps account or space records: each store's tests only say how to make one.
enum RecordsKind: String, CaseIterable, CustomTestStringConvertible {
    /// SQLite files in a temporary directory.
    case sqlite
    /// A real PostgreSQL cluster of the test's own (``PostgresServer``).
    case postgres

    var testDescription: String { rawValue }
}

/// One store of account records, and the instances a test opened over it (as server
/// instances would).
final class RecordsStore {
    let kind: RecordsKind
    let postgres: PostgresServer?
    private let dir = Scratch()
    private var databases: [PostgresDatabase] = []

    private init(_ kind: RecordsKind) async throws {
        self.kind = kind
        postgres = kind == .postgres ? try await PostgresServer() : nil
    }

    /// Runs `body` with a fresh store of `kind`, then closes every instance and deletes it.
    static func with(_ kind: RecordsKind, _ body: (RecordsStore) async throws -> Void) async throws {
        let store = try await RecordsStore(kind)
        do {
            try await body(store)
        } catch {
            await store.close()
            throw error
        }
        await store.close()
    }

    /// Another instance over the store: a second server sharing the same accounts.
    func instance() async throws -> any AccountRecords {
        guard postgres != nil else { return try SQLiteAccountRecords(path: file("accounts.sqlite")) }
        return PostgresAccountRecords(try await database())
    }

    /// A file in the store's temporary directory.
    func file(_ name: String) -> String { dir.file(name) }

    /// A connection of its own to the PostgreSQL database, as another server instance
    /// opens, closed with the store.
    func database() async throws -> PostgresDatabase {
        guard let postgres else { throw CABackupError.invalidArgument("a SQLite store has no PostgreSQL database") }
        let db = try await postgres.open()
        databases.append(db)
        return db
    }

    private func close() async {
        for db in databases { await db.close() }
    }
}

/// A login secret as a client sends it: 64 hex digits.
private func secretHex(_ seed: UInt8) -> String { hexString([UInt8](repeating: seed, count: 32)) }

private func account(_ name: String, salt: UInt8 = 1) -> NewAccount {
    NewAccount(
        name: name, email: "\(name)@example.org",
        secret: StoredSecret(
            salt: [UInt8](repeating: salt, count: 16), hash: [UInt8](repeating: salt &+ 1, count: 32),
            iterations: 1234, scheme: 2, origin: "https://backup.example.org"),
        createdNs: 1_700_000_000_000_000_000)
}

private func token(_ n: UInt8, of user: String, created: Int64 = 1_000, canDelete: Bool = true) -> TokenRecord {
    TokenRecord(
        hash: [UInt8](repeating: n, count: 31) + [0xFF], user: user, device: "device \(n)", createdNs: created,
        expiresNs: created + 1_000_000, lastUsedNs: created, canDelete: canDelete)
}

private func equal(_ a: TokenRecord?, _ b: TokenRecord?) -> Bool {
    guard let a, let b else { return a == nil && b == nil }
    return a.hash == b.hash && a.user == b.user && a.device == b.device && a.createdNs == b.createdNs
        && a.expiresNs == b.expiresNs && a.lastUsedNs == b.lastUsedNs && a.canDelete == b.canDelete
}

@Suite("account records: the same behaviour in SQLite and in PostgreSQL")
struct AccountRecordsTests {
    @Test(
        "a taken name is refused; the secret round-trips every field and can be replaced",
        arguments: RecordsKind.allCases)
    func accountsAndSecrets(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let r = try await store.instance()
            #expect(try await r.insert(account("alice")))
            #expect(try await !r.insert(account("alice", salt: 9)))
            let s = try #require(try await r.secret(of: "alice"))
            #expect(s.salt == [UInt8](repeating: 1, count: 16) && s.hash == [UInt8](repeating: 2, count: 32))
            #expect(s.iterations == 1234 && s.scheme == 2 && s.origin == "https://backup.example.org")
            #expect(try await r.secret(of: "bob") == nil)

            let new = StoredSecret(salt: [7, 7], hash: [8, 8, 8], iterations: 5, scheme: 1, origin: "")
            try await r.replaceSecret(of: "alice", with: new)
            let t = try #require(try await r.secret(of: "alice"))
            #expect(t.salt == [7, 7] && t.hash == [8, 8, 8] && t.iterations == 5 && t.scheme == 1 && t.origin == "")
        }
    }

    @Test(
        "the operator's state: quota, disabled, summaries with devices, settings, delete with its tokens",
        arguments: RecordsKind.allCases)
    func operatorState(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let r = try await store.instance()
            #expect(try await r.insert(account("alice")))
            #expect(try await r.insert(account("bob")))
            _ = try await r.add(token(1, of: "alice", created: 5_000), limit: 9)
            _ = try await r.add(token(2, of: "alice", created: 6_000), limit: 9)
            let fresh = try #require(try await r.state(of: "alice"))
            #expect(!fresh.disabled && fresh.quotaBytes == nil)
            #expect(try await r.state(of: "carol") == nil)

            #expect(try await r.setQuota(of: "alice", bytes: 1 << 30))
            #expect(try await r.setDisabled("alice", true))
            #expect(try await !r.setDisabled("carol", true))
            let set = try #require(try await r.state(of: "alice"))
            #expect(set.disabled && set.quotaBytes == 1 << 30)
            #expect(try await r.setQuota(of: "alice", bytes: nil))
            #expect(try await r.state(of: "alice")?.quotaBytes == nil)

            let all = try await r.summaries()
            #expect(all.map(\.name) == ["alice", "bob"])
            #expect(all[0].devices == 2 && all[0].lastActivityNs == 6_000 && all[0].disabled)
            #expect(all[1].devices == 0 && all[1].lastActivityNs == nil && !all[1].disabled)

            #expect(try await r.setting("registration") == nil)
            try await r.setSetting("registration", "closed")
            try await r.setSetting("registration", "open")
            #expect(try await r.setting("registration") == "open")

            #expect(try await r.deleteAccount("alice"))
            #expect(try await !r.deleteAccount("alice"))
            #expect(try await r.state(of: "alice") == nil)
            #expect(try await r.tokens(of: "alice").isEmpty)
            #expect(try await r.token(hash: token(1, of: "alice").hash) == nil)
            try await r.checkReachable()
        }
    }

    @Test("tokens are added up to the limit, then refused with the count held", arguments: RecordsKind.allCases)
    func tokenLimit(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let r = try await store.instance()
            #expect(try await r.insert(account("alice")))
            for n in 0..<3 { #expect(try await r.add(token(UInt8(n), of: "alice"), limit: 3) == n) }
            #expect(try await r.add(token(9, of: "alice"), limit: 3) == 3)
            #expect(try await r.token(hash: token(9, of: "alice").hash) == nil)
            #expect(try await r.tokens(of: "alice").count == 3)
        }
    }

    @Test(
        "token lookup, touch, tokens oldest first, and removal only by the token's user",
        arguments: RecordsKind.allCases)
    func tokens(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let r = try await store.instance()
            for name in ["alice", "bob"] { #expect(try await r.insert(account(name))) }
            let tokens = [
                token(1, of: "alice", created: 300), token(2, of: "alice", created: 100, canDelete: false),
                token(3, of: "alice", created: 200), token(4, of: "bob", created: 50),
            ]
            for t in tokens { _ = try await r.add(t, limit: 100) }
            #expect(equal(try await r.token(hash: tokens[1].hash), tokens[1]))
            #expect(try await r.token(hash: [UInt8](repeating: 0, count: 32)) == nil)

            try await r.touch(hash: tokens[0].hash, ns: 999)
            #expect(try await r.token(hash: tokens[0].hash)?.lastUsedNs == 999)
            #expect(try await r.tokens(of: "alice").map(\.createdNs) == [100, 200, 300])
            #expect(try await r.tokens(of: "bob").map(\.hash) == [tokens[3].hash])
            #expect(try await r.tokens(of: "carol").isEmpty)

            try await r.removeToken(hash: tokens[0].hash, of: "bob")
            #expect(try await r.token(hash: tokens[0].hash) != nil)
            try await r.removeToken(hash: tokens[0].hash, of: "alice")
            #expect(try await r.token(hash: tokens[0].hash) == nil)
            #expect(try await r.tokens(of: "alice").map(\.createdNs) == [100, 200])
        }
    }

    @Test(
        "the login-salt key is 32 bytes, the same for every instance and after a restart",
        arguments: RecordsKind.allCases)
    func loginSaltKey(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let (a, b) = (try await store.instance(), try await store.instance())
            let key = try await a.loginSaltKey()
            #expect(key.count == 32)
            #expect(try await b.loginSaltKey() == key)
            #expect(try await a.loginSaltKey() == key)
            try await store.postgres?.restart()
            #expect(try await store.instance().loginSaltKey() == key)
            // An instance open across the restart reconnects.
            #expect(try await a.loginSaltKey() == key)
        }
    }

    @Test("register, log in and authenticate through Accounts", arguments: RecordsKind.allCases)
    func accountsEndToEnd(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let accounts = try await Accounts(
                records: try await store.instance(), tokenLifetimeSeconds: 3600, maxTokensPerAccount: 2)
            try await accounts.register(
                user: "alice", email: "alice@example.org", secret: secretHex(1), scheme: 2, origin: "https://b.example")
            await #expect(throws: APIError.self) {
                try await accounts.register(
                    user: "alice", email: "a@example.org", secret: secretHex(2), scheme: 2, origin: "https://b.example")
            }
            func login(_ secret: String) async throws -> String {
                try await accounts.login(
                    user: "alice", secret: secret, scheme: 2, device: "laptop", appendOnly: false, client: "127.0.0.1")
            }
            await #expect(throws: APIError.self) { try await login(secretHex(2)) }
            let token = try await login(secretHex(1))
            let caller = try await accounts.authenticate("Bearer " + token)
            #expect(caller.user == "alice" && caller.canDelete)
            #expect(try await accounts.devices(of: caller).map(\.device) == ["laptop"])

            // A second instance over the same records knows the token and the login salt.
            let other = try await Accounts(records: try await store.instance(), tokenLifetimeSeconds: 3600)
            #expect(try await other.authenticate("Bearer " + token).user == "alice")
            #expect(other.loginSalt(for: "alice") == accounts.loginSalt(for: "alice"))

            _ = try await login(secretHex(1))
            let full = await #expect(throws: APIError.self) { try await login(secretHex(1)) }
            #expect(full?.status == 409)
            try await accounts.revoke(caller, id: nil)
            await #expect(throws: APIError.self) { try await other.authenticate("Bearer " + token) }
        }
    }
}

@Suite("account records in PostgreSQL shared by several server instances")
struct PostgresAccountRecordsTests {
    @Test("concurrent adds from two instances never take an account past its limit")
    func concurrentAdds() async throws {
        try await RecordsStore.with(.postgres) { store in
            let (a, b) = (try await store.instance(), try await store.instance())
            #expect(try await a.insert(account("alice")))
            let limit = 7
            let added = try await withThrowingTaskGroup(of: Bool.self) { group in
                for n in 0..<40 {
                    let r = n % 2 == 0 ? a : b
                    group.addTask {
                        try await r.add(token(UInt8(n), of: "alice", created: Int64(n)), limit: limit) < limit
                    }
                }
                return try await group.reduce(0) { $0 + ($1 ? 1 : 0) }
            }
            #expect(added == limit)
            #expect(try await b.tokens(of: "alice").count == limit)
        }
    }

    @Test("instances starting at once share one login-salt key, and a name registered by both is taken once")
    func concurrentStarts() async throws {
        try await RecordsStore.with(.postgres) { store in
            let (a, b) = (try await store.instance(), try await store.instance())
            async let firstKey = a.loginSaltKey()
            async let secondKey = b.loginSaltKey()
            #expect(try await firstKey == secondKey)
            async let first = a.insert(account("alice", salt: 1))
            async let second = b.insert(account("alice", salt: 2))
            #expect([try await first, try await second].filter { $0 }.count == 1)
        }
    }

    @Test("migrating again, or from another instance, changes nothing")
    func migrateTwice() async throws {
        try await RecordsStore.with(.postgres) { store in
            let r = try await store.instance()
            #expect(try await r.insert(account("alice")))
            let server = try #require(store.postgres)
            let db = try await server.open()
            try await db.migrate()
            let versions = try await db.query("SELECT version FROM schema_version").map { try $0.decode(Int.self) }
            #expect(versions == PostgresDatabase.migrations.map(\.version))
            #expect(try await PostgresAccountRecords(db).secret(of: "alice") != nil)
            await db.close()
        }
    }

    @Test("a wrong password and a missing database are refused with what to do")
    func refusedLogins() async throws {
        let server = try await PostgresServer()
        let wrong = await #expect(throws: CABackupError.self) {
            try await PostgresDatabase.open(server.url, password: "wrong")
        }
        #expect("\(wrong.map { "\($0)" } ?? "")".contains("PGPASSWORD or --database-password-file"))
        let url = server.url.replacingOccurrences(of: "/\(PostgresServer.database)?", with: "/nosuch?")
        let missing = await #expect(throws: CABackupError.self) {
            try await PostgresDatabase.open(url, password: PostgresServer.password)
        }
        #expect("\(missing.map { "\($0)" } ?? "")".contains("has no database 'nosuch'"))
    }

    @Test("an unreachable database fails at once with one line naming it")
    func unreachable() async throws {
        let port = try freePorts(1)[0]
        let error = await #expect(throws: CABackupError.self) {
            try await PostgresDatabase.open("postgresql://u@127.0.0.1:\(port)/db", password: "p")
        }
        let message = error.map { "\($0)" } ?? ""
        guard case .network = error else { Issue.record("not a network error: \(message)"); return }
        #expect(message.contains("cannot reach PostgreSQL at 127.0.0.1:\(port)") && !message.contains("\n"))
    }
}

@Suite("PostgreSQL URLs")
struct PostgresLocationTests {
    @Test("a URL holding a password is refused without repeating it")
    func password() {
        for url in ["postgresql://u:hunter2@h/db", "postgres://u:hunter2@h:5/db", "postgresql://u:hunter2@h"] {
            let error = #expect(throws: CABackupError.self) { try PostgresLocation(url) }
            let message = error.map { "\($0)" } ?? ""
            #expect(message.contains("PGPASSWORD or --database-password-file") && !message.contains("hunter2"))
        }
    }

    @Test("user, host, port, database and TLS mode are read; other forms are refused")
    func parse() throws {
        let l = try PostgresLocation("postgres://cab@db.example.org/backup")
        #expect(l.user == "cab" && l.host == "db.example.org" && l.port == 5432 && l.database == "backup")
        #expect(l.tls == .prefer)
        let m = try PostgresLocation("postgresql://cab@[::1]:6543/backup?sslmode=require")
        #expect(m.host == "::1" && m.port == 6543 && m.tls == .require)
        #expect("\(m)" == "postgresql://cab@[::1]:6543/backup?sslmode=require")
        for bad in [
            "mysql://cab@h/db", "postgresql://h/db", "postgresql://cab@h", "postgresql://cab@h/",
            "postgresql://cab@h/db?sslmode=maybe", "postgresql://cab@h/db?x=1", "postgresql://cab@h/a/b",
        ] {
            #expect(throws: CABackupError.self, "\(bad)") { try PostgresLocation(bad) }
        }
    }
}
