import Foundation
import Testing

let uibrowser = packageRoot + "/Tests/CLITests/uibrowser.py"

/// Runs one flow of uibrowser.py against `ui`; records its steps as the test's output and
/// fails with its last lines when the flow fails.
@discardableResult
func browserFlow(_ flow: String, _ ui: TestUI, _ options: [String: String]) throws -> RunResult {
    var args = [uibrowser, flow, "--access", ui.accessFile]
    for (key, value) in options.sorted(by: { $0.key < $1.key }) { args += ["--" + key, value] }
    let started = Date()
    let r = try run("/usr/bin/env", ["python3"] + args)
    print("uibrowser.py \(flow) (\(String(format: "%.1f", Date().timeIntervalSince(started))) s):\n\(r.stdout)")
    #expect(r.status == 0, "the \(flow) flow failed:\n\(r.stdout)\(r.stderr.suffix(2000))")
    return r
}

/// A source tree for the flows: `docs/notes.txt` (changed by the mouse flow),
/// `docs/deep/data.bin` (downloaded) and `tree/` (every kind of entry, restored).
func browserSource(_ s: Scratch) throws -> String {
    let src = s.file("src")
    try FileManager.default.createDirectory(atPath: src + "/docs/deep", withIntermediateDirectories: true)
    try Data("notes of the browser test\n".utf8).write(to: URL(fileURLWithPath: src + "/docs/notes.txt"))
    var bytes = [UInt8](repeating: 0, count: 300_000)
    for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 2_654_435_761 >> 13) }
    try Data(bytes).write(to: URL(fileURLWithPath: src + "/docs/deep/data.bin"))
    #expect(try python(treetool, "make", src + "/tree").status == 0)
    return src
}

/// A repository made with `cabackup init` (the flows' password) at `repository` in the
/// scratch directory, and a device configuration naming it.
func configuredRepository(_ s: Scratch, name: String, paths: [String]) throws {
    let made = try cabackup(
        "init", "--repo", s.file("repository"), env: ["CABACKUP_PASSWORD": "correct horse battery staple"])
    #expect(made.status == 0)
    let entry: [String: Any] = ["name": name, "repo": s.file("repository"), "paths": paths]
    let config = try JSONSerialization.data(withJSONObject: ["version": 1, "repositories": [entry]])
    try config.write(to: URL(fileURLWithPath: s.file("device.json")))
}

/// The browser tests of issue 25: Debian's headless Chromium, driven with Selenium by
/// uibrowser.py, uses the real `cabackup ui` as a user does. Never skipped: scripts/test
/// installs chromium, chromium-driver and selenium (scripts/ensure-test-deps).
@Suite("cabackup ui in a real browser (headless Chromium)", .serialized)
struct UIBrowserTests {
    @Test("with the mouse: create a repository, sync, see a change, sync it, download, restore a file and a folder")
    func mouseFlow() throws {
        let s = Scratch()
        let src = try browserSource(s)
        let ui = try TestUI(s)
        try FileManager.default.createDirectory(atPath: s.file("downloads"), withIntermediateDirectories: true)
        try browserFlow(
            "mouse", ui,
            [
                "downloads": s.file("downloads"), "repo": s.file("repository"), "source": src,
                "change": src + "/docs/notes.txt", "file": src + "/docs/deep/data.bin", "folder": src + "/tree",
                "target": s.file("restored"),
            ])
        // The download is the file's bytes; the restore reproduces the folder (the
        // independent reader compares them).
        #expect(
            FileManager.default.contents(atPath: s.file("downloads/data.bin"))
                == FileManager.default.contents(atPath: src + "/docs/deep/data.bin"))
        #expect(
            FileManager.default.contents(atPath: s.file("restored/file") + src + "/docs/deep/data.bin")
                == FileManager.default.contents(atPath: src + "/docs/deep/data.bin"))
        let cmp = try python(treetool, "compare", src + "/tree", s.file("restored/folder") + src + "/tree")
        #expect(cmp.status == 0, "\(cmp.stdout)")
        // The repository was created through the page, its password never written.
        let config = try String(contentsOfFile: ui.config, encoding: .utf8)
        #expect(config.contains("\"home\"") && !config.contains("correct horse"))
        #expect(ui.stop() == 0)
    }

    @Test("keyboard only: unlock, sync, find the snapshot, download a file")
    func keyboardFlow() throws {
        let s = Scratch()
        let src = try browserSource(s)
        try configuredRepository(s, name: "home", paths: [src])
        let ui = try TestUI(s)
        try FileManager.default.createDirectory(atPath: s.file("downloads"), withIntermediateDirectories: true)
        try browserFlow(
            "keyboard", ui, ["downloads": s.file("downloads"), "file": src + "/docs/deep/data.bin"])
        #expect(
            FileManager.default.contents(atPath: s.file("downloads/data.bin"))
                == FileManager.default.contents(atPath: src + "/docs/deep/data.bin"))
        #expect(ui.stop() == 0)
    }

    @Test("at 375×667 no view scrolls horizontally")
    func narrowWindow() throws {
        let s = Scratch()
        let src = try browserSource(s)
        // A long name and location, and a deep folder with a long file name: what overflows first.
        let deep = src + "/docs/a-rather-long-folder-name-for-a-small-screen/another-long-folder-name"
        try FileManager.default.createDirectory(atPath: deep, withIntermediateDirectories: true)
        try Data("x".utf8).write(
            to: URL(fileURLWithPath: deep + "/a-very-long-file-name-that-does-not-fit-on-a-phone-screen-at-all.txt"))
        try configuredRepository(s, name: "a-long-repository-name-on-a-phone", paths: [src])
        let ui = try TestUI(s)
        try browserFlow("narrow", ui, ["folder": deep])
        #expect(ui.stop() == 0)
    }

    @Test("a server space: register with the page's form, add the space, sync, see usage and revoke a device")
    func serverSpace() throws {
        let s = Scratch()
        let src = try browserSource(s)
        let server = try TestServer(data: s.file("server"), ["--quota-bytes", "50000000"])
        let ui = try TestUI(s)
        try browserFlow("space", ui, ["server": server.url, "source": src, "quota": "47.7 MiB"])
        // The snapshot is in the space: the CLI, logged in with the ui's credentials, lists it.
        let listed = try cabackup(
            "snapshots", "--repo", server.repo("alice"), "--json",
            env: ["XDG_CONFIG_HOME": s.file("config"), "CABACKUP_PASSWORD": "correct horse battery staple"])
        #expect(listed.status == 0 && listed.stdout.contains(src), "\(listed.stderr)")
        #expect(ui.stop() == 0)
    }
}
