import Foundation
import Testing

/// `cabackup mount`: the repository's snapshots as a read-only FUSE file system (issue 24).
/// Runs as root in CI, where /dev/fuse is there; without it the test fails, never skips.
@Suite("mount: every snapshot as a read-only file system")
struct MountTests {
    /// A running `cabackup mount`, its output in files.
    private struct Mounted {
        let process: Process
        let stdout: String
        let stderr: String
        let point: String

        func output() -> (out: String, err: String) {
            (
                (try? String(contentsOfFile: stdout, encoding: .utf8)) ?? "",
                (try? String(contentsOfFile: stderr, encoding: .utf8)) ?? ""
            )
        }

        func waitForExit(seconds: Double = 30) -> Int32? {
            let end = Date().addingTimeInterval(seconds)
            while process.isRunning && Date() < end { usleep(50_000) }
            return process.isRunning ? nil : process.terminationStatus
        }

        /// Whether the kernel lists the mount point as mounted.
        var isMounted: Bool {
            let mounts = (try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? ""
            return mounts.split(separator: "\n").contains {
                $0.split(separator: " ").dropFirst().first == Substring(point)
            }
        }

        /// Stops the server whatever state a failed test left it in.
        func cleanUp() {
            if process.isRunning { process.interrupt() }
            if waitForExit(seconds: 10) == nil { kill(process.processIdentifier, SIGKILL) }
            if isMounted { _ = try? run("/bin/umount", ["-l", point]) }
        }
    }

    private func mount(_ repo: String, at point: String, in s: Scratch, _ extra: [String] = []) throws -> Mounted {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: cabackupBinary)
        p.arguments = ["mount", "--repo", repo] + extra + [point]
        p.environment = childEnvironment([:])
        let n = UUID().uuidString
        let out = s.file("mount-\(n).out")
        let err = s.file("mount-\(n).err")
        _ = FileManager.default.createFile(atPath: out, contents: nil)
        _ = FileManager.default.createFile(atPath: err, contents: nil)
        p.standardOutput = FileHandle(forWritingAtPath: out)
        p.standardError = FileHandle(forWritingAtPath: err)
        try p.run()
        let m = Mounted(process: p, stdout: out, stderr: err, point: point)
        // Served once the kernel lists it and the first listing answers.
        let end = Date().addingTimeInterval(60)
        while Date() < end, p.isRunning {
            if m.isMounted, (try? FileManager.default.contentsOfDirectory(atPath: point + "/snapshots")) != nil {
                break
            }
            usleep(50_000)
        }
        return m
    }

    private func listing(_ path: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted()
    }

    @Test(
        "mount shows snapshots by time, id, host and tag, reads them byte for byte, sees a new one, reports damage, unmounts on Ctrl-C and umount"
    )
    func mountReadsSnapshots() throws {
        #expect(FileManager.default.fileExists(atPath: "/dev/fuse"), "this test needs /dev/fuse (FUSE in the kernel)")
        let s = Scratch()
        let src = s.file("src")
        #expect(try python(treetool, "make", src).status == 0)
        let note = try python(
            "-c", "import os,sys; os.setxattr(sys.argv[1], 'user.note', b'kept by mount')", src + "/docs/hello.txt")
        #expect(note.status == 0, "\(note.stderr)")
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, "--host", "laptop", "--tag", "daily", src).status == 0)
        try Data("added later\n".utf8).write(to: URL(fileURLWithPath: src + "/added.txt"))
        #expect(try cabackup("snapshot", "--repo", repo, "--host", "desk", src).status == 0)
        let list = try cabackup("snapshots", "--repo", repo, "--json")
        let ids = ((try? JSONSerialization.jsonObject(with: Data(list.stdout.utf8))) as? [[String: Any]] ?? [])
            .compactMap { $0["short_id"] as? String ?? ($0["id"] as? String).map { String($0.prefix(8)) } }
        #expect(ids.count == 2)

        // Bad mount points: one line, nothing mounted.
        let file = try cabackup("mount", "--repo", repo, src + "/docs/hello.txt")
        #expect(file.status == 64 && file.stderr.contains("is not a directory"), "\(file.stderr)")

        let point = s.file("mnt")
        try FileManager.default.createDirectory(atPath: point, withIntermediateDirectories: false)
        let m = try mount(repo, at: point, in: s)
        defer { m.cleanUp() }
        try #require(m.isMounted, "not mounted: \(m.output())")
        #expect(m.output().out.contains("Now serving the repository at \(point)"))

        // The layout.
        #expect(listing(point) == ["hosts", "ids", "snapshots", "tags"])
        let times = listing(point + "/snapshots")
        #expect(times.count == 3 && times.contains("latest"), "\(times)")
        let newest = times.filter { $0 != "latest" }.sorted().last ?? ""
        #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: point + "/snapshots/latest")) == newest)
        #expect(listing(point + "/ids") == ids.sorted())
        #expect(listing(point + "/hosts") == ["desk", "laptop"])
        #expect(listing(point + "/tags") == ["daily"])
        #expect(listing(point + "/tags/daily").count == 2)

        // The newest snapshot is the source as it is now; the tagged one lacks the later file.
        let cmp = try python(treetool, "compare-view", src, point + "/snapshots/latest" + src)
        #expect(cmp.status == 0, "\(cmp.stdout)\(cmp.stderr)")
        #expect(FileManager.default.fileExists(atPath: point + "/tags/daily/latest" + src + "/docs/hello.txt"))
        #expect(!FileManager.default.fileExists(atPath: point + "/tags/daily/latest" + src + "/added.txt"))
        #expect(FileManager.default.fileExists(atPath: point + "/ids/" + (ids.first ?? "") + src + "/docs/hello.txt"))
        // Read-only.
        let write = try python("-c", "open(__import__('sys').argv[1], 'w')", point + "/snapshots/latest" + src + "/new")
        #expect(write.status != 0 && write.stderr.contains("Read-only file system"), "\(write.stderr)")

        // A snapshot taken while mounted appears (the list is read again within seconds).
        var random = [UInt8](repeating: 0, count: 2 << 20)
        for i in random.indices { random[i] = UInt8.random(in: 0...255) }
        try Data(random).write(to: URL(fileURLWithPath: src + "/untouched.bin"))
        let marker = Date()
        #expect(try cabackup("snapshot", "--repo", repo, "--tag", "later", src).status == 0)
        let end = Date().addingTimeInterval(30)
        while Date() < end, !FileManager.default.fileExists(atPath: point + "/tags/later") { usleep(200_000) }
        let later = point + "/tags/later/latest" + src
        #expect(listing(later).contains("untouched.bin"))

        // Damage every pack that snapshot wrote: the unread file reads as an I/O error,
        // the mount says why and goes on serving.
        let data = s.file("repo/data")
        for case let rel as String in FileManager.default.enumerator(atPath: data)! {
            let path = data + "/" + rel
            guard let attrs = try? FileManager.default.attributesOfItem(atPath: path),
                attrs[.type] as? FileAttributeType == .typeRegular,
                let modified = attrs[.modificationDate] as? Date, modified >= marker.addingTimeInterval(-1),
                let fh = FileHandle(forUpdatingAtPath: path)
            else { continue }
            let size = (attrs[.size] as? Int) ?? 0
            var offset = 16
            while offset < size {
                try fh.seek(toOffset: UInt64(offset))
                let byte = try fh.read(upToCount: 1) ?? Data([0])
                try fh.seek(toOffset: UInt64(offset))
                try fh.write(contentsOf: Data([byte[0] ^ 0xFF]))
                offset += 4096
            }
            try fh.close()
        }
        let damaged = try python(
            "-c", "import sys; open(sys.argv[1], 'rb').read()", later + "/untouched.bin")
        #expect(damaged.status != 0 && damaged.stderr.contains("Input/output error"), "\(damaged.stderr)")
        #expect(m.output().err.contains("cannot read"), "\(m.output().err)")
        #expect(listing(point + "/hosts").count == 3)

        // Ctrl-C unmounts and ends the command with 0.
        m.process.interrupt()
        #expect(m.waitForExit() == 0, "\(m.output())")
        #expect(!m.isMounted)
        #expect(m.output().out.contains("unmounted"))

        // So does umount from outside.
        let again = try mount(repo, at: point, in: s, ["--host", "laptop"])
        defer { again.cleanUp() }
        try #require(again.isMounted, "not mounted: \(again.output())")
        #expect(listing(point + "/hosts") == ["laptop"])
        #expect(try run("/bin/umount", [point]).status == 0)
        #expect(again.waitForExit() == 0, "\(again.output())")

        // A mount whose process was killed leaves a dead mount point: a new mount there
        // says how to clear it.
        let killed = try mount(repo, at: point, in: s)
        defer { killed.cleanUp() }
        try #require(killed.isMounted, "not mounted: \(killed.output())")
        kill(killed.process.processIdentifier, SIGKILL)
        _ = killed.waitForExit()
        let dead = try mount(repo, at: point, in: s)
        defer { dead.cleanUp() }
        #expect(dead.waitForExit() == 1, "\(dead.output())")
        #expect(dead.output().err.contains("fusermount3 -u"), "\(dead.output())")
        #expect(try run("/bin/umount", ["-l", point]).status == 0)
        #expect(!killed.isMounted)
        // Nor does a live mount get another one on top.
        let live = try mount(repo, at: point, in: s)
        defer { live.cleanUp() }
        try #require(live.isMounted, "not mounted: \(live.output())")
        let onTop = try mount(repo, at: point, in: s)
        defer { onTop.cleanUp() }
        #expect(onTop.waitForExit() == 1, "\(onTop.output())")
        #expect(onTop.output().err.contains("already a FUSE mount"), "\(onTop.output())")
        live.process.interrupt()
        #expect(live.waitForExit() == 0 && !live.isMounted, "\(live.output())")
    }
}
