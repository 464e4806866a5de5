import Foundation
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

@Suite("On-disk formats")
struct FormatTests {
    func sampleEntries() -> [PackEntry] {
        var offset: Int64 = 0
        return (0..<5).map { i in
            let len = 100 + i * 37
            defer { offset += Int64(len) }
            return PackEntry(
                id: sha256([UInt8(i)]), type: i == 4 ? .tree : .data, compression: i % 2 == 0 ? .lz4 : .none,
                offset: offset, length: len, rawLength: i % 2 == 0 ? len * 3 : len)
        }
    }

    @Test("pack header: write then parse gives the same entries")
    func packRoundTrip() throws {
        let entries = sampleEntries()
        let body = entries.reduce(0) { $0 + $1.length }
        let header = PackFormat.encodeHeader(entries)
        let size = Int64(body + header.count)
        let hlen = try PackFormat.parseTrailer(Array(header.suffix(8)), packSize: size)
        #expect(hlen == header.count - 8)
        #expect(try PackFormat.parseHeader(Array(header.prefix(hlen)), packSize: size) == entries)
    }

    @Test("pack header: wrong magic, bad length, truncation and size mismatch are refused")
    func packErrors() throws {
        let entries = sampleEntries()
        let body = entries.reduce(0) { $0 + $1.length }
        let header = PackFormat.encodeHeader(entries)
        let size = Int64(body + header.count)
        var badMagic = Array(header.suffix(8))
        badMagic[7] ^= 1
        #expect(throws: PackError.self) { try PackFormat.parseTrailer(badMagic, packSize: size) }
        var badLen = Array(header.suffix(8))
        badLen[3] = 0x7F
        #expect(throws: PackError.self) { try PackFormat.parseTrailer(badLen, packSize: size) }
        #expect(throws: PackError.self) { try PackFormat.parseTrailer(Array(header.suffix(8)), packSize: 3) }
        let h = Array(header.prefix(header.count - 8))
        #expect(throws: PackError.self) { try PackFormat.parseHeader(Array(h.dropLast()), packSize: size - 1) }
        #expect(throws: PackError.self) { try PackFormat.parseHeader(h, packSize: size + 1) }
        var unknownType = h
        unknownType[6] = 9
        #expect(throws: PackError.self) { try PackFormat.parseHeader(unknownType, packSize: size) }
    }

    func sampleNodes() -> [Node] {
        var file = Node(name: Array("file.txt".utf8), type: .file)
        file.mode = 0o644
        file.uid = 1000
        file.gid = 100
        file.size = 5_000_000_000
        file.mtimeNs = 1_600_000_000_123_456_789
        file.ctimeNs = -5
        file.inode = 42
        file.device = 2049
        file.links = 2
        file.content = [sha256([1]), sha256([2])]
        var dir = Node(name: [0xFF, 0x0A, 0x41], type: .directory)
        dir.mode = 0o1777
        dir.subtrees = [sha256([3])]
        var link = Node(name: Array("l".utf8), type: .symlink)
        link.linkTarget = [0x2E, 0x2E, 0x2F, 0xE9]
        var dev = Node(name: Array("null".utf8), type: .characterDevice)
        dev.rdev = 259
        return [file, dir, link, dev, Node(name: Array("p".utf8), type: .fifo)]
    }

    @Test("tree: encode then decode gives the same nodes, names as raw bytes")
    func treeRoundTrip() throws {
        let nodes = sampleNodes()
        let parts = TreeCodec.encodeParts(nodes)
        #expect(parts.count == 1)
        #expect(try TreeCodec.decode(parts[0]) == nodes)
    }

    @Test("tree: fields from a newer version are skipped by this reader")
    func treeForwardCompatible() throws {
        let node = sampleNodes()[0]
        var w = ByteWriter()
        TreeCodec.encode(node, into: &w)
        // Re-frame the entry with an extra field (tag 99, 3 bytes) appended.
        var r = ByteReader(w.bytes)
        let len = Int(try r.varint())
        var fields = Array(try r.bytes(len))
        fields += [99, 3, 0xAA, 0xBB, 0xCC]
        var framed = ByteWriter()
        framed.u8(1)
        framed.varint(UInt64(fields.count))
        framed.append(fields)
        #expect(try TreeCodec.decode(framed.bytes) == [node])
    }

    @Test("tree: extended attributes, data ranges and inode flags round-trip; unset ones cost no bytes")
    func treeExtendedMetadata() throws {
        var file = Node(name: Array("sparse.img".utf8), type: .file)
        file.size = 1 << 30
        file.xattrs = [
            ExtendedAttribute(name: Array("security.capability".utf8), value: [1, 0, 0, 2, 0x20, 0, 0, 0]),
            ExtendedAttribute(name: Array("user.empty".utf8), value: []),
            ExtendedAttribute(name: Array("user.x".utf8), value: Array(repeating: 0xFF, count: 300)),
        ]
        file.dataRanges = [FileRange(offset: 0, length: 4096), FileRange(offset: 1 << 29, length: 8192)]
        file.flags = InodeFlags.immutable | InodeFlags.nodump
        var link = Node(name: Array("link".utf8), type: .symlink)
        link.linkTarget = Array("sparse.img".utf8)
        link.xattrs = [ExtendedAttribute(name: Array("trusted.t".utf8), value: Array("v".utf8))]
        let plain = sampleNodes()[0]
        let nodes = [plain, file, link].sorted { $0.name.lexicographicallyPrecedes($1.name) }
        #expect(try TreeCodec.decode(TreeCodec.encodeSingle(nodes)) == nodes)
        // A node without them encodes exactly as before they existed.
        var bare = ByteWriter()
        TreeCodec.encode(plain, into: &bare)
        var withEmpty = plain
        withEmpty.xattrs = []
        withEmpty.dataRanges = []
        var again = ByteWriter()
        TreeCodec.encode(withEmpty, into: &again)
        #expect(bare.bytes == again.bytes)
        // Flags outside the kept set are dropped on decode.
        var odd = plain
        odd.flags = 0x80 | InodeFlags.appendOnly
        #expect(try TreeCodec.decode(TreeCodec.encodeSingle([odd]))[0].flags == InodeFlags.appendOnly)
    }

    @Test("tree: unsorted or repeated attributes, overlapping ranges and short values are refused")
    func treeExtendedMetadataMalformed() throws {
        func entry(_ tag: UInt8, _ value: [UInt8]) -> [UInt8] {
            var fields = ByteWriter()
            fields.append([1, 1, 0x61, 2, 1, 1])  // name "a", type file
            fields.varint(UInt64(tag))
            fields.varint(UInt64(value.count))
            fields.append(value)
            var w = ByteWriter()
            w.u8(1)
            w.varint(UInt64(fields.bytes.count))
            w.append(fields.bytes)
            return w.bytes
        }
        let b = Array("b".utf8)
        let a = Array("a".utf8)
        #expect(try TreeCodec.decode(entry(16, [1] + a + [0] + [1] + b + [1, 7]))[0].xattrs.count == 2)
        #expect(throws: FormatError.self) { try TreeCodec.decode(entry(16, [1] + b + [0] + [1] + a + [0])) }
        #expect(throws: FormatError.self) { try TreeCodec.decode(entry(16, [1] + a + [0] + [1] + a + [0])) }
        #expect(throws: FormatError.self) { try TreeCodec.decode(entry(16, [1] + a + [5, 1])) }
        #expect(throws: FormatError.self) { try TreeCodec.decode(entry(16, [0, 0])) }
        #expect(try TreeCodec.decode(entry(17, [0, 10, 20, 5]))[0].dataRanges.count == 2)
        #expect(throws: FormatError.self) { try TreeCodec.decode(entry(17, [0, 10, 5, 5])) }
        #expect(throws: FormatError.self) { try TreeCodec.decode(entry(17, [0, 0])) }
        #expect(throws: (any Error).self) { try TreeCodec.decode(entry(17, [0])) }
    }

    @Test("tree: large directories are split into bounded parts")
    func treeSplitting() throws {
        let nodes = (0..<20000).map { i -> Node in
            var n = Node(name: Array(String(format: "file-%08d-with-a-longish-name", i).utf8), type: .file)
            n.content = [sha256([UInt8(i & 0xFF)])]
            return n
        }
        let parts = TreeCodec.encodeParts(nodes)
        #expect(parts.count > 1)
        #expect(parts.allSatisfy { $0.count <= TreeCodec.partLimit })
        #expect(try parts.flatMap { try TreeCodec.decode($0) } == nodes)
    }

    @Test("tree: entries encoded one at a time make the same blobs, each as full as it can be")
    func treeEncoderSplitRule() throws {
        // Entries of varied sizes, so parts end at varied places.
        let nodes = (0..<30000).map { i -> Node in
            var n = Node(
                name: Array(String(format: "entry-%08d", i).utf8) + Array(repeating: 0x61, count: i % 97), type: .file)
            n.content = (0..<(i % 5)).map { sha256([UInt8(i & 0xFF), UInt8($0)]) }
            return n
        }
        var encoder = TreeEncoder()
        var parts = nodes.compactMap { encoder.append($0) }
        parts.append(encoder.finish())
        #expect(parts == TreeCodec.encodeParts(nodes))
        #expect(parts.count > 2)
        // Greedy: every part but the last would pass the limit with the next entry added.
        var next = 0
        for (k, part) in parts.enumerated() {
            let decoded = try TreeCodec.decode(part)
            #expect(decoded == Array(nodes[next..<next + decoded.count]))
            next += decoded.count
            #expect(part.count <= TreeCodec.partLimit)
            if k < parts.count - 1 {
                #expect(part.count + TreeCodec.encodeSingle([nodes[next]]).count - 1 > TreeCodec.partLimit)
            }
        }
        #expect(next == nodes.count)
        // The root's encoder never splits; an empty directory is one empty tree.
        var root = TreeEncoder(splitting: false)
        for n in nodes { #expect(root.append(n) == nil) }
        #expect(try TreeCodec.decode(root.finish()) == nodes)
        var empty = TreeEncoder()
        #expect(try TreeCodec.decode(empty.finish()).isEmpty)
    }

    @Test("tree: truncated or garbage input throws, never traps")
    func treeGarbage() {
        let bytes = TreeCodec.encodeParts(sampleNodes())[0]
        for cut in stride(from: 1, to: bytes.count, by: 7) {
            _ = try? TreeCodec.decode(Array(bytes.prefix(cut)))
        }
        #expect(throws: FormatError.self) { try TreeCodec.decode(Array(bytes.prefix(bytes.count - 3))) }
        #expect(throws: FormatError.self) { try TreeCodec.decode([2]) }
        for seed in 0..<200 {
            var junk = pseudoRandomBytes(count: 64, seed: UInt64(seed))
            junk[0] = 1
            _ = try? TreeCodec.decode(junk)
        }
    }

    @Test("config: newer format versions and malformed files get clear errors")
    func configErrors() throws {
        let good = RepositoryConfig.makeNew()
        #expect(try RepositoryConfig.decode(good.encoded(), path: "c") == good)
        var newer = good
        newer.formatVersion = 99
        #expect {
            try RepositoryConfig.decode(newer.encoded(), path: "c")
        } throws: { e in
            guard case .unsupportedVersion(99, RepositoryConfig.currentFormatVersion) = e as? CABackupError else {
                return false
            }
            return "\(e)".contains("upgrade cabackup")
        }
        #expect(throws: CABackupError.self) { try RepositoryConfig.decode(Array("garbage".utf8), path: "c") }
        #expect(throws: CABackupError.self) {
            try RepositoryConfig.decode(Array("{\"format_version\":1}".utf8), path: "c")
        }
    }

    @Test("snapshot record: the JSON parses back, and damaged JSON is refused")
    func snapshotRecord() throws {
        let bytes = Snapshot.encodeRecord(
            time: formatRFC3339(ns: 1_700_000_000_000_000_001), hostname: "h", username: "u", paths: ["/a"],
            tags: ["t"], parent: nil, tree: sha256([9]), summary: SnapshotSummary())
        let s = try Snapshot.decode(id: sha256(bytes), json: bytes)
        #expect(s.timeNs == 1_700_000_000_000_000_001)
        #expect(s.tree == sha256([9]))
        #expect(throws: CABackupError.self) { try Snapshot.decode(id: sha256(bytes), json: Array(bytes.dropLast())) }
    }

    @Test("RFC 3339 times round-trip with nanoseconds, before and after 1970")
    func times() {
        for ns: Int64 in [0, 1, 1_700_000_000_123_456_789, -1_000_000_001, 4_102_444_800_999_999_999] {
            #expect(parseRFC3339(formatRFC3339(ns: ns)) == ns)
        }
        #expect(parseRFC3339("2026-11-25T04:32:34Z") == 1_795_581_154_000_000_000)
        #expect(parseRFC3339("yesterday") == nil)
        // Found by the fuzzer: a year past 2262 overflowed Int64 nanoseconds and trapped.
        #expect(parseRFC3339("9999-12-31T23:59:59Z") == nil)
        #expect(parseRFC3339("2026-13-01T00:00:00Z") == nil)
    }

    @Test("ids: hex round trip and ordering by bytes")
    func ids() {
        let a = sha256([1])
        #expect(ObjectID(hex: a.hex) == a)
        #expect(ObjectID(hex: "xyz") == nil)
        #expect(ObjectID(hex: String(repeating: "g", count: 64)) == nil)
        let ids = (0..<50).map { sha256([UInt8($0)]) }
        #expect(ids.sorted().map(\.hex) == ids.map(\.hex).sorted())
        // SHA-256("abc"), FIPS 180-2 example.
        #expect(sha256(Array("abc".utf8)).hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    @Test("LZ4 round trip, and malformed input is rejected")
    func lz4() {
        let data = Array(String(repeating: "compressible text ", count: 1000).utf8)
        var out = [UInt8](repeating: 0, count: LZ4.bound(data.count))
        let n = data.withUnsafeBytes { src in out.withUnsafeMutableBytes { LZ4.compress(src, into: $0) } }!
        #expect(n < data.count / 4)
        var back = [UInt8](repeating: 0, count: data.count)
        let ok = out.withUnsafeBytes { src in
            back.withUnsafeMutableBytes { LZ4.decompress(UnsafeRawBufferPointer(rebasing: src[0..<n]), into: $0) }
        }
        #expect(ok && back == data)
        var bad = Array(out[0..<n])
        bad[n / 2] ^= 0xFF
        bad[1] = 0xFF
        let rejected = bad.withUnsafeBytes { src in back.withUnsafeMutableBytes { !LZ4.decompress(src, into: $0) } }
        #expect(rejected || back != data)
    }
}
