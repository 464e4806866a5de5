import Foundation
import Testing

/// The commands around snapshot and restore that restic users reach for (issue 24).
@Suite("the toolbox: stats, tag, dump, find, rewrite, copy")
struct ToolboxTests {
    /// `stats --json` of `repo` with `args`.
    private func stats(_ repo: String, _ args: String...) throws -> [String: Any] {
        let r = try run(cabackupBinary, ["stats", "--repo", repo, "--json"] + args)
        #expect(r.status == 0, "\(r.stderr)")
        return jsonObject(r.stdout) ?? [:]
    }

    @Test("stats: restore size counts every snapshot's files, raw data counts each unique blob once")
    func statsModes() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src + "/sub", withIntermediateDirectories: true)
        // 3 MiB of random bytes twice (one copy deduplicates), a hard link, a small text.
        var random = [UInt8](repeating: 0, count: 3 << 20)
        for i in random.indices { random[i] = UInt8.random(in: 0...255) }
        try Data(random).write(to: URL(fileURLWithPath: src + "/a.bin"))
        try Data(random).write(to: URL(fileURLWithPath: src + "/sub/copy.bin"))
        try FileManager.default.linkItem(atPath: src + "/a.bin", toPath: src + "/sub/link.bin")
        try Data("hello\n".utf8).write(to: URL(fileURLWithPath: src + "/hello.txt"))
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, "--force", src).status == 0)

        let one = try stats(repo, "latest")
        #expect(one["snapshots_count"] as? Int == 1)
        #expect(one["total_file_count"] as? Int == 4)
        // The hard link's bytes once: a.bin, copy.bin and hello.txt.
        #expect(one["total_size"] as? Int == 2 * (3 << 20) + 6)
        let all = try stats(repo)
        #expect(all["snapshots_count"] as? Int == 2 && all["total_size"] as? Int == 2 * (2 * (3 << 20) + 6))

        // raw-data: the random bytes once, the text, and the trees; two snapshots of the
        // same tree reference the same blobs as one. Only the trees of the source's
        // ancestors may differ: other tests create and remove entries in the temporary
        // directory between the two snapshots, which changes its times.
        let raw = try stats(repo, "--mode", "raw-data")
        let rawOne = try stats(repo, "--mode", "raw-data", "latest")
        let uncompressed = try #require(raw["total_uncompressed_size"] as? Int)
        let uncompressedOne = try #require(rawOne["total_uncompressed_size"] as? Int)
        let blobs = try #require(raw["total_blob_count"] as? Int)
        let blobsOne = try #require(rawOne["total_blob_count"] as? Int)
        #expect(uncompressed > (3 << 20) + 6 && uncompressed < (3 << 20) + 6 + 64 * 1024, "\(raw)")
        let ancestors = src.split(separator: "/").count
        #expect(blobs >= blobsOne && blobs <= blobsOne + ancestors, "\(raw) \(rawOne)")
        #expect(uncompressed >= uncompressedOne && uncompressed < uncompressedOne + 4096, "\(raw) \(rawOne)")
        // Stored bytes are what the packs hold, less their headers.
        let stored = try #require(raw["total_size"] as? Int)
        let packs = try run("/usr/bin/du", ["-sb", "--apparent-size", repo + "/data"]).stdout
        let packBytes = Int(packs.split(separator: "\t").first ?? "") ?? 0
        #expect(stored > 3 << 20 && stored <= packBytes, "\(stored) of \(packBytes)")
        #expect((raw["space_saving"] as? Double ?? 0) > 0.7)

        // Bad input: one line, usage exit code.
        let bad = try cabackup("stats", "--repo", repo, "--mode", "everything")
        #expect(bad.status == 64 && bad.stderr.contains("restore-size or raw-data"))
        let missing = try cabackup("stats", "--repo", repo, "deadbeef00")
        #expect(missing.status != 0 && missing.stderr.contains("deadbeef00"))
        // Text mode names the figures.
        let text = try cabackup("stats", "--repo", repo, "--mode", "raw-data")
        #expect(text.stdout.contains("Total Blob Count:") && text.stdout.contains("Compression Ratio:"))
    }

    @Test("tag: add, remove and set rewrite the record under a new id; other devices see no rollback")
    func tags() throws {
        let s = Scratch()
        try Data("x".utf8).write(to: URL(fileURLWithPath: s.file("f")))
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, "--tag", "first", s.file("f")).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, s.file("f")).status == 0)
        // A second device, with its own record of what it saw.
        let laptop = ["XDG_CONFIG_HOME": s.file("laptop/config"), "XDG_CACHE_HOME": s.file("laptop/cache")]
        #expect(try cabackup("snapshots", "--repo", repo, env: laptop).status == 0)
        func tagsByTime() throws -> [[String]] {
            let out = try cabackup("snapshots", "--repo", repo, "--json").stdout
            let list = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [[String: Any]] ?? []
            return list.map { $0["tags"] as? [String] ?? [] }
        }
        let added = try cabackup("tag", "--repo", repo, "--add", "keep,daily", "latest")
        #expect(added.status == 0 && added.stdout.contains("1 snapshots changed"), "\(added.stdout)\(added.stderr)")
        #expect(try tagsByTime() == [["first"], ["keep", "daily"]])
        #expect(try cabackup("tag", "--repo", repo, "--tag", "daily", "--remove", "keep").status == 0)
        #expect(try tagsByTime() == [["first"], ["daily"]])
        #expect(try cabackup("tag", "--repo", repo, "--tag", "first", "--set", "archive").status == 0)
        #expect(try tagsByTime() == [["archive"], ["daily"]])
        // Nothing to change: no new record.
        let same = try cabackup("tag", "--repo", repo, "--add", "daily", "latest")
        #expect(same.stdout.contains("no snapshot changed"))
        // The rewritten records are intact.
        let records = try cabackup("snapshots", "--repo", repo, "--json").stdout
        #expect(try cabackup("check", "--repo", repo).status == 0)
        let quiet = try cabackup("snapshots", "--repo", repo, env: laptop)
        #expect(quiet.status == 0 && !quiet.stderr.contains("is gone"), "\(quiet.stderr)")
        // The same removal without the forget record is noticed (the check is live).
        let newest = try #require(
            (try JSONSerialization.jsonObject(with: Data(records.utf8)) as? [[String: Any]])?.last?["id"] as? String)
        #expect(try cabackup("snapshots", "--repo", repo, env: laptop).status == 0)
        try FileManager.default.removeItem(atPath: repo + "/snapshots/" + newest)
        let noticed = try cabackup("snapshots", "--repo", repo, env: laptop)
        #expect(noticed.stderr.contains("is gone"), "\(noticed.stderr)")
        // Bad input changes nothing.
        #expect(try cabackup("tag", "--repo", repo, "latest").status == 64)
        #expect(try cabackup("tag", "--repo", repo, "--add", "x").status == 64)
        #expect(try cabackup("tag", "--repo", repo, "--set", "a", "--add", "b", "latest").status == 64)
    }

    @Test("dump: a file's bytes to stdout; a directory as a tar stream that GNU tar unpacks to the same tree")
    func dump() throws {
        let s = Scratch()
        let src = s.file("src")
        #expect(try python(treetool, "make", src).status == 0)
        let xattr = try python(
            "-c", "import os,sys; os.setxattr(sys.argv[1], 'user.note', b'kept in the tar')", src + "/docs/hello.txt")
        #expect(xattr.status == 0)
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        // A file: its bytes.
        let big = try run(
            "/bin/sh",
            [
                "-c", "\"$0\" dump --repo \"$1\" latest \"$2\" > \"$3\"", cabackupBinary, repo,
                src + "/docs/nested/random.bin", s.file("random.out"),
            ])
        #expect(big.status == 0, "\(big.stderr)")
        #expect(try run("/usr/bin/cmp", [src + "/docs/nested/random.bin", s.file("random.out")]).status == 0)
        // A directory: a tar stream; GNU tar unpacks it; the independent reader compares.
        let tar = try run(
            "/bin/sh",
            [
                "-c", "\"$0\" dump --repo \"$1\" latest \"$2\" > \"$3\"", cabackupBinary, repo, src,
                s.file("src.tar"),
            ])
        #expect(tar.status == 0, "\(tar.stderr)")
        try FileManager.default.createDirectory(atPath: s.file("x"), withIntermediateDirectories: true)
        let untar = try run(
            "/usr/bin/tar", ["-x", "--xattrs", "--xattrs-include=*", "-f", s.file("src.tar"), "-C", s.file("x")])
        #expect(untar.status == 0, "\(untar.stderr)")
        let cmp = try python(treetool, "compare", src, s.file("x/src"))
        #expect(cmp.status == 0 && cmp.stdout.contains(" 0 differences"), "\(cmp.stdout)")
        // A path the snapshot lacks: one line, nothing written.
        let missing = try run(
            "/bin/sh",
            [
                "-c", "\"$0\" dump --repo \"$1\" latest /no/such > \"$2\"", cabackupBinary, repo,
                s.file("none"),
            ])
        #expect(missing.status == 1 && missing.stderr.contains("/no/such is not in the snapshot"), "\(missing.stderr)")
        #expect((try? FileManager.default.attributesOfItem(atPath: s.file("none"))[.size] as? Int) == 0)
        #expect(try cabackup("dump", "--repo", repo, "--archive", "rar", "latest", src).status == 64)
    }

    @Test("find: which snapshots hold a pattern; --history lists every version from the cache's index, reading no pack")
    func find() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src + "/docs", withIntermediateDirectories: true)
        try Data("a".utf8).write(to: URL(fileURLWithPath: src + "/docs/a-unmistakable-name.txt"))
        try Data("jpg".utf8).write(to: URL(fileURLWithPath: src + "/docs/b.jpg"))
        let notes = src + "/notes.txt"
        let repo = s.file("repo")
        let env = ["XDG_CACHE_HOME": s.file("cache")]
        #expect(try cabackup("init", "--repo", repo, env: env).status == 0)
        // Four snapshots: notes.txt in versions 1, 2, 2 (unchanged), 3.
        for version in ["one", "two", "two", "three"] {
            if (try? String(contentsOfFile: notes, encoding: .utf8)) != version {
                try Data(version.utf8).write(to: URL(fileURLWithPath: notes))
            }
            #expect(try cabackup("snapshot", "--repo", repo, src, env: env).status == 0)
        }
        func lines(_ r: RunResult) -> [[String: Any]] {
            r.stdout.split(separator: "\n").compactMap { jsonObject(String($0)) }
        }
        let txt = try cabackup("find", "--repo", repo, "--json", "*.txt", env: env)
        #expect(txt.status == 0, "\(txt.stderr)")
        let matches = lines(txt)
        #expect(matches.count == 8 && matches.allSatisfy { $0["message_type"] as? String == "match" })
        #expect(Set(matches.compactMap { $0["path"] as? String }) == [src + "/docs/a-unmistakable-name.txt", notes])
        // A directory that matches is listed, not what is below it.
        let dirs = lines(try cabackup("find", "--repo", repo, "--json", "-s", "latest", "docs", env: env))
        #expect(dirs.count == 1 && dirs.first?["type"] as? String == "dir")
        // --history: every version of one file, oldest first; the content id tells them apart.
        func historyReadingPacks() throws -> (entries: [[String: Any]], packOpens: Int) {
            let trace = s.file("trace")
            let r = try run(
                "/usr/bin/strace",
                ["-f", "-e", "trace=open,openat", "-o", trace, cabackupBinary, "find", "--repo", repo, "--json"]
                    + ["--history", notes],
                env: env)
            #expect(r.status == 0, "\(r.stderr)")
            // Packs are data/XY/<64 hex>; opening data/XY alone is a listing.
            let opens = try String(contentsOfFile: trace, encoding: .utf8).split(separator: "\n")
                .compactMap { $0.components(separatedBy: repo + "/data/").dropFirst().first }
                .filter { $0.prefix { $0 != "\"" }.count == 67 }.count
            return (lines(r), opens)
        }
        let (versions, opens) = try historyReadingPacks()
        #expect(versions.count == 4)
        let contents = versions.compactMap { $0["content"] as? String }
        #expect(contents.count == 4 && contents[1] == contents[2] && Set(contents).count == 3, "\(contents)")
        #expect(versions.compactMap { $0["size"] as? Int } == [3, 3, 3, 5])
        #expect(opens == 0, "find --history opened \(opens) packs with the index up to date")
        // A new snapshot is indexed on the next query (its trees read once).
        try Data("four!!".utf8).write(to: URL(fileURLWithPath: notes))
        #expect(try cabackup("snapshot", "--repo", repo, src, env: env).status == 0)
        let (more, indexingOpens) = try historyReadingPacks()
        #expect(more.count == 5 && more.last?["size"] as? Int == 6)
        #expect(indexingOpens > 0, "the count of pack reads sees the new snapshot's trees read")
        let text = try cabackup("find", "--repo", repo, "--history", notes, env: env)
        #expect(text.stdout.split(separator: "\n").filter { $0.contains(" * ") }.count == 3, "\(text.stdout)")
        // The names are in the cache, never in the (encrypted) repository's files.
        let inRepo = try run("/usr/bin/grep", ["-r", "-l", "unmistakable", repo])
        #expect(inRepo.status == 1, "a file name appears in \(inRepo.stdout)")
        let inCache = try run("/usr/bin/grep", ["-r", "-l", "unmistakable", s.file("cache")])
        #expect(inCache.status == 0 && inCache.stdout.contains("paths.sqlite"))
        let none = try cabackup("find", "--repo", repo, "*.doc", env: env)
        #expect(none.status == 0 && none.stdout.contains("no entry matches"))
        #expect(try cabackup("find", "--repo", repo, "[", env: env).status != 0)
    }

    @Test("rewrite --exclude --forget, then prune: no byte of the removed file is left in the repository")
    func rewriteAndPrune() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src + "/keys", withIntermediateDirectories: true)
        var secret = [UInt8](repeating: 0, count: 200_000)
        for i in secret.indices { secret[i] = UInt8.random(in: 0...255) }
        try Data(secret).write(to: URL(fileURLWithPath: src + "/keys/leaked.pem"))
        #expect(try python(treetool, "make", src + "/other").status == 0)
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo, "--no-encryption").status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        try Data("later\n".utf8).write(to: URL(fileURLWithPath: src + "/new.txt"))
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        // Whether 64 bytes from the middle of the secret appear in any file of the repository.
        func secretStored() throws -> Bool {
            let probe = Data(secret[100_000..<100_064]).base64EncodedString()
            let r = try python(
                "-c",
                "import os,sys,base64; p=base64.b64decode(sys.argv[2]); print(any(p in open(os.path.join(d,f),'rb').read() for d,_,fs in os.walk(sys.argv[1]) for f in fs))",
                repo, probe)
            return r.stdout.hasPrefix("True")
        }
        #expect(try secretStored(), "the probe must find the secret before the rewrite")
        let dry = try cabackup("rewrite", "--repo", repo, "--path", src, "--exclude", "*.pem", "--dry-run")
        #expect(dry.status == 0 && dry.stdout.contains("would remove " + src + "/keys/leaked.pem"), "\(dry.stdout)")
        #expect(try cabackup("snapshots", "--repo", repo, "--json").stdout.components(separatedBy: "\"id\"").count == 3)
        let r = try cabackup("rewrite", "--repo", repo, "--path", src, "--exclude", "*.pem", "--forget")
        #expect(r.status == 0 && r.stdout.contains("2 snapshots rewritten"), "\(r.stdout)\(r.stderr)")
        // The default prune leaves a mostly used pack alone, with the secret in it;
        // --max-unused 0% repacks it.
        #expect(try cabackup("prune", "--repo", repo).status == 0)
        #expect(try secretStored(), "the secret shares a mostly used pack: only a full repack removes it")
        #expect(try cabackup("prune", "--repo", repo, "--max-unused", "0%").status == 0)
        #expect(try !secretStored(), "a byte run of the removed file is still in the repository")
        #expect(try cabackup("prune", "--repo", repo, "--max-unused", "half").status == 64)
        // The rest is intact, in both rewritten snapshots.
        #expect(try cabackup("check", "--repo", repo, "--read-data").status == 0)
        let ls = try cabackup("ls", "--repo", repo, "latest")
        #expect(!ls.stdout.contains("leaked.pem") && ls.stdout.contains(src + "/keys") && ls.stdout.contains("new.txt"))
        let restore = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"))
        #expect(restore.status == 0)
        let cmp = try python(treetool, "compare", src + "/other", s.file("out") + src + "/other")
        #expect(cmp.status == 0, "\(cmp.stdout)")
        let snaps = try cabackup("snapshots", "--repo", repo)
        #expect(snaps.stdout.contains("2 snapshots"), "\(snaps.stdout)")
        // Nothing matches: nothing is written.
        let none = try cabackup("rewrite", "--repo", repo, "--path", src, "--exclude", "*.pem")
        #expect(none.stdout.contains("no snapshot holds a matching path"))
        #expect(try cabackup("rewrite", "--repo", repo, "latest").status == 64)
    }

    @Test("copy: a second repository restores the same tree; copying again reads only what is new")
    func copy() throws {
        let s = Scratch()
        let src = s.file("src")
        #expect(try python(treetool, "make", src).status == 0)
        let a = s.file("a")
        let b = s.file("b")
        let env = ["CABACKUP_FROM_PASSWORD": testPassword, "XDG_CACHE_HOME": s.file("cache")]
        #expect(try cabackup("init", "--repo", a, env: env).status == 0)
        #expect(try cabackup("init", "--repo", b, env: env).status == 0)
        #expect(try cabackup("snapshot", "--repo", a, "--tag", "laptop", src, env: env).status == 0)
        /// Copies a → b; returns the blobs read from a.
        func copyAll() throws -> (copied: Int, read: Int) {
            let r = try cabackup("copy", "--repo", b, "--from-repo", a, env: env)
            #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
            let words = r.stdout.split(separator: " ")
            let copied = words.firstIndex(of: "copied").flatMap { Int(words[$0 + 1]) } ?? -1
            let read = words.firstIndex(of: "read").flatMap { Int(words[$0 + 1]) } ?? -1
            return (copied, read)
        }
        let first = try copyAll()
        #expect(first.copied == 1 && first.read > 20, "\(first)")
        let restore = try cabackup("restore", "--repo", b, "latest", "--target", s.file("out"), env: env)
        #expect(restore.status == 0, "\(restore.stderr)")
        let cmp = try python(treetool, "compare", src, s.file("out") + src)
        #expect(cmp.status == 0 && cmp.stdout.contains(" 0 differences"), "\(cmp.stdout)")
        #expect(try cabackup("check", "--repo", b, "--read-data", env: env).status == 0)
        let listed = try cabackup("snapshots", "--repo", b, "--json", env: env).stdout
        #expect(listed.contains("\"laptop\""), "the copy keeps the tags")
        // A new snapshot sharing almost everything: the copy reads only what is new.
        try Data("one more file\n".utf8).write(to: URL(fileURLWithPath: src + "/docs/new.txt"))
        #expect(try cabackup("snapshot", "--repo", a, src, env: env).status == 0)
        let second = try copyAll()
        #expect(second.copied == 1 && second.read <= 8, "\(second) after \(first)")
        let again = try copyAll()
        #expect(again.copied == 0 && again.read == 0, "\(again)")
        // Chunker parameters copied: the destination deduplicates what it already has.
        let c = s.file("c")
        #expect(try cabackup("init", "--repo", c, "--copy-chunker-params", "--from-repo", a, env: env).status == 0)
        let r = try cabackup("copy", "--repo", c, "--from-repo", a, "latest", env: env)
        #expect(r.status == 0, "\(r.stderr)")
        let snap = try cabackup("snapshot", "--repo", c, "--json", src, "--force", env: env)
        #expect(jsonObject(snap.lastLine)?["chunks_added"] as? Int == 0, "\(snap.lastLine)")
        let bad = try cabackup("copy", "--repo", b, "--from-repo", s.file("nothing"), env: env)
        #expect(bad.status == 10, "\(bad.stderr)")
    }
}
