import CABackupCore
import CABackupFormat

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The exclusions that need more than a path (``ExcludeRules``): an entry's size or file
/// system, or what its directory holds. restic's `--exclude-larger-than`,
/// `--one-file-system`, `--exclude-caches` and `--exclude-if-present`.
///
/// ``FileSystemWalker`` applies them, so a snapshot, its size scan and the listings made
/// ahead see the same entries. A directory's tag files are looked up in its sorted
/// listing (a binary search, no system call; the tag is opened only when a header must be
/// compared); sizes and devices come from the `lstat` the walk makes anyway. Without any
/// of the options the walk does one test per directory and per entry.
struct WalkFilter: Sendable {
    /// A file whose presence (starting with `header`, when not empty) excludes the rest
    /// of its directory.
    struct Tag: Sendable {
        let name: [UInt8]
        let header: [UInt8]
    }

    /// The tag of the Cache Directory Tagging Specification (https://bford.info/cachedir/).
    static let cacheTag = Tag(
        name: Array("CACHEDIR.TAG".utf8), header: Array("Signature: 8a477f597d28d172789f06886806bc55".utf8))

    var largerThan: Int64?
    var oneFileSystem = false
    var tags: [Tag] = []

    /// Whether entries are checked one by one (size or device).
    var checksEntries: Bool { largerThan != nil || oneFileSystem }

    /// Nothing is filtered.
    static let none = WalkFilter()

    init() {}

    /// The filter of a snapshot's options.
    /// - Throws: ``CABackupError/invalidArgument(_:)`` for an `--exclude-if-present` value
    ///   with no name, or a name that holds `/`, or a negative size.
    init(_ options: SnapshotOptions) throws {
        if let limit = options.excludeLargerThan {
            guard limit >= 0 else {
                throw CABackupError.invalidArgument("--exclude-larger-than takes a size of 0 or more, not \(limit)")
            }
            largerThan = limit
        }
        oneFileSystem = options.oneFileSystem
        if options.excludeCaches { tags.append(Self.cacheTag) }
        for spec in options.excludeIfPresent {
            let parts = spec.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            let name = String(parts[0])
            guard !name.isEmpty, !name.contains("/"), name != ".", name != ".." else {
                throw CABackupError.invalidArgument(
                    "--exclude-if-present takes a file name with an optional :HEADER, not '\(spec)'")
            }
            tags.append(Tag(name: Array(name.utf8), header: parts.count > 1 ? Array(parts[1].utf8) : []))
        }
    }

    /// Whether a stated entry of a walked directory on file system `device` is left out:
    /// a regular file over the size limit, or (with ``oneFileSystem``) anything but a
    /// directory on another file system. A directory on another file system is a mount
    /// point: kept, and walked as empty.
    func excludes(_ st: stat, fileSystem device: UInt64) -> Bool {
        let type = st.st_mode & S_IFMT
        if let largerThan, type == S_IFREG, Int64(st.st_size) > largerThan { return true }
        return oneFileSystem && type != S_IFDIR && UInt64(st.st_dev) != device
    }

    /// Drops from the listing of the open directory `fd` every entry a tag present in it
    /// excludes: all but the tag files themselves (restic keeps a tag file, and a tag
    /// excludes the other tags).
    func applyTags(to listing: inout DirectoryListing, fd: Int32) {
        var triggered: [[UInt8]] = []
        for tag in tags where listing.names.sortedContains(tag.name) && hasHeader(tag, fd: fd) {
            triggered.append(tag.name)
        }
        guard !triggered.isEmpty else { return }
        var names: [[UInt8]] = []
        var known: [PrefetchedEntry]? = listing.known == nil ? nil : []
        for (i, name) in listing.names.enumerated() where triggered.allSatisfy({ $0 == name }) {
            names.append(name)
            if let k = listing.known?[i] { known?.append(k) }
        }
        listing.names = names
        listing.known = known
    }

    /// Whether the tag file in directory `fd` starts with the tag's header (any entry of
    /// that name does when there is no header).
    private func hasHeader(_ tag: Tag, fd: Int32) -> Bool {
        if tag.header.isEmpty { return true }
        let file = withCPath(tag.name) { openat(fd, $0, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW) }
        if file < 0 { return false }
        defer { close(file) }
        var st = stat()
        guard fstat(file, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return false }
        var buffer = [UInt8](repeating: 0, count: tag.header.count)
        let n = buffer.withUnsafeMutableBytes { b in
            (try? readFully(file, into: b.baseAddress!, count: b.count, path: tag.name)) ?? -1
        }
        return n == tag.header.count && buffer == tag.header
    }
}

extension [[UInt8]] {
    /// Whether the array, sorted bytewise, holds `name` (a binary search).
    fileprivate func sortedContains(_ name: [UInt8]) -> Bool {
        var low = 0
        var high = count
        while low < high {
            let mid = (low + high) / 2
            if self[mid] == name { return true }
            if self[mid].lexicographicallyPrecedes(name) { low = mid + 1 } else { high = mid }
        }
        return false
    }
}

/// Reading lists of paths and patterns from files (`--files-from`, `--files-from-raw`,
/// `--exclude-file`), as restic reads them.
public enum ListFile {
    /// The patterns of an exclude file (`--exclude-file`): its lines without surrounding
    /// white space, empty lines and lines starting with `#` skipped.
    /// - Throws: ``CABackupError/unreadableSource(path:reason:)`` when it cannot be read;
    ///   ``CABackupError/invalidArgument(_:)`` when it is not UTF-8 text.
    public static func patterns(_ path: String) throws -> [String] {
        try lines(path).map { $0.trimmingSpaces() }.filter { !$0.isEmpty && !$0.hasPrefix("#") }
    }

    /// The paths of a path list (`--files-from`): one per line, exactly as written (only
    /// a `\r` before the `\n` is dropped), empty lines and lines starting with `#`
    /// skipped. Literal paths, not patterns.
    public static func paths(_ path: String) throws -> [String] {
        try lines(path).filter { !$0.isEmpty && !$0.hasPrefix("#") }
    }

    /// The NUL-separated paths of a file, exactly as they are (`--files-from-raw`); empty
    /// entries are skipped.
    public static func rawPaths(_ path: String) throws -> [String] {
        try contents(path).split(separator: 0, omittingEmptySubsequences: true).map { try text($0, in: path) }
    }

    private static func lines(_ path: String) throws -> [String] {
        try contents(path).split(separator: 0x0A, omittingEmptySubsequences: false).map { line in
            try text(line.last == 0x0D ? line.dropLast() : line, in: path)
        }
    }

    /// Snapshot paths are recorded as text: bytes that are not UTF-8 cannot name one.
    private static func text(_ bytes: ArraySlice<UInt8>, in path: String) throws -> String {
        guard let s = String(validating: bytes, as: UTF8.self) else {
            throw CABackupError.invalidArgument("\(path): an entry is not UTF-8 text: \(displayPath(bytes))")
        }
        return s
    }

    private static func contents(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw CABackupError.unreadableSource(path: path, reason: errnoDescription(errno)) }
        defer { close(fd) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw CABackupError.unreadableSource(path: path, reason: errnoDescription(errno))
            }
            if n == 0 { return out }
            out += buffer[0..<n]
        }
    }
}

extension String {
    fileprivate func trimmingSpaces() -> String {
        let scalars = unicodeScalars
        guard let first = scalars.firstIndex(where: { !$0.properties.isWhitespace }) else { return "" }
        let last = scalars.lastIndex(where: { !$0.properties.isWhitespace })!
        return String(scalars[first...last])
    }
}
