import Foundation
import Testing

let httptool = packageRoot + "/Tests/CLITests/httptool.py"

/// Starts `process` (a server) and returns the URL from the "listening on URL" line it
/// prints first; stderr is discarded.
func startListening(_ process: Process, what: String) throws -> String {
    try startListening(process, what: what, markers: ["listening on "])[0]
}

/// Starts `process` and returns what follows each of `markers` on the lines it prints,
/// in any order; stderr goes to the file `stderr` (created), else nowhere.
func startListening(_ process: Process, what: String, markers: [String], stderr: String? = nil) throws -> [String] {
    let out = Pipe()
    process.standardOutput = out
    if let stderr { FileManager.default.createFile(atPath: stderr, contents: nil) }
    process.standardError = FileHandle(forWritingAtPath: stderr ?? "/dev/null")
    try process.run()
    var text = ""
    func found() -> [String]? {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).dropLast()
        var values: [String] = []
        for marker in markers {
            guard let line = lines.first(where: { $0.contains(marker) }), let r = line.range(of: marker) else {
                return nil
            }
            values.append(String(line[r.upperBound...]))
        }
        return values
    }
    let deadline = Date().addingTimeInterval(30)
    while found() == nil && Date() < deadline {
        let chunk = out.fileHandleForReading.availableData
        if chunk.isEmpty { break }
        text += String(decoding: chunk, as: UTF8.self)
    }
    guard let values = found() else {
        process.terminate()
        throw CocoaError(.fileReadUnknown, userInfo: [NSLocalizedDescriptionKey: "\(what) did not start: \(text)"])
    }
    return values
}

/// A `cabackup server` started from the test on 127.0.0.1 (a free port unless given).
final class TestServer {
    let process: Process
    let url: String
    let data: String
    /// Where `GET /metrics` answers, when started with `metrics`.
    let metricsURL: String?
    var port: Int { Int(url.split(separator: ":").last!)! }

    /// - Parameters:
    ///   - metrics: serve metrics on a free port of their own (``metricsURL``).
    ///   - log: a file for the server's stderr (its log), else it is discarded.
    init(
        data: String, port: Int = 0, _ extra: [String] = [], env: [String: String] = [:], metrics: Bool = false,
        log: String? = nil
    ) throws {
        self.data = data
        process = Process()
        process.executableURL = URL(fileURLWithPath: cabackupBinary)
        process.arguments =
            ["server", "--listen", "127.0.0.1:\(port)", "--data", data] + extra
            + (metrics ? ["--metrics-listen", "127.0.0.1:0"] : [])
        process.environment = childEnvironment(env)
        let urls = try startListening(
            process, what: "server", markers: ["listening on "] + (metrics ? ["metrics at "] : []), stderr: log)
        url = urls[0]
        metricsURL = metrics ? urls[1] : nil
    }

    /// A repository URL for `user` on this server.
    func repo(_ user: String) -> String {
        url.replacingOccurrences(of: "://", with: "://\(user)@")
    }

    /// A crash: SIGKILL, no chance to finish anything.
    func kill() {
        if process.isRunning {
            Glibc.kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    /// A normal stop: SIGTERM, which lets the server finish its requests and exit 0.
    func stop() -> Int32 {
        guard process.isRunning else { return process.terminationStatus }
        Glibc.kill(process.processIdentifier, SIGTERM)
        let deadline = Date().addingTimeInterval(10)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        kill()
        return process.terminationStatus
    }

    deinit { _ = stop() }
}

/// The environment of one device: its own config (tokens) and cache (index) directories.
func device(_ s: Scratch, _ name: String, password: String) -> [String: String] {
    [
        "XDG_CONFIG_HOME": s.file(name + "/config"), "XDG_CACHE_HOME": s.file(name + "/cache"),
        "CABACKUP_PASSWORD": password,
    ]
}

/// The token a device stored at login.
func storedToken(_ env: [String: String]) throws -> String {
    let data = try Data(contentsOf: URL(fileURLWithPath: env["XDG_CONFIG_HOME"]! + "/cabackup/credentials.json"))
    let all = try #require(try JSONSerialization.jsonObject(with: data) as? [String: [String: [String: String]]])
    return try #require(all.values.first?.values.first?["token"])
}

/// Starts a snapshot of 128 MiB of new random data in `s.file("src")` into alice's space
/// and returns once the server holds `packs` packs of it (or after 60 s), with its stderr.
/// The client has at most four packs in flight, so at least two of the eight are still
/// to be sent when it returns for `packs` ≤ 2.
func snapshotUntilPacks(
    _ packs: Int, _ s: Scratch, _ server: TestServer, env: [String: String]
) throws -> (Process, Pipe) {
    try writeRandom(s.file("src/big.bin"), megabytes: 128)
    let p = Process()
    p.executableURL = URL(fileURLWithPath: cabackupBinary)
    p.arguments = ["snapshot", "--repo", server.repo("alice"), s.file("src")]
    p.environment = childEnvironment(env)
    let errors = Pipe()
    p.standardOutput = FileHandle.nullDevice
    p.standardError = errors
    try p.run()
    let deadline = Date().addingTimeInterval(60)
    while (try? spacePacks(server.data, "alice").count) ?? 0 < packs && p.isRunning && Date() < deadline {
        usleep(10_000)
    }
    return (p, errors)
}

/// A raw request; returns the status and body.
func http(
    _ method: String, _ url: String, token: String? = nil, data: String? = nil, dataFile: String? = nil,
    cacert: String? = nil
) throws -> (Int, String) {
    var args = [httptool, method, url]
    if let token { args += ["--token", token] }
    if let data { args += ["--data", data] }
    if let dataFile { args += ["--data-file", dataFile] }
    if let cacert { args += ["--cacert", cacert] }
    let r = try run("/usr/bin/env", ["python3"] + args)
    let lines = r.stdout.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false)
    return (Int(lines.first ?? "") ?? -1, lines.count > 1 ? String(lines[1]) : "")
}

func writeRandom(_ path: String, megabytes: Int) throws {
    try FileManager.default.createDirectory(
        atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    let data = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: megabytes << 20))
    try data.write(to: URL(fileURLWithPath: path))
}

/// Pack files of a space on the server's disk.
func spacePacks(_ data: String, _ user: String) throws -> [String] {
    let root = data + "/spaces/" + user + "/data"
    return try FileManager.default.contentsOfDirectory(atPath: root).flatMap { sub in
        try FileManager.default.contentsOfDirectory(atPath: root + "/" + sub).map { root + "/" + sub + "/" + $0 }
    }.filter { ($0 as NSString).lastPathComponent.count == 64 }.sorted()
}

/// Runs a query on a space's server index with Python's sqlite3; returns the first column.
func spaceQuery(_ data: String, _ user: String, _ sql: String) throws -> [String] {
    let script =
        "import sqlite3,sys; [print(r[0].hex() if isinstance(r[0], bytes) else r[0]) "
        + "for r in sqlite3.connect(sys.argv[1]).execute(sys.argv[2])]"
    let r = try run("/usr/bin/env", ["python3", "-c", script, data + "/spaces/" + user + "/index/server.sqlite", sql])
    return r.stdout.split(separator: "\n").map(String.init)
}

/// A scratch directory, a server in it, and Alice's device signed up with a repository.
func aliceOnServer(_ extra: [String] = []) throws -> (Scratch, TestServer, [String: String]) {
    let s = Scratch()
    let server = try TestServer(data: s.file("server"), extra)
    let alice = device(s, "alice", password: "alice password")
    try signUp(server, "alice", env: alice)
    return (s, server, alice)
}

/// Two accounts on `server`, each with one device and its repository.
func aliceAndBob(_ s: Scratch, on server: TestServer) throws -> (alice: [String: String], bob: [String: String]) {
    let alice = device(s, "alice", password: "alice password")
    let bob = device(s, "bob", password: "bob password")
    try signUp(server, "alice", env: alice)
    try signUp(server, "bob", env: bob)
    return (alice, bob)
}

/// Registers `user` (logging this device in) and creates the repository in the space.
func signUp(_ server: TestServer, _ user: String, env: [String: String]) throws {
    let reg = try cabackup(
        "register", "--server", server.url, "--user", user, "--email", "\(user)@example.org", env: env)
    #expect(reg.status == 0, "\(reg.stderr)")
    let initialized = try cabackup("init", "--repo", server.repo(user), env: env)
    #expect(initialized.status == 0, "\(initialized.stderr)")
}

@Suite("cabackup server: accounts, private data spaces, sync over HTTP", .serialized)
struct ServerTests {
    @Test("register, snapshot and restore through the server from two devices; unchanged re-snapshot uploads ~nothing")
    func roundTrip() throws {
        let s = Scratch()
        let server = try TestServer(data: s.file("server"))
        let laptop = device(s, "laptop", password: "alice password")
        let reg = try cabackup(
            "register", "--server", server.url, "--user", "alice", "--email", "alice@example.org", env: laptop)
        #expect(reg.status == 0, "\(reg.stderr)")
        let repo = server.repo("alice")
        #expect(try cabackup("init", "--repo", repo, env: laptop).status == 0)
        // A space's repository is zstd unless init says otherwise: bytes cross the network.
        let config = try String(contentsOfFile: server.data + "/spaces/alice/config", encoding: .utf8)
        #expect(jsonObject(config)?["compression"] as? String == "zstd")
        #expect(jsonObject(config)?["format_version"] as? Int == 4)
        let src = s.file("src")
        _ = try python(treetool, "make", src)
        let first = try cabackup("snapshot", "--repo", repo, "--json", src, env: laptop)
        #expect(first.status == 0, "\(first.stderr)")
        let firstAdded = try #require(jsonObject(first.lastLine)?["bytes_added"] as? Int)
        let packBytes = try spacePacks(server.data, "alice").reduce(0) {
            $0 + ((try FileManager.default.attributesOfItem(atPath: $1)[.size] as? Int) ?? 0)
        }
        // What was uploaded: the packs, plus the record.
        #expect(firstAdded > packBytes && firstAdded < packBytes + 4096)
        let again = try cabackup("snapshot", "--repo", repo, "--json", src, env: laptop)
        let againAdded = try #require(jsonObject(again.lastLine)?["bytes_added"] as? Int)
        #expect(againAdded < 4096, "an unchanged re-snapshot uploads only its record")

        // A second device with an empty cache logs in and restores byte for byte.
        let desktop = device(s, "desktop", password: "alice password")
        #expect(try cabackup("login", "--server", server.url, "--user", "alice", env: desktop).status == 0)
        let restore = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"), env: desktop)
        #expect(restore.status == 0, "\(restore.stderr)")
        #expect(try python(treetool, "compare", src, s.file("out") + src).status == 0)
        let devices = try cabackup("devices", "--server", server.url, "--user", "alice", env: desktop)
        #expect(devices.stdout.split(separator: "\n").count == 3)  // header + two devices
        #expect(try cabackup("check", "--repo", repo, "--read-data", env: desktop).status == 0)

        // Logged out: the token no longer works, and the CLI says to log in (exit 13).
        #expect(try cabackup("logout", "--server", server.url, "--user", "alice", env: desktop).status == 0)
        let after = try cabackup("snapshots", "--repo", repo, env: desktop)
        #expect(after.status == 13)
        #expect(after.stderr.contains("cabackup login"))
        // A wrong repository password is still exit 12, through the server too.
        var wrong = laptop
        wrong["CABACKUP_PASSWORD"] = "not it"
        #expect(try cabackup("snapshots", "--repo", repo, env: wrong).status == 12)
        #expect(server.stop() == 0, "SIGTERM stops the server cleanly")
    }

    @Test("two users cannot read, list, delete or overwrite each other's data, even with a valid token")
    func isolation() throws {
        let s = Scratch()
        let server = try TestServer(data: s.file("server"))
        let alice = device(s, "alice", password: "alice password")
        let bob = device(s, "bob", password: "bob's password")
        try signUp(server, "alice", env: alice)
        try signUp(server, "bob", env: bob)
        try writeRandom(s.file("alice-src/photo.raw"), megabytes: 2)
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), s.file("alice-src"), env: alice).status == 0)
        let pack = (try #require(try spacePacks(server.data, "alice").first) as NSString).lastPathComponent
        let snap = try #require(
            try FileManager.default.contentsOfDirectory(atPath: server.data + "/spaces/alice/snapshots").first {
                $0.count == 64
            })
        let bobToken = try storedToken(bob)
        let before = try FileManager.default.subpathsOfDirectory(atPath: server.data + "/spaces/alice")
            .filter { !$0.hasPrefix("index") }.sorted()

        // Bob's token sees Bob's space only: Alice's objects are simply not there.
        let list = try http("GET", server.url + "/v1/space/snapshots", token: bobToken)
        #expect(list.0 == 200 && list.1 == "[]")
        #expect(try http("GET", server.url + "/v1/space/snapshots/" + snap, token: bobToken).0 == 404)
        #expect(try http("GET", server.url + "/v1/space/packs/" + pack, token: bobToken).0 == 404)
        #expect(try http("DELETE", server.url + "/v1/space/packs/" + pack, token: bobToken).0 == 404)
        // Bob cannot learn whether Alice stored a chunk: every id is missing for him.
        let ids = try spaceQuery(server.data, "alice", "select id from blobs")
        #expect(!ids.isEmpty)
        let ask = "{\"ids\":[" + ids.map { "\"\($0)\"" }.joined(separator: ",") + "]}"
        let (status, body) = try http("POST", server.url + "/v1/space/blobs/missing", token: bobToken, data: ask)
        #expect(status == 200)
        #expect(ids.allSatisfy { body.contains($0) })
        // Bob "overwriting" Alice's snapshot name writes nothing of Alice's.
        try Data("garbage".utf8).write(to: URL(fileURLWithPath: s.file("garbage")))
        let overwrite = try http(
            "PUT", server.url + "/v1/space/snapshots/" + snap, token: bobToken, dataFile: s.file("garbage"))
        #expect(overwrite.0 == 400)
        let after = try FileManager.default.subpathsOfDirectory(atPath: server.data + "/spaces/alice")
            .filter { !$0.hasPrefix("index") }.sorted()
        #expect(after == before)
        #expect(try cabackup("snapshots", "--repo", server.repo("bob"), env: bob).stdout.contains("0 snapshots"))
        // Bob's client pointed at Alice's account has no login for it.
        #expect(try cabackup("snapshots", "--repo", server.repo("alice"), env: bob).status == 13)
        #expect(try cabackup("check", "--repo", server.repo("alice"), "--read-data", env: alice).status == 0)
    }

    @Test("bad input gets 4xx and changes nothing; the server survives it")
    func badInput() throws {
        let s = Scratch()
        let server = try TestServer(data: s.file("server"))
        let alice = device(s, "alice", password: "alice password")
        let u = server.url
        let reg = try cabackup("register", "--server", u, "--user", "alice", "--email", "a@example.org", env: alice)
        #expect(reg.status == 0)
        let dup = try cabackup("register", "--server", u, "--user", "alice", "--email", "b@example.org", env: alice)
        #expect(dup.status == 1 && dup.stderr.contains("taken"))
        let secret = String(repeating: "ab", count: 32)
        let long = String(repeating: "b", count: 65)
        for (body, why) in [
            ("{\"user\":\"bob\",\"email\":\"not-an-email\",\"secret\":\"\(secret)\"}", "e-mail"),
            ("{\"user\":\"\(long)\",\"email\":\"b@example.org\",\"secret\":\"\(secret)\"}", "user name"),
            ("{\"user\":\"..\",\"email\":\"b@example.org\",\"secret\":\"\(secret)\"}", "user name"),
            ("{\"user\":\"Bob/../x\",\"email\":\"b@example.org\",\"secret\":\"\(secret)\"}", "user name"),
            ("{\"user\":\"bob\",\"email\":\"b@example.org\",\"secret\":\"short\"}", "secret"),
            ("{\"user\": \"bob\", \"email\": ", "malformed JSON"),
        ] {
            let (status, text) = try http("POST", u + "/v1/register", data: body)
            #expect(status == 400, "\(body)")
            #expect(text.contains(why), "\(text)")
        }
        #expect(!FileManager.default.fileExists(atPath: server.data + "/spaces/bob"))
        #expect(try http("POST", u + "/v1/login", data: "{\"user\":\"alice\",\"secret\":\"\(secret)\"}").0 == 401)
        var wrong = alice
        wrong["CABACKUP_PASSWORD"] = "not alice's"
        #expect(try cabackup("login", "--server", u, "--user", "alice", env: wrong).status == 13)
        // Forged and missing tokens.
        #expect(try http("GET", u + "/v1/space/packs", token: String(repeating: "0", count: 64)).0 == 401)
        #expect(try http("GET", u + "/v1/space/packs").0 == 401)

        // Packs: a real one uploaded under a wrong name, and a truncated one.
        #expect(try cabackup("init", "--repo", server.repo("alice"), env: alice).status == 0)
        try writeRandom(s.file("src/a.bin"), megabytes: 1)
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: alice).status == 0)
        let packsBefore = try spacePacks(server.data, "alice")
        let packPath = try #require(packsBefore.first)
        let token = try storedToken(alice)
        let other = String(repeating: "c", count: 64)
        let mislabelled = try http("PUT", u + "/v1/space/packs/" + other, token: token, dataFile: packPath)
        #expect(mislabelled.0 == 400 && mislabelled.1.contains("does not match its name"))
        // Sending a stored pack again is harmless, and leaves nothing behind.
        let packName = (packPath as NSString).lastPathComponent
        #expect(try http("PUT", u + "/v1/space/packs/" + packName, token: token, dataFile: packPath).0 == 201)
        let bytes = try Data(contentsOf: URL(fileURLWithPath: packPath))
        try bytes.prefix(bytes.count / 2).write(to: URL(fileURLWithPath: s.file("half")))
        let halfName = String(try run("/usr/bin/sha256sum", [s.file("half")]).stdout.prefix(64))
        let truncated = try http("PUT", u + "/v1/space/packs/" + halfName, token: token, dataFile: s.file("half"))
        #expect(truncated.0 == 400 && truncated.1.contains("malformed"))
        #expect(try http("PUT", u + "/v1/space/packs/xyz", token: token, dataFile: s.file("half")).0 == 400)
        #expect(try spacePacks(server.data, "alice") == packsBefore)
        #expect(try FileManager.default.contentsOfDirectory(atPath: server.data + "/spaces/alice/tmp").isEmpty)
        #expect(try http("POST", u + "/v1/space/blobs/missing", token: token, data: "{\"ids\":[\"zz\"]}").0 == 400)
        let config = server.data + "/spaces/alice/config"
        #expect(try http("PUT", u + "/v1/space/config", token: token, dataFile: config).0 == 409)
        #expect(try http("PUT", u + "/v1/space/config", token: token, data: "{}").0 == 400)
        // Still serving, and the space is intact.
        #expect(try cabackup("check", "--repo", server.repo("alice"), "--read-data", env: alice).status == 0)
    }

    @Test("forget --prune and the lock work through the server; a lost server index is rebuilt from the packs")
    func maintenance() throws {
        let (s, first, alice) = try aliceOnServer()
        var server = first
        let port = server.port
        let repo = server.repo("alice")
        try writeRandom(s.file("src/a.bin"), megabytes: 2)
        #expect(try cabackup("snapshot", "--repo", repo, s.file("src"), env: alice).status == 0)
        try writeRandom(s.file("src/a.bin"), megabytes: 2)
        #expect(try cabackup("snapshot", "--repo", repo, s.file("src"), env: alice).status == 0)
        let before = try spacePacks(server.data, "alice").count

        // Another client's exclusive lease blocks a snapshot (exit 11) until released.
        let token = try storedToken(alice)
        let (status, body) = try http(
            "POST", server.url + "/v1/space/locks", token: token, data: "{\"exclusive\":true}")
        #expect(status == 201)
        let lease = try #require(jsonObject(body)?["id"] as? String)
        #expect(try http("PUT", server.url + "/v1/space/locks/" + lease, token: token).0 == 204)
        #expect(try cabackup("snapshot", "--repo", repo, s.file("src"), env: alice).status == 11)
        #expect(try http("DELETE", server.url + "/v1/space/locks/" + lease, token: token).0 == 204)
        #expect(try http("PUT", server.url + "/v1/space/locks/" + lease, token: token).0 == 404)

        let forget = try cabackup("forget", "--repo", repo, "--keep-last", "1", "--prune", env: alice)
        #expect(forget.status == 0, "\(forget.stderr)")
        #expect(try spacePacks(server.data, "alice").count < before)
        #expect(try cabackup("check", "--repo", repo, "--read-data", env: alice).status == 0)

        // The server's own index is derived: lose it, restart, and it is rebuilt from the packs.
        #expect(server.stop() == 0)
        for suffix in ["", "-wal", "-shm"] {
            try? FileManager.default.removeItem(atPath: server.data + "/spaces/alice/index/server.sqlite" + suffix)
        }
        server = try TestServer(data: s.file("server"), port: port)
        // The record is accepted only if the rebuilt index holds every tree it declares.
        #expect(try cabackup("snapshot", "--repo", repo, s.file("src"), env: alice).status == 0)
        #expect(try spaceQuery(server.data, "alice", "select count(*) > 0 from blobs") == ["1"])
        #expect(try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"), env: alice).status == 0)
        #expect(
            FileManager.default.contentsEqual(atPath: s.file("src/a.bin"), andPath: s.file("out") + s.file("src/a.bin"))
        )

        // A plaintext repository's pack is refused: spaces hold encrypted data only.
        #expect(try cabackup("init", "--repo", s.file("plain"), "--no-encryption").status == 0)
        #expect(try cabackup("snapshot", "--repo", s.file("plain"), s.file("src")).status == 0)
        let plainPack = try #require(
            try FileManager.default.subpathsOfDirectory(atPath: s.file("plain/data")).first { $0.count == 67 })
        let name = String(plainPack.suffix(64))
        let refused = try http(
            "PUT", server.url + "/v1/space/packs/" + name, token: token, dataFile: s.file("plain/data/" + plainPack))
        #expect(refused.0 == 400 && refused.1.contains("not sealed"))
    }

    @Test("an expired token is refused (exit 13); a quota stops an upload with a clear error, space valid")
    func expiryAndQuota() throws {
        // Long enough for three commands on a loaded machine; the wait below is counted
        // from the login, so the test takes no longer than it must.
        let lifetime = 8.0
        let (s, server, alice) = try aliceOnServer(["--token-lifetime", "\(Int(lifetime))", "--quota-bytes", "1500000"])
        let loggedIn = Date()
        try writeRandom(s.file("small/a.bin"), megabytes: 1)
        try writeRandom(s.file("big/b.bin"), megabytes: 3)
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), s.file("small"), env: alice).status == 0)
        let over = try cabackup("snapshot", "--repo", server.repo("alice"), s.file("big"), env: alice)
        #expect(over.status == 1)
        #expect(over.stderr.contains("quota"))
        // GET /v1/space/usage: the bytes the space holds (the 1 MiB snapshot) and the quota.
        let (status, body) = try http("GET", server.url + "/v1/space/usage", token: try storedToken(alice))
        #expect(status == 200, "\(body)")
        let usage = try #require(try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any])
        let used = try #require(usage["used"] as? Int)
        #expect(used > 1 << 20 && used <= 1_500_000, "\(body)")
        #expect(usage["quota"] as? Int == 1_500_000)
        #expect(try http("GET", server.url + "/v1/space/usage").0 == 401)
        let check = try cabackup("check", "--repo", server.repo("alice"), env: alice)
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        Thread.sleep(forTimeInterval: max(0, lifetime + 1 - Date().timeIntervalSince(loggedIn)))
        let expired = try cabackup("snapshots", "--repo", server.repo("alice"), env: alice)
        #expect(expired.status == 13)
        #expect(expired.stderr.contains("expired"))
    }

    @Test("the server killed mid-upload: the space stays valid, the re-run completes and uploads nothing twice")
    func killedMidUpload() throws {
        let (s, first, alice) = try aliceOnServer()
        var server = first
        let port = server.port
        // The server stays dead: the client gives up after 1 s of retrying (not 5 minutes).
        let (p, _) = try snapshotUntilPacks(
            2, s, server, env: alice.merging(["CABACKUP_RETRY_SECONDS": "1"]) { $1 })
        try #require(p.isRunning, "the snapshot ended before the server was killed")
        server.kill()
        p.waitUntilExit()
        #expect(p.terminationStatus != 0)
        #expect(try spacePacks(server.data, "alice").count >= 2)

        server = try TestServer(data: s.file("server"), port: port)
        #expect(try cabackup("check", "--repo", server.repo("alice"), env: alice).status == 0)
        let rerun = try cabackup("snapshot", "--repo", server.repo("alice"), "--json", s.file("src"), env: alice)
        #expect(rerun.status == 0, "\(rerun.stderr)")
        // Every blob is stored exactly once: nothing that arrived before the kill came again.
        #expect(try spaceQuery(server.data, "alice", "select count(*) - count(distinct id) from blobs") == ["0"])
        let restore = try cabackup(
            "restore", "--repo", server.repo("alice"), "latest", "--target", s.file("out"), env: alice)
        #expect(restore.status == 0)
        #expect(
            FileManager.default.contentsEqual(
                atPath: s.file("src/big.bin"), andPath: s.file("out") + s.file("src/big.bin")))
    }

    @Test("over TLS with a self-signed certificate: trusted with CABACKUP_CACERT, refused without")
    func tls() throws {
        let s = Scratch()
        let made = try run(
            "/usr/bin/openssl",
            [
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", s.file("key.pem"),
                "-out", s.file("cert.pem"),
            ])
        #expect(made.status == 0, "\(made.stderr)")
        let server = try TestServer(
            data: s.file("server"), ["--tls-cert", s.file("cert.pem"), "--tls-key", s.file("key.pem")])
        #expect(server.url.hasPrefix("https://"))
        // TLS 1.2 with a forward-secret AEAD suite, or 1.3; never 1.0/1.1 or CBC with SHA-1.
        func handshake(_ options: [String]) throws -> Int32 {
            try run(
                "/usr/bin/openssl",
                ["s_client", "-connect", "127.0.0.1:\(server.port)", "-CAfile", s.file("cert.pem")] + options
            ).status
        }
        #expect(try handshake(["-tls1_2"]) == 0)
        #expect(try handshake(["-tls1_3"]) == 0)
        #expect(try handshake(["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]) != 0)
        #expect(try handshake(["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]) != 0)
        #expect(try handshake(["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0"]) != 0)
        let untrusted = device(s, "alice", password: "alice password")
        let refused = try cabackup(
            "register", "--server", server.url, "--user", "alice", "--email", "a@example.org", env: untrusted)
        #expect(refused.status == 14)
        var alice = untrusted
        alice["CABACKUP_CACERT"] = s.file("cert.pem")
        let reg = try cabackup(
            "register", "--server", server.url, "--user", "alice", "--email", "a@example.org", env: alice)
        #expect(reg.status == 0, "\(reg.stderr)")
        #expect(try cabackup("init", "--repo", server.repo("alice"), env: alice).status == 0)
        try writeRandom(s.file("src/a.bin"), megabytes: 1)
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: alice).status == 0)
        let restore = try cabackup(
            "restore", "--repo", server.repo("alice"), "latest", "--target", s.file("out"), env: alice)
        #expect(restore.status == 0)
        #expect(
            FileManager.default.contentsEqual(atPath: s.file("src/a.bin"), andPath: s.file("out") + s.file("src/a.bin"))
        )
    }
}
