import Foundation
import Testing

/// Root is needed to set `security.*` and `trusted.*` attributes, capabilities and the
/// immutable flag. CI runs as root; elsewhere these tests run only as root.
private let isRoot = geteuid() == 0
private let runsHere = isRoot || ProcessInfo.processInfo.environment["CI"] != nil

/// Runs a system tool (setfacl, setcap, chattr, …) and records its failure.
@discardableResult
private func tool(_ name: String, _ args: String...) throws -> RunResult {
    let paths = ["/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/"]
    let exe = paths.map { $0 + name }.first { FileManager.default.isExecutableFile(atPath: $0) } ?? name
    let r = try run(exe, args)
    #expect(r.status == 0, "\(name) \(args): \(r.stderr)")
    return r
}

/// Sets an extended attribute without following a symlink (Python's os.setxattr).
private func setXattr(_ path: String, _ name: String, _ value: String) throws {
    let r = try python(
        "-c", "import os,sys; os.setxattr(sys.argv[1], sys.argv[2], sys.argv[3].encode(), follow_symlinks=False)",
        path, name, value)
    #expect(r.status == 0, "setxattr \(name) on \(path): \(r.stderr)")
}

/// Clears immutable and append-only flags below `path`, so the scratch directory can be
/// removed.
private func unfreeze(_ path: String) {
    _ = try? run("/usr/bin/chattr", ["-R", "-f", "-i", "-a", path])
}

/// Builds a tree with every kind of metadata a snapshot keeps beyond `stat`: the
/// fixture of treetool.py, plus user and trusted attributes on a file, a directory and
/// a symlink, an access and a default ACL, a file capability on a copied binary, a
/// sparse file, and the immutable, append-only and nodump flags.
private func makeMetadataTree(_ src: String) throws {
    #expect(try python(treetool, "make", src).status == 0)
    try setXattr(src + "/docs/hello.txt", "user.comment", "hello attribute")
    try setXattr(src + "/docs/hello.txt", "user.empty", "")
    try setXattr(src + "/docs", "user.dir", "a directory's attribute")
    try setXattr(src + "/link-rel", "trusted.link", "on the symlink itself")
    try setXattr(src + "/secret", "trusted.label", "confidential")
    try tool("setfacl", "-m", "u:1234:rw,g:4321:r", src + "/secret")
    try tool("setfacl", "-d", "-m", "u:1234:rwx", src + "/docs/nested")
    // A capability set by the test itself on a copy of a binary: nothing on the system
    // has it by chance.
    try tool("cp", "/usr/bin/ls", src + "/ls-with-cap")
    try tool("setcap", "cap_net_raw,cap_net_bind_service+ep", src + "/ls-with-cap")
    // 64 MiB with data at 1 MiB and at 40 MiB, holes around both.
    let sparse = src + "/sparse.img"
    try tool("truncate", "-s", "64M", sparse)
    let fh = try #require(FileHandle(forWritingAtPath: sparse))
    try fh.seek(toOffset: 1 << 20)
    fh.write(Data(repeating: 0xAB, count: 5000))
    try fh.seek(toOffset: 40 << 20)
    fh.write(Data("the middle of nowhere".utf8))
    try fh.close()
    for (name, flag) in [("frozen", "+i"), ("journal.log", "+a"), ("scratch.tmp", "+d")] {
        try Data("flagged \(name)\n".utf8).write(to: URL(fileURLWithPath: src + "/" + name))
        try tool("chattr", flag, src + "/" + name)
    }
    try tool("chattr", "+i", src + "/empty-dir")
}

/// A scratch directory holding ``makeMetadataTree(_:)`` at `src`; the caller unfreezes it.
private func metadataTree() throws -> (Scratch, String) {
    #expect(isRoot, "these tests set root-only metadata: run them as root")
    let s = Scratch()
    let src = s.file("src")
    do {
        try makeMetadataTree(src)
    } catch {
        unfreeze(s.path)
        throw error
    }
    return (s, src)
}

@Suite("extended attributes, ACLs, capabilities, holes and inode flags", .serialized, .enabled(if: runsHere))
struct MetadataTests {
    @Test("all of it survives backup and restore as root, checked by the independent reader")
    func roundTrip() throws {
        let (s, src) = try metadataTree()
        defer { unfreeze(s.path) }
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        let snap = try cabackup("snapshot", "--repo", repo, src)
        #expect(snap.status == 0, "\(snap.stderr)")
        let restore = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"))
        #expect(restore.status == 0 && !restore.stderr.contains("warning"), "\(restore.stderr)")
        let out = s.file("out") + src
        let cmp = try python(treetool, "compare", src, out)
        #expect(cmp.status == 0 && cmp.stdout.contains(" 0 differences"), "\(cmp.stdout)")
        // The same facts through the system's own tools.
        #expect(try tool("getcap", out + "/ls-with-cap").stdout.contains("cap_net_bind_service,cap_net_raw=ep"))
        #expect(try tool("getfacl", "-c", out + "/secret").stdout.contains("user:1234:rw-"))
        #expect(try tool("getfacl", "-c", out + "/docs/nested").stdout.contains("default:user:1234:rwx"))
        #expect(try tool("lsattr", "-d", out + "/frozen").stdout.hasPrefix("----i"))
        let holes = try python(treetool, "holes", out + "/sparse.img")
        #expect(holes.stdout.hasPrefix("[[1048576, 8192], [41943040, 4096]]"), "\(holes.stdout)")
        // ls --json names them.
        let ls = try cabackup("ls", "--repo", repo, "latest", "--json")
        let items = ls.stdout.split(separator: "\n").compactMap { jsonObject(String($0)) }
        func item(_ name: String) -> [String: Any]? { items.first { ($0["path"] as? String) == src + "/" + name } }
        #expect(item("docs/hello.txt")?["xattrs"] as? [String] == ["user.comment", "user.empty"])
        #expect(item("ls-with-cap")?["xattrs"] as? [String] == ["security.capability"])
        #expect(item("frozen")?["flags"] as? [String] == ["immutable"])
        #expect(item("journal.log")?["flags"] as? [String] == ["append-only"])
        #expect(item("sparse.img")?["sparse"] as? Bool == true)
        #expect(item("docs/nested/random.bin")?["xattrs"] == nil)
        // The tree fields themselves, read by the independent reader from a plaintext
        // repository's packs and compared with the disk: attributes, holes and flags.
        let plain = s.file("plain")
        #expect(try cabackup("init", "--repo", plain, "--no-encryption").status == 0)
        #expect(try cabackup("snapshot", "--repo", plain, src).status == 0)
        let fields = try python(repotool, "compare", plain, "latest", src)
        #expect(fields.status == 0, "\(fields.stdout)\(fields.stderr)")
        let entries = try python(repotool, "entries", plain)
        #expect(entries.stdout.contains("security.capability") && entries.stdout.contains("\"flags\": 16"))
    }

    @Test("status and diff see an attribute change; an unchanged snapshot lists no attributes")
    func changesAndUnchangedCost() throws {
        let (s, src) = try metadataTree()
        defer { unfreeze(s.path) }
        for i in 0..<300 { try Data("file \(i)\n".utf8).write(to: URL(fileURLWithPath: src + "/many-\(i)")) }
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        // Counted by strace: every entry read lists its attributes once; an unchanged
        // run takes them from the parent snapshot.
        func listCalls(_ label: String) throws -> Int {
            let trace = s.file("strace-\(label)")
            let r = try run(
                "/usr/bin/strace",
                ["-f", "-c", "-o", trace, "-e", "trace=flistxattr,llistxattr,listxattr", cabackupBinary]
                    + ["snapshot", "--repo", repo, src])
            #expect(r.status == 0, "\(r.stderr)")
            let summary = try String(contentsOfFile: trace, encoding: .utf8)
            return summary.split(separator: "\n").filter { $0.contains("listxattr") }
                .compactMap { $0.split(separator: " ", omittingEmptySubsequences: true).dropFirst(3).first }
                .compactMap { Int($0) }.reduce(0, +)
        }
        let first = try listCalls("first")
        let unchanged = try listCalls("unchanged")
        #expect(first >= 300, "first snapshot listed attributes \(first) times")
        #expect(unchanged <= 10, "an unchanged snapshot listed attributes \(unchanged) times")
        // The attributes are still in the unchanged snapshot.
        let ls = try cabackup("ls", "--repo", repo, "latest", src + "/docs/hello.txt", "--json")
        #expect(ls.stdout.contains("user.comment"), "\(ls.stdout)")
        // A changed attribute on a directory and on a file: status reports both as
        // metadata changes, and so does diff once it is backed up.
        try setXattr(src + "/docs", "user.dir", "changed")
        try setXattr(src + "/many-7", "user.new", "1")
        let status = try cabackup("status", "--repo", repo, src, "--json")
        let changes = try #require(jsonObject(status.stdout), "\(status.stdout)")
        let meta = (changes["metadata_only"] as? [[String: Any]] ?? []).compactMap { $0["path"] as? String }
        #expect(Set(meta) == [src + "/docs", src + "/many-7"], "\(status.stdout)")
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        let snaps = try #require(
            try JSONSerialization.jsonObject(
                with: Data(try cabackup("snapshots", "--repo", repo, "--json").stdout.utf8))
                as? [[String: Any]])
        let ids = snaps.compactMap { $0["id"] as? String }
        let diff = try cabackup("diff", "--repo", repo, ids[ids.count - 2], ids[ids.count - 1], "--json")
        let d = try #require(jsonObject(diff.stdout), "\(diff.stdout)")
        let diffMeta = (d["metadata_only"] as? [[String: Any]] ?? []).compactMap { $0["path"] as? String }
        #expect(Set(diffMeta) == [src + "/docs", src + "/many-7"], "\(diff.stdout)")
    }

    @Test("--exclude-nodump leaves out files and directories flagged nodump, also when unchanged since the parent")
    func excludeNodump() throws {
        let (s, src) = try metadataTree()
        defer { unfreeze(s.path) }
        try tool("chattr", "+d", src + "/docs/nested")
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        func names() throws -> String { try cabackup("ls", "--repo", repo, "latest").stdout }
        // Without the option, nodump entries are kept (with their flag).
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        #expect(try names().contains(src + "/scratch.tmp") && names().contains(src + "/docs/nested/random.bin"))
        // With it they are left out, also when the parent has them unchanged.
        for _ in 0..<2 {
            let r = try cabackup("snapshot", "--repo", repo, "--exclude-nodump", src)
            #expect(r.status == 0, "\(r.stderr)")
            let listed = try names()
            #expect(!listed.contains(src + "/scratch.tmp") && !listed.contains(src + "/docs/nested"), "\(listed)")
            #expect(listed.contains(src + "/docs/hello.txt") && listed.contains(src + "/frozen"))
        }
    }

    @Test("without the rights, restore reports each attribute and flag it cannot set, and restores the bytes")
    func unprivilegedRestore() throws {
        let (s, src) = try metadataTree()
        defer { unfreeze(s.path) }
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo, "--no-encryption").status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        // The user nobody restores into a directory of its own.
        try tool("chmod", "755", s.path)
        try tool("chmod", "-R", "a+rwX", repo)
        let out = s.file("out")
        let home = s.file("home")
        try tool("mkdir", "-p", out, home)
        try tool("chown", "nobody", out, home)
        let r = try run(
            "/usr/sbin/runuser",
            ["-u", "nobody", "--", cabackupBinary, "restore", "--repo", repo, "latest", "--target", out],
            env: ["HOME": home, "XDG_CACHE_HOME": home + "/cache", "XDG_CONFIG_HOME": home + "/config"])
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        let warnings = r.stderr.split(separator: "\n").filter { $0.hasPrefix("warning: ") }
        func warned(_ path: String, _ what: String) -> Bool {
            warnings.contains { $0.contains(src + path + ":") && $0.contains(what) }
        }
        #expect(warned("/ls-with-cap", "security.capability"), "\(r.stderr)")
        #expect(warned("/secret", "trusted.label"), "\(r.stderr)")
        #expect(warned("/link-rel", "trusted.link"), "\(r.stderr)")
        #expect(warned("/frozen", "inode flags"), "\(r.stderr)")
        #expect(!warned("/docs/hello.txt", "user.comment"), "\(r.stderr)")
        // Every byte is there, and what nobody may set is set.
        for name in ["ls-with-cap", "secret", "frozen", "docs/hello.txt", "sparse.img"] {
            #expect(try run("/usr/bin/cmp", [src + "/" + name, out + src + "/" + name]).status == 0, "\(name)")
        }
        let comment = try python(
            "-c", "import os,sys; print(os.getxattr(sys.argv[1], 'user.comment').decode())",
            out + src + "/docs/hello.txt")
        #expect(comment.stdout == "hello attribute\n")
        #expect(try tool("getfacl", "-c", out + src + "/secret").stdout.contains("user:1234:rw-"))
    }

    @Test("a copy of /usr/bin with capabilities set keeps every one")
    func usrBinCapabilities() throws {
        #expect(isRoot, "these tests set root-only metadata: run them as root")
        let s = Scratch()
        let src = s.file("bin")
        try tool("cp", "-a", "/usr/bin", src)
        // Every 25th regular file gets a capability set of its own.
        let caps = ["cap_net_raw+ep", "cap_net_admin,cap_net_raw+ep", "cap_sys_nice+ei", "cap_dac_override+p"]
        let names = try FileManager.default.contentsOfDirectory(atPath: src).sorted().filter { name in
            var st = stat()
            return lstat(src + "/" + name, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
        }
        var set = 0
        for (i, name) in names.enumerated() where i % 25 == 0 {
            try tool("setcap", caps[set % caps.count], src + "/" + name)
            set += 1
        }
        let before = try tool("getcap", "-r", src).stdout
        #expect(before.split(separator: "\n").count >= set && set >= 20, "\(before)")
        let repo = s.file("repo")
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        let out = s.file("out")
        let restore = try cabackup("restore", "--repo", repo, "latest", "--target", out)
        #expect(restore.status == 0, "\(restore.stderr)")
        let after = try tool("getcap", "-r", out + src).stdout.replacingOccurrences(of: out + src, with: src)
        #expect(
            Set(after.split(separator: "\n")) == Set(before.split(separator: "\n")),
            "before:\n\(before)\nafter:\n\(after)")
        let cmp = try python(treetool, "compare", src, out + src)
        #expect(cmp.status == 0 && cmp.stdout.contains(" 0 differences"), "\(cmp.stdout)")
    }
}
