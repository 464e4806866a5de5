// `import CABackup` gives a program the whole engine: the layers below are part of its API.
@_exported import CABackupCore
@_exported import CABackupFormat
@_exported import CABackupStorage
