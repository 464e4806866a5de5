import CABackup
import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A repository in an S3 bucket: `s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]`, restic's form
/// (`s3:HOST/BUCKET[/PREFIX]` means https).
public struct S3Location: Sendable, Equatable, CustomStringConvertible {
    /// `http(s)://HOST[:PORT]`, without the bucket.
    public var endpoint: String
    public var bucket: String
    /// The key prefix the repository lives under (`""`, or `a/b` without slashes around).
    public var prefix: String

    public var description: String { "s3:\(endpoint)/\(bucket)\(prefix.isEmpty ? "" : "/" + prefix)" }

    /// Parses an `s3:` location.
    /// - Throws: `CABackupError.invalidArgument` naming what is wrong.
    public init(parsing s: String) throws {
        guard s.hasPrefix("s3:") else {
            throw CABackupError.invalidArgument("'\(s)' is not an S3 location: use s3:http(s)://HOST[:PORT]/BUCKET")
        }
        var rest = String(s.dropFirst(3))
        var scheme = "https"
        for candidate in ["http", "https"] where rest.hasPrefix(candidate + "://") {
            scheme = candidate
            rest.removeFirst(candidate.count + 3)
        }
        let parts = rest.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        guard parts.count >= 2, !parts[0].isEmpty else {
            throw CABackupError.invalidArgument(
                "'\(s)' names no bucket: use s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]")
        }
        guard Self.isValidBucket(parts[1]) else {
            throw CABackupError.invalidArgument(
                "'\(parts[1])' is not a bucket name: 3-63 characters a-z 0-9 . - (in \(s))")
        }
        endpoint = "\(scheme)://\(parts[0])"
        bucket = parts[1]
        prefix = parts.dropFirst(2).joined(separator: "/")
        guard URL(string: endpoint)?.host != nil else {
            throw CABackupError.invalidArgument("'\(parts[0])' is not a host[:port] (in \(s))")
        }
    }

    /// S3's bucket naming rules (lowercase letters, digits, dots and hyphens, 3 to 63,
    /// starting and ending with a letter or digit).
    static func isValidBucket(_ b: String) -> Bool {
        let u = Array(b.utf8)
        func alnum(_ c: UInt8) -> Bool { (c >= 0x61 && c <= 0x7A) || (c >= 0x30 && c <= 0x39) }
        return (3...63).contains(u.count) && alnum(u.first!) && alnum(u.last!)
            && u.allSatisfy { alnum($0) || $0 == 0x2E || $0 == 0x2D }
    }
}

/// How the bucket is named in requests: restic's `s3.bucket-lookup` option.
public enum S3BucketLookup: String, Sendable, CaseIterable {
    /// Virtual-host style for AWS endpoints (`*.amazonaws.com`), path style for others
    /// (what self-hosted stores such as SeaweedFS and MinIO expect).
    case auto
    /// Virtual-host style: `BUCKET.HOST` (needs DNS for the bucket's name).
    case dns
    /// Path style: `HOST/BUCKET/KEY`.
    case path
}

/// A repository's files as objects in an S3 bucket, under the layout of a local
/// repository (`config`, `data/XY/<name>`, `snapshots/`, `keys/`, `locks/`).
///
/// Every object store is an untrusted place: it holds encrypted repositories only, and
/// its answers are checked like any other storage's. It has no lock of its own, so the
/// repository layer keeps lock objects in `locks/` (refreshed every 5 minutes, stale after
/// 30). It cannot refuse a second `config` atomically, so `init` checks first. Packs are
/// uploaded in one PUT each, signed with their SHA-256 (their name), streamed from the
/// finished local file.
public final class S3Storage: Storage {
    public let location: String
    private let client: S3Client
    /// The keys' common start: `""` or `PREFIX/`.
    private let keyPrefix: String

    /// Opens `location` with the credentials in the environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION`, default
    /// `us-east-1`), else with the bucket's keys in ``S3CredentialStore`` (and the region
    /// stored with them).
    /// - Throws: `CABackupError.invalidArgument` when the credentials are not set.
    public init(
        _ location: S3Location, lookup: S3BucketLookup = .auto,
        environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws {
        func nonEmpty(_ name: String) -> String? { environment[name].flatMap { $0.isEmpty ? nil : $0 } }
        let access: String
        let secret: String
        var region = nonEmpty("AWS_DEFAULT_REGION") ?? "us-east-1"
        var token = nonEmpty("AWS_SESSION_TOKEN")
        if let a = nonEmpty("AWS_ACCESS_KEY_ID"), let s = nonEmpty("AWS_SECRET_ACCESS_KEY") {
            (access, secret) = (a, s)
        } else if let c = S3CredentialStore.credentials(for: location) {
            (access, secret, token) = (c.accessKeyId, c.secretAccessKey, nil)
            if let r = c.region, !r.isEmpty { region = r }
        } else {
            throw CABackupError.invalidArgument(
                "\(location): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to the bucket's credentials (or store them with 'cabackup ui')"
            )
        }
        let signer = SigV4Signer(accessKey: access, secretKey: secret, sessionToken: token, region: region)
        let host = URL(string: location.endpoint)?.host?.lowercased() ?? ""
        let addressing: S3Client.Addressing
        switch lookup {
        case .dns: addressing = .virtualHost
        case .path: addressing = .path
        case .auto:
            addressing = host.hasSuffix(".amazonaws.com") && !location.bucket.contains(".") ? .virtualHost : .path
        }
        self.location = location.description
        self.keyPrefix = location.prefix.isEmpty ? "" : location.prefix + "/"
        self.client = try S3Client(
            endpoint: location.endpoint, bucket: location.bucket, signer: signer, addressing: addressing,
            caCertificate: environment["CABACKUP_CACERT"])
    }

    private func key(_ kind: FileKind, _ name: String) -> String {
        keyPrefix + kind.relativePath(name)
    }

    /// The prefix every key of `kind` starts with.
    private func directory(_ kind: FileKind) -> String {
        kind == .pack ? keyPrefix + "data/" : keyPrefix + kind.relativePath("")
    }

    /// Runs an S3 call, turning its failures into the engine's errors.
    private func call<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let e as S3Error {
            throw map(e)
        }
    }

    private func map(_ e: S3Error) -> CABackupError {
        switch e {
        case .transport: return .network("\(location): \(e.description)")
        case .service(_, _, let code, _) where code == "NoSuchBucket": return .repositoryNotFound(location)
        case .service(_, let status, let code, _)
        where status == 403 || ["SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"].contains(code):
            return .notLoggedIn("\(location): \(e.description)")
        case .service(_, let status, _, _): return .remote(status: status, message: "\(location): \(e.description)")
        case .answerTooLarge, .malformedAnswer:
            return .corrupt(what: "the answer of \(location)", reason: e.description)
        }
    }

    public func checkCanCreate() throws {
        do {
            let page = try client.listPage(prefix: keyPrefix, maxKeys: 1)
            if !page.objects.isEmpty { throw CABackupError.repositoryExists(location) }
        } catch let e as S3Error where e.code == "NoSuchBucket" {
            return  // create() makes it
        } catch let e as S3Error {
            throw map(e)
        }
    }

    /// Creates the bucket when it is missing (and the credentials may), then checks that
    /// nothing is stored under the prefix yet.
    public func create() throws {
        do {
            try client.createBucket()
        } catch let e as S3Error where e.code == "AccessDenied" || e.code == "BucketAlreadyExists" {
            // Not ours to create: it may exist already and be writable; the listing tells.
        } catch let e as S3Error {
            throw map(e)
        }
        try checkCanCreate()
    }

    public func list(_ kind: FileKind) throws -> [String] {
        if kind == .config { return try stat(.config, "config") == nil ? [] : ["config"] }
        let dir = directory(kind)
        return try call { try client.list(prefix: dir) }.compactMap { object in
            guard let slash = object.key.lastIndex(of: "/") else { return nil }
            let name = String(object.key[object.key.index(after: slash)...])
            // A pack must sit in the directory its name says; anything else is not ours.
            guard isObjectName(name), key(kind, name) == object.key else { return nil }
            return name
        }
    }

    public func stat(_ kind: FileKind, _ name: String) throws -> Int64? {
        try call { try client.head(key(kind, name)) }.map { Int64($0.size) }
    }

    public func read(_ kind: FileKind, _ name: String) throws -> [UInt8] {
        do {
            return try client.get(key(kind, name), limit: kind.maxWholeFileSize)
        } catch let e as S3Error where e.isNotFound {
            throw CABackupError.io(operation: "read", path: "\(location): \(kind) \(name)", errno: ENOENT)
        } catch let e as S3Error {
            throw map(e)
        }
    }

    public func read(
        _ kind: FileKind, _ name: String, offset: Int64, length: Int, into buffer: UnsafeMutableRawPointer
    ) throws {
        guard length > 0 else { return }
        let start = Int(offset)
        let bytes: [UInt8]
        do {
            bytes = try client.get(key(kind, name), range: start..<(start + length))
        } catch let e as S3Error where e.isNotFound {
            throw CABackupError.io(operation: "read", path: "\(location): \(kind) \(name)", errno: ENOENT)
        } catch let e as S3Error {
            throw map(e)
        }
        bytes.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: length) }
    }

    public func put(_ kind: FileKind, _ name: String, bytes: UnsafeRawBufferPointer) throws {
        if kind == .config, try stat(.config, name) != nil { throw CABackupError.repositoryExists(location) }
        let body = Array(bytes)
        try call { try client.put(key(kind, name), bytes: body) }
    }

    public func put(_ kind: FileKind, _ name: String, file path: String) throws {
        defer { unlink(path) }
        if kind == .config, try stat(.config, name) != nil { throw CABackupError.repositoryExists(location) }
        // A pack's name is its SHA-256: the store checks the body against it.
        let hash = kind == .pack ? name : try sha256(ofFile: path).hex
        try call { try client.put(key(kind, name), file: path, sha256: hash) }
    }

    public func remove(_ kind: FileKind, _ name: String) throws {
        try call { try client.delete(key(kind, name)) }
    }

    /// The SHA-256 of a file, read in 1 MiB pieces.
    private func sha256(ofFile path: String) throws -> ObjectID {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CABackupError.io(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        let hasher = SHA256Hasher()
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw CABackupError.io(operation: "read", path: path, errno: errno)
            }
            if n == 0 { break }
            buffer.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[..<n])) }
        }
        return hasher.finish()
    }
}
