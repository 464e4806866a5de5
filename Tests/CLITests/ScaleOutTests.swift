import CABackup
import CABackupRemote
import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Server instances sharing one PostgreSQL and one S3 bucket behind nginx, as
/// docs/operations.md sets them up: any instance serves any request.
@Suite("several server instances behind nginx, on PostgreSQL and an S3 bucket")
struct ScaleOutTests {
    @Test(
        "three instances, PostgreSQL and SeaweedFS: 20 devices of 5 accounts back up at once through an instance killed, PostgreSQL restarted and the volume server restarted; every snapshot completes, checks and restores; counters equal the bytes stored; the quota holds across instances",
        .timeLimit(.minutes(10))
    )
    func faults() async throws {
        let postgres = try await PostgresServer()
        let url = postgres.url
        let rig = try await offPool { try FaultRig(database: url) }
        // Stopped here, not by whichever thread drops the rig last (perhaps as the test
        // process exits, leaving servers behind).
        defer { rig.stop() }
        // The devices start 1.5 s apart, so uploads arrive throughout (a device uploads
        // most of its packs at its end); the faults strike meanwhile, and the packs stored
        // are noted after each. The last four start only after the last fault, so however
        // slow the machine, data still arrives after every fault.
        try await rig.wait(untilSecondsIn: 8)
        #expect(!rig.finished, "the snapshots finished before the first fault")
        try await offPool { try rig.killAndRestartInstance() }
        rig.note()
        try await rig.wait(untilSecondsIn: 15)
        #expect(!rig.finished, "the snapshots finished before PostgreSQL was restarted")
        try await postgres.restart()
        rig.note()
        try await rig.wait(untilSecondsIn: 22)
        #expect(!rig.finished, "the snapshots finished before the volume server was restarted")
        try await offPool { try rig.store.restart(.volume) }
        rig.faultsDone.value.store(true, ordering: .releasing)
        rig.note()
        try await offPool { try rig.verify() }
        for problem in rig.problems { Issue.record(Comment(rawValue: problem)) }
        withExtendedLifetime(postgres) {}
    }

    @Test(
        "server migrate: a single server's directory moves into PostgreSQL and a bucket; devices keep their tokens; check, restore and password logins work"
    )
    func migrate() async throws {
        let postgres = try await PostgresServer()
        let url = postgres.url
        try await offPool { try Self.migrate(database: url) }
        withExtendedLifetime(postgres) {}
    }

    static func migrate(database: String) throws {
        let store = try SeaweedFS()
        try store.createBucket("spaces")
        let s = Scratch()
        var server = try TestServer(data: s.file("single"))
        let port = server.port
        let (alice, bob) = try aliceAndBob(s, on: server)
        let src = s.file("alice-src")
        try writeRandom(src + "/a.bin", megabytes: 6)
        try makeDirectories(src, from: 0, count: 12)
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), src, env: alice).status == 0)
        try writeRandom(src + "/b.bin", megabytes: 2)
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), src, env: alice).status == 0)
        try writeRandom(s.file("bob-src/c.bin"), megabytes: 3)
        #expect(try cabackup("snapshot", "--repo", server.repo("bob"), s.file("bob-src"), env: bob).status == 0)
        #expect(try run(cabackupBinary, ["server", "admin", "quota", "bob", "1G", "--data", server.data]).status == 0)
        #expect(server.stop() == 0)

        let env = store.environment.merging(["PGPASSWORD": PostgresServer.password]) { $1 }
        let shared = ["--storage", "s3:\(store.endpoint)/spaces", "--database", database]
        let migrate = ["server", "migrate", "--from", s.file("single"), "--data", s.file("new")] + shared
        let moved = try run(cabackupBinary, migrate, env: env)
        #expect(moved.status == 0, "\(moved.stderr)")
        #expect(moved.stdout.contains("moved 2 accounts, 2 device tokens"), "\(moved.stdout)")
        let again = try run(cabackupBinary, migrate, env: env)
        #expect(again.stdout.contains("moved 0 accounts, 0 device tokens, 0 files"), "\(again.stdout)")

        // The same address: the devices' tokens still work, with no login.
        server = try TestServer(data: s.file("new"), port: port, shared, env: env)
        let check = try cabackup("check", "--repo", server.repo("alice"), "--read-data", env: alice)
        #expect(check.status == 0, "\(check.stdout) \(check.stderr)")
        let out = s.file("out")
        let restore = try cabackup("restore", "--repo", server.repo("alice"), "latest", "--target", out, env: alice)
        #expect(restore.status == 0, "\(restore.stderr)")
        #expect(try sameTree(src, out + src))
        #expect(try cabackup("check", "--repo", server.repo("bob"), "--read-data", env: bob).status == 0)
        // An unchanged snapshot finds its parent's data indexed: nothing is uploaded again.
        let unchanged = try cabackup("snapshot", "--repo", server.repo("alice"), "--json", src, env: alice)
        #expect(jsonObject(unchanged.lastLine)?["chunks_added"] as? Int == 0, "\(unchanged.stdout) \(unchanged.stderr)")
        // A new device logs in with the password (the login-salt key came along).
        let tablet = device(s, "alice-tablet", password: "alice password")
        let login = try cabackup("login", "--server", server.url, "--user", "alice", env: tablet)
        #expect(login.status == 0, "\(login.stderr)")
        #expect(try cabackup("snapshots", "--repo", server.repo("alice"), env: tablet).status == 0)
        // The operator's settings came along.
        let accounts = try run(
            cabackupBinary, ["server", "admin", "accounts", "--json", "--data", s.file("new")] + shared, env: env)
        #expect(accounts.stdout.contains(#""quota_bytes":1073741824"#), "\(accounts.stdout) \(accounts.stderr)")
    }
}

/// The fault test's set-up: SeaweedFS as separate processes, three server instances behind
/// nginx, five accounts of four devices, each device with a real tree of its own (files of
/// /usr/lib and /usr/share, dealt out in turn), and their twenty snapshots running (started
/// 1.5 s apart, so several run at any time).
private final class FaultRig: @unchecked Sendable {
    // Safe: the test calls one method at a time.
    let store: SeaweedFS
    let s = Scratch()
    let env: [String: String]
    let shared: [String]
    var instances: [TestServer] = []
    let balancer: Nginx
    let users = (0..<5).map { "user\($0)" }
    var devices: [(user: String, env: [String: String], src: String)] = []
    final class Results: @unchecked Sendable {
        // Safe: written by the thread that runs the snapshots before it finishes, read after.
        var results: [RunResult?] = []
    }
    private let box = Results()
    var results: [RunResult?] { box.results }
    var running = Thread {}
    /// Set once the last fault struck: the last four devices start then.
    let faultsDone = Flag()

    final class Flag: Sendable {
        let value = Atomic(false)
    }
    /// What failed, recorded by the test's own task: an issue recorded on another thread
    /// belongs to no test.
    private(set) var problems: [String] = []

    func check(_ ok: Bool, _ message: @autoclosure () -> String = "", line: Int = #line) {
        if !ok { problems.append("ScaleOutTests.swift:\(line): \(message())") }
    }
    var started = Date()
    /// The packs stored at each fault.
    var packsAtFaults: [Int] = []

    var finished: Bool { running.isFinished }

    init(database: String) throws {
        store = try SeaweedFS(separate: true)
        try store.createBucket("spaces")
        env = store.environment.merging(["PGPASSWORD": PostgresServer.password]) { $1 }
        shared = ["--storage", "s3:\(store.endpoint)/spaces", "--database", database, "--trusted-proxy", "127.0.0.1"]
        for i in 0..<3 {
            instances.append(try TestServer(data: s.file("instance\(i)"), shared, env: env, log: s.file("log\(i)")))
        }
        balancer = try Nginx(upstreams: instances.map { "127.0.0.1:\($0.port)" })
        let trees = try realTrees(in: s.file("trees"), count: 20, bytesEach: 30 << 20)
        var jobs: [([String], [String: String])] = []
        for (u, user) in users.enumerated() {
            for d in 0..<4 {
                let env = device(s, "\(user)-device\(d)", password: "\(user) password")
                if d == 0 {
                    let reg = try cabackup(
                        "register", "--server", balancer.url, "--user", user, "--email", "\(user)@example.org", env: env
                    )
                    check(reg.status == 0, "\(reg.stderr)")
                    let initialized = try cabackup("init", "--repo", repo(user), env: env)
                    check(initialized.status == 0, "\(initialized.stderr)")
                } else {
                    let login = try cabackup("login", "--server", balancer.url, "--user", user, env: env)
                    check(login.status == 0, "\(login.stderr)")
                }
                let src = trees[u * 4 + d].path
                devices.append((user, env, src))
                jobs.append((["snapshot", "--repo", repo(user), src], env))
            }
        }
        let (all, box) = (jobs, box)
        // The thread holds the box, not the rig: the rig's servers stop when it goes.
        let faultsDone = faultsDone
        running = Thread {
            box.results = runAtOnce(all, startingEvery: 1.5, gatedFrom: 16) {
                faultsDone.value.load(ordering: .acquiring)
            }
        }
        started = Date()
        running.start()
    }

    /// Kills the instances, nginx and SeaweedFS (the snapshots are done or failed).
    func stop() {
        for instance in instances { instance.kill() }
        balancer.stop()
        store.stop()
    }

    func repo(_ user: String) -> String { balancer.url.replacingOccurrences(of: "://", with: "://\(user)@") }

    /// The bytes of every object in the bucket.
    func bucketBytes(prefix: String = "") throws -> Int {
        try store.client(bucket: "spaces").list(prefix: prefix).reduce(0) { $0 + $1.size }
    }

    /// Waits until `seconds` after the first snapshot started (or until all finished).
    func wait(untilSecondsIn seconds: Double) async throws {
        while !finished, Date().timeIntervalSince(started) < seconds {
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    /// Packs stored so far: pack uploads nginx saw answered 201 (a cheap count, where a
    /// listing of the bucket is slow on a loaded machine).
    func packsStored() -> Int {
        balancer.accessLog.filter { $0.hasPrefix("PUT /v1/space/packs/") && $0.contains(" 201 ") }.count
    }

    /// The requests nginx answered with a 5xx status (its log: method, path, status, upstream).
    func serverErrors() -> [String] {
        balancer.accessLog.filter { $0.split(separator: " ").dropFirst(2).first?.hasPrefix("5") == true }
    }

    /// Notes the packs stored just after a fault.
    func note() {
        let errors = serverErrors()
        packsAtFaults.append(packsStored())
        print(
            "fault rig: \(Int(Date().timeIntervalSince(started))) s in: \(packsAtFaults.last!) packs stored, \(errors.count) answers 5xx so far"
        )
    }

    /// SIGKILLs the first instance mid-way and starts it again on its port.
    func killAndRestartInstance() throws {
        let port = instances[0].port
        instances[0].kill()
        sleep(2)
        instances[0] = try TestServer(data: s.file("instance0"), port: port, shared, env: env, log: s.file("log0"))
    }

    func verify() throws {
        check(eventually(within: 540) { finished })
        let errors = serverErrors()
        print("fault rig: all done \(Int(Date().timeIntervalSince(started))) s in; 5xx answers: \(errors)")
        for (i, instance) in instances.enumerated() {
            let log = (try? String(contentsOfFile: s.file("log\(i)"), encoding: .utf8)) ?? ""
            check(instance.process.isRunning, "instance \(i) stopped: \(log.suffix(2000))")
        }
        if results.contains(where: { $0?.status != 0 }) {
            let nginx = (try? String(contentsOfFile: balancer.dir.file("error.log"), encoding: .utf8)) ?? ""
            print("fault rig: nginx's errors: \(nginx.suffix(3000))")
            for i in instances.indices {
                let log = (try? String(contentsOfFile: s.file("log\(i)"), encoding: .utf8)) ?? ""
                let notable = log.split(separator: "\n").filter { !$0.contains(" info ") }.suffix(30)
                print("fault rig: instance \(i)'s errors:\n\(notable.joined(separator: "\n"))")
            }
        }
        // The data kept arriving after every fault.
        let total = packsStored()
        check(packsAtFaults.allSatisfy { $0 < total }, "\(packsAtFaults) of \(total) packs stored at the faults")
        // Every space checks and holds exactly its own devices' four snapshots.
        let checks = runAtOnce(
            users.map { user in
                (["check", "--repo", repo(user), "--read-data"], devices.first { $0.user == user }!.env)
            })
        for (user, result) in zip(users, checks) {
            check(result?.status == 0, "\(user): \(result?.stdout ?? "") \(result?.stderr ?? "")")
            let mine = devices.filter { $0.user == user }
            let list = try cabackup("snapshots", "--repo", repo(user), "--json", env: mine[0].env)
            let snapshots = try? JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [[String: Any]]
            let paths = (snapshots ?? []).flatMap { $0["paths"] as? [String] ?? [] }
            check(paths.sorted() == mine.map(\.src).sorted(), "\(user): \(list.stdout) \(list.stderr)")
        }
        // Every device's tree restores byte for byte, read through any instance.
        let restores = runAtOnce(
            devices.enumerated().map { (i, d) in
                (["restore", "--repo", repo(d.user), "latest", "--path", d.src, "--target", s.file("out\(i)")], d.env)
            })
        for (i, (d, r)) in zip(devices, restores).enumerated() {
            check(r?.status == 0, "\(r?.stderr ?? "did not finish")")
            try check(sameTree(d.src, s.file("out\(i)") + d.src))
        }
        // A device of one account cannot read another's space with its token.
        let other = try cabackup("snapshots", "--repo", repo(users[1]), env: devices[0].env)
        check(other.status != 0)
        // Every instance served requests.
        let upstreams = Set(balancer.accessLog.compactMap { $0.split(separator: " ").last.map(String.init) })
        check(upstreams.isSuperset(of: instances.map { "127.0.0.1:\($0.port)" }), "\(upstreams)")

        // Reconciled, each space's quota counter equals the bytes its files hold.
        func admin(_ args: String...) throws -> RunResult {
            try run(
                cabackupBinary, ["server", "admin"] + args + ["--data", s.file("instance1")] + shared.prefix(4),
                env: env)
        }
        var pass = try admin("reconcile")
        if pass.status == 3 {  // a lease whose release was lost lapses within a minute
            print("fault rig: \(pass.stdout)")
            sleep(61)
            pass = try admin("reconcile")
        }
        check(pass.status == 0, "\(pass.stdout) \(pass.stderr)")
        let again = try admin("reconcile")
        for user in users {
            let line = again.stdout.split(separator: "\n").first { $0.hasPrefix("\(user): ") } ?? ""
            let inBucket = try store.client(bucket: "spaces").list(prefix: "spaces/\(user)/")
                .filter { !$0.key.contains("/locks/") }.reduce(0) { $0 + $1.size }
            check(
                line.contains("\(user): \(inBucket) bytes stored, counted \(inBucket) (corrected by +0)"),
                "\(line) (the bucket holds \(inBucket)): \(pass.stdout)")
        }

        // A quota set by the operator holds across instances: three devices upload at once.
        let user = users[0]
        let limit = try bucketBytes(prefix: "spaces/\(user)/") + (12 << 20)
        let quota = try admin("quota", user, "\(limit)")
        check(quota.status == 0, "\(quota.stderr)")
        var quotaJobs: [([String], [String: String])] = []
        for i in 0..<3 {
            let env = device(s, "\(user)-extra\(i)", password: "\(user) password")
            try check(cabackup("login", "--server", balancer.url, "--user", user, env: env).status == 0)
            try writeRandom(s.file("\(user)-extra\(i)/data.bin"), megabytes: 8)
            quotaJobs.append((["snapshot", "--repo", repo(user), s.file("\(user)-extra\(i)")], env))
        }
        let quotaResults = runAtOnce(quotaJobs)
        let stored = try bucketBytes(prefix: "spaces/\(user)/")
        check(stored <= limit, "\(user)'s space holds \(stored) bytes under a quota of \(limit)")
        check(quotaResults.contains { $0?.status != 0 && $0?.stderr.contains("quota") == true })
    }
}

/// `count` trees of real files (from /usr/lib and /usr/share, in name order, dealt out in
/// turn, none larger than 4 MiB) of at least `bytesEach` bytes each, under `root`.
func realTrees(in root: String, count: Int, bytesEach: Int) throws -> [(path: String, bytes: Int)] {
    var sizes = Array(repeating: 0, count: count)
    var next = 0
    for top in ["/usr/lib", "/usr/share"] {
        guard let walk = FileManager.default.enumerator(atPath: top) else { continue }
        for case let relative as String in walk {
            if sizes.allSatisfy({ $0 >= bytesEach }) { break }
            let path = top + "/" + relative
            guard let a = try? FileManager.default.attributesOfItem(atPath: path),
                a[.type] as? FileAttributeType == .typeRegular, let size = a[.size] as? Int, size <= 4 << 20,
                access(path, R_OK) == 0
            else { continue }
            while sizes[next] >= bytesEach { next = (next + 1) % count }
            let target = "\(root)/tree\(next)\(path)"
            try FileManager.default.createDirectory(
                atPath: (target as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try FileManager.default.copyItem(atPath: path, toPath: target)
            sizes[next] += size
            next = (next + 1) % count
        }
    }
    guard sizes.allSatisfy({ $0 >= bytesEach }) else {
        throw CABackupError.invalidArgument("/usr/lib and /usr/share hold too few files for \(count) trees")
    }
    return sizes.indices.map { ("\(root)/tree\($0)", sizes[$0]) }
}
