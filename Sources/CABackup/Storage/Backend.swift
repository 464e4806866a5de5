/// The kinds of file a repository stores.
public enum FileKind: String, Sendable, CaseIterable {
    /// The repository config (one file named `config`).
    case config
    /// Pack files, named by the hex SHA-256 of their bytes.
    case pack
    /// Snapshot records, named by the hex SHA-256 of their bytes.
    case snapshot
    /// Key slots of an encrypted repository, named by the hex SHA-256 of their bytes.
    case key

    /// The largest file of this kind a whole-file read accepts: configs and key slots are
    /// a few hundred bytes, a snapshot record a few KiB (its paths and tags). Packs are
    /// read in ranges.
    public var maxWholeFileSize: Int {
        switch self {
        case .config, .key: return 64 << 10
        case .snapshot: return 16 << 20
        case .pack: return 128 << 20
        }
    }
}

/// A held repository lock; released on deinit.
public final class RepositoryLock: Sendable {
    private let release: @Sendable () -> Void
    public init(release: @escaping @Sendable () -> Void) { self.release = release }
    deinit { release() }
}

/// Where a repository's immutable files live: a local directory today, an HTTP server
/// later. Every write is atomic and durable before it returns; files are never
/// modified after they are written, only created and (by prune) removed.
public protocol Backend: Sendable {
    /// A human-readable location for messages.
    var location: String { get }
    /// Whether the files live on a disk the user controls (a local directory), so a
    /// plaintext repository may live there. Every other storage (a server, object storage,
    /// any storage a library user supplies) must hold an encrypted repository, and the
    /// client refuses a config there that says otherwise.
    var isLocalAndTrusted: Bool { get }
    /// Whether a config exists.
    func exists() throws -> Bool
    /// Creates the storage layout; fails if the location is not empty.
    func create() throws
    /// Names of all files of a kind.
    func list(_ kind: FileKind) throws -> [String]
    /// A whole file (configs, snapshot records; not packs).
    func read(_ kind: FileKind, _ name: String) throws -> [UInt8]
    /// `length` bytes at `offset` of a file into `buffer`.
    func read(
        _ kind: FileKind, _ name: String, offset: Int64, length: Int, into buffer: UnsafeMutableRawPointer)
        throws
    /// The size of a file in bytes.
    func size(_ kind: FileKind, _ name: String) throws -> Int64
    /// Stores a file atomically and durably; storing an existing name again is harmless
    /// (except `config`, which is written once and never replaced).
    func write(_ kind: FileKind, _ name: String, _ bytes: UnsafeRawBufferPointer) throws
    /// A directory for temporary files, on the same file system as the stored files
    /// when the backend is local (so ``store(_:_:fd:temporaryPath:)`` can rename).
    var temporaryDirectory: String { get }
    /// Stores a finished temporary file under `name`, durably, consuming the file. The
    /// caller still owns (and closes) `fd`, which is open for writing on it.
    func store(_ kind: FileKind, _ name: String, fd: Int32, temporaryPath: String) throws
    /// Takes the repository lock: shared for writers that only add (snapshots), exclusive
    /// for prune, which deletes. Released when the returned handle is released, or when
    /// the process dies (so a crash never leaves a lock that needs a human).
    /// - Throws: ``CABackupError/locked(_:)`` when the lock is held in a conflicting mode.
    func lock(exclusive: Bool) throws -> RepositoryLock
    /// Removes a file.
    func remove(_ kind: FileKind, _ name: String) throws
    /// Stores a snapshot record (the commit point of a snapshot). `references` are the
    /// blobs the snapshot's new trees and newly read files name, for a server that cannot
    /// read sealed trees to check it holds them all before accepting the record.
    func writeSnapshot(_ name: String, _ bytes: UnsafeRawBufferPointer, references: [BlobID]) throws
    /// Whether ``writeSnapshot(_:_:references:)`` uses `references` (a server checks them;
    /// a directory does not, so a local snapshot does not collect them).
    var checksSnapshotReferences: Bool { get }
    /// Throws when the credentials used may add but not delete (an append-only device
    /// token), so an operation that deletes refuses before it changes anything.
    func checkCanDelete() throws
}

extension Backend {
    public var isLocalAndTrusted: Bool { false }

    public func checkCanDelete() throws {}

    public var checksSnapshotReferences: Bool { false }

    public func writeSnapshot(_ name: String, _ bytes: UnsafeRawBufferPointer, references: [BlobID]) throws {
        try write(.snapshot, name, bytes)
    }
}
