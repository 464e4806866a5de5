import CABackup
