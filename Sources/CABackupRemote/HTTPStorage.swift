import CABackup
import Foundation
import NIOCore
import NIOHTTP1
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A repository in a private data space on a `cabackup server`, reached over HTTP(S).
/// The API is in `docs/http-api.md`: one path per kind of file under `/v1/space/`, range
/// reads for packs, deletes as their own calls, and a lease-based server-side lock.
public final class HTTPStorage: Storage, SpaceServices, @unchecked Sendable {
    // Safe: all stored properties are immutable and Sendable (`fetchedConfig` is a Mutex).
    let remote: RemoteLocation
    let client: RemoteClient
    /// The config fetched by the last ``stat(_:_:)`` of it, for the ``read(_:_:)`` that follows.
    private let fetchedConfig = Mutex<[UInt8]?>(nil)
    public var location: String { remote.description }
    /// The server checks every upload (names, sealed headers) and refuses a second config.
    public var capabilities: StorageCapabilities { [.writeOnceConfig, .verifiesUploads] }
    public var space: (any SpaceServices)? { self }

    /// - Parameters:
    ///   - remote: the server and account.
    ///   - token: the device token; default: the one `cabackup login` stored, taken from the
    ///     store again when the server refuses it (401) and a newer login stored another.
    ///   - caCertificate: a PEM file to trust besides the system roots (default `$CABACKUP_CACERT`).
    public init(_ remote: RemoteLocation, token: String? = nil, caCertificate: String? = nil) throws {
        let given = token
        guard let token = token ?? CredentialStore.token(server: remote.serverURL, user: remote.user) else {
            throw CABackupError.notLoggedIn(
                "not logged in to \(remote.serverURL) as '\(remote.user)': run 'cabackup login --server \(remote.serverURL) --user \(remote.user)'"
            )
        }
        self.remote = remote
        self.client = try RemoteClient(
            server: remote.serverURL, user: remote.user, token: token, caCertificate: caCertificate,
            followsStore: given == nil)
    }

    static func path(_ kind: FileKind, _ name: String? = nil) -> String {
        let base: String
        switch kind {
        case .config: return "/v1/space/config"
        case .pack: base = "/v1/space/packs"
        case .snapshot: base = "/v1/space/snapshots"
        case .key: base = "/v1/space/keys"
        case .lock: base = "/v1/space/lock-objects"  // not served: a space has leases
        }
        return name.map { base + "/" + $0 } ?? base
    }

    public func stat(_ kind: FileKind, _ name: String) throws -> Int64? {
        if kind == .config {
            // GET, not HEAD: an error answer then carries its message.
            let reply = try client.call(
                .GET, Self.path(.config), accept: [200, 404], limit: FileKind.config.maxWholeFileSize)
            guard reply.status == 200 else { return nil }
            // Opening a repository asks whether a config exists, then reads it: one request.
            fetchedConfig.withLock { $0 = reply.body }
            return Int64(reply.body.count)
        }
        if kind == .lock { return nil }
        let reply = try client.call(.HEAD, Self.path(kind, name), accept: [200, 404])
        if reply.status == 404 { return nil }
        guard let s = reply.headers.first(name: "X-Cabackup-Size"), let n = Int64(s), n >= 0 else {
            throw CABackupError.remote(status: reply.status, message: "the server sent no size for \(kind) \(name)")
        }
        return n
    }

    /// The space is made by `register`; creating a repository in it only needs it empty.
    public func create() throws {
        if try exists() { throw CABackupError.repositoryExists(location) }
    }

    public func list(_ kind: FileKind) throws -> [String] {
        if kind == .config { return try exists() ? ["config"] : [] }
        if kind == .lock { return [] }
        // 64 hex digits, quotes and a comma a name: a listing of 2²² packs (64 TiB) fits.
        let reply = try client.call(.GET, Self.path(kind), limit: 300 << 20)
        guard let names = try? JSONDecoder().decode([String].self, from: Data(reply.body)) else {
            throw CABackupError.remote(status: reply.status, message: "the server's listing is malformed")
        }
        // Only names that can be object names reach paths, SQL or messages: 64 lowercase hex.
        return names.filter(isObjectName)
    }

    public func read(_ kind: FileKind, _ name: String) throws -> [UInt8] {
        if kind == .config, let bytes = fetchedConfig.withLock({ $0.take() }) { return bytes }
        return try client.call(.GET, Self.path(kind, kind == .config ? nil : name), limit: kind.maxWholeFileSize).body
    }

    public func read(
        _ kind: FileKind, _ name: String, offset: Int64, length: Int, into buffer: UnsafeMutableRawPointer
    ) throws {
        guard length > 0 else { return }
        let reply = try client.call(
            .GET, Self.path(kind, name), headers: [("Range", "bytes=\(offset)-\(offset + Int64(length) - 1)")],
            accept: [206], limit: max(length, 64 << 10))
        let received = reply.buffer.readableBytes
        guard received == length else {
            throw CABackupError.corrupt(
                what: "\(kind) \(name) on \(location)", reason: "the server sent \(received) of \(length) bytes")
        }
        reply.buffer.withUnsafeReadableBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: length) }
    }

    /// A snapshot record goes up as a commit naming no references (the server checks
    /// nothing more for it); everything else as it is.
    public func put(_ kind: FileKind, _ name: String, bytes: UnsafeRawBufferPointer) throws {
        if kind == .snapshot { return try commitSnapshot(name, bytes, references: []) }
        _ = try client.call(
            .PUT, Self.path(kind, kind == .config ? nil : name),
            headers: [("Content-Type", "application/octet-stream")], body: Array(bytes), accept: [200, 201])
    }

    /// Uploads a snapshot record with the ids of the blobs it references; the server
    /// stores it only when it holds every one of them.
    public func commitSnapshot(_ name: String, _ bytes: UnsafeRawBufferPointer, references: [BlobID]) throws {
        var body = ByteWriter(capacity: 4 + bytes.count + 32 * references.count)
        body.u32(UInt32(bytes.count))
        body.append(Array(bytes))
        for id in references { body.id(id) }
        _ = try client.call(
            .PUT, Self.path(.snapshot, name), headers: [("Content-Type", "application/x-cabackup-snapshot")],
            body: body.bytes, accept: [200, 201])
    }

    /// Uploads a finished file (one pack is the most a request buffers) and removes it.
    public func put(_ kind: FileKind, _ name: String, file temporaryPath: String) throws {
        defer { unlink(temporaryPath) }
        let rfd = open(temporaryPath, O_RDONLY | O_CLOEXEC)
        if rfd < 0 { throw ioError("open", temporaryPath) }
        defer { close(rfd) }
        guard let size64 = try fileSize(temporaryPath) else { throw ioError("stat", temporaryPath, ENOENT) }
        let size = Int(size64)
        guard size <= FileKind.pack.maxWholeFileSize else {
            throw CABackupError.invalidArgument("\(temporaryPath) is \(size) bytes, more than a pack may be")
        }
        // Read straight into the buffer the HTTP client sends from: one copy of the pack.
        var buffer = ByteBufferAllocator().buffer(capacity: size)
        try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { (raw) throws in
            try preadFully(rfd, into: raw.baseAddress!, count: size, offset: 0, path: temporaryPath)
            return size
        }
        _ = try client.call(
            .PUT, Self.path(kind, name), headers: [("Content-Type", "application/octet-stream")], buffer: buffer,
            accept: [200, 201])
    }

    /// Which of `ids` the space holds no pack for.
    public func missing(_ ids: [BlobID]) throws -> [BlobID] {
        let body = try JSONSerialization.data(withJSONObject: ["ids": ids.map(\.hex)])
        let reply = try client.call(
            .POST, "/v1/space/blobs/missing", headers: [("Content-Type", "application/json")], body: Array(body),
            limit: 64 << 10 + 70 * ids.count, idempotent: true)
        struct Missing: Decodable { let missing: [String] }
        guard let m = try? JSONDecoder().decode(Missing.self, from: Data(reply.body)) else {
            throw CABackupError.remote(status: reply.status, message: "the server's answer is malformed")
        }
        return m.missing.compactMap { ObjectID(hex: $0) }
    }

    /// A lease on the server, renewed every 20 s by a thread until released; a client
    /// that dies stops renewing and the lease lapses after 60 s. The request carries an
    /// idempotency key, so it is retried like a read: a retry whose first answer was lost
    /// gets the same lease back instead of a second one.
    public func nativeLock(exclusive: Bool) throws -> RepositoryLock? {
        let body = Array(#"{"exclusive":\#(exclusive)}"#.utf8)
        let key = hexString(secureRandomBytes(16))
        let reply = try client.call(
            .POST, "/v1/space/locks", headers: [("Content-Type", "application/json"), ("Idempotency-Key", key)],
            body: body, accept: [201, 409], idempotent: true)
        struct Lease: Decodable { let id: String }
        if reply.status == 409 {
            throw CABackupError.locked(
                exclusive ? "a snapshot or a prune is running on \(location)" : "a prune is running on \(location)")
        }
        guard let lease = try? JSONDecoder().decode(Lease.self, from: Data(reply.body)) else {
            throw CABackupError.remote(status: reply.status, message: "the server's lock answer is malformed")
        }
        let stop = Atomic<Bool>(false)
        let client = client
        let path = "/v1/space/locks/" + lease.id
        let renewer = startThread {
            var waited = 0
            while !stop.load(ordering: .relaxed) {
                usleep(100_000)
                waited += 1
                if waited % 200 == 0 { _ = try? client.call(.PUT, path, accept: [204]) }
            }
        }
        return RepositoryLock {
            stop.store(true, ordering: .relaxed)
            joinThread(renewer)
            _ = try? client.call(.DELETE, path, accept: [204, 404])
        }
    }

    public func checkCanDelete() throws {
        // A server without this call predates append-only tokens: its tokens are all full.
        guard try RemoteAccount.Account.fetch(client)?.rights ?? "full" == "full" else {
            throw CABackupError.remote(
                status: 403,
                message:
                    "this device's token for \(location) is append-only: it may add snapshots but not forget, prune or remove keys; do that from a device logged in without --append-only (nothing was changed)"
            )
        }
    }

    public func remove(_ kind: FileKind, _ name: String) throws {
        _ = try client.call(.DELETE, Self.path(kind, name), accept: [204, 404])
    }
}
