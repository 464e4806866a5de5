import CABackup
import Foundation

/// The keys of one bucket, as `cabackup ui` stores them for the CLI to read later.
public struct S3Credentials: Codable, Sendable, Equatable {
    public var accessKeyId: String
    public var secretAccessKey: String
    /// The region requests are signed for; nil: `AWS_DEFAULT_REGION`, else `us-east-1`.
    public var region: String?

    public init(accessKeyId: String, secretAccessKey: String, region: String? = nil) {
        self.accessKeyId = accessKeyId
        self.secretAccessKey = secretAccessKey
        self.region = region
    }
}

/// S3 keys per bucket: `s3-credentials.json` in the cabackup config directory (next to the
/// server tokens of `credentials.json`), mode 0600, keyed by `ENDPOINT/BUCKET`
/// (`http://127.0.0.1:8333/backups`). An `s3:` repository uses them when `AWS_ACCESS_KEY_ID`
/// and `AWS_SECRET_ACCESS_KEY` are not set (see `docs/s3.md`).
public enum S3CredentialStore {
    static var path: String { configDirectory() + "/s3-credentials.json" }

    /// The key of a bucket in the file: its endpoint (lowercased) and name.
    static func key(_ location: S3Location) -> String { location.endpoint.lowercased() + "/" + location.bucket }

    static func load() -> [String: S3Credentials] {
        guard let bytes = try? readSmallFile(path) else { return [:] }
        return (try? JSONDecoder().decode([String: S3Credentials].self, from: Data(bytes))) ?? [:]
    }

    /// The stored keys of `location`'s bucket, if any.
    public static func credentials(for location: S3Location) -> S3Credentials? { load()[key(location)] }

    /// Stores (or replaces) the keys of `location`'s bucket.
    public static func store(_ credentials: S3Credentials, for location: S3Location) throws {
        var all = load()
        all[key(location)] = credentials
        try makeDirectories(configDirectory())
        let bytes = jsonFile(all)
        try bytes.withUnsafeBytes { try writeFileAtomically(path, $0, mode: 0o600, durable: true) }
    }
}
