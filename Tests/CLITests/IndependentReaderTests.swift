import Foundation
import Testing

/// The independent reader of repositories (Python, written from docs/format.md).
let repotool = packageRoot + "/Tests/CLITests/repotool.py"

/// What cabackup writes, read back by `repotool.py`, which knows the format only from
/// docs/format.md: packs found by their headers (never the index), every id verified, every
/// tree field decoded, each file reassembled from its blobs and compared with the source.
@Suite("Independent repository reader", .serialized)
struct IndependentReaderTests {
    /// A plaintext repository holding one snapshot of the treetool fixture at `src`.
    func setUp(_ s: Scratch) throws -> (repo: String, src: String) {
        let src = s.file("src")
        #expect(try python(treetool, "make", src).status == 0)
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo, "--no-encryption").status == 0)
        let snap = try cabackup("snapshot", "--repo", repo, src)
        #expect(snap.status == 0, "\(snap.stderr)")
        return (repo, src)
    }

    @Test("the reader finds every entry ls lists, and the snapshot matches its source on disk")
    func snapshotMatchesSource() throws {
        let s = Scratch()
        let (repo, src) = try setUp(s)
        let cmp = try python(repotool, "compare", repo, "latest", src)
        #expect(cmp.status == 0, "\(cmp.stdout)\(cmp.stderr)")
        #expect(cmp.lastLine.hasSuffix(" 0 differences"), "\(cmp.stdout)")
        let entries = try python(repotool, "entries", repo)
        #expect(entries.status == 0, "\(entries.stderr)")
        let ls = try cabackup("ls", "--repo", repo, "latest", "--json")
        #expect(ls.status == 0, "\(ls.stderr)")
        let listed = entries.stdout.split(separator: "\n").compactMap { jsonObject(String($0)) }
        let expected = ls.stdout.split(separator: "\n").compactMap { jsonObject(String($0)) }
        #expect(listed.count == expected.count && listed.count > 20)
        #expect(listed.map { $0["path"] as? String } == expected.map { $0["path"] as? String })
        #expect(listed.map { $0["path_b64"] as? String } == expected.map { $0["path_b64"] as? String })
        // Every tag the writer uses is one the format documents.
        #expect(listed.allSatisfy { ($0["unknown_tags"] as? [Int])?.isEmpty == true })
    }

    @Test("the comparison can fail: one changed byte, mtime put back, is reported by name")
    func changedByteIsReported() throws {
        let s = Scratch()
        let (repo, src) = try setUp(s)
        let flip = try python(
            "-c",
            """
            import os, sys
            p = sys.argv[1]
            st = os.stat(p)
            with open(p, "r+b") as f:
                f.seek(1000000)
                b = f.read(1)
                f.seek(1000000)
                f.write(bytes([b[0] ^ 1]))
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
            """, src + "/docs/nested/random.bin")
        #expect(flip.status == 0, "\(flip.stderr)")
        let cmp = try python(repotool, "compare", repo, "latest", src)
        #expect(cmp.status == 1, "\(cmp.stdout)\(cmp.stderr)")
        #expect(cmp.stdout.contains("/docs/nested/random.bin: content"), "\(cmp.stdout)")
        #expect(cmp.lastLine.hasSuffix(" 1 differences"), "\(cmp.stdout)")
    }

    @Test("the reader's self-test: tags 16-18, unknown tags and malformed trees, by hand")
    func selfTest() throws {
        let r = try python(repotool, "selftest")
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("selftest passed"))
    }

    @Test("one flipped byte in a pack is refused: by the pack's id, and renamed, by the blob's id")
    func damagedPackIsRefused() throws {
        let s = Scratch()
        let (repo, src) = try setUp(s)
        // Flips a byte in the middle of the largest pack's blobs; with "rename" the pack is
        // then named by its new SHA-256, so only the blob's own id can tell.
        let damage = """
            import hashlib, os, struct, sys
            packs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(sys.argv[1], "data")) for f in fs]
            p = max(packs, key=os.path.getsize)
            data = bytearray(open(p, "rb").read())
            header = struct.unpack("<I", data[-8:-4])[0]
            data[(len(data) - header - 8) // 2] ^= 1
            if sys.argv[2] == "rename":
                os.remove(p)
                name = hashlib.sha256(data).hexdigest()
                p = os.path.join(sys.argv[1], "data", name[:2], name)
            open(p, "wb").write(data)
            """
        for mode in ["flip", "rename"] {
            let copy = s.file("copy-" + mode)
            try FileManager.default.copyItem(atPath: repo, toPath: copy)
            let d = try python("-c", damage, copy, mode)
            #expect(d.status == 0, "\(d.stderr)")
            let cmp = try python(repotool, "compare", copy, "latest", src)
            #expect(cmp.status == 2, "\(mode): \(cmp.stdout)\(cmp.stderr)")
            let expected = mode == "flip" ? "damaged pack" : "damaged blob"
            #expect(cmp.stderr.contains(expected), "\(mode): \(cmp.stderr)")
        }
        // The undamaged repository still compares clean.
        #expect(try python(repotool, "compare", repo, "latest", src).status == 0)
    }
}
