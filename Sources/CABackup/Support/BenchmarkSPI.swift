import CABackupCore
import CABackupFormat
/// The engine's inner primitives, for the benchmark suite in `Benchmarks/` to measure
/// alone. Not API: `@_spi(Benchmarks)` may change without notice.
@_spi(Benchmarks) public enum Primitives {
    /// A reusable SHA-256 context (libcrypto EVP), as each archiver worker holds one.
    public final class Hasher {
        private let hasher = SHA256Hasher()
        public init() {}
        public func hash(_ buf: UnsafeRawBufferPointer) -> ObjectID { hasher.hash(buf) }
    }

    public static func lz4Bound(_ count: Int) -> Int { LZ4.bound(count) }

    public static func lz4Compress(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer) -> Int? {
        LZ4.compress(src, into: dst)
    }

    public static func lz4Decompress(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer) -> Bool {
        LZ4.decompress(src, into: dst)
    }
}

/// The SQLite index on its own, for the index benchmark (10M blob ids).
@_spi(Benchmarks) public final class IndexBenchmarkHandle {
    private let index: RepositoryIndex

    /// Opens or creates an index file for a made-up repository id.
    public init(path: String) throws {
        index = try RepositoryIndex(path: path, repositoryID: "benchmark")
    }

    /// Records `ids` as the blobs of one made-up pack (one transaction).
    public func addPack(_ pack: PackID, ids: [BlobID]) throws {
        var offset: Int64 = 0
        let entries = ids.map { id -> PackEntry in
            defer { offset += 1000 }
            return PackEntry(id: id, type: .data, compression: .lz4, offset: offset, length: 1000, rawLength: 2000)
        }
        try index.addPack(pack, size: offset, entries: entries)
    }

    /// The question the archiver asks for every chunk: is it stored already?
    public func contains(_ id: BlobID) throws -> Bool { try index.contains(id) }

    /// The same question for a batch, in one read transaction (as the parent check asks it).
    public func missing(_ ids: [BlobID]) throws -> Set<BlobID> { try index.missing(ids) }

    public var blobCount: Int { (try? index.counts().blobs) ?? 0 }
}

@_spi(Benchmarks) extension Repository {
    /// Stores `blobs` as data blobs through the real pack writer (dedup, LZ4, sealing when encrypted, packs,
    /// fsync, index) without chunking: the pack-writing stage alone.
    public func storeBlobsForBenchmark(_ blobs: [[UInt8]]) throws {
        let codec = makeCodec()
        _ = try withBlobWriter { saver in
            for b in blobs {
                try b.withUnsafeBytes { (raw) throws in
                    let id = codec.id(raw)
                    guard try saver.claim(id) else { return }
                    try saver.addEncoding(id, type: .data, raw: raw, codec: codec)
                }
            }
        }
    }
}
