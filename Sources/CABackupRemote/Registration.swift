import CABackup

/// Remote storages: what a program registers to open `http(s)://` locations.
public enum CABackupRemote {
    /// Makes `http://NAME@HOST:PORT[/PREFIX]` and `https://…` locations open as private
    /// data spaces on a `cabackup server` (see ``HTTPStorage``). Call it once, before the
    /// first repository is opened; calling it again is harmless.
    public static func register() {
        for scheme in ["http", "https"] {
            StorageRegistry.register(scheme: scheme) { location, _ in
                try HTTPStorage(try RemoteLocation(parsing: location))
            }
        }
    }
}
