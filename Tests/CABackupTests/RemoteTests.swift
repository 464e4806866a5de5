import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat
@testable import CABackupRemote

@Suite("Remote locations, account names and login secrets")
struct RemoteTests {
    @Test("repository URLs parse into server, account and prefix; bad ones are refused")
    func locations() throws {
        let l = try RemoteLocation(parsing: "https://alice@backup.example.org:8443/cabackup/")
        #expect(l.scheme == "https" && l.user == "alice" && l.host == "backup.example.org" && l.port == 8443)
        #expect(l.prefix == "/cabackup")
        #expect(l.serverURL == "https://backup.example.org:8443/cabackup")
        #expect(l.description == "https://alice@backup.example.org:8443/cabackup")
        #expect(try RemoteLocation(parsing: "http://bob@10.0.0.2").port == 80)
        #expect(try RemoteLocation(parsing: "http://10.0.0.2:9000", requireUser: false).user == "")
        for bad in ["http://10.0.0.2:9000", "ftp://a@host", "http://Alice@host", "http://a:secret@host", "/tmp/repo"] {
            #expect(throws: CABackupError.self, "\(bad)") { try RemoteLocation(parsing: bad) }
        }
        #expect(RemoteLocation.isRemote("https://x@y") && !RemoteLocation.isRemote("/srv/http:/x"))
    }

    @Test("account names: a-z 0-9 . _ -, 1 to 64 characters, never . or ..")
    func names() {
        for good in ["alice", "a.b_c-1", String(repeating: "x", count: 64)] { #expect(isValidUserName(good)) }
        for bad in ["", ".", "..", "Alice", "a/b", "a b", "ä", String(repeating: "x", count: 65)] {
            #expect(!isValidUserName(bad), "\(bad)")
        }
    }

    @Test(
        "the login secret depends on password, account, server origin and server salt, and is not a key-slot derivation"
    )
    func secrets() throws {
        let salt = [UInt8](repeating: 7, count: 32)
        func secret(
            _ p: String, _ u: String, _ o: String = "https://backup.example:8443", _ s: [UInt8]? = nil
        ) throws
            -> String
        {
            try loginSecret(password: p, user: u, origin: o, serverSalt: s ?? salt)
        }
        let a = try secret("same string", "alice")
        #expect(a.count == 64)
        #expect(a == (try secret("same string", "alice")))
        #expect(a != (try secret("same string", "bob")))
        #expect(a != (try secret("other string", "alice")))
        #expect(a != (try secret("same string", "alice", "https://evil.example:8443")))
        #expect(a != (try secret("same string", "alice", "http://backup.example:8443")))
        #expect(
            a != (try secret("same string", "alice", "https://backup.example:8443", [UInt8](repeating: 8, count: 32))))
        #expect(a != (try legacyLoginSecret(password: "same string", user: "alice")))
        let origins = try ["http://127.0.0.1:8443", "http://[::1]:80", "https://Backup.LAN"].map {
            try RemoteLocation(parsing: $0, requireUser: false)
        }
        #expect(origins.map(\.origin) == ["http://127.0.0.1:8443", "http://[::1]:80", "https://backup.lan:443"])
        #expect(origins.map(\.sendsSecretsInClear) == [false, false, false])
        #expect(try RemoteLocation(parsing: "http://backup.lan:8443", requireUser: false).sendsSecretsInClear)
        // A key slot for the same password wraps with a different key (random salt, other
        // parameters): the secret the server sees opens nothing.
        let keys = RepositoryKeys.random()
        let slot = try KeySlot.make(keys: keys, password: "same string", kdf: .insecureFastForTesting)
        #expect(try slot.unwrap(password: a) == nil)
        #expect(try slot.unwrap(password: "same string")?.bytes == keys.bytes)
    }
}
