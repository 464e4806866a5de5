import Foundation
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

@Suite("Index: a snapshot known complete skips the per-chunk check of its unchanged files")
struct CompleteSnapshotTests {
    func id(_ s: String) -> ObjectID { sha256(Array(s.utf8)) }

    func addPack(_ index: RepositoryIndex, _ name: String) throws {
        let e = PackEntry(id: id("blob " + name), type: .data, compression: .none, offset: 0, length: 10, rawLength: 10)
        try index.addPack(id(name), size: 10, entries: [e])
    }

    @Test("complete until a pack indexed at the time is removed, even when its row number is reused")
    func packState() throws {
        let dir = TemporaryDirectory()
        let index = try RepositoryIndex(path: dir.file("index.sqlite"), repositoryID: "r")
        for p in ["p1", "p2", "p3"] { try addPack(index, p) }
        let snap = id("snapshot")
        try index.markComplete(snap, since: try index.packState())
        #expect(try index.isComplete(snap))
        try addPack(index, "p4")
        #expect(try index.isComplete(snap))  // packs added later change nothing
        try index.removePacks([id("p2")])
        #expect(try !index.isComplete(snap))

        // The highest row removed and its number given to a new pack: still noticed.
        let other = id("other")
        try index.markComplete(other, since: try index.packState())
        #expect(try index.isComplete(other))
        try index.removePacks([id("p4")])
        try addPack(index, "p5")
        #expect(try !index.isComplete(other))

        // Forgetting the snapshot forgets its mark.
        let third = id("third")
        try index.markComplete(third, since: try index.packState())
        try index.removeSnapshot(third)
        #expect(try !index.isComplete(third))
    }

    @Test("every pack removed, then some indexed again without one of them: not complete")
    func numbersNeverReused() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("index.sqlite")
        let index = try RepositoryIndex(path: path, repositoryID: "r")
        for p in ["p1", "p2", "p3"] { try addPack(index, p) }
        let snap = id("snapshot")
        try index.markComplete(snap, since: try index.packState())
        // Storage looked empty (a mount gone), then came back without p2 and with a pack
        // of another client: numbered afresh from 1 they would line up with the mark.
        try index.removePacks([id("p1"), id("p2"), id("p3")])
        for p in ["p1", "p4", "p3"] { try addPack(index, p) }
        #expect(try !index.isComplete(snap))

        // An index from before: numbers above its generation. Opening raises the
        // generation, so the next pack is numbered past every row.
        let db = try SQLiteDatabase(path: path)
        try db.execute("UPDATE meta SET value = '1' WHERE key = 'generation'")
        let reopened = try RepositoryIndex(path: path, repositoryID: "r")
        try addPack(reopened, "p5")
        let rows = try db.prepare("SELECT count(*), count(DISTINCT n), max(n) FROM packs")
        #expect(try rows.step() && rows.int(0) == 4 && rows.int(1) == 4 && rows.int(2) == 7)
    }

    @Test("a pack added and removed while the snapshot ran: not marked complete")
    func removalDuringRun() throws {
        let dir = TemporaryDirectory()
        let index = try RepositoryIndex(path: dir.file("index.sqlite"), repositoryID: "r")
        try addPack(index, "p1")
        let start = try index.packState()
        try addPack(index, "p2")  // another process's pack, whose blob the run found indexed
        try index.removePacks([id("p2")])
        let snap = id("snapshot")
        try index.markComplete(snap, since: start)
        #expect(try !index.isComplete(snap))
        try index.markComplete(snap, since: try index.packState())
        #expect(try index.isComplete(snap))
    }

    @Test("a data pack lost after the parent: its files are read and stored again, and restore")
    func lostPackReadAgain() throws {
        let dir = TemporaryDirectory()
        dir.write("src/a.bin", pseudoRandomBytes(count: 200_000, seed: 7))
        dir.write("src/b.txt", Array(String(repeating: "line\n", count: 5000).utf8))
        let src = dir.file("src")
        let repo = try makeTestRepository(dir)
        let first = try repo.snapshot(paths: [src]).snapshot
        #expect(try repo.index.isComplete(first.id))
        let unchanged = try repo.snapshot(paths: [src]).snapshot
        #expect(unchanged.summary.filesUnchanged == 2)
        #expect(try repo.index.isComplete(unchanged.id))

        // Lose every data pack (the tree packs stay, so the parent's listings load).
        let local = try #require(repo.storage as? LocalStorage)
        for pack in try repo.storage.list(.pack) {
            let ids = try repo.index.blobIDs(inPack: ObjectID(hex: pack)!)
            if try ids.contains(where: { try repo.index.lookup($0)?.type == .data }) {
                #expect(unlink(local.path(.pack, pack)) == 0)
            }
        }
        let reopened = try Repository.open(path: dir.file("repo"), password: testPassword)
        #expect(try !reopened.index.isComplete(unchanged.id))
        let again = try reopened.snapshot(paths: [src]).snapshot
        #expect(again.summary.filesUnchanged == 0)
        #expect(again.summary.chunksAdded > 0)
        let out = dir.file("out")
        _ = try reopened.restore(again, to: out)
        #expect(
            FileManager.default.contents(atPath: out + src + "/a.bin")
                == Data(pseudoRandomBytes(count: 200_000, seed: 7)))
    }
}
