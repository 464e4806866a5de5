import CABackupCore

/// The kind of a file-system entry.
public enum NodeType: UInt8, Sendable, CustomStringConvertible {
    case file = 1
    case directory = 2
    case symlink = 3
    case fifo = 4
    case characterDevice = 5
    case blockDevice = 6
    case socket = 7

    public var description: String {
        switch self {
        case .file: return "file"
        case .directory: return "dir"
        case .symlink: return "symlink"
        case .fifo: return "fifo"
        case .characterDevice: return "chardev"
        case .blockDevice: return "blockdev"
        case .socket: return "socket"
        }
    }
}

/// One entry of a directory in a snapshot: a file, directory, symlink or special file,
/// with its metadata and, for files, the ids of its content chunks in order.
public struct Node: Sendable, Equatable {
    /// The entry's name: raw bytes, not necessarily UTF-8, never containing `/` or NUL.
    public var name: [UInt8]
    public var type: NodeType
    /// Permission bits, including setuid, setgid and sticky (`st_mode & 0o7777`).
    public var mode: UInt32 = 0
    public var uid: UInt32 = 0
    public var gid: UInt32 = 0
    /// Size in bytes (regular files).
    public var size: UInt64 = 0
    /// Modification time, nanoseconds since 1970.
    public var mtimeNs: Int64 = 0
    /// Status change time, nanoseconds since 1970.
    public var ctimeNs: Int64 = 0
    public var inode: UInt64 = 0
    public var device: UInt64 = 0
    /// Hard link count at backup time; entries with `links > 1` sharing `device` and
    /// `inode` are restored as hard links.
    public var links: UInt64 = 1
    /// Device number for character and block devices.
    public var rdev: UInt64 = 0
    /// Symlink target bytes.
    public var linkTarget: [UInt8] = []
    /// Content chunk ids in file order.
    public var content: [BlobID] = []
    /// For directories: the tree blobs holding its entries, in name order (one for
    /// most directories; large directories are split).
    public var subtrees: [BlobID] = []
    /// Extended attributes, sorted by name: `user.*`, and where the reader was permitted,
    /// `security.*` (file capabilities, SELinux labels), `trusted.*` and `system.*`
    /// (POSIX ACLs are `system.posix_acl_access` and `system.posix_acl_default`).
    public var xattrs: [ExtendedAttribute] = []
    /// For a file with holes: its data extents, in order. The rest of `0..<size` is
    /// holes. Empty for a file without holes. A hint for restore only: `content` covers
    /// the whole file, holes included (their zero chunks deduplicate).
    public var dataRanges: [FileRange] = []
    /// Linux inode flags kept (``InodeFlags/kept``): immutable, append-only, nodump.
    public var flags: UInt32 = 0

    public init(name: [UInt8], type: NodeType) {
        self.name = name
        self.type = type
    }

    /// The name as text: invalid UTF-8 is escaped as `\xNN`.
    public var displayName: String { displayPath(name) }
}

/// One extended attribute: its full name (with the namespace, e.g. `user.comment`) and
/// its value, both raw bytes.
public struct ExtendedAttribute: Sendable, Equatable {
    public var name: [UInt8]
    public var value: [UInt8]

    public init(name: [UInt8], value: [UInt8]) {
        self.name = name
        self.value = value
    }

    /// The name as text.
    public var displayName: String { displayPath(name) }
}

/// A range of bytes of a file.
public struct FileRange: Sendable, Equatable {
    public var offset: UInt64
    public var length: UInt64

    public init(offset: UInt64, length: UInt64) {
        self.offset = offset
        self.length = length
    }
}

/// The Linux inode flags (`FS_IOC_GETFLAGS`) a snapshot keeps.
public enum InodeFlags {
    /// `FS_IMMUTABLE_FL`: no change, rename, link or removal, even by root.
    public static let immutable: UInt32 = 0x10
    /// `FS_APPEND_FL`: written only by appending.
    public static let appendOnly: UInt32 = 0x20
    /// `FS_NODUMP_FL`: backup programs may skip it (`snapshot --exclude-nodump`).
    public static let nodump: UInt32 = 0x40
    /// The flags stored and restored; others (compression, no-COW, …) belong to the file
    /// system the file lives on, not to the file.
    public static let kept: UInt32 = immutable | appendOnly | nodump
}

/// Tree blob encoding: how a directory's entries are stored.
///
/// Layout: `version u8 (1) ‖ entry*`, entry: `varint length ‖ field*`,
/// field: `varint tag ‖ varint length ‖ value`. Integers are varints (signed ones
/// zig-zag); names and link targets are raw bytes; `content` and `subtrees` are ids
/// back to back. Readers skip fields with tags they do not know, so new fields
/// (extended attributes, sparse ranges) can be added without breaking older readers.
public enum TreeCodec {
    static let version: UInt8 = 1

    enum Tag: UInt64 {
        case name = 1, type, mode, uid, gid, size, mtime, ctime, inode, device, links, rdev, linkTarget, content,
            subtrees, xattrs, dataRanges, flags
    }

    /// At most this many extended attributes per entry, and data ranges per file, are
    /// accepted from a tree (Linux lists at most 64 KiB of attribute names).
    static let maxXattrs = 1 << 14
    static let maxDataRanges = 1 << 20

    /// A tree blob is closed at this many encoded bytes; a larger directory is split
    /// over several tree blobs so one blob stays bounded.
    public static let partLimit = 1 << 20

    /// Encodes one node as an entry (length-prefixed).
    static func encode(_ n: Node, into w: inout ByteWriter) {
        // Fields are written straight into one buffer; no allocation per field (an
        // unchanged re-snapshot re-encodes every directory, so this is a hot path).
        var f = ByteWriter(capacity: 96 + n.name.count + n.content.count * 32)
        func field(_ tag: Tag, _ value: UInt64) {
            f.varint(tag.rawValue)
            f.varint(UInt64(varintSize(value)))
            f.varint(value)
        }
        func field(_ tag: Tag, signed value: Int64) {
            let zigzag = UInt64(bitPattern: (value << 1) ^ (value >> 63))
            field(tag, zigzag)
        }
        func field(_ tag: Tag, bytes: [UInt8]) {
            f.varint(tag.rawValue)
            f.varint(UInt64(bytes.count))
            f.append(bytes)
        }
        func field(_ tag: Tag, ids: [BlobID]) {
            f.varint(tag.rawValue)
            f.varint(UInt64(ids.count * 32))
            for id in ids { f.id(id) }
        }
        field(.name, bytes: n.name)
        field(.type, UInt64(n.type.rawValue))
        field(.mode, UInt64(n.mode))
        field(.uid, UInt64(n.uid))
        field(.gid, UInt64(n.gid))
        field(.mtime, signed: n.mtimeNs)
        field(.ctime, signed: n.ctimeNs)
        field(.inode, n.inode)
        field(.device, n.device)
        if n.links != 1 { field(.links, n.links) }
        switch n.type {
        case .file:
            field(.size, n.size)
            field(.content, ids: n.content)
        case .directory:
            field(.subtrees, ids: n.subtrees)
        case .symlink:
            field(.linkTarget, bytes: n.linkTarget)
        case .characterDevice, .blockDevice:
            field(.rdev, n.rdev)
        case .fifo, .socket:
            break
        }
        if !n.xattrs.isEmpty {
            var v = ByteWriter()
            for x in n.xattrs {
                v.varint(UInt64(x.name.count))
                v.append(x.name)
                v.varint(UInt64(x.value.count))
                v.append(x.value)
            }
            field(.xattrs, bytes: v.bytes)
        }
        if !n.dataRanges.isEmpty && n.type == .file {
            var v = ByteWriter()
            for r in n.dataRanges {
                v.varint(r.offset)
                v.varint(r.length)
            }
            field(.dataRanges, bytes: v.bytes)
        }
        if n.flags != 0 { field(.flags, UInt64(n.flags)) }
        w.varint(UInt64(f.bytes.count))
        w.append(f.bytes)
    }

    /// The number of bytes of a LEB128 varint.
    @inline(__always)
    static func varintSize(_ v: UInt64) -> Int {
        v == 0 ? 1 : (64 - v.leadingZeroBitCount + 6) / 7
    }

    /// Encodes a directory's entries (already sorted by name) into one or more tree
    /// blobs of at most ``partLimit`` bytes each (a single huge entry gets its own).
    package static func encodeParts(_ nodes: [Node]) -> [[UInt8]] {
        var encoder = TreeEncoder()
        var parts = nodes.compactMap { encoder.append($0) }
        parts.append(encoder.finish())
        return parts
    }

    /// Decodes one tree blob.
    public static func decode(_ bytes: [UInt8]) throws -> [Node] {
        var r = ByteReader(bytes)
        guard try r.u8() == version else { throw FormatError.malformed("unknown tree version") }
        var nodes: [Node] = []
        while !r.isAtEnd {
            let len = try r.varint()
            guard len <= UInt64(r.remaining) else { throw FormatError.truncated }
            var e = try r.sub(Int(len))
            nodes.append(try decodeEntry(&e))
        }
        return nodes
    }

    private static func decodeEntry(_ r: inout ByteReader) throws -> Node {
        var n = Node(name: [], type: .file)
        var sawName = false
        var sawType = false
        while !r.isAtEnd {
            let tag = try r.varint()
            let len = try r.varint()
            guard len <= UInt64(r.remaining) else { throw FormatError.truncated }
            var v = try r.sub(Int(len))
            func uint() throws -> UInt64 { try v.varint() }
            switch Tag(rawValue: tag) {
            case .name:
                n.name = Array(try v.bytes(v.remaining))
                sawName = true
            case .type:
                let raw = try uint()
                guard raw <= 0xFF, let t = NodeType(rawValue: UInt8(raw)) else {
                    throw FormatError.malformed("unknown node type")
                }
                n.type = t
                sawType = true
            case .mode: n.mode = UInt32(truncatingIfNeeded: try uint())
            case .uid: n.uid = UInt32(truncatingIfNeeded: try uint())
            case .gid: n.gid = UInt32(truncatingIfNeeded: try uint())
            case .size: n.size = try uint()
            case .mtime: n.mtimeNs = try v.svarint()
            case .ctime: n.ctimeNs = try v.svarint()
            case .inode: n.inode = try uint()
            case .device: n.device = try uint()
            case .links: n.links = try uint()
            case .rdev: n.rdev = try uint()
            case .linkTarget: n.linkTarget = Array(try v.bytes(v.remaining))
            case .content:
                guard v.remaining % 32 == 0 else { throw FormatError.malformed("content length not a multiple of 32") }
                n.content.reserveCapacity(v.remaining / 32)
                while !v.isAtEnd { n.content.append(try v.id()) }
            case .subtrees:
                guard v.remaining % 32 == 0 else { throw FormatError.malformed("subtree length not a multiple of 32") }
                while !v.isAtEnd { n.subtrees.append(try v.id()) }
            case .xattrs:
                while !v.isAtEnd {
                    guard n.xattrs.count < maxXattrs else {
                        throw FormatError.malformed("too many extended attributes")
                    }
                    let nameLength = try v.varint()
                    guard nameLength > 0, nameLength <= UInt64(v.remaining) else { throw FormatError.truncated }
                    let name = Array(try v.bytes(Int(nameLength)))
                    let valueLength = try v.varint()
                    guard valueLength <= UInt64(v.remaining) else { throw FormatError.truncated }
                    let value = Array(try v.bytes(Int(valueLength)))
                    guard !name.contains(0), n.xattrs.last.map({ $0.name.lexicographicallyPrecedes(name) }) ?? true
                    else {
                        throw FormatError.malformed("extended attributes not sorted, repeated or with a NUL in a name")
                    }
                    n.xattrs.append(ExtendedAttribute(name: name, value: value))
                }
            case .dataRanges:
                var end: UInt64 = 0
                while !v.isAtEnd {
                    guard n.dataRanges.count < maxDataRanges else {
                        throw FormatError.malformed("too many data ranges")
                    }
                    let offset = try v.varint()
                    let length = try v.varint()
                    guard offset >= end, length > 0, offset <= UInt64.max - length else {
                        throw FormatError.malformed("data ranges overlap or are out of order")
                    }
                    end = offset + length
                    n.dataRanges.append(FileRange(offset: offset, length: length))
                }
            case .flags: n.flags = UInt32(truncatingIfNeeded: try uint()) & InodeFlags.kept
            case nil:
                break  // A field from a newer version: skipped.
            }
        }
        guard sawName, sawType else { throw FormatError.malformed("entry without name or type") }
        return n
    }
}

extension TreeCodec {
    /// Encodes entries as one tree blob whatever its size (the snapshot's root tree,
    /// which holds only the top-level path components).
    package static func encodeSingle(_ nodes: [Node]) -> [UInt8] {
        var encoder = TreeEncoder(splitting: false)
        for n in nodes { _ = encoder.append(n) }
        return encoder.finish()
    }
}

/// Encodes a directory's entries one at a time, so a wide directory is never held as
/// a list of nodes: each tree blob is handed out as soon as the next entry does not fit
/// in it. The blobs are the same bytes ``TreeCodec/encodeParts(_:)`` makes of the whole
/// list.
package struct TreeEncoder {
    /// The blob being filled; allocated by the first entry (a directory waiting to be
    /// encoded holds no buffer).
    private var writer: ByteWriter?
    private var count = 0
    private let limit: Int

    /// - Parameter splitting: close a blob at ``TreeCodec/partLimit`` bytes; `false`
    ///   makes one blob whatever its size (the snapshot's root tree).
    package init(splitting: Bool = true) {
        limit = splitting ? TreeCodec.partLimit : .max
    }

    private static func start() -> ByteWriter {
        var w = ByteWriter(capacity: 4096)
        w.u8(TreeCodec.version)
        return w
    }

    /// Adds the next entry (entries come sorted by name); returns the finished blob
    /// when this entry starts a new one.
    package mutating func append(_ node: Node) -> [UInt8]? {
        var e = ByteWriter()
        TreeCodec.encode(node, into: &e)
        var w = writer ?? Self.start()
        writer = nil
        var full: [UInt8]?
        if count > 0 && w.bytes.count + e.bytes.count > limit {
            full = w.bytes
            w = Self.start()
            count = 0
        }
        w.append(e.bytes)
        count += 1
        writer = w
        return full
    }

    /// The last blob (with no entries at all, an empty directory's tree); the encoder
    /// starts over after it.
    package mutating func finish() -> [UInt8] {
        defer {
            writer = nil
            count = 0
        }
        return writer?.bytes ?? [TreeCodec.version]
    }
}
