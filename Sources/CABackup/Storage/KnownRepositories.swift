import CABackupCore
import CABackupFormat
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
/// format version) is refused before anything is read or written. Each location has a
/// small file of its own, `known-repositories/<SHA-256 of the location>.json`, beside the
/// server credentials (`$XDG_CONFIG_HOME/cabackup/`, else `~/.config/cabackup/`), mode
/// 0600, replaced atomically: an open reads one file of a few hundred bytes, whatever the
/// number of repositories the device knows.
package enum KnownRepositories {
    package struct Entry: Codable, Equatable {
        /// The location, as a check that the file is the one for it.
        var location: String = ""
        /// SHA-256 (hex) of the config file's bytes.
        var config: String
        /// The highest `format_version` seen at this location.
        var formatVersion: Int
        /// The key slot that opened the repository last (tried first next time).
        var keySlot: String?
        /// When the entry was last changed (nanoseconds since 1970).
        var seenNs: Int64
        /// The newest snapshot this device has seen there (hex id): when it is gone and no
        /// forget record names it, the storage removed it behind the owner's back.
        var newestSnapshot: String? = nil

        enum CodingKeys: String, CodingKey {
            case location, config
            case formatVersion = "format_version"
            case keySlot = "key_slot"
            case seenNs = "seen_ns"
            case newestSnapshot = "newest_snapshot"
        }
    }

    static var directory: String { configDirectory() + "/known-repositories" }

    static func path(_ location: String) -> String { directory + "/" + sha256(Array(location.utf8)).hex + ".json" }

    /// The entry for `location`, if this device has opened it before.
    package static func entry(_ location: String) -> Entry? {
        guard let bytes = try? readSmallFile(path(location), limit: 64 << 10),
            let entry = try? JSONDecoder().decode(Entry.self, from: Data(bytes)), entry.location == location
        else { return nil }
        return entry
    }

    /// Remembers `entry` for `location` (replacing what was there). `durable` fsyncs the
    /// file: wanted when the config pin changes, not for the newest snapshot.
    static func remember(_ location: String, _ entry: Entry, durable: Bool) throws {
        var entry = entry
        entry.location = location
        try makeDirectories(directory)
        try writeFileAtomically(path(location), jsonFile(entry), mode: 0o600, durable: durable)
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
                "cannot remember the config of \(location) in \(directory) (\(CABackupError(error))): this device will not notice if it is changed; make \(configDirectory()) writable or set XDG_CONFIG_HOME"
        }
    }
}
