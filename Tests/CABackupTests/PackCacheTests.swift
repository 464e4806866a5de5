import Foundation
import Synchronization
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat
@testable import CABackupStorage

/// A local directory that presents itself as remote storage (no working directory, not
/// trusted), counting the ranged reads of packs it serves.
final class CountingRemoteStorage: Storage, @unchecked Sendable {
    // Safe: `inner` is thread-safe, the counter is atomic.
    let inner: LocalStorage
    let packReads = Atomic<Int>(0)
    var location: String { "remote:" + inner.location }

    init(path: String) { inner = LocalStorage(path: path, durable: false) }

    func create() throws { try inner.create() }
    func list(_ kind: FileKind) throws -> [String] { try inner.list(kind) }
    func stat(_ kind: FileKind, _ name: String) throws -> Int64? { try inner.stat(kind, name) }
    func read(_ kind: FileKind, _ name: String) throws -> [UInt8] { try inner.read(kind, name) }
    func read(
        _ kind: FileKind, _ name: String, offset: Int64, length: Int, into buffer: UnsafeMutableRawPointer
    ) throws {
        if kind == .pack { packReads.add(1, ordering: .relaxed) }
        try inner.read(kind, name, offset: offset, length: length, into: buffer)
    }
    func put(_ kind: FileKind, _ name: String, bytes: UnsafeRawBufferPointer) throws {
        try inner.put(kind, name, bytes: bytes)
    }
    func put(_ kind: FileKind, _ name: String, file path: String) throws {
        // Copied, not renamed: like an upload, the staging file is consumed.
        let bytes = try readSmallFile(path, limit: 256 << 20)
        unlink(path)
        try bytes.withUnsafeBytes { try inner.put(kind, name, bytes: $0) }
    }
    func remove(_ kind: FileKind, _ name: String) throws { try inner.remove(kind, name) }
}

@Suite("the pack cache: trees of a remote repository come from this device's disk", .serialized)
struct PackCacheTests {
    /// A repository on counting storage with `directories` directories snapshotted.
    func repository(_ dir: TemporaryDirectory, directories: Int) throws -> (Repository, CountingRemoteStorage) {
        let storage = CountingRemoteStorage(path: dir.file("repo"))
        let repo = try Repository.initialize(
            storage: storage, password: testPassword, chunker: smallParameters, kdf: .insecureFastForTesting,
            durable: false)
        for i in 0..<directories { dir.write("src/d\(i)/f.txt", Array("file \(i)\n".utf8)) }
        _ = try repo.snapshot(paths: [dir.file("src")])
        return (repo, storage)
    }

    @Test("a new device fetches whole tree packs, then walks without a request per directory")
    func fewReads() throws {
        let dir = TemporaryDirectory()
        let (repo, storage) = try repository(dir, directories: 200)
        let cache = try #require(repo.packCache)
        defer { try? FileManager.default.removeItem(atPath: cache.directory) }
        // This device linked its tree packs into the cache as it stored them.
        let treePacks = try repo.index.packsHolding(.tree)
        #expect(!treePacks.isEmpty)
        for (id, _) in treePacks { #expect(fileExists(cache.path(id))) }

        // As a new device: nothing cached.
        try FileManager.default.removeItem(atPath: cache.directory)
        let fresh = try Repository.open(storage: storage, passwordProvider: { testPassword }, durable: false)
        storage.packReads.store(0, ordering: .relaxed)
        let snap = try #require(try fresh.snapshots().last)
        var names = 0
        try fresh.list(snap) { _ in names += 1 }
        #expect(names >= 400)
        #expect(storage.packReads.load(ordering: .relaxed) <= treePacks.count, "a read per tree pack at most")
        storage.packReads.store(0, ordering: .relaxed)
        try fresh.list(snap) { _ in }
        #expect(storage.packReads.load(ordering: .relaxed) == 0)

        // Without a cache every directory costs a read.
        let uncached = try Repository.open(storage: storage, passwordProvider: { testPassword }, durable: false)
        uncached.cacheLimit = 0
        try FileManager.default.removeItem(atPath: cache.directory)
        storage.packReads.store(0, ordering: .relaxed)
        try uncached.list(snap) { _ in }
        #expect(storage.packReads.load(ordering: .relaxed) > 200)
        #expect(!fileExists(cache.directory + "/" + treePacks[0].0.hex.prefix(2)))
    }

    @Test("the cache keeps within its limit, dropping the packs used least recently")
    func bounded() throws {
        let dir = TemporaryDirectory()
        let (repo, _) = try repository(dir, directories: 10)
        let cache = try #require(repo.packCache)
        defer { try? FileManager.default.removeItem(atPath: cache.directory) }
        // More snapshots, each adding a tree pack of its own.
        for i in 0..<4 {
            dir.write("src/new\(i)/f.txt", Array("new \(i)\n".utf8))
            _ = try repo.snapshot(paths: [dir.file("src")])
        }
        let packs = try repo.index.packsHolding(.tree)
        #expect(packs.count == 5)
        // The oldest used first: make the first two the least recently used.
        for (k, (id, _)) in packs.enumerated() {
            var times = [timespec(tv_sec: 1_000_000 + k, tv_nsec: 0), timespec(tv_sec: 1_000_000 + k, tv_nsec: 0)]
            #expect(utimensat(AT_FDCWD, cache.path(id), &times, 0) == 0)
        }
        let sizes = packs.map(\.1)
        let keep = sizes[2...].reduce(0, +)
        cache.limit = keep
        cache.trim()
        #expect(!fileExists(cache.path(packs[0].0)) && !fileExists(cache.path(packs[1].0)))
        for (id, _) in packs[2...] { #expect(fileExists(cache.path(id))) }
        // What is dropped is fetched again when needed; walks still work.
        let snap = try #require(try repo.snapshots().first)
        try repo.list(snap) { _ in }
    }
}
