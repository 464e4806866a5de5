import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

/// Exclude patterns follow restic's rules: rows from restic's documentation and filter tests.
@Suite struct PathPatternTests {
    /// One pattern, one path, and whether the pattern excludes the path.
    struct Row: CustomTestStringConvertible, Sendable {
        /// The `--exclude` pattern.
        let pattern: String
        /// The absolute path tested.
        let path: String
        /// Whether the path is excluded.
        let matched: Bool

        /// How the row reads in test output.
        var testDescription: String { "\(pattern) \(matched ? "excludes" : "keeps") \(path)" }
    }

    /// Builds a row.
    static func row(_ pattern: String, _ path: String, _ matched: Bool) -> Row {
        Row(pattern: pattern, path: path, matched: matched)
    }

    /// Single-pattern rows, most taken from restic's `filter_test.go` and `040_backup.rst`.
    static let rows: [Row] = [
        // Relative patterns match at any depth, on whole components.
        row("*.go", "/foo/bar/test.go", true),
        row("*.c", "/foo/bar/test.go", false),
        row("*", "/foo/bar/test.go", true),
        row("**", "/foo/bar/test.go", true),
        row("foo*", "/foo/bar/test.go", true),
        row("bar*", "/foo/bar/test.go", true),
        row("bar/*", "/foo/bar/test.go", true),
        row("baz/*", "/foo/bar/test.go", false),
        row("bar/test.go", "/foo/bar/test.go", true),
        row("bar/*.go", "/foo/bar/test.go", true),
        row("ba*/*.go", "/foo/bar/test.go", true),
        row("bb*/*.go", "/foo/bar/test.go", false),
        row("test.*", "/foo/bar/test.go", true),
        row("tesT.*", "/foo/bar/test.go", false),
        row("bar/*", "/foo/bar/baz", true),
        row("bar", "/foo/bar", true),
        row("bar", "/foo/bar/baz", true),
        row("bar", "/foo/bar/test.go", true),
        row("sdk", "/foo/bar/sdk/test/sdk_foo.go", true),
        row("sdk/*/cpp/*/*vars*.html", "/usr/share/doc/libreoffice/sdk/docs/cpp/ref/a00517.html", false),
        row("foo", "/dir1/foo/dir2/file", true),
        row("foo", "/dir/foobar", false),
        row("b*ash", "/bin/bash", true),
        row("b*ash", "/bin/ash", false),
        row("docs/*.txt", "/home/u/docs/a.txt", true),
        row("docs/*.txt", "/home/u/docs/sub/a.txt", false),
        row("docs/*.txt", "/home/u/docs/a.md", false),
        row("sub/*", "/home/u/sub/x", true),
        row("sub/*", "/home/u/sub/x/y/z", true),
        row("sub/*", "/home/u/sub", false),
        // Anchored patterns start at the root.
        row("/bar*", "/foo/bar/test.go", false),
        row("/foo/bar", "/foo/bar", true),
        row("/foo/bar", "/foo/baz", false),
        row("/foo///bar", "/foo/bar", true),
        row("/foo/../bar", "/foo/bar", false),
        row("/foo/../bar", "/bar", true),
        row("/foo/./bar", "/foo/bar", true),
        row("/foo", "/foo/baz", true),
        row("/foo/*", "/foo", false),
        row("/foo/*", "/foo/baz", true),
        row("/foo/*test.*", "/foo/bar/test.go", false),
        row("/foo/*/test.*", "/foo/bar/test.go", true),
        row("/foo/*/bar/test.*", "/foo/bar/test.go", false),
        row("/*/*/bar/test.*", "/foo/bar/baz/test.go", false),
        row("/*/*/baz/test.*", "/foo/bar/baz/test.go", true),
        row("/bin", "/bin/bash", true),
        row("/bin", "/usr/bin/restic", false),
        row("/a/b", "/a/b/c/d", true),
        row("/home/*/.cache", "/home/u/.cache", true),
        row("/home/*/.cache", "/home/u/.cache/x/y", true),
        row("/home/*/.cache", "/home/u/v/.cache", false),
        row("/home/*/.cache", "/srv/home/u/.cache", false),
        // Trailing `/` is ignored.
        row("/foo/bar/", "/foo/bar", true),
        row("/foo/", "/foo/baz", true),
        row("bar/", "/foo/bar", true),
        // `**` spans zero or more components.
        row("**/foo/bar", "/foo/bar", true),
        row("**/foo/bar", "/x/y/foo/bar/z", true),
        row("**/foo/bar", "/x/foo/baz/bar", false),
        row("foo/**/bar", "/dir1/foo/dir2/bar/file", true),
        row("foo/**/bar", "/foo/bar/file", true),
        row("foo/**/bar", "/tmp/foo/bar", true),
        row("foo/**/bar", "/home/user/foo/x/y/bar", true),
        row("foo/**/bar", "/home/user/foo/x/y/baz", false),
        row("foo/**/bar/*.go", "/home/user/foo/work/special/project/bar/test.go", true),
        row("foo/**/bar/*.go", "/home/user/foo/bar/test.go", true),
        row("foo/**/bar/*.go", "/foo/bar/baz/bar/test.go", true),
        row("foo/**/bar/*.go", "/home/user/foo/test.c", false),
        row("foo/**/bar/*.go", "/bar/foo/main.go", false),
        row("foo/**/bar/**/x", "/home/user/foo/blaaa/blaz/bar/shared/work/x", true),
        row("user/**/important*", "/home/user/work/x/y/hidden/x", false),
        row("user/**/hidden*/**/c", "/home/user/work/x/y/hidden/z/a/b/c", true),
        row("/home/user/repos/**/target", "/home/user/repos/repo1/target", true),
        row("/home/user/repos/**/target", "/home/user/repos/ws/project1/target/debug", true),
        row("/home/user/repos/**/target", "/home/user/repos/repo3/bin", false),
        row("/foo/**", "/foo", true),
        row("/foo/**/test.c", "/foo/bar/foo/bar/test.c", true),
        row("/foo/*/test.c", "/foo/bar/foo/bar/test.c", false),
        // `?`, `[...]` and escapes.
        row("/home/[uU]ser/?.go", "/home/user/F.go", true),
        row("[a-c]*", "/x/banana", true),
        row("[a-c]*", "/x/dog", false),
        row("/x/[!a-c]*", "/x/dog", true),
        row("/x/[!a-c]*", "/x/cat", false),
        row("/x/[^a-c]*", "/x/apple", false),
        row("/x/[^a-c]*", "/x/dog", true),
        row("file[0-9].txt", "/d/file7.txt", true),
        row("file[0-9].txt", "/d/fileA.txt", false),
        row("?.txt", "/d/é.txt", true),
        row("??.txt", "/d/é.txt", false),
        row("[é]", "/d/é", true),
        row("\\*.txt", "/d/*.txt", true),
        row("\\*.txt", "/d/a.txt", false),
        row("a\\?", "/d/a?", true),
        row("a\\?", "/d/ab", false),
        row("[\\]]", "/d/]", true),
        row("[a\\-z]", "/d/-", true),
        row("[a\\-z]", "/d/m", false),
        row("\\!keep", "/d/!keep", true),
        row("a]b", "/d/a]b", true),
    ]

    /// Each row, as restic decides it.
    @Test(arguments: rows)
    func singlePattern(_ row: Row) throws {
        let rules = try ExcludeRules(excludes: [row.pattern], caseInsensitiveExcludes: [])
        #expect(rules.isExcluded(path: Array(row.path.utf8)) == row.matched)
    }

    /// Paths that are not UTF-8 still match byte for byte.
    @Test func nonUTF8Paths() throws {
        let rules = try ExcludeRules(excludes: ["*.bin", "/raw/?"], caseInsensitiveExcludes: [])
        #expect(rules.isExcluded(path: Array("/d/".utf8) + [0xFF, 0xFE] + Array(".bin".utf8)))
        #expect(rules.isExcluded(path: Array("/raw/".utf8) + [0xFF]))
        #expect(!rules.isExcluded(path: Array("/raw/".utf8) + [0xFF, 0xFE]))
        #expect(!rules.isExcluded(path: Array("/d/".utf8) + [0xFF]))
    }

    /// `--iexclude` lowercases both the pattern and the path.
    @Test func caseInsensitive() throws {
        let rules = try ExcludeRules(
            excludes: ["*.tmp"], caseInsensitiveExcludes: ["*.JPG", "/Home/*/CACHE", "[A-C]x", "ÉTÉ"])
        #expect(rules.isExcluded(path: Array("/p/IMG.jpg".utf8)))
        #expect(rules.isExcluded(path: Array("/p/img.Jpg".utf8)))
        #expect(rules.isExcluded(path: Array("/home/u/cache/x".utf8)))
        #expect(rules.isExcluded(path: Array("/HOME/u/Cache".utf8)))
        #expect(rules.isExcluded(path: Array("/d/bX".utf8)))
        #expect(rules.isExcluded(path: Array("/d/été".utf8)))
        #expect(rules.isExcluded(path: Array("/d/Été".utf8)))
        #expect(!rules.isExcluded(path: Array("/d/dx".utf8)))
        #expect(!rules.isExcluded(path: Array("/p/IMG.png".utf8)))
        // `--exclude` stays case-sensitive next to `--iexclude`.
        #expect(rules.isExcluded(path: Array("/p/a.tmp".utf8)))
        #expect(!rules.isExcluded(path: Array("/p/a.TMP".utf8)))
        // A non-UTF-8 byte is kept while the rest of the path is lowercased.
        #expect(rules.isExcluded(path: Array("/Été/".utf8) + [0xFF] + Array(".JPG".utf8)))
    }

    /// Lists with negations: (patterns, path, excluded, mayIncludeBelow), from restic's list tests.
    static let lists: [([String], String, Bool, Bool)] = [
        ([], "/foo/bar/test.go", false, true),
        (["*.go", "*.c"], "/foo/bar/test.go", true, false),
        (["*.go"], "/foo/bar", false, true),
        (["!**", "*.go"], "/foo/bar/test.go", true, false),
        (["!**", "*.c"], "/foo/bar/test.go", false, true),
        (["/foo/*/test.*", "!*.c"], "/foo/bar/test.c", false, true),
        (["/foo/*/test.*", "!*.c"], "/foo/bar/test.go", true, true),
        (["/foo/*/*", "!test.*", "*.c"], "/foo/bar/test.go", false, true),
        (["/foo/*/*", "!test.*", "*.c"], "/foo/bar/test.c", true, false),
        (["/foo/*/*", "!test.*", "*.c"], "/foo/bar/file.go", true, true),
        (["/**/*", "!/foo", "/foo/*", "!/foo/bar"], "/foo/other/test.go", true, false),
        (["/**/*", "!/foo", "/foo/*", "!/foo/bar"], "/foo/bar", false, true),
        (["/**/*", "!/foo", "/foo/*", "!/foo/bar"], "/foo/bar/test.go", false, true),
        (["/**/*", "!/foo", "/foo/*", "!/foo/bar", "/foo/bar/test*"], "/foo/bar/test.go/child", true, false),
        // restic's documented selection of home directories.
        (["/home/u/*", "!/home/u/Documents", "node_modules"], "/home/u/Music", true, false),
        (["/home/u/*", "!/home/u/Documents", "node_modules"], "/home/u/Documents/a.txt", false, true),
        (["/home/u/*", "!/home/u/Documents", "node_modules"], "/home/u/Documents/x/node_modules/y", true, false),
        // An excluded directory stays open while an anchored negation may match below it.
        (["/a", "!/a/b/keep"], "/a", true, true),
        (["/a", "!/a/b/keep"], "/a/b", true, true),
        (["/a", "!/a/b/keep"], "/a/c", true, false),
        (["/a", "!/a/b/keep"], "/a/b/keep", false, true),
        (["/a", "!/a/b/keep"], "/a/b/other", true, false),
        (["/a", "!/a/**/keep"], "/a/x/y", true, true),
        (["/a", "!/z/**/keep"], "/a/x/y", true, false),
        // A relative negation may match at any depth, so it keeps every directory open.
        (["/a", "!*.keep"], "/a/x", true, true),
        // A plain pattern after the negation seals the directory again.
        (["/a", "!*.keep", "/a/x"], "/a/x", true, false),
    ]

    /// Negations re-include what earlier patterns excluded, and `mayIncludeBelow` says whether
    /// a walker must descend into an excluded directory.
    @Test func negations() throws {
        for (patterns, path, excluded, mayIncludeBelow) in Self.lists {
            let rules = try ExcludeRules(excludes: patterns, caseInsensitiveExcludes: [])
            let bytes = Array(path.utf8)
            #expect(rules.isExcluded(path: bytes) == excluded, "\(patterns) on \(path)")
            #expect(rules.mayIncludeBelow(directory: bytes) == mayIncludeBelow, "\(patterns) below \(path)")
        }
    }

    /// A negation in one list does not cancel a match of the other, as in restic.
    @Test func listsAreSeparate() throws {
        let rules = try ExcludeRules(excludes: ["*.log"], caseInsensitiveExcludes: ["!keep.log"])
        #expect(rules.isExcluded(path: Array("/d/keep.log".utf8)))
        let rules2 = try ExcludeRules(excludes: ["*.log", "!keep.log"], caseInsensitiveExcludes: [])
        #expect(!rules2.isExcluded(path: Array("/d/keep.log".utf8)))
    }

    /// `isEmpty` is true only without patterns; then nothing is excluded.
    @Test func empty() throws {
        let rules = try ExcludeRules(excludes: [], caseInsensitiveExcludes: [])
        #expect(rules.isEmpty)
        #expect(!rules.isExcluded(path: Array("/a/b".utf8)))
        #expect(rules.mayIncludeBelow(directory: Array("/a".utf8)))
        #expect(try !ExcludeRules(excludes: [], caseInsensitiveExcludes: ["x"]).isEmpty)
    }

    /// Malformed patterns are refused with a message that names them.
    @Test(arguments: ["", "!", "test/[", "test/**/[", "[abc", "[]", "[!]", "[^]", "[a-]", "[-a]", "foo\\", ".", "a/.."])
    func malformed(_ pattern: String) {
        let error = #expect(throws: CABackupError.self) {
            _ = try ExcludeRules(excludes: ["ok", pattern], caseInsensitiveExcludes: [])
        }
        guard case .invalidArgument(let message)? = error else {
            Issue.record("expected invalidArgument for \(pattern), got \(String(describing: error))")
            return
        }
        #expect(message.hasPrefix("--exclude pattern"))
        #expect(pattern.isEmpty || message.contains("'\(pattern)'"))
        #expect(!message.contains("\n"))
        #expect(throws: CABackupError.self) {
            _ = try ExcludeRules(excludes: [], caseInsensitiveExcludes: [pattern])
        }
    }
}
