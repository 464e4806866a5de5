import Foundation

/// The directory holding the built products (`cabackup`, `library-example`): the
/// test runner itself lives there.
let productsDirectory: String = {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    var dir = (exe as NSString).deletingLastPathComponent
    // macOS: …/cabackupPackageTests.xctest/Contents/MacOS/
    while dir.hasSuffix(".xctest") || dir.hasSuffix("/Contents") || dir.hasSuffix("/MacOS") {
        dir = (dir as NSString).deletingLastPathComponent
    }
    return dir
}()

/// The `cabackup` binary under test: `CABACKUP_TEST_BINARY` when set (CI runs the
/// end-to-end suite a second time against the release binary users run), else the
/// debug build beside the test runner.
let cabackupBinary: String = {
    if let path = ProcessInfo.processInfo.environment["CABACKUP_TEST_BINARY"], !path.isEmpty { return path }
    return productsDirectory + "/cabackup"
}()

/// Whether the binary under test has the fault-injection hooks (debug builds only, see
/// `Package.swift`); tests that need them run in the debug pass.
let binaryHasTestHooks: Bool = {
    guard let data = FileManager.default.contents(atPath: cabackupBinary) else { return false }
    return data.range(of: Data("CABACKUP_FAIL_AFTER_WRITES".utf8)) != nil
}()

let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().path

let treetool = packageRoot + "/Tests/CLITests/treetool.py"

struct RunResult {
    var status: Int32
    var stdout: String
    var stderr: String
    var lastLine: String { stdout.split(separator: "\n").last.map(String.init) ?? "" }
}

/// The password every test repository gets unless a test says otherwise.
let testPassword = "test password"

/// The environment of a child: the test's own, without CABACKUP_REPO, with the test
/// password and cheap scrypt parameters for new key slots, then `env` on top (an empty
/// value removes the variable).
func childEnvironment(_ env: [String: String]) -> [String: String] {
    var environment = ProcessInfo.processInfo.environment
    environment.removeValue(forKey: "CABACKUP_REPO")
    environment["CABACKUP_PASSWORD"] = testPassword
    environment["CABACKUP_TEST_INSECURE_KDF"] = "1"
    for (k, v) in env { environment[k] = v.isEmpty ? nil : v }
    return environment
}

/// Runs a program to completion, capturing its output.
@discardableResult
func run(_ executable: String, _ args: [String], env: [String: String] = [:], cwd: String? = nil) throws -> RunResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = args
    p.environment = childEnvironment(env)
    if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
    let out = Pipe()
    let err = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = FileHandle.nullDevice
    try p.run()
    // Read both pipes concurrently so neither can fill up and block the child.
    nonisolated(unsafe) var errData = Data()
    let errThread = Thread { errData = err.fileHandleForReading.readDataToEndOfFile() }
    errThread.start()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    while errThread.isExecuting || !errThread.isFinished { usleep(1000) }
    return RunResult(
        status: p.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
        stderr: String(decoding: errData, as: UTF8.self))
}

/// Runs the built `cabackup`.
@discardableResult
func cabackup(_ args: String..., env: [String: String] = [:], cwd: String? = nil) throws -> RunResult {
    try run(cabackupBinary, args, env: env, cwd: cwd)
}

/// Starts the built `cabackup` in the background, output discarded.
func startCabackup(_ args: String...) throws -> Process {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: cabackupBinary)
    p.arguments = args
    p.environment = childEnvironment([:])
    p.standardOutput = FileHandle.nullDevice
    p.standardError = FileHandle.nullDevice
    try p.run()
    return p
}

func python(_ args: String...) throws -> RunResult {
    try run("/usr/bin/env", ["python3"] + args)
}

/// Makes the sparse file `path` (and its directory): 3 MiB of seeded random bytes at each
/// of `offsets`, holes elsewhere.
func makeSparseFile(_ path: String, randomAt offsets: [Int]) throws -> RunResult {
    let script = """
        import os, random, sys
        r = random.Random(5)
        os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
        with open(sys.argv[1], "wb") as f:
            for off in map(int, sys.argv[2:]):
                f.seek(off)
                f.write(r.randbytes(3 << 20))
        """
    return try run("/usr/bin/env", ["python3", "-c", script, path] + offsets.map(String.init))
}

/// A fresh temporary directory, removed when the test ends.
final class Scratch {
    let path: String

    init() {
        var template = Array((NSTemporaryDirectory() + "/cabackup-cli-XXXXXX").utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = String(cString: realpath(p!, nil)!)
    }

    deinit {
        // chmod only when a test left something unremovable: a child waited for on the
        // cooperative pool of an async test can starve what reports its exit.
        if (try? FileManager.default.removeItem(atPath: path)) == nil {
            _ = try? run("/bin/chmod", ["-R", "u+rwx", path])
            try? FileManager.default.removeItem(atPath: path)
        }
    }

    func file(_ name: String) -> String { path + "/" + name }
}

func jsonObject(_ line: String) -> [String: Any]? {
    (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
}
