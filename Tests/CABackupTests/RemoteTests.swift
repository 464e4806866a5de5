import Testing

@testable import CABackup

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

    @Test("the login secret depends on password and account, and is not a key-slot derivation")
    func secrets() throws {
        let a = try loginSecret(password: "same string", user: "alice")
        #expect(a.count == 64)
        #expect(a == (try loginSecret(password: "same string", user: "alice")))
        #expect(a != (try loginSecret(password: "same string", user: "bob")))
        #expect(a != (try loginSecret(password: "other string", user: "alice")))
        // A key slot for the same password wraps with a different key (random salt, other
        // parameters): the secret the server sees opens nothing.
        let keys = RepositoryKeys.random()
        let slot = try KeySlot.make(keys: keys, password: "same string", kdf: .insecureFastForTesting)
        #expect(try slot.unwrap(password: a) == nil)
        #expect(try slot.unwrap(password: "same string")?.bytes == keys.bytes)
    }
}
