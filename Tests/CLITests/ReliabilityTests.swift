import Foundation
import Testing

/// `check`, damage, and interrupted snapshots, through the built binary.
@Suite("Reliability: check, damage, interrupted snapshots", .serialized)
struct ReliabilityTests {
    /// A tree with several packs' worth of incompressible data plus small files.
    func makeSource(_ s: Scratch, megabytes: Int = 40) throws -> String {
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src + "/docs", withIntermediateDirectories: true)
        let random = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: megabytes << 20))
        try random.write(to: URL(fileURLWithPath: src + "/big.bin"))
        for i in 0..<20 {
            try Data("document \(i)\n".utf8).write(to: URL(fileURLWithPath: src + "/docs/d\(i).txt"))
        }
        return src
    }

    func packFiles(_ repo: String) throws -> [String] {
        let data = repo + "/data"
        return try FileManager.default.contentsOfDirectory(atPath: data).flatMap { sub in
            try FileManager.default.contentsOfDirectory(atPath: data + "/" + sub).map { data + "/" + sub + "/" + $0 }
        }.sorted()
    }

    /// The pack holding the first chunk of `path` in the latest snapshot, and that chunk's offset.
    func packOfFirstChunk(_ s: Scratch, path: String) throws -> (pack: String, offset: Int) {
        let db = s.file("repo/index/index.sqlite")
        let ls = try cabackup("ls", "--repo", s.file("repo"), "--json", "latest", path)
        _ = ls
        // Read the chunk list through the index: the largest data blob belongs to big.bin.
        let q = try run(
            "/usr/bin/env",
            [
                "python3", "-c",
                """
                import sqlite3, sys
                c = sqlite3.connect(sys.argv[1])
                row = c.execute("select hex(p.id), b.offset from blobs b join packs p on p.n = b.pack "
                                "where b.type = 0 order by b.length desc limit 1").fetchone()
                print(row[0].lower(), row[1])
                """, db,
            ])
        let parts = q.stdout.split(separator: " ")
        let pack = String(parts[0])
        return (
            s.file("repo/data/\(pack.prefix(2))/\(pack)"),
            Int(parts[1].trimmingCharacters(in: .whitespacesAndNewlines))!
        )
    }

    @Test("check passes on a sound repository, with and without --read-data")
    func clean() throws {
        let s = Scratch()
        let src = try makeSource(s, megabytes: 4)
        _ = try cabackup("init", "--repo", s.file("repo"))
        _ = try cabackup("snapshot", "--repo", s.file("repo"), src)
        for args in [[], ["--read-data"], ["--read-data-subset", "50%"]] {
            let r = try run(cabackupBinary, ["check", "--repo", s.file("repo")] + args)
            #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
            #expect(r.lastLine == "no errors were found")
        }
    }

    @Test("check --read-data-subset reads exactly the packs whose first id byte falls under the share")
    func readDataSubset() throws {
        let s = Scratch()
        _ = try cabackup("init", "--repo", s.file("repo"))
        // Several packs: 40 MiB of random data at the default 16 MiB pack size, plus trees.
        try FileManager.default.createDirectory(atPath: s.file("src"), withIntermediateDirectories: true)
        for i in 0..<5 {
            let bytes = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: 8 << 20))
            try bytes.write(to: URL(fileURLWithPath: s.file("src/\(i).bin")))
        }
        #expect(try cabackup("snapshot", "--repo", s.file("repo"), s.file("src")).status == 0)
        let firstBytes = try FileManager.default.subpathsOfDirectory(atPath: s.file("repo/data"))
            .compactMap { $0.split(separator: "/").last }.filter { $0.count == 64 }
            .compactMap { Int($0.prefix(2), radix: 16) }
        #expect(firstBytes.count >= 3)
        for percent in [1, 10, 50, 100] {
            let expected = firstBytes.filter { Double($0) / 256 < Double(percent) / 100 }.count
            let r = try cabackup("check", "--repo", s.file("repo"), "--read-data-subset", "\(percent)%")
            #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
            let read = expected == 0 ? "trees\n" : "read \(expected) packs"
            #expect(r.stdout.contains(read), "\(percent)%: expected \(expected) of \(firstBytes.count): \(r.stdout)")
        }
    }

    @Test("one flipped byte: check --read-data names the snapshot and file; restore fails loudly")
    func flippedByte() throws {
        let s = Scratch()
        let src = try makeSource(s, megabytes: 4)
        _ = try cabackup("init", "--repo", s.file("repo"))
        _ = try cabackup("snapshot", "--repo", s.file("repo"), src)
        let (pack, offset) = try packOfFirstChunk(s, path: src + "/big.bin")
        let h = try #require(FileHandle(forUpdatingAtPath: pack))
        try h.seek(toOffset: UInt64(offset + 100))
        let byte = try #require(try h.read(upToCount: 1))
        try h.seek(toOffset: UInt64(offset + 100))
        try h.write(contentsOf: Data([byte[0] ^ 0x40]))
        try h.close()
        let r = try cabackup("check", "--repo", s.file("repo"), "--read-data")
        #expect(r.status == 1)
        #expect(r.stdout.contains("is damaged"))
        #expect(r.stdout.contains(src + "/big.bin"))
        #expect(r.stdout.contains("does not match its name"))
        let restore = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(restore.status == 1)
        #expect(restore.stderr.contains("big.bin"))
        #expect(!FileManager.default.fileExists(atPath: s.file("out") + src + "/big.bin"))
        #expect(FileManager.default.fileExists(atPath: s.file("out") + src + "/docs/d3.txt"))
    }

    @Test("a truncated pack or a deleted pack is reported with the paths it affects")
    func truncatedAndDeleted() throws {
        let s = Scratch()
        let src = try makeSource(s, megabytes: 4)
        _ = try cabackup("init", "--repo", s.file("repo"))
        _ = try cabackup("snapshot", "--repo", s.file("repo"), src)
        let (pack, _) = try packOfFirstChunk(s, path: src + "/big.bin")
        #expect(truncate(pack, 1000) == 0)
        let truncated = try cabackup("check", "--repo", s.file("repo"))
        #expect(truncated.status == 1)
        #expect(truncated.stdout.contains("pack "))
        #expect(truncated.stdout.contains(src + "/big.bin"))
        try FileManager.default.removeItem(atPath: pack)
        let deleted = try cabackup("check", "--repo", s.file("repo"))
        #expect(deleted.status == 1)
        #expect(deleted.stdout.contains("is missing from the repository"))
        #expect(deleted.stdout.contains(src + "/big.bin"))
    }

    @Test("killed after every pack write: check passes, earlier snapshots restore, the rerun completes")
    func interruptedAtEveryWrite() throws {
        try #require(binaryHasTestHooks, "needs a debug build of cabackup (CABACKUP_FAIL_AFTER_WRITES)")
        let s = Scratch()
        let src = try makeSource(s, megabytes: 4)
        _ = try cabackup("init", "--repo", s.file("repo"))
        #expect(try cabackup("snapshot", "--repo", s.file("repo"), src).status == 0)
        let baseline = FileManager.default.contents(atPath: src + "/big.bin")
        // A second, larger change: ~40 MiB of new data is three data packs and a tree pack.
        let more = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: 40 << 20))
        try more.write(to: URL(fileURLWithPath: src + "/more.bin"))
        var n = 0
        while true {
            let r = try cabackup(
                "snapshot", "--repo", s.file("repo"), src, env: ["CABACKUP_FAIL_AFTER_WRITES": String(n)])
            if r.status == 0 { break }
            #expect(r.status == 137, "\(r.stderr)")
            let check = try cabackup("check", "--repo", s.file("repo"), "--read-data")
            #expect(check.status == 0, "after \(n) writes: \(check.stdout)")
            let out = s.file("out-\(n)")
            let earlier = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", out)
            #expect(earlier.status == 0)
            #expect(FileManager.default.contents(atPath: out + src + "/big.bin") == baseline)
            try FileManager.default.removeItem(atPath: out)
            let list = try cabackup("snapshots", "--repo", s.file("repo"), "--json")
            #expect((try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [Any])?.count == 1)
            n += 1
            #expect(n < 20)
            if n >= 20 { break }
        }
        #expect(n >= 3, "expected several pack writes, saw \(n)")
        // Nothing stored twice: the packs hold about one copy of the ~44 MiB of random data.
        let packBytes = try repoBytes(s)
        #expect(packBytes < (44 << 20) + (2 << 20), "packs: \(packBytes) bytes")
        // Packs written before each kill were kept and reused: the completed run after the
        // last kill stored little new data.
        let r = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(FileManager.default.contents(atPath: s.file("out") + src + "/more.bin") == more)
        #expect(try cabackup("check", "--repo", s.file("repo"), "--read-data").status == 0)
    }

    @Test("two snapshots into one repository at the same time both succeed")
    func concurrentSnapshots() throws {
        let s = Scratch()
        let a = try makeSource(s, megabytes: 12)
        let b = s.file("other")
        try FileManager.default.createDirectory(atPath: b, withIntermediateDirectories: true)
        let data = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: 12 << 20))
        try data.write(to: URL(fileURLWithPath: b + "/other.bin"))
        _ = try cabackup("init", "--repo", s.file("repo"))
        let pa = try startCabackup("snapshot", "--repo", s.file("repo"), a)
        let pb = try startCabackup("snapshot", "--repo", s.file("repo"), b)
        pa.waitUntilExit()
        pb.waitUntilExit()
        #expect(pa.terminationStatus == 0 && pb.terminationStatus == 0)
        #expect(try cabackup("check", "--repo", s.file("repo"), "--read-data").status == 0)
        let r = try cabackup("restore", "--repo", s.file("repo"), "latest", "--path", b, "--target", s.file("out"))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(FileManager.default.contents(atPath: s.file("out") + b + "/other.bin") == data)
    }

    @Test("20 seeded SIGKILLs at random moments: check passes after each, the last run restores identical")
    func seededKills() throws {
        let s = Scratch()
        let src = try makeSource(s, megabytes: 24)
        _ = try cabackup("init", "--repo", s.file("repo"))
        // An earlier snapshot that must survive every kill.
        #expect(try cabackup("snapshot", "--repo", s.file("repo"), "--tag", "baseline", src).status == 0)
        let baseline = FileManager.default.contents(atPath: src + "/big.bin")
        var rng = SplitMix(seed: 20_261_125)
        var killed = 0
        for round in 0..<20 {
            // Fresh content each round, so every run has packs to write when it is killed.
            let chunk = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: 2 << 20))
            try chunk.write(to: URL(fileURLWithPath: src + "/round-\(round).bin"))
            // --force: every run reads everything, so the kill lands mid-run.
            let p = try startCabackup("snapshot", "--repo", s.file("repo"), "--force", src)
            usleep(UInt32(rng.next() % 150_000))
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            if p.terminationReason == .uncaughtSignal { killed += 1 }
            let check = try cabackup("check", "--repo", s.file("repo"))
            #expect(check.status == 0, "round \(round): \(check.stdout)")
            let out = s.file("out-\(round)")
            let earlier = try cabackup(
                "restore", "--repo", s.file("repo"), "latest", "--tag", "baseline", "--include", src + "/big.bin",
                "--target", out)
            #expect(earlier.status == 0)
            #expect(FileManager.default.contents(atPath: out + src + "/big.bin") == baseline)
            try? FileManager.default.removeItem(atPath: out)
        }
        #expect(killed >= 15, "only \(killed) of 20 runs were still running when killed")
        #expect(try cabackup("snapshot", "--repo", s.file("repo"), src).status == 0)
        #expect(try cabackup("check", "--repo", s.file("repo"), "--read-data").status == 0)
        _ = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        let cmp = try python(treetool, "compare", src, s.file("out") + src)
        #expect(cmp.status == 0, "\(cmp.stdout)")
    }

    func snapshotIDs(_ s: Scratch) throws -> [String] {
        let list = try cabackup("snapshots", "--repo", s.file("repo"), "--json")
        return try #require(try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [[String: Any]])
            .compactMap { $0["id"] as? String }
    }

    func repoBytes(_ s: Scratch) throws -> Int {
        try packFiles(s.file("repo")).reduce(0) {
            $0 + ((try FileManager.default.attributesOfItem(atPath: $1)[.size] as? Int) ?? 0)
        }
    }

    @Test("forget + prune frees the data only forgotten snapshots used; the rest restores, check passes")
    func forgetAndPrune() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src, withIntermediateDirectories: true)
        _ = try cabackup("init", "--repo", s.file("repo"))
        var last = Data()
        for round in 0..<3 {
            if round > 0 { try FileManager.default.removeItem(atPath: src + "/r\(round - 1).bin") }
            last = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: 20 << 20))
            try last.write(to: URL(fileURLWithPath: src + "/r\(round).bin"))
            #expect(try cabackup("snapshot", "--repo", s.file("repo"), src).status == 0)
        }
        let ids = try snapshotIDs(s)
        #expect(ids.count == 3)
        let before = try repoBytes(s)
        let dry = try cabackup("forget", "--repo", s.file("repo"), "--keep-last", "1", "--prune", "--dry-run")
        #expect(dry.status == 0, "\(dry.stderr)")
        #expect(try snapshotIDs(s) == ids)
        #expect(try repoBytes(s) == before)
        let r = try cabackup("forget", "--repo", s.file("repo"), "--keep-last", "1", "--prune")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try snapshotIDs(s) == [ids[2]])
        #expect(try repoBytes(s) < before - (30 << 20))
        #expect(try cabackup("check", "--repo", s.file("repo"), "--read-data").status == 0)
        _ = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(FileManager.default.contents(atPath: s.file("out") + src + "/r2.bin") == last)
    }

    @Test("Ctrl-C says what was kept and removes its temporary files; a killed writer's go later, a live one's stay")
    func interruptCleansUp() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src, withIntermediateDirectories: true)
        // 80 MiB of new data (at least two packs stored: each worker fills its own pack, so
        // up to 32 MiB may stay open), then 1 TiB of holes that take minutes to read and add
        // nothing: the run is still going when it is stopped, however the chunks fall.
        let bytes = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: 80 << 20))
        try bytes.write(to: URL(fileURLWithPath: src + "/0.bin"))
        _ = FileManager.default.createFile(atPath: src + "/1.bin", contents: nil)
        #expect(truncate(src + "/1.bin", 1 << 40) == 0)
        _ = try cabackup("init", "--repo", s.file("repo"))
        let tmp = s.file("repo/tmp")
        func tmpFiles() throws -> [String] { try FileManager.default.contentsOfDirectory(atPath: tmp).sorted() }
        func packCount() throws -> Int {
            try FileManager.default.subpathsOfDirectory(atPath: s.file("repo/data")).filter { $0.count == 67 }.count
        }
        // A killed writer's leftover, and the file of a writer still running (its lock held).
        _ = FileManager.default.createFile(atPath: tmp + "/pack-1-1.tmp", contents: Data("stale".utf8))
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        holder.arguments = [
            "python3", "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'w'); fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(900)",
            tmp + "/pack-2-2.tmp",
        ]
        let holderOut = Pipe()
        holder.standardOutput = holderOut
        holder.standardError = FileHandle.nullDevice
        try holder.run()
        // SIGKILL: a child started from a test thread may have SIGTERM blocked.
        defer { kill(holder.processIdentifier, SIGKILL) }
        _ = holderOut.fileHandleForReading.availableData  // "locked"

        /// Starts a snapshot, and returns once it is filling a pack and has stored
        /// `newPacks` (one writer thread stores them in turn: once the second is in
        /// place, the first has been counted).
        func startSnapshot(newPacks: Int) throws -> (Process, Pipe) {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: cabackupBinary)
            p.arguments = ["snapshot", "--repo", s.file("repo"), src]
            p.environment = childEnvironment([:])
            let err = Pipe()
            p.standardError = err
            p.standardOutput = FileHandle.nullDevice
            let before = try packCount()
            try p.run()
            let deadline = Date().addingTimeInterval(120)
            while Date() < deadline, p.isRunning {
                let own = try tmpFiles().filter { $0.hasPrefix("pack-\(p.processIdentifier)-") }
                if try !own.isEmpty && packCount() >= before + newPacks { break }
                usleep(2000)
            }
            #expect(p.isRunning, "the snapshot finished before it could be interrupted")
            return (p, err)
        }

        let (first, err) = try startSnapshot(newPacks: 2)
        defer { kill(first.processIdentifier, SIGKILL) }
        kill(first.processIdentifier, SIGINT)
        first.waitUntilExit()
        let message = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(first.terminationStatus == 130)
        #expect(message.contains("cabackup: interrupted: nothing saved; "), "\(message)")
        #expect(message.contains("already stored will be reused by the next snapshot"), "\(message)")
        // Its own files are gone, the killed writer's leftover too; the live writer's stays.
        #expect(try tmpFiles() == ["pack-2-2.tmp"])
        #expect(try snapshotIDs(s).isEmpty)

        // kill -9 leaves the file it was filling; the next snapshot removes it, reuses the packs.
        let (second, _) = try startSnapshot(newPacks: 0)
        defer { kill(second.processIdentifier, SIGKILL) }
        kill(second.processIdentifier, SIGKILL)
        second.waitUntilExit()
        #expect(try tmpFiles().contains { $0.hasPrefix("pack-\(second.processIdentifier)-") })
        try FileManager.default.removeItem(atPath: src + "/1.bin")
        let last = try cabackup("snapshot", "--repo", s.file("repo"), src)
        #expect(last.status == 0, "\(last.stderr)")
        let left = try tmpFiles()
        #expect(left == ["pack-2-2.tmp"], "\(left) holder running: \(holder.isRunning)")
        #expect(try cabackup("check", "--repo", s.file("repo"), "--read-data").status == 0)
    }

    @Test("forget --prune --dry-run predicts the real run's figures: deleted, repacked, written, freed, left unused")
    func pruneDryRunPredicts() throws {
        /// The numbers in the `prune:` line, in order.
        func figures(_ r: RunResult) -> [String] {
            let line = r.stdout.split(separator: "\n").first { $0.hasPrefix("prune:") } ?? ""
            return line.split(whereSeparator: { !"0123456789.".contains($0) }).map(String.init)
        }
        // liveFirst: the small file is the one deleted, so its pack stays (partly used);
        // otherwise the big one goes and the pack is repacked.
        for bigGoes in [true, false] {
            let s = Scratch()
            let src = s.file("src")
            try FileManager.default.createDirectory(atPath: src, withIntermediateDirectories: true)
            for (name, mib) in [("big.bin", 10), ("small.bin", 1)] {
                let bytes = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: mib << 20))
                try bytes.write(to: URL(fileURLWithPath: src + "/" + name))
            }
            _ = try cabackup("init", "--repo", s.file("repo"))
            #expect(try cabackup("snapshot", "--repo", s.file("repo"), src).status == 0)
            try FileManager.default.removeItem(atPath: src + (bigGoes ? "/big.bin" : "/small.bin"))
            #expect(try cabackup("snapshot", "--repo", s.file("repo"), src).status == 0)
            let dry = try cabackup("forget", "--repo", s.file("repo"), "--keep-last", "1", "--prune", "--dry-run")
            #expect(dry.status == 0, "\(dry.stderr)")
            let real = try cabackup("forget", "--repo", s.file("repo"), "--keep-last", "1", "--prune")
            #expect(real.status == 0, "\(real.stderr)")
            #expect(!figures(real).isEmpty && figures(dry) == figures(real), "\(dry.stdout)\n\(real.stdout)")
            if bigGoes {
                #expect(real.stdout.contains("repacked 1 (1 new)"), "\(real.stdout)")
            } else {
                #expect(real.stdout.contains("unused left in 1 partly used packs"), "\(real.stdout)")
            }
            #expect(try cabackup("check", "--repo", s.file("repo"), "--read-data").status == 0)
        }
    }

    @Test("forget --keep-tag and --group-by keep the right snapshots and say why; a policy emptying a group fails")
    func forgetPolicyOptions() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src, withIntermediateDirectories: true)
        try Data("x".utf8).write(to: URL(fileURLWithPath: src + "/x"))
        _ = try cabackup("init", "--repo", s.file("repo"))
        for (host, tag) in [("a", "keep"), ("a", ""), ("a", "other"), ("b", "")] {
            let tags = tag.isEmpty ? [] : ["--tag", tag]
            let r = try run(
                cabackupBinary, ["snapshot", "--repo", s.file("repo"), "--host", host] + tags + [src])
            #expect(r.status == 0, "\(r.stderr)")
        }
        let ids = try snapshotIDs(s)
        #expect(ids.count == 4)

        // Host b's group has no snapshot tagged keep: refused, nothing removed.
        let refused = try cabackup("forget", "--repo", s.file("repo"), "--keep-tag", "keep")
        #expect(refused.status == 1)
        #expect(
            refused.stderr.contains("refusing to remove every snapshot of host b, paths [\(src)]"), "\(refused.stderr)")
        #expect(try snapshotIDs(s) == ids)

        let badWithin = try cabackup("forget", "--repo", s.file("repo"), "--keep-within", "1w")
        #expect(badWithin.status == 64)
        #expect(badWithin.stderr.contains("--keep-within '1w' is not a duration"), "\(badWithin.stderr)")
        #expect(badWithin.stderr.contains("1y5m7d2h"))

        let byHost = try cabackup(
            "forget", "--repo", s.file("repo"), "--keep-tag", "keep", "--keep-last", "1", "--group-by", "host")
        #expect(byHost.status == 0, "\(byHost.stderr)")
        #expect(byHost.stdout.contains("snapshots for host a:\n"), "\(byHost.stdout)")
        #expect(byHost.stdout.contains("snapshots for host b:\n"))
        #expect(byHost.stdout.contains("keep   \(ids[0].prefix(8))  "))
        #expect(byHost.stdout.contains("  (tags keep)\n"))
        #expect(byHost.stdout.contains("remove \(ids[1].prefix(8))  "))
        #expect(try snapshotIDs(s) == [ids[0], ids[2], ids[3]])

        let oneGroup = try cabackup("forget", "--repo", s.file("repo"), "--keep-last", "1", "--group-by", "")
        #expect(oneGroup.status == 0, "\(oneGroup.stderr)")
        #expect(!oneGroup.stdout.contains("snapshots for"))
        #expect(oneGroup.stdout.contains("keep   \(ids[3].prefix(8))  ") && oneGroup.stdout.contains("  (last)\n"))
        #expect(try snapshotIDs(s) == [ids[3]])
    }

    @Test("prune repacks a half-used pack, keeping exactly the used blobs")
    func pruneRepacks() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src, withIntermediateDirectories: true)
        let keep = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: 4 << 20))
        try keep.write(to: URL(fileURLWithPath: src + "/keep.bin"))
        let drop = try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: 4 << 20))
        try drop.write(to: URL(fileURLWithPath: src + "/drop.bin"))
        _ = try cabackup("init", "--repo", s.file("repo"))
        _ = try cabackup("snapshot", "--repo", s.file("repo"), src)
        try FileManager.default.removeItem(atPath: src + "/drop.bin")
        _ = try cabackup("snapshot", "--repo", s.file("repo"), src)
        let first = try snapshotIDs(s)[0]
        _ = try cabackup("forget", "--repo", s.file("repo"), first)
        let r = try cabackup("prune", "--repo", s.file("repo"))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("repacked 1"))
        #expect(try repoBytes(s) < 6 << 20)
        #expect(try cabackup("check", "--repo", s.file("repo"), "--read-data").status == 0)
        _ = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(FileManager.default.contents(atPath: s.file("out") + src + "/keep.bin") == keep)
    }

    @Test("prune killed at later and later moments: check passes after each, the kept files restore identical")
    func pruneKilled() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src, withIntermediateDirectories: true)
        func random(_ megabytes: Int) throws -> Data {
            try #require(FileHandle(forReadingAtPath: "/dev/urandom")?.readData(ofLength: megabytes << 20))
        }
        let keep = try random(4)
        try keep.write(to: URL(fileURLWithPath: src + "/keep.bin"))
        _ = try cabackup("init", "--repo", s.file("repo"))
        // Round 0's packs mix keep.bin with a file dropped later (repacked); rounds 1-2
        // leave packs only forgotten snapshots use (deleted).
        var last = Data()
        for round in 0..<4 {
            if round > 0 { try FileManager.default.removeItem(atPath: src + "/drop\(round - 1).bin") }
            last = try random(6)
            try last.write(to: URL(fileURLWithPath: src + "/drop\(round).bin"))
            #expect(try cabackup("snapshot", "--repo", s.file("repo"), src).status == 0)
        }
        #expect(try cabackup("forget", "--repo", s.file("repo"), "--keep-last", "1").status == 0)
        var killed = 0
        var finished = false
        // Each kill a little later than the one before (+25%, up to 15 s): the early ones
        // land in each phase of a prune in turn, until one finishes.
        var delay = 5_000
        while !finished && delay < 15_000_000 {
            defer { delay = delay * 5 / 4 + 5_000 }
            let p = try startCabackup("prune", "--repo", s.file("repo"))
            usleep(UInt32(delay))
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            if p.terminationReason == .uncaughtSignal { killed += 1 } else { finished = p.terminationStatus == 0 }
            let check = try cabackup("check", "--repo", s.file("repo"))
            #expect(check.status == 0, "killed after \(delay) µs: \(check.stdout) \(check.stderr)")
        }
        #expect(finished)
        #expect(killed >= 2, "only \(killed) runs were killed before one finished")
        #expect(try cabackup("prune", "--repo", s.file("repo")).status == 0)
        #expect(try cabackup("check", "--repo", s.file("repo"), "--read-data").status == 0)
        #expect(try repoBytes(s) < 12 << 20)
        _ = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(FileManager.default.contents(atPath: s.file("out") + src + "/keep.bin") == keep)
        #expect(FileManager.default.contents(atPath: s.file("out") + src + "/drop3.bin") == last)
    }

    @Test("prune refuses to run beside a snapshot (exit 11); the snapshot completes and restores")
    func pruneBesideSnapshot() throws {
        let s = Scratch()
        let src = try makeSource(s, megabytes: 64)
        _ = try cabackup("init", "--repo", s.file("repo"))
        let p = try startCabackup("snapshot", "--repo", s.file("repo"), src)
        usleep(100_000)
        let prune = try cabackup("prune", "--repo", s.file("repo"))
        let stillRunning = p.isRunning
        p.waitUntilExit()
        if stillRunning {
            #expect(prune.status == 11, "\(prune.stdout)\(prune.stderr)")
            #expect(prune.stderr.contains("locked"))
        }
        #expect(p.terminationStatus == 0)
        #expect(try cabackup("check", "--repo", s.file("repo"), "--read-data").status == 0)
        let r = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(r.status == 0)
        let cmp = try python(treetool, "compare", src, s.file("out") + src)
        #expect(cmp.status == 0, "\(cmp.stdout)")
    }

    @Test("garbage files, a missing config and a newer format version get clear errors or are ignored")
    func hostileRepositoryFiles() throws {
        let s = Scratch()
        let src = try makeSource(s, megabytes: 1)
        let repo = s.file("repo")
        _ = try cabackup("init", "--repo", repo)
        _ = try cabackup("snapshot", "--repo", repo, src)
        // Stray files where objects live are ignored by every command...
        try Data("junk".utf8).write(to: URL(fileURLWithPath: repo + "/data/00/not-a-pack"))
        try Data("junk".utf8).write(to: URL(fileURLWithPath: repo + "/snapshots/README"))
        try Data("junk".utf8).write(to: URL(fileURLWithPath: repo + "/stray.txt"))
        #expect(try cabackup("snapshots", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        // ...but a file posing as a pack is reported by check, and a backup still works.
        let fake = String(repeating: "ab", count: 32)
        try Data("not a pack at all".utf8).write(to: URL(fileURLWithPath: repo + "/data/ab/" + fake))
        let check = try cabackup("check", "--repo", repo)
        #expect(check.status == 1)
        #expect(check.stdout.contains(fake))
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        try FileManager.default.removeItem(atPath: repo + "/data/ab/" + fake)
        // A newer format version: refuse, and say to upgrade.
        let config = try String(contentsOfFile: repo + "/config", encoding: .utf8)
        try config.replacingOccurrences(
            of: "\"format_version\" : [0-9]+", with: "\"format_version\" : 7", options: .regularExpression
        )
        .write(toFile: repo + "/config", atomically: true, encoding: .utf8)
        let newer = try cabackup("snapshots", "--repo", repo)
        #expect(newer.status == 1)
        #expect(newer.stderr.contains("upgrade cabackup"))
        // No config at all: not a repository (exit 10), nothing created.
        try FileManager.default.removeItem(atPath: repo + "/config")
        let missing = try cabackup("snapshot", "--repo", repo, src)
        #expect(missing.status == 10)
        #expect(missing.stderr.contains("is not a cabackup repository"))
        #expect(!FileManager.default.fileExists(atPath: repo + "/config"))
    }
}

/// A seeded generator, so a failing kill schedule can be replayed.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
