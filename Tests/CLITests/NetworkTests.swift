import Foundation
import Testing

/// Alice's space on a real server, reached through a proxy that counts requests and can
/// cut connections or go dark (`hostileproxy.py`), with the repository created.
private func aliceThroughProxy(
    _ env: [String: String] = [:]
) throws -> (
    Scratch, TestServer, HostileProxy, [String: String]
) {
    let s = Scratch()
    let server = try TestServer(data: s.file("server"))
    let proxy = try HostileProxy(upstream: server.url, scratch: s)
    let alice = device(s, "alice", password: "alice password").merging(env) { $1 }
    let reg = try cabackup(
        "register", "--server", proxy.url, "--user", "alice", "--email", "alice@example.org", env: alice)
    #expect(reg.status == 0, "\(reg.stderr)")
    let initialized = try cabackup("init", "--repo", proxy.repo("alice"), env: alice)
    #expect(initialized.status == 0, "\(initialized.stderr)")
    return (s, server, proxy, alice)
}

/// `count` directories below `root`, each holding one small file of its own.
func makeDirectories(_ root: String, from first: Int, count: Int) throws {
    for i in first..<(first + count) {
        let dir = root + "/d\(i)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try Data("file \(i)\n".utf8).write(to: URL(fileURLWithPath: dir + "/f.txt"))
    }
}

/// Whether two directory trees hold the same files with the same bytes.
func sameTree(_ a: String, _ b: String) throws -> Bool {
    let r = try run("/usr/bin/diff", ["-r", a, b])
    return r.status == 0
}

@Suite("over a network: cached trees, restores by pack, retries on a flaky link", .serialized)
struct NetworkTests {
    @Test("an unchanged snapshot and a listing on a new device cost requests that do not grow with the directories")
    func requestsDoNotGrowWithDirectories() throws {
        let (s, server, proxy, alice) = try aliceThroughProxy()
        defer { withExtendedLifetime(server) {} }
        let src = s.file("src")
        try makeDirectories(src, from: 0, count: 5)
        let repo = proxy.repo("alice")
        #expect(try cabackup("snapshot", "--repo", repo, src, env: alice).status == 0)
        _ = proxy.takeLog()
        #expect(try cabackup("snapshot", "--repo", repo, src, env: alice).status == 0)
        let few = proxy.takeLog()

        try makeDirectories(src, from: 5, count: 300)
        #expect(try cabackup("snapshot", "--repo", repo, src, env: alice).status == 0)
        _ = proxy.takeLog()
        let unchanged = try cabackup("snapshot", "--repo", repo, src, env: alice)
        #expect(unchanged.status == 0, "\(unchanged.stderr)")
        let many = proxy.takeLog()
        // The parent's trees come from this device's cache: not one request per directory.
        #expect(many.count == few.count, "5 directories: \(few)\n305 directories: \(many)")
        #expect(!many.contains { $0.hasPrefix("GET /v1/space/packs/") }, "\(many)")

        // A new device: the trees are fetched a pack at a time, not a directory at a time.
        let phone = device(s, "phone", password: "alice password")
        #expect(try cabackup("login", "--server", proxy.url, "--user", "alice", env: phone).status == 0)
        _ = proxy.takeLog()
        let ls = try cabackup("ls", "--repo", repo, "latest", env: phone)
        #expect(ls.status == 0, "\(ls.stderr)")
        #expect(ls.stdout.contains("/d304/f.txt"), "\(ls.stdout.suffix(300))")
        let listing = proxy.takeLog()
        #expect(listing.count < 40, "\(listing.count) requests for a listing of 305 directories: \(listing)")
        let cached = try FileManager.default.subpathsOfDirectory(atPath: phone["XDG_CACHE_HOME"]! + "/cabackup")
        #expect(cached.contains { $0.contains("/packs/") }, "\(cached)")

        // Its restore reads packs in runs of blobs, not a request per file.
        let target = s.file("restored")
        let restored = try cabackup("restore", "--repo", repo, "latest", "--target", target, env: phone)
        #expect(restored.status == 0, "\(restored.stderr)")
        #expect(try sameTree(src, target + src))
        let reads = proxy.takeLog().filter { $0.hasPrefix("GET /v1/space/packs/") }
        #expect(reads.count < 20, "\(reads.count) pack reads to restore 305 files")
    }

    @Test("a cached tree pack changed on this disk is dropped and read again from the space")
    func damagedCacheIsNotTrusted() throws {
        let (s, server, proxy, alice) = try aliceThroughProxy()
        defer { withExtendedLifetime(server) {} }
        let src = s.file("src")
        try makeDirectories(src, from: 0, count: 20)
        let repo = proxy.repo("alice")
        #expect(try cabackup("snapshot", "--repo", repo, src, env: alice).status == 0)
        let cache = alice["XDG_CACHE_HOME"]! + "/cabackup"
        let packs = try FileManager.default.subpathsOfDirectory(atPath: cache).filter {
            $0.contains("/packs/") && $0.split(separator: "/").last?.count == 64
        }
        #expect(!packs.isEmpty, "this device's tree packs are cached as they are uploaded")
        for p in packs {
            // Flip every byte but the trailer: every tree in it fails its check.
            var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: cache + "/" + p)))
            for i in 0..<max(0, bytes.count - 64) { bytes[i] ^= 0x5A }
            try Data(bytes).write(to: URL(fileURLWithPath: cache + "/" + p))
        }
        let ls = try cabackup("ls", "--repo", repo, "latest", env: alice)
        #expect(ls.status == 0, "\(ls.stderr)")
        #expect(ls.stdout.contains("/d19/f.txt"))
        for p in packs {
            // Gone, or fetched again whole from the space (a pack's name is its SHA-256).
            let path = cache + "/" + p
            guard FileManager.default.fileExists(atPath: path) else { continue }
            let name = String(p.split(separator: "/").last!)
            let stored = server.data + "/spaces/alice/data/" + name.prefix(2) + "/" + name
            #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data(contentsOf: URL(fileURLWithPath: stored)))
        }
        // Without the cache a listing still works, and leaves nothing in it.
        let laptop = device(s, "laptop", password: "alice password")
        #expect(try cabackup("login", "--server", proxy.url, "--user", "alice", env: laptop).status == 0)
        let none = try cabackup("ls", "--repo", repo, "latest", "--no-cache", env: laptop)
        #expect(none.status == 0, "\(none.stderr)")
        #expect(none.stdout.contains("/d19/f.txt"))
        let kept = (try? FileManager.default.subpathsOfDirectory(atPath: laptop["XDG_CACHE_HOME"]! + "/cabackup")) ?? []
        #expect(!kept.contains { $0.contains("/packs/") && $0.split(separator: "/").last?.count == 64 }, "\(kept)")
    }

    @Test(
        "a connection cut mid-upload and mid-restore, and outages: the snapshot completes, nothing is stored twice, the restore is identical"
    )
    func flakyLink() throws {
        let (s, server, proxy, alice) = try aliceThroughProxy()
        defer { withExtendedLifetime(server) {} }
        let src = s.file("src")
        for i in 0..<3 { try writeRandom(src + "/big\(i).bin", megabytes: 12) }
        try makeDirectories(src, from: 0, count: 30)
        let repo = proxy.repo("alice")

        try proxy.set(["PUT /v1/space/packs/*": ["cut": "upload", "times": 2]])
        let first = try cabackup("snapshot", "--repo", repo, src, env: alice)
        #expect(first.status == 0, "\(first.stderr)")
        #expect(proxy.takeLog().filter { $0.hasSuffix("(cut mid-upload)") }.count == 2)
        // Every blob is stored exactly once: a retried upload stored nothing twice.
        #expect(try spaceQuery(server.data, "alice", "select count(*) - count(distinct id) from blobs") == ["0"])

        // A dead link for 3 s in the middle of a backup: waited out, said on stderr.
        try writeRandom(src + "/more.bin", megabytes: 20)
        try proxy.set(["PUT /v1/space/packs/*": ["outage": 3, "times": 1]])
        let second = try cabackup("snapshot", "--repo", repo, src, env: alice)
        #expect(second.status == 0, "\(second.stderr)")
        #expect(second.stderr.contains("waiting for the network"), "\(second.stderr)")
        #expect(proxy.takeLog().contains { $0.hasSuffix("(dropped: outage)") })

        // Reads cut half way, then an outage, on a new device's restore.
        let phone = device(s, "phone", password: "alice password")
        #expect(try cabackup("login", "--server", proxy.url, "--user", "alice", env: phone).status == 0)
        try proxy.set(["GET /v1/space/packs/*": ["cut": "download", "times": 3]])
        let target = s.file("restored")
        let restored = try cabackup("restore", "--repo", repo, "latest", "--target", target, env: phone)
        #expect(restored.status == 0, "\(restored.stderr)")
        #expect(try sameTree(src, target + src))
        #expect(proxy.takeLog().filter { $0.hasSuffix("(cut mid-download)") }.count == 3)

        try proxy.set(["GET /v1/space/packs/*": ["outage": 3, "times": 1]])
        let again = s.file("restored-again")
        let restoredAgain = try cabackup("restore", "--repo", repo, "latest", "--target", again, env: phone)
        #expect(restoredAgain.status == 0, "\(restoredAgain.stderr)")
        #expect(try sameTree(src, again + src))
        #expect(try cabackup("check", "--repo", repo, "--read-data", env: phone).status == 0)
    }

    @Test("a lock whose answer is lost: the retry gets the same lease, and no stray lease holds the space")
    func lockAnswerLost() throws {
        let (s, server, proxy, alice) = try aliceThroughProxy()
        defer { withExtendedLifetime(server) {} }
        try writeRandom(s.file("src/a.bin"), megabytes: 1)
        let repo = proxy.repo("alice")
        // The server takes the lease, the answer is cut half way: the client retries with
        // the same idempotency key.
        try proxy.set(["POST /v1/space/locks": ["cut": "download", "times": 1]])
        let snapshot = try cabackup("snapshot", "--repo", repo, s.file("src"), env: alice)
        #expect(snapshot.status == 0, "\(snapshot.stderr)")
        #expect(proxy.takeLog().filter { $0.hasPrefix("POST /v1/space/locks") }.count == 2)
        // A second lease from the lost answer would hold the space for a minute: an
        // exclusive lock right away would be refused (exit 11).
        let forget = try cabackup("forget", "--repo", repo, "--keep-last", "1", "--prune", env: alice)
        #expect(forget.status == 0, "\(forget.stderr)")
    }

    @Test("the server killed mid-upload and started again: the running backup waits for it and completes")
    func serverRestartMidUpload() throws {
        let (s, first, alice) = try aliceOnServer()
        var server = first
        let port = server.port
        let (p, errors) = try snapshotUntilPacks(1, s, server, env: alice)
        try #require(p.isRunning, "the snapshot ended before the server was killed")
        server.kill()
        // The server stays down until the client says it is waiting (it has packs left to
        // send), then comes back on the same port; the client's retries find it.
        let said = CollectedText()
        let reader = Thread {
            while case let data = errors.fileHandleForReading.availableData, !data.isEmpty { said.append(data) }
        }
        reader.start()
        let waited = eventually(within: 120) { said.text.contains("waiting for the network") || !p.isRunning }
        server = try TestServer(data: s.file("server"), port: port)
        p.waitUntilExit()
        #expect(eventually(within: 10) { reader.isFinished })
        let stderr = said.text
        #expect(waited && stderr.contains("waiting for the network"), "\(stderr)")
        #expect(p.terminationStatus == 0, "\(stderr)")
        #expect(try spaceQuery(server.data, "alice", "select count(*) - count(distinct id) from blobs") == ["0"])
        let restore = try cabackup(
            "restore", "--repo", server.repo("alice"), "latest", "--target", s.file("out"), env: alice)
        #expect(restore.status == 0, "\(restore.stderr)")
        #expect(
            FileManager.default.contentsEqual(
                atPath: s.file("src/big.bin"), andPath: s.file("out") + s.file("src/big.bin")))
    }
}

/// Text a reader thread collects (a child's stderr) while the test polls it.
final class CollectedText: @unchecked Sendable {
    private let lock = NSLock()
    private var collected = ""

    var text: String { lock.withLock { collected } }

    func append(_ data: Data) { lock.withLock { collected += String(decoding: data, as: UTF8.self) } }
}
