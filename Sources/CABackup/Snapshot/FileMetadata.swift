import CABackupCore
import CABackupFormat
import CFileMetadata

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// What a file carries besides its bytes and `stat`: extended attributes (with POSIX ACLs
/// and file capabilities), Linux inode flags and the holes of a sparse file. Read on
/// backup, applied on restore. Linux only for now: elsewhere a backup records none and a
/// restore skips them.
enum FileMetadata {
    /// Linux caps: 64 KiB of attribute names per file, 64 KiB per value.
    static let maxListSize = 1 << 16
    static let maxValueSize = 1 << 16
    /// A file with more data extents than this keeps only the first ones as its hint
    /// (holes after them are restored as data, the bytes the same).
    static let maxDataRanges = 1 << 16

    // MARK: Reading

    /// The extended attributes of an open file or directory, sorted by name. Unsupported
    /// by the file system, or unreadable: none.
    static func xattrs(fd: Int32) -> [ExtendedAttribute] {
        #if os(Linux)
            return collect(
                list: { flistxattr(fd, $0, $1) },
                get: { name, buffer, size in fgetxattr(fd, name, buffer, size) })
        #else
            return []
        #endif
    }

    /// The extended attributes of an entry that is not opened (a symlink, a FIFO, a
    /// device), without following a final symlink.
    static func xattrs(of entry: EntryRef) -> [ExtendedAttribute] {
        #if os(Linux)
            let path = procPath(entry)
            return withCPath(path) { p in
                collect(
                    list: { llistxattr(p, $0, $1) },
                    get: { name, buffer, size in lgetxattr(p, name, buffer, size) })
            }
        #else
            return []
        #endif
    }

    /// The kept inode flags (``InodeFlags/kept``) of an open file or directory; 0 where
    /// the file system has none.
    static func flags(fd: Int32) -> UInt32 {
        #if os(Linux)
            var value: Int32 = 0
            guard ioctl(fd, getFlagsRequest, &value) == 0 else { return 0 }
            return UInt32(bitPattern: value) & InodeFlags.kept
        #else
            return 0
        #endif
    }

    /// Whether a file or directory, not opened yet, has the nodump flag: it is opened
    /// without following a link, its flags read, and closed.
    static func isNodump(_ entry: EntryRef, directory: Bool) -> Bool {
        let flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | (directory ? O_DIRECTORY : 0)
        let fd = openAt(entry.fd, entry.relative, { open($0, flags) }, at: { openat($0, $1, flags) })
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return self.flags(fd: fd) & InodeFlags.nodump != 0
    }

    /// The data extents of an open regular file of `size` bytes, or `[]` when it has no
    /// holes (the usual case costs two `lseek`s). The file offset is left at 0.
    static func dataRanges(fd: Int32, size: Int64) -> [FileRange] {
        #if os(Linux)
            guard size > 0 else { return [] }
            defer { lseek(fd, 0, SEEK_SET) }
            let firstHole = lseek(fd, 0, seekHole)
            guard firstHole >= 0, firstHole < size else { return [] }
            var ranges: [FileRange] = []
            var offset: off_t = 0
            while offset < size && ranges.count < maxDataRanges {
                let data = lseek(fd, offset, seekData)
                if data < 0 || data >= size { break }  // ENXIO: holes to the end.
                var hole = lseek(fd, data, seekHole)
                if hole < 0 || hole > size { hole = off_t(size) }
                ranges.append(FileRange(offset: UInt64(data), length: UInt64(hole - data)))
                offset = hole
            }
            if ranges.count == maxDataRanges, offset < size {
                // The rest counts as data: restored with its bytes written.
                ranges.append(FileRange(offset: UInt64(offset), length: UInt64(size - Int64(offset))))
            }
            // A file that is all hole has no extents: restore leaves all-zero chunks
            // unwritten anyway, so it comes back as one hole.
            return ranges
        #else
            return []
        #endif
    }

    // MARK: Restoring

    /// Sets `attributes` on an open file or directory; returns one message per attribute
    /// that could not be set (the others are set regardless).
    static func apply(_ attributes: [ExtendedAttribute], fd: Int32) -> [String] {
        #if os(Linux)
            return attributes.compactMap { x in
                let rc = withCPath(x.name) { name in
                    x.value.withUnsafeBytes { fsetxattr(fd, name, $0.baseAddress, $0.count, 0) }
                }
                return rc == 0 ? nil : failure(x, errno)
            }
        #else
            return attributes.isEmpty ? [] : ["extended attributes are restored on Linux only"]
        #endif
    }

    /// Sets `attributes` on an entry named relative to an open directory, without
    /// following a final symlink.
    static func apply(_ attributes: [ExtendedAttribute], to entry: EntryRef) -> [String] {
        #if os(Linux)
            let path = procPath(entry)
            return attributes.compactMap { x in
                let rc = withCPath(path) { p in
                    withCPath(x.name) { name in
                        x.value.withUnsafeBytes { lsetxattr(p, name, $0.baseAddress, $0.count, 0) }
                    }
                }
                return rc == 0 ? nil : failure(x, errno)
            }
        #else
            return attributes.isEmpty ? [] : ["extended attributes are restored on Linux only"]
        #endif
    }

    /// Sets the kept inode flags on an open file or directory (after everything else: an
    /// immutable file cannot be changed, linked or have its times set). `nil` when set.
    static func apply(flags: UInt32, fd: Int32) -> String? {
        #if os(Linux)
            var current: Int32 = 0
            guard ioctl(fd, getFlagsRequest, &current) == 0 else {
                return "cannot set inode flags: \(errnoDescription(errno))"
            }
            var value = Int32(bitPattern: (UInt32(bitPattern: current) & ~InodeFlags.kept) | flags)
            if ioctl(fd, setFlagsRequest, &value) != 0 {
                return "cannot set inode flags: \(errnoDescription(errno))"
            }
            return nil
        #else
            return "inode flags are restored on Linux only"
        #endif
    }

    // MARK: Helpers

    #if os(Linux)
        /// `FS_IOC_GETFLAGS` and `FS_IOC_SETFLAGS` (`_IOR('f', 1, long)`, `_IOW('f', 2,
        /// long)`); the kernel reads and writes an `int` whatever the declared size.
        static let getFlagsRequest = UInt(MemoryLayout<Int>.size == 8 ? 0x8008_6601 : 0x8004_6601)
        static let setFlagsRequest = UInt(MemoryLayout<Int>.size == 8 ? 0x4008_6602 : 0x4004_6602)
        static let seekData: Int32 = 3
        static let seekHole: Int32 = 4

        /// A path that reaches `entry` without following its last component: through
        /// `/proc/self/fd` for an entry relative to an open directory (the directory
        /// descriptor is followed, the name is not).
        static func procPath(_ entry: EntryRef) -> [UInt8] {
            guard let directory = entry.directory else { return entry.relative }
            return Array("/proc/self/fd/\(directory.fd)/".utf8) + entry.relative
        }

        /// Lists, then reads each attribute, with buffers bounded by the kernel's limits.
        static func collect(
            list: (UnsafeMutablePointer<CChar>?, Int) -> Int,
            get: (UnsafePointer<CChar>, UnsafeMutableRawPointer?, Int) -> Int
        ) -> [ExtendedAttribute] {
            let size = list(nil, 0)
            guard size > 0 else { return [] }
            var names = [CChar](repeating: 0, count: min(max(size, 256), maxListSize))
            let n = names.withUnsafeMutableBufferPointer { list($0.baseAddress, $0.count) }
            guard n > 0 else { return [] }
            var result: [ExtendedAttribute] = []
            var value = [UInt8](repeating: 0, count: maxValueSize)
            for raw in names[0..<n].split(separator: 0, omittingEmptySubsequences: true) {
                let name = raw.map { UInt8(bitPattern: $0) }
                let length = withCPath(name) { p in
                    value.withUnsafeMutableBytes { get(p, $0.baseAddress, $0.count) }
                }
                if length < 0 { continue }  // Gone meanwhile, or not readable by us.
                result.append(ExtendedAttribute(name: name, value: Array(value[0..<length])))
            }
            return result.sorted { $0.name.lexicographicallyPrecedes($1.name) }
        }

        static func failure(_ x: ExtendedAttribute, _ code: Int32) -> String {
            "cannot restore extended attribute \(x.displayName): \(errnoDescription(code))"
        }
    #endif
}
