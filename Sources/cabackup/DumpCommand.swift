import ArgumentParser
import CABackup

#if canImport(Glibc)
    import Glibc
#endif

struct DumpCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dump",
        abstract: "Write a file of a snapshot to stdout, or a directory as a tar stream or a zip archive.",
        discussion: discussion(
            "PATH is an absolute path inside the snapshot (as `ls` shows it); `/` is the whole snapshot. A file is written as its bytes; a directory (or anything with --archive tar) as a POSIX pax tar stream with names relative to the entry's parent, modes, owners, nanosecond mtimes, symlinks, hard links, devices and extended attributes (SCHILY.xattr, as GNU tar --xattrs reads them). With --archive zip, a zip archive (ZIP64 where needed) with the same names, modes, owners, mtimes and symlinks, which unzip and Python's zipfile restore: entries are stored uncompressed (restic's zip deflates them), a hard link's every name holds a full copy, and devices, FIFOs and sockets are skipped with a warning. The output need not be seekable. Every chunk is verified. Examples: cabackup dump latest /home/a/docs | tar -x; cabackup dump --archive zip latest /home/a/docs > docs.zip"
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions

    @Option(name: .long, help: "Write a directory (or a file) as: tar or zip.")
    var archive: String?

    @Argument(help: "Snapshot id, prefix or 'latest'.")
    var snapshot: String

    @Argument(help: "The file or directory inside the snapshot.")
    var path: String

    func validate() throws {
        if let archive, archive != "tar" && archive != "zip" {
            throw ValidationError("--archive takes tar or zip, not '\(archive)'")
        }
    }

    func run() throws {
        if isatty(1) == 1 {
            throw ValidationError(
                "standard output is a terminal: redirect it to a file or a pipe (… > file, … | tar -x)")
        }
        let repo = try repository.open()
        let snap = try repo.findSnapshot(snapshot, matching: filters.filter)
        let format = archive.flatMap(DumpFormat.init(rawValue:)) ?? .auto
        try repo.dump(snap, path: path, archive: format, to: 1) { path, reason in
            printError("warning: skipped \(path): \(reason)")
        }
    }
}
