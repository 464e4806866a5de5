#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Errors the engine reports to its callers. Each message is one line that says what is
/// wrong and what to do about it; none contains a password or token.
public enum CABackupError: Error, Sendable, CustomStringConvertible {
    /// No repository at the given location, and nothing else there either.
    case repositoryNotFound(String)
    /// The location is a directory holding other files, but no repository config.
    case notARepository(String)
    /// A location of a form no storage of cabackup takes: `s3:…`, `sftp:…`, `rest:…`.
    case unsupportedLocation(String)
    /// The location already holds a repository or other files.
    case repositoryExists(String)
    /// The repository config was written by a newer cabackup.
    case unsupportedVersion(found: Int, supported: Int)
    /// The repository config cannot be parsed.
    case badConfig(path: String, reason: String)
    /// No snapshot matches the given reference.
    case snapshotNotFound(String)
    /// A snapshot id prefix matches more than one snapshot.
    case ambiguousSnapshot(String, matches: Int)
    /// A snapshot reference that is neither `latest`, a full id nor an 8+ digit prefix.
    case badSnapshotReference(String)
    /// A top-level path to back up is missing or unreadable.
    case unreadableSource(path: String, reason: String)
    /// The restore target exists and is not empty.
    case targetNotEmpty(String)
    /// A path inside the snapshot was asked for but is not there.
    case pathNotInSnapshot(String)
    /// A blob the index names is missing from the repository.
    case blobNotFound(BlobID)
    /// Stored bytes do not match their id or cannot be parsed.
    case corrupt(what: String, reason: String)
    /// A system call failed.
    case io(operation: String, path: String, errno: Int32)
    /// The SQLite index reported an error.
    case index(String)
    /// The repository lock is held in a conflicting mode by another process.
    case locked(String)
    /// The operation was cancelled by the caller.
    case cancelled
    /// Invalid argument given to the library.
    case invalidArgument(String)
    /// The repository is encrypted and no password was given.
    case passwordRequired(String)
    /// No key slot of the repository opens with the password given.
    case wrongPassword(String)
    /// No key slot matches the id given.
    case keyNotFound(String)
    /// A key operation on a repository that is not encrypted.
    case notEncrypted(String)
    /// The server cannot be reached (connection refused, reset, timed out).
    case network(String)
    /// The server did not accept this device's token, or there is none.
    case notLoggedIn(String)
    /// The server refused a request; the message says why and what to do.
    case remote(status: Int, message: String)
    /// The storage serves something this device must not trust (a changed or downgraded
    /// config, a plaintext repository on a storage that is not a local disk); the
    /// message says what and what to do.
    case untrusted(String)

    public var description: String {
        switch self {
        case .repositoryNotFound(let p):
            return "no repository at \(p): create one with 'cabackup init --repo \(p)' or check --repo"
        case .notARepository(let p):
            return
                "\(p) is not a cabackup repository (it holds other files but no repository config): check --repo, or give 'cabackup init' an empty or new directory"
        case .unsupportedLocation(let s) where ["http", "https", "s3"].contains(locationScheme(s) ?? ""):
            return
                "'\(s)' is a remote location, and this program has no storage for it: a program using the library imports CABackupRemote and calls CABackupRemote.register() first"
        case .unsupportedLocation(let s):
            return
                "'\(s)' is not a repository location cabackup can use (it has no '\(s.prefix { $0 != ":" }):' storage): give a local directory, http(s)://NAME@HOST[:PORT][/PREFIX] or s3:http(s)://HOST[:PORT]/BUCKET; write a local path with a colon as ./\(s) or absolute"
        case .repositoryExists(let p) where locationScheme(p) != nil:
            return "the space at \(p) already holds a repository: use it as it is (it needs no init)"
        case .repositoryExists(let p):
            return "\(p) already exists and is not empty: choose a new directory for the repository"
        case .unsupportedVersion(let found, let supported):
            return
                "repository format version \(found) is newer than this cabackup supports (\(supported)): upgrade cabackup"
        case .badConfig(let path, let reason):
            return "repository config \(path) is unreadable (\(reason)): is --repo a cabackup repository?"
        case .snapshotNotFound(let r):
            return "no snapshot matches '\(r)': list them with 'cabackup snapshots'"
        case .ambiguousSnapshot(let r, let n):
            return "snapshot prefix '\(r)' matches \(n) snapshots: give more hex digits"
        case .badSnapshotReference(let r):
            return "'\(r)' is not a snapshot reference: use 'latest', a full id or at least 8 hex digits"
        case .unreadableSource(let p, let reason):
            return "cannot back up \(p): \(reason)"
        case .targetNotEmpty(let p):
            return "restore target \(p) exists and is not empty: choose an empty directory or pass --overwrite"
        case .pathNotInSnapshot(let p):
            return "\(p) is not in the snapshot: list its contents with 'cabackup ls'"
        case .blobNotFound(let id):
            return
                "blob \(id.hex) is missing from the repository: run 'cabackup repair index'; if it stays missing, the data is lost"
        case .corrupt(let what, let reason):
            return "\(what) is damaged (\(reason)): the repository's files were changed or corrupted on disk"
        case .io(let op, let path, let e) where e == ENOSPC || e == EDQUOT:
            return
                "\(op) \(path): \(errnoDescription(e)): free space on that disk and run the command again (an unfinished snapshot is not saved; the repository stays valid)"
        case .io(let op, let path, let e):
            return "\(op) \(path): \(errnoDescription(e))"
        case .index(let m):
            return "index: \(m) (the index can be rebuilt with 'cabackup repair index')"
        case .locked(let who):
            return "repository is locked: \(who); try again when it has finished"
        case .cancelled:
            return "interrupted"
        case .invalidArgument(let m):
            return m
        case .passwordRequired(let p):
            return
                "repository \(p) is encrypted: give its password with CABACKUP_PASSWORD, --password-file or at the prompt"
        case .wrongPassword(let p):
            return "wrong password for repository \(p): no key slot opens with it (nothing was changed)"
        case .keyNotFound(let k):
            return "no key slot matches '\(k)': list them with 'cabackup key list' and give 8 or more hex digits"
        case .notEncrypted(let p):
            return "repository \(p) is not encrypted: it has no keys to manage"
        case .network(let m), .notLoggedIn(let m), .untrusted(let m):
            return m
        case .remote(let status, let m):
            return "server refused the request (HTTP \(status)): \(m)"
        }
    }
}

extension CABackupError {
    /// Any error as a ``CABackupError`` (errors from inside the engine already are one).
    package init(_ error: any Error) {
        if let e = error as? CABackupError {
            self = e
        } else {
            self = .invalidArgument("\(error)")
        }
    }
}
