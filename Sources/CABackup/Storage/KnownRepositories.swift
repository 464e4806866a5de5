import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// What this device remembers about each repository it has opened, keyed by where the
/// repository is (a directory's absolute path, or `http(s)://NAME@HOST:PORT[/PREFIX]`),
/// never by anything the repository itself says: the SHA-256 of the config it first saw,
/// the highest format version seen there, the key slot that opened it last, and the newest
/// snapshot seen there.
///
/// A storage that later serves another config (say `encryption: none`, or a lower
/// format version) is refused before anything is read or written. The file is
/// `known-repositories.json` beside the server credentials (`$XDG_CONFIG_HOME/cabackup/`,
/// else `~/.config/cabackup/`), mode 0600; updates hold an `flock` on a lock file beside
/// it, so processes opening repositories at once do not lose each other's entries.
package enum KnownRepositories {
    package struct Entry: Codable, Equatable {
        /// SHA-256 (hex) of the config file's bytes.
        var config: String
        /// The highest `format_version` seen at this location.
        var formatVersion: Int
        /// The key slot that opened the repository last (tried first next time).
        var keySlot: String?
        /// When the entry was last changed (nanoseconds since 1970), for evicting old ones.
        var seenNs: Int64
        /// The newest snapshot this device has seen there (hex id): when it is gone and no
        /// forget record names it, the storage removed it behind the owner's back.
        var newestSnapshot: String? = nil

        enum CodingKeys: String, CodingKey {
            case config
            case formatVersion = "format_version"
            case keySlot = "key_slot"
            case seenNs = "seen_ns"
            case newestSnapshot = "newest_snapshot"
        }
    }

    /// The most locations remembered; the least recently used go first. A device with
    /// more repositories than this re-learns the oldest on its next open.
    static let capacity = 1000

    static var path: String { CredentialStore.directory + "/known-repositories.json" }

    /// The entry for `location`, if this device has opened it before.
    package static func entry(_ location: String) -> Entry? { load()[location] }

    /// Remembers `entry` for `location` (replacing what was there).
    static func remember(_ location: String, _ entry: Entry, durable: Bool) throws {
        try update(durable: durable) { all in
            if all[location] == entry { return false }
            all[location] = entry
            if all.count > capacity {
                for (key, _) in all.sorted(by: { $0.value.seenNs < $1.value.seenNs }).prefix(all.count - capacity) {
                    all[key] = nil
                }
            }
            return true
        }
    }

    /// ``remember(_:_:durable:)``, turning a failure (a read-only or missing home, say)
    /// into the warning to show: the backup goes on, but this device cannot notice a
    /// changed config there.
    static func rememberOrWarn(_ location: String, _ entry: Entry, durable: Bool) -> String? {
        do {
            try remember(location, entry, durable: durable)
            return nil
        } catch {
            return
                "cannot remember the config of \(location) in \(path) (\(CABackupError(error))): this device will not notice if it is changed; make \(CredentialStore.directory) writable or set XDG_CONFIG_HOME"
        }
    }

    static func load() -> [String: Entry] {
        guard let bytes = try? readSmallFile(path, limit: 16 << 20) else { return [:] }
        return (try? JSONDecoder().decode([String: Entry].self, from: Data(bytes))) ?? [:]
    }

    /// Runs `change` on the stored entries with the lock file held; writes them back when
    /// it returns true.
    private static func update(durable: Bool, _ change: (inout [String: Entry]) -> Bool) throws {
        try makeDirectories(CredentialStore.directory)
        let lockPath = CredentialStore.directory + "/known-repositories.lock"
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        if fd < 0 { throw ioError("open", lockPath) }
        defer { close(fd) }
        while flock(fd, LOCK_EX) != 0 {
            if errno != EINTR { throw ioError("lock", lockPath) }
        }
        var all = load()
        guard change(&all) else { return }
        try writeFileAtomically(path, jsonFile(all), mode: 0o600, durable: durable)
    }
}
