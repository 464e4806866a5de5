import CABackupCore
import CABackupFormat
#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A repository in a local directory: the embedded default.
///
/// Layout: `config`, `data/XY/<pack id>` (XY = the first two hex digits),
/// `snapshots/<snapshot id>`, `keys/<key slot id>`, `index/` (the derived SQLite index), `tmp/`
/// (packs being built), `lock` (the `flock` file). Lock objects (`locks/`) are never needed
/// here, since `flock` is the lock, but are stored like any other kind if asked.
public final class LocalStorage: Storage, @unchecked Sendable {
    // Safe: `openFiles` and `lru` are only touched with `lock` held; the rest is immutable.
    public let root: String
    public var location: String { root }
    private let durable: Bool
    private let lock = Condition()
    private var openFiles: [String: OpenFile] = [:]
    private var lru: [String] = []
    private static let maxOpenFiles = 64

    /// - Parameters:
    ///   - path: the repository directory.
    ///   - durable: fsync every file and directory on write (turn off only for tests).
    public init(path: String, durable: Bool = true) {
        var p = path
        while p.count > 1 && p.hasSuffix("/") { p.removeLast() }
        root = p
        self.durable = durable
    }

    /// An open descriptor, closed when the last reader lets go of it (so evicting it
    /// from the cache never closes it under a concurrent `pread`).
    private final class OpenFile: Sendable {
        let fd: Int32
        init(_ fd: Int32) { self.fd = fd }
        deinit { close(fd) }
    }

    package func path(_ kind: FileKind, _ name: String) -> String {
        root + "/" + kind.relativePath(name)
    }

    public var capabilities: StorageCapabilities { [.localAndTrusted] }

    public var workingDirectory: String? { root }

    public func missingRepositoryError() -> CABackupError {
        if fileExists(root) && !isDirectory(root) { return .badConfig(path: root, reason: "not a directory") }
        if isDirectory(root), (try? readDirectory(Array(root.utf8)))?.isEmpty == false { return .notARepository(root) }
        return .repositoryNotFound(root)
    }

    /// Throws unless the root is missing or an empty directory.
    public func checkCanCreate() throws {
        if fileExists(root) {
            guard isDirectory(root) else { throw CABackupError.repositoryExists(root) }
            let names = try readDirectory(Array(root.utf8))
            guard names.isEmpty else { throw CABackupError.repositoryExists(root) }
        }
    }

    public func create() throws {
        try checkCanCreate()
        try makeDirectories(root)
        for sub in ["data", "snapshots", "keys", "index", "tmp"] {
            try makeDirectories(root + "/" + sub)
        }
        for i in 0..<256 {
            try makeDirectories(root + "/data/" + hexString([UInt8(i)]))
        }
        if durable { try fsyncDirectory(root) }
    }

    public func list(_ kind: FileKind) throws -> [String] {
        switch kind {
        case .config:
            return fileExists(root + "/config") ? ["config"] : []
        case .snapshot:
            return try readDirectory(Array((root + "/snapshots").utf8)).compactMap(Self.idName)
        case .key, .lock:
            // Repositories made before encryption existed have no keys/ directory; locks/
            // is made by the first lock object.
            let dir = root + (kind == .key ? "/keys" : "/locks")
            guard isDirectory(dir) else { return [] }
            return try readDirectory(Array(dir.utf8)).compactMap(Self.idName)
        case .pack:
            var out: [String] = []
            for sub in try readDirectory(Array((root + "/data").utf8)) {
                let dir = root + "/data/" + String(decoding: sub, as: UTF8.self)
                guard isDirectory(dir) else { continue }
                out += try readDirectory(Array(dir.utf8)).compactMap(Self.idName)
            }
            return out
        }
    }

    /// Names that are 64 hex digits; anything else (temp files, stray files) is ignored.
    private static func idName(_ bytes: [UInt8]) -> String? {
        let s = String(decoding: bytes, as: UTF8.self)
        return ObjectID(hex: s) != nil ? s : nil
    }

    public func read(_ kind: FileKind, _ name: String) throws -> [UInt8] {
        try readSmallFile(path(kind, name), limit: kind.maxWholeFileSize)
    }

    public func stat(_ kind: FileKind, _ name: String) throws -> Int64? {
        try fileSize(path(kind, name))
    }

    public func read(
        _ kind: FileKind, _ name: String, offset: Int64, length: Int, into buffer: UnsafeMutableRawPointer
    ) throws {
        let p = path(kind, name)
        let file = try openCached(p)
        try preadFully(file.fd, into: buffer, count: length, offset: offset, path: p)
    }

    private func openCached(_ p: String) throws -> OpenFile {
        lock.lock()
        defer { lock.unlock() }
        if let f = openFiles[p] { return f }
        let fd = open(p, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw ioError("open", p) }
        if lru.count >= Self.maxOpenFiles {
            openFiles.removeValue(forKey: lru.removeFirst())
        }
        let f = OpenFile(fd)
        openFiles[p] = f
        lru.append(p)
        return f
    }

    public func put(_ kind: FileKind, _ name: String, bytes: UnsafeRawBufferPointer) throws {
        let p = path(kind, name)
        if kind == .config && fileExists(p) { throw CABackupError.repositoryExists(root) }
        if kind == .lock && !isDirectory(root + "/locks") { try makeDirectories(root + "/locks") }
        try writeFileAtomically(p, bytes, mode: 0o600, durable: durable)
    }

    /// `flock` on `<repo>/lock`: the kernel drops it when the process exits, however it exits.
    public func nativeLock(exclusive: Bool) throws -> RepositoryLock? {
        let p = root + "/lock"
        let fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        if fd < 0 { throw ioError("open", p) }
        if flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0 {
            let e = errno
            close(fd)
            if e == EWOULDBLOCK {
                throw CABackupError.locked(
                    exclusive
                        ? "a snapshot or another prune is running on \(root)"
                        : "a prune is running on \(root)")
            }
            throw ioError("lock", p, e)
        }
        return RepositoryLock { close(fd) }
    }

    /// Renames the file in (after an `fsync`); a file on another file system is copied.
    public func put(_ kind: FileKind, _ name: String, file: String) throws {
        defer { unlink(file) }
        let p = path(kind, name)
        if kind == .config { throw CABackupError.invalidArgument("a config is stored from bytes, not from a file") }
        if durable {
            let fd = open(file, O_RDONLY | O_CLOEXEC)
            if fd < 0 { throw ioError("open", file) }
            defer { close(fd) }
            if fsync(fd) != 0 { throw ioError("fsync", file) }
        }
        if rename(file, p) != 0 {
            guard errno == EXDEV else { throw ioError("rename", p) }
            try copyFileAtomically(from: file, to: p, durable: durable)
        }
        if durable { try fsyncDirectory(String(p[..<p.lastIndex(of: "/")!])) }
    }

    public func remove(_ kind: FileKind, _ name: String) throws {
        let p = path(kind, name)
        lock.locked {
            if openFiles.removeValue(forKey: p) != nil { lru.removeAll { $0 == p } }
        }
        if unlink(p) != 0 && errno != ENOENT { throw ioError("remove", p) }
        if durable { try fsyncDirectory(String(p[..<p.lastIndex(of: "/")!])) }
    }
}
