import Foundation
import Testing

/// Every command below the root, as typed after `cabackup`.
let leafCommands = [
    "init", "snapshot", "snapshots", "ls", "restore", "status", "diff", "watch", "check", "forget", "prune",
    "repair index", "key list", "key add", "key remove", "key passwd", "server", "register", "login", "logout",
    "stats", "tag", "dump", "find", "rewrite", "copy", "mount", "ui", "devices", "rebind", "trust",
]

/// `cabackup <command> --help` at a terminal width of `columns`.
func help(_ command: String, columns: Int) throws -> String {
    let args = command.split(separator: " ").map(String.init) + ["--help"]
    return try run(cabackupBinary, args, env: ["COLUMNS": "\(columns)"]).stdout
}

/// The lines of the section of `text` that starts with the line `header`, up to the next blank line.
func section(_ header: String, of text: String) -> [String] {
    let lines = text.components(separatedBy: "\n")
    guard let start = lines.firstIndex(of: header) else { return [] }
    return Array(lines[(start + 1)...].prefix { !$0.isEmpty })
}

@Suite("help texts and messages say what is wrong and what to do", .serialized)
struct MessageTests {
    @Test("the README shows how to install shell completions and what a debug build costs; the command works")
    func readmeCompletions() throws {
        let readme = try String(contentsOfFile: packageRoot + "/README.md", encoding: .utf8)
        #expect(readme.contains("cabackup --generate-completion-script bash"))
        #expect(readme.contains("several seconds") && readme.contains("debug build"))
        for shell in ["bash", "zsh", "fish"] {
            let r = try cabackup("--generate-completion-script", shell)
            #expect(r.status == 0 && r.stdout.contains("snapshot"), "\(shell): \(r.stderr)")
        }
    }

    @Test("every command is checked: the main help lists no command the list here lacks")
    func allCommandsListed() throws {
        let names = section("SUBCOMMANDS:", of: try help("", columns: 200)).compactMap {
            $0.split(separator: " ").first.map { String($0).trimmingCharacters(in: .punctuationCharacters) }
        }
        #expect(names.count > 15)
        for name in names where name != "repair" && name != "key" {
            #expect(leafCommands.contains(name), "\(name)")
        }
    }

    @Test("exit codes: the table is in the main help and the README, subcommand help points there")
    func exitCodesOnce() throws {
        let main = try help("", columns: 80)
        #expect(main.contains("EXIT CODES:"))
        for command in leafCommands {
            let text = try help(command, columns: 80)
            #expect(!text.contains("EXIT CODES"), "\(command)")
            #expect(!text.contains("130  interrupted"), "\(command)")
            #expect(text.contains("Exit codes: see cabackup --help."), "\(command)")
        }
        // The README's table names the same codes.
        let helpCodes = section("EXIT CODES:", of: main).compactMap { Int($0.split(separator: " ").first ?? "") }
        let readme = try String(contentsOfFile: packageRoot + "/README.md", encoding: .utf8)
        let readmeCodes = readme.components(separatedBy: "\n").compactMap { line -> Int? in
            guard line.hasPrefix("| ") else { return nil }
            return Int(line.dropFirst(2).prefix { $0 != " " })
        }
        #expect(helpCodes == [0, 1, 3, 4, 10, 11, 12, 13, 14, 64, 130])
        #expect(readmeCodes == helpCodes)
        // No line of the table is wrapped at 80 columns.
        #expect(section("EXIT CODES:", of: main).allSatisfy { $0.hasPrefix("  ") })
    }

    @Test("help text wraps at the terminal's width, never mid-sentence, at 80 and 120 columns")
    func discussionsWrapAtTheWidth() throws {
        for columns in [80, 120] {
            for command in leafCommands {
                let text = try help(command, columns: columns)
                let overview = text.components(separatedBy: "\nUSAGE:")[0].components(separatedBy: "\n")
                for (line, next) in zip(overview, overview.dropFirst()) where !line.isEmpty && !next.isEmpty {
                    let word = next.prefix { $0 != " " }
                    // A line was broken by wrapping only when the next word did not fit on it.
                    #expect(
                        line.count + 1 + word.count >= columns,
                        "\(command) at \(columns) columns breaks after: \(line)")
                }
            }
        }
    }

    @Test("every option and argument has help text, and none states its default twice")
    func optionsHaveHelp() throws {
        for command in leafCommands {
            let text = try help(command, columns: 200)
            let lines = section("OPTIONS:", of: text) + section("ARGUMENTS:", of: text)
            for (i, line) in lines.enumerated() where line.hasPrefix("  -") || line.hasPrefix("  <") {
                // The label is its names and value names (`-r, --repo <repo>`); the rest is help.
                let rest = line.split(separator: " ").drop { $0.hasPrefix("-") || $0.hasPrefix("<") || $0 == "..." }
                let continued = i + 1 < lines.count && lines[i + 1].hasPrefix("          ")
                #expect(!rest.isEmpty || continued, "\(command): \(line)")
                let helpText = continued && rest.isEmpty ? lines[i + 1] : line
                #expect(helpText.components(separatedBy: "default").count <= 2, "\(command): \(helpText)")
            }
        }
        let watch = try help("watch", columns: 200)
        #expect(watch.contains("--every <duration>"))
        #expect(watch.contains("(default: 24h)"))
    }

    @Test("an unknown command is named with the nearest one; exit 64")
    func unknownCommand() throws {
        let typo = try cabackup("snapshott")
        #expect(typo.status == 64)
        #expect(
            typo.stderr == "cabackup: unknown command 'snapshott': did you mean 'snapshot'? (see cabackup --help)\n")
        let nested = try cabackup("key", "lst")
        #expect(nested.status == 64)
        #expect(
            nested.stderr == "cabackup key: unknown command 'lst': did you mean 'list'? (see cabackup key --help)\n")
        let far = try cabackup("frobnicate")
        #expect(far.status == 64)
        #expect(far.stderr == "cabackup: unknown command 'frobnicate' (see cabackup --help)\n")
        #expect(try cabackup("backup", "--help").status == 0)  // an alias is a command
    }

    @Test("a usage error of a subcommand shows that subcommand's usage")
    func subcommandUsage() throws {
        let s = Scratch()
        // Thrown while running (no --repo, no CABACKUP_REPO), not while parsing.
        let noRepo = try cabackup("snapshot", s.path)
        #expect(noRepo.status == 64)
        #expect(noRepo.stderr.contains("no repository given"))
        #expect(noRepo.stderr.contains("Usage: cabackup snapshot ["))
        #expect(noRepo.stderr.contains("See 'cabackup snapshot --help'"))
        #expect(!noRepo.stderr.contains("cabackup <subcommand>"))
        let nested = try cabackup("key", "add")
        #expect(nested.status == 64)
        #expect(nested.stderr.contains("Usage: cabackup key add ["))
        let parsing = try cabackup("restore", "latest")
        #expect(parsing.status == 64)
        #expect(parsing.stderr.contains("Usage: cabackup restore ["))
    }

    @Test("a directory holding other files is not called missing: check --repo, or init an empty one")
    func notARepository() throws {
        let s = Scratch()
        try FileManager.default.createDirectory(atPath: s.file("docs"), withIntermediateDirectories: true)
        try Data("text".utf8).write(to: URL(fileURLWithPath: s.file("docs/readme.txt")))
        let r = try cabackup("snapshots", "--repo", s.file("docs"))
        #expect(r.status == 10)
        #expect(r.stderr.contains("\(s.file("docs")) is not a cabackup repository"))
        #expect(r.stderr.contains("check --repo"))
        #expect(!r.stderr.contains("cabackup init --repo"), "init would refuse a non-empty directory")
        #expect(r.stderr.split(separator: "\n").count == 1)
        #expect(try FileManager.default.contentsOfDirectory(atPath: s.file("docs")) == ["readme.txt"])
        // An empty or missing directory is still "no repository": init it.
        let missing = try cabackup("snapshots", "--repo", s.file("none"))
        #expect(missing.status == 10)
        #expect(missing.stderr.contains("cabackup init --repo"))
    }

    @Test("--repo with a scheme cabackup has no storage for is refused, and nothing is created")
    func unknownSchemes() throws {
        let s = Scratch()
        try FileManager.default.createDirectory(atPath: s.file("cwd"), withIntermediateDirectories: true)
        try Data("x".utf8).write(to: URL(fileURLWithPath: s.file("src")))
        for repo in ["swift:container:/x", "sftp:host:/x", "rest:http://host:8000/", "b2:bucket"] {
            for args in [["init", "--repo", repo], ["snapshot", "--repo", repo, s.file("src")], ["snapshots"]] {
                let r = try run(
                    cabackupBinary, args, env: args[0] == "snapshots" ? ["CABACKUP_REPO": repo] : [:],
                    cwd: s.file("cwd"))
                #expect(r.status == 64, "\(args): \(r.stderr)")
                #expect(r.stderr.contains("http(s)://NAME@HOST[:PORT][/PREFIX]"), "\(r.stderr)")
                #expect(r.stderr.contains("'\(repo.prefix { $0 != ":" }):'"), "\(r.stderr)")
                #expect(r.stderr.split(separator: "\n").count == 1)
            }
        }
        // s3: is a storage: a malformed location is named, in one line, before anything is sent.
        let badBucket = try run(cabackupBinary, ["init", "--repo", "s3:http://HOST/BUCKET"], cwd: s.file("cwd"))
        #expect(badBucket.status != 0)
        #expect(badBucket.stderr.contains("'BUCKET' is not a bucket name"), "\(badBucket.stderr)")
        #expect(badBucket.stderr.split(separator: "\n").count == 1)
        #expect(try FileManager.default.contentsOfDirectory(atPath: s.file("cwd")).isEmpty)
        // A local path with a colon works written as ./name or absolute.
        let relative = try cabackup("init", "--repo", "./with:colon", cwd: s.file("cwd"))
        #expect(relative.status == 0, "\(relative.stderr)")
        #expect(try cabackup("snapshot", "--repo", s.file("cwd/with:colon"), s.file("src")).status == 0)
        #expect(try cabackup("snapshots", "--repo", "./with:colon", cwd: s.file("cwd")).stdout.contains("1 snapshots"))
    }

    @Test("ls --long keeps its columns when owners differ")
    func lsColumns() throws {
        let s = Scratch()
        let src = s.file("src")
        _ = try python(treetool, "make", src)
        if geteuid() == 0 {
            chown(src + "/docs/hello.txt", 1000, 1000)
            chown(src + "/script.sh", 65534, 65534)
            chown(src + "/docs", 123, 4567)
        }
        _ = try cabackup("init", "--repo", s.file("repo"))
        _ = try cabackup("snapshot", "--repo", s.file("repo"), src)
        let long = try cabackup("ls", "--repo", s.file("repo"), "--long", "latest", src, env: ["TZ": "UTC"])
        #expect(long.status == 0)
        let lines = long.stdout.split(separator: "\n").filter { $0.hasPrefix("-") || $0.hasPrefix("d") }
        #expect(lines.count > 10)
        let timeColumns = Set(
            lines.compactMap { line in
                line.range(of: #" \d{4}-\d\d-\d\d \d\d:\d\d:\d\d "#, options: .regularExpression)
                    .map { line.distance(from: line.startIndex, to: $0.lowerBound) }
            })
        #expect(timeColumns.count == 1, "\(long.stdout)")
        if geteuid() == 0 { #expect(long.stdout.contains(" 65534/65534 ")) }
    }

    @Test("snapshot and restore count hard-linked files the same way")
    func hardLinkCounts() throws {
        let s = Scratch()
        let src = s.file("src")
        _ = try python(treetool, "make", src)  // hard-a, docs/hard-b and empty-dir-sibling-hard-c: one inode
        _ = try cabackup("init", "--repo", s.file("repo"))
        let snap = try cabackup("snapshot", "--repo", s.file("repo"), "--json", src)
        let files = try #require(jsonObject(snap.lastLine)?["files_total"] as? Int)
        let text = try cabackup("snapshot", "--repo", s.file("repo"), "--force", src)
        #expect(text.stdout.hasPrefix("\(files) files"))
        let restore = try cabackup("restore", "--repo", s.file("repo"), "latest", "--target", s.file("out"))
        #expect(restore.status == 0, "\(restore.stderr)")
        #expect(restore.stdout.hasPrefix("restored \(files) files (2 as hard links), "), "\(restore.stdout)")
    }

    @Test("a server that cannot be reached: exit 14, one line, balanced parentheses")
    func unreachable() throws {
        let s = Scratch()
        let server = try TestServer(data: s.file("server"))
        let url = server.url
        #expect(server.stop() == 0)  // nothing listens on its port any more
        let r = try cabackup("login", "--server", url, "--user", "alice", env: device(s, "alice", password: "pw"))
        #expect(r.status == 14)
        #expect(r.stderr.contains("cannot reach the server at \(url) ("), "\(r.stderr)")
        #expect(r.stderr.split(separator: "\n").count == 1)
        // Depth after each character: never below zero, and zero at the end.
        let depths = r.stderr.reduce(into: [0]) { d, c in d.append(d.last! + (c == "(" ? 1 : c == ")" ? -1 : 0)) }
        #expect(depths.min() == 0 && depths.last == 0, "\(r.stderr)")
    }

    @Test("a refused login does not tell to log in; register checks the name before asking a password")
    func accountMessages() throws {
        let (s, server, alice) = try aliceOnServer()
        var wrong = alice
        wrong["CABACKUP_PASSWORD"] = "not alice's password"
        let login = try cabackup("login", "--server", server.url, "--user", "alice", env: wrong)
        #expect(login.status == 13)
        #expect(login.stderr.contains("did not accept the login of 'alice'"))
        #expect(login.stderr.contains("check the user name and the password"))
        #expect(!login.stderr.contains("run 'cabackup login"), "\(login.stderr)")
        #expect(login.stderr.split(separator: "\n").count == 1)
        // A command other than login still says to log in.
        let other = device(s, "other", password: "alice password")
        let notLoggedIn = try cabackup("snapshots", "--repo", server.repo("alice"), env: other)
        #expect(notLoggedIn.status == 13)
        #expect(notLoggedIn.stderr.contains("cabackup login"))
        // A malformed name is refused before any password is needed (none is given here).
        var noPassword = alice
        noPassword["CABACKUP_PASSWORD"] = ""
        let badName = try cabackup(
            "register", "--server", server.url, "--user", "Bad/Name", "--email", "b@example.org", env: noPassword)
        #expect(badName.status == 64)
        #expect(badName.stderr.contains("'Bad/Name' is not a valid account name"), "\(badName.stderr)")
        // A taken name with a good password: the server's answer.
        let taken = try cabackup(
            "register", "--server", server.url, "--user", "alice", "--email", "b@example.org", env: alice)
        #expect(taken.status == 1)
        #expect(taken.stderr.contains("taken"))
    }
}
