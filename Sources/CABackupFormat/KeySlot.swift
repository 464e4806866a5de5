import CABackupCore
import Foundation

/// scrypt cost parameters for deriving a key-wrapping key from a password.
public struct KDFParameters: Codable, Sendable, Equatable {
    /// CPU/memory cost (a power of two).
    public var n: UInt64
    /// Block size.
    public var r: UInt64
    /// Parallelism: independent lanes (two at a time here when there are two cores).
    public var p: UInt64

    public init(n: UInt64, r: UInt64, p: UInt64) {
        self.n = n
        self.r = r
        self.p = p
    }

    /// N = 2¹⁵, r = 8, p = 4: about 0.2 s and 32 MiB on the 2-core machines cabackup is
    /// measured on (libcrypto's scrypt takes 0.32 s). The lanes run one after another in
    /// the same 32 MiB, so the cost in time matches N = 2¹⁶, p = 2 while the memory stays
    /// below what a snapshot itself uses (a process's peak RSS counts the derivation too).
    /// Running two lanes at once would halve the time and double the memory (measured:
    /// 0.12 s and 94 MB peak RSS for `cabackup snapshots`, against 0.22 s and 61 MB).
    public static let `default` = KDFParameters(n: 1 << 15, r: 8, p: 4)

    /// Parameters cheap enough for test suites that open repositories hundreds of times.
    /// Never use them for data that matters.
    public static let insecureFastForTesting = KDFParameters(n: 1 << 10, r: 8, p: 1)

    /// The most memory one lane may take: 64 MiB, twice the default's. A key slot comes
    /// from the storage, so its parameters are an attacker's choice: without a bound, one
    /// slot could make every open take a gigabyte and many seconds.
    static let maxMemory: UInt64 = 64 << 20
    /// The most work a slot may cost, in N·r·p: twice the default's (about 0.4 s here), so
    /// trying every slot an open may try (``Repository/maxKeySlotTries``) stays bounded.
    static let maxWork: UInt64 = 2 << 20

    /// Throws unless the parameters are within the bounds above: N a power of two from
    /// 2¹⁰ to 2¹⁷, r from 1 to 32, p from 1 to 16, 128·N·r ≤ 64 MiB, N·r·p ≤ 2²¹.
    package func validate() throws {
        guard n >= 1 << 10, n.nonzeroBitCount == 1, n <= 1 << 17, r >= 1, r <= 32, p >= 1, p <= 16,
            128 * n * r <= Self.maxMemory, n * r * p <= Self.maxWork
        else {
            throw CABackupError.invalidArgument(
                "scrypt parameters N=\(n) r=\(r) p=\(p) are out of range (at most 64 MiB and twice the default work)")
        }
    }
}

/// The secret keys of an encrypted repository, made at random at `init` and stored only
/// wrapped in key slots: a 32-byte AES-256-GCM key and a 32-byte HMAC-SHA-256 key for
/// blob ids.
package struct RepositoryKeys: Sendable {
    package let encryption: [UInt8]
    let id: [UInt8]

    package static func random() -> RepositoryKeys { RepositoryKeys(bytes: secureRandomBytes(64)) }

    package init(bytes: [UInt8]) {
        precondition(bytes.count == 64)
        encryption = Array(bytes[0..<32])
        id = Array(bytes[32..<64])
    }

    package var bytes: [UInt8] { encryption + id }
}

/// One key slot: the master keys sealed under a key derived from one password.
/// Stored as JSON at `keys/<sha256 of the file>`.
package struct KeySlot: Codable {
    package var created: String
    package var hostname: String
    package var username: String
    package var kdf: String
    package var n: UInt64
    var r: UInt64
    var p: UInt64
    /// 32 random bytes, base64.
    var salt: String
    /// `nonce ‖ AES-256-GCM(master keys) ‖ tag`, base64.
    var masterKey: String

    enum CodingKeys: String, CodingKey {
        case created, hostname, username, kdf, n, r, p, salt
        case masterKey = "master_key"
    }

    package var parameters: KDFParameters { KDFParameters(n: n, r: r, p: p) }

    /// The key that wraps the master keys. Every command that opens an encrypted
    /// repository waits for it (0.2 s on one core at the defaults, one lane at a time), so
    /// with two cores two threads share the lanes in half memory each: the peak memory
    /// of one lane, and about 2.1 lane-times instead of 4 for the default p = 4 (2.5
    /// without AVX2; see ``scrypt(password:salt:n:r:p:length:threads:halfMemory:pairs:)``).
    static func derive(password: String, salt: [UInt8], _ kdf: KDFParameters) throws -> [UInt8] {
        let twoAtOnce = kdf.p >= 2 && usableCPUCount() >= 2
        return try scrypt(
            password: Array(password.utf8), salt: salt, n: kdf.n, r: kdf.r, p: kdf.p, length: 32,
            threads: twoAtOnce ? 2 : 1, halfMemory: twoAtOnce)
    }

    /// A new slot wrapping `keys` under `password`.
    package static func make(keys: RepositoryKeys, password: String, kdf: KDFParameters) throws -> KeySlot {
        try kdf.validate()
        let salt = secureRandomBytes(32)
        let wrap = try KeySlot.derive(password: password, salt: salt, kdf)
        let sealed = AESGCM(key: wrap).seal(keys.bytes, aad: SealedKind.keySlot)
        return KeySlot(
            created: formatRFC3339(ns: wallClockNs()), hostname: currentHostname(), username: currentUsername(),
            kdf: "scrypt", n: kdf.n, r: kdf.r, p: kdf.p, salt: Data(salt).base64EncodedString(),
            masterKey: Data(sealed).base64EncodedString())
    }

    /// The master keys, or nil when `password` does not open this slot.
    package func unwrap(password: String) throws -> RepositoryKeys? {
        try parameters.validate()
        guard kdf == "scrypt", let salt = Data(base64Encoded: salt), let sealed = Data(base64Encoded: masterKey) else {
            return nil
        }
        let wrap = try KeySlot.derive(password: password, salt: Array(salt), parameters)
        guard let plain = AESGCM(key: wrap).open(Array(sealed), aad: SealedKind.keySlot), plain.count == 64 else {
            return nil
        }
        return RepositoryKeys(bytes: plain)
    }

    package func encoded() -> [UInt8] { jsonFile(self) }

    package static func decode(_ bytes: [UInt8]) -> KeySlot? {
        try? JSONDecoder().decode(KeySlot.self, from: Data(bytes))
    }
}

/// What `cabackup key list` shows about a key slot (nothing secret).
public struct KeyInfo: Sendable, Equatable {
    /// The slot's file name (64 hex digits).
    public let id: String
    /// When the slot was made (RFC 3339).
    public let created: String
    public let hostname: String
    public let username: String
    /// Whether this repository object was opened with this slot.
    public let isCurrent: Bool

    package init(id: String, created: String, hostname: String, username: String, isCurrent: Bool) {
        self.id = id
        self.created = created
        self.hostname = hostname
        self.username = username
        self.isCurrent = isCurrent
    }
}
