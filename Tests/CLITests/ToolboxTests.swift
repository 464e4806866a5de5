import Foundation
import Testing

/// The commands around snapshot and restore that restic users reach for (issue 24).
@Suite("the toolbox: stats, tag, dump, find, rewrite, copy")
struct ToolboxTests {
    /// `stats --json` of `repo` with `args`.
    private func stats(_ repo: String, _ args: String...) throws -> [String: Any] {
        let r = try run(cabackupBinary, ["stats", "--repo", repo, "--json"] + args)
        #expect(r.status == 0, "\(r.stderr)")
        return jsonObject(r.stdout) ?? [:]
    }

    @Test("stats: restore size counts every snapshot's files, raw data counts each unique blob once")
    func statsModes() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src + "/sub", withIntermediateDirectories: true)
        // 3 MiB of random bytes twice (one copy deduplicates), a hard link, a small text.
        var random = [UInt8](repeating: 0, count: 3 << 20)
        for i in random.indices { random[i] = UInt8.random(in: 0...255) }
        try Data(random).write(to: URL(fileURLWithPath: src + "/a.bin"))
        try Data(random).write(to: URL(fileURLWithPath: src + "/sub/copy.bin"))
        try FileManager.default.linkItem(atPath: src + "/a.bin", toPath: src + "/sub/link.bin")
        try Data("hello\n".utf8).write(to: URL(fileURLWithPath: src + "/hello.txt"))
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, "--force", src).status == 0)

        let one = try stats(repo, "latest")
        #expect(one["snapshots_count"] as? Int == 1)
        #expect(one["total_file_count"] as? Int == 4)
        // The hard link's bytes once: a.bin, copy.bin and hello.txt.
        #expect(one["total_size"] as? Int == 2 * (3 << 20) + 6)
        let all = try stats(repo)
        #expect(all["snapshots_count"] as? Int == 2 && all["total_size"] as? Int == 2 * (2 * (3 << 20) + 6))

        // raw-data: the random bytes once, the text, and the trees; two snapshots of the
        // same tree reference the same blobs as one. Only the trees of the source's
        // ancestors may differ: other tests create and remove entries in the temporary
        // directory between the two snapshots, which changes its times.
        let raw = try stats(repo, "--mode", "raw-data")
        let rawOne = try stats(repo, "--mode", "raw-data", "latest")
        let uncompressed = try #require(raw["total_uncompressed_size"] as? Int)
        let uncompressedOne = try #require(rawOne["total_uncompressed_size"] as? Int)
        let blobs = try #require(raw["total_blob_count"] as? Int)
        let blobsOne = try #require(rawOne["total_blob_count"] as? Int)
        #expect(uncompressed > (3 << 20) + 6 && uncompressed < (3 << 20) + 6 + 64 * 1024, "\(raw)")
        let ancestors = src.split(separator: "/").count
        #expect(blobs >= blobsOne && blobs <= blobsOne + ancestors, "\(raw) \(rawOne)")
        #expect(uncompressed >= uncompressedOne && uncompressed < uncompressedOne + 4096, "\(raw) \(rawOne)")
        // Stored bytes are what the packs hold, less their headers.
        let stored = try #require(raw["total_size"] as? Int)
        let packs = try run("/usr/bin/du", ["-sb", "--apparent-size", repo + "/data"]).stdout
        let packBytes = Int(packs.split(separator: "\t").first ?? "") ?? 0
        #expect(stored > 3 << 20 && stored <= packBytes, "\(stored) of \(packBytes)")
        #expect((raw["space_saving"] as? Double ?? 0) > 0.7)

        // Bad input: one line, usage exit code.
        let bad = try cabackup("stats", "--repo", repo, "--mode", "everything")
        #expect(bad.status == 64 && bad.stderr.contains("restore-size or raw-data"))
        let missing = try cabackup("stats", "--repo", repo, "deadbeef00")
        #expect(missing.status != 0 && missing.stderr.contains("deadbeef00"))
        // Text mode names the figures.
        let text = try cabackup("stats", "--repo", repo, "--mode", "raw-data")
        #expect(text.stdout.contains("Total Blob Count:") && text.stdout.contains("Compression Ratio:"))
    }

    @Test("tag: add, remove and set rewrite the record under a new id; other devices see no rollback")
    func tags() throws {
        let s = Scratch()
        try Data("x".utf8).write(to: URL(fileURLWithPath: s.file("f")))
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, "--tag", "first", s.file("f")).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, s.file("f")).status == 0)
        // A second device, with its own record of what it saw.
        let laptop = ["XDG_CONFIG_HOME": s.file("laptop/config"), "XDG_CACHE_HOME": s.file("laptop/cache")]
        #expect(try cabackup("snapshots", "--repo", repo, env: laptop).status == 0)
        func tagsByTime() throws -> [[String]] {
            let out = try cabackup("snapshots", "--repo", repo, "--json").stdout
            let list = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [[String: Any]] ?? []
            return list.map { $0["tags"] as? [String] ?? [] }
        }
        let added = try cabackup("tag", "--repo", repo, "--add", "keep,daily", "latest")
        #expect(added.status == 0 && added.stdout.contains("1 snapshots changed"), "\(added.stdout)\(added.stderr)")
        #expect(try tagsByTime() == [["first"], ["keep", "daily"]])
        #expect(try cabackup("tag", "--repo", repo, "--tag", "daily", "--remove", "keep").status == 0)
        #expect(try tagsByTime() == [["first"], ["daily"]])
        #expect(try cabackup("tag", "--repo", repo, "--tag", "first", "--set", "archive").status == 0)
        #expect(try tagsByTime() == [["archive"], ["daily"]])
        // Nothing to change: no new record.
        let same = try cabackup("tag", "--repo", repo, "--add", "daily", "latest")
        #expect(same.stdout.contains("no snapshot changed"))
        // The rewritten records are intact.
        let records = try cabackup("snapshots", "--repo", repo, "--json").stdout
        #expect(try cabackup("check", "--repo", repo).status == 0)
        let quiet = try cabackup("snapshots", "--repo", repo, env: laptop)
        #expect(quiet.status == 0 && !quiet.stderr.contains("is gone"), "\(quiet.stderr)")
        // The same removal without the forget record is noticed (the check is live).
        let newest = try #require(
            (try JSONSerialization.jsonObject(with: Data(records.utf8)) as? [[String: Any]])?.last?["id"] as? String)
        #expect(try cabackup("snapshots", "--repo", repo, env: laptop).status == 0)
        try FileManager.default.removeItem(atPath: repo + "/snapshots/" + newest)
        let noticed = try cabackup("snapshots", "--repo", repo, env: laptop)
        #expect(noticed.stderr.contains("is gone"), "\(noticed.stderr)")
        // Bad input changes nothing.
        #expect(try cabackup("tag", "--repo", repo, "latest").status == 64)
        #expect(try cabackup("tag", "--repo", repo, "--add", "x").status == 64)
        #expect(try cabackup("tag", "--repo", repo, "--set", "a", "--add", "b", "latest").status == 64)
    }

    @Test("dump: a file's bytes to stdout; a directory as a tar stream that GNU tar unpacks to the same tree")
    func dump() throws {
        let s = Scratch()
        let src = s.file("src")
        #expect(try python(treetool, "make", src).status == 0)
        let xattr = try python(
            "-c", "import os,sys; os.setxattr(sys.argv[1], 'user.note', b'kept in the tar')", src + "/docs/hello.txt")
        #expect(xattr.status == 0)
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        // A file: its bytes.
        let big = try run(
            "/bin/sh",
            [
                "-c", "\"$0\" dump --repo \"$1\" latest \"$2\" > \"$3\"", cabackupBinary, repo,
                src + "/docs/nested/random.bin", s.file("random.out"),
            ])
        #expect(big.status == 0, "\(big.stderr)")
        #expect(try run("/usr/bin/cmp", [src + "/docs/nested/random.bin", s.file("random.out")]).status == 0)
        // A directory: a tar stream; GNU tar unpacks it; the independent reader compares.
        let tar = try run(
            "/bin/sh",
            [
                "-c", "\"$0\" dump --repo \"$1\" latest \"$2\" > \"$3\"", cabackupBinary, repo, src,
                s.file("src.tar"),
            ])
        #expect(tar.status == 0, "\(tar.stderr)")
        try FileManager.default.createDirectory(atPath: s.file("x"), withIntermediateDirectories: true)
        let untar = try run(
            "/usr/bin/tar", ["-x", "--xattrs", "--xattrs-include=*", "-f", s.file("src.tar"), "-C", s.file("x")])
        #expect(untar.status == 0, "\(untar.stderr)")
        let cmp = try python(treetool, "compare", src, s.file("x/src"))
        #expect(cmp.status == 0 && cmp.stdout.contains(" 0 differences"), "\(cmp.stdout)")
        // A path the snapshot lacks: one line, nothing written.
        let missing = try run(
            "/bin/sh",
            [
                "-c", "\"$0\" dump --repo \"$1\" latest /no/such > \"$2\"", cabackupBinary, repo,
                s.file("none"),
            ])
        #expect(missing.status == 1 && missing.stderr.contains("/no/such is not in the snapshot"), "\(missing.stderr)")
        #expect((try? FileManager.default.attributesOfItem(atPath: s.file("none"))[.size] as? Int) == 0)
        let rar = try cabackup("dump", "--repo", repo, "--archive", "rar", "latest", src)
        #expect(rar.status == 64 && rar.stderr.contains("--archive takes tar or zip, not 'rar'"), "\(rar.stderr)")
    }

    /// Checks with Python's zipfile that the zip `argv[1]` holds the tree `argv[2]` under
    /// its base name: every entry's name, Unix mode and type (made by Unix), bytes or
    /// symlink target, DOS and extended-timestamp mtimes, every CRC; nothing more. FIFOs
    /// are not in it. With `argv[3]`, also that the directory it was extracted to holds
    /// the same: types, modes, bytes, symlink targets and file mtimes to the second.
    static let zipCheck = """
        import os, stat, struct, sys, time, zipfile
        archive, src, out = sys.argv[1], sys.argv[2], (sys.argv[3:] or [None])[0]
        z = zipfile.ZipFile(archive)
        assert z.testzip() is None
        infos = {i.filename: i for i in z.infolist()}
        assert len(infos) == len(z.infolist()), "a name twice"
        expected = set()
        for dirpath, dirnames, filenames in os.walk(src):
            for p in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                st = os.lstat(p)
                if stat.S_ISFIFO(st.st_mode):
                    continue
                name = os.path.relpath(p, os.path.dirname(src)) + ("/" if stat.S_ISDIR(st.st_mode) else "")
                expected.add(name)
                i = infos[name]
                assert i.create_system == 3 and i.compress_type == zipfile.ZIP_STORED, name
                assert i.external_attr >> 16 == st.st_mode, (name, oct(i.external_attr >> 16), oct(st.st_mode))
                assert i.is_dir() == stat.S_ISDIR(st.st_mode), name
                if stat.S_ISREG(st.st_mode):
                    assert i.flag_bits & 0x08, name
                    with open(p, "rb") as f, z.open(i) as g:
                        while True:
                            a, b = f.read(64 << 20), g.read(64 << 20)
                            assert a == b, name
                            if not a:
                                break
                elif stat.S_ISLNK(st.st_mode):
                    assert z.read(i) == os.fsencode(os.readlink(p)), name
                seconds = int(st.st_mtime)
                local = time.localtime(seconds)
                assert i.date_time == tuple(local[:5]) + (local.tm_sec // 2 * 2,), (name, i.date_time)
                extra, ut = i.extra, None
                while extra:
                    tag, size = struct.unpack("<HH", extra[:4])
                    if tag == 0x5455:
                        ut = struct.unpack("<i", extra[5:9])[0]
                    extra = extra[4 + size:]
                assert ut == seconds, (name, ut, seconds)
                if out is None:
                    continue
                q = os.path.join(out, os.path.relpath(p, os.path.dirname(src)))
                b = os.lstat(q)
                assert b.st_mode == st.st_mode, (q, oct(b.st_mode), oct(st.st_mode))
                if stat.S_ISREG(st.st_mode):
                    assert open(q, "rb").read() == open(p, "rb").read(), q
                    assert int(b.st_mtime) == seconds, (q, b.st_mtime, seconds)
                elif stat.S_ISLNK(st.st_mode):
                    assert os.readlink(q) == os.readlink(p), q
        assert set(infos) == expected, set(infos) ^ expected
        assert out is None or not os.path.lexists(os.path.join(out, os.path.basename(src), "fifo"))
        print("ok", len(expected), "entries")
        """

    @Test(
        "dump --archive zip: a tree that Python's zipfile and unzip read back with its bytes, modes, symlinks and mtimes"
    )
    func dumpZip() throws {
        let s = Scratch()
        let src = s.file("src")
        let made = try python(
            "-c",
            """
            import os, random, sys
            src = sys.argv[1]
            os.makedirs(os.path.join(src, "docs/nested/deeper"))
            with open(os.path.join(src, "docs/nested/random.bin"), "wb") as f:
                f.write(random.Random(7).randbytes(3 << 20))
            os.link(os.path.join(src, "docs/nested/random.bin"), os.path.join(src, "hard-link.bin"))
            open(os.path.join(src, "empty"), "wb").close()
            with open(os.path.join(src, "docs/nested/deeper/naïve-日本語.txt"), "wb") as f:
                f.write("non-ASCII name\\n".encode())
            with open(os.path.join(src, "run.sh"), "wb") as f:
                f.write(b"#!/bin/sh\\necho hi\\n")
            os.chmod(os.path.join(src, "run.sh"), 0o755)
            with open(os.path.join(src, "secret"), "wb") as f:
                f.write(b"s3cret")
            os.chmod(os.path.join(src, "secret"), 0o600)
            os.chmod(os.path.join(src, "docs/nested/deeper"), 0o750)
            os.symlink("docs/nested/random.bin", os.path.join(src, "link"))
            os.symlink("does/not/exist", os.path.join(src, "dangling"))
            os.mkfifo(os.path.join(src, "fifo"))
            """, src)
        #expect(made.status == 0, "\(made.stderr)")
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        func dump(_ path: String, to file: String) throws -> RunResult {
            try run(
                "/bin/sh",
                [
                    "-c", "\"$0\" dump --repo \"$1\" --archive zip latest \"$2\" | cat > \"$3\"", cabackupBinary,
                    repo, path, file,
                ])
        }
        // Through a pipe: the output is not seekable. The FIFO is left out, with one warning.
        let zip = try dump(src, to: s.file("src.zip"))
        #expect(zip.status == 0, "\(zip.stderr)")
        #expect(zip.stderr == "warning: skipped \(src)/fifo: zip has no FIFOs\n", "\(zip.stderr)")
        let tested = try python("-m", "zipfile", "-t", s.file("src.zip"))
        #expect(tested.status == 0, "\(tested.stdout)\(tested.stderr)")
        // Info-ZIP's unzip checks every CRC, then restores the same bytes, modes and
        // symlinks (a hard link's second name as a copy), and file mtimes to the second;
        // zipfile reads the archive and compares both with the source.
        let unzipEnv = ["LC_ALL": "C.UTF-8"]
        let unzipTest = try run("/usr/bin/unzip", ["-tq", s.file("src.zip")], env: unzipEnv)
        #expect(unzipTest.status == 0, "\(unzipTest.stdout)\(unzipTest.stderr)")
        let unzipped = try run("/usr/bin/unzip", ["-q", s.file("src.zip"), "-d", s.file("x")], env: unzipEnv)
        #expect(unzipped.status == 0, "\(unzipped.stdout)\(unzipped.stderr)")
        let extracted = try python("-c", Self.zipCheck, s.file("src.zip"), src, s.file("x"))
        #expect(extracted.status == 0 && extracted.stdout.contains("ok 12"), "\(extracted.stdout)\(extracted.stderr)")
        // One file: a zip of that file alone, under its own name.
        let one = try dump(src + "/run.sh", to: s.file("one.zip"))
        #expect(one.status == 0 && one.stderr.isEmpty, "\(one.stderr)")
        let listed = try python(
            "-c",
            """
            import sys, zipfile
            z = zipfile.ZipFile(sys.argv[1])
            [i] = z.infolist()
            print(i.filename, oct(i.external_attr >> 16), z.read(i))
            """, s.file("one.zip"))
        #expect(listed.stdout == "run.sh 0o100755 b'#!/bin/sh\\necho hi\\n'\n", "\(listed.stdout)\(listed.stderr)")
    }

    @Test("dump --archive zip: ZIP64 for a file past 4 GiB and the entry after it, read back by Python's zipfile")
    func dumpZip64() throws {
        let s = Scratch()
        let src = s.file("big")
        // Sparse, 4 GiB + 403 MiB, random bytes at the start and across the 4 GiB line,
        // then a small file whose entry starts past 4 GiB in the archive.
        let made = try makeSparseFile(src + "/a.img", randomAt: [0, (4 << 30) - (1 << 20), (4 << 30) + (400 << 20)])
        try Data("after 4 GiB\n".utf8).write(to: URL(fileURLWithPath: src + "/b.txt"))
        #expect(made.status == 0, "\(made.stderr)")
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        // The archive through a pipe into a sparse file: its runs of zeros take no disk.
        let dumped = try run(
            "/bin/sh",
            [
                "-c", "\"$0\" dump --repo \"$1\" --archive zip latest \"$2\" | python3 -c \"$3\" \"$4\"",
                cabackupBinary, repo, src,
                """
                import sys
                out, zero = open(sys.argv[1], "wb"), bytes(1 << 20)
                while b := sys.stdin.buffer.read(1 << 20):
                    out.seek(len(b), 1) if b == zero[:len(b)] else out.write(b)
                out.truncate()
                """, s.file("big.zip"),
            ])
        #expect(dumped.status == 0, "\(dumped.stderr)")
        // The file's sizes and the small file's offset only fit in ZIP64 fields; the
        // central directory starts past 4 GiB too.
        let structure = try python(
            "-c",
            """
            import struct, sys, zipfile
            z = zipfile.ZipFile(sys.argv[1])
            big, small = z.getinfo("big/a.img"), z.getinfo("big/b.txt")
            assert big.file_size == (4 << 30) + (403 << 20), big.file_size
            assert small.header_offset > 4 << 30 and small.extract_version == 45, small.header_offset
            with open(sys.argv[1], "rb") as f:
                f.seek(big.header_offset)
                local = f.read(30)
                assert struct.unpack("<I", local[18:22])[0] == 0xFFFFFFFF
                assert local[6] & 0x08
                f.seek(-22 - 20 - 56, 2)
                assert f.read(4) == b"PK\\x06\\x06"
            print("ok", big.CRC, small.header_offset)
            """, s.file("big.zip"))
        #expect(structure.status == 0 && structure.stdout.hasPrefix("ok"), "\(structure.stdout)\(structure.stderr)")
        let checked = try python("-c", Self.zipCheck, s.file("big.zip"), src)
        #expect(checked.status == 0 && checked.stdout.contains("ok 3 entries"), "\(checked.stdout)\(checked.stderr)")
        let listed = try run("/usr/bin/unzip", ["-Z", "-t", s.file("big.zip")])
        #expect(
            listed.status == 0 && listed.stdout.contains("3 files, 4717543436 bytes uncompressed"), "\(listed.stdout)")
    }

    @Test("find: which snapshots hold a pattern; --history lists every version from the cache's index, reading no pack")
    func find() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src + "/docs", withIntermediateDirectories: true)
        try Data("a".utf8).write(to: URL(fileURLWithPath: src + "/docs/a-unmistakable-name.txt"))
        try Data("jpg".utf8).write(to: URL(fileURLWithPath: src + "/docs/b.jpg"))
        let notes = src + "/notes.txt"
        let repo = s.file("repo")
        let env = ["XDG_CACHE_HOME": s.file("cache")]
        #expect(try cabackup("init", "--repo", repo, env: env).status == 0)
        // Four snapshots: notes.txt in versions 1, 2, 2 (unchanged), 3.
        for version in ["one", "two", "two", "three"] {
            if (try? String(contentsOfFile: notes, encoding: .utf8)) != version {
                try Data(version.utf8).write(to: URL(fileURLWithPath: notes))
            }
            #expect(try cabackup("snapshot", "--repo", repo, src, env: env).status == 0)
        }
        func lines(_ r: RunResult) -> [[String: Any]] {
            r.stdout.split(separator: "\n").compactMap { jsonObject(String($0)) }
        }
        let txt = try cabackup("find", "--repo", repo, "--json", "*.txt", env: env)
        #expect(txt.status == 0, "\(txt.stderr)")
        let matches = lines(txt)
        #expect(matches.count == 8 && matches.allSatisfy { $0["message_type"] as? String == "match" })
        #expect(Set(matches.compactMap { $0["path"] as? String }) == [src + "/docs/a-unmistakable-name.txt", notes])
        // A directory that matches is listed, not what is below it.
        let dirs = lines(try cabackup("find", "--repo", repo, "--json", "-s", "latest", "docs", env: env))
        #expect(dirs.count == 1 && dirs.first?["type"] as? String == "dir")
        // --history: every version of one file, oldest first; the content id tells them apart.
        func historyReadingPacks() throws -> (entries: [[String: Any]], packOpens: Int) {
            let trace = s.file("trace")
            let r = try run(
                "/usr/bin/strace",
                ["-f", "-e", "trace=open,openat", "-o", trace, cabackupBinary, "find", "--repo", repo, "--json"]
                    + ["--history", notes],
                env: env)
            #expect(r.status == 0, "\(r.stderr)")
            // Packs are data/XY/<64 hex>; opening data/XY alone is a listing.
            let opens = try String(contentsOfFile: trace, encoding: .utf8).split(separator: "\n")
                .compactMap { $0.components(separatedBy: repo + "/data/").dropFirst().first }
                .filter { $0.prefix { $0 != "\"" }.count == 67 }.count
            return (lines(r), opens)
        }
        let (versions, opens) = try historyReadingPacks()
        #expect(versions.count == 4)
        let contents = versions.compactMap { $0["content"] as? String }
        #expect(contents.count == 4 && contents[1] == contents[2] && Set(contents).count == 3, "\(contents)")
        #expect(versions.compactMap { $0["size"] as? Int } == [3, 3, 3, 5])
        #expect(opens == 0, "find --history opened \(opens) packs with the index up to date")
        // A new snapshot is indexed on the next query (its trees read once).
        try Data("four!!".utf8).write(to: URL(fileURLWithPath: notes))
        #expect(try cabackup("snapshot", "--repo", repo, src, env: env).status == 0)
        let (more, indexingOpens) = try historyReadingPacks()
        #expect(more.count == 5 && more.last?["size"] as? Int == 6)
        #expect(indexingOpens > 0, "the count of pack reads sees the new snapshot's trees read")
        let text = try cabackup("find", "--repo", repo, "--history", notes, env: env)
        #expect(text.stdout.split(separator: "\n").filter { $0.contains(" * ") }.count == 3, "\(text.stdout)")
        // The names are in the cache, never in the (encrypted) repository's files.
        let inRepo = try run("/usr/bin/grep", ["-r", "-l", "unmistakable", repo])
        #expect(inRepo.status == 1, "a file name appears in \(inRepo.stdout)")
        let inCache = try run("/usr/bin/grep", ["-r", "-l", "unmistakable", s.file("cache")])
        #expect(inCache.status == 0 && inCache.stdout.contains("paths.sqlite"))
        let none = try cabackup("find", "--repo", repo, "*.doc", env: env)
        #expect(none.status == 0 && none.stdout.contains("no entry matches"))
        #expect(try cabackup("find", "--repo", repo, "[", env: env).status != 0)
    }

    @Test("rewrite --exclude --forget, then prune: no byte of the removed file is left in the repository")
    func rewriteAndPrune() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src + "/keys", withIntermediateDirectories: true)
        var secret = [UInt8](repeating: 0, count: 200_000)
        for i in secret.indices { secret[i] = UInt8.random(in: 0...255) }
        try Data(secret).write(to: URL(fileURLWithPath: src + "/keys/leaked.pem"))
        #expect(try python(treetool, "make", src + "/other").status == 0)
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo, "--no-encryption").status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        try Data("later\n".utf8).write(to: URL(fileURLWithPath: src + "/new.txt"))
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        // Whether 64 bytes from the middle of the secret appear in any file of the repository.
        func secretStored() throws -> Bool {
            let probe = Data(secret[100_000..<100_064]).base64EncodedString()
            let r = try python(
                "-c",
                "import os,sys,base64; p=base64.b64decode(sys.argv[2]); print(any(p in open(os.path.join(d,f),'rb').read() for d,_,fs in os.walk(sys.argv[1]) for f in fs))",
                repo, probe)
            return r.stdout.hasPrefix("True")
        }
        #expect(try secretStored(), "the probe must find the secret before the rewrite")
        let dry = try cabackup("rewrite", "--repo", repo, "--path", src, "--exclude", "*.pem", "--dry-run")
        #expect(dry.status == 0 && dry.stdout.contains("would remove " + src + "/keys/leaked.pem"), "\(dry.stdout)")
        #expect(try cabackup("snapshots", "--repo", repo, "--json").stdout.components(separatedBy: "\"id\"").count == 3)
        let r = try cabackup("rewrite", "--repo", repo, "--path", src, "--exclude", "*.pem", "--forget")
        #expect(r.status == 0 && r.stdout.contains("2 snapshots rewritten"), "\(r.stdout)\(r.stderr)")
        // The default prune leaves a mostly used pack alone, with the secret in it;
        // --max-unused 0% repacks it.
        #expect(try cabackup("prune", "--repo", repo).status == 0)
        #expect(try secretStored(), "the secret shares a mostly used pack: only a full repack removes it")
        #expect(try cabackup("prune", "--repo", repo, "--max-unused", "0%").status == 0)
        #expect(try !secretStored(), "a byte run of the removed file is still in the repository")
        #expect(try cabackup("prune", "--repo", repo, "--max-unused", "half").status == 64)
        // The rest is intact, in both rewritten snapshots.
        #expect(try cabackup("check", "--repo", repo, "--read-data").status == 0)
        let ls = try cabackup("ls", "--repo", repo, "latest")
        #expect(!ls.stdout.contains("leaked.pem") && ls.stdout.contains(src + "/keys") && ls.stdout.contains("new.txt"))
        let restore = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"))
        #expect(restore.status == 0)
        let cmp = try python(treetool, "compare", src + "/other", s.file("out") + src + "/other")
        #expect(cmp.status == 0, "\(cmp.stdout)")
        let snaps = try cabackup("snapshots", "--repo", repo)
        #expect(snaps.stdout.contains("2 snapshots"), "\(snaps.stdout)")
        // Nothing matches: nothing is written.
        let none = try cabackup("rewrite", "--repo", repo, "--path", src, "--exclude", "*.pem")
        #expect(none.stdout.contains("no snapshot holds a matching path"))
        #expect(try cabackup("rewrite", "--repo", repo, "latest").status == 64)
    }

    @Test("copy: a second repository restores the same tree; copying again reads only what is new")
    func copy() throws {
        let s = Scratch()
        let src = s.file("src")
        #expect(try python(treetool, "make", src).status == 0)
        let a = s.file("a")
        let b = s.file("b")
        let env = ["CABACKUP_FROM_PASSWORD": testPassword, "XDG_CACHE_HOME": s.file("cache")]
        #expect(try cabackup("init", "--repo", a, env: env).status == 0)
        #expect(try cabackup("init", "--repo", b, env: env).status == 0)
        #expect(try cabackup("snapshot", "--repo", a, "--tag", "laptop", src, env: env).status == 0)
        /// Copies a → b; returns the blobs read from a.
        func copyAll() throws -> (copied: Int, read: Int) {
            let r = try cabackup("copy", "--repo", b, "--from-repo", a, env: env)
            #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
            let words = r.stdout.split(separator: " ")
            let copied = words.firstIndex(of: "copied").flatMap { Int(words[$0 + 1]) } ?? -1
            let read = words.firstIndex(of: "read").flatMap { Int(words[$0 + 1]) } ?? -1
            return (copied, read)
        }
        let first = try copyAll()
        #expect(first.copied == 1 && first.read > 20, "\(first)")
        let restore = try cabackup("restore", "--repo", b, "latest", "--target", s.file("out"), env: env)
        #expect(restore.status == 0, "\(restore.stderr)")
        let cmp = try python(treetool, "compare", src, s.file("out") + src)
        #expect(cmp.status == 0 && cmp.stdout.contains(" 0 differences"), "\(cmp.stdout)")
        #expect(try cabackup("check", "--repo", b, "--read-data", env: env).status == 0)
        let listed = try cabackup("snapshots", "--repo", b, "--json", env: env).stdout
        #expect(listed.contains("\"laptop\""), "the copy keeps the tags")
        // A new snapshot sharing almost everything: the copy reads only what is new.
        try Data("one more file\n".utf8).write(to: URL(fileURLWithPath: src + "/docs/new.txt"))
        #expect(try cabackup("snapshot", "--repo", a, src, env: env).status == 0)
        let second = try copyAll()
        #expect(second.copied == 1 && second.read <= 8, "\(second) after \(first)")
        let again = try copyAll()
        #expect(again.copied == 0 && again.read == 0, "\(again)")
        // Chunker parameters copied: the destination deduplicates what it already has.
        let c = s.file("c")
        #expect(try cabackup("init", "--repo", c, "--copy-chunker-params", "--from-repo", a, env: env).status == 0)
        let r = try cabackup("copy", "--repo", c, "--from-repo", a, "latest", env: env)
        #expect(r.status == 0, "\(r.stderr)")
        let snap = try cabackup("snapshot", "--repo", c, "--json", src, "--force", env: env)
        #expect(jsonObject(snap.lastLine)?["chunks_added"] as? Int == 0, "\(snap.lastLine)")
        let bad = try cabackup("copy", "--repo", b, "--from-repo", s.file("nothing"), env: env)
        #expect(bad.status == 10, "\(bad.stderr)")
    }
}
