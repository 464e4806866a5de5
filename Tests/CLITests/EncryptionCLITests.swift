import CABackup
import Foundation
import Testing

@Suite("cabackup CLI: passwords and key slots", .serialized)
struct EncryptionCLITests {
    func source(_ s: Scratch) throws -> String {
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src, withIntermediateDirectories: true)
        try Data("private letter\n".utf8).write(to: URL(fileURLWithPath: src + "/letter.txt"))
        return src
    }

    @Test("wrong or missing password: exit 12, one line, nothing changed; --password-file works")
    func passwords() throws {
        let s = Scratch()
        let src = try source(s)
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        let before = try FileManager.default.subpathsOfDirectory(atPath: repo).filter { !$0.hasPrefix("index") }
            .sorted()

        let wrong = try cabackup("snapshot", "--repo", repo, src, env: ["CABACKUP_PASSWORD": "nope"])
        #expect(wrong.status == 12)
        #expect(wrong.stderr.split(separator: "\n").count == 1)
        #expect(wrong.stderr.contains("wrong password"))
        // No password at all and no terminal (a new session has none): exit 12, no waiting.
        let missing = try run(
            "/usr/bin/setsid", ["-w", cabackupBinary, "snapshots", "--repo", repo],
            env: ["CABACKUP_PASSWORD": ""])
        #expect(missing.status == 12)
        #expect(missing.stderr.contains("CABACKUP_PASSWORD"))
        let after = try FileManager.default.subpathsOfDirectory(atPath: repo).filter { !$0.hasPrefix("index") }.sorted()
        #expect(after == before)

        try Data((testPassword + "\n").utf8).write(to: URL(fileURLWithPath: s.file("pw")))
        let viaFile = try cabackup(
            "snapshots", "--repo", repo, "--password-file", s.file("pw"), env: ["CABACKUP_PASSWORD": ""])
        #expect(viaFile.status == 0, "\(viaFile.stderr)")
        #expect(viaFile.stdout.contains("1 snapshots"))
    }

    @Test("key add, list, passwd and remove through the CLI")
    func keyCommands() throws {
        let s = Scratch()
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        let add = try cabackup("key", "add", "--repo", repo, env: ["CABACKUP_NEW_PASSWORD": "laptop password"])
        #expect(add.status == 0, "\(add.stderr)")
        let list = try cabackup("key", "list", "--repo", repo)
        let rows = list.stdout.split(separator: "\n").dropFirst()
        #expect(rows.count == 2)
        #expect(rows.filter { $0.hasPrefix("*") }.count == 1)
        let other = try #require(rows.first { !$0.hasPrefix("*") }).split(separator: " ")[0]
        // The current key cannot be removed; another one can.
        let current = try #require(rows.first { $0.hasPrefix("*") }).split(separator: " ")[1]
        #expect(try cabackup("key", "remove", "--repo", repo, String(current)).status == 1)
        #expect(try cabackup("key", "remove", "--repo", repo, String(other)).status == 0)
        #expect(try cabackup("snapshots", "--repo", repo, env: ["CABACKUP_PASSWORD": "laptop password"]).status == 12)
        let passwd = try cabackup("key", "passwd", "--repo", repo, env: ["CABACKUP_NEW_PASSWORD": "new one, longer"])
        #expect(passwd.status == 0, "\(passwd.stderr)")
        #expect(try cabackup("snapshots", "--repo", repo).status == 12)
        #expect(try cabackup("snapshots", "--repo", repo, env: ["CABACKUP_PASSWORD": "new one, longer"]).status == 0)
    }

    @Test("init --copy-chunker-params --from-repo gives the same chunker; --no-encryption stores in the clear")
    func copyChunkerParams() throws {
        let s = Scratch()
        let src = try source(s)
        #expect(try cabackup("init", "--repo", s.file("a")).status == 0)
        try Data("other password\n".utf8).write(to: URL(fileURLWithPath: s.file("pw-a")))
        // B has its own password; A's comes from --from-password-file... which is wrong here.
        let wrongFrom = try cabackup(
            "init", "--repo", s.file("b"), "--copy-chunker-params", "--from-repo", s.file("a"),
            "--from-password-file", s.file("pw-a"))
        #expect(wrongFrom.status == 12)
        #expect(!FileManager.default.fileExists(atPath: s.file("b")))
        // Default: A is opened with B's password.
        #expect(
            try cabackup("init", "--repo", s.file("b"), "--copy-chunker-params", "--from-repo", s.file("a")).status
                == 0)
        let a = try Repository.open(path: s.file("a"), password: testPassword)
        let b = try Repository.open(path: s.file("b"), password: testPassword)
        #expect(a.config.chunker == b.config.chunker)
        #expect(a.config.id != b.config.id)
        #expect(try cabackup("init", "--repo", s.file("c"), "--copy-chunker-params").status == 64)

        let plain = s.file("plain")
        let r = try cabackup("init", "--repo", plain, "--no-encryption")
        #expect(r.status == 0 && r.stdout.contains("unencrypted"))
        #expect(try cabackup("snapshot", "--repo", plain, src, env: ["CABACKUP_PASSWORD": ""]).status == 0)
        let names = try FileManager.default.subpathsOfDirectory(atPath: plain)
        let found = names.contains { name in
            let data = try? Data(contentsOf: URL(fileURLWithPath: plain + "/" + name))
            return data?.range(of: Data("private letter".utf8)) != nil
        }
        #expect(found)
    }
}
