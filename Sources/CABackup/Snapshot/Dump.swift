import CABackupCore
import CABackupFormat

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// How ``Repository/dump(_:path:archive:to:skipped:)`` writes an entry.
public enum DumpFormat: String, Sendable, CaseIterable {
    /// A file's bytes as they are; a directory as `tar`.
    case auto
    /// A POSIX (pax) tar stream of the entry and everything below it.
    case tar
    /// A zip archive of the entry and everything below it, ZIP64 where sizes, offsets or
    /// the number of entries need it. Entries are stored, not compressed (restic's zip
    /// deflates them): chunks are compressed in the repository, not in the archive.
    case zip
}

extension Repository {
    /// Writes the entry at `path` of `snapshot` to the descriptor `fd`: a file's bytes, or
    /// (a directory, or `.tar`) a pax tar stream of it and everything below, or (`.zip`)
    /// a zip archive of the same, names relative to its parent. Streams blob by blob:
    /// memory holds one blob and one directory listing at a time, whatever the sizes (a
    /// zip's central directory goes to an unlinked temporary file in `TMPDIR` past
    /// 1 MiB). `fd` need not be seekable. Every blob is verified.
    ///
    /// - Parameters:
    ///   - snapshot: The snapshot to read.
    ///   - path: An absolute path inside the snapshot; `/` is the whole snapshot.
    ///   - archive: A file's bytes or a tar stream (`.auto`), a tar stream, or a zip.
    ///   - fd: Where to write: a pipe, a file, any descriptor open for writing.
    ///   - skipped: Called with the path in the snapshot and the reason of each entry the
    ///     archive has no place for (a socket; devices and FIFOs in a zip).
    /// - Throws: ``CABackupError/pathNotInSnapshot(_:)``; damage found in a blob; an I/O
    ///   error writing to `fd` (a closed pipe, a full disk) or to the temporary file.
    public func dump(
        _ snapshot: Snapshot, path: String, archive: DumpFormat = .auto, to fd: Int32,
        skipped: (_ path: String, _ reason: String) -> Void = { _, _ in }
    ) throws {
        let entry: TreeEntry
        if absolutePath(path) == "/" {
            var root = Node(name: [], type: .directory)
            root.subtrees = [snapshot.tree]
            root.mode = 0o755
            entry = TreeEntry(path: [], node: root)
        } else {
            entry = try self.entry(in: snapshot, at: path)
        }
        let out = DumpOutput(fd: fd)
        switch archive {
        case .auto where entry.node.type == .file:
            try writeContent(entry.node) { try out.write($0) }
        case .auto, .tar:
            var writer = TarWriter(out: out)
            try walk(entry, into: &writer, skipped: skipped)
        case .zip:
            var writer = ZipWriter(out: out)
            try walk(entry, into: &writer, skipped: skipped)
        }
    }

    /// Writes `entry` and everything below it, depth first, into `writer`, then ends the
    /// archive. Names in the archive start at the entry's own name.
    private func walk<W: ArchiveWriter>(
        _ entry: TreeEntry, into writer: inout W, skipped: (String, String) -> Void
    ) throws {
        let base = entry.path.isEmpty ? 1 : entry.path.count - entry.node.name.count
        var hardLinks: [HardLinkKey: [UInt8]] = [:]
        func add(_ node: Node, path: [UInt8]) throws {
            let name = Array(path.dropFirst(base))
            var linkTarget: [UInt8]?
            if W.writesHardLinks, node.type == .file, node.links > 1 {
                let key = HardLinkKey(node)
                linkTarget = hardLinks[key]
                if linkTarget == nil { hardLinks[key] = name }
            }
            if !name.isEmpty {
                switch try writer.begin(node, name: name, hardLinkTo: linkTarget) {
                case .content:
                    try writeContent(node) { try writer.content($0) }
                    try writer.endContent()
                case .done:
                    break
                case .skipped(let reason):
                    skipped(displayPath(path), reason)
                }
            }
            if node.type == .directory {
                for child in try loadDirectory(node) { try add(child, path: path + [0x2F] + child.name) }
            }
        }
        try add(entry.node, path: entry.path)
        try writer.finish()
    }

    /// A file's content, blob after blob, each verified, handed to `write`.
    private func writeContent(_ node: Node, to write: ([UInt8]) throws -> Void) throws {
        var written: UInt64 = 0
        for id in node.content {
            let bytes = try loadBlob(id)
            try write(bytes)
            written += UInt64(bytes.count)
        }
        guard written == node.size else {
            throw CABackupError.corrupt(
                what: displayPath(node.name), reason: "content is \(written) bytes, the tree says \(node.size)")
        }
    }
}

/// What ``Repository/dump(_:path:archive:to:skipped:)`` walks a tree into: one archive
/// format. The walk decides the order and the names; the writer, the bytes.
protocol ArchiveWriter {
    /// Whether a second name of a hard-linked file is written as a link to the first
    /// (tar); otherwise (zip) every name gets a full copy of the content.
    static var writesHardLinks: Bool { get }
    /// Starts the entry of `node` named `name` (relative, no trailing `/`); `hardLinkTo`
    /// is the first name of the same file, when the writer links them.
    mutating func begin(_ node: Node, name: [UInt8], hardLinkTo: [UInt8]?) throws -> ArchiveEntry
    /// Bytes of the file begun with ``ArchiveEntry/content``, in order.
    mutating func content(_ bytes: [UInt8]) throws
    /// The end of the file's content.
    mutating func endContent() throws
    /// The end of the archive.
    mutating func finish() throws
}

/// What follows ``ArchiveWriter/begin(_:name:hardLinkTo:)``.
enum ArchiveEntry {
    /// The file's content, then ``ArchiveWriter/endContent()``.
    case content
    /// Nothing: the entry is written whole.
    case done
    /// Nothing: the format has no place for the entry.
    case skipped(reason: String)
}

/// `write(2)`, under a name a method called `write` does not hide.
private func systemWrite(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) -> Int {
    write(fd, buffer, count)
}

/// A descriptor written whole, retrying short writes.
struct DumpOutput {
    let fd: Int32

    func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { b in
            var off = 0
            while off < b.count {
                let n = systemWrite(fd, b.baseAddress! + off, b.count - off)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw ioError("write", "standard output")
                }
                off += n
            }
        }
    }
}

/// Writes a pax (POSIX.1-2001) tar stream: a ustar header per entry, preceded by a pax
/// extended header when the entry needs one (a long or non-ASCII name or link target,
/// a size past 8 GiB, nanosecond times, extended attributes as `SCHILY.xattr.NAME`, as
/// GNU tar and bsdtar read them).
struct TarWriter: ArchiveWriter {
    let out: DumpOutput
    /// The size of the file whose content is being written, for its padding.
    private var contentSize: UInt64 = 0

    init(out: DumpOutput) { self.out = out }

    static var writesHardLinks: Bool { true }

    mutating func begin(_ node: Node, name: [UInt8], hardLinkTo: [UInt8]?) throws -> ArchiveEntry {
        if node.type == .socket { return .skipped(reason: "tar has no sockets") }
        try header(node, name: name, linkTarget: hardLinkTo)
        guard node.type == .file, hardLinkTo == nil else { return .done }
        contentSize = node.size
        return .content
    }

    func content(_ bytes: [UInt8]) throws { try out.write(bytes) }

    func endContent() throws { try pad(Int64(contentSize)) }

    mutating func header(_ node: Node, name: [UInt8], linkTarget hardLinkTo: [UInt8]? = nil) throws {
        var type: UInt8
        var size: UInt64 = 0
        var link: [UInt8] = []
        switch node.type {
        case .file:
            if let hardLinkTo {
                type = UInt8(ascii: "1")
                link = hardLinkTo
            } else {
                type = UInt8(ascii: "0")
                size = node.size
            }
        case .directory: type = UInt8(ascii: "5")
        case .symlink:
            type = UInt8(ascii: "2")
            link = node.linkTarget
        case .characterDevice: type = UInt8(ascii: "3")
        case .blockDevice: type = UInt8(ascii: "4")
        case .fifo: type = UInt8(ascii: "6")
        case .socket: return  // tar has no sockets (GNU tar skips them too); begin says so
        }
        let fullName = node.type == .directory ? name + [0x2F] : name
        var pax: [(String, [UInt8])] = []
        if fullName.count > 100 || !fullName.allSatisfy({ $0 < 0x80 }) { pax.append(("path", fullName)) }
        if link.count > 100 || !link.allSatisfy({ $0 < 0x80 }) { pax.append(("linkpath", link)) }
        if size >= 0o77777777777 { pax.append(("size", Array(String(size).utf8))) }
        if node.mtimeNs % 1_000_000_000 != 0 || node.mtimeNs < 0 {
            pax.append(("mtime", Array(Self.paxTime(node.mtimeNs).utf8)))
        }
        for x in node.xattrs { pax.append(("SCHILY.xattr." + String(decoding: x.name, as: UTF8.self), x.value)) }
        if !pax.isEmpty {
            var body: [UInt8] = []
            for (key, value) in pax { body += Self.paxRecord(key, value) }
            var h = Self.ustar(
                name: Array("PaxHeaders/".utf8) + fullName.suffix(80), mode: 0o644, size: UInt64(body.count))
            Self.finishHeader(&h, type: UInt8(ascii: "x"))
            try out.write(h)
            try out.write(body)
            try pad(Int64(body.count))
        }
        var h = Self.ustar(name: fullName, mode: node.mode, size: size)
        Self.octal(&h, 108, 8, UInt64(node.uid))
        Self.octal(&h, 116, 8, UInt64(node.gid))
        Self.octal(&h, 136, 12, UInt64(max(0, node.mtimeNs / 1_000_000_000)))
        for (i, b) in link.prefix(100).enumerated() { h[157 + i] = b }
        if node.type == .characterDevice || node.type == .blockDevice {
            Self.octal(&h, 329, 8, UInt64(major(node.rdev)))
            Self.octal(&h, 337, 8, UInt64(minor(node.rdev)))
        }
        Self.finishHeader(&h, type: type)
        try out.write(h)
    }

    /// Zeros up to the next 512-byte boundary after `count` bytes of content.
    func pad(_ count: Int64) throws {
        let rest = Int(count % 512)
        if rest != 0 { try out.write([UInt8](repeating: 0, count: 512 - rest)) }
    }

    /// Two zero blocks end the archive.
    func finish() throws { try out.write([UInt8](repeating: 0, count: 1024)) }

    private static func ustar(name: [UInt8], mode: UInt32, size: UInt64) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: 512)
        for (i, b) in name.prefix(100).enumerated() { h[i] = b }
        octal(&h, 100, 8, UInt64(mode & 0o7777))
        octal(&h, 124, 12, min(size, 0o77777777777))
        for (i, b) in "ustar\u{0}00".utf8.enumerated() { h[257 + i] = b }
        return h
    }

    private static func finishHeader(_ h: inout [UInt8], type: UInt8) {
        h[156] = type
        for i in 148..<156 { h[i] = 0x20 }
        let sum = h.reduce(0) { $0 + Int($1) }
        octal(&h, 148, 7, UInt64(sum))
    }

    /// `value` in octal, zero-padded to `width - 1` digits and NUL-terminated.
    private static func octal(_ h: inout [UInt8], _ offset: Int, _ width: Int, _ value: UInt64) {
        let digits = Array(String(value, radix: 8).utf8)
        let padded = [UInt8](repeating: UInt8(ascii: "0"), count: max(0, width - 1 - digits.count)) + digits
        for (i, b) in padded.suffix(width - 1).enumerated() { h[offset + i] = b }
        h[offset + width - 1] = 0
    }

    /// One pax record: `LEN key=value\n`, where LEN counts the whole record.
    private static func paxRecord(_ key: String, _ value: [UInt8]) -> [UInt8] {
        let rest = Array(" \(key)=".utf8) + value + [0x0A]
        var length = rest.count + 1
        while String(length).utf8.count + rest.count > length { length += 1 }
        return Array(String(length).utf8) + rest
    }

    /// Seconds with nanoseconds, `1600000000.123456789` (negative times as pax has them).
    private static func paxTime(_ ns: Int64) -> String {
        let seconds = ns >= 0 ? ns / 1_000_000_000 : (ns - 999_999_999) / 1_000_000_000
        let fraction = ns - seconds * 1_000_000_000
        let digits = String(fraction)
        return "\(seconds)." + String(repeating: "0", count: 9 - digits.count) + digits
    }

    private func major(_ dev: UInt64) -> UInt32 {
        UInt32(truncatingIfNeeded: ((dev >> 32) & 0xFFFF_F000) | ((dev >> 8) & 0xFFF))
    }
    private func minor(_ dev: UInt64) -> UInt32 {
        UInt32(truncatingIfNeeded: ((dev >> 12) & 0xFFFF_FF00) | (dev & 0xFF))
    }
}
