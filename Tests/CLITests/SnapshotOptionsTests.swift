import Foundation
import Testing

/// restic's `backup` options on `cabackup snapshot`, through the built binary: what each
/// one makes the repository store.
@Suite("snapshot options: files-from, exclude files and tags, one file system, stdin, dry run, JSON stream")
struct SnapshotOptionsTests {
    /// Writes `text` to `path`, creating its directory.
    func write(_ path: String, _ text: String) throws {
        try FileManager.default.createDirectory(
            atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
    }

    /// A new repository in `s`.
    func initRepo(_ s: Scratch) throws -> String {
        let repo = s.file("repo")
        let r = try cabackup("init", "--repo", repo)
        #expect(r.status == 0, "\(r.stderr)")
        return repo
    }

    /// The `ls --json` objects of the latest snapshot, by path.
    func listing(_ repo: String) throws -> [String: [String: Any]] {
        let r = try cabackup("ls", "--repo", repo, "--json", "latest")
        #expect(r.status == 0, "\(r.stderr)")
        var out: [String: [String: Any]] = [:]
        for line in r.stdout.split(separator: "\n") {
            if let o = jsonObject(String(line)), let p = o["path"] as? String { out[p] = o }
        }
        return out
    }

    /// The paths of the latest snapshot below `dir` (relative to it), sorted.
    func stored(_ repo: String, below dir: String) throws -> [String] {
        try listing(repo).keys.filter { $0.hasPrefix(dir + "/") }.map { String($0.dropFirst(dir.count + 1)) }.sorted()
    }

    func snapshotCount(_ repo: String) throws -> Int {
        let r = try cabackup("snapshots", "--repo", repo, "--json")
        return ((try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8))) as? [Any])?.count ?? -1
    }

    /// A usage error: exit 64, its first line on stderr contains `text`.
    func expectUsageError(_ r: RunResult, _ text: String) {
        #expect(r.status == 64, "\(r.stdout)\(r.stderr)")
        #expect(r.stderr.split(separator: "\n").first?.contains(text) == true, "\(r.stderr)")
    }

    @Test("--files-from (literal paths, # comments, relative to the cwd) and --files-from-raw combine with PATHs")
    func filesFrom() throws {
        let s = Scratch()
        let repo = try initRepo(s)
        let src = s.file("src")
        for name in ["a.txt", "b.txt", "c.txt", "#hash.txt", "star*.txt", "starry.txt"] {
            try write(src + "/" + name, name)
        }
        try write(src + "/new\nline.txt", "raw")
        try write(s.file("other/d.txt"), "d")
        try write(
            s.file("list.txt"), "# a comment\n\nsrc/a.txt\r\n\(s.file("other/d.txt"))\nsrc/#hash.txt\nsrc/star*.txt\n")
        try Data((src + "/new\nline.txt").utf8 + [0]).write(to: URL(fileURLWithPath: s.file("list.raw")))
        let r = try cabackup(
            "snapshot", "--repo", repo, "--files-from", "list.txt", "--files-from-raw", "list.raw", src + "/b.txt",
            cwd: s.path)
        #expect(r.status == 0, "\(r.stderr)")
        let all = try listing(repo)
        for name in ["a.txt", "b.txt", "#hash.txt", "star*.txt", "new\nline.txt"] {
            #expect(all[src + "/" + name]?["type"] as? String == "file", "\(name)")
        }
        #expect(all[s.file("other/d.txt")] != nil)
        // Literal: the * matched nothing else; nothing unlisted came along.
        #expect(all[src + "/c.txt"] == nil && all[src + "/starry.txt"] == nil)
        let record = try cabackup("snapshots", "--repo", repo, "--json")
        #expect(record.stdout.contains(s.file("other/d.txt")))

        let missing = try cabackup("snapshot", "--repo", s.file("repo2"), "--files-from", s.file("nope.txt"))
        #expect(missing.status == 64, "\(missing.stderr)")
        #expect(missing.stderr.hasPrefix("Error: --files-from: cannot read \(s.file("nope.txt"))"), "\(missing.stderr)")
        #expect(!FileManager.default.fileExists(atPath: s.file("repo2")))
        // Snapshot paths are text: a name that is not UTF-8 is refused, not mangled.
        try Data(Array((src + "/latin1-").utf8) + [0xE9, 0]).write(to: URL(fileURLWithPath: s.file("bad.raw")))
        let latin1 = try cabackup("snapshot", "--repo", repo, "--files-from-raw", s.file("bad.raw"))
        #expect(latin1.status == 64 && latin1.stderr.contains("is not UTF-8"), "\(latin1.stderr)")
        try write(s.file("empty.txt"), "# nothing\n")
        let empty = try cabackup("snapshot", "--repo", repo, "--files-from", s.file("empty.txt"))
        #expect(empty.status == 64 && empty.stderr.contains("name at least one PATH"), "\(empty.stderr)")
        #expect(try snapshotCount(repo) == 1)
    }

    @Test("--exclude-file and --iexclude-file: patterns one per line; status predicts the same")
    func excludeFiles() throws {
        let s = Scratch()
        let repo = try initRepo(s)
        let src = s.file("src")
        for name in ["keep.txt", "debug.log", "photo.JPG", "deep/trace.log", "deep/keep.md", "#odd"] {
            try write(src + "/" + name, name)
        }
        try write(s.file("ex.txt"), "# logs\n\n  *.log  \n#odd\n")
        try write(s.file("iex.txt"), "*.jpg\n")
        let status = try cabackup(
            "status", "--repo", repo, "--json", "--exclude-file", s.file("ex.txt"), "--iexclude-file",
            s.file("iex.txt"),
            src)
        let added = ((jsonObject(status.lastLine)?["added"] as? [[String: Any]]) ?? []).compactMap {
            $0["path"] as? String
        }
        #expect(Set([src + "/keep.txt", src + "/deep/keep.md", src + "/#odd"]).isSubset(of: added), "\(added)")
        #expect(!added.contains { $0.hasSuffix(".log") || $0.hasSuffix(".JPG") }, "\(added)")
        let r = try cabackup(
            "snapshot", "--repo", repo, "--exclude-file", s.file("ex.txt"), "--iexclude-file", s.file("iex.txt"), src)
        #expect(r.status == 0, "\(r.stderr)")
        // "#odd" in the file is a comment, not a pattern.
        #expect(try stored(repo, below: src) == ["#odd", "deep", "deep/keep.md", "keep.txt"])

        let missing = try cabackup("snapshot", "--repo", repo, "--exclude-file", s.file("nope"), src)
        try #require(missing.status == 64, "\(missing.stderr)")
        #expect(missing.stderr.contains("--exclude-file: cannot read \(s.file("nope"))"), "\(missing.stderr)")
        try write(s.file("bad.txt"), "[z-a\n")
        let bad = try cabackup("snapshot", "--repo", repo, "--iexclude-file", s.file("bad.txt"), src)
        #expect(bad.status == 64 && bad.stderr.contains("[z-a"), "\(bad.stderr)")
        #expect(try snapshotCount(repo) == 1)
    }

    @Test("--exclude-caches keeps a tagged directory with only its CACHEDIR.TAG; --exclude-if-present NAME[:HEADER]")
    func tagFiles() throws {
        let s = Scratch()
        let repo = try initRepo(s)
        let src = s.file("src")
        try write(src + "/cache/CACHEDIR.TAG", "Signature: 8a477f597d28d172789f06886806bc55\n# made by a tool\n")
        try write(src + "/cache/junk.bin", "junk")
        try write(src + "/cache/sub/more.bin", "more")
        try write(src + "/fake/CACHEDIR.TAG", "Signature: not the one\n")
        try write(src + "/fake/kept.txt", "kept")
        try write(src + "/skip/.nobackup", "")
        try write(src + "/skip/data.txt", "data")
        try write(src + "/marked/.marker", "KEEPOUT please")
        try write(src + "/marked/data.txt", "data")
        try write(src + "/wrong/.marker", "other")
        try write(src + "/wrong/data.txt", "data")
        try write(src + "/top.txt", "top")
        let r = try cabackup(
            "snapshot", "--repo", repo, "--exclude-caches", "--exclude-if-present", ".nobackup", "--exclude-if-present",
            ".marker:KEEPOUT", src)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(
            try stored(repo, below: src) == [
                "cache", "cache/CACHEDIR.TAG", "fake", "fake/CACHEDIR.TAG", "fake/kept.txt", "marked", "marked/.marker",
                "skip", "skip/.nobackup", "top.txt", "wrong", "wrong/.marker", "wrong/data.txt",
            ])
        let first = try stored(repo, below: src)
        // Again with the first as parent: the listings made ahead are filtered the same way.
        try write(src + "/cache/junk2.bin", "junk")
        let again = try cabackup(
            "snapshot", "--repo", repo, "--exclude-caches", "--exclude-if-present", ".nobackup", "--exclude-if-present",
            ".marker:KEEPOUT", src)
        #expect(again.status == 0, "\(again.stderr)")
        #expect(try stored(repo, below: src) == first)
        let bad = try cabackup("snapshot", "--repo", repo, "--exclude-if-present", ":HEADER", src)
        #expect(bad.status == 64 && bad.stderr.contains("--exclude-if-present"), "\(bad.stderr)")
        #expect(try snapshotCount(repo) == 2)
    }

    @Test("--exclude-larger-than skips bigger files, below the paths and among them")
    func largerThan() throws {
        let s = Scratch()
        let repo = try initRepo(s)
        let src = s.file("src")
        try write(src + "/small.txt", String(repeating: "s", count: 1024))
        try write(src + "/big.txt", String(repeating: "b", count: 1025))
        try write(s.file("alone.bin"), String(repeating: "a", count: 5000))
        let r = try cabackup("snapshot", "--repo", repo, "--exclude-larger-than", "1K", src, s.file("alone.bin"))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try stored(repo, below: src) == ["small.txt"])
        #expect(try listing(repo)[s.file("alone.bin")] == nil)
        let bad = try cabackup("snapshot", "--repo", repo, "--exclude-larger-than", "12Q", src)
        expectUsageError(bad, "--exclude-larger-than takes a size")
        #expect(try snapshotCount(repo) == 1)
    }

    /// Whether this machine lets a process mount a tmpfs in a mount namespace of its own.
    static let canMount: Bool = {
        let r = try? run("/usr/bin/unshare", ["-rm", "/bin/sh", "-c", "mount -t tmpfs none /mnt"])
        return r?.status == 0
    }()

    /// CI can mount (it runs as root): there the test must run, never be skipped.
    static let runsMountTest = canMount || ProcessInfo.processInfo.environment["CI"] != nil

    @Test("-x/--one-file-system stores a mount point as an empty directory", .enabled(if: runsMountTest))
    func oneFileSystem() throws {
        #expect(Self.canMount, "unshare -rm cannot mount a tmpfs here: the test needs a mount namespace")
        let s = Scratch()
        let repo = try initRepo(s)
        let src = s.file("src")
        try write(src + "/keep.txt", "keep")
        try FileManager.default.createDirectory(atPath: src + "/mnt", withIntermediateDirectories: true)
        // A private mount namespace, so the mount needs no cleanup and nobody else sees it.
        func inNamespace(_ flags: String) throws -> RunResult {
            let script =
                "mount -t tmpfs none \"$1/mnt\" && echo inside > \"$1/mnt/inside.txt\" && exec \"$2\" snapshot --repo \"$3\" \(flags) \"$1\""
            return try run("/usr/bin/unshare", ["-rm", "/bin/sh", "-c", script, "sh", src, cabackupBinary, repo])
        }
        let plain = try inNamespace("")
        try #require(plain.status == 0, "\(plain.stderr)")
        #expect(try stored(repo, below: src) == ["keep.txt", "mnt", "mnt/inside.txt"])
        let x = try inNamespace("-x")
        #expect(x.status == 0, "\(x.stderr)")
        #expect(try stored(repo, below: src) == ["keep.txt", "mnt"])
        #expect(try listing(repo)[src + "/mnt"]?["type"] as? String == "dir")
    }

    /// Runs the binary with stdin from `input`, a file.
    func cabackupWithStdin(_ input: String, _ args: String...) throws -> RunResult {
        try run("/bin/sh", ["-c", "exec \"$0\" \"$@\" < \"\(input)\"", cabackupBinary] + args)
    }

    @Test("--stdin --stdin-filename: the input becomes /NAME, 0644, owned by the user; ls and restore show it")
    func stdinFile() throws {
        let s = Scratch()
        let repo = try initRepo(s)
        var bytes = [UInt8]()
        for i in 0..<300_000 { bytes.append(UInt8(truncatingIfNeeded: i &* 2_654_435_761 >> 13)) }
        try Data(bytes).write(to: URL(fileURLWithPath: s.file("input")))
        let r = try cabackupWithStdin(
            s.file("input"), "snapshot", "--repo", repo, "--stdin", "--stdin-filename", "dump.sql")
        #expect(r.status == 0, "\(r.stderr)")
        let node = try #require(try listing(repo)["/dump.sql"])
        #expect(node["type"] as? String == "file" && node["size"] as? Int == bytes.count)
        #expect(node["mode"] as? Int == 0o644 && node["uid"] as? Int == Int(getuid()))
        let out = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"))
        #expect(out.status == 0, "\(out.stderr)")
        #expect(FileManager.default.contents(atPath: s.file("out/dump.sql")) == Data(bytes))

        let plain = try cabackupWithStdin(s.file("input"), "snapshot", "--repo", repo, "--stdin", "--json", "-v")
        #expect(plain.status == 0, "\(plain.stderr)")
        #expect(plain.stdout.contains("\"action\":\"new\",\"data_size\":\(bytes.count),\"item\":\"/stdin\""))
        #expect(try listing(repo)["/stdin"]?["size"] as? Int == bytes.count)

        let withPath = try cabackupWithStdin(s.file("input"), "snapshot", "--repo", repo, "--stdin", s.path)
        #expect(withPath.status == 64 && withPath.stderr.hasPrefix("Error: --stdin backs up standard input only"))
        let slash = try cabackupWithStdin(
            s.file("input"), "snapshot", "--repo", repo, "--stdin", "--stdin-filename", "a/b")
        #expect(slash.status == 64 && slash.stderr.contains("without '/'"), "\(slash.stderr)")
        #expect(try snapshotCount(repo) == 2)
    }

    @Test("--stdin streams: 256 MiB through a pipe with bounded memory")
    func stdinStreams() throws {
        let s = Scratch()
        let repo = try initRepo(s)
        // Python feeds the pipe and reports the child's peak RSS and the data's hash.
        let script = """
            import hashlib, os, resource, subprocess, sys
            p = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            h = hashlib.sha256()
            block = os.urandom(1 << 20)
            for i in range(256):
                b = bytes([i]) + block[1:]
                h.update(b)
                p.stdin.write(b)
            p.stdin.close()
            rc = p.wait()
            print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, h.hexdigest())
            """
        let r = try python(
            "-c", script, cabackupBinary, "snapshot", "--repo", repo, "--stdin", "--stdin-filename", "big.img")
        let fields = r.stdout.split(separator: " ").map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
        try #require(fields.count == 3, "\(r.stdout)\(r.stderr)")
        #expect(fields[0] == "0")
        // KiB; the stream is 256 MiB.
        #expect(Int(fields[1])! < 160 * 1024, "peak RSS \(fields[1]) KiB")
        #expect(try listing(repo)["/big.img"]?["size"] as? Int == 256 << 20)
        let out = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"))
        #expect(out.status == 0, "\(out.stderr)")
        let sum = try run("/usr/bin/sha256sum", [s.file("out/big.img")])
        #expect(sum.stdout.hasPrefix(fields[2] + " "), "\(sum.stdout)")
    }

    /// Every file below `dir` (relative path) with its bytes.
    func contents(_ dir: String) throws -> [String: Data] {
        var out: [String: Data] = [:]
        let e = FileManager.default.enumerator(atPath: dir)
        while let p = e?.nextObject() as? String {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: dir + "/" + p, isDirectory: &isDir), !isDir.boolValue {
                out[p] = FileManager.default.contents(atPath: dir + "/" + p) ?? Data()
            } else {
                out[p + "/"] = Data()
            }
        }
        return out
    }

    @Test("--dry-run / -n reads and counts but leaves every file of the repository as it was")
    func dryRun() throws {
        let s = Scratch()
        let repo = try initRepo(s)
        let src = s.file("src")
        try write(src + "/same.txt", "same")
        try write(src + "/edit.txt", "before")
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        try write(src + "/edit.txt", "after, and longer")
        try write(src + "/new.txt", String(repeating: "fresh data ", count: 1000))
        let before = try contents(repo)
        let r = try cabackup("snapshot", "--repo", repo, "--dry-run", "--json", src)
        #expect(r.status == 0, "\(r.stderr)")
        let summary = try #require(jsonObject(r.lastLine))
        #expect(summary["message_type"] as? String == "summary" && summary["dry_run"] as? Bool == true)
        #expect(summary["snapshot_id"] == nil)
        #expect(summary["files_new"] as? Int == 1 && summary["files_changed"] as? Int == 1)
        #expect(summary["files_unchanged"] as? Int == 1 && (summary["bytes_added"] as? Int ?? 0) > 0)
        #expect(try contents(repo) == before)
        let text = try cabackup("snapshot", "--repo", repo, "-n", src)
        #expect(text.status == 0, "\(text.stderr)")
        #expect(text.lastLine.hasPrefix("dry run: 1 new, 1 changed, 1 unchanged files;"), "\(text.stdout)")
        #expect(try contents(repo) == before)
        // No lock left behind: prune (exclusive) runs.
        #expect(try cabackup("prune", "--repo", repo).status == 0)
        #expect(try snapshotCount(repo) == 1)
    }

    /// The JSON objects of a `--json` run's stdout; every line must be one.
    func messages(_ r: RunResult) -> [[String: Any]] {
        let lines = r.stdout.split(separator: "\n").map(String.init)
        let objects = lines.compactMap(jsonObject)
        #expect(objects.count == lines.count, "\(r.stdout)")
        return objects
    }

    @Test("--json is a stream: status, verbose_status with -v/-vv, and the summary (today's keys) last")
    func jsonStream() throws {
        let s = Scratch()
        let repo = try initRepo(s)
        let src = s.file("src")
        try write(src + "/a.txt", "aaa")
        try write(src + "/b.txt", "bbbbb")
        let first = try cabackup("snapshot", "--repo", repo, "--json", "-v", src)
        #expect(first.status == 0, "\(first.stderr)")
        let m1 = messages(first)
        let verbose = m1.filter { $0["message_type"] as? String == "verbose_status" }
        #expect(verbose.count == 2)
        #expect(
            verbose.contains {
                $0["action"] as? String == "new" && $0["item"] as? String == src + "/b.txt"
                    && $0["data_size"] as? Int == 5
            })
        let status = try #require(m1.last { $0["message_type"] as? String == "status" })
        #expect(status["percent_done"] as? Double == 1 && status["total_files"] as? Int == 2)
        #expect(status["files_done"] as? Int == 2 && status["bytes_done"] as? Int == 8)
        let summary = try #require(m1.last)
        #expect(summary["message_type"] as? String == "summary")
        for key in [
            "snapshot_id", "files_total", "dirs_total", "bytes_total", "bytes_added", "chunks_added", "files_unchanged",
            "bytes_unchanged", "errors", "duration_s",
        ] {
            #expect(summary[key] != nil, "\(key)")
        }

        try write(src + "/a.txt", "a changed")
        let v = messages(try cabackup("snapshot", "--repo", repo, "--json", "-v", src))
        let actions = v.filter { $0["message_type"] as? String == "verbose_status" }.map {
            "\($0["action"]!) \($0["item"]!)"
        }
        #expect(actions == ["changed \(src)/a.txt"])
        let vv = messages(try cabackup("snapshot", "--repo", repo, "--json", "-vv", src))
        let all = vv.filter { $0["message_type"] as? String == "verbose_status" }.map { "\($0["action"]!)" }
        #expect(all == ["unchanged", "unchanged"])
        let quiet = messages(try cabackup("snapshot", "--repo", repo, "--json", "-q", src))
        #expect(quiet.count == 1 && quiet[0]["message_type"] as? String == "summary")
    }

    @Test("--json reports an unreadable entry as an error line before the summary")
    func jsonErrors() throws {
        let s = Scratch()
        let src = s.file("src")
        try write(src + "/ok.txt", "fine")
        try write(src + "/secret.txt", "no")
        chmod(src + "/secret.txt", 0)
        var prefix: [String] = []
        if geteuid() == 0 {
            // Root reads everything: drop to nobody.
            chmod(s.path, 0o777)
            chmod(src, 0o777)
            prefix = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        }
        func cab(_ args: [String]) throws -> RunResult {
            prefix.isEmpty
                ? try run(cabackupBinary, args)
                : try run(prefix[0], Array(prefix.dropFirst()) + [cabackupBinary] + args)
        }
        #expect(try cab(["init", "--repo", s.file("repo")]).status == 0)
        let r = try cab(["snapshot", "--repo", s.file("repo"), "--json", src])
        #expect(r.status == 3, "\(r.stderr)")
        let m = messages(r)
        let error = try #require(m.first { $0["message_type"] as? String == "error" })
        #expect(error["item"] as? String == src + "/secret.txt" && error["during"] as? String == "archival")
        #expect(((error["error"] as? [String: Any])?["message"] as? String)?.contains("Permission denied") == true)
        #expect(m.last?["message_type"] as? String == "summary" && m.last?["errors"] as? Int == 1)
    }

    @Test("-v names each file read, -vv also unchanged ones; -q prints only the saved line")
    func verbosity() throws {
        let s = Scratch()
        let repo = try initRepo(s)
        let src = s.file("src")
        try write(src + "/a.txt", "aaa")
        try write(src + "/b.txt", "bbb")
        let first = try cabackup("snapshot", "--repo", repo, "-v", src)
        #expect(first.stdout.contains("new \(src)/a.txt\n") && first.stdout.contains("new \(src)/b.txt\n"))
        try write(src + "/a.txt", "a changed")
        let second = try cabackup("snapshot", "--repo", repo, "-v", src)
        #expect(second.stdout.contains("modified \(src)/a.txt\n") && !second.stdout.contains("b.txt"))
        let third = try cabackup("snapshot", "--repo", repo, "-vv", src)
        #expect(third.stdout.contains("unchanged \(src)/b.txt\n"))
        let quiet = try cabackup("snapshot", "--repo", repo, "-q", src)
        #expect(quiet.status == 0)
        let lines = quiet.stdout.split(separator: "\n")
        #expect(lines.count == 1 && lines[0].hasPrefix("snapshot ") && lines[0].hasSuffix(" saved"), "\(quiet.stdout)")
        #expect(try cabackup("snapshot", "--repo", repo, "-q", "-v", src).status == 64)
    }

    @Test("snapshot --help lists the options, --host among them")
    func helpListsOptions() throws {
        let text = try cabackup("snapshot", "--help").stdout
        for option in [
            "--files-from", "--files-from-raw", "--exclude-file", "--iexclude-file", "--one-file-system",
            "--exclude-caches", "--exclude-if-present", "--exclude-larger-than", "--stdin", "--stdin-filename",
            "--dry-run", "--host", "--verbose", "--quiet",
        ] {
            #expect(text.contains(option), "\(option)")
        }
    }
}
