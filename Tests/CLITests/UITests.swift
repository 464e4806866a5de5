import Foundation
import Testing

let uitool = packageRoot + "/Tests/CLITests/uitool.py"

/// One answer of `cabackup ui`, as uitool.py printed it.
struct UIResponse {
    var status: Int
    var headers: [String: String]
    var body: String
    var json: Any? { try? JSONSerialization.jsonObject(with: Data(body.utf8)) }
    var object: [String: Any] { json as? [String: Any] ?? [:] }
}

/// A `cabackup ui` started from the test on 127.0.0.1 with a free port, its runtime,
/// config and cache directories in the scratch directory.
final class TestUI {
    let process = Process()
    let port: Int
    let base: String
    let accessFile: String
    let config: String
    /// The session cookie, once logged in.
    var cookie: String?

    init(_ s: Scratch, config: String? = nil, env: [String: String] = [:]) throws {
        self.config = config ?? s.file("device.json")
        try FileManager.default.createDirectory(atPath: s.file("run"), withIntermediateDirectories: true)
        process.executableURL = URL(fileURLWithPath: cabackupBinary)
        process.arguments = ["ui", "--listen", "127.0.0.1:0", "--no-open", "--config", self.config]
        process.environment = childEnvironment(
            [
                "XDG_RUNTIME_DIR": s.file("run"), "XDG_CONFIG_HOME": s.file("config"),
                "XDG_CACHE_HOME": s.file("cache"), "CABACKUP_PASSWORD": "",
            ].merging(env) { $1 })
        let found = try startListening(
            process, what: "cabackup ui", markers: ["listening on http://127.0.0.1:", "open "],
            stderr: s.file("ui.log"))
        port = try #require(Int(found[0]))
        base = "http://127.0.0.1:\(port)"
        accessFile = String(found[1].prefix(while: { $0 != " " }))
    }

    /// A request through uitool.py: with the session cookie (once there is one), the
    /// X-CABackup-UI header and the right Host unless told otherwise.
    @discardableResult
    func request(
        _ method: String, _ path: String, json: String? = nil, withCookie: Bool = true, host: String? = nil,
        origin: String? = nil, uiHeader: Bool = true, out: String? = nil
    ) throws -> UIResponse {
        var args = [uitool, method, base + path]
        if withCookie, let cookie { args += ["--cookie", cookie] }
        if let host { args += ["--host", host] }
        if let origin { args += ["--origin", origin] }
        if uiHeader { args += ["--ui"] }
        if let json { args += ["--data", json] }
        if let out { args += ["--out", out] }
        let r = try run("/usr/bin/env", ["python3"] + args)
        let lines = r.stdout.split(separator: "\n", maxSplits: 2, omittingEmptySubsequences: false)
        guard lines.count >= 2, let status = Int(lines[0]) else {
            throw CocoaError(.fileReadUnknown, userInfo: [NSLocalizedDescriptionKey: "uitool failed: \(r.stderr)"])
        }
        let headers =
            (try? JSONSerialization.jsonObject(with: Data(lines[1].utf8))) as? [String: String] ?? [:]
        return UIResponse(status: status, headers: headers, body: lines.count > 2 ? String(lines[2]) : "")
    }

    /// The token in the access file (the test reads it as the browser would).
    func token() throws -> String {
        let page = try String(contentsOfFile: accessFile, encoding: .utf8)
        let r = try #require(page.range(of: "token="))
        return String(page[r.upperBound...].prefix(while: { $0.isHexDigit }))
    }

    /// Exchanges the access file's token for the session cookie.
    func login() throws {
        let r = try request("GET", "/login?token=\(try token())", withCookie: false)
        #expect(r.status == 200)
        let setCookie = try #require(r.headers["set-cookie"])
        let value = try #require(setCookie.split(separator: ";").first?.split(separator: "=", maxSplits: 1).last)
        cookie = String(value)
    }

    /// Polls a job until it is no longer running (at most 60 s).
    func waitForJob(_ id: String) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(60)
        while true {
            let job = try request("GET", "/api/jobs/\(id)").object
            if job["state"] as? String != "running" || Date() > deadline { return job }
            usleep(100_000)
        }
    }

    /// SIGTERM, then the exit status (SIGKILL after 10 s).
    func stop() -> Int32 {
        guard process.isRunning else { return process.terminationStatus }
        kill(process.processIdentifier, SIGTERM)
        let deadline = Date().addingTimeInterval(10)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        return process.terminationStatus
    }

    /// The server process's resident memory in bytes (VmRSS).
    func residentBytes() throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8)
        let line = try #require(status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") })
        return try #require(Int(line.split(separator: " ", omittingEmptySubsequences: true)[1])) * 1024
    }

    deinit { _ = stop() }
}

func fileMode(_ path: String) -> mode_t? {
    var st = stat()
    return stat(path, &st) == 0 ? st.st_mode & 0o7777 : nil
}

@Suite("cabackup ui: the local web app and its JSON API", .serialized)
struct UITests {
    @Test("the access file is 0600 and its token, and only it, gives a session cookie")
    func access() throws {
        let s = Scratch()
        let ui = try TestUI(s)
        #expect(ui.accessFile.hasPrefix(s.file("run/cabackup-ui-\(ui.port).html")))
        #expect(fileMode(ui.accessFile) == 0o600)
        // Nothing without the cookie: the API answers 401, the page sends to /locked.
        let noCookie = try ui.request("GET", "/api/repositories")
        #expect(noCookie.status == 401)
        #expect(noCookie.object["error"] is String)
        let page = try ui.request("GET", "/")
        #expect(page.status == 303 && page.headers["location"] == "/locked")
        // A wrong token gets no cookie.
        let wrong = try ui.request("GET", "/login?token=" + String(repeating: "0", count: 64))
        #expect(wrong.status == 403)
        #expect(wrong.headers["set-cookie"] == nil)
        // The right one does: HttpOnly, SameSite=Strict, for the whole site.
        let right = try ui.request("GET", "/login?token=\(try ui.token())")
        // A page that goes on to / (a same-site navigation, which sends the Strict cookie).
        #expect(right.status == 200 && right.body.contains("content=\"0;url=/\""))
        let setCookie = try #require(right.headers["set-cookie"])
        #expect(setCookie.hasPrefix("cabackup_ui="))
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] { #expect(setCookie.contains(attribute)) }
        try ui.login()
        let listed = try ui.request("GET", "/api/repositories")
        #expect(listed.status == 200 && listed.body == "[]")
        #expect(listed.headers["cache-control"] == "no-store")
        #expect(listed.headers["x-content-type-options"] == "nosniff")
        #expect(listed.headers["x-frame-options"] == "DENY")
        #expect(listed.headers["content-security-policy"]?.contains("default-src 'self'") == true)
        // An unknown route is 404, with the same headers.
        let unknown = try ui.request("GET", "/api/nothing")
        #expect(unknown.status == 404 && unknown.headers["cache-control"] == "no-store")
        // A forged cookie is no session.
        let saved = ui.cookie
        ui.cookie = String(repeating: "a", count: 64)
        #expect(try ui.request("GET", "/api/repositories").status == 401)
        ui.cookie = saved
        // The page, its script and style, with the cookie.
        let html = try ui.request("GET", "/")
        #expect(html.status == 200 && html.body.contains("<script src=\"/app.js\""))
        #expect(try ui.request("GET", "/app.js").headers["content-type"]?.hasPrefix("text/javascript") == true)
        #expect(try ui.request("GET", "/app.css").status == 200)
        // A clean stop exits 0 and removes the access file.
        #expect(ui.stop() == 0)
        #expect(!FileManager.default.fileExists(atPath: ui.accessFile))
    }

    @Test("another Host (DNS rebinding), a change without X-CABackup-UI, or from another origin gets 403")
    func crossSite() throws {
        let s = Scratch()
        let ui = try TestUI(s)
        #expect(try ui.request("GET", "/login?token=\(try ui.token())", host: "evil.example:\(ui.port)").status == 403)
        try ui.login()
        #expect(try ui.request("GET", "/api/repositories", host: "evil.example:\(ui.port)").status == 403)
        #expect(try ui.request("GET", "/api/repositories", host: "127.0.0.1:1").status == 403)
        for host in ["127.0.0.1:\(ui.port)", "localhost:\(ui.port)", "[::1]:\(ui.port)"] {
            #expect(try ui.request("GET", "/api/repositories", host: host).status == 200)
        }
        let body = #"{"name":"x","repo":"relative","paths":["/tmp"]}"#
        let noHeader = try ui.request("POST", "/api/repositories", json: body, uiHeader: false)
        #expect(noHeader.status == 403)
        #expect((noHeader.object["error"] as? String)?.contains("X-CABackup-UI") == true)
        #expect(try ui.request("DELETE", "/api/repositories/x/unlock", uiHeader: false).status == 403)
        let foreign = try ui.request("POST", "/api/repositories", json: body, origin: "http://evil.example")
        #expect(foreign.status == 403)
        #expect(
            try ui.request("POST", "/api/repositories", json: body, origin: "http://127.0.0.1:\(ui.port + 1)").status
                == 403)
        // From the page's own origin the request reaches its route (which refuses the
        // relative location with 400).
        let own = try ui.request("POST", "/api/repositories", json: body, origin: "http://127.0.0.1:\(ui.port)")
        #expect(own.status == 400)
        #expect((own.object["error"] as? String)?.contains("not an absolute path") == true)
    }

    @Test("--listen refuses an address that is not loopback, with exit code 64")
    func loopbackOnly() throws {
        let s = Scratch()
        for address in ["0.0.0.0:0", "192.168.1.1:8080", "example.com:80"] {
            let r = try cabackup("ui", "--listen", address, "--no-open", "--config", s.file("device.json"))
            #expect(r.status == 64)
            #expect(r.stderr.split(separator: "\n").count == 1)
            #expect(r.stderr.contains("loopback"))
        }
    }

    @Test("a bad device configuration file gets one line naming the file and what is wrong")
    func badConfiguration() throws {
        let s = Scratch()
        let file = s.file("device.json")
        try #"{"version":1,"repositories":[{"name":"home","paths":["/tmp"]}]}"#.write(
            toFile: file, atomically: true, encoding: .utf8)
        let r = try cabackup("ui", "--no-open", "--config", file, env: ["XDG_RUNTIME_DIR": s.path])
        #expect(r.status == 1)
        #expect(r.stderr.split(separator: "\n").count == 1)
        #expect(r.stderr.contains(file) && r.stderr.contains("lacks the field 'repo'"))
        try #"{"version":1,"repositories":[{"name":"home","repo":"/r","paths":["/tmp"],"every":"often"}]}"#.write(
            toFile: file, atomically: true, encoding: .utf8)
        let every = try cabackup("ui", "--no-open", "--config", file, env: ["XDG_RUNTIME_DIR": s.path])
        #expect(every.status == 1 && every.stderr.contains("every 'often' is not a duration"))
    }

    @Test("add and create a repository, unlock it, see a change, sync, browse, download and restore")
    func flow() throws {
        let s = Scratch()
        let src = s.file("src")
        try writeRandom(src + "/docs/report.bin", megabytes: 1)
        try "notes\n".write(toFile: src + "/notes.txt", atomically: true, encoding: .utf8)
        try "skip\n".write(toFile: src + "/cache.tmp", atomically: true, encoding: .utf8)
        let ui = try TestUI(s)
        try ui.login()
        let password = "ui flow password"
        let add = """
            {"name":"home","repo":"\(s.file("repo"))","paths":["\(src)"],"every":"1s","exclude":["*.tmp"],"init":true,"password":"\(password)"}
            """
        let added = try ui.request("POST", "/api/repositories", json: add)
        #expect(added.status == 201)
        #expect(added.object["unlocked"] as? Bool == true)
        #expect(try ui.request("POST", "/api/repositories", json: add).status == 400)  // the name is taken
        // Validation: one line in {"error"}.
        let bad = try ui.request(
            "POST", "/api/repositories", json: #"{"name":"x y","repo":"/r","paths":["/tmp"]}"#)
        #expect(bad.status == 400 && (bad.object["error"] as? String)?.contains("name") == true)
        // An existing repository is added with its password, checked first.
        let existing = """
            {"name":"again","repo":"\(s.file("repo"))","paths":["\(src)"],"password":"not it"}
            """
        #expect(try ui.request("POST", "/api/repositories", json: existing).status == 403)
        let readded = try ui.request(
            "POST", "/api/repositories", json: existing.replacingOccurrences(of: "not it", with: password))
        #expect(readded.status == 201 && readded.object["unlocked"] as? Bool == true)
        // The configuration file: 0600, no password.
        #expect(fileMode(ui.config) == 0o600)
        let configText = try String(contentsOfFile: ui.config, encoding: .utf8)
        #expect(configText.contains("\"home\"") && !configText.contains(password))
        #expect(FileManager.default.fileExists(atPath: s.file("repo/config")))

        // Locked: the password is forgotten; a wrong one is refused, the right one opens it.
        #expect(try ui.request("DELETE", "/api/repositories/home/unlock").object["unlocked"] as? Bool == false)
        #expect(try ui.request("GET", "/api/repositories/home/snapshots").status == 423)
        #expect(try ui.request("POST", "/api/repositories/home/sync").status == 423)
        let wrong = try ui.request("POST", "/api/repositories/home/unlock", json: #"{"password":"not it"}"#)
        #expect(wrong.status == 403 && wrong.object["error"] is String)
        let right = try ui.request("POST", "/api/repositories/home/unlock", json: "{\"password\":\"\(password)\"}")
        #expect(right.status == 200 && right.object["unlocked"] as? Bool == true)
        let listed = try #require(try ui.request("GET", "/api/repositories").json as? [[String: Any]])
        #expect(listed.first?["unlocked"] as? Bool == true)

        // The schedule (every 1s) checks the changes on its own once unlocked.
        var scheduled = try ui.request("GET", "/api/repositories/home/changes?cached=1")
        let deadline = Date().addingTimeInterval(30)
        while scheduled.status != 200 && Date() < deadline {
            usleep(100_000)
            scheduled = try ui.request("GET", "/api/repositories/home/changes?cached=1")
        }
        #expect(scheduled.status == 200 && scheduled.object["checkedAt"] is String)

        // What changed: everything, but the excluded file.
        let changes = try ui.request("GET", "/api/repositories/home/changes").object
        let entries = try #require(changes["entries"] as? [[String: Any]])
        let changed = entries.compactMap { $0["path"] as? String }
        #expect(changed.contains(src + "/docs/report.bin") && changed.contains(src + "/notes.txt"))
        #expect(!changed.contains(src + "/cache.tmp"))
        #expect(changes["filesToSync"] as? Int == 2)
        #expect(changes["checkedAt"] is String)

        // Sync now: a job to follow until done.
        let sync = try ui.request("POST", "/api/repositories/home/sync")
        #expect(sync.status == 202)
        let job = try ui.waitForJob(try #require(sync.object["job"] as? String))
        #expect(job["state"] as? String == "done")
        #expect(job["files"] as? Int == 2)
        let snapshotID = try #require(job["snapshot"] as? String)
        let after = try ui.request("GET", "/api/repositories/home/changes").object
        #expect(after["filesToSync"] as? Int == 0 && after["base"] as? String == snapshotID)

        // The timeline lists it, with what it added.
        let snapshots = try #require(try ui.request("GET", "/api/repositories/home/snapshots").json as? [[String: Any]])
        #expect(snapshots.count == 1)
        #expect(snapshots.first?["id"] as? String == snapshotID)
        #expect(snapshots.first?["shortId"] as? String == String(snapshotID.prefix(8)))
        #expect((snapshots.first?["bytesAdded"] as? Int ?? 0) > 1 << 20)
        #expect(snapshots.first?["filesNewOrChanged"] as? Int == 2)

        // Browse its tree.
        let tree = try ui.request("GET", "/api/repositories/home/snapshots/\(snapshotID)/tree?path=\(src)/docs").object
        let files = try #require(tree["entries"] as? [[String: Any]])
        #expect(files.count == 1)
        #expect(files.first?["name"] as? String == "report.bin")
        #expect(files.first?["type"] as? String == "file" && files.first?["size"] as? Int == 1 << 20)
        #expect(files.first?["mode"] is String && files.first?["mtime"] is String)
        let root = try ui.request("GET", "/api/repositories/home/snapshots/\(snapshotID)/tree?path=/")
        #expect(root.status == 200)
        let missing = try ui.request("GET", "/api/repositories/home/snapshots/\(snapshotID)/tree?path=/nowhere")
        #expect(missing.status == 404)

        // find answers from the path index.
        let found = try ui.request("GET", "/api/repositories/home/find?pattern=report.bin").object
        let matches = try #require(found["matches"] as? [[String: Any]])
        #expect(matches.map { $0["path"] as? String } == [src + "/docs/report.bin"])

        // Download: the file's bytes, streamed; a directory as tar.
        let original = try Data(contentsOf: URL(fileURLWithPath: src + "/docs/report.bin"))
        let download = try ui.request(
            "GET", "/api/repositories/home/snapshots/\(snapshotID)/download?path=\(src)/docs/report.bin",
            out: s.file("download.bin"))
        #expect(download.status == 200)
        #expect(download.headers["content-disposition"] == "attachment; filename=\"report.bin\"")
        #expect(try Data(contentsOf: URL(fileURLWithPath: s.file("download.bin"))) == original)
        let tar = try ui.request(
            "GET", "/api/repositories/home/snapshots/latest/download?path=\(src)/docs", out: s.file("docs.tar"))
        #expect(tar.status == 200 && tar.headers["content-type"] == "application/x-tar")
        try FileManager.default.createDirectory(atPath: s.file("untar"), withIntermediateDirectories: true)
        #expect(try run("/bin/tar", ["-xf", s.file("docs.tar"), "-C", s.file("untar")]).status == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: s.file("untar/docs/report.bin"))) == original)

        // Restore one file into a target.
        let target = s.file("target")
        let restore = try ui.request(
            "POST", "/api/repositories/home/restore",
            json:
                "{\"snapshot\":\"\(snapshotID.prefix(8))\",\"path\":\"\(src)/docs/report.bin\",\"target\":\"\(target)\"}"
        )
        #expect(restore.status == 202)
        let restored = try ui.waitForJob(try #require(restore.object["job"] as? String))
        #expect(restored["state"] as? String == "done")
        #expect(restored["bytes"] as? Int == 1 << 20)
        #expect(try Data(contentsOf: URL(fileURLWithPath: target + src + "/docs/report.bin")) == original)
        #expect(!FileManager.default.fileExists(atPath: target + src + "/notes.txt"))
        // A failed job says why.
        let again = try ui.request(
            "POST", "/api/repositories/home/restore",
            json: "{\"snapshot\":\"latest\",\"path\":\"\(src)/nothing\",\"target\":\"\(s.file("target2"))\"}")
        let failed = try ui.waitForJob(try #require(again.object["job"] as? String))
        #expect(failed["state"] as? String == "failed" && failed["error"] is String)
        #expect(try ui.request("GET", "/api/jobs/0000").status == 404)

        // Nothing this process wrote holds the password.
        #expect(!(try String(contentsOfFile: ui.config, encoding: .utf8)).contains(password))
        #expect(!(try String(contentsOfFile: s.file("ui.log"), encoding: .utf8)).contains(password))
        #expect(fileMode(ui.config) == 0o600)
    }

    @Test("a download is streamed: a client that stops reading leaves the server holding little of the file")
    func streamedDownload() throws {
        let s = Scratch()
        let size = 160 << 20
        try writeRandom(s.file("src/big.bin"), megabytes: size >> 20)
        let ui = try TestUI(s)
        try ui.login()
        let add = """
            {"name":"big","repo":"\(s.file("repo"))","paths":["\(s.file("src"))"],"init":true,"password":"big password"}
            """
        #expect(try ui.request("POST", "/api/repositories", json: add).status == 201)
        let sync = try ui.request("POST", "/api/repositories/big/sync")
        #expect(try ui.waitForJob(try #require(sync.object["job"] as? String))["state"] as? String == "done")
        let before = try ui.residentBytes()
        // A client that reads 1 MiB, then nothing for 3 seconds.
        let client = Process()
        client.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        client.arguments = [
            "python3", uitool, "GET",
            ui.base + "/api/repositories/big/snapshots/latest/download?path=\(s.file("src/big.bin"))",
            "--cookie", try #require(ui.cookie), "--out", s.file("big.out"), "--pause-after", "\(1 << 20)",
            "--pause-seconds", "3",
        ]
        client.standardOutput = FileHandle.nullDevice
        try client.run()
        let deadline = Date().addingTimeInterval(30)
        func received() -> Int {
            ((try? FileManager.default.attributesOfItem(atPath: s.file("big.out")))?[.size] as? Int) ?? 0
        }
        while received() < 1 << 20 && Date() < deadline { usleep(20_000) }
        // While it waits, the server holds the pipe, a window of the dump and the
        // connection's buffers: far less than the file (a buffered body would be all of it).
        var most = 0
        for _ in 0..<10 {
            most = max(most, try ui.residentBytes())
            usleep(100_000)
        }
        #expect(most - before < 64 << 20, "grew by \(most - before) bytes")
        client.waitUntilExit()
        #expect(client.terminationStatus == 0)
        #expect(
            try Data(contentsOf: URL(fileURLWithPath: s.file("big.out")))
                == Data(contentsOf: URL(fileURLWithPath: s.file("src/big.bin"))))
    }

    @Test("a scheduled check that finds changes runs notify-send once per change set")
    func desktopNotification() throws {
        let s = Scratch()
        let src = s.file("src")
        try FileManager.default.createDirectory(atPath: src, withIntermediateDirectories: true)
        try "first\n".write(toFile: src + "/a.txt", atomically: true, encoding: .utf8)
        // notify-send needs a D-Bus session: a stand-in first on PATH records its arguments,
        // one NUL-separated call a line.
        let bin = s.file("bin")
        try FileManager.default.createDirectory(atPath: bin, withIntermediateDirectories: true)
        let calls = s.file("notify-calls")
        try """
        #!/bin/sh
        for a in "$@"; do printf '%s\\0' "$a"; done >> '\(calls)'
        echo >> '\(calls)'

        """.write(toFile: bin + "/notify-send", atomically: true, encoding: .utf8)
        chmod(bin + "/notify-send", 0o755)
        let ui = try TestUI(
            s, env: ["PATH": bin + ":" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin")])
        try ui.login()
        let add = """
            {"name":"home","repo":"\(s.file("repo"))","paths":["\(src)"],"every":"1s","init":true,"password":"a ui test password"}
            """
        #expect(try ui.request("POST", "/api/repositories", json: add).status == 201)
        func recorded() -> [[String]] {
            let text = (try? String(contentsOfFile: calls, encoding: .utf8)) ?? ""
            return text.split(separator: "\n").map {
                $0.split(separator: "\0", omittingEmptySubsequences: false).dropLast().map(String.init)
            }
        }
        func waitFor(_ count: Int) {
            let deadline = Date().addingTimeInterval(20)
            while recorded().count < count && Date() < deadline { usleep(100_000) }
        }
        // The first check finds everything new: one notification, naming the repository and the counts.
        waitFor(1)
        let first = try #require(recorded().first)
        #expect(first.count == 3 && first[0] == "--app-name=cabackup" && first[1] == "cabackup: changes to back up")
        #expect(first.last?.hasPrefix("home (\(s.file("repo"))): 2 added, 0 removed, 0 modified") == true)
        // The same change set, checked again and again: no second notification.
        sleep(3)
        #expect(recorded().count == 1)
        // Synced, then a new change: a new notification.
        let sync = try ui.request("POST", "/api/repositories/home/sync")
        #expect(try ui.waitForJob(try #require(sync.object["job"] as? String))["state"] as? String == "done")
        try "second\n".write(toFile: src + "/b.txt", atomically: true, encoding: .utf8)
        waitFor(2)
        let calls2 = recorded()
        #expect(calls2.count == 2)
        #expect(calls2.last?.last?.contains("home (\(s.file("repo"))): 1 added") == true)
        #expect(ui.stop() == 0)
    }

    @Test("a folder downloads as zip: Python's zipfile reads the source's bytes back")
    func zipDownload() throws {
        let s = Scratch()
        let src = s.file("src")
        try writeRandom(src + "/docs/report.bin", megabytes: 2)
        try FileManager.default.createDirectory(atPath: src + "/docs/sub", withIntermediateDirectories: true)
        try "notes\n".write(toFile: src + "/docs/sub/notes.txt", atomically: true, encoding: .utf8)
        let ui = try TestUI(s)
        try ui.login()
        let add = """
            {"name":"home","repo":"\(s.file("repo"))","paths":["\(src)"],"init":true,"password":"a ui test password"}
            """
        #expect(try ui.request("POST", "/api/repositories", json: add).status == 201)
        let sync = try ui.request("POST", "/api/repositories/home/sync")
        #expect(try ui.waitForJob(try #require(sync.object["job"] as? String))["state"] as? String == "done")
        let zip = try ui.request(
            "GET", "/api/repositories/home/snapshots/latest/download?path=\(src)/docs&archive=zip",
            out: s.file("docs.zip"))
        #expect(zip.status == 200)
        #expect(zip.headers["content-type"] == "application/zip")
        #expect(zip.headers["content-disposition"] == "attachment; filename=\"docs.zip\"")
        let check = """
            import os, sys, zipfile
            z = zipfile.ZipFile(sys.argv[1]); root = sys.argv[2]
            names = sorted(n for n in z.namelist() if not n.endswith("/"))
            want = sorted(os.path.relpath(os.path.join(d, f), os.path.dirname(root)) for d, _, fs in os.walk(root) for f in fs)
            assert names == want, (names, want)
            for n in names:
                assert z.read(n) == open(os.path.join(os.path.dirname(root), n), "rb").read(), n
            print(len(names))
            """
        let r = try run("/usr/bin/env", ["python3", "-c", check, s.file("docs.zip"), src + "/docs"])
        #expect(r.status == 0 && r.stdout == "2\n", "\(r.stdout)\(r.stderr)")
        let bad = try ui.request("GET", "/api/repositories/home/snapshots/latest/download?path=\(src)&archive=rar")
        #expect(bad.status == 400)
    }

    @Test("register and log in to a server space from the page's API, then back up into it")
    func serverAccount() throws {
        let s = Scratch()
        let server = try TestServer(data: s.file("server"))
        try FileManager.default.createDirectory(atPath: s.file("src"), withIntermediateDirectories: true)
        try "to the server\n".write(toFile: s.file("src/a.txt"), atomically: true, encoding: .utf8)
        let ui = try TestUI(s)
        try ui.login()
        let password = "alice account password"
        // Registering needs an e-mail address; a bad server address is refused at once.
        let noEmail = #"{"server":"\#(server.url)","user":"alice","password":"\#(password)","register":true}"#
        #expect(try ui.request("POST", "/api/accounts", json: noEmail).status == 400)
        let badServer = #"{"server":"ftp://x","user":"alice","password":"\#(password)"}"#
        #expect(try ui.request("POST", "/api/accounts", json: badServer).status == 400)
        let register = """
            {"server":"\(server.url)","user":"alice","email":"alice@example.org","password":"\(password)","register":true}
            """
        let registered = try ui.request("POST", "/api/accounts", json: register)
        #expect(registered.status == 200, "\(registered.body)")
        #expect(registered.object["repo"] as? String == server.repo("alice"))
        // The token is in the CLI's credential store (the ui's config directory); the password nowhere.
        let credentials = try String(contentsOfFile: s.file("config/cabackup/credentials.json"), encoding: .utf8)
        #expect(credentials.contains("alice") && !credentials.contains(password))
        // A wrong password is refused; the right one logs in again.
        let wrong = try ui.request(
            "POST", "/api/accounts", json: #"{"server":"\#(server.url)","user":"alice","password":"not it at all"}"#)
        #expect(wrong.status == 403 && wrong.object["error"] is String)
        let again = try ui.request(
            "POST", "/api/accounts", json: #"{"server":"\#(server.url)","user":"alice","password":"\#(password)"}"#)
        #expect(again.status == 200 && again.object["registered"] as? Bool == false)
        // The space is then a repository like any other: created, synced.
        let add = """
            {"name":"space","repo":"\(server.repo("alice"))","paths":["\(s.file("src"))"],"init":true,"password":"space password"}
            """
        let added = try ui.request("POST", "/api/repositories", json: add)
        #expect(added.status == 201, "\(added.body)")
        let sync = try ui.request("POST", "/api/repositories/space/sync")
        #expect(try ui.waitForJob(try #require(sync.object["job"] as? String))["state"] as? String == "done")
        #expect(!(try String(contentsOfFile: s.file("ui.log"), encoding: .utf8)).contains(password))
    }

    @Test("a server space's devices with their rights, revoking one, and its storage used against the quota")
    func serverSpaceDevicesAndUsage() throws {
        let s = Scratch()
        let server = try TestServer(data: s.file("server"), ["--quota-bytes", "5000000"])
        try FileManager.default.createDirectory(atPath: s.file("src"), withIntermediateDirectories: true)
        try writeRandom(s.file("src/a.bin"), megabytes: 1)
        let ui = try TestUI(s)
        try ui.login()
        let password = "alice account password"
        let register = """
            {"server":"\(server.url)","user":"alice","email":"alice@example.org","password":"\(password)","register":true,"device":"laptop"}
            """
        #expect(try ui.request("POST", "/api/accounts", json: register).status == 200)
        // A second device of the account, logged in with the CLI, append-only.
        let phone = device(s, "phone", password: password)
        let login = try cabackup(
            "login", "--server", server.url, "--user", "alice", "--device", "phone", "--append-only", env: phone)
        #expect(login.status == 0, "\(login.stderr)")
        let add = """
            {"name":"space","repo":"\(server.repo("alice"))","paths":["\(s.file("src"))"],"init":true,"password":"space password"}
            """
        #expect(try ui.request("POST", "/api/repositories", json: add).status == 201)
        let empty = try ui.request("GET", "/api/repositories/space/usage")
        #expect(empty.status == 200, "\(empty.body)")
        let before = try #require(empty.object["used"] as? Int)
        #expect(empty.object["quota"] as? Int == 5_000_000)
        let sync = try ui.request("POST", "/api/repositories/space/sync")
        #expect(try ui.waitForJob(try #require(sync.object["job"] as? String))["state"] as? String == "done")
        // The 1 MiB of random data is in the space now (it does not compress).
        let after = try #require(try ui.request("GET", "/api/repositories/space/usage").object["used"] as? Int)
        #expect(after - before > 1_000_000 && after < 5_000_000, "\(before) then \(after)")

        let listed = try ui.request("GET", "/api/repositories/space/devices")
        #expect(listed.status == 200, "\(listed.body)")
        let devices = try #require(listed.json as? [[String: Any]])
        #expect(devices.count == 2)
        let laptop = try #require(devices.first { $0["device"] as? String == "laptop" })
        let other = try #require(devices.first { $0["device"] as? String == "phone" })
        #expect(laptop["current"] as? Bool == true && laptop["rights"] as? String == "full")
        #expect(other["current"] as? Bool == false && other["rights"] as? String == "append-only")
        #expect((other["lastUsed"] as? String ?? "").hasPrefix("20"))
        // Revoking needs the X-CABackup-UI header, as every change; a bad id is refused.
        let phoneID = try #require(other["id"] as? String)
        #expect(try ui.request("DELETE", "/api/repositories/space/devices/\(phoneID)", uiHeader: false).status == 403)
        #expect(try ui.request("DELETE", "/api/repositories/space/devices/no%20such").status == 400)
        #expect(try ui.request("DELETE", "/api/repositories/space/devices/\(phoneID)").status == 204)
        let left = try #require(try ui.request("GET", "/api/repositories/space/devices").json as? [[String: Any]])
        #expect(left.map { $0["device"] as? String } == ["laptop"])
        // The phone's token no longer works.
        let refused = try cabackup("snapshots", "--repo", server.repo("alice"), env: phone)
        #expect(refused.status != 0)
        // Logged in again (as after a lost token): revoking the older login, which the open
        // repository was using, leaves it working with the new one the store holds.
        let again = try ui.request(
            "POST", "/api/accounts",
            json: #"{"server":"\#(server.url)","user":"alice","password":"\#(password)","device":"laptop-2"}"#)
        #expect(again.status == 200, "\(again.body)")
        let three = try #require(try ui.request("GET", "/api/repositories/space/devices").json as? [[String: Any]])
        let old = try #require(three.first { $0["device"] as? String == "laptop" })
        #expect(old["current"] as? Bool == false)
        let oldID = try #require(old["id"] as? String)
        #expect(try ui.request("DELETE", "/api/repositories/space/devices/\(oldID)").status == 204)
        try "after the new login\n".write(toFile: s.file("src/b.txt"), atomically: true, encoding: .utf8)
        let resync = try ui.request("POST", "/api/repositories/space/sync")
        let resynced = try ui.waitForJob(try #require(resync.object["job"] as? String))
        #expect(resynced["state"] as? String == "done", "\(resynced)")

        // A repository that is not a server space has no devices or usage.
        try FileManager.default.createDirectory(atPath: s.file("local"), withIntermediateDirectories: true)
        let local = """
            {"name":"local","repo":"\(s.file("local/repo"))","paths":["\(s.file("src"))"],"init":true,"password":"local repository password"}
            """
        #expect(try ui.request("POST", "/api/repositories", json: local).status == 201)
        #expect(try ui.request("GET", "/api/repositories/local/devices").status == 400)
        #expect(try ui.request("GET", "/api/repositories/local/usage").status == 400)
        #expect(try ui.request("GET", "/api/repositories/nothing/usage").status == 404)
    }

    @Test("a sync whose server is down says it waits for the network, then completes when the server is back")
    func waitingForNetwork() throws {
        let s = Scratch()
        var server = try TestServer(data: s.file("server"))
        let port = server.port
        try FileManager.default.createDirectory(atPath: s.file("src"), withIntermediateDirectories: true)
        try "while the server was away\n".write(toFile: s.file("src/a.txt"), atomically: true, encoding: .utf8)
        let ui = try TestUI(s)
        try ui.login()
        let register = """
            {"server":"\(server.url)","user":"alice","email":"alice@example.org","password":"alice account password","register":true}
            """
        #expect(try ui.request("POST", "/api/accounts", json: register).status == 200)
        let add = """
            {"name":"space","repo":"\(server.repo("alice"))","paths":["\(s.file("src"))"],"init":true,"password":"space password"}
            """
        #expect(try ui.request("POST", "/api/repositories", json: add).status == 201)
        // The server goes away after the space answered (an outage, not a wrong address).
        #expect(server.stop() == 0)
        let sync = try ui.request("POST", "/api/repositories/space/sync")
        let job = try #require(sync.object["job"] as? String)
        var waiting: String?
        let deadline = Date().addingTimeInterval(30)
        while waiting == nil && Date() < deadline {
            let status = try ui.request("GET", "/api/jobs/\(job)").object
            #expect(status["state"] as? String == "running")
            waiting = status["waiting"] as? String
            usleep(100_000)
        }
        let message = try #require(waiting, "the job never said it was waiting")
        #expect(message.hasPrefix("waiting for the network: \(server.url) does not answer"), "\(message)")
        // Back on the same address: the sync goes on by itself and completes.
        server = try TestServer(data: s.file("server"), port: port)
        let done = try ui.waitForJob(job)
        #expect(done["state"] as? String == "done", "\(done)")
        #expect(done["waiting"] == nil)
        #expect(done["snapshot"] is String)
        _ = server
    }

    @Test("an S3 bucket set up from the page: the keys go to the CLI's 0600 store, init, sync, the CLI lists it")
    func s3Bucket() throws {
        let store = try SeaweedFS()
        let s = Scratch()
        try FileManager.default.createDirectory(atPath: s.file("src"), withIntermediateDirectories: true)
        try "into the bucket\n".write(toFile: s.file("src/a.txt"), atomically: true, encoding: .utf8)
        // No AWS_* in the ui's environment: the keys come from the page only.
        let noAWS = [
            "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "", "AWS_DEFAULT_REGION": "",
        ]
        let ui = try TestUI(s, env: noAWS)
        try ui.login()
        func body(endpoint: String, bucket: String, secret: String) -> String {
            """
            {"endpoint":"\(endpoint)","bucket":"\(bucket)","prefix":"laptop/","region":"us-east-1",
             "accessKeyId":"\(SeaweedFS.accessKey)","secretAccessKey":"\(secret)"}
            """
        }
        #expect(
            try ui.request("POST", "/api/s3", json: body(endpoint: "ftp://x", bucket: "ui-bucket", secret: "s")).status
                == 400)
        #expect(
            try ui.request("POST", "/api/s3", json: body(endpoint: store.endpoint, bucket: "No_Bucket", secret: "s"))
                .status == 400)
        #expect(
            try ui.request("POST", "/api/s3", json: body(endpoint: store.endpoint, bucket: "ui-bucket", secret: ""))
                .status == 400)
        let saved = try ui.request(
            "POST", "/api/s3", json: body(endpoint: store.endpoint, bucket: "ui-bucket", secret: SeaweedFS.secretKey))
        #expect(saved.status == 200, "\(saved.body)")
        let repo = try #require(saved.object["repo"] as? String)
        #expect(repo == "s3:\(store.endpoint)/ui-bucket/laptop")
        #expect(!saved.body.contains(SeaweedFS.secretKey))
        // The store the CLI reads: 0600, in the ui's config directory.
        let file = s.file("config/cabackup/s3-credentials.json")
        #expect(fileMode(file).map { $0 & 0o777 } == 0o600)
        #expect(try String(contentsOfFile: file, encoding: .utf8).contains(SeaweedFS.accessKey))

        let add = """
            {"name":"bucket","repo":"\(repo)","paths":["\(s.file("src"))"],"init":true,"password":"bucket password"}
            """
        let added = try ui.request("POST", "/api/repositories", json: add)
        #expect(added.status == 201, "\(added.body)")
        let sync = try ui.request("POST", "/api/repositories/bucket/sync")
        let job = try ui.waitForJob(try #require(sync.object["job"] as? String))
        #expect(job["state"] as? String == "done", "\(job)")
        let snapshots = try #require(
            try ui.request("GET", "/api/repositories/bucket/snapshots").json as? [[String: Any]])
        #expect(snapshots.count == 1 && snapshots.first?["id"] as? String == job["snapshot"] as? String)
        #expect(!(try String(contentsOfFile: s.file("ui.log"), encoding: .utf8)).contains(SeaweedFS.secretKey))

        // The CLI, without AWS_*, opens the bucket with the stored keys; without them it cannot.
        let cli = noAWS.merging(["XDG_CONFIG_HOME": s.file("config"), "CABACKUP_PASSWORD": "bucket password"]) { $1 }
        let listed = try cabackup("snapshots", "--repo", repo, "--json", env: cli)
        #expect(listed.status == 0 && listed.stdout.contains(s.file("src")), "\(listed.stderr)")
        let elsewhere = cli.merging(["XDG_CONFIG_HOME": s.file("empty-config")]) { $1 }
        let refused = try cabackup("snapshots", "--repo", repo, env: elsewhere)
        #expect(refused.status != 0 && refused.stderr.contains("AWS_ACCESS_KEY_ID"), "\(refused.stderr)")
    }
}
