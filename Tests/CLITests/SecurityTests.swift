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
    let r = try run("/usr/bin/env", ["python3", "-c", script, productsDirectory + "/cabackup"] + args, env: env)
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

        // Forty decoy slots that cost a derivation each and open with nothing, sorted first.
        var rules: [String: [String: Any]] = [:]
        var names: [String] = []
        for i in 0..<40 {
            let name = String(format: "%02x", i) + String(repeating: "1", count: 62)
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
