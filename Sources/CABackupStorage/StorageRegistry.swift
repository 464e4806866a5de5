import CABackupCore
import CABackupFormat
import Synchronization

/// Turns a `--repo` value into a ``Storage``: a local directory for a path, and the
/// storage registered for its URL scheme otherwise.
///
/// This module knows local directories only, so a program that uses it alone never builds
/// or links a network stack. Remote storages register themselves:
///
/// ```swift
/// import CABackupRemote
/// CABackupRemote.register()  // http(s):// private data spaces on a cabackup server
/// ```
public enum StorageRegistry {
    /// Opens the storage at a location of the registered scheme (the whole `--repo`
    /// value). `durable` is false only in throwaway tests (no fsync).
    public typealias Opener = @Sendable (_ location: String, _ durable: Bool) throws -> any Storage

    private static let openers = Mutex<[String: Opener]>([:])

    /// Makes `scheme:` locations open with `opener` (replacing an earlier registration).
    public static func register(scheme: String, _ opener: @escaping Opener) {
        openers.withLock { $0[scheme] = opener }
    }

    /// Whether a storage is registered for `scheme`.
    public static func isRegistered(scheme: String) -> Bool { openers.withLock { $0[scheme] != nil } }

    /// The storage for a `--repo` value.
    /// - Throws: ``CABackupError/unsupportedLocation(_:)`` for a scheme nothing registered,
    ///   before anything is created.
    public static func open(_ location: String, durable: Bool = true) throws -> any Storage {
        guard let scheme = scheme(of: location) else {
            return LocalStorage(path: absolutePath(location), durable: durable)
        }
        guard let opener = openers.withLock({ $0[String(scheme)] }) else {
            throw CABackupError.unsupportedLocation(location)
        }
        return try opener(location, durable)
    }

    /// The scheme `s` starts with, by restic's rule: `[a-z0-9]+:` followed by more
    /// (`http://…`, `s3:…`, `sftp:host:/x`, `b2:bucket`); nil for a local path. A local
    /// path with a colon in its first component is written `./name:x` or absolute.
    public static func scheme(of s: String) -> Substring? { locationScheme(s) }

    /// `location` made absolute when it is a local path; URLs are returned unchanged.
    public static func canonical(_ location: String) -> String {
        scheme(of: location) == nil ? absolutePath(location) : location
    }
}
