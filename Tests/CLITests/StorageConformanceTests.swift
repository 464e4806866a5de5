import CABackup
import CABackupRemote
import Foundation
import Testing

/// The files of a small encrypted repository, made once with the library: valid objects
/// of every kind, so a storage that checks what it stores (a server space) takes them.
final class StorageFixture: @unchecked Sendable {
    let scratch = Scratch()
    let config: [UInt8]
    let keys: [(name: String, bytes: [UInt8])]
    let packs: [(name: String, path: String)]
    let snapshots: [(name: String, bytes: [UInt8])]

    init() throws {
        let src = scratch.file("src")
        try writeRandom(src + "/big.bin", megabytes: 3)
        try Data("small".utf8).write(to: URL(fileURLWithPath: src + "/small.txt"))
        let root = scratch.file("repo")
        let repo = try Repository.initialize(
            path: root, password: "fixture password", kdf: .insecureFastForTesting, durable: false)
        _ = try repo.snapshot(paths: [src])
        let local = LocalStorage(path: root)
        config = try local.read(.config, "config")
        keys = try local.list(.key).map { ($0, try local.read(.key, $0)) }
        packs = try local.list(.pack).map { ($0, root + "/data/" + $0.prefix(2) + "/" + $0) }.sorted { $0.0 < $1.0 }
        snapshots = try local.list(.snapshot).map { ($0, try local.read(.snapshot, $0)) }
    }

    /// A copy of a pack to hand to `put(_:_:file:)`, which consumes it.
    func packCopy(_ i: Int) throws -> String {
        let copy = scratch.file("copy-\(UUID().uuidString)")
        try FileManager.default.copyItem(atPath: packs[i].path, toPath: copy)
        return copy
    }

    func packBytes(_ i: Int) throws -> [UInt8] {
        Array(try Data(contentsOf: URL(fileURLWithPath: packs[i].path)))
    }
}

/// Every storage the engine has, as the conformance suite gets it: empty, ready for a
/// new repository.
enum StorageUnderTest: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case local
    case server
    case s3

    var testDescription: String { rawValue }

    /// A fresh, empty storage of this kind, and what keeps it alive (a server).
    func make() throws -> Harness {
        let s = Scratch()
        switch self {
        case .local:
            return Harness(
                scratch: s, storage: LocalStorage(path: s.file("repo"), durable: true), server: nil, token: nil,
                store: nil)
        case .server:
            // This process remembers the config of every location it opens (in the real
            // ~/.config): a name of its own keeps a later server on a reused port from
            // looking like this one with its config changed.
            let user = "alice-" + hexString(secureRandomBytes(6))
            let server = try TestServer(data: s.file("server"))
            let env = device(s, "alice", password: "alice password")
            let reg = try cabackup(
                "register", "--server", server.url, "--user", user, "--email", "alice@example.org", env: env)
            #expect(reg.status == 0, "\(reg.stderr)")
            let token = try storedToken(env)
            let storage = try HTTPStorage(try RemoteLocation(parsing: server.repo(user)), token: token)
            return Harness(scratch: s, storage: storage, server: server, token: token, store: nil)
        case .s3:
            // A bucket that does not exist yet: create() makes it.
            let store = try SeaweedFS()
            try store.waitUntilReady()
            let storage = try S3Storage(
                S3Location(parsing: "s3:\(store.endpoint)/conformance/repo-\(hexString(secureRandomBytes(6)))"),
                lookup: .path,
                environment: store.environment)
            return Harness(scratch: s, storage: storage, server: nil, token: nil, store: store)
        }
    }

    struct Harness {
        let scratch: Scratch
        let storage: any Storage
        let server: TestServer?
        let token: String?
        let store: SeaweedFS?

        /// Starts a pack upload the way a writer killed half way through leaves it, and
        /// returns once the storage has seen it end.
        func cutOffPut(_ name: String, bytes: [UInt8]) throws {
            if let store {
                // A PUT that says the whole length, sends half and hangs up; signed, so
                // the store reads the body instead of refusing the request up front.
                let key = "repo/data/" + name.prefix(2) + "/" + name
                let host = "127.0.0.1:\(store.ports[6])"
                let signed = SigV4Signer(
                    accessKey: SeaweedFS.accessKey, secretKey: SeaweedFS.secretKey, region: "us-east-1"
                ).sign(
                    method: "PUT", host: host, path: "/conformance/" + key,
                    headers: [("Content-Length", String(bytes.count))], payloadHash: SigV4Signer.unsignedPayload,
                    date: Date())
                let headers = (signed + [("Content-Length", String(bytes.count))]).map { "\($0.0): \($0.1)" }
                let script = """
                    import socket, sys
                    host, port, path, headers = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
                    s = socket.create_connection((host, port))
                    head = f"PUT {path} HTTP/1.1\\r\\nHost: {host}:{port}\\r\\n" + "".join(h + "\\r\\n" for h in headers)
                    s.sendall((head + "\\r\\n").encode())
                    s.sendall(sys.stdin.buffer.read())
                    s.close()
                    """
                let half = scratch.file("half")
                try Data(bytes.prefix(bytes.count / 2)).write(to: URL(fileURLWithPath: half))
                let r = try run(
                    "/bin/sh",
                    [
                        "-c", "python3 -c \"$0\" \"$@\" < \"$HALF\"", script, "127.0.0.1", String(store.ports[6]),
                        "/conformance/" + key,
                    ] + headers, env: ["HALF": half])
                #expect(r.status == 0, "\(r.stderr)")
                // Give the store a moment to notice the connection is gone.
                usleep(500_000)
            } else if let server, let token {
                // A client that says the whole length, sends half and hangs up.
                let script = """
                    import socket, sys
                    host, port, name, token, total = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
                    s = socket.create_connection((host, port))
                    s.sendall((f"PUT /v1/space/packs/{name} HTTP/1.1\\r\\nHost: {host}\\r\\nAuthorization: Bearer {token}\\r\\n"
                               f"Content-Type: application/octet-stream\\r\\nContent-Length: {total}\\r\\n\\r\\n").encode())
                    s.sendall(sys.stdin.buffer.read())
                    s.shutdown(socket.SHUT_WR)
                    s.settimeout(10)
                    try:
                        while s.recv(65536): pass
                    except OSError:
                        pass
                    """
                let half = scratch.file("half")
                try Data(bytes.prefix(bytes.count / 2)).write(to: URL(fileURLWithPath: half))
                let r = try run(
                    "/bin/sh",
                    [
                        "-c", "python3 -c \"$0\" \"$@\" < \"$HALF\"", script, "127.0.0.1", String(server.port), name,
                        token, String(bytes.count),
                    ], env: ["HALF": half])
                #expect(r.status == 0, "\(r.stderr)")
            } else {
                // A local writer builds the file beside its final name and renames it in
                // once complete: killed half way, the partial file is all that is left.
                let dir = storage.workingDirectory! + "/data/" + name.prefix(2)
                try Data(bytes.prefix(bytes.count / 2)).write(
                    to: URL(fileURLWithPath: dir + "/" + name + ".tmp-999999-1"))
            }
        }
    }
}

/// The same tests for every storage (restic's backend tests): what the engine relies on
/// when it stores a repository anywhere.
@Suite("storage conformance: every storage stores, lists, reads and removes alike", .serialized)
struct StorageConformanceTests {
    static let fixture = Result { try StorageFixture() }

    /// The fixture, and a fresh storage of `kind` holding its config.
    static func withConfig(_ kind: StorageUnderTest) throws -> (StorageFixture, StorageUnderTest.Harness, any Storage) {
        let f = try fixture.get()
        let h = try kind.make()
        try h.storage.create()
        try f.config.withUnsafeBytes { try h.storage.put(.config, "config", bytes: $0) }
        return (f, h, h.storage)
    }

    @Test(
        "create, put every kind, list, stat and read back; the config is written once",
        arguments: StorageUnderTest.allCases)
    func roundTrip(_ kind: StorageUnderTest) throws {
        let f = try Self.fixture.get()
        let h = try kind.make()
        defer { withExtendedLifetime(h) {} }
        let st = h.storage
        try st.checkCanCreate()
        try st.create()
        #expect(try !st.exists())
        for k in [FileKind.pack, .snapshot, .key] { #expect(try st.list(k).isEmpty, "\(k)") }

        try f.config.withUnsafeBytes { try st.put(.config, "config", bytes: $0) }
        #expect(try st.exists())
        #expect(try st.read(.config, "config") == f.config)
        #expect(throws: CABackupError.self) { try st.checkCanCreate() }
        // A second config is refused, and the first stays.
        var other = f.config
        other[other.count / 2] ^= 1
        #expect(throws: (any Error).self) { try other.withUnsafeBytes { try st.put(.config, "config", bytes: $0) } }
        #expect(try st.read(.config, "config") == f.config)

        for key in f.keys { try key.bytes.withUnsafeBytes { try st.put(.key, key.name, bytes: $0) } }
        for i in f.packs.indices { try st.put(.pack, f.packs[i].name, file: try f.packCopy(i)) }
        for snap in f.snapshots { try snap.bytes.withUnsafeBytes { try st.put(.snapshot, snap.name, bytes: $0) } }

        #expect(Set(try st.list(.key)) == Set(f.keys.map(\.name)))
        #expect(Set(try st.list(.pack)) == Set(f.packs.map(\.name)))
        #expect(Set(try st.list(.snapshot)) == Set(f.snapshots.map(\.name)))
        for key in f.keys { #expect(try st.read(.key, key.name) == key.bytes) }
        for snap in f.snapshots {
            #expect(try st.read(.snapshot, snap.name) == snap.bytes)
            #expect(try st.stat(.snapshot, snap.name) == Int64(snap.bytes.count))
        }
        for i in f.packs.indices {
            let bytes = try f.packBytes(i)
            #expect(try st.stat(.pack, f.packs[i].name) == Int64(bytes.count))
        }
        // The files handed to put(file:) are consumed.
        let copies = try FileManager.default.contentsOfDirectory(atPath: f.scratch.path).filter {
            $0.hasPrefix("copy-")
        }
        #expect(copies.isEmpty, "\(copies)")

        // What was stored opens as the repository it came from.
        let repo = try Repository.open(storage: st, passwordProvider: { "fixture password" }, durable: false)
        #expect(try repo.snapshots().count == f.snapshots.count)
        #expect(try repo.check(options: CheckOptions(readDataFraction: 1)).isClean)
    }

    @Test(
        "ranged reads: first byte, last byte, the whole file; past the end is an error",
        arguments: StorageUnderTest.allCases)
    func rangedReads(_ kind: StorageUnderTest) throws {
        let (f, h, st) = try Self.withConfig(kind)
        defer { withExtendedLifetime((f, h)) {} }
        let i = f.packs.indices.max { try! f.packBytes($0).count < f.packBytes($1).count }!
        let name = f.packs[i].name
        let bytes = try f.packBytes(i)
        try st.put(.pack, name, file: try f.packCopy(i))
        func read(_ offset: Int, _ length: Int) throws -> [UInt8] {
            var out = [UInt8](repeating: 0, count: length)
            try out.withUnsafeMutableBytes {
                try st.read(.pack, name, offset: Int64(offset), length: length, into: $0.baseAddress!)
            }
            return out
        }
        let n = bytes.count
        #expect(try read(0, 1) == [bytes[0]])
        #expect(try read(n - 1, 1) == [bytes[n - 1]])
        #expect(try read(0, n) == bytes)
        #expect(try read(n / 3, 4097) == Array(bytes[(n / 3)..<(n / 3 + 4097)]))
        #expect(throws: (any Error).self) { _ = try read(n - 10, 11) }
        #expect(throws: (any Error).self) { _ = try read(n, 1) }
    }

    @Test("missing files: stat says none, reads fail, removing one is harmless", arguments: StorageUnderTest.allCases)
    func missingFiles(_ kind: StorageUnderTest) throws {
        let (f, h, st) = try Self.withConfig(kind)
        defer { withExtendedLifetime((f, h)) {} }
        let absent = String(repeating: "ab", count: 32)
        for k in [FileKind.pack, .snapshot, .key] {
            #expect(try st.stat(k, absent) == nil, "\(k)")
            #expect(throws: (any Error).self, "\(k)") { _ = try st.read(k, absent) }
            try st.remove(k, absent)
        }
        var buffer = [UInt8](repeating: 0, count: 16)
        #expect(throws: (any Error).self) {
            try buffer.withUnsafeMutableBytes {
                try st.read(.pack, absent, offset: 0, length: 16, into: $0.baseAddress!)
            }
        }
    }

    @Test("concurrent puts of one name store it once; delete removes it", arguments: StorageUnderTest.allCases)
    func concurrentPutsAndDelete(_ kind: StorageUnderTest) throws {
        let (f, h, st) = try Self.withConfig(kind)
        defer { withExtendedLifetime((f, h)) {} }
        let name = f.packs[0].name
        let copies = try (0..<3).map { _ in try f.packCopy(0) }
        let failures = Locked<[String]>([])
        DispatchQueue.concurrentPerform(iterations: copies.count) { i in
            do { try st.put(.pack, name, file: copies[i]) } catch { failures.withLock { $0.append("\(error)") } }
        }
        #expect(failures.withLock { $0 }.isEmpty)
        #expect(try st.list(.pack) == [name])
        let bytes = try f.packBytes(0)
        var back = [UInt8](repeating: 0, count: bytes.count)
        try back.withUnsafeMutableBytes {
            try st.read(.pack, name, offset: 0, length: bytes.count, into: $0.baseAddress!)
        }
        #expect(back == bytes)
        try st.remove(.pack, name)
        #expect(try st.stat(.pack, name) == nil)
        #expect(try st.list(.pack).isEmpty)
    }

    @Test(
        "a put cut off half way leaves nothing visible, and the name can be stored after",
        arguments: StorageUnderTest.allCases)
    func cutOffPut(_ kind: StorageUnderTest) throws {
        let (f, h, st) = try Self.withConfig(kind)
        defer { withExtendedLifetime((f, h)) {} }
        let name = f.packs[0].name
        try h.cutOffPut(name, bytes: try f.packBytes(0))
        #expect(try st.stat(.pack, name) == nil)
        #expect(try st.list(.pack).isEmpty)
        try st.put(.pack, name, file: try f.packCopy(0))
        #expect(try st.stat(.pack, name) == Int64(try f.packBytes(0).count))
    }

    @Test(
        "the repository lock: shared beside shared, never exclusive beside either; released on close",
        arguments: StorageUnderTest.allCases)
    func locking(_ kind: StorageUnderTest) throws {
        let (f, h, st) = try Self.withConfig(kind)
        defer { withExtendedLifetime((f, h)) {} }
        for key in f.keys { try key.bytes.withUnsafeBytes { try st.put(.key, key.name, bytes: $0) } }
        let repo = try Repository.open(storage: st, passwordProvider: { "fixture password" }, durable: false)
        var shared: RepositoryLock? = try repo.lock(exclusive: false)
        var second: RepositoryLock? = try repo.lock(exclusive: false)
        #expect(throws: CABackupError.self) { _ = try repo.lock(exclusive: true) }
        shared = nil
        #expect(throws: CABackupError.self) { _ = try repo.lock(exclusive: true) }
        second = nil
        var exclusive: RepositoryLock? = try repo.lock(exclusive: true)
        #expect(throws: CABackupError.self) { _ = try repo.lock(exclusive: false) }
        exclusive = nil
        _ = try repo.lock(exclusive: false)
        withExtendedLifetime((shared, second, exclusive)) {}
    }
}

/// Lock objects: the lock of a storage without one of its own (object storage).
@Suite("lock objects: refreshed while held, stale after their expiry, removed on release")
struct LockObjectTests {
    @Test("a held lock is renewed and keeps others out past its expiry; a dead holder's lapses")
    func expiry() throws {
        let s = Scratch()
        let st = LocalStorage(path: s.file("repo"), durable: false)
        try st.create()
        let ms: Int64 = 1_000_000
        let locks = LockObjects(storage: st, refreshInterval: 200 * ms, staleAfter: 2_000 * ms)
        var held: RepositoryLock? = try locks.acquire(exclusive: false)
        let first = try st.list(.lock)
        #expect(first.count == 1)
        _ = try locks.acquire(exclusive: false)  // shared beside shared, released at once
        #expect(try st.list(.lock) == first)
        // Past the expiry, the holder's renewals still keep an exclusive lock out.
        usleep(3_000_000)
        #expect(throws: CABackupError.self) { _ = try locks.acquire(exclusive: true) }
        let renewed = try st.list(.lock)
        #expect(renewed.count == 1 && renewed != first, "\(first) \(renewed)")
        held = nil
        #expect(try st.list(.lock).isEmpty)

        // A holder that died: its object is never renewed. Until it lapses it holds.
        let dead = #"{"exclusive":true,"tag":"dead","time":\#(Int64(Date().timeIntervalSince1970 * 1e9))}"#
        let name = sha256(Array(dead.utf8)).hex
        try Array(dead.utf8).withUnsafeBytes { try st.put(.lock, name, bytes: $0) }
        #expect(throws: CABackupError.self) { _ = try locks.acquire(exclusive: false) }
        usleep(2_500_000)
        var taken: RepositoryLock? = try locks.acquire(exclusive: true)
        #expect(try !st.list(.lock).contains(name), "the stale object is removed by an exclusive holder")
        taken = nil
        withExtendedLifetime((held, taken)) {}
        #expect(try st.list(.lock).isEmpty)
    }
}

/// A value behind a lock, for tests that collect from several threads.
final class Locked<Value>: @unchecked Sendable {
    private var value: Value
    private let lock = NSLock()
    init(_ value: Value) { self.value = value }
    func withLock<R>(_ body: (inout Value) -> R) -> R {
        lock.lock()
        defer { lock.unlock() }
        return body(&value)
    }
}
