import CABackupCore
import CABackupFormat
#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

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
    /// Lock objects of a storage without a lock of its own, named by the hex SHA-256 of
    /// their bytes (see ``LockObjects``).
    case lock

    /// The largest file of this kind a whole-file read accepts: configs, key slots and
    /// lock objects are a few hundred bytes, a snapshot record a few KiB (its paths and
    /// tags). Packs are read in ranges.
    public var maxWholeFileSize: Int {
        switch self {
        case .config, .key, .lock: return 64 << 10
        case .snapshot: return 16 << 20
        case .pack: return 128 << 20
        }
    }
}

extension FileKind {
    /// Where a file of this kind lives in a repository, relative to its root: `config`,
    /// `data/<first two hex digits>/<name>`, `snapshots/<name>`, `keys/<name>`,
    /// `locks/<name>`. A local directory and an S3 bucket use the same layout.
    public func relativePath(_ name: String) -> String {
        switch self {
        case .config: return "config"
        case .pack: return "data/" + name.prefix(2) + "/" + name
        case .snapshot: return "snapshots/" + name
        case .key: return "keys/" + name
        case .lock: return "locks/" + name
        }
    }
}

/// A held repository lock; released on deinit.
public final class RepositoryLock: Sendable {
    private let release: @Sendable () -> Void
    public init(release: @escaping @Sendable () -> Void) { self.release = release }
    deinit { release() }
}

/// What a storage can do beyond the operations every storage has.
public struct StorageCapabilities: OptionSet, Sendable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }

    /// The files live on a disk the user controls (a local directory), so a plaintext
    /// repository may live there. Every other storage (a server, object storage, any
    /// storage a library user supplies) must hold an encrypted repository, and the
    /// client refuses a config there that says otherwise.
    public static let localAndTrusted = StorageCapabilities(rawValue: 1 << 0)
    /// The storage refuses a second `config` itself (atomically), so two devices
    /// creating a repository at once cannot both succeed. Without it, `init` checks
    /// first and a race between two `init`s at one location is possible.
    public static let writeOnceConfig = StorageCapabilities(rawValue: 1 << 1)
    /// The storage checks what it is given (a pack's name is its SHA-256, its header
    /// is sealed): only valid objects can be stored.
    public static let verifiesUploads = StorageCapabilities(rawValue: 1 << 2)
}

/// Where a repository's immutable files live: a local directory, a private data space
/// on a server, object storage, or any storage a library user supplies.
///
/// Files are named and immutable: created whole (atomically and durably before the call
/// returns), read, listed and removed, never modified. A storage holds no keys and sees
/// only what is stored; everything it returns is treated as hostile by the layers above.
/// The operations are the same for every storage; what differs is stated in
/// ``capabilities``, and a storage may offer a lock of its own (``nativeLock(exclusive:)``)
/// and server-side services (``space``). Register a storage for a URL scheme with
/// ``StorageRegistry/register(scheme:_:)``.
public protocol Storage: AnyObject, Sendable {
    /// A human-readable location for messages (the `--repo` value, made absolute).
    var location: String { get }
    /// What this storage can do beyond the common operations.
    var capabilities: StorageCapabilities { get }
    /// A directory on the storage's own disk for files derived from it (the index) and
    /// for files being built before ``put(_:_:file:)`` (so a local storage can rename
    /// them in), or `nil` to keep those in the user's cache directory, per repository.
    var workingDirectory: String? { get }
    /// Prepares an empty location for a new repository; fails with
    /// ``CABackupError/repositoryExists(_:)`` if it holds files already.
    func create() throws
    /// Throws ``CABackupError/repositoryExists(_:)`` unless ``create()`` would succeed,
    /// changing nothing (so `init` can refuse before it asks for a new password).
    func checkCanCreate() throws
    /// The error for a location that holds no repository config (a local directory
    /// tells "not a repository" from "nothing there").
    func missingRepositoryError() -> CABackupError
    /// Names of all files of a kind (only names that are valid object names).
    func list(_ kind: FileKind) throws -> [String]
    /// The size of a file in bytes, or `nil` when there is no such file.
    func stat(_ kind: FileKind, _ name: String) throws -> Int64?
    /// A whole file of at most `kind.maxWholeFileSize` bytes (configs, key slots, records).
    func read(_ kind: FileKind, _ name: String) throws -> [UInt8]
    /// Exactly `length` bytes at `offset` of a file into `buffer`.
    func read(
        _ kind: FileKind, _ name: String, offset: Int64, length: Int, into buffer: UnsafeMutableRawPointer)
        throws
    /// Stores `bytes` under `name`, atomically and durably. Storing an existing name
    /// again is harmless (except `config`, which is never replaced:
    /// ``CABackupError/repositoryExists(_:)``).
    func put(_ kind: FileKind, _ name: String, bytes: UnsafeRawBufferPointer) throws
    /// Stores a finished local file under `name`, atomically and durably, and consumes
    /// it: once the call returns or throws, the file at `path` is gone (a local storage
    /// renames it in when it is on the same file system; others read and upload it).
    func put(_ kind: FileKind, _ name: String, file path: String) throws
    /// Removes a file; removing a missing one is harmless.
    func remove(_ kind: FileKind, _ name: String) throws
    /// A lock of the storage's own (`flock` on a local disk, a lease on a server), or
    /// `nil` when it has none and the repository layer keeps lock objects in it instead.
    /// Shared for writers that only add, exclusive for those that delete; released with
    /// the returned handle or when the process dies.
    /// - Throws: ``CABackupError/locked(_:)`` when held in a conflicting mode.
    func nativeLock(exclusive: Bool) throws -> RepositoryLock?
    /// Services a server offers on top of storage, or `nil` for plain storage.
    var space: (any SpaceServices)? { get }
}

extension Storage {
    public var capabilities: StorageCapabilities { [] }
    public var workingDirectory: String? { nil }
    public func nativeLock(exclusive: Bool) throws -> RepositoryLock? { nil }
    public var space: (any SpaceServices)? { nil }

    public func checkCanCreate() throws {
        if try exists() { throw CABackupError.repositoryExists(location) }
    }

    public func missingRepositoryError() -> CABackupError { .repositoryNotFound(location) }

    /// Whether a repository config is stored.
    public func exists() throws -> Bool { try stat(.config, "config") != nil }

    /// The size of a file that must exist.
    /// - Throws: ``CABackupError/io(operation:path:errno:)`` (`ENOENT`) when it does not.
    public func size(_ kind: FileKind, _ name: String) throws -> Int64 {
        guard let n = try stat(kind, name) else {
            throw ioError("stat", "\(location): \(kind) \(name)", ENOENT)
        }
        return n
    }
}

/// What a private data space's server offers beyond storing files. The repository
/// layer negotiates these; the archiver and the rest of the engine never see them.
public protocol SpaceServices: Sendable {
    /// Which of `ids` the space holds no pack for (so a pack whose blobs another
    /// device already stored is not uploaded again).
    func missing(_ ids: [BlobID]) throws -> [BlobID]
    /// Stores a snapshot record (the commit point of a snapshot) with the blobs the
    /// snapshot's new trees and newly read files name: the server, which cannot read
    /// sealed trees, stores it only when it holds every one of them.
    func commitSnapshot(_ name: String, _ bytes: UnsafeRawBufferPointer, references: [BlobID]) throws
    /// Throws when the credentials used may add but not delete (an append-only device
    /// token), so an operation that deletes refuses before it changes anything.
    func checkCanDelete() throws
}
