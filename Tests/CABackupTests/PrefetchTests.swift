import Foundation
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

@Suite("Snapshot: listings made ahead of the walk give the same snapshot")
struct PrefetchTests {
    func makeTree(_ dir: TemporaryDirectory) {
        dir.write("src/a/one.txt", Array("one\n".utf8))
        dir.write("src/a/deep/two.bin", pseudoRandomBytes(count: 40_000, seed: 2))
        dir.write("src/a/skip.log", Array("log\n".utf8))
        dir.write("src/b/three.txt", Array(String(repeating: "three\n", count: 500).utf8))
        dir.write("src/b-c/four.txt", Array("four\n".utf8))  // sorts before "b/" bytewise
        for i in 0..<30 { dir.write("src/many/f\(i)", Array("file \(i)\n".utf8)) }
        symlink("a/one.txt", dir.file("src/link"))
    }

    @Test("an unchanged re-snapshot with a prefetch records exactly what one without records")
    func sameTree() throws {
        let dir = TemporaryDirectory()
        makeTree(dir)
        let repo = try makeTestRepository(dir)
        // Roots out of walk order, one inside another, and an exclude.
        let paths = [dir.file("src/b"), dir.file("src/a"), dir.file("src/a/deep"), dir.file("src/many")]
        _ = try repo.snapshot(paths: paths, options: SnapshotOptions(excludes: ["*.log"]))

        // A small budget: the prefetch waits for the walk, and leaves "many" (30 entries)
        // to it.
        let prefetch = TreePrefetch(paths: paths, excludes: ["*.log"], budget: 8)
        var options = SnapshotOptions(excludes: ["*.log"])
        options.prefetch = prefetch
        let with = try repo.snapshot(paths: paths, options: options)
        #expect(prefetch.directoriesTaken == 3)  // a, a/deep, b
        #expect(with.warnings.isEmpty)
        #expect(with.snapshot.summary.filesUnchanged == 33)
        let without = try repo.snapshot(paths: paths, options: SnapshotOptions(excludes: ["*.log"]))
        // Compared below the temporary directory: the root tree also holds /tmp, which
        // tests running alongside change.
        let src = dir.file("src")
        #expect(
            try repo.entry(in: with.snapshot, at: src).node == repo.entry(in: without.snapshot, at: src).node)
    }

    @Test(
        "after the listing: an unchanged file is as listed, a file to read is read as it is now, a changed directory is read again"
    )
    func changesAfterListing() throws {
        let dir = TemporaryDirectory()
        makeTree(dir)
        let repo = try makeTestRepository(dir)
        let src = dir.file("src")
        _ = try repo.snapshot(paths: [src])
        func append(_ name: String, _ text: String) throws {
            let handle = try #require(FileHandle(forWritingAtPath: dir.file(name)))
            handle.seekToEndOfFile()
            handle.write(Data(text.utf8))
            handle.closeFile()
        }
        try append("src/b/three.txt", "first\n")  // changed since the parent: to be read

        let prefetch = TreePrefetch(paths: [src])
        prefetch.waitUntilListed()
        let listed = wallClockNs()
        // In place (their directories' mtimes stay, so those listings are used).
        try append("src/b/three.txt", "appended\n")
        try append("src/a/one.txt", "late\n")
        // A new file: its directory changed, so that listing is not used.
        dir.write("src/many/new", Array("new\n".utf8))
        var options = SnapshotOptions()
        options.prefetch = prefetch
        let with = try repo.snapshot(paths: [src], options: options)
        #expect(with.warnings.isEmpty, "\(with.warnings)")  // three.txt was stated again before reading
        #expect(prefetch.directoriesTaken >= 3)
        #expect(with.snapshot.timeNs < listed)

        let target = dir.file("restored")
        _ = try repo.restore(with.snapshot, to: target)
        func restored(_ name: String) -> String? {
            FileManager.default.contents(atPath: target + src + "/" + name).map { String(decoding: $0, as: UTF8.self) }
        }
        #expect(restored("b/three.txt")?.hasSuffix("first\nappended\n") == true)
        #expect(restored("a/one.txt") == "one\n")  // as listed, before the append
        #expect(restored("many/new") == "new\n")

        // The next snapshot sees what changed after the listing.
        let next = try repo.snapshot(paths: [src])
        let again = dir.file("restored-again")
        _ = try repo.restore(next.snapshot, to: again)
        #expect(FileManager.default.contents(atPath: again + src + "/a/one.txt") == Data("one\nlate\n".utf8))
    }

    @Test("hundreds of directories through a small queue: every listing is taken, in order")
    func manyDirectories() throws {
        let dir = TemporaryDirectory()
        for i in 0..<300 { dir.write("wide/d\(1000 + i)/f", Array("\(i)\n".utf8)) }
        let repo = try makeTestRepository(dir)
        let wide = dir.file("wide")
        _ = try repo.snapshot(paths: [wide])
        let prefetch = TreePrefetch(paths: [wide], budget: 400)
        var options = SnapshotOptions()
        options.prefetch = prefetch
        let with = try repo.snapshot(paths: [wide], options: options)
        #expect(prefetch.directoriesTaken == 301)
        #expect(with.snapshot.summary.filesUnchanged == 300)
        let again = try repo.snapshot(paths: [wide]).snapshot
        #expect(try repo.entry(in: again, at: wide).node == repo.entry(in: with.snapshot, at: wide).node)
    }

    @Test("a prefetch dropped unused, or finished early, stops its thread")
    func finishEarly() throws {
        let dir = TemporaryDirectory()
        makeTree(dir)
        do { _ = TreePrefetch(paths: [dir.file("src")], budget: 1) }  // deinit joins
        let p = TreePrefetch(paths: [dir.file("src")], budget: 1)
        p.finish()
        p.waitUntilListed()
        #expect(p.directoriesTaken == 0)
    }
}
