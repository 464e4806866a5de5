import CABackup

/// Remote storages: what a program registers to open `http(s)://` and `s3:` locations.
public enum CABackupRemote {
    /// Makes `http://NAME@HOST:PORT[/PREFIX]` and `https://…` locations open as private
    /// data spaces on a `cabackup server` (see ``HTTPStorage``), and
    /// `s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]` open as a bucket of S3-compatible object
    /// storage (credentials from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`; region from `AWS_DEFAULT_REGION`, default `us-east-1`; the
    /// option `s3.bucket-lookup` = `auto`, `dns` or `path`, see
    /// `StorageRegistry.setOption(_:_:)`). Call it once, before the first repository is
    /// opened; calling it again is harmless.
    public static func register() {
        for scheme in ["http", "https"] {
            StorageRegistry.register(scheme: scheme) { location, _ in
                try HTTPStorage(try RemoteLocation(parsing: location))
            }
        }
        StorageRegistry.declareOption(
            "s3.bucket-lookup", values: S3BucketLookup.allCases.map(\.rawValue))
        StorageRegistry.register(scheme: "s3") { location, _ in
            let lookup = StorageRegistry.option("s3.bucket-lookup").flatMap(S3BucketLookup.init) ?? .auto
            return try S3Storage(try S3Location(parsing: location), lookup: lookup)
        }
    }
}
