import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// What an operator running the server behind a load balancer relies on: a health check
/// that says when an instance cannot serve, and a stop that loses nothing.
@Suite("server operations: health checks and graceful shutdown")
struct ServerOperationsTests {
    @Test("/healthz answers ok while the server can serve, and 503 when its storage is gone")
    func health() throws {
        let (s, server, _) = try aliceOnServer()
        let (ok, body) = try http("GET", server.url + "/healthz")
        #expect(ok == 200, "\(body)")
        #expect(body.contains(#""status":"ok""#), "\(body)")
        let spaces = server.data + "/spaces"
        try FileManager.default.moveItem(atPath: spaces, toPath: s.file("moved-away"))
        let (down, why) = try http("GET", server.url + "/healthz")
        #expect(down == 503, "\(why)")
        #expect(why.contains("unavailable"), "\(why)")
        try FileManager.default.moveItem(atPath: s.file("moved-away"), toPath: spaces)
        #expect(try http("GET", server.url + "/healthz").0 == 200)
    }

    @Test("SIGTERM during an upload: the upload is received and stored whole, then the server exits 0")
    func gracefulStop() throws {
        let (s, first, alice) = try aliceOnServer()
        var server = first
        try writeRandom(s.file("src/a.bin"), megabytes: 3)
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: alice).status == 0)
        let pack = try #require(try spacePacks(server.data, "alice").first)
        let name = (pack as NSString).lastPathComponent
        let copy = s.file("pack")
        try FileManager.default.copyItem(atPath: pack, toPath: copy)
        let token = try storedToken(alice)
        #expect(try http("DELETE", server.url + "/v1/space/packs/" + name, token: token).0 == 204)

        // The pack comes back slowly; the server is told to stop while it arrives.
        let tmp = server.data + "/spaces/alice/tmp"
        let (uploader, out) = try startAbuse(
            "slowput", server.host, server.portString, token, "/v1/space/packs/" + name, copy, "4")
        #expect(eventually(within: 10) { !((try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? []).isEmpty })
        kill(server.process.processIdentifier, SIGTERM)
        uploader.waitUntilExit()
        let answer = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(answer.contains("201"), "\(answer)")
        #expect(eventually(within: 20) { !server.process.isRunning })
        #expect(server.process.terminationStatus == 0)
        #expect(FileManager.default.contentsEqual(atPath: pack, andPath: copy))
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? [""]).isEmpty)

        // Started again, the space is whole.
        server = try TestServer(data: s.file("server"), port: server.port)
        let check = try cabackup("check", "--repo", server.repo("alice"), "--read-data", env: alice)
        #expect(check.status == 0, "\(check.stderr)")
    }

    @Test(
        "server admin: accounts with usage, a quota, disable and enable, closed registration, delete; the running server obeys at once"
    )
    func admin() throws {
        let (s, server, alice) = try aliceOnServer()
        let bob = device(s, "bob", password: "bob password")
        try signUp(server, "bob", env: bob)
        try writeRandom(s.file("src/a.bin"), megabytes: 2)
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: alice).status == 0)
        let data = ["--data", server.data]
        func admin(_ args: String...) throws -> RunResult {
            try run(cabackupBinary, ["server", "admin"] + args + data)
        }

        // The listing: both accounts, one device each, alice's bytes as her space holds them.
        let listed = try admin("accounts", "--json")
        #expect(listed.status == 0, "\(listed.stderr)")
        let rows = listed.stdout.split(separator: "\n").compactMap { jsonObject(String($0)) }
        #expect(rows.map { $0["name"] as? String } == ["alice", "bob"])
        let stored = try spaceBytes(server.data + "/spaces/alice")
        #expect(rows.first?["used_bytes"] as? Int == stored, "\(listed.stdout) vs \(stored)")
        #expect(rows.allSatisfy { $0["devices"] as? Int == 1 && $0["disabled"] as? Bool == false })
        let table = try admin("accounts")
        #expect(table.stdout.contains("alice") && table.stdout.contains("2 accounts"), "\(table.stdout)")

        // A quota for alice alone stops her next upload; cleared, it goes through.
        #expect(try admin("quota", "alice", "1M").status == 0)
        try writeRandom(s.file("src/b.bin"), megabytes: 3)
        let over = try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: alice)
        #expect(over.status != 0 && over.stderr.contains("quota"), "\(over.stderr)")
        try writeRandom(s.file("bob-src/b.bin"), megabytes: 3)
        #expect(try cabackup("snapshot", "--repo", server.repo("bob"), s.file("bob-src"), env: bob).status == 0)
        #expect(try admin("quota", "alice", "none").status == 0)
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: alice).status == 0)

        // Disabled: her devices are refused at once and she cannot log in; bob goes on.
        #expect(try admin("disable", "alice").status == 0)
        let refused = try cabackup("snapshots", "--repo", server.repo("alice"), env: alice)
        #expect(refused.status != 0 && refused.stderr.contains("disabled"), "\(refused.stderr)")
        let login = try cabackup("login", "--server", server.url, "--user", "alice", env: alice)
        #expect(login.status != 0 && login.stderr.contains("disabled"), "\(login.stderr)")
        #expect(try cabackup("snapshots", "--repo", server.repo("bob"), env: bob).status == 0)
        #expect(try admin("enable", "alice").status == 0)
        #expect(try cabackup("snapshots", "--repo", server.repo("alice"), env: alice).status == 0)

        // Closed registration refuses newcomers until opened again.
        #expect(try admin("registration", "closed").stdout.contains("registration: closed"))
        let carol = device(s, "carol", password: "carol password")
        let closed = try cabackup(
            "register", "--server", server.url, "--user", "carol", "--email", "carol@example.org", env: carol)
        #expect(closed.status != 0 && closed.stderr.contains("registration is closed"), "\(closed.stderr)")
        #expect(try admin("registration", "open").status == 0)
        try signUp(server, "carol", env: carol)

        // Delete asks, and without a terminal does nothing unless told --yes.
        let unasked = try admin("delete", "bob")
        #expect(unasked.status != 0 && unasked.stderr.contains("--yes"), "\(unasked.stderr)")
        #expect(FileManager.default.fileExists(atPath: server.data + "/spaces/bob"))
        #expect(try admin("delete", "bob", "--yes").status == 0)
        #expect(!FileManager.default.fileExists(atPath: server.data + "/spaces/bob"))
        let gone = try cabackup("snapshots", "--repo", server.repo("bob"), env: bob)
        #expect(gone.status == 13, "\(gone.stderr)")
        #expect(try admin("accounts").stdout.contains("2 accounts"))
        let unknown = try admin("disable", "nobody")
        #expect(unknown.status != 0 && unknown.stderr.contains("no account named 'nobody'"), "\(unknown.stderr)")
        // Alice's data is untouched by all of it.
        #expect(try cabackup("check", "--repo", server.repo("alice"), "--read-data", env: alice).status == 0)
    }
}

/// The bytes of a space's repository files (not the server's index or uploads).
func spaceBytes(_ root: String) throws -> Int {
    var total = 0
    let e = FileManager.default.enumerator(atPath: root)
    while let path = e?.nextObject() as? String {
        if path.hasPrefix("index") || path.hasPrefix("tmp") { continue }
        let a = try FileManager.default.attributesOfItem(atPath: root + "/" + path)
        if a[.type] as? FileAttributeType == .typeRegular { total += a[.size] as? Int ?? 0 }
    }
    return total
}
