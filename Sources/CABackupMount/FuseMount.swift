import CABackup
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

#if canImport(CFuse3)
    import CFuse3
#endif

/// How a ``FuseMount`` shows its files.
public struct MountOptions: Sendable {
    /// Let other users than the one mounting see the files (`allow_other`; for a user
    /// other than root, `/etc/fuse.conf` must have `user_allow_other`).
    public var allowOther = false
    /// Show every entry as owned by root, whatever owner it was backed up with.
    public var ownerRoot = false
    /// Let the kernel check each entry's mode against the caller (`default_permissions`).
    public var checkPermissions = true

    public init() {}
}

/// A negative `errno` for libfuse.
struct FuseCode: Error {
    let value: Int32
    init(_ value: Int32) { self.value = value }
}

/// Why a mount could not start.
public struct MountError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A ``SnapshotNamespace`` served read-only through FUSE (libfuse 3) at a mount point.
///
/// ``serve(ready:)`` mounts and answers the kernel's requests on the calling thread until
/// the file system is unmounted, by `umount`/`fusermount3 -u` or by ``stop()`` from any
/// thread (a signal handler's thread, for instance). Requests are answered one at a time.
public final class FuseMount: Sendable {
    public let namespace: SnapshotNamespace
    public let mountpoint: String
    public let options: MountOptions
    /// Called with a message when a request fails for a reason other than a missing name
    /// (a damaged or missing blob: the reader gets `EIO`).
    public let log: @Sendable (String) -> Void

    /// Whether this system can mount at all (libfuse 3 was there at build time).
    public static var isSupported: Bool {
        #if canImport(CFuse3)
            return true
        #else
            return false
        #endif
    }

    private struct State {
        var files: [UInt64: SnapshotNamespace.OpenFile] = [:]
        var nextHandle: UInt64 = 1
        var stopping = false
        var mounted = false
    }
    private let state = Mutex(State())

    /// - Parameters:
    ///   - namespace: what to show.
    ///   - mountpoint: an existing directory.
    ///   - options: owners, permissions, other users.
    ///   - log: called with a line for each read that failed on damage.
    public init(
        namespace: SnapshotNamespace, mountpoint: String, options: MountOptions = MountOptions(),
        log: @escaping @Sendable (String) -> Void = { _ in }
    ) {
        self.namespace = namespace
        self.mountpoint = mountpoint
        self.options = options
        self.log = log
    }

    /// Mounts, calls `ready`, and serves until unmounted.
    ///
    /// - Throws: ``MountError`` when the mount point is not a directory, this system has no
    ///   FUSE, or the kernel refuses the mount (libfuse has said why on standard error).
    public func serve(ready: () -> Void = {}) throws {
        var st = stat()
        guard stat(mountpoint, &st) == 0 else {
            throw MountError("cannot use \(mountpoint) as mount point: \(String(cString: strerror(errno)))")
        }
        guard st.st_mode & S_IFMT == S_IFDIR else {
            throw MountError("\(mountpoint) is not a directory: mount on an empty directory")
        }
        try checkNotMounted()
        #if canImport(CFuse3)
            try serveFuse(ready: ready)
        #else
            throw MountError("this build of cabackup has no FUSE support (it needs libfuse 3 on Linux)")
        #endif
    }

    /// Refuses a mount point that is itself a FUSE mount: a live one would be hidden under
    /// the new mount, and one whose process died answers nothing (its attributes may
    /// still come from the kernel's cache, so `statvfs`, which always asks, tells).
    private func checkNotMounted() throws {
        #if os(Linux)
            var fs = statvfs()
            if statvfs(mountpoint, &fs) != 0, errno == ENOTCONN {
                throw MountError(
                    "\(mountpoint) is left over from a mount whose process died: unmount it with fusermount3 -u \(mountpoint) (or umount -l as root) and try again"
                )
            }
            guard let resolved = realpath(mountpoint, nil) else { return }
            let path = String(cString: resolved)
            free(resolved)
            let mounts = (try? readMounts()) ?? []
            if let type = mounts.last(where: { $0.point == path })?.type, type.hasPrefix("fuse") {
                throw MountError(
                    "\(mountpoint) is already a FUSE mount (\(type)): unmount it first or choose another directory")
            }
        #endif
    }

    #if os(Linux)
        /// `/proc/self/mounts`: each mount's point (octal escapes undone) and type.
        private func readMounts() throws -> [(point: String, type: String)] {
            let fd = Glibc.open("/proc/self/mounts", O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return [] }
            defer { close(fd) }
            var bytes: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            while bytes.count < 64 << 20 {
                let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                bytes += buffer[0..<n]
            }
            func unescape(_ field: ArraySlice<UInt8>) -> String {
                var out: [UInt8] = []
                var i = field.startIndex
                while i < field.endIndex {
                    if field[i] == 0x5C, i + 3 < field.endIndex,
                        let v = UInt8(String(decoding: field[(i + 1)...(i + 3)], as: UTF8.self), radix: 8)
                    {
                        out.append(v)
                        i += 4
                    } else {
                        out.append(field[i])
                        i += 1
                    }
                }
                return String(decoding: out, as: UTF8.self)
            }
            return bytes.split(separator: 0x0A).compactMap { line in
                let fields = line.split(separator: 0x20)
                guard fields.count > 2 else { return nil }
                return (unescape(fields[1]), String(decoding: fields[2], as: UTF8.self))
            }
        }
    #endif

    /// Unmounts (lazily, so a process using the mount does not block it); ``serve(ready:)``
    /// then returns. Safe from any thread, and more than once.
    public func stop() {
        let go = state.withLock { s -> Bool in
            defer { s.stopping = true }
            return s.mounted && !s.stopping
        }
        guard go else { return }
        #if os(Linux)
            if geteuid() == 0 {
                _ = umount2(mountpoint, Int32(MNT_DETACH))
                return
            }
            // Not root: the setuid helper unmounts, as libfuse itself does.
            var pid: pid_t = 0
            let args = ["fusermount3", "-u", "-q", "-z", "--", mountpoint]
            var argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
            defer { for p in argv { free(p) } }
            if posix_spawnp(&pid, "fusermount3", nil, nil, &argv, environ) == 0 {
                var status: Int32 = 0
                _ = waitpid(pid, &status, 0)
            }
        #endif
    }

    // MARK: Requests (shared by the FUSE callbacks)

    fileprivate func attributes(_ path: [UInt8], _ st: inout stat) -> Int32 {
        do {
            fill(&st, try namespace.item(at: path))
            return 0
        } catch {
            return errorCode(error, path)
        }
    }

    fileprivate func fill(_ st: inout stat, _ item: SnapshotNamespace.Item) {
        st = stat()
        func time(_ ns: Int64) -> timespec {
            let s = ns >= 0 ? ns / 1_000_000_000 : (ns - 999_999_999) / 1_000_000_000
            return timespec(tv_sec: Int(s), tv_nsec: Int(ns - s * 1_000_000_000))
        }
        var mtime: Int64 = 0
        var ctime: Int64 = 0
        switch item {
        case .directory(let t):
            st.st_mode = S_IFDIR | 0o555
            st.st_nlink = 2
            mtime = t
            ctime = t
        case .symlink(let target, let t):
            st.st_mode = S_IFLNK | 0o777
            st.st_nlink = 1
            st.st_size = off_t(target.count)
            mtime = t
            ctime = t
        case .node(let n):
            let kind: mode_t
            switch n.type {
            case .file: kind = S_IFREG
            case .directory: kind = S_IFDIR
            case .symlink: kind = S_IFLNK
            case .fifo: kind = S_IFIFO
            case .characterDevice: kind = S_IFCHR
            case .blockDevice: kind = S_IFBLK
            case .socket: kind = S_IFSOCK
            }
            st.st_mode = kind | mode_t(n.mode & 0o7777)
            st.st_nlink = n.type == .directory ? 2 : nlink_t(max(n.links, 1))
            st.st_uid = options.ownerRoot ? 0 : uid_t(n.uid)
            st.st_gid = options.ownerRoot ? 0 : gid_t(n.gid)
            st.st_rdev = dev_t(n.rdev)
            st.st_size = n.type == .symlink ? off_t(n.linkTarget.count) : off_t(clamping: n.size)
            st.st_blocks = blkcnt_t((st.st_size + 511) / 512)
            mtime = n.mtimeNs
            ctime = n.ctimeNs
        }
        st.st_blksize = 4096
        st.st_mtim = time(mtime)
        st.st_atim = time(mtime)
        st.st_ctim = time(ctime)
    }

    fileprivate func link(_ path: [UInt8], _ buffer: UnsafeMutablePointer<CChar>, _ size: Int) -> Int32 {
        guard size > 0 else { return -EINVAL }
        do {
            let target: [UInt8]
            switch try namespace.item(at: path) {
            case .symlink(let t, _): target = t
            case .node(let n) where n.type == .symlink: target = n.linkTarget
            default: return -EINVAL
            }
            let n = min(target.count, size - 1)
            target.withUnsafeBytes { b in UnsafeMutableRawPointer(buffer).copyMemory(from: b.baseAddress!, byteCount: n)
            }
            buffer[n] = 0
            return 0
        } catch {
            return errorCode(error, path)
        }
    }

    fileprivate func listing(_ path: [UInt8]) -> Result<[[UInt8]], FuseCode> {
        do {
            return .success(try namespace.list(path).map(\.name))
        } catch {
            return .failure(FuseCode(errorCode(error, path)))
        }
    }

    fileprivate func open(_ path: [UInt8], flags: Int32) -> Result<UInt64, FuseCode> {
        guard flags & O_ACCMODE == O_RDONLY else { return .failure(FuseCode(-EROFS)) }
        do {
            guard case .node(let node) = try namespace.item(at: path) else { return .failure(FuseCode(-EISDIR)) }
            let file = try namespace.open(node)
            return .success(
                state.withLock { s in
                    let h = s.nextHandle
                    s.nextHandle += 1
                    s.files[h] = file
                    return h
                })
        } catch {
            return .failure(FuseCode(errorCode(error, path)))
        }
    }

    fileprivate func read(
        _ handle: UInt64, _ buffer: UnsafeMutablePointer<CChar>, _ size: Int, _ offset: Int64
    ) -> Int32 {
        guard let file = state.withLock({ $0.files[handle] }) else { return -EBADF }
        do {
            return Int32(try namespace.read(file, offset: offset, count: min(size, Int(Int32.max)), into: buffer))
        } catch {
            return errorCode(error, file.node.name)
        }
    }

    fileprivate func release(_ handle: UInt64) {
        _ = state.withLock { $0.files.removeValue(forKey: handle) }
    }

    /// An attribute's value (`name` given) or the names, NUL-terminated: its length when
    /// `size` is 0, else copied into `buffer`.
    fileprivate func xattr(
        _ path: [UInt8], name: [UInt8]?, _ buffer: UnsafeMutablePointer<CChar>?, _ size: Int
    ) -> Int32 {
        do {
            guard case .node(let node) = try namespace.item(at: path) else { return name == nil ? 0 : -ENODATA }
            let bytes: [UInt8]
            if let name {
                guard let x = node.xattrs.first(where: { $0.name == name }) else { return -ENODATA }
                bytes = x.value
            } else {
                bytes = node.xattrs.flatMap { $0.name + [0] }
            }
            guard size > 0 else { return Int32(bytes.count) }
            guard bytes.count <= size, let buffer else { return -ERANGE }
            bytes.withUnsafeBytes { b in
                if b.count > 0 { UnsafeMutableRawPointer(buffer).copyMemory(from: b.baseAddress!, byteCount: b.count) }
            }
            return Int32(bytes.count)
        } catch {
            return errorCode(error, path)
        }
    }

    private func errorCode(_ error: any Error, _ path: [UInt8]) -> Int32 {
        switch error as? SnapshotNamespace.Failure {
        case .notFound: return -ENOENT
        case .notDirectory: return -ENOTDIR
        case .isDirectory: return -EISDIR
        case .readFailed(let why):
            log("cannot read \(displayPath(path)): \(why)")
            return -EIO
        case nil:
            log("cannot read \(displayPath(path)): \(error)")
            return -EIO
        }
    }

    // MARK: libfuse

    #if canImport(CFuse3)
        private func serveFuse(ready: () -> Void) throws {
            var mountOptions = "ro,nosuid,nodev,fsname=cabackup,subtype=cabackup"
            if options.allowOther { mountOptions += ",allow_other" }
            if options.checkPermissions { mountOptions += ",default_permissions" }
            let words: [String] = ["cabackup", "-o", mountOptions]
            var argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) }
            defer { for p in argv { free(p) } }
            var ops = Self.operations()
            let me = Unmanaged.passUnretained(self).toOpaque()
            let fuse: OpaquePointer? = argv.withUnsafeMutableBufferPointer { args in
                var fuseArgs = fuse_args(argc: Int32(args.count), argv: args.baseAddress, allocated: 0)
                return fuse_new(&fuseArgs, &ops, MemoryLayout<fuse_operations>.size, me)
            }
            guard let fuse else { throw MountError("libfuse refused the mount options (see the message above)") }
            defer { fuse_destroy(fuse) }
            guard fuse_mount(fuse, mountpoint) == 0 else {
                throw MountError(
                    "cannot mount at \(mountpoint) (see the message above): is /dev/fuse there and fuse3 installed?")
            }
            state.withLock { $0.mounted = true }
            ready()
            // Ends when the kernel says the file system is gone: unmounted from outside or
            // by stop(). Requests are answered on this thread, one at a time.
            let rc = withExtendedLifetime(self) { fuse_loop(fuse) }
            state.withLock { $0.stopping = true }
            fuse_unmount(fuse)
            if rc != 0, rc != -EINTR {
                log("the FUSE session ended with an error: \(String(cString: strerror(rc < 0 ? -rc : rc)))")
            }
        }

        private static func operations() -> fuse_operations {
            var ops = fuse_operations()
            ops.`init` = { _, cfg in
                // The bytes of a path never change while mounted: the page cache may keep them.
                cfg?.pointee.kernel_cache = 1
                return fuse_get_context()!.pointee.private_data
            }
            ops.getattr = { path, st, _ in
                guard let st else { return -EINVAL }
                return fuseMount().attributes(cBytes(path), &st.pointee)
            }
            ops.readlink = { path, buffer, size in
                guard let buffer else { return -EINVAL }
                return fuseMount().link(cBytes(path), buffer, size)
            }
            ops.readdir = { path, buffer, filler, _, _, _ in
                guard let filler else { return -EINVAL }
                switch fuseMount().listing(cBytes(path)) {
                case .failure(let code): return code.value
                case .success(let names):
                    for name in [[0x2E], [0x2E, 0x2E]] + names {
                        let full = (name + [0]).withUnsafeBufferPointer { b in
                            b.withMemoryRebound(to: CChar.self) {
                                filler(buffer, $0.baseAddress, nil, 0, fuse_fill_dir_flags(0))
                            }
                        }
                        if full != 0 { break }
                    }
                    return 0
                }
            }
            ops.open = { path, fi in
                guard let fi else { return -EINVAL }
                switch fuseMount().open(cBytes(path), flags: fi.pointee.flags) {
                case .failure(let code): return code.value
                case .success(let handle):
                    fi.pointee.fh = handle
                    fi.pointee.keep_cache = 1
                    return 0
                }
            }
            ops.read = { _, buffer, size, offset, fi in
                guard let buffer, let fi else { return -EINVAL }
                return fuseMount().read(fi.pointee.fh, buffer, size, Int64(offset))
            }
            ops.release = { _, fi in
                if let fi { fuseMount().release(fi.pointee.fh) }
                return 0
            }
            ops.getxattr = { path, name, value, size in
                guard let name else { return -EINVAL }
                return fuseMount().xattr(cBytes(path), name: cBytes(name), value, size)
            }
            ops.listxattr = { path, list, size in
                fuseMount().xattr(cBytes(path), name: nil, list, size)
            }
            return ops
        }
    #endif
}

#if canImport(CFuse3)
    /// The mount a FUSE request is for (its private data).
    private func fuseMount() -> FuseMount {
        Unmanaged<FuseMount>.fromOpaque(fuse_get_context()!.pointee.private_data!).takeUnretainedValue()
    }

    private func cBytes(_ path: UnsafePointer<CChar>?) -> [UInt8] {
        guard let path else { return [] }
        return Array(UnsafeRawBufferPointer(start: path, count: strlen(path)))
    }
#endif
