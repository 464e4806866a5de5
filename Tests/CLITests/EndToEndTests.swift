import Foundation
import Testing

@Suite("cabackup CLI end to end", .serialized)
struct EndToEndTests {
    @Test("every kind of entry round-trips, checked by an independent reader (Python os.lstat)")
    func fullRoundTrip() throws {
        let s = Scratch()
        let src = s.file("src")
        #expect(try python(treetool, "make", src).status == 0)
        #expect(try cabackup("init", "--repo", s.file("repo")).status == 0)
        let snap = try cabackup("snapshot", "--repo", s.file("repo"), src)
        #expect(snap.status == 0, "\(snap.stderr)")
        #expect(snap.lastLine.hasPrefix("snapshot ") && snap.lastLine.hasSuffix(" saved"))
        let restore = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(restore.status == 0, "\(restore.stderr)")
        let cmp = try python(treetool, "compare", src, s.file("out") + src)
        #expect(cmp.status == 0, "\(cmp.stdout)")
        #expect(cmp.stdout.contains(" 0 differences"))
    }

    @Test("init --compression zstd: a local zstd repository round-trips and checks; auto stays LZ4 locally")
    func zstdRoundTrip() throws {
        let s = Scratch()
        let src = s.file("src")
        #expect(try python(treetool, "make", src).status == 0)
        try Data(String(repeating: "compressible line of text\n", count: 100_000).utf8)
            .write(to: URL(fileURLWithPath: src + "/text.txt"))
        let repo = s.file("repo")
        let initialized = try cabackup("init", "--repo", repo, "--compression", "zstd")
        #expect(initialized.status == 0, "\(initialized.stderr)")
        #expect(initialized.stdout.contains("(compression: zstd)"))
        let config = try #require(jsonObject(try String(contentsOfFile: repo + "/config", encoding: .utf8)))
        #expect(config["format_version"] as? Int == 4 && config["compression"] as? String == "zstd")
        let snap = try cabackup("snapshot", "--repo", repo, src)
        #expect(snap.status == 0, "\(snap.stderr)")
        let restore = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"))
        #expect(restore.status == 0, "\(restore.stderr)")
        let cmp = try python(treetool, "compare", src, s.file("out") + src)
        #expect(cmp.status == 0 && cmp.stdout.contains(" 0 differences"), "\(cmp.stdout)")
        let check = try cabackup("check", "--repo", repo, "--read-data")
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        // The blobs really are zstd (compression byte 2 in the index), and no LZ4.
        let kinds = try run(
            "/usr/bin/env",
            [
                "python3", "-c",
                "import sqlite3,sys; print(sorted(r[0] for r in sqlite3.connect(sys.argv[1]).execute('select distinct compression from blobs')))",
                repo + "/index/index.sqlite",
            ])
        #expect(kinds.stdout.contains("2") && !kinds.stdout.contains("1"), "\(kinds.stdout)")
        // auto (the default) in a local directory: LZ4, the config as before (format 3).
        #expect(try cabackup("init", "--repo", s.file("auto")).stdout.contains("(compression: lz4)"))
        let auto = try #require(jsonObject(try String(contentsOfFile: s.file("auto/config"), encoding: .utf8)))
        #expect(auto["format_version"] as? Int == 3 && auto["compression"] == nil)
        #expect(try cabackup("init", "--repo", s.file("bad"), "--compression", "brotli").status == 64)
    }

    @Test("a directory of 60,000 subdirectories takes no more memory than the same number spread out")
    func wideDirectory() throws {
        let s = Scratch()
        // The same 60,000 empty directories: all in one, and 250 in each of 240.
        let make = """
            import os, sys
            for i in range(60000):
                os.makedirs(os.path.join(sys.argv[1], "wide", "d%05d" % i))
                os.makedirs(os.path.join(sys.argv[1], "narrow", "g%03d" % (i // 250), "d%05d" % i))
            """
        #expect(try run("/usr/bin/env", ["python3", "-c", make, s.path]).status == 0)
        #expect(try cabackup("init", "--repo", s.file("repo")).status == 0)
        let (narrow, narrowKiB) = try cabackupWithPeakMemory(
            ["snapshot", "--repo", s.file("repo"), s.file("narrow")], env: [:])
        #expect(narrow.status == 0, "\(narrow.stderr)")
        let (wide, wideKiB) = try cabackupWithPeakMemory(
            ["snapshot", "--repo", s.file("repo"), s.file("wide")], env: [:])
        #expect(wide.status == 0, "\(wide.stderr)")
        // Each subdirectory held until its parent's tree is stored costed ~630 bytes: 37 MB here.
        #expect(narrowKiB > 0 && wideKiB < narrowKiB + 12 * 1024, "wide \(wideKiB) KiB, narrow \(narrowKiB) KiB")
        let restore = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(restore.status == 0, "\(restore.stderr)")
        let restored = try FileManager.default.contentsOfDirectory(atPath: s.file("out") + s.file("wide"))
        #expect(restored.count == 60000)
        #expect(restored.sorted().last == "d59999")
        // Unchanged: the wide directory's trees are the parent's, so only the record and
        // the ancestors' trees (whose mtimes moved) are stored.
        let again = try cabackup("snapshot", "--repo", s.file("repo"), s.file("wide"), "--json")
        #expect(again.status == 0, "\(again.stderr)")
        let summary = try JSONSerialization.jsonObject(with: Data(again.lastLine.utf8)) as? [String: Any]
        let added = try #require(summary?["bytes_added"] as? Int)
        #expect(added < 16384, "\(again.lastLine)")
    }

    @Test("the independent comparison can fail: a changed mtime or byte is reported")
    func comparisonCanFail() throws {
        let s = Scratch()
        let src = s.file("src")
        _ = try python(treetool, "make", src)
        _ = try cabackup("init", "--repo", s.file("repo"))
        _ = try cabackup("snapshot", "--repo", s.file("repo"), src)
        _ = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        let victim = s.file("out") + src + "/docs/hello.txt"
        try Data("hellO, world\n".utf8).write(to: URL(fileURLWithPath: victim))
        let cmp = try python(treetool, "compare", src, s.file("out") + src)
        #expect(cmp.status == 1)
        #expect(cmp.stdout.contains("hello.txt"))
    }

    @Test("snapshot --json: last line is one object with the documented fields")
    func snapshotJSON() throws {
        let s = Scratch()
        let src = s.file("src")
        _ = try python(treetool, "make", src)
        _ = try cabackup("init", "--repo", s.file("repo"))
        let first = try cabackup("snapshot", "--repo", s.file("repo"), "--json", "--tag", "daily", src)
        let a = try #require(jsonObject(first.lastLine))
        for key in ["snapshot_id", "files_total", "bytes_total", "bytes_added", "chunks_added", "duration_s"] {
            #expect(a[key] != nil, "missing \(key)")
        }
        #expect(a["files_total"] as? Int == 14)
        let second = try cabackup("snapshot", "--repo", s.file("repo"), "--json", src)
        let b = try #require(jsonObject(second.lastLine))
        #expect(b["chunks_added"] as? Int == 0)
        #expect((b["bytes_added"] as? Int ?? .max) < 1 << 20)
        #expect(b["files_unchanged"] as? Int == 14)
        #expect(b["bytes_total"] as? Int == 0)
        let forced = try cabackup("snapshot", "--repo", s.file("repo"), "--json", "--force", src)
        let c = try #require(jsonObject(forced.lastLine))
        #expect(c["files_unchanged"] as? Int == 0)
        #expect(c["bytes_total"] as? Int == a["bytes_total"] as? Int)

        let list = try cabackup("snapshots", "--repo", s.file("repo"), "--json")
        let arr = try #require(try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [[String: Any]])
        #expect(arr.count == 3)
        #expect(arr[0]["id"] as? String == a["snapshot_id"] as? String)
        #expect(arr[0]["tags"] as? [String] == ["daily"])
        #expect(arr[0]["parent"] is NSNull)
        #expect(arr[1]["parent"] as? String == a["snapshot_id"] as? String)
        #expect(arr[2]["parent"] as? String == b["snapshot_id"] as? String)
        #expect(arr[0]["paths"] as? [String] == [src])
        let time = try #require(arr[0]["time"] as? String)
        #expect(
            time.range(of: #"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}[+-]\d\d:\d\d$"#, options: .regularExpression) != nil
        )
        let tagged = try cabackup("snapshots", "--repo", s.file("repo"), "--json", "--tag", "daily")
        #expect((try JSONSerialization.jsonObject(with: Data(tagged.stdout.utf8)) as? [Any])?.count == 1)
    }

    @Test("ls escapes non-UTF-8 names in text and gives path_b64 in JSON")
    func lsNames() throws {
        let s = Scratch()
        let src = s.file("src")
        _ = try python(treetool, "make", src)
        _ = try cabackup("init", "--repo", s.file("repo"))
        _ = try cabackup("snapshot", "--repo", s.file("repo"), src)
        let text = try cabackup("ls", "--repo", s.file("repo"), "latest")
        #expect(text.stdout.contains(src + "/latin1-\\xe9t\\xe9.txt\n"))
        #expect(text.stdout.contains(src + "/new\\x0aline\n"))
        let long = try cabackup("ls", "--repo", s.file("repo"), "--long", "latest", src, env: ["TZ": "UTC"])
        #expect(long.stdout.contains(" \(src)/link-rel -> docs/hello.txt\n"))
        #expect(long.stdout.split(separator: "\n").contains { $0.hasPrefix("prw-r--r-- ") && $0.hasSuffix("/fifo") })
        #expect(
            long.stdout.split(separator: "\n").contains { $0.hasPrefix("-rwxr-xr-x ") && $0.hasSuffix("/script.sh") })
        #expect(long.stdout.contains("2020-09-13 12:26:40"))
        let notThere = try cabackup("ls", "--repo", s.file("repo"), "latest", src + "/nope")
        #expect(notThere.status == 1)
        #expect(notThere.stderr.contains("is not in the snapshot"))
        let json = try cabackup("ls", "--repo", s.file("repo"), "--json", "latest", src + "/docs")
        let lines = json.stdout.split(separator: "\n").compactMap { jsonObject(String($0)) }
        #expect(lines.first?["path"] as? String == src + "/docs")
        #expect(lines.contains { $0["path"] as? String == src + "/docs/hello.txt" })
        let all = try cabackup("ls", "--repo", s.file("repo"), "--json", "latest")
        let latin = all.stdout.split(separator: "\n").compactMap { jsonObject(String($0)) }
            .first { ($0["path"] as? String)?.contains("latin1-") == true }
        let b64 = try #require(latin?["path_b64"] as? String)
        #expect(
            Data(base64Encoded: b64) == Data((src + "/latin1-").utf8) + Data([0xE9, 0x74, 0xE9]) + Data(".txt".utf8))
    }

    @Test("exit codes: 10 for no repository, 1 for a missing path (nothing written), 64 for usage")
    func exitCodes() throws {
        let s = Scratch()
        let noRepo = try cabackup("snapshots", "--repo", s.file("none"))
        #expect(noRepo.status == 10)
        #expect(noRepo.stderr.contains("cabackup init"))
        _ = try cabackup("init", "--repo", s.file("repo"))
        let again = try cabackup("init", "--repo", s.file("repo"))
        #expect(again.status == 1)
        let missing = try cabackup("snapshot", "--repo", s.file("repo"), s.file("does-not-exist"))
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("does-not-exist"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: s.file("repo/snapshots")).isEmpty)
        #expect(try cabackup("snapshot", "--repo", s.file("repo")).status == 64)
        #expect(try cabackup("snapshot", s.path).status == 64)  // no --repo, no CABACKUP_REPO
        let env = try cabackup("snapshots", env: ["CABACKUP_REPO": s.file("repo")])
        #expect(env.status == 0)
        #expect(try cabackup("--help").stdout.contains("EXIT CODES"))
        let unknown = try cabackup("restore", "--repo", s.file("repo"), "deadbeef", "--target", s.file("o"))
        #expect(unknown.status == 1)
        #expect(unknown.stderr.contains("no snapshot matches"))
    }

    @Test("restore refuses a non-empty target, and --overwrite allows it")
    func restoreTarget() throws {
        let s = Scratch()
        let src = s.file("src")
        _ = try python(treetool, "make", src)
        _ = try cabackup("init", "--repo", s.file("repo"))
        _ = try cabackup("snapshot", "--repo", s.file("repo"), src)
        try FileManager.default.createDirectory(atPath: s.file("out"), withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: s.file("out/keep"), contents: Data([1]))
        let refused = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("not empty"))
        let ok = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"), "--overwrite")
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(try python(treetool, "compare", src, s.file("out") + src).status == 0)
    }

    @Test("unreadable entries are reported and skipped; the snapshot is saved with exit code 3")
    func unreadableEntries() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src + "/locked", withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: src + "/ok.txt", contents: Data("fine".utf8))
        _ = FileManager.default.createFile(atPath: src + "/secret.txt", contents: Data("no".utf8))
        chmod(src + "/secret.txt", 0)
        chmod(src + "/locked", 0)
        // Root reads everything: drop to nobody to make the entries unreadable.
        var prefix: [String] = []
        if geteuid() == 0 {
            chmod(s.path, 0o777)
            chmod(src, 0o777)
            prefix = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        }
        let bin = cabackupBinary
        func cab(_ args: [String]) throws -> RunResult {
            prefix.isEmpty ? try run(bin, args) : try run(prefix[0], Array(prefix.dropFirst()) + [bin] + args)
        }
        #expect(try cab(["init", "--repo", s.file("repo")]).status == 0)
        let r = try cab(["snapshot", "--repo", s.file("repo"), "--json", src])
        #expect(r.status == 3, "\(r.stderr)")
        #expect(r.stderr.contains("secret.txt"))
        #expect(r.stderr.contains("locked: open directory: Permission denied (stored as an empty directory)"))
        // The summary says what was stored: the file is left out, the directory kept empty.
        #expect(
            r.stderr.contains(
                "1 entry could not be read and is not in the snapshot; "
                    + "1 directory could not be listed and is stored empty"), "\(r.stderr)")
        let summary = try #require(jsonObject(r.lastLine))
        #expect(summary["files_total"] as? Int == 1)
        let ls = try cab(["ls", "--repo", s.file("repo"), "latest"])
        #expect(ls.stdout.contains("/ok.txt"))
        #expect(ls.stdout.contains(src + "/locked\n"))
        #expect(!ls.stdout.contains("secret.txt"))
    }

    @Test("relative paths are stored absolute; --exclude skips matching entries")
    func relativeAndExclude() throws {
        let s = Scratch()
        try FileManager.default.createDirectory(atPath: s.file("src/cache"), withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: s.file("src/a.txt"), contents: Data("a".utf8))
        _ = FileManager.default.createFile(atPath: s.file("src/b.tmp"), contents: Data("b".utf8))
        _ = FileManager.default.createFile(atPath: s.file("src/cache/c"), contents: Data("c".utf8))
        _ = try cabackup("init", "--repo", s.file("repo"))
        let r = try cabackup(
            "snapshot", "--repo", s.file("repo"), "--exclude", "*.tmp", "--exclude", s.file("src/cache"), "src",
            cwd: s.path)
        #expect(r.status == 0, "\(r.stderr)")
        let ls = try cabackup("ls", "--repo", s.file("repo"), "latest")
        #expect(ls.stdout.contains(s.file("src/a.txt")))
        #expect(!ls.stdout.contains("b.tmp"))
        #expect(!ls.stdout.contains("cache"))
    }

    @Test("--exclude follows restic's pattern rules; --iexclude ignores case; a bad pattern changes nothing")
    func resticExcludePatterns() throws {
        let s = Scratch()
        let files = [
            "src/docs/a.txt", "src/docs/b.md", "src/docs/deep/c.txt", "src/sub/x", "src/sub/inner/y", "src/keep.log",
            "src/drop.log", "src/Photos/IMG.JPG", "src/Photos/img.png", "src/node_modules/m/index.js",
        ]
        for f in files {
            try FileManager.default.createDirectory(
                atPath: (s.file(f) as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            _ = FileManager.default.createFile(atPath: s.file(f), contents: Data(f.utf8))
        }
        _ = try cabackup("init", "--repo", s.file("repo"))
        // A malformed pattern: a usage error before anything is written.
        let bad = try cabackup("snapshot", "--repo", s.file("repo"), "--exclude", "docs/[a-", s.file("src"))
        #expect(bad.status == 64, "\(bad.stderr)")
        #expect(bad.stderr.contains("docs/[a-"))
        #expect(try cabackup("snapshots", "--repo", s.file("repo"), "--json").stdout.contains("[]"))
        let r = try cabackup(
            "snapshot", "--repo", s.file("repo"), "--exclude", "docs/*.txt", "--exclude", "sub/*", "--exclude",
            "*.log", "--exclude", "!keep.log", "--exclude", "**/node_modules", "--iexclude", "*.jpg", s.file("src"))
        #expect(r.status == 0, "\(r.stderr)")
        let ls = try cabackup("ls", "--repo", s.file("repo"), "latest").stdout
        let stored = Set(ls.split(separator: "\n").map(String.init))
        for kept in ["src/docs/b.md", "src/docs/deep/c.txt", "src/sub", "src/keep.log", "src/Photos/img.png"] {
            #expect(stored.contains(s.file(kept)), "\(kept) should be stored: \(ls)")
        }
        for gone in ["src/docs/a.txt", "src/sub/x", "src/sub/inner", "src/drop.log", "src/Photos/IMG.JPG"] {
            #expect(!stored.contains(s.file(gone)), "\(gone) should be excluded")
        }
        #expect(!ls.contains("node_modules"))
        // status uses the same rules: nothing left to sync.
        let status = try cabackup(
            "status", "--repo", s.file("repo"), "--exclude", "docs/*.txt", "--exclude", "sub/*", "--exclude", "*.log",
            "--exclude", "!keep.log", "--exclude", "**/node_modules", "--iexclude", "*.jpg", "--exit-code",
            s.file("src"))
        #expect(status.status == 0, "\(status.stdout)")
    }

    @Test("a file larger than 4 GiB round-trips (data past the 2^32 offset)")
    func largeFile() throws {
        let s = Scratch()
        let big = s.file("src/big.img")
        // Sparse, 4 GiB + 4 MiB, with random data at the start and across the 4 GiB line.
        let make = try makeSparseFile(big, randomAt: [0, (4 << 30) - (1 << 20), (4 << 30) + (1 << 20)])
        #expect(make.status == 0, "\(make.stderr)")
        _ = try cabackup("init", "--repo", s.file("repo"))
        let snap = try cabackup("snapshot", "--repo", s.file("repo"), "--json", s.file("src"))
        #expect(snap.status == 0, "\(snap.stderr)")
        let summary = try #require(jsonObject(snap.lastLine))
        #expect(summary["bytes_total"] as? Int == (4 << 30) + (4 << 20))
        // Zeros deduplicate: far less is stored than the file's size.
        #expect((summary["bytes_added"] as? Int ?? .max) < 64 << 20)
        let r = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(r.status == 0, "\(r.stderr)")
        let cmp = try python(treetool, "compare", s.file("src"), s.file("out") + s.file("src"))
        #expect(cmp.status == 0, "\(cmp.stdout)")
    }

    @Test(
        "a full disk fails the snapshot with a clear error and leaves a valid repository",
        .enabled(if: geteuid() == 0, "needs root to mount a small tmpfs"))
    func fullDisk() throws {
        let s = Scratch()
        let mountPoint = s.file("small")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        #expect(try run("/bin/mount", ["-t", "tmpfs", "-o", "size=6M", "tmpfs", mountPoint]).status == 0)
        defer { _ = try? run("/bin/umount", [mountPoint]) }
        let repo = mountPoint + "/repo"
        try FileManager.default.createDirectory(atPath: s.file("src/small"), withIntermediateDirectories: true)
        try Data("keep me\n".utf8).write(to: URL(fileURLWithPath: s.file("src/small/a.txt")))
        // Incompressible, so it cannot fit in 6 MiB.
        let big = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: 24 << 20))
        try big.write(to: URL(fileURLWithPath: s.file("src/big.bin")))
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, s.file("src/small")).status == 0)
        let full = try cabackup("snapshot", "--repo", repo, s.file("src"))
        #expect(full.status == 1)
        #expect(full.stderr.contains("No space left on device"))
        #expect(full.stderr.contains("free space"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: repo + "/tmp").isEmpty)
        let list = try cabackup("snapshots", "--repo", repo, "--json")
        #expect((try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [Any])?.count == 1)
        let r = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(
            FileManager.default.contents(atPath: s.file("out") + s.file("src/small/a.txt")) == Data("keep me\n".utf8))
    }

    @Test("repair index rebuilds a deleted index; commands still work")
    func repairIndex() throws {
        let s = Scratch()
        let src = s.file("src")
        _ = try python(treetool, "make", src)
        _ = try cabackup("init", "--repo", s.file("repo"))
        _ = try cabackup("snapshot", "--repo", s.file("repo"), src)
        try FileManager.default.removeItem(atPath: s.file("repo/index"))
        let repaired = try cabackup("repair", "index", "--repo", s.file("repo"))
        #expect(repaired.status == 0)
        #expect(repaired.stdout.contains("1 snapshots"))
        let r = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(r.status == 0)
        #expect(try python(treetool, "compare", src, s.file("out") + src).status == 0)
    }
}

@Suite("README")
struct ReadmeTests {
    @Test("the README's library example is the compiled Examples/ program, and it runs")
    func libraryExample() throws {
        let readme = try String(contentsOfFile: packageRoot + "/README.md", encoding: .utf8)
        let example = try String(
            contentsOfFile: packageRoot + "/Examples/LibraryExample/Sources/LibraryExample/main.swift", encoding: .utf8)
        #expect(readme.contains("```swift\n" + example + "```"))
        let r = try run(productsDirectory + "/library-example", [])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.hasSuffix("hello.txt says: Hello from cabackup\n"))
        // Its progress callback ends with the whole run: one file of 20 bytes.
        #expect(r.stdout.contains("1 files, 20 bytes read\nsnapshot "), "\(r.stdout)")
    }
}
