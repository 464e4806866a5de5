import CABackupRemote
import Foundation
import Testing

/// The server with its spaces' files in its data directory or in an S3 bucket (SeaweedFS
/// here), and its accounts in the data directory or in PostgreSQL: the same API, the same
/// client, the same results.
@Suite("the server's state in a directory, an S3 bucket, PostgreSQL")
struct ServerS3Tests {
    enum Where: String, CaseIterable, CustomTestStringConvertible, Sendable {
        /// Everything in the data directory.
        case directory
        /// The spaces' files in a bucket.
        case bucket
        /// The spaces' files in a bucket, the accounts in PostgreSQL.
        case database
        var testDescription: String { rawValue }
    }

    @Test(
        "two accounts: snapshots, restore, forget --prune, check --read-data; each space under its own name",
        arguments: Where.allCases)
    func spaces(in place: Where) async throws {
        let postgres = place == .database ? try await PostgresServer() : nil
        let url = postgres?.url
        try await offPool { try Self.spaces(in: place, database: url) }
        withExtendedLifetime(postgres) {}
    }

    static func spaces(in place: Where, database: String?) throws {
        let store = try SeaweedFS()
        try store.createBucket("spaces")
        let s = Scratch()
        var args = place == .directory ? [] : ["--storage", "s3:\(store.endpoint)/spaces/prod"]
        if let database { args += ["--database", database] }
        let env = store.environment.merging(["PGPASSWORD": PostgresServer.password]) { $1 }
        let server = try TestServer(data: s.file("server"), args, env: env)
        let bucket = try store.client(bucket: "spaces")
        /// A space's files of one kind, wherever they are, with their sizes.
        func files(_ user: String, _ kind: String) throws -> [String: Int] {
            if place != .directory {
                let objects = try bucket.list(prefix: "prod/spaces/\(user)/\(kind)/")
                return Dictionary(uniqueKeysWithValues: objects.map { ($0.key, $0.size) })
            }
            let dir = server.data + "/spaces/\(user)/\(kind)"
            guard FileManager.default.fileExists(atPath: dir) else { return [:] }
            let paths =
                kind == "data"
                ? try spacePacks(server.data, user)
                : try FileManager.default.contentsOfDirectory(atPath: dir).map { dir + "/" + $0 }
            return Dictionary(
                uniqueKeysWithValues: try paths.map {
                    ($0, try FileManager.default.attributesOfItem(atPath: $0)[.size] as? Int ?? 0)
                })
        }
        let health = try http("GET", server.url + "/healthz")
        #expect(health.0 == 200, "\(health.1)")

        let (alice, bob) = try aliceAndBob(s, on: server)
        let src = s.file("src")
        try writeRandom(src + "/big.bin", megabytes: 20)
        try makeDirectories(src, from: 0, count: 20)
        try writeRandom(s.file("bob-src/b.bin"), megabytes: 2)

        let first = try cabackup("snapshot", "--repo", server.repo("alice"), "--json", src, env: alice)
        #expect(first.status == 0, "\(first.stderr)")
        #expect(try cabackup("snapshot", "--repo", server.repo("bob"), s.file("bob-src"), env: bob).status == 0)
        let unchanged = try cabackup("snapshot", "--repo", server.repo("alice"), "--json", src, env: alice)
        #expect(unchanged.status == 0, "\(unchanged.stderr)")
        #expect(jsonObject(unchanged.lastLine)?["chunks_added"] as? Int == 0, "\(unchanged.stdout)")

        let out = s.file("out")
        let restore = try cabackup("restore", "--repo", server.repo("alice"), "latest", "--target", out, env: alice)
        #expect(restore.status == 0, "\(restore.stderr)")
        #expect(try sameTree(src, out + src))
        let check = try cabackup("check", "--repo", server.repo("alice"), "--read-data", env: alice)
        #expect(check.status == 0, "\(check.stderr)")

        // Each account's files are under its own name; in a bucket, none on the server's disk.
        let alicePacks = try files("alice", "data").values.reduce(0, +)
        #expect(try files("alice", "data").count >= 2)
        #expect(try files("bob", "data").count >= 1)
        #expect(try files("alice", "snapshots").count == 2)
        #expect(try files("bob", "snapshots").count == 1)
        #expect(FileManager.default.fileExists(atPath: server.data + "/spaces/alice/data") == (place == .directory))
        #expect(FileManager.default.fileExists(atPath: server.data + "/accounts.sqlite") == (database == nil))

        // Deleting goes through too: forget and prune leave one snapshot (and the record of
        // the removal), still whole; the packs only the removed ones used are gone.
        try FileManager.default.removeItem(atPath: src + "/big.bin")
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), src, env: alice).status == 0)
        let prune = try cabackup(
            "forget", "--repo", server.repo("alice"), "--keep-last", "1", "--prune", env: alice)
        #expect(prune.status == 0, "\(prune.stderr)")
        #expect(try cabackup("snapshots", "--repo", server.repo("alice"), env: alice).stdout.contains("1 snapshots"))
        let left = try files("alice", "data").values.reduce(0, +)
        #expect(left < alicePacks - 15 << 20, "\(left) of \(alicePacks) bytes left")
        let after = try cabackup("check", "--repo", server.repo("alice"), "--read-data", env: alice)
        #expect(after.status == 0, "\(after.stdout) \(after.stderr)")
        let again = s.file("again")
        let restoreAgain = try cabackup(
            "restore", "--repo", server.repo("alice"), "latest", "--target", again, env: alice)
        #expect(restoreAgain.status == 0, "\(restoreAgain.stderr)")
        #expect(try sameTree(src, again + src))

        // The operator deletes bob with all his data; a new bob starts from nothing, and
        // his first snapshot stores all of its data (no index left claims it).
        let delete = try run(
            cabackupBinary, ["server", "admin", "delete", "bob", "--yes", "--data", server.data] + args, env: env)
        #expect(delete.status == 0, "\(delete.stderr)")
        #expect(try files("bob", "data").isEmpty && files("bob", "snapshots").isEmpty)
        let newBob = device(s, "new-bob", password: "new bob password")
        try signUp(server, "bob", env: newBob)
        #expect(try cabackup("snapshot", "--repo", server.repo("bob"), s.file("bob-src"), env: newBob).status == 0)
        let bobCheck = try cabackup("check", "--repo", server.repo("bob"), "--read-data", env: newBob)
        #expect(bobCheck.status == 0, "\(bobCheck.stdout) \(bobCheck.stderr)")
    }

    @Test("a bucket that does not exist stops the server at its start, with one line saying so")
    func missingBucket() throws {
        let store = try SeaweedFS()
        try store.waitUntilReady()
        let s = Scratch()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: cabackupBinary)
        p.arguments = [
            "server", "--listen", "127.0.0.1:0", "--data", s.file("server"), "--storage",
            "s3:\(store.endpoint)/no-such-bucket",
        ]
        p.environment = childEnvironment(store.environment)
        let errors = Pipe()
        p.standardOutput = FileHandle.nullDevice
        p.standardError = errors
        try p.run()
        let exited = eventually(within: 60) { !p.isRunning }
        if !exited { p.terminate() }
        p.waitUntilExit()
        let r = (
            status: p.terminationStatus,
            stderr: String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        )
        #expect(exited, "the server kept running on a bucket that does not exist")
        #expect(r.status != 0, "\(r.stderr)")
        #expect(r.stderr.contains("'no-such-bucket' does not exist"), "\(r.stderr)")
        #expect(r.stderr.split(separator: "\n").count == 1, "\(r.stderr)")
    }
}

/// Runs blocking work (child processes) on a thread of its own, off the cooperative pool,
/// whose two threads would otherwise wait on it.
func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { c in Thread { c.resume(with: Result { try body() }) }.start() }
}
