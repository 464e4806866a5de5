import Foundation
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

@Suite("Index: the absent-id filter stays a superset of the stored ids")
struct IndexFilterTests {
    func ids(_ range: Range<Int>, salt: UInt64 = 0) -> [BlobID] {
        range.map { i in
            let v = (UInt64(i) ^ salt << 40).littleEndian
            return withUnsafeBytes(of: v) { sha256($0) }
        }
    }

    func entries(_ ids: [BlobID]) -> [PackEntry] {
        ids.enumerated().map { i, id in
            PackEntry(id: id, type: .data, compression: .lz4, offset: Int64(i) * 100, length: 100, rawLength: 200)
        }
    }

    func pack(_ n: UInt64) -> PackID {
        let v = n.littleEndian
        return withUnsafeBytes(of: v) { sha256(Array("pack".utf8) + Array($0)) }
    }

    func addPack(_ index: RepositoryIndex, _ n: UInt64, _ ids: [BlobID]) throws {
        try index.addPack(pack(n), size: Int64(ids.count) * 100, entries: entries(ids))
    }

    @Test("inserted ids are always found; absent ids mostly answered without SQLite; saved bytes round-trip")
    func filterAlone() throws {
        let dir = TemporaryDirectory()
        let instance = sha256(Array("instance".utf8))
        let f = IDFilter(capacity: 100_000, instance: instance, generation: 7)
        let stored = ids(0..<100_000)
        for id in stored { f.insert(id) }
        #expect(stored.allSatisfy { f.mayContain($0) })
        let absent = ids(0..<100_000, salt: 1)
        let falsePositives = absent.filter { f.mayContain($0) }.count
        #expect(falsePositives < 1_000, "false positive rate \(falsePositives) in 100000")

        let path = dir.file("filter")
        try f.save(to: path)
        let back = try #require(IDFilter.load(path: path, instance: instance, generation: 7))
        #expect(back.inserted == 100_000)
        #expect(stored.allSatisfy { back.mayContain($0) })
        #expect(absent.filter { back.mayContain($0) }.count == falsePositives)
        #expect(IDFilter.load(path: path, instance: instance, generation: 8) == nil)
        #expect(IDFilter.load(path: path, instance: sha256(Array("other".utf8)), generation: 7) == nil)

        // A flipped bit or a torn file is refused.
        var bytes = try #require(FileManager.default.contents(atPath: path))
        bytes[IDFilter.headerSize + 1000] ^= 1
        try bytes.write(to: URL(fileURLWithPath: path))
        #expect(IDFilter.load(path: path, instance: instance, generation: 7) == nil)
        try bytes.prefix(bytes.count - 1).write(to: URL(fileURLWithPath: path))
        #expect(IDFilter.load(path: path, instance: instance, generation: 7) == nil)
    }

    @Test("a filter saved before a crash (older generation) is rebuilt, not trusted")
    func staleFileAfterCrash() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("index.sqlite")
        let first = ids(0..<500)
        let second = ids(500..<1000)
        do {
            let index = try RepositoryIndex(path: path, repositoryID: "r")
            try addPack(index, 1, first)
            #expect(try index.contains(first[0]))
        }  // closed: the filter is saved at generation 1
        let saved = try #require(FileManager.default.contents(atPath: path + "-filter"))
        do {
            let index = try RepositoryIndex(path: path, repositoryID: "r")
            try addPack(index, 2, second)
        }
        // As if the process had died before saving its filter: the file is generation 1's.
        try saved.write(to: URL(fileURLWithPath: path + "-filter"))
        let index = try RepositoryIndex(path: path, repositoryID: "r")
        #expect(try (first + second).allSatisfy { try index.contains($0) })
        #expect(try index.missing(second + ids(0..<10, salt: 9)) == Set(ids(0..<10, salt: 9)))
    }

    @Test("a filter left from a deleted index never matches the new one")
    func recreatedIndex() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("index.sqlite")
        do {
            let index = try RepositoryIndex(path: path, repositoryID: "r")
            try addPack(index, 1, ids(0..<100))
            _ = try index.contains(ids(0..<1)[0])
        }
        let old = try #require(FileManager.default.contents(atPath: path + "-filter"))
        for suffix in ["", "-wal", "-shm", "-filter"] { unlink(path + suffix) }
        let other = ids(0..<100, salt: 3)
        do {
            let index = try RepositoryIndex(path: path, repositoryID: "r")
            try addPack(index, 1, other)  // generation 1 again, other ids
        }
        try old.write(to: URL(fileURLWithPath: path + "-filter"))
        let index = try RepositoryIndex(path: path, repositoryID: "r")
        #expect(try other.allSatisfy { try index.contains($0) })
    }

    @Test("another connection's packs: lookup is exact at once, and the filter is set aside, never saved wrong")
    func twoConnections() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("index.sqlite")
        let a = try RepositoryIndex(path: path, repositoryID: "r")
        try addPack(a, 1, ids(0..<100))
        #expect(try a.contains(ids(0..<1)[0]))  // a's filter is loaded
        let theirs = ids(0..<100, salt: 5)
        do {
            let b = try RepositoryIndex(path: path, repositoryID: "r")
            try addPack(b, 2, theirs)
        }
        #expect(try a.lookup(theirs[0]) != nil)
        let ours = ids(0..<100, salt: 6)
        try addPack(a, 3, ours)  // a notices the generation moved on
        #expect(try theirs.allSatisfy { try a.contains($0) })
        #expect(try ours.allSatisfy { try a.contains($0) })
        let c = try RepositoryIndex(path: path, repositoryID: "r")
        #expect(try (ids(0..<100) + theirs + ours).allSatisfy { try c.contains($0) })
        #expect(try c.missing(ids(0..<50, salt: 7)).count == 50)
    }

    @Test("a filter that fills up is rebuilt larger, and removed packs stay absent")
    func growth() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("index.sqlite")
        let index = try RepositoryIndex(path: path, repositoryID: "r")
        #expect(try !index.contains(ids(0..<1)[0]))  // built empty, at the minimum capacity
        let all = ids(0..<(IDFilter.minimumCapacity + 20_000))
        for (n, start) in stride(from: 0, to: all.count, by: 10_000).enumerated() {
            try addPack(index, UInt64(n), Array(all[start..<min(all.count, start + 10_000)]))
        }
        #expect(try index.missing(all).isEmpty)
        #expect(try index.missing(ids(0..<1000, salt: 2)).count == 1000)
        try index.removePacks([pack(0)])
        #expect(try index.missing(all).count == 10_000)
        #expect(try !index.contains(all[0]))
    }

    @Test("packs removed together take exactly their blobs; an old index loses its by-pack index and keeps working")
    func removePacksTogether() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("index.sqlite")
        do {
            // An index as older versions made it, with the index of blobs by pack.
            let index = try RepositoryIndex(path: path, repositoryID: "r")
            try addPack(index, 0, ids(0..<10))
            let db = try SQLiteDatabase(path: path)
            try db.execute("CREATE INDEX blobs_by_pack ON blobs(pack)")
        }
        let index = try RepositoryIndex(path: path, repositoryID: "r")
        let probe = try SQLiteDatabase(path: path)
        let named = try probe.prepare("SELECT count(*) FROM sqlite_master WHERE name = 'blobs_by_pack'")
        #expect(try named.step() && named.int(0) == 0)

        try addPack(index, 1, ids(10..<20))
        try addPack(index, 2, ids(20..<30) + ids(0..<1))  // also holds pack 0's first blob
        try addPack(index, 3, ids(30..<40))
        try index.removePacks([pack(0), pack(2), sha256(Array("never indexed".utf8))])
        #expect(try index.packIDs() == [pack(1), pack(3)])
        #expect(try index.lookup(ids(0..<1)[0]) == nil)
        #expect(try ids(10..<20).allSatisfy { try index.lookup($0)?.pack == pack(1) })
        #expect(try ids(30..<40).allSatisfy { try index.lookup($0)?.pack == pack(3) })
        #expect(try index.missing(ids(0..<40)) == Set(ids(0..<10) + ids(20..<30)))
        #expect(
            try index.blobIDs(inPack: pack(3)).sorted { $0.hex < $1.hex } == ids(30..<40).sorted { $0.hex < $1.hex })
        #expect(try index.blobIDs(inPack: pack(2)).isEmpty)
        #expect(try index.counts().blobs == 20)

        // Two packs left, one named twice: not taken for "every pack" (which empties the tables).
        try index.removePacks([pack(1), pack(1)])
        #expect(try index.packIDs() == [pack(3)])
        #expect(try index.counts().blobs == 10)
    }
}

@Suite("Index: the sorted id table answers only for ids still stored")
struct IndexTableTests {
    let helper = IndexFilterTests()

    @Test("every listed id is found, across blocks whose ids share a first word; nothing else; damage is refused")
    func tableAlone() throws {
        let dir = TemporaryDirectory()
        let instance = sha256(Array("instance".utf8))
        var stored = helper.ids(0..<10_000)
        // 40 ids with one first word: they straddle a block boundary wherever they land.
        let shared = stored[5000].w0
        stored += (0..<40).map { ObjectID(w0: shared, w1: UInt64($0) * 977, w2: 1, w3: 2) }
        stored.sort()
        let state = RepositoryIndex.PackState(upTo: 9, count: 7, last: helper.pack(9))
        let path = dir.file("ids")
        let writer = try IDTable.Writer(path: path, instance: instance, state: state)
        for id in stored {
            try writer.append(id)
            if id.w0 == shared { try writer.append(id) }  // a blob in two packs: listed once
        }
        let table = try writer.finish()
        #expect(table.count == stored.count)
        #expect(table.state.upTo == 9 && table.state.count == 7 && table.state.last == helper.pack(9))
        #expect(stored.allSatisfy { table.contains($0) })
        let absent = helper.ids(0..<10_000, salt: 1) + [ObjectID(w0: shared, w1: 5, w2: 1, w3: 2), .zero]
        #expect(!absent.contains { table.contains($0) })

        #expect(IDTable.load(path: path, instance: sha256(Array("other".utf8))) == nil)
        var bytes = try #require(FileManager.default.contents(atPath: path))
        var flipped = bytes
        flipped[flipped.count - 40] ^= 1  // a fence word
        try flipped.write(to: URL(fileURLWithPath: path))
        #expect(IDTable.load(path: path, instance: instance) == nil)
        bytes.removeLast()
        try bytes.write(to: URL(fileURLWithPath: path))
        #expect(IDTable.load(path: path, instance: instance) == nil)
    }

    @Test(
        "built once the index is large enough, rebuilt when a quarter of the ids are unlisted; unlisted ids still found"
    )
    func builtAndGrown() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("index.sqlite")
        let all = helper.ids(0..<2100)
        func open() throws -> RepositoryIndex {
            try RepositoryIndex(path: path, repositoryID: "r", idTableMinimum: 1000)
        }
        do {
            let index = try open()
            try helper.addPack(index, 1, Array(all[0..<500]))
            #expect(try index.missing(Array(all[0..<600])) == Set(all[500..<600]))
            #expect(index.idTableCount == nil)  // 500 ids: below the minimum
            try helper.addPack(index, 2, Array(all[500..<1500]))
        }
        do {
            let index = try open()
            #expect(try index.missing(Array(all[0..<1600])) == Set(all[1500..<1600]))
            #expect(index.idTableCount == 1500)
            try helper.addPack(index, 3, Array(all[1500..<1800]))  // 300: less than a quarter
        }
        do {
            let index = try open()
            #expect(try index.missing(all) == Set(all[1800...]))
            #expect(index.idTableCount == 1500)
            try helper.addPack(index, 4, Array(all[1800...]))
        }
        let index = try open()
        #expect(try index.missing(all + helper.ids(0..<10, salt: 4)) == Set(helper.ids(0..<10, salt: 4)))
        #expect(index.idTableCount == 2100)
    }

    @Test("removed packs: their ids are reported missing, by a connection holding the table and by a new one")
    func removedPacks() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("index.sqlite")
        let a = helper.ids(0..<600)
        let b = helper.ids(600..<1200)
        let held = try RepositoryIndex(path: path, repositoryID: "r", idTableMinimum: 1000)
        try helper.addPack(held, 1, a)
        try helper.addPack(held, 2, b)
        #expect(try held.missing(a + b).isEmpty)
        #expect(held.idTableCount == 1200)
        do {
            let other = try RepositoryIndex(path: path, repositoryID: "r", idTableMinimum: 1_000_000)
            try other.removePacks([helper.pack(2)])
        }
        #expect(try held.missing(a + b) == Set(b))
        #expect(try !held.contains(b[0]))
        do {
            let fresh = try RepositoryIndex(path: path, repositoryID: "r", idTableMinimum: 1_000_000)
            #expect(try fresh.missing(a + b) == Set(b))
            #expect(fresh.idTableCount == nil)
        }
        // Everything removed and one pack indexed again: the old table (still on disk,
        // listing both packs) must not match the new rows.
        do {
            let other = try RepositoryIndex(path: path, repositoryID: "r", idTableMinimum: 1_000_000)
            try other.removePacks([helper.pack(1)])
            try helper.addPack(other, 1, a)
        }
        let fresh = try RepositoryIndex(path: path, repositoryID: "r", idTableMinimum: 1_000_000)
        #expect(try fresh.missing(a + b) == Set(b))
    }
}
