import Foundation
import Testing

/// `status`, `diff` and `watch` through the built binary.
@Suite("Change detection: status, diff, watch", .serialized)
struct ChangeDetectionTests {
    /// A small tree, backed up once.
    func setUp(_ s: Scratch) throws -> String {
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src + "/dir", withIntermediateDirectories: true)
        for (name, text) in [
            ("keep.txt", "unchanged\n"), ("edit.txt", "before\n"), ("gone.txt", "bye\n"), ("chmod.txt", "mode\n"),
            ("touch.txt", "times\n"), ("sneaky.txt", "AAAA\n"), ("old-name.txt", "moved\n"), ("dir/inner.txt", "in\n"),
        ] {
            try Data(text.utf8).write(to: URL(fileURLWithPath: src + "/" + name))
        }
        #expect(try cabackup("init", "--repo", s.file("repo")).status == 0)
        #expect(try cabackup("snapshot", "--repo", s.file("repo"), src).status == 0)
        usleep(20_000)  // so ctime moves past the snapshot's on coarse-clock file systems
        return src
    }

    func paths(_ obj: [String: Any], _ key: String) -> [String] {
        ((obj[key] as? [[String: Any]]) ?? []).compactMap { $0["path"] as? String }.sorted()
    }

    @Test("status reports exactly the changed entries, by kind, and --exit-code gives 4")
    func status() throws {
        let s = Scratch()
        let src = try setUp(s)
        let clean = try cabackup("status", "--repo", s.file("repo"), "--json", "--exit-code", src)
        #expect(clean.status == 0, "\(clean.stdout)\(clean.stderr)")
        let none = try #require(jsonObject(clean.lastLine))
        #expect(paths(none, "added").isEmpty && paths(none, "modified").isEmpty && paths(none, "removed").isEmpty)

        try Data("after, longer\n".utf8).write(to: URL(fileURLWithPath: src + "/edit.txt"))
        try FileManager.default.removeItem(atPath: src + "/gone.txt")
        chmod(src + "/chmod.txt", 0o600)
        var times = [timespec(tv_sec: 1_000_000_000, tv_nsec: 5), timespec(tv_sec: 1_000_000_000, tv_nsec: 5)]
        utimensat(AT_FDCWD, src + "/touch.txt", &times, 0)
        // Same size, new bytes, mtime put back (as `touch -r` would): only ctime tells.
        var st = stat()
        stat(src + "/sneaky.txt", &st)
        let fd = open(src + "/sneaky.txt", O_WRONLY)
        _ = write(fd, "BBBB", 4)
        close(fd)
        var back = [st.st_atim, st.st_mtim]
        utimensat(AT_FDCWD, src + "/sneaky.txt", &back, 0)
        rename(src + "/old-name.txt", src + "/new-name.txt")
        try Data("new\n".utf8).write(to: URL(fileURLWithPath: src + "/dir/added.txt"))

        let r = try cabackup("status", "--repo", s.file("repo"), "--json", "--exit-code", src)
        #expect(r.status == 4)
        let c = try #require(jsonObject(r.lastLine))
        #expect(paths(c, "added") == [src + "/dir/added.txt", src + "/new-name.txt"])
        #expect(paths(c, "removed") == [src + "/gone.txt", src + "/old-name.txt"])
        #expect(paths(c, "modified") == [src + "/edit.txt", src + "/sneaky.txt"])
        #expect(paths(c, "metadata_only") == [src + "/chmod.txt", src + "/touch.txt"])
        #expect(c["files_to_sync"] as? Int == 4)
        #expect(c["bytes_to_sync"] as? Int == 14 + 5 + 4 + 6)
        let text = try cabackup("status", "--repo", s.file("repo"), src)
        #expect(text.status == 0)
        #expect(text.stdout.contains("M \(src)/sneaky.txt\n"))
        #expect(text.lastLine.hasPrefix("2 added, 2 removed, 2 modified, 2 metadata-only"))
    }

    @Test("diff between two snapshots lists what changed")
    func diff() throws {
        let s = Scratch()
        let src = try setUp(s)
        try Data("after, longer\n".utf8).write(to: URL(fileURLWithPath: src + "/edit.txt"))
        try FileManager.default.removeItem(atPath: src + "/gone.txt")
        chmod(src + "/chmod.txt", 0o600)
        try FileManager.default.createDirectory(atPath: src + "/newdir", withIntermediateDirectories: true)
        try Data("x".utf8).write(to: URL(fileURLWithPath: src + "/newdir/x"))
        #expect(try cabackup("snapshot", "--repo", s.file("repo"), src).status == 0)
        let list = try cabackup("snapshots", "--repo", s.file("repo"), "--json")
        let ids = try #require(try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [[String: Any]])
            .compactMap { $0["id"] as? String }
        let r = try cabackup("diff", "--repo", s.file("repo"), "--json", ids[0], ids[1])
        #expect(r.status == 0, "\(r.stderr)")
        let c = try #require(jsonObject(r.lastLine))
        #expect(paths(c, "added") == [src + "/newdir", src + "/newdir/x"])
        #expect(paths(c, "removed") == [src + "/gone.txt"])
        #expect(paths(c, "modified") == [src + "/edit.txt"])
        #expect(paths(c, "metadata_only") == [src + "/chmod.txt"])
        let same = try cabackup("diff", "--repo", s.file("repo"), ids[1], "latest")
        #expect(same.lastLine.hasPrefix("0 added, 0 removed, 0 modified, 0 metadata-only"))
        // Between two snapshots nothing is synced: the summary says what differs.
        let text = try cabackup("diff", "--repo", s.file("repo"), ids[0], ids[1])
        #expect(text.lastLine == "2 added, 1 removed, 1 modified, 1 metadata-only; 2 files new or changed (15 B)")
        #expect(!text.stdout.contains("to sync"))
    }

    @Test("status without an earlier snapshot of the paths says why everything is added")
    func statusWithoutParent() throws {
        let s = Scratch()
        _ = try setUp(s)
        let other = s.file("other")
        try FileManager.default.createDirectory(atPath: other, withIntermediateDirectories: true)
        try Data("new\n".utf8).write(to: URL(fileURLWithPath: other + "/a.txt"))
        let note = "no earlier snapshot of these paths from this host; everything would be stored"
        let r = try cabackup("status", "--repo", s.file("repo"), other)
        #expect(r.status == 0)
        #expect(r.stdout.contains("+ \(other)/a.txt\n\(note)\n"), "\(r.stdout)")
        #expect(r.lastLine.hasPrefix("2 added, 0 removed"))
        let host = try cabackup("status", "--repo", s.file("repo"), "--host", "elsewhere", other)
        #expect(host.stdout.contains("from host elsewhere; everything would be stored"))
        // JSON stays one object (its null base says the same); a path with a parent has no note.
        let json = try cabackup("status", "--repo", s.file("repo"), "--json", other)
        #expect(jsonObject(json.stdout.trimmingCharacters(in: .newlines))?["base"] is NSNull)
        #expect(!(try cabackup("status", "--repo", s.file("repo"), s.file("src")).stdout.contains(note)))
    }

    func snapshotCount(_ s: Scratch) throws -> Int {
        try FileManager.default.contentsOfDirectory(atPath: s.file("repo/snapshots")).filter { $0.count == 64 }.count
    }

    @Test("watch --once: nothing changed, no snapshot; no terminal, no sync; --yes syncs only the change")
    func watchOnce() throws {
        let s = Scratch()
        let src = try setUp(s)
        let quiet = try cabackup("watch", "--repo", s.file("repo"), "--once", src)
        #expect(quiet.status == 0)
        #expect(quiet.stdout.contains("no changes"))
        #expect(try snapshotCount(s) == 1)
        try Data("after, longer\n".utf8).write(to: URL(fileURLWithPath: src + "/edit.txt"))
        let asked = try cabackup("watch", "--repo", s.file("repo"), "--once", src)
        #expect(asked.stdout.contains("not syncing"))
        #expect(try snapshotCount(s) == 1)
        let synced = try cabackup("watch", "--repo", s.file("repo"), "--once", "--yes", src)
        #expect(synced.status == 0, "\(synced.stderr)")
        #expect(synced.stdout.contains("1 files read"))
        #expect(try snapshotCount(s) == 2)
        // The new snapshot is complete: restoring it gives the whole tree.
        _ = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(FileManager.default.contents(atPath: s.file("out") + src + "/keep.txt") == Data("unchanged\n".utf8))
        #expect(FileManager.default.contents(atPath: s.file("out") + src + "/edit.txt") == Data("after, longer\n".utf8))
    }

    @Test("watch without PATHs watches every repository of the device configuration, with its paths and excludes")
    func watchConfiguration() throws {
        let s = Scratch()
        let src = try setUp(s)
        let other = s.file("other")
        try FileManager.default.createDirectory(atPath: other, withIntermediateDirectories: true)
        try Data("elsewhere\n".utf8).write(to: URL(fileURLWithPath: other + "/b.txt"))
        #expect(try cabackup("init", "--repo", s.file("repo2")).status == 0)
        let env = ["XDG_CONFIG_HOME": s.file("xdg")]
        func write(_ config: String, to path: String) throws {
            try FileManager.default.createDirectory(
                atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try Data(config.utf8).write(to: URL(fileURLWithPath: path))
        }
        let config = """
            {"version": 1, "repositories": [
              {"name": "docs", "repo": "\(s.file("repo"))", "paths": ["\(src)"], "exclude": ["*.tmp"], "every": "1s"},
              {"name": "other", "repo": "\(s.file("repo2"))", "paths": ["\(other)"], "every": "1h"}]}
            """
        try write(config, to: s.file("device.json"))
        // A change in docs' paths, and a file its excludes leave out; other has no snapshot yet.
        try Data("after, longer\n".utf8).write(to: URL(fileURLWithPath: src + "/edit.txt"))
        try Data("scratch\n".utf8).write(to: URL(fileURLWithPath: src + "/junk.tmp"))
        let synced = try cabackup("watch", "--config", s.file("device.json"), "--once", "--yes", env: env)
        #expect(synced.status == 0, "\(synced.stdout)\(synced.stderr)")
        let saved = synced.stdout.split(separator: "\n").filter { $0.contains(" saved: ") }
        #expect(saved.contains { $0.hasPrefix("[docs] snapshot") && $0.contains(" 1 files read") }, "\(synced.stdout)")
        #expect(saved.contains { $0.hasPrefix("[other] snapshot") }, "\(synced.stdout)")
        #expect(try snapshotCount(s) == 2)
        let listed = try cabackup("ls", "--repo", s.file("repo"), "latest", src)
        #expect(listed.stdout.contains("edit.txt") && !listed.stdout.contains("junk.tmp"), "\(listed.stdout)")
        let otherListed = try cabackup("ls", "--repo", s.file("repo2"), "latest", other)
        #expect(otherListed.stdout.contains("b.txt"), "\(otherListed.stdout)\(otherListed.stderr)")

        // The default file, in the config directory: nothing changed since.
        try write(config, to: s.file("xdg/cabackup/device.json"))
        let quiet = try cabackup("watch", "--once", env: env)
        #expect(quiet.status == 0, "\(quiet.stderr)")
        #expect(quiet.stdout.contains("[docs] no changes") && quiet.stdout.contains("[other] no changes"))

        // Each repository is checked at its own `every`: docs every second, other once.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: cabackupBinary)
        p.arguments = ["watch", "--yes"]
        p.environment = childEnvironment(env)
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        Thread.sleep(forTimeInterval: 4)
        p.terminate()
        p.waitUntilExit()
        let lines = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let docsChecks = lines.components(separatedBy: "[docs] no changes").count - 1
        let otherChecks = lines.components(separatedBy: "[other] no changes").count - 1
        #expect(docsChecks >= 2 && otherChecks == 1, "\(lines)")

        // PATHs and --config together, --repo without PATHs, or an empty configuration: refused.
        #expect(try cabackup("watch", "--config", s.file("device.json"), "--once", src, env: env).status != 0)
        #expect(try cabackup("watch", "--repo", s.file("repo"), "--once", env: env).status != 0)
        try write(#"{"version": 1, "repositories": []}"#, to: s.file("empty.json"))
        let empty = try cabackup("watch", "--config", s.file("empty.json"), "--once", env: env)
        #expect(empty.status != 0 && empty.stderr.contains("configures no repository"), "\(empty.stderr)")
    }

    @Test("watch --once on a terminal asks, and 'y' syncs")
    func watchPrompt() throws {
        let s = Scratch()
        let src = try setUp(s)
        try Data("after, longer\n".utf8).write(to: URL(fileURLWithPath: src + "/edit.txt"))
        // Python's pty gives the child a real terminal; we answer the prompt through it.
        let script = """
            import os, pty, sys
            pid, fd = pty.fork()
            if pid == 0:
                os.execv(sys.argv[1], sys.argv[1:])
            out = b""
            while b"[y/N]" not in out:
                out += os.read(fd, 1024)
            os.write(fd, b"y\\n")
            try:
                while True:
                    chunk = os.read(fd, 1024)
                    if not chunk:
                        break
                    out += chunk
            except OSError:
                pass
            _, status = os.waitpid(pid, 0)
            sys.stdout.write(out.decode(errors="replace"))
            sys.exit(os.waitstatus_to_exitcode(status))
            """
        let r = try run(
            "/usr/bin/env",
            [
                "python3", "-c", script, cabackupBinary, "watch", "--repo", s.file("repo"), "--once",
                src,
            ])
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("Sync 1 changed files (14 B) now? [y/N]"))
        #expect(r.stdout.contains("snapshot "))
        #expect(try snapshotCount(s) == 2)
    }

    // 3 MiB is read in windows on the walking thread; 100 kB whole by a worker.
    @Test("a file modified while being read is reported and not stored half old", arguments: [3 << 20, 100_000])
    func modifiedDuringRead(size: Int) throws {
        try #require(binaryHasTestHooks, "needs a debug build of cabackup (CABACKUP_TEST_MODIFY_DURING_READ)")
        let s = Scratch()
        try FileManager.default.createDirectory(atPath: s.file("src"), withIntermediateDirectories: true)
        try Data(repeating: 7, count: size).write(to: URL(fileURLWithPath: s.file("src/growing.bin")))
        try Data("steady".utf8).write(to: URL(fileURLWithPath: s.file("src/steady.txt")))
        _ = try cabackup("init", "--repo", s.file("repo"))
        let r = try cabackup(
            "snapshot", "--repo", s.file("repo"), s.file("src"),
            env: ["CABACKUP_TEST_MODIFY_DURING_READ": "growing.bin"])
        #expect(r.status == 3, "\(r.stderr)")
        #expect(r.stderr.contains("growing.bin: changed while being read"))
        let ls = try cabackup("ls", "--repo", s.file("repo"), "latest")
        #expect(ls.stdout.contains("steady.txt"))
        #expect(!ls.stdout.contains("growing.bin"))
        // Without interference the next run stores it.
        #expect(try cabackup("snapshot", "--repo", s.file("repo"), s.file("src")).status == 0)
        #expect(try cabackup("ls", "--repo", s.file("repo"), "latest").stdout.contains("growing.bin"))
    }
}
