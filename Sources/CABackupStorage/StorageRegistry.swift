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
    /// Options storages accept (key → allowed values), and the values set.
    private static let declared = Mutex<[String: [String]]>([:])
    private static let values = Mutex<[String: String]>([:])

    /// Declares an option a storage reads (restic's `-o KEY=VALUE`, e.g.
    /// `s3.bucket-lookup`), with the values it accepts.
    public static func declareOption(_ key: String, values allowed: [String]) {
        declared.withLock { $0[key] = allowed }
    }

    /// Sets an option for the storages opened from now on.
    /// - Throws: ``CABackupError/invalidArgument(_:)`` for an option no storage declared,
    ///   or a value it does not accept, naming what is allowed.
    public static func setOption(_ key: String, _ value: String) throws {
        let all = declared.withLock { $0 }
        guard let allowed = all[key] else {
            let known = all.keys.sorted().joined(separator: ", ")
            throw CABackupError.invalidArgument(
                "unknown option '\(key)': known options are \(known.isEmpty ? "none" : known)")
        }
        guard allowed.contains(value) else {
            throw CABackupError.invalidArgument(
                "option \(key) takes \(allowed.joined(separator: ", ")), not '\(value)'")
        }
        values.withLock { $0[key] = value }
    }

    /// The value of an option, if set.
    public static func option(_ key: String) -> String? { values.withLock { $0[key] } }

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
