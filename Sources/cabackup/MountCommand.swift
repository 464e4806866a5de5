import ArgumentParser
import CABackup
import CABackupMount

#if canImport(Glibc)
    import Glibc
#endif

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Show the repository's snapshots as a read-only file system (FUSE).",
        discussion: discussion(
            "MOUNTPOINT is an existing directory. Below it: snapshots/TIME (each snapshot by its local time, with a latest link), ids/ID (by short id), hosts/HOST/TIME and tags/TAG/TIME; each snapshot directory holds the paths it backed up, with their modes, owners, times, links and extended attributes. Files are read from the repository as they are opened, every chunk verified; a damaged one reads as an I/O error. Snapshots taken while mounted appear within seconds. The command serves until interrupted (Ctrl-C) or until the mount point is unmounted (umount or fusermount3 -u). Needs /dev/fuse and, for users other than root, fuse3's fusermount3. Example: cabackup mount --repo /srv/backup /mnt/backup"
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions

    @Flag(
        name: .long,
        help: "Let other users see the mount (allow_other; needs user_allow_other in /etc/fuse.conf unless root).")
    var allowOther = false

    @Flag(name: .long, help: "Show every file as owned by root.")
    var ownerRoot = false

    @Flag(
        name: .long,
        help:
            "Do not let the kernel check files' modes against the reader (with --allow-other, anyone reads everything)."
    )
    var noDefaultPermissions = false

    @Argument(help: "An existing directory to mount on.")
    var mountpoint: String

    func run() throws {
        guard FuseMount.isSupported else {
            throw ValidationError("this build of cabackup has no FUSE support: mount needs Linux with libfuse 3")
        }
        var st = stat()
        guard stat(mountpoint, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
            throw ValidationError("mount point \(mountpoint) is not a directory: create an empty directory and name it")
        }
        let repo = try repository.open()
        var options = MountOptions()
        options.allowOther = allowOther
        options.ownerRoot = ownerRoot
        options.checkPermissions = !noDefaultPermissions
        let namespace = SnapshotNamespace(repository: repo, filter: filters.filter)
        let mount = FuseMount(namespace: namespace, mountpoint: mountpoint, options: options) { message in
            printError("cabackup: mount: \(message)")
        }
        Interrupt.firstSignal.withLock { $0 = { mount.stop() } }
        do {
            try serve(mount)
        } catch let error as MountError {
            Interrupt.firstSignal.withLock { $0 = nil }
            printError("cabackup: \(error)")
            throw ExitCode(1)
        }
        Interrupt.firstSignal.withLock { $0 = nil }
        print("unmounted \(mountpoint)")
    }

    private func serve(_ mount: FuseMount) throws {
        try mount.serve {
            print("Now serving the repository at \(mountpoint)")
            print("Browse it from another terminal or program; quit with Ctrl-C here or umount \(mountpoint).")
            fflush(nil)
        }
    }
}
