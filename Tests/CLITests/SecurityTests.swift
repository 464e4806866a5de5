import CABackup
import CABackupRemote
import Foundation
import Testing

let hostileproxy = packageRoot + "/Tests/CLITests/hostileproxy.py"

/// A hostile server: `hostileproxy.py` in front of a real `cabackup server`, forwarding
/// everything until a test gives it rules to answer some requests itself.
final class HostileProxy {
    let process: Process
    let url: String
    let rulesPath: String

    init(upstream: String, scratch: Scratch) throws {
        rulesPath = scratch.file("proxy-rules.json")
        process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", hostileproxy, upstream, rulesPath]
        url = try startListening(process, what: "proxy")
    }

    func repo(_ user: String) -> String { url.replacingOccurrences(of: "://", with: "://\(user)@") }

    /// Replaces the rules (see `hostileproxy.py`).
    func set(_ rules: [String: [String: Any]]) throws {
        try JSONSerialization.data(withJSONObject: rules).write(to: URL(fileURLWithPath: rulesPath))
    }

    /// The request lines that reached the proxy since the last call.
    func takeLog() -> [String] {
        let lines = (try? String(contentsOfFile: rulesPath + ".log", encoding: .utf8)) ?? ""
        try? FileManager.default.removeItem(atPath: rulesPath + ".log")
        return lines.split(separator: "\n").map(String.init)
    }

    deinit {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }
}

/// Runs the built `cabackup` and also returns its peak resident memory in KiB (from
/// `wait4`), for bounding what hostile answers can make the client allocate.
func cabackupWithPeakMemory(_ args: [String], env: [String: String]) throws -> (RunResult, Int) {
    let script =
        "import os,subprocess,sys\n" + "p = subprocess.Popen(sys.argv[1:])\n" + "_, st, ru = os.wait4(p.pid, 0)\n"
        + "print(ru.ru_maxrss)\n" + "sys.exit(os.waitstatus_to_exitcode(st))\n"
    let r = try run("/usr/bin/env", ["python3", "-c", script, cabackupBinary] + args, env: env)
    return (r, Int(r.lastLine) ?? -1)
}

/// Alice signed up through a hostile proxy in front of a real server, with one snapshot.
func aliceBehindProxy() throws -> (Scratch, TestServer, HostileProxy, [String: String], String) {
    let s = Scratch()
    let server = try TestServer(data: s.file("server"))
    let proxy = try HostileProxy(upstream: server.url, scratch: s)
    let alice = device(s, "alice", password: "alice password")
    let reg = try cabackup(
        "register", "--server", proxy.url, "--user", "alice", "--email", "alice@example.org", env: alice)
    #expect(reg.status == 0, "\(reg.stderr)")
    let initialized = try cabackup("init", "--repo", proxy.repo("alice"), env: alice)
    #expect(initialized.status == 0, "\(initialized.stderr)")
    let src = s.file("src")
    try writeRandom(src + "/a.bin", megabytes: 1)
    let snap = try cabackup("snapshot", "--repo", proxy.repo("alice"), src, env: alice)
    #expect(snap.status == 0, "\(snap.stderr)")
    return (s, server, proxy, alice, src)
}

/// The config the real server stores for `user`, as a JSON object.
func storedConfig(_ server: TestServer, _ user: String) throws -> [String: Any] {
    let data = try Data(contentsOf: URL(fileURLWithPath: server.data + "/spaces/\(user)/config"))
    return try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
}

func writeJSON(_ value: Any, to path: String) throws {
    try JSONSerialization.data(withJSONObject: value).write(to: URL(fileURLWithPath: path))
}

@Suite("a hostile server gets nothing: downgrades, crafted ids, hostile key slots, oversized answers", .serialized)
struct HostileServerTests {
    @Test("a served plaintext config makes no device back up in the clear or skip the password")
    func plaintextDowngrade() throws {
        let (s, server, proxy, alice, src) = try aliceBehindProxy()
        let id = try #require(try storedConfig(server, "alice")["id"] as? String)
        let plaintext: [String: Any] = [
            "format_version": 1, "id": id, "id_scheme": "sha256", "encryption": "none", "pack_size": 16 << 20,
            "chunker": [
                "min_size": 512 << 10, "avg_size": 1 << 20, "max_size": 8 << 20,
                "gear_seed": String(repeating: "00", count: 32),
            ],
        ]
        try writeJSON(plaintext, to: s.file("plain-config"))
        try proxy.set(["GET /v1/space/config": ["file": s.file("plain-config")]])
        let packsBefore = try spacePacks(server.data, "alice")
        try writeRandom(src + "/new.bin", megabytes: 1)
        var noPassword = alice
        noPassword["CABACKUP_PASSWORD"] = ""
        _ = proxy.takeLog()

        // The device that made the repository, without a password at hand: refused.
        let known = try cabackup("snapshot", "--repo", proxy.repo("alice"), src, env: noPassword)
        #expect(known.status == 1, "\(known.stdout)\(known.stderr)")
        #expect(known.stderr.contains("not encrypted"), "\(known.stderr)")
        // A new device that never saw the space: refused too (a server is never trusted with plaintext).
        let fresh = device(s, "phone", password: "")
        #expect(
            try cabackup(
                "login", "--server", proxy.url, "--user", "alice", env: device(s, "phone", password: "alice password")
            ).status == 0)
        let phone = try cabackup("snapshot", "--repo", proxy.repo("alice"), src, env: fresh)
        #expect(phone.status == 1, "\(phone.stdout)\(phone.stderr)")
        #expect(phone.stderr.contains("not encrypted"), "\(phone.stderr)")
        #expect(!proxy.takeLog().contains { $0.hasPrefix("PUT") || $0.hasPrefix("POST /v1/space/blobs") })
        #expect(try spacePacks(server.data, "alice") == packsBefore)

        // A config whose clear fields were changed (another pack size) is refused by the
        // device that saw the real one.
        var changed = try storedConfig(server, "alice")
        changed["pack_size"] = 8 << 20
        try writeJSON(changed, to: s.file("changed-config"))
        try proxy.set(["GET /v1/space/config": ["file": s.file("changed-config")]])
        let edited = try cabackup("snapshots", "--repo", proxy.repo("alice"), env: alice)
        #expect(edited.status == 1)
        #expect(edited.stderr.contains("changed since this device first opened it"), "\(edited.stderr)")
        // The honest config again: everything works as before.
        try proxy.set([:])
        #expect(try cabackup("snapshots", "--repo", proxy.repo("alice"), env: alice).status == 0)
    }

    @Test("a crafted config id runs no SQL on the device and makes no directory outside its cache")
    func craftedIDs() throws {
        let (s, server, proxy, alice, _) = try aliceBehindProxy()
        // A second device, so nothing about the honest config is remembered on it.
        let phone = device(s, "phone", password: "alice password")
        #expect(try cabackup("login", "--server", proxy.url, "--user", "alice", env: phone).status == 0)
        let attached = s.file("attached.db")
        let escaped = s.file("escaped")
        for id in ["x'); ATTACH DATABASE '\(attached)' AS pwn; CREATE TABLE pwn.t(x); --", "../../../escaped"] {
            var config = try storedConfig(server, "alice")
            config["id"] = id
            try writeJSON(config, to: s.file("crafted-config"))
            try proxy.set(["GET /v1/space/config": ["file": s.file("crafted-config")]])
            for env in [alice, phone] {
                let r = try cabackup("snapshots", "--repo", proxy.repo("alice"), env: env)
                #expect(r.status == 1, "\(r.stdout)\(r.stderr)")
            }
        }
        #expect(!FileManager.default.fileExists(atPath: attached), "the crafted id ran SQL")
        #expect(!FileManager.default.fileExists(atPath: escaped), "the crafted id made a directory outside the cache")
        // The phone, on the honest config, still works and remembers it from now on.
        try proxy.set([:])
        #expect(try cabackup("snapshots", "--repo", proxy.repo("alice"), env: phone).status == 0)
    }

    @Test(
        "hostile key slots: a too costly slot is skipped and named, and a flood of slots is tried a bounded number of times"
    )
    func hostileKeySlots() throws {
        let (s, server, proxy, alice, _) = try aliceBehindProxy()
        let real = try #require(
            try FileManager.default.contentsOfDirectory(atPath: server.data + "/spaces/alice/keys").first {
                $0.count == 64
            })
        func slot(n: Int, p: Int, seed: Int) -> [String: Any] {
            [
                "created": "2026-01-01T00:00:00Z", "hostname": "h", "username": "u", "kdf": "scrypt", "n": n, "r": 8,
                "p": p, "salt": Data((0..<32).map { UInt8(($0 + seed) & 0xFF) }).base64EncodedString(),
                "master_key": Data((0..<92).map { UInt8(($0 * 7 + seed) & 0xFF) }).base64EncodedString(),
            ]
        }
        // A slot that asks for 4 GiB, named to sort before the real one.
        let costly = String(repeating: "0", count: 64)
        try writeJSON(slot(n: 1 << 22, p: 1, seed: 1), to: s.file("costly-slot"))
        try proxy.set([
            "GET /v1/space/keys": ["body": "[\"\(costly)\", \"\(real)\"]"],
            "GET /v1/space/keys/\(costly)": ["file": s.file("costly-slot")],
        ])
        let phone = device(s, "phone", password: "alice password")
        #expect(try cabackup("login", "--server", proxy.url, "--user", "alice", env: phone).status == 0)
        let opened = try cabackup("snapshots", "--repo", proxy.repo("alice"), env: phone)
        #expect(opened.status == 0, "\(opened.stderr)")
        #expect(opened.stderr.contains("key slot 00000000 was skipped"), "\(opened.stderr)")

        // Forty decoy slots that cost a derivation each and open with nothing, sorted first:
        // 61 zeros lead each name, so they sort before the real slot's random name.
        var rules: [String: [String: Any]] = [:]
        var names: [String] = []
        for i in 0..<40 {
            let name = String(repeating: "0", count: 61) + "1" + String(format: "%02x", i)
            try writeJSON(slot(n: 1 << 10, p: 1, seed: i + 2), to: s.file("decoy-\(i)"))
            rules["GET /v1/space/keys/\(name)"] = ["file": s.file("decoy-\(i)")]
            names.append(name)
        }
        let listing = try JSONSerialization.data(withJSONObject: names + [real])
        rules["GET /v1/space/keys"] = ["body": String(decoding: listing, as: UTF8.self)]
        try proxy.set(rules)
        _ = proxy.takeLog()
        // The device that opened the space before tries the slot that opened it first.
        let known = try cabackup("snapshots", "--repo", proxy.repo("alice"), env: alice)
        #expect(known.status == 0, "\(known.stderr)")
        #expect(proxy.takeLog().filter { $0.hasPrefix("GET /v1/space/keys/") }.count == 1)
        // A new device tries at most ten, then says so.
        let tablet = device(s, "tablet", password: "alice password")
        #expect(try cabackup("login", "--server", proxy.url, "--user", "alice", env: tablet).status == 0)
        _ = proxy.takeLog()
        let bounded = try cabackup("snapshots", "--repo", proxy.repo("alice"), env: tablet)
        #expect(bounded.status == 12, "\(bounded.stderr)")
        #expect(bounded.stderr.contains("tried 10 of its 41 key slots"), "\(bounded.stderr)")
        #expect(proxy.takeLog().filter { $0.hasPrefix("GET /v1/space/keys/") }.count == 10)
    }

    @Test("an oversized answer is refused without being held in memory")
    func oversizedBodies() throws {
        let (s, server, proxy, alice, _) = try aliceBehindProxy()
        defer { withExtendedLifetime((s, server)) {} }
        try proxy.set(["GET /v1/space/config": ["junk": 600 << 20]])
        let (r, peakKiB) = try cabackupWithPeakMemory(["snapshots", "--repo", proxy.repo("alice")], env: alice)
        #expect(r.status == 1, "\(r.stderr)")
        #expect(r.stderr.contains("larger than"), "\(r.stderr)")
        #expect(peakKiB > 0 && peakKiB < 200 << 10, "peak RSS \(peakKiB) KiB for a 600 MiB config")
    }
}

@Suite("logins: secrets bound to the server, append-only tokens", .serialized)
struct LoginSecurityTests {
    @Test("a login secret captured by one server logs in to no other where the same name and password are used")
    func secretReplay() throws {
        let s = Scratch()
        let honest = try TestServer(data: s.file("honest"))
        let other = try TestServer(data: s.file("other"))
        let capturing = try HostileProxy(upstream: other.url, scratch: s)
        let alice = device(s, "alice", password: "alice password")
        for url in [honest.url, capturing.url] {
            let r = try cabackup(
                "register", "--server", url, "--user", "alice", "--email", "alice@example.org", env: alice)
            #expect(r.status == 0, "\(r.stderr)")
        }
        let captured = try #require(capturing.takeLog().first { $0.hasPrefix("POST /v1/login ") })
        let body = String(captured.dropFirst("POST /v1/login ".count))
        let (status, answer) = try http("POST", honest.url + "/v1/login", data: body)
        #expect(status == 401, "the secret captured by one server logged in to another: \(answer)")
    }

    @Test("a device that has seen the current login scheme never sends the old one")
    func noDowngrade() throws {
        let (s, server, proxy, _, _) = try aliceBehindProxy()
        defer { withExtendedLifetime(server) {} }
        let phone = device(s, "phone", password: "alice password")
        #expect(try cabackup("login", "--server", proxy.url, "--user", "alice", env: phone).status == 0)
        try proxy.set(["GET /v1/login/salt": ["status": 404, "body": "{\"error\":\"not found\"}"]])
        _ = proxy.takeLog()
        let again = try cabackup("login", "--server", proxy.url, "--user", "alice", env: phone)
        #expect(again.status == 1, "\(again.stderr)")
        #expect(again.stderr.contains("no longer offers the login scheme"), "\(again.stderr)")
        #expect(!proxy.takeLog().contains { $0.hasPrefix("POST /v1/login") })
    }

    @Test("an account made before secrets were bound to the server is re-bound from a logged-in device")
    func legacyRebind() throws {
        let s = Scratch()
        let server = try TestServer(data: s.file("server"))
        // What a client of the previous scheme sends: a secret salted with the name only.
        let legacy = try legacyLoginSecret(password: "alice password", user: "alice")
        let reg = try http(
            "POST", server.url + "/v1/register",
            data: #"{"user":"alice","email":"a@example.org","secret":"\#(legacy)"}"#)
        #expect(reg.0 == 201, "\(reg.1)")
        let login = try http("POST", server.url + "/v1/login", data: #"{"user":"alice","secret":"\#(legacy)"}"#)
        #expect(login.0 == 200, "\(login.1)")
        let token = try #require((jsonObject(login.1)?["token"]) as? String)
        let laptop = device(s, "laptop", password: "alice password")
        try FileManager.default.createDirectory(
            atPath: laptop["XDG_CONFIG_HOME"]! + "/cabackup", withIntermediateDirectories: true)
        try JSONSerialization.data(withJSONObject: [server.url: ["alice": ["token": token, "device": "laptop"]]])
            .write(to: URL(fileURLWithPath: laptop["XDG_CONFIG_HOME"]! + "/cabackup/credentials.json"))
        // A new device cannot log in yet, and is told what to do.
        let phone = device(s, "phone", password: "alice password")
        let refused = try cabackup("login", "--server", server.url, "--user", "alice", env: phone)
        #expect(refused.status == 13)
        #expect(refused.stderr.contains("cabackup rebind"), "\(refused.stderr)")
        // The logged-in laptop re-binds; a wrong password changes nothing.
        var wrong = laptop
        wrong["CABACKUP_PASSWORD"] = "not the password"
        #expect(try cabackup("rebind", "--server", server.url, "--user", "alice", env: wrong).status != 0)
        let rebind = try cabackup("rebind", "--server", server.url, "--user", "alice", env: laptop)
        #expect(rebind.status == 0, "\(rebind.stderr)")
        #expect(try cabackup("login", "--server", server.url, "--user", "alice", env: phone).status == 0)
        // The old secret no longer logs in anywhere.
        let old = try http("POST", server.url + "/v1/login", data: #"{"user":"alice","secret":"\#(legacy)"}"#)
        #expect(old.0 == 401)
    }

    @Test("an append-only token adds snapshots but cannot forget, prune or remove keys; devices shows it")
    func appendOnly() throws {
        let (s, server, alice) = try aliceOnServer()
        try writeRandom(s.file("src/a.bin"), megabytes: 1)
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: alice).status == 0)
        let kiosk = device(s, "kiosk", password: "alice password")
        let login = try cabackup(
            "login", "--server", server.url, "--user", "alice", "--append-only", "--device", "kiosk", env: kiosk)
        #expect(login.status == 0, "\(login.stderr)")
        #expect(login.stderr.contains("warning: the account password came from CABACKUP_PASSWORD"), "\(login.stderr)")
        let devices = try cabackup("devices", "--server", server.url, "--user", "alice", env: kiosk)
        #expect(devices.stdout.split(separator: "\n").contains { $0.contains("kiosk") && $0.contains("append-only") })
        // It backs up.
        try writeRandom(s.file("src/b.bin"), megabytes: 1)
        let snap = try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: kiosk)
        #expect(snap.status == 0, "\(snap.stderr)")
        let before = try FileManager.default.subpathsOfDirectory(atPath: server.data + "/spaces/alice")
            .filter { !$0.hasPrefix("index") && !$0.hasPrefix("tmp") }.sorted()
        // It destroys nothing.
        for args in [
            ["forget", "--keep-last", "1"], ["prune"], ["key", "passwd"],
            ["forget", "--keep-last", "1", "--prune"],
        ] {
            var env = kiosk
            env["CABACKUP_NEW_PASSWORD"] = "another long password"
            let r = try run(cabackupBinary, args + ["--repo", server.repo("alice")], env: env)
            #expect(r.status == 1, "\(args): \(r.stdout) \(r.stderr)")
            #expect(r.stderr.contains("append-only"), "\(args): \(r.stderr)")
        }
        let token = try storedToken(kiosk)
        let snapshot = try #require(before.first { $0.hasPrefix("snapshots/") && $0.count > 70 })
        #expect(try http("DELETE", server.url + "/v1/space/" + snapshot, token: token).0 == 403)
        let after = try FileManager.default.subpathsOfDirectory(atPath: server.data + "/spaces/alice")
            .filter { !$0.hasPrefix("index") && !$0.hasPrefix("tmp") }.sorted()
        #expect(after == before, "an append-only token changed the space")
        // The full token still can.
        #expect(try cabackup("forget", "--repo", server.repo("alice"), "--keep-last", "1", env: alice).status == 0)
    }
}

@Suite("rollback notice: a snapshot removed without the key is noticed", .serialized)
struct RollbackTests {
    @Test("a snapshot the storage deleted is named on the next command; one removed by forget is not")
    func deletedBehindTheOwnersBack() throws {
        let (s, server, alice) = try aliceOnServer()
        let repo = server.repo("alice")
        for i in 0..<3 {
            try writeRandom(s.file("src/f\(i).bin"), megabytes: 1)
            #expect(try cabackup("snapshot", "--repo", repo, s.file("src"), env: alice).status == 0)
        }
        let listed = try cabackup("snapshots", "--repo", repo, "--json", env: alice)
        let snaps = try #require(
            try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [[String: Any]])
        let newest = try #require(snaps.last?["id"] as? String)
        let oldest = try #require(snaps.first?["id"] as? String)
        // Removed with the key: no warning.
        let forget = try cabackup("forget", "--repo", repo, newest, env: alice)
        #expect(forget.status == 0, "\(forget.stderr)")
        let quiet = try cabackup("snapshots", "--repo", repo, env: alice)
        #expect(quiet.status == 0)
        #expect(!quiet.stderr.contains("is gone"), "\(quiet.stderr)")
        #expect(try cabackup("check", "--repo", repo, env: alice).status == 0, "a forget record is no damage")
        // The server deletes the (now) newest record behind the owner's back.
        let second = try #require(snaps.dropLast().last?["id"] as? String)
        try FileManager.default.removeItem(atPath: server.data + "/spaces/alice/snapshots/" + second)
        let noticed = try cabackup("snapshots", "--repo", repo, env: alice)
        #expect(noticed.stderr.contains("snapshot \(second.prefix(8))"), "\(noticed.stderr)")
        #expect(noticed.stderr.contains("no forget made with the key removed it"), "\(noticed.stderr)")
        #expect(noticed.stdout.contains(oldest.prefix(8)))
    }

    @Test("a local repository rolled back to an older copy is noticed")
    func localRollback() throws {
        let s = Scratch()
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        try writeRandom(s.file("src/a.bin"), megabytes: 1)
        #expect(try cabackup("snapshot", "--repo", repo, s.file("src")).status == 0)
        #expect(try run("/bin/cp", ["-a", repo, s.file("old-copy")]).status == 0)
        try writeRandom(s.file("src/b.bin"), megabytes: 1)
        #expect(try cabackup("snapshot", "--repo", repo, s.file("src")).status == 0)
        // The copy from before the second snapshot is put back in its place.
        try FileManager.default.removeItem(atPath: repo)
        try FileManager.default.moveItem(atPath: s.file("old-copy"), toPath: repo)
        let r = try cabackup("snapshots", "--repo", repo)
        #expect(r.status == 0)
        #expect(r.stderr.contains("is gone and no forget made with the key removed it"), "\(r.stderr)")
    }
}
