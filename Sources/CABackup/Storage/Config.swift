import Foundation

/// The repository config: the one file written at `init` and never changed.
///
/// Stored as JSON at `config`. Readers refuse a `format_version` above
/// ``RepositoryConfig/currentFormatVersion`` and ignore fields they do not know.
public struct RepositoryConfig: Codable, Sendable, Equatable {
    /// The format version this build writes and the highest it reads.
    public static let currentFormatVersion = 1

    /// The repository format version.
    public var formatVersion: Int
    /// A random id naming the repository (hex).
    public var id: String
    /// Content-defined chunking parameters, including the Gear seed.
    public var chunker: ChunkerParameters
    /// How blob ids are computed: `sha256` (plaintext SHA-256). Encrypted repositories
    /// will use a keyed scheme.
    public var idScheme: String
    /// `none` for plaintext repositories. Reserved for encryption.
    public var encryption: String
    /// The size at which a pack is closed.
    public var packSize: Int

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version"
        case id
        case chunker
        case idScheme = "id_scheme"
        case encryption
        case packSize = "pack_size"
    }

    /// 16 MiB: few enough files for large repositories, small enough to write and fsync
    /// without long stalls.
    public static let defaultPackSize = 16 << 20

    /// A new config with fresh random ids and default parameters.
    public static func makeNew(chunker: ChunkerParameters? = nil, packSize: Int = defaultPackSize) -> RepositoryConfig {
        RepositoryConfig(
            formatVersion: currentFormatVersion,
            id: hexString(secureRandomBytes(32)),
            chunker: chunker ?? .defaults(seed: secureRandomBytes(32)),
            idScheme: "sha256",
            encryption: "none",
            packSize: packSize)
    }

    func encoded() -> [UInt8] {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        return Array(try! enc.encode(self)) + [0x0A]
    }

    static func decode(_ bytes: [UInt8], path: String) throws -> RepositoryConfig {
        struct Version: Decodable {
            let format_version: Int
        }
        let data = Data(bytes)
        guard let v = try? JSONDecoder().decode(Version.self, from: data) else {
            throw CABackupError.badConfig(path: path, reason: "not a cabackup config")
        }
        guard v.format_version <= currentFormatVersion else {
            throw CABackupError.unsupportedVersion(found: v.format_version, supported: currentFormatVersion)
        }
        let config: RepositoryConfig
        do {
            config = try JSONDecoder().decode(RepositoryConfig.self, from: data)
        } catch {
            throw CABackupError.badConfig(path: path, reason: "missing or malformed field")
        }
        do {
            try config.chunker.validate()
        } catch {
            throw CABackupError.badConfig(path: path, reason: CABackupError(error).description)
        }
        guard config.idScheme == "sha256", config.encryption == "none" else {
            throw CABackupError.badConfig(
                path: path, reason: "unsupported id scheme or encryption '\(config.encryption)'")
        }
        guard config.packSize >= 1 << 16, config.packSize <= 1 << 30 else {
            throw CABackupError.badConfig(path: path, reason: "pack_size out of range")
        }
        return config
    }
}
