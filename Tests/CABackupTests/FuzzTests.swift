import Foundation
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

/// A seeded random mutator over the parsers of everything read from a repository: they
/// must reject damaged input with an error, never crash. Seeds are real encoded objects.
/// CI runs 100,000 mutations per parser; `CABACKUP_FUZZ_ITERATIONS` runs more.
@Suite("Parser fuzzing (seeded mutations)")
struct FuzzTests {
    static let iterations = Int(ProcessInfo.processInfo.environment["CABACKUP_FUZZ_ITERATIONS"] ?? "") ?? 100_000

    /// Flips, overwrites, inserts, deletes or truncates a few bytes.
    static func mutate(_ input: [UInt8], _ rng: inout SplitMix64) -> [UInt8] {
        var b = input
        for _ in 0..<(1 + Int(rng.next() % 4)) {
            let op = rng.next() % 6
            let pos = b.isEmpty ? 0 : Int(rng.next() % UInt64(b.count))
            switch op {
            case 0 where !b.isEmpty: b[pos] ^= UInt8(1 << (rng.next() % 8))
            case 1 where !b.isEmpty: b[pos] = UInt8(truncatingIfNeeded: rng.next())
            case 2: b.insert(UInt8(truncatingIfNeeded: rng.next()), at: pos)
            case 3 where !b.isEmpty: b.remove(at: pos)
            case 4: b = Array(b.prefix(pos))
            default:
                // An interesting value at a random place: lengths and counts live there.
                let values: [UInt8] = [0x00, 0x7F, 0x80, 0xFF]
                if !b.isEmpty { b[pos] = values[Int(rng.next() % 4)] }
            }
        }
        return b
    }

    func run(_ seeds: [[UInt8]], seed: UInt64, _ parse: ([UInt8]) throws -> Void) -> (accepted: Int, rejected: Int) {
        var rng = SplitMix64(seed: seed)
        var accepted = 0
        var rejected = 0
        for i in 0..<Self.iterations {
            let input = Self.mutate(seeds[i % seeds.count], &rng)
            do {
                try parse(input)
                accepted += 1
            } catch {
                rejected += 1
            }
        }
        return (accepted, rejected)
    }

    @Test("tree blobs")
    func trees() {
        var file = Node(name: Array("f.txt".utf8), type: .file)
        file.content = [sha256([1]), sha256([2])]
        file.size = 123
        var dir = Node(name: [0xFF, 0x41], type: .directory)
        dir.subtrees = [sha256([3])]
        var link = Node(name: Array("l".utf8), type: .symlink)
        link.linkTarget = Array("../x".utf8)
        let seeds = [TreeCodec.encodeSingle([file, dir, link]), TreeCodec.encodeSingle([file])]
        let r = run(seeds, seed: 1) { _ = try TreeCodec.decode($0) }
        #expect(r.rejected > Self.iterations / 4)
    }

    @Test("pack headers and trailers")
    func packs() {
        var offset: Int64 = 0
        let entries = (0..<4).map { i -> PackEntry in
            defer { offset += 100 }
            return PackEntry(
                id: sha256([UInt8(i)]), type: .data, compression: .lz4, offset: offset, length: 100, rawLength: 300)
        }
        // Plain and sealed headers; the sealed one is parsed with the key (authentication
        // must reject every change) and without it (only the clear part is read).
        let aead = AESGCM(key: [UInt8](repeating: 3, count: 32))
        let seeds = [PackFormat.encodeHeader(entries), PackFormat.encodeHeader(entries, aead: aead)]
        let r = run(seeds, seed: 2) { h in
            let size = Int64(400 + h.count)
            guard h.count >= 8 else { throw PackError.truncated(size: Int64(h.count)) }
            let n = try PackFormat.parseTrailer(Array(h.suffix(8)), packSize: size)
            // The harness holds only the tail of the pack; a length reaching into the
            // (absent) blob area is read as zeros, as a reader would read real bytes there.
            let header =
                n <= h.count - 8 ? Array(h[(h.count - 8 - n)..<(h.count - 8)]) : [UInt8](repeating: 0, count: n)
            _ = try? PackFormat.parseClearHeader(header, packSize: size)
            _ = try PackFormat.parseHeader(
                header, packSize: size, aead: header.count > 1 && header[1] == 1 ? aead : nil)
        }
        #expect(r.rejected > Self.iterations / 4)
    }

    @Test("zstd frames, decoded into exactly the raw length")
    func zstdFrames() {
        let codec = BlobCodec(keys: nil, compression: .zstd)
        let raws = [
            Array(String(repeating: "zstd fuzz seed text ", count: 200).utf8),
            pseudoRandomBytes(count: 1500, seed: 9) + [UInt8](repeating: 7, count: 2500),
        ]
        let seeds = raws.map { raw in Array(raw.withUnsafeBytes { codec.encode($0).1 }) }
        var output = [UInt8](repeating: 0, count: 4002)
        let r = run(seeds, seed: 5) { frame in
            // Two guard bytes around the 4,000 the header would promise.
            output[0] = 0xEE
            output[4001] = 0xEE
            let ok = frame.withUnsafeBytes { src in
                output.withUnsafeMutableBytes { dst in
                    codec.decompress(src, .zstd, into: UnsafeMutableRawBufferPointer(rebasing: dst[1..<4001]))
                }
            }
            #expect(output[0] == 0xEE && output[4001] == 0xEE)
            if !ok { throw PackError.badHeader("does not decode") }
        }
        #expect(r.rejected > Self.iterations / 2)
    }

    @Test("snapshot records")
    func snapshots() {
        let record = Snapshot.encodeRecord(
            time: formatRFC3339(ns: 1_700_000_000_000_000_000), hostname: "h", username: "u", paths: ["/a"],
            tags: ["t"], parent: sha256([7]), tree: sha256([8]), summary: SnapshotSummary())
        // The id is taken from the mutated bytes, so the parser itself is exercised.
        let r = run([record], seed: 3) { _ = try Snapshot.decode(id: sha256($0), json: $0) }
        #expect(r.rejected > 0)
    }

    @Test("configs")
    func configs() {
        let keys = RepositoryKeys(bytes: [UInt8](repeating: 5, count: 64))
        let seeds = [
            RepositoryConfig.makeNew().encoded(), RepositoryConfig.makeNew(encrypted: true).encoded(keys: keys),
            RepositoryConfig.makeNew(encrypted: true, compression: .zstd).encoded(keys: keys),
        ]
        let r = run(seeds, seed: 4) {
            _ = try ConfigFile.decode($0, path: "config").resolve(keys: keys, path: "config")
        }
        #expect(r.rejected > 0)
    }
}
