import Foundation
import Testing

/// Creates `files` below `root` (each holding its own relative path as bytes).
func makeFiles(_ root: String, _ files: [String]) throws {
    for f in files {
        let path = root + "/" + f
        try FileManager.default.createDirectory(
            atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: path, contents: Data(f.utf8))
    }
}

/// The paths of every entry below `root`, relative to it.
func entries(_ root: String) -> Set<String> {
    Set(FileManager.default.subpaths(atPath: root) ?? [])
}

/// `treetool.py describe`: everything compare looks at, of `root` and below.
private func describe(_ root: String) throws -> String {
    let r = try python(treetool, "describe", root)
    #expect(r.status == 0, "\(r.stdout)")
    return r.stdout
}

/// The JSON objects of `--json` output, one per line; a line that is not an object is an error.
func jsonLines(_ out: String) -> [[String: Any]] {
    out.split(separator: "\n").map { line in
        let object = jsonObject(String(line))
        #expect(object != nil, "not a JSON object: \(line)")
        return object ?? [:]
    }
}

@Suite("restore --include/--exclude, --verify, --delete, --dry-run, --json")
struct RestoreOptionsTests {
    static let files = [
        "docs/a.txt", "docs/b.md", "docs/deep/c.txt", "keep/x.bin", "other/y.txt", "Photos/IMG.JPG",
        "Photos/img.png", "a[1].txt", "a1.txt",
    ]

    /// A repository with one snapshot of `src` holding ``files``.
    private func fixture() throws -> (Scratch, String, String) {
        let s = Scratch()
        let src = s.file("src")
        try makeFiles(src, Self.files)
        #expect(try cabackup("init", "--repo", s.file("repo")).status == 0)
        let snap = try cabackup("snapshot", "--repo", s.file("repo"), src)
        #expect(snap.status == 0, "\(snap.stderr)")
        return (s, src, s.file("repo"))
    }

    /// Restores with `args` into a fresh target; the files restored below the source's path.
    private func restored(
        _ s: Scratch, _ repo: String, _ src: String, _ name: String, _ args: String...
    ) throws -> Set<String> {
        let r = try run(cabackupBinary, ["restore", "--repo", repo, "latest", "--target", s.file(name)] + args)
        #expect(r.status == 0, "\(args): \(r.stderr)")
        return entries(s.file(name) + src)
    }

    @Test("--include takes restic's patterns: matches, their parents, everything below; literal paths as before")
    func includePatterns() throws {
        let (s, src, repo) = try fixture()
        // A pattern selects at any depth; only the directories above a match are created.
        #expect(
            try restored(s, repo, src, "txt", "--include", "*.txt")
                == [
                    "docs", "docs/a.txt", "docs/deep", "docs/deep/c.txt", "other", "other/y.txt", "a1.txt", "a[1].txt",
                ])
        // A directory pattern brings everything below it.
        #expect(
            try restored(s, repo, src, "deep", "--include", "docs/deep") == ["docs", "docs/deep", "docs/deep/c.txt"])
        // An absolute path, as before: that entry and everything below it.
        #expect(
            try restored(s, repo, src, "abs", "--include", src + "/docs")
                == ["docs", "docs/a.txt", "docs/b.md", "docs/deep", "docs/deep/c.txt"])
        // An absolute path is also taken as written: '[1]' is not a character class here.
        #expect(try restored(s, repo, src, "bracket", "--include", src + "/a[1].txt").contains("a[1].txt"))
        // --iinclude ignores case; patterns from a file (comments and blank lines skipped).
        #expect(try restored(s, repo, src, "icase", "--iinclude", "*.jpg") == ["Photos", "Photos/IMG.JPG"])
        try Data("# pictures\n\n  Photos/*.png  \n".utf8).write(to: URL(fileURLWithPath: s.file("patterns")))
        #expect(
            try restored(s, repo, src, "file", "--include-file", s.file("patterns")) == ["Photos", "Photos/img.png"])
        // An absolute path without wildcards that the snapshot lacks is a typo: exit 1, nothing created.
        let missing = try cabackup(
            "restore", "--repo", repo, "latest", "--target", s.file("m"), "--include", src + "/nope")
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("is not in the snapshot"), "\(missing.stderr)")
        #expect(!FileManager.default.fileExists(atPath: s.file("m")))
    }

    @Test("--exclude leaves out matches and everything below; combined with --include; bad patterns change nothing")
    func excludePatterns() throws {
        let (s, src, repo) = try fixture()
        #expect(
            try restored(s, repo, src, "ex", "--exclude", "*.txt", "--exclude", src + "/keep", "--iexclude", "*.JPG")
                == ["docs", "docs/b.md", "docs/deep", "Photos", "Photos/img.png", "other"])
        try Data("*.md\n".utf8).write(to: URL(fileURLWithPath: s.file("exclude")))
        #expect(
            try restored(s, repo, src, "both", "--include", src + "/docs", "--exclude-file", s.file("exclude"))
                == ["docs", "docs/a.txt", "docs/deep", "docs/deep/c.txt"])
        for args in [["--include", "docs/[a-"], ["--exclude", "!"], ["--iinclude", "x\\"]] {
            let bad = try run(
                cabackupBinary, ["restore", "--repo", repo, "latest", "--target", s.file("bad")] + args)
            #expect(bad.status == 64, "\(args): \(bad.stderr)")
            #expect(bad.stderr.hasPrefix("Error: ") && bad.stderr.contains(args[0]), "\(bad.stderr)")
            #expect(!FileManager.default.fileExists(atPath: s.file("bad")))
        }
        let noFile = try cabackup(
            "restore", "--repo", repo, "latest", "--target", s.file("bad"), "--exclude-file", s.file("none"))
        #expect(noFile.status == 64 && noFile.stderr.contains("cannot read"), "\(noFile.stderr)")
        #expect(!FileManager.default.fileExists(atPath: s.file("bad")))
    }

    @Test("excluded files are not read: their pack may be gone")
    func excludedPacksUnread() throws {
        let (s, src, repo) = try fixture()
        let dataPacks = """
            import sqlite3, sys
            db = sqlite3.connect(sys.argv[1])
            for (h,) in db.execute("select distinct lower(hex(p.id)) from packs p join blobs b on b.pack = p.n where b.type = 0"):
                print(h)
            """
        func packs() throws -> Set<String> {
            let r = try run("/usr/bin/env", ["python3", "-c", dataPacks, repo + "/index/index.sqlite"])
            #expect(r.status == 0, "\(r.stderr)")
            return Set(r.stdout.split(separator: "\n").map(String.init))
        }
        let before = try packs()
        var big = [UInt8](repeating: 0, count: 1 << 20)
        for i in big.indices { big[i] = UInt8(truncatingIfNeeded: i &* 2_654_435_761 >> 13) }
        try Data(big).write(to: URL(fileURLWithPath: src + "/big.bin"))
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        let added = try packs().subtracting(before)
        #expect(added.count == 1, "\(added)")
        for pack in added { try FileManager.default.removeItem(atPath: "\(repo)/data/\(pack.prefix(2))/\(pack)") }
        #expect(try restored(s, repo, src, "out", "--exclude", "big.bin").contains("docs/a.txt"))
        let all = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("all"))
        #expect(all.status == 1)
        #expect(all.stderr.contains("big.bin"), "\(all.stderr)")
    }

    @Test(
        "--verify reads the restored files back: passes normally, reports a file altered after writing")
    func verifyAlteredAfterWriting() throws {
        // Needs the debug build's hook: CI runs it in the debug pass and leaves it out of
        // the release pass by name (.ci/run).
        #expect(binaryHasTestHooks, "this test needs the debug build's CABACKUP_TEST_ALTER_BEFORE_VERIFY")
        let (s, src, repo) = try fixture()
        let ok = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("ok"), "--verify")
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("verified \(Self.files.count) files: all match the snapshot"), "\(ok.stdout)")
        let alter = ["CABACKUP_TEST_ALTER_BEFORE_VERIFY": "b.md"]
        let bad = try cabackup(
            "restore", "--repo", repo, "latest", "--target", s.file("bad"), "--verify", env: alter)
        #expect(bad.status == 1)
        #expect(
            bad.stderr.contains("verify failed: \(src)/docs/b.md: differs from the snapshot in bytes 0..<9"),
            "\(bad.stderr)")
        #expect(bad.stderr.contains("1 restored files differ from the snapshot"))
        #expect(!bad.stderr.contains("a.txt"))
        // The same alteration without --verify goes unnoticed: the failure above is verify's.
        let unverified = try cabackup(
            "restore", "--repo", repo, "latest", "--target", s.file("unverified"), env: alter)
        #expect(unverified.status == 0, "\(unverified.stderr)")
        // --json: an error line during verify, and the summary counts it.
        let json = try cabackup(
            "restore", "--repo", repo, "latest", "--target", s.file("json"), "--verify", "--json", env: alter)
        #expect(json.status == 1)
        let lines = jsonLines(json.stdout)
        let errors = lines.filter { $0["message_type"] as? String == "error" }
        #expect(errors.count == 1)
        #expect(errors.first?["during"] as? String == "verify")
        #expect(errors.first?["item"] as? String == src + "/docs/b.md")
        #expect((errors.first?["error"] as? [String: Any])?["message"] is String)
        #expect(lines.last?["files_verify_failed"] as? Int == 1, "\(json.stdout)")
        #expect(lines.last?["files_verified"] as? Int == Self.files.count - 1)
        #expect(
            try cabackup("restore", "--repo", repo, "latest", "--target", s.file("x"), "--verify", "--dry-run").status
                == 64)
    }

    @Test("--delete makes the target equal to the snapshot, within the selection, never following symlinks")
    func delete() throws {
        let (s, src, repo) = try fixture()
        let out = s.file("out")
        #expect(try cabackup("restore", "--repo", repo, "latest", "--target", out).status == 0)
        // Outside the target, reachable through symlinks in it: must survive.
        try makeFiles(s.file("victim"), ["precious.txt", "sub/precious.md"])
        try makeFiles(out + src, ["extra.txt", "docs/extra-dir/f.txt", "docs/deep/extra.md"])
        try makeFiles(out, ["top-level.txt"])
        try FileManager.default.createSymbolicLink(
            atPath: out + src + "/link-out", withDestinationPath: s.file("victim"))
        try FileManager.default.createSymbolicLink(
            atPath: out + src + "/docs/b.md.link", withDestinationPath: s.file("victim/sub"))
        // Within --include only: extra entries elsewhere stay.
        let inside = try cabackup(
            "restore", "--repo", repo, "latest", "--target", out, "--delete", "--include", src + "/docs/deep")
        #expect(inside.status == 0, "\(inside.stderr)")
        #expect(inside.stdout.contains("deleted 1 entries not in the snapshot"), "\(inside.stdout)")
        #expect(!FileManager.default.fileExists(atPath: out + src + "/docs/deep/extra.md"))
        #expect(FileManager.default.fileExists(atPath: out + src + "/extra.txt"))
        #expect(FileManager.default.fileExists(atPath: out + src + "/docs/extra-dir/f.txt"))
        // A directory where the snapshot has a file is replaced too.
        try FileManager.default.removeItem(atPath: out + src + "/a1.txt")
        try makeFiles(out + src, ["a1.txt/inside"])
        // Everything: the target becomes the snapshot (a copy of src).
        let all = try cabackup("restore", "--repo", repo, "latest", "--target", out, "--delete", "-v")
        #expect(all.status == 0, "\(all.stderr)")
        for gone in [
            "\(src)/extra.txt", "\(src)/docs/extra-dir", "\(src)/link-out", "\(src)/docs/b.md.link", "/top-level.txt",
        ] {
            #expect(all.stdout.contains("deleted \(gone)\n"), "\(gone): \(all.stdout)")
        }
        let cmp = try python(treetool, "compare", src, out + src)
        #expect(cmp.status == 0, "\(cmp.stdout)")
        #expect(entries(s.file("victim")) == ["precious.txt", "sub", "sub/precious.md"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: out) == [String(src.split(separator: "/")[0])])
        // An --exclude'd name is never deleted.
        try makeFiles(out + src, ["scratch.log", "notes.txt"])
        #expect(
            try cabackup("restore", "--repo", repo, "latest", "--target", out, "--delete", "--exclude", "*.log").status
                == 0)
        #expect(FileManager.default.fileExists(atPath: out + src + "/scratch.log"))
        #expect(!FileManager.default.fileExists(atPath: out + src + "/notes.txt"))
        // A target that is a file: one line, exit 1, the file unchanged.
        try Data("mine".utf8).write(to: URL(fileURLWithPath: s.file("afile")))
        let file = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("afile"), "--delete")
        #expect(file.status == 1)
        #expect(
            file.stderr
                == "cabackup: restore target \(s.file("afile")) is not a directory: name a directory (created if missing)\n"
        )
        #expect(try String(contentsOfFile: s.file("afile"), encoding: .utf8) == "mine")
        // --delete into / needs a pattern.
        let root = try cabackup("restore", "--repo", repo, "latest", "--target", "/", "--delete")
        #expect(root.status == 64 && root.stderr.contains("--target / --delete"), "\(root.stderr)")
    }

    @Test("--dry-run says what would be restored and deleted, and touches nothing")
    func dryRun() throws {
        let (s, src, repo) = try fixture()
        let out = s.file("out")
        #expect(try cabackup("restore", "--repo", repo, "latest", "--target", out).status == 0)
        try makeFiles(out + src, ["extra.txt"])
        try Data("changed".utf8).write(to: URL(fileURLWithPath: out + src + "/docs/a.txt"))
        try FileManager.default.removeItem(atPath: out + src + "/other")
        let before = try describe(out)
        let dry = try cabackup("restore", "--repo", repo, "latest", "--target", out, "--delete", "--dry-run", "-v")
        #expect(dry.status == 0, "\(dry.stderr)")
        #expect(dry.stdout.contains("would restore \(src)/other/y.txt\n"), "\(dry.stdout)")
        #expect(dry.stdout.contains("would delete \(src)/extra.txt\n"), "\(dry.stdout)")
        #expect(dry.stdout.contains("dry run: would restore \(Self.files.count) files, "), "\(dry.stdout)")
        #expect(dry.stdout.contains("would delete 1 entries not in the snapshot"))
        #expect(try describe(out) == before)
        // A target that does not exist is not created; a non-empty one still needs --overwrite.
        #expect(try cabackup("restore", "--repo", repo, "latest", "--target", s.file("new"), "--dry-run").status == 0)
        #expect(!FileManager.default.fileExists(atPath: s.file("new")))
        let refused = try cabackup("restore", "--repo", repo, "latest", "--target", out, "--dry-run")
        #expect(refused.status == 1 && refused.stderr.contains("not empty"), "\(refused.stderr)")
        #expect(try describe(out) == before)
    }

    @Test("restore --json: every line an object with message_type, status and verbose_status, summary last")
    func json() throws {
        let (s, src, repo) = try fixture()
        let r = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"), "--json", "-v")
        #expect(r.status == 0, "\(r.stderr)")
        let lines = jsonLines(r.stdout)
        #expect(lines.allSatisfy { $0["message_type"] is String }, "\(r.stdout)")
        let summary = try #require(lines.last)
        #expect(summary["message_type"] as? String == "summary")
        #expect(summary["files_restored"] as? Int == Self.files.count)
        #expect(summary["total_files"] as? Int == Self.files.count)
        let bytes = Self.files.reduce(0) { $0 + $1.utf8.count }
        #expect(summary["total_bytes"] as? Int == bytes && summary["bytes_restored"] as? Int == bytes)
        #expect(summary["seconds_elapsed"] is Int && summary["dry_run"] as? Bool == false)
        let status = try #require(lines.last { $0["message_type"] as? String == "status" })
        #expect(status["percent_done"] as? Double == 1)
        for key in ["total_files", "files_restored", "total_bytes", "bytes_restored", "seconds_elapsed"] {
            #expect(status[key] is Int, "\(key)")
        }
        let items = lines.filter { $0["message_type"] as? String == "verbose_status" }
        let restored = Set(items.compactMap { $0["action"] as? String == "restored" ? $0["item"] as? String : nil })
        #expect(restored.contains(src + "/docs/deep/c.txt") && restored.contains(src + "/docs/deep"), "\(restored)")
        #expect(items.first { $0["item"] as? String == src + "/docs/b.md" }?["size"] as? Int == 9)
        // Without -v no verbose_status; with -q no status either; the summary stays.
        let plain = jsonLines(
            try cabackup("restore", "--repo", repo, "latest", "--target", s.file("plain"), "--json").stdout)
        #expect(!plain.contains { $0["message_type"] as? String == "verbose_status" })
        #expect(plain.last?["message_type"] as? String == "summary")
        let quiet = jsonLines(
            try cabackup("restore", "--repo", repo, "latest", "--target", s.file("quiet"), "--json", "-q").stdout)
        #expect(quiet.count == 1 && quiet.last?["message_type"] as? String == "summary", "\(quiet)")
        // Failures are error lines.
        try FileManager.default.createDirectory(atPath: s.file("err") + src, withIntermediateDirectories: true)
        try Data().write(to: URL(fileURLWithPath: s.file("err") + src + "/docs"))
        chmod(s.file("err") + src, 0o500)
        defer { chmod(s.file("err") + src, 0o700) }
        if geteuid() != 0 {
            let failing = try cabackup(
                "restore", "--repo", repo, "latest", "--target", s.file("err"), "--json", "--overwrite")
            #expect(failing.status == 1)
            let failed = jsonLines(failing.stdout)
            #expect(
                failed.contains { $0["message_type"] as? String == "error" && $0["during"] as? String == "restore" })
            #expect(failed.last?["message_type"] as? String == "summary")
        }
    }
}
