import CABackupRemote
import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Server instances sharing one PostgreSQL and one S3 bucket behind nginx, as
/// docs/operations.md sets them up: any instance serves any request.
@Suite("several server instances behind nginx, on PostgreSQL and an S3 bucket")
struct ScaleOutTests {
    @Test(
        "two instances: four devices of two accounts back up at once while one instance is killed and restarted; all complete, check and restore; the quota holds across instances"
    )
    func twoInstances() async throws {
        let postgres = try await PostgresServer()
        let url = postgres.url
        try await offPool { try Self.twoInstances(database: url) }
        withExtendedLifetime(postgres) {}
    }

    static func twoInstances(database: String) throws {
        let store = try SeaweedFS()
        try store.createBucket("spaces")
        let s = Scratch()
        let env = store.environment.merging(["PGPASSWORD": PostgresServer.password]) { $1 }
        let shared = [
            "--storage", "s3:\(store.endpoint)/spaces", "--database", database, "--trusted-proxy", "127.0.0.1",
        ]
        let first = try TestServer(data: s.file("a"), shared, env: env)
        let second = try TestServer(data: s.file("b"), shared, env: env)
        let port = first.port
        let balancer = try Nginx(upstreams: ["127.0.0.1:\(first.port)", "127.0.0.1:\(second.port)"])
        func repo(_ user: String) -> String { balancer.url.replacingOccurrences(of: "://", with: "://\(user)@") }

        // Two accounts, two devices each, each device with a tree of its own.
        var jobs: [([String], [String: String])] = []
        var trees: [(env: [String: String], user: String, src: String)] = []
        for user in ["alice", "bob"] {
            for (i, name) in ["laptop", "phone"].enumerated() {
                let env = device(s, "\(user)-\(name)", password: "\(user) password")
                if i == 0 {
                    let reg = try cabackup(
                        "register", "--server", balancer.url, "--user", user, "--email", "\(user)@example.org", env: env
                    )
                    #expect(reg.status == 0, "\(reg.stderr)")
                    #expect(try cabackup("init", "--repo", repo(user), env: env).status == 0)
                } else {
                    #expect(try cabackup("login", "--server", balancer.url, "--user", user, env: env).status == 0)
                }
                let src = s.file("\(user)-\(name)-src")
                try writeRandom(src + "/big.bin", megabytes: 24)
                try makeDirectories(src, from: 0, count: 10)
                jobs.append((["snapshot", "--repo", repo(user), src], env))
                trees.append((env, user, src))
            }
        }

        // All at once; one instance dies mid-way and comes back on its port.
        final class Box: @unchecked Sendable {
            var results: [RunResult?] = []
        }
        let box = Box()
        let all = jobs
        let running = Thread { box.results = runAtOnce(all) }
        running.start()
        #expect(eventually(within: 60) { ((try? store.client(bucket: "spaces").list(prefix: "").count) ?? 0) > 8 })
        first.kill()
        sleep(2)
        let restarted = try TestServer(data: s.file("a"), port: port, shared, env: env)
        #expect(eventually(within: 600) { running.isFinished })
        for (i, r) in box.results.enumerated() {
            #expect(r?.status == 0, "device \(i): \(r?.stderr ?? "did not finish")")
        }

        // Every space checks; every device's tree restores; each space holds its own two.
        for user in ["alice", "bob"] {
            let env = trees.first { $0.user == user }!.env
            let check = try cabackup("check", "--repo", repo(user), "--read-data", env: env)
            #expect(check.status == 0, "\(user): \(check.stdout) \(check.stderr)")
            let list = try cabackup("snapshots", "--repo", repo(user), "--json", env: env)
            #expect(list.stdout.components(separatedBy: "\"id\"").count - 1 == 2, "\(list.stdout)")
        }
        for (i, t) in trees.enumerated() {
            let out = s.file("out\(i)")
            let r = try cabackup(
                "restore", "--repo", repo(t.user), "latest", "--path", t.src, "--target", out, env: t.env)
            #expect(r.status == 0, "\(r.stderr)")
            #expect(try sameTree(t.src, out + t.src))
        }
        // Both instances served requests.
        let upstreams = Set(balancer.accessLog.compactMap { $0.split(separator: " ").last.map(String.init) })
        #expect(upstreams.isSuperset(of: ["127.0.0.1:\(port)", "127.0.0.1:\(second.port)"]), "\(upstreams)")

        // A quota set by the operator holds across instances: three devices upload at once.
        let admin = try run(
            cabackupBinary, ["server", "admin", "quota", "bob", "60M", "--data", s.file("a")] + shared.prefix(4),
            env: env)
        #expect(admin.status == 0, "\(admin.stderr)")
        var quotaJobs: [([String], [String: String])] = []
        for i in 0..<3 {
            let env = device(s, "bob-extra\(i)", password: "bob password")
            #expect(try cabackup("login", "--server", balancer.url, "--user", "bob", env: env).status == 0)
            try writeRandom(s.file("bob-extra\(i)/data.bin"), megabytes: 8)
            quotaJobs.append((["snapshot", "--repo", repo("bob"), s.file("bob-extra\(i)")], env))
        }
        let quotaResults = runAtOnce(quotaJobs)
        let stored = try store.client(bucket: "spaces").list(prefix: "spaces/bob/").reduce(0) { $0 + $1.size }
        #expect(stored <= 60 << 20, "bob's space holds \(stored) bytes under a quota of 60 MiB")
        #expect(quotaResults.contains { $0?.status != 0 && $0?.stderr.contains("quota") == true })
        withExtendedLifetime((restarted, second)) {}
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
        #expect(jsonObject(unchanged.stdout)?["chunks_added"] as? Int == 0, "\(unchanged.stdout) \(unchanged.stderr)")
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
