import CABackup
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// The repositories this device backs up, which paths, how often: the device configuration
/// file (`$XDG_CONFIG_HOME/cabackup/device.json` by default, documented in `docs/ui.md`).
/// It holds no password: those are entered in the page and kept in memory only.
public struct DeviceConfiguration: Codable, Sendable, Equatable {
    /// The file format's version; 1 is the only one.
    public var version: Int = 1
    public var repositories: [ConfiguredRepository] = []

    public init(repositories: [ConfiguredRepository] = []) {
        self.repositories = repositories
    }

    /// The default location: `device.json` in this user's cabackup config directory.
    public static var defaultPath: String { configDirectory() + "/device.json" }

    /// Reads and checks the file at `path`; a missing file is an empty configuration.
    ///
    /// - Throws: ``CABackupError/invalidArgument(_:)`` naming the file and what is wrong.
    public static func load(_ path: String) throws -> DeviceConfiguration {
        let bytes: [UInt8]
        do {
            guard fileExists(path) else { return DeviceConfiguration() }
            bytes = try readSmallFile(path, limit: 1 << 20)
        } catch let error as CABackupError {
            throw bad(path, "cannot read it: \(error)")
        }
        let config: DeviceConfiguration
        do {
            config = try JSONDecoder().decode(DeviceConfiguration.self, from: Data(bytes))
        } catch let DecodingError.keyNotFound(key, context) {
            throw bad(
                path, "\(where: context.codingPath)lacks the field '\(key.stringValue)'")
        } catch let DecodingError.typeMismatch(_, context) {
            throw bad(
                path, "\(where: context.codingPath)has a field of the wrong type")
        } catch {
            throw bad(path, "it is not valid JSON")
        }
        guard config.version == 1 else {
            throw bad(path, "version \(config.version) is not 1")
        }
        var names = Set<String>()
        for r in config.repositories {
            if let problem = r.problem() {
                throw bad(path, "repository '\(r.name)': \(problem)")
            }
            guard names.insert(r.name).inserted else {
                throw bad(path, "two repositories are named '\(r.name)'")
            }
        }
        return config
    }

    /// Writes the file atomically with mode 0600 (its directory 0700, created if missing).
    public func save(_ path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        let bytes = Array(try encoder.encode(self)) + [0x0A]
        try makeDirectories((path as NSString).deletingLastPathComponent)
        try writeFileAtomically(path, bytes, mode: 0o600)
    }
}

/// The error of a bad device configuration file: one line, the file and what is wrong.
private func bad(_ path: String, _ reason: String) -> CABackupError {
    .invalidArgument("the device configuration \(path) is not valid: \(reason) (its fields: docs/ui.md)")
}

extension String.StringInterpolation {
    /// `repositories[2].paths: ` for a decoding error's coding path, nothing at the top.
    fileprivate mutating func appendInterpolation(where path: [any CodingKey]) {
        guard !path.isEmpty else { return }
        let text = path.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
        appendLiteral(String(text.drop(while: { $0 == "." })) + ": ")
    }
}

/// One repository of the device configuration.
public struct ConfiguredRepository: Codable, Sendable, Equatable {
    /// A short name, unique on this device: letters, digits, `.`, `_`, `-`.
    public var name: String
    /// Where it is: a directory, `http(s)://NAME@HOST:PORT[/PREFIX]` or `s3:…`.
    public var repo: String
    /// The absolute paths backed up into it.
    public var paths: [String]
    /// How often to check the paths for changes (`90s`, `15m`, `1h`, `7d`); nil: only
    /// when asked.
    public var every: String?
    /// Exclude patterns (restic's rules, `docs/excludes.md`).
    public var exclude: [String]?

    public init(name: String, repo: String, paths: [String], every: String? = nil, exclude: [String]? = nil) {
        self.name = name
        self.repo = repo
        self.paths = paths
        self.every = every
        self.exclude = exclude
    }

    /// Seconds between checks, when ``every`` is set.
    public var interval: Double? { every.flatMap(parseDuration) }

    /// What is wrong with it, in one line, or nil.
    public func problem() -> String? {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        if name.isEmpty || name.count > 64 || !name.allSatisfy(allowed.contains) {
            return "the name must be 1 to 64 letters, digits, '.', '_' or '-'"
        }
        if repo.isEmpty { return "give the repository's location ('repo')" }
        if locationScheme(repo) == nil && !repo.hasPrefix("/") {
            return "the repository directory '\(repo)' is not an absolute path"
        }
        if paths.isEmpty { return "give at least one path to back up" }
        if let bad = paths.first(where: { !$0.hasPrefix("/") }) { return "the path '\(bad)' is not absolute" }
        if let every, parseDuration(every) == nil {
            return "every '\(every)' is not a duration: use 90s, 15m, 1h or 7d"
        }
        do {
            try SnapshotOptions(excludes: exclude ?? []).validate()
        } catch {
            return "\(error)"
        }
        return nil
    }
}
