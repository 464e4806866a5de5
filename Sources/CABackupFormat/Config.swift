import CABackupCore
import Foundation

/// The repository config: the one file written at `init` and never changed.
///
/// Stored as JSON at `config`. Readers refuse a `format_version` above
/// ``RepositoryConfig/currentFormatVersion`` and ignore fields they do not know. In an
/// encrypted repository the chunker parameters (with the Gear seed) are sealed under the
/// master key, so the storage side cannot learn where chunk boundaries fall; everything
/// else in the file is needed before the key is known.
///
/// Version 3 binds every clear field that changes how data is read or written
/// (`format_version`, `id`, `id_scheme`, `encryption`, `pack_size`) to the master key: they
/// are the additional authenticated data of the sealed part, so a storage that changes any
/// of them makes the config fail to open. Version 2 configs (which sealed the chunker
/// only) are still read, but only with their one valid set of values.
///
/// Version 4 adds `compression` (``RepositoryCompression``), bound like the other fields:
/// a repository compressed with zstd is version 4, encrypted or not, so a client that
/// cannot read zstd blobs refuses it at open ("upgrade cabackup"). LZ4 repositories are
/// still written as version 1 (plaintext) or 3 (encrypted), byte for byte as before.
public struct RepositoryConfig: Sendable, Equatable {
    /// The highest format version this build reads. It writes 1 (plaintext, LZ4),
    /// 3 (encrypted, LZ4) and 4 (zstd).
    public static let currentFormatVersion = 4

    /// The first format version with a `compression` field; every zstd repository has it.
    public static let compressionFormatVersion = 4

    /// The repository format version.
    public var formatVersion: Int
    /// A random id naming the repository (hex).
    public var id: String
    /// Content-defined chunking parameters, including the Gear seed.
    public var chunker: ChunkerParameters
    /// How blob ids are computed: `sha256` (plaintext SHA-256) or `hmac-sha256` (keyed,
    /// in encrypted repositories).
    public var idScheme: String
    /// `none` for plaintext repositories, `aes-256-gcm` for encrypted ones.
    public var encryption: String
    /// The size at which a pack is closed.
    public var packSize: Int
    /// The codec new blobs are compressed with: `compression` in a version 4 config, LZ4
    /// in older ones.
    public var compression: RepositoryCompression = .lz4

    /// Whether blobs, pack details, trees and snapshot records are sealed.
    public var isEncrypted: Bool { encryption == Self.aesGCM }

    static let aesGCM = "aes-256-gcm"

    /// 16 MiB: few enough files for large repositories, small enough to write and fsync
    /// without long stalls.
    public static let defaultPackSize = 16 << 20

    /// The pack sizes a config may name: a client buffers one pack per upload, so a
    /// storage must not be able to make that buffer arbitrarily large.
    public static let packSizeRange = (1 << 16)...(128 << 20)

    /// A new config with fresh random ids and default parameters: format version 4 with
    /// zstd, else 3 when encrypted and 1 when not.
    public static func makeNew(
        chunker: ChunkerParameters? = nil, encrypted: Bool = false, packSize: Int = defaultPackSize,
        compression: RepositoryCompression = .lz4
    ) -> RepositoryConfig {
        RepositoryConfig(
            formatVersion: compression != .lz4 ? compressionFormatVersion : encrypted ? 3 : 1,
            id: hexString(secureRandomBytes(32)),
            chunker: chunker ?? .defaults(seed: secureRandomBytes(32)),
            idScheme: encrypted ? "hmac-sha256" : "sha256",
            encryption: encrypted ? Self.aesGCM : "none",
            packSize: packSize,
            compression: compression)
    }

    /// The stored file. `keys` seals the chunker parameters and must be given exactly
    /// when the config is encrypted.
    package func encoded(keys: RepositoryKeys? = nil) -> [UInt8] {
        precondition(isEncrypted == (keys != nil))
        precondition(
            formatVersion >= Self.compressionFormatVersion || compression == .lz4,
            "only a version 4 config records a codec other than LZ4")
        var file = ConfigFile(
            formatVersion: formatVersion, id: id, chunker: chunker, sealedChunker: nil, idScheme: idScheme,
            encryption: encryption, packSize: packSize,
            compression: formatVersion >= Self.compressionFormatVersion ? compression.rawValue : nil)
        if let keys {
            let enc = JSONEncoder()
            enc.outputFormatting = [.sortedKeys]
            let plain = Array(try! enc.encode(chunker))
            file.chunker = nil
            file.sealedChunker = Data(AESGCM(key: keys.encryption).seal(plain, aad: file.sealedAAD))
                .base64EncodedString()
        }
        return jsonFile(file)
    }

    /// Parses a plaintext config (tests and tools; encrypted configs need ``ConfigFile``).
    static func decode(_ bytes: [UInt8], path: String) throws -> RepositoryConfig {
        try ConfigFile.decode(bytes, path: path).resolve(keys: nil, path: path)
    }
}

/// The config file as stored: the plaintext fields, and the chunker parameters either in
/// the clear or sealed.
package struct ConfigFile: Codable {
    package var formatVersion: Int
    var id: String
    var chunker: ChunkerParameters?
    var sealedChunker: String?
    var idScheme: String
    var encryption: String
    var packSize: Int
    /// Present exactly from version 4 on (absent, the bytes of older configs are unchanged).
    var compression: String?

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version"
        case id
        case chunker
        case sealedChunker = "sealed_chunker"
        case idScheme = "id_scheme"
        case encryption
        case packSize = "pack_size"
        case compression
    }

    package var isEncrypted: Bool { encryption == RepositoryConfig.aesGCM }

    /// Parses and checks everything readable without the key. A `format_version` above
    /// `supported` (this build's ``RepositoryConfig/currentFormatVersion``) is refused
    /// before anything else is read.
    package static func decode(
        _ bytes: [UInt8], path: String, supported: Int = RepositoryConfig.currentFormatVersion
    ) throws -> ConfigFile {
        struct Version: Decodable {
            let format_version: Int
        }
        let data = Data(bytes)
        guard let v = try? JSONDecoder().decode(Version.self, from: data) else {
            throw CABackupError.badConfig(path: path, reason: "not a cabackup config")
        }
        guard v.format_version <= supported else {
            throw CABackupError.unsupportedVersion(found: v.format_version, supported: supported)
        }
        let file: ConfigFile
        do {
            file = try JSONDecoder().decode(ConfigFile.self, from: data)
        } catch {
            throw CABackupError.badConfig(path: path, reason: "missing or malformed field")
        }
        // The id names a cache directory and an index row: nothing but 64 lowercase hex
        // digits may reach either.
        guard isObjectName(file.id) else {
            throw CABackupError.badConfig(path: path, reason: "the repository id is not 64 lowercase hex digits")
        }
        guard file.formatVersion >= 1 else {
            throw CABackupError.badConfig(path: path, reason: "format_version \(file.formatVersion) is not valid")
        }
        switch (file.encryption, file.idScheme) {
        case ("none", "sha256"):
            guard file.chunker != nil, file.sealedChunker == nil else {
                throw CABackupError.badConfig(path: path, reason: "a plaintext config holds its chunker in the clear")
            }
        case (RepositoryConfig.aesGCM, "hmac-sha256"):
            guard file.formatVersion >= 2, file.sealedChunker != nil, file.chunker == nil else {
                throw CABackupError.badConfig(path: path, reason: "encrypted config without sealed_chunker")
            }
        default:
            throw CABackupError.badConfig(
                path: path,
                reason:
                    "unsupported id scheme '\(file.idScheme.prefix(40))' or encryption '\(file.encryption.prefix(40))'")
        }
        guard RepositoryConfig.packSizeRange.contains(file.packSize) else {
            throw CABackupError.badConfig(path: path, reason: "pack_size \(file.packSize) is out of range")
        }
        if file.formatVersion >= RepositoryConfig.compressionFormatVersion {
            guard let c = file.compression, RepositoryCompression(rawValue: c) != nil else {
                throw CABackupError.badConfig(
                    path: path,
                    reason:
                        "format_version \(file.formatVersion) needs compression 'lz4' or 'zstd', not '\((file.compression ?? "").prefix(40))'"
                )
            }
        } else if file.compression != nil {
            throw CABackupError.badConfig(
                path: path,
                reason: "compression is recorded from format_version 4 on, not in version \(file.formatVersion)")
        }
        return file
    }

    /// The codec the repository writes: the `compression` field from version 4 on, LZ4
    /// before (checked by ``decode(_:path:supported:)``).
    package var repositoryCompression: RepositoryCompression {
        compression.flatMap { RepositoryCompression(rawValue: $0) } ?? .lz4
    }

    /// What the sealed part is bound to. From version 3 on, every clear field that changes
    /// how data is read or written; version 2 sealed the chunker parameters alone (its
    /// clear fields have one valid value each, checked by ``decode(_:path:supported:)``).
    ///
    /// Layout (v3): `cabackup config v1 ‖ 0x00 ‖ "v3" ‖ 0x00 ‖ id ‖ 0x00 ‖ id_scheme ‖ 0x00 ‖
    /// encryption ‖ 0x00 ‖ pack_size (decimal)`; version 4 appends `0x00 ‖ compression`.
    var sealedAAD: [UInt8] {
        guard formatVersion >= 3 else { return SealedKind.config }
        var fields = ["v\(formatVersion)", id, idScheme, encryption, String(packSize)]
        if formatVersion >= RepositoryConfig.compressionFormatVersion { fields.append(compression ?? "") }
        return SealedKind.config + fields.flatMap { [0] + Array($0.utf8) }
    }

    /// The full config, opening the sealed chunker parameters with `keys`.
    package func resolve(keys: RepositoryKeys?, path: String) throws -> RepositoryConfig {
        var params: ChunkerParameters
        if isEncrypted {
            guard let keys else { throw CABackupError.passwordRequired(path) }
            guard let sealed = sealedChunker.flatMap({ Data(base64Encoded: $0) }),
                let plain = AESGCM(key: keys.encryption).open(Array(sealed), aad: sealedAAD)
            else {
                throw CABackupError.corrupt(
                    what: "config \(path)",
                    reason:
                        "its sealed part does not open with the key: a field of the config was changed after init, or the file is damaged"
                )
            }
            guard let p = try? JSONDecoder().decode(ChunkerParameters.self, from: Data(plain)) else {
                throw CABackupError.badConfig(path: path, reason: "malformed sealed chunker parameters")
            }
            params = p
        } else {
            params = chunker!
        }
        do {
            try params.validate()
        } catch {
            throw CABackupError.badConfig(path: path, reason: CABackupError(error).description)
        }
        return RepositoryConfig(
            formatVersion: formatVersion, id: id, chunker: params, idScheme: idScheme, encryption: encryption,
            packSize: packSize, compression: repositoryCompression)
    }
}

/// The codec a repository compresses new blobs with, chosen at `init` and recorded in its
/// authenticated config. Reading does not depend on it: every blob says how it is stored
/// (``BlobCompression``), and a client reads every codec it knows.
public enum RepositoryCompression: String, Sendable, CaseIterable {
    /// LZ4 (compression byte 1): the fastest to write and read; what every repository
    /// used before format version 4, and still written as version 1 or 3.
    case lz4
    /// Zstandard (compression byte 2): fewer bytes to store and send at some CPU cost;
    /// format version 4, which older clients refuse with "upgrade cabackup".
    case zstd
}

/// Whether `s` is a stored object's name: 64 lowercase hex digits (a SHA-256).
package func isObjectName(_ s: String) -> Bool {
    s.utf8.count == 64 && s.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }
}

/// The stored form of a small JSON file (config, key slot, credentials): pretty-printed,
/// keys sorted, one trailing newline.
package func jsonFile(_ value: some Encodable) -> [UInt8] {
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    return Array(try! enc.encode(value)) + [0x0A]
}
