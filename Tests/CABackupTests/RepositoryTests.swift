import Foundation
import Synchronization
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

@Suite("Repository: snapshot, index and restore through the library")
struct RepositoryTests {
    /// A small tree of files; returns its path.
    func makeTree(_ dir: TemporaryDirectory) -> String {
        dir.write("src/a.txt", Array("alpha\n".utf8))
        dir.write("src/sub/b.bin", pseudoRandomBytes(count: 300_000, seed: 1))
        dir.write("src/sub/c.log", Array(String(repeating: "log line\n", count: 20000).utf8))
        dir.write("src/empty", [])
        return dir.file("src")
    }

    func smallRepo(_ dir: TemporaryDirectory) throws -> Repository {
        try makeTestRepository(dir)
    }

    @Test("snapshot then restore gives identical bytes")
    func roundTrip() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        let result = try repo.snapshot(paths: [src])
        #expect(result.warnings.isEmpty)
        #expect(result.snapshot.summary.filesTotal == 4)
        let restored = try repo.restore(result.snapshot, to: dir.file("out"))
        #expect(restored.failures.isEmpty)
        for f in ["a.txt", "sub/b.bin", "sub/c.log", "empty"] {
            #expect(
                FileManager.default.contents(atPath: dir.file("out") + src + "/" + f)
                    == FileManager.default.contents(atPath: src + "/" + f))
        }
    }

    @Test("a small snapshot written by four workers leaves one data pack and one tree pack, and restores")
    func partlyFilledPacksMerge() throws {
        let dir = TemporaryDirectory()
        var files: [String: [UInt8]] = [:]
        for i in 0..<400 {
            let name = "src/f\(i).bin"
            files[name] = pseudoRandomBytes(count: 1000 + 37 * i, seed: UInt64(i))
            _ = dir.write(name, files[name]!)
        }
        let repo = try smallRepo(dir)
        let result = try repo.snapshot(paths: [dir.file("src")], options: SnapshotOptions(workers: 4))
        #expect(result.snapshot.summary.filesTotal == 400)
        // Four workers fill up to four data packs side by side; finish() merges them.
        #expect(try repo.storage.list(.pack).count == 2)
        let report = try repo.check(options: CheckOptions(readDataFraction: 1))
        #expect(report.isClean)
        #expect(report.blobsRead > 400)
        let restored = try repo.restore(result.snapshot, to: dir.file("out"))
        #expect(restored.failures.isEmpty)
        for (name, bytes) in files {
            #expect(FileManager.default.contents(atPath: dir.file("out") + dir.file(name)) == Data(bytes))
        }
    }

    @Test("an unchanged re-snapshot adds only its record; a small edit adds about one chunk")
    func deduplication() throws {
        let dir = TemporaryDirectory()
        let big = pseudoRandomBytes(count: 2 << 20, seed: 2)
        dir.write("src/big", big)
        let repo = try smallRepo(dir)
        let first = try repo.snapshot(paths: [dir.file("src")]).snapshot
        let second = try repo.snapshot(paths: [dir.file("src")]).snapshot
        #expect(second.summary.chunksAdded == 0)
        // The record, plus new trees for ancestors such as /tmp whose mtimes other tests move.
        #expect(second.summary.bytesAdded < 4096)
        func srcTree(_ snap: Snapshot) throws -> [BlobID] {
            var ids: [BlobID] = []
            try repo.list(snap, path: dir.file("src")) {
                if $0.displayPath == dir.file("src") { ids = $0.node.subtrees }
            }
            return ids
        }
        #expect(try srcTree(second) == srcTree(first))
        #expect(second.parent == first.id)
        var edited = big
        edited[1_000_000] ^= 0xFF
        dir.write("src/big", edited)
        let third = try repo.snapshot(paths: [dir.file("src")]).snapshot
        #expect(third.summary.chunksAdded >= 1 && third.summary.chunksAdded <= 2)
    }

    @Test("files unchanged since the parent are not read; changes (even with mtime put back) are")
    func parentSkipsUnchanged() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        let first = try repo.snapshot(paths: [src]).snapshot
        #expect(first.summary.bytesTotal > 0 && first.summary.filesUnchanged == 0)
        let second = try repo.snapshot(paths: [src]).snapshot
        #expect(second.summary.filesUnchanged == 4)
        #expect(second.summary.bytesTotal == 0)
        #expect(second.summary.filesTotal == 4)
        // Same size, mtime put back: only ctime tells.
        var st = stat()
        stat(src + "/a.txt", &st)
        let fd = open(src + "/a.txt", O_WRONLY)  // in place: same inode, same size
        #expect(write(fd, "ALPHA\n", 6) == 6)
        close(fd)
        var times = [st.st_atim, st.st_mtim]
        utimensat(AT_FDCWD, src + "/a.txt", &times, 0)
        let third = try repo.snapshot(paths: [src]).snapshot
        #expect(third.summary.filesUnchanged == 3)
        #expect(third.summary.bytesTotal == 6)
        let forced = try repo.snapshot(paths: [src], options: SnapshotOptions(force: true)).snapshot
        #expect(forced.summary.filesUnchanged == 0)
        #expect(forced.summary.bytesTotal == first.summary.bytesTotal)
        // The reused content restores correctly.
        _ = try repo.restore(second, to: dir.file("out"))
        #expect(
            FileManager.default.contents(atPath: dir.file("out") + src + "/sub/b.bin")
                == FileManager.default.contents(atPath: src + "/sub/b.bin"))
        let r = try repo.restore(third, to: dir.file("out3"))
        #expect(r.failures.isEmpty)
        #expect(FileManager.default.contents(atPath: dir.file("out3") + src + "/a.txt") == Data("ALPHA\n".utf8))
    }

    @Test("the index is derived: deleting it, or rebuilding it, gives the same rows")
    func indexRebuild() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        var repo = try smallRepo(dir)
        _ = try repo.snapshot(paths: [src])
        _ = try repo.snapshot(paths: [src], options: SnapshotOptions(tags: ["x"]))
        let live = try repo.indexDump()
        let snaps = try repo.snapshots().map(\.id)
        #expect(!live.isEmpty)
        try repo.rebuildIndex()
        #expect(try repo.indexDump() == live)
        repo = try Repository.open(path: dir.file("repo"), password: testPassword)  // release the old connection first
        try FileManager.default.removeItem(atPath: dir.file("repo/index"))
        let reopened = try Repository.open(path: dir.file("repo"), password: testPassword)
        #expect(try reopened.indexDump() == live)
        #expect(try reopened.snapshots().map(\.id) == snaps)
        _ = repo
    }

    @Test("a pack written but not indexed (crash before indexing) is picked up on open")
    func orphanPackIndexedOnOpen() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        _ = try repo.snapshot(paths: [src])
        let live = try repo.indexDump()
        // Simulate the crash window: drop one pack from the index only.
        let pack = try repo.storage.list(.pack)[0]
        try repo.index.removePacks([ObjectID(hex: pack)!])
        #expect(try repo.indexDump() != live)
        let reopened = try Repository.open(path: dir.file("repo"), password: testPassword)
        #expect(try reopened.indexDump() == live)
    }

    @Test("snapshot references: latest, full id, prefix, and clear errors")
    func snapshotReferences() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        let a = try repo.snapshot(paths: [src], options: SnapshotOptions(tags: ["one"], hostname: "h1")).snapshot
        let b = try repo.snapshot(paths: [src], options: SnapshotOptions(hostname: "h2")).snapshot
        #expect(try repo.findSnapshot("latest").id == b.id)
        #expect(try repo.findSnapshot("latest", matching: SnapshotFilter(hosts: ["h1"])).id == a.id)
        #expect(try repo.findSnapshot("latest", matching: SnapshotFilter(tags: ["one"])).id == a.id)
        #expect(try repo.findSnapshot(a.id.hex).id == a.id)
        #expect(try repo.findSnapshot(String(b.id.hex.prefix(8))).id == b.id)
        #expect(throws: CABackupError.self) { try repo.findSnapshot("abc") }
        #expect(throws: CABackupError.self) { try repo.findSnapshot("00000000") }
        #expect(throws: CABackupError.self) {
            try repo.findSnapshot("latest", matching: SnapshotFilter(hosts: ["nope"]))
        }
    }

    @Test("prune cannot run while a snapshot holds the shared lock, and can after")
    func pruneLock() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        _ = try repo.snapshot(paths: [src])
        var held: RepositoryLock? = try repo.lock(exclusive: false)
        #expect {
            try repo.prune()
        } throws: { e in
            guard case .locked = e as? CABackupError else { return false }
            return true
        }
        // Another snapshot (shared) may run beside it.
        _ = try repo.snapshot(paths: [src])
        held = nil
        _ = held
        let report = try repo.prune()
        #expect(report.packsDeleted == 0)
    }

    @Test("forget policies keep the newest per day, week, month and overall")
    func forgetPolicies() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        let tree = try repo.snapshot(paths: [src]).snapshot.tree
        try repo.forget(repo.snapshots())
        // Snapshots at 12:00 UTC on Jan 1–10 and Feb 1–3 2026, two on Jan 10.
        var times: [Int64] = []
        for day in 1...10 { times.append(parseRFC3339(String(format: "2026-01-%02dT12:00:00Z", day))!) }
        times.append(parseRFC3339("2026-01-10T13:00:00Z")!)
        for day in 1...3 { times.append(parseRFC3339(String(format: "2026-02-%02dT12:00:00Z", day))!) }
        for t in times {
            _ = try repo.commitSnapshot(
                Snapshot.encodeRecord(
                    time: formatRFC3339(ns: t), hostname: "h", username: "u", paths: [src], tags: [], parent: nil,
                    tree: tree, summary: SnapshotSummary()))
        }
        func kept(_ p: ForgetPolicy) throws -> [String] {
            try repo.forgetPlan(p).keep.map { String(formatRFC3339(ns: $0.timeNs).prefix(10)) }
        }
        setenv("TZ", "UTC", 1)
        tzset()
        #expect(try kept(ForgetPolicy(last: 2)) == ["2026-02-02", "2026-02-03"])
        #expect(try kept(ForgetPolicy(daily: 3)) == ["2026-02-01", "2026-02-02", "2026-02-03"])
        #expect(try kept(ForgetPolicy(monthly: 2)) == ["2026-01-10", "2026-02-03"])
        #expect(try repo.forgetPlan(ForgetPolicy(monthly: 2)).keep.first?.timeNs == times[10])
        #expect(try kept(ForgetPolicy(last: 1, monthly: 2)) == ["2026-01-10", "2026-02-03"])
        #expect(try repo.forgetPlan(ForgetPolicy(weekly: 1)).remove.count == times.count - 1)
    }

    @Test("a missing top-level path is fatal and writes nothing")
    func missingSource() throws {
        let dir = TemporaryDirectory()
        let repo = try smallRepo(dir)
        #expect(throws: CABackupError.self) { try repo.snapshot(paths: [dir.file("nope")]) }
        #expect(try repo.storage.list(.pack).isEmpty)
        #expect(try repo.snapshots().isEmpty)
    }

    @Test("a damaged blob fails its file (removed, named), the rest restores")
    func damagedBlob() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        let snap = try repo.snapshot(paths: [src]).snapshot
        // Flip a byte inside the first data blob of b.bin.
        var node: Node?
        try repo.list(snap) { if $0.displayPath.hasSuffix("b.bin") { node = $0.node } }
        let loc = try #require(try repo.index.lookup(node!.content[0]))
        let packPath = dir.file("repo/data/\(loc.pack.hex.prefix(2))/\(loc.pack.hex)")
        var bytes = [UInt8](FileManager.default.contents(atPath: packPath)!)
        bytes[Int(loc.offset) + 10] ^= 0x01
        try Data(bytes).write(to: URL(fileURLWithPath: packPath))
        let result = try repo.restore(snap, to: dir.file("out"))
        #expect(result.failures.count == 1)
        #expect(result.failures[0].path.hasSuffix("sub/b.bin"))
        #expect(!FileManager.default.fileExists(atPath: dir.file("out") + src + "/sub/b.bin"))
        #expect(FileManager.default.contents(atPath: dir.file("out") + src + "/a.txt") == Data("alpha\n".utf8))
    }

    @Test("restore refuses a non-empty target unless asked to overwrite")
    func targetNotEmpty() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        let snap = try repo.snapshot(paths: [src]).snapshot
        dir.write("out/existing", [1])
        #expect(throws: CABackupError.self) { try repo.restore(snap, to: dir.file("out")) }
        let r = try repo.restore(snap, to: dir.file("out"), options: RestoreOptions(overwrite: true))
        #expect(r.failures.isEmpty && r.filesRestored == 4)
        let again = try repo.restore(snap, to: dir.file("out"), options: RestoreOptions(overwrite: true))
        #expect(again.failures.isEmpty)
    }

    @Test("restore --overwrite replaces entries: a hard link outside keeps its bytes, a FIFO is replaced")
    func overwriteReplaces() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        let snap = try repo.snapshot(paths: [src]).snapshot
        let out = dir.file("out")
        _ = try repo.restore(snap, to: out)
        let outside = dir.write("outside", Array("precious".utf8))
        unlink(out + src + "/a.txt")
        #expect(link(outside, out + src + "/a.txt") == 0)
        unlink(out + src + "/sub/c.log")
        #expect(mkfifo(out + src + "/sub/c.log", 0o644) == 0)
        let r = try repo.restore(snap, to: out, options: RestoreOptions(overwrite: true))
        #expect(r.failures.isEmpty)
        #expect(FileManager.default.contents(atPath: outside) == Data("precious".utf8))
        #expect(FileManager.default.contents(atPath: out + src + "/a.txt") == Data("alpha\n".utf8))
        #expect(FileManager.default.contents(atPath: out + src + "/sub/c.log")?.count == 9 * 20000)
    }

    @Test("restore --include restores only the named subtree")
    func includes() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        let snap = try repo.snapshot(paths: [src]).snapshot
        let r = try repo.restore(snap, to: dir.file("out"), options: RestoreOptions(includes: [src + "/sub"]))
        #expect(r.filesRestored == 2)
        #expect(FileManager.default.fileExists(atPath: dir.file("out") + src + "/sub/c.log"))
        #expect(!FileManager.default.fileExists(atPath: dir.file("out") + src + "/a.txt"))
        #expect(throws: CABackupError.self) {
            try repo.restore(snap, to: dir.file("out2"), options: RestoreOptions(includes: [src + "/nope"]))
        }
        #expect(!FileManager.default.fileExists(atPath: dir.file("out2")))
    }

    @Test("RestoreOptions: patterns, delete, verify and dry run through the library, with events")
    func restoreOptions() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        let snap = try repo.snapshot(paths: [src]).snapshot
        let out = dir.file("out")
        let events = Mutex<[RestoreEvent]>([])
        let record: @Sendable (RestoreEvent) -> Void = { e in events.withLock { $0.append(e) } }
        let dry = try repo.restore(
            snap, to: out, options: RestoreOptions(includes: ["*.log"], dryRun: true), events: record)
        #expect(dry.filesRestored == 1 && dry.bytesWritten == 20000 * 9)
        #expect(!FileManager.default.fileExists(atPath: out))
        let r = try repo.restore(
            snap, to: out, options: RestoreOptions(includes: ["*.log", src + "/a.txt"], verify: true), events: record)
        #expect(r.filesRestored == 2 && r.filesVerified == 2 && r.verifyFailures.isEmpty)
        #expect(!FileManager.default.fileExists(atPath: out + src + "/sub/b.bin"))
        dir.write("out" + src + "/stray.txt", Array("x".utf8))
        let d = try repo.restore(
            snap, to: out, options: RestoreOptions(excludes: ["b.bin"], delete: true), events: record)
        #expect(d.entriesDeleted == 1 && d.failures.isEmpty)
        #expect(!FileManager.default.fileExists(atPath: out + src + "/stray.txt"))
        #expect(!FileManager.default.fileExists(atPath: out + src + "/sub/b.bin"))
        let deleted = events.withLock { list in
            list.compactMap { e -> String? in
                if case .deleted(let path) = e { return String(decoding: path, as: UTF8.self) }
                return nil
            }
        }
        #expect(deleted == [src + "/stray.txt"])
        #expect(throws: CABackupError.self) {
            try repo.restore(snap, to: dir.file("bad"), options: RestoreOptions(includes: ["[a-"]))
        }
    }

    @Test("a tree with '..' or '/' in names is refused, nothing escapes the target")
    func hostileTree() throws {
        let dir = TemporaryDirectory()
        let repo = try smallRepo(dir)
        for bad in [[0x2E, 0x2E], [0x2E, 0x2E, 0x2F, 0x78], [0x2F, 0x74, 0x6D, 0x70]] as [[UInt8]] {
            var n = Node(name: bad, type: .file)
            n.mode = 0o644
            let tree = TreeCodec.encodeSingle([n])
            let codec = repo.makeCodec()
            let id = tree.withUnsafeBytes { codec.id($0) }
            _ = try repo.withBlobWriter { saver in
                if try saver.claim(id) {
                    try tree.withUnsafeBytes { try saver.addEncoding(id, type: .tree, raw: $0, codec: codec) }
                }
            }
            let record = Snapshot.encodeRecord(
                time: formatRFC3339(ns: 0), hostname: "h", username: "u", paths: ["/"], tags: [], parent: nil,
                tree: id, summary: SnapshotSummary())
            let snap = try repo.commitSnapshot(record)
            #expect(throws: CABackupError.self) { try repo.restore(snap, to: dir.file("out-\(bad.count)")) }
        }
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/x"))
    }

    @Test(
        "progress: a first run counts the tree by a scan; a re-run shows the parent's totals and unchanged files as done"
    )
    func progressTotals() throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        final class Seen { var reports: [SnapshotProgress] = [] }
        let first = Seen()
        let one = try repo.snapshot(paths: [src], progress: { first.reports.append($0) })
        #expect(!first.reports.isEmpty)
        #expect(first.reports.allSatisfy { !$0.totalsFromParent && $0.filesUnchanged == 0 })
        // However short the run, the last report has the final figures (the README's
        // example used to get one report: 0 files, 0 bytes read).
        let final = try #require(first.reports.last)
        #expect(final.filesDone == one.snapshot.summary.filesTotal && final.filesDone > 0)
        #expect(final.bytesRead == one.snapshot.summary.bytesTotal && final.bytesRead > 0)
        #expect(final.scanFinished && final.totalFiles == final.filesDone && final.totalBytes == final.bytesRead)
        #expect(zip(first.reports, first.reports.dropFirst()).allSatisfy { $0.filesDone <= $1.filesDone })

        // Twice: the second run's parent read nothing, its bytes all count as unchanged.
        for _ in 0..<2 {
            let again = Seen()
            _ = try repo.snapshot(paths: [src], progress: { again.reports.append($0) })
            let last = try #require(again.reports.last)
            #expect(
                again.reports.allSatisfy {
                    $0.totalsFromParent && $0.scanFinished && $0.totalFiles == one.snapshot.summary.filesTotal
                        && $0.totalBytes == one.snapshot.summary.bytesTotal && $0.filesDone == 0
                })
            #expect(last.filesUnchanged >= 1 && last.bytesUnchanged >= 1)
        }
    }

    @Test("tiny blobs: a pack takes at most maxBlobsPerPack of them, so its header always fits")
    func blobsPerPackCapped() throws {
        // 16 MiB of 8-byte files would need a header larger than a reader accepts.
        #expect(PackFormat.encodedHeaderSize(count: (16 << 20) / 8, sealed: true) > PackFormat.maxHeaderSize)
        #expect(
            PackFormat.encodedHeaderSize(count: PackFormat.maxBlobsPerPack, sealed: true) <= PackFormat.maxHeaderSize)
        let dir = TemporaryDirectory()
        let repo = try smallRepo(dir)
        let codec = repo.makeCodec()
        let n = PackFormat.maxBlobsPerPack * 2 + 100
        _ = try repo.withBlobWriter { saver in
            for i in 0..<n {
                let bytes = withUnsafeBytes(of: UInt64(i).littleEndian) { Array($0) }
                try bytes.withUnsafeBytes { raw in
                    let id = codec.id(raw)
                    if try saver.claim(id) { try saver.addEncoding(id, type: .data, raw: raw, codec: codec) }
                }
            }
        }
        let counts = try repo.storage.list(.pack).map { try repo.readPackHeader(#require(ObjectID(hex: $0))).count }
        #expect(counts.sorted() == [100, PackFormat.maxBlobsPerPack, PackFormat.maxBlobsPerPack])
        #expect(try repo.check(options: CheckOptions(readDataFraction: 1)).isClean)
        // The dry run of a repack predicts the same packs.
        let entries = try repo.storage.list(.pack).flatMap { try repo.readPackHeader(#require(ObjectID(hex: $0))) }
        #expect(repo.repackedSizes(entries).packs == 3)
    }

    @Test(
        "prune keeps one copy of blobs stored twice (an interrupted prune's state), its used set in memory or on disk",
        arguments: [1_000_000, 2])
    func pruneDropsCopies(idsInMemory: Int) throws {
        let dir = TemporaryDirectory()
        let src = makeTree(dir)
        let repo = try smallRepo(dir)
        _ = try repo.snapshot(paths: [src])
        func packBytes() throws -> Int64 {
            try repo.storage.list(.pack).reduce(0) { try $0 + repo.storage.size(.pack, $1) }
        }
        let once = try packBytes()
        // Every blob copied into new packs, the old ones left in place.
        let codec = repo.makeCodec()
        let buffers = BlobBuffers()
        _ = try repo.withBlobWriter { saver in
            for name in try repo.storage.list(.pack) {
                let pack = try #require(ObjectID(hex: name))
                for e in try repo.readPackHeader(pack) {
                    _ = try repo.loadBlob(e.id, at: BlobLocation(pack: pack, entry: e), into: buffers, codec: codec)
                    try saver.add(
                        e.id, type: e.type, compression: e.compression, rawLength: e.rawLength, bytes: buffers.stored)
                }
            }
        }
        #expect(try packBytes() > once * 19 / 10)

        let report = try repo.prune(dryRun: false, repackBelow: 0.8, idsInMemory: idsInMemory)
        #expect(report.blobsRemoved > 0)
        #expect(try packBytes() < once * 11 / 10)
        #expect(try repo.check(options: CheckOptions(readDataFraction: 1)).isClean)
        let restored = try repo.restore(try repo.findSnapshot("latest"), to: dir.file("out"))
        #expect(restored.failures.isEmpty)
        #expect(
            FileManager.default.contents(atPath: dir.file("out") + src + "/sub/b.bin")
                == Data(pseudoRandomBytes(count: 300_000, seed: 1)))
    }

    @Test("the used-blob set answers the same before and after it moves to disk")
    func spillingSet() throws {
        let set = SpillingIDSet(memoryLimit: 4)
        let ids = (0..<10).map { sha256([UInt8($0)]) }
        for id in ids[..<4] { #expect(try set.insert(id)) }
        #expect(!set.spilled)
        #expect(try !set.insert(ids[0]))
        #expect(try set.remove(ids[3]))
        for id in ids[3...] { #expect(try set.insert(id)) }
        #expect(set.spilled)
        #expect(try !set.insert(ids[0]) && !set.insert(ids[9]))
        #expect(try set.remove(ids[0]) && !set.remove(ids[0]))
        #expect(try !set.remove(sha256([99])))
        #expect(try ids[1...].allSatisfy { try set.remove($0) })
        #expect(try ids.allSatisfy { try !set.remove($0) })
    }
}
