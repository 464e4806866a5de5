import CABackupCore
import CABackupFormat

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Writes a zip archive (PKWARE APPNOTE 6.3) to a stream that cannot seek, such as a pipe.
///
/// - A file's local header has general-purpose bit 3 set and no CRC or sizes; its content
///   follows, stored (method 0: chunks are compressed in the repository, and the archive
///   is not), then a data descriptor (with its signature) holding the CRC-32 computed
///   while streaming and the sizes. Directories (name ending in `/`) and symlinks (the
///   target as content, as Info-ZIP stores them) are written whole, without descriptor.
/// - ZIP64 where needed: a file of 4 GiB or more gets a ZIP64 extra field in its local
///   header (so readers expect 8-byte sizes in its descriptor) and a ZIP64 descriptor; an
///   entry whose sizes or offset pass 32 bits gets a ZIP64 extra field in the central
///   directory; 65535 entries or more, or a central directory past 32 bits, get the
///   ZIP64 end of central directory record and its locator.
/// - Names are raw bytes, flagged UTF-8 (bit 11) when they are valid UTF-8. Unix mode
///   and file type in the external attributes (made by Unix, so `unzip` and Python's
///   `zipfile` restore permissions and symlinks); the mtime as a DOS time (local time,
///   clamped to 1980–2107) and in the extended-timestamp extra field (0x5455); the owner
///   in the Info-ZIP Unix extra field (0x7875).
/// - A hard link's every name gets a full copy of the content: zip has no hard links.
///   Devices, FIFOs and sockets have no place in a zip and are skipped.
/// - The central directory grows as entries are written: in memory up to 1 MiB, then in
///   an unlinked temporary file, so memory stays bounded for millions of entries.
struct ZipWriter: ArchiveWriter {
    let out: DumpOutput
    /// Bytes written so far: the offset of the next local header.
    private var offset: UInt64 = 0
    private var entries: UInt64 = 0
    private let central: Spool
    /// The file whose content is being written.
    private var pending: Entry?
    private var crc = CRC32()
    private var size: UInt64 = 0

    /// What the central directory needs of an entry.
    private struct Entry {
        var name: [UInt8]
        var flags: UInt16
        var time: UInt16
        var date: UInt16
        var crc: UInt32 = 0
        var size: UInt64 = 0
        var offset: UInt64
        /// Unix type and mode in the high 16 bits; the MS-DOS directory bit.
        var attributes: UInt32
        var extra: [UInt8]
        var zip64InLocal: Bool
    }

    private static let limit32: UInt64 = 0xFFFF_FFFF

    /// - Parameter centralMemoryLimit: How much of the central directory stays in memory
    ///   before it moves to a temporary file.
    init(out: DumpOutput, centralMemoryLimit: Int = 1 << 20) {
        self.out = out
        central = Spool(memoryLimit: centralMemoryLimit)
    }

    static var writesHardLinks: Bool { false }

    mutating func begin(_ node: Node, name: [UInt8], hardLinkTo: [UInt8]?) throws -> ArchiveEntry {
        let typeBits: UInt32
        switch node.type {
        case .file: typeBits = UInt32(S_IFREG)
        case .directory: typeBits = UInt32(S_IFDIR)
        case .symlink: typeBits = UInt32(S_IFLNK)
        case .characterDevice: return .skipped(reason: "zip has no character devices")
        case .blockDevice: return .skipped(reason: "zip has no block devices")
        case .fifo: return .skipped(reason: "zip has no FIFOs")
        case .socket: return .skipped(reason: "zip has no sockets")
        }
        let fullName = node.type == .directory ? name + [0x2F] : name
        if fullName.count > 0xFFFF { return .skipped(reason: "zip has no names longer than 65535 bytes") }
        let seconds = node.mtimeNs >= 0 ? node.mtimeNs / 1_000_000_000 : (node.mtimeNs + 1) / 1_000_000_000 - 1
        let (time, date) = Self.dosTime(seconds)
        // Extended timestamp (mtime only, the same in both headers); Unix owner.
        var extra: [UInt8] = []
        if let mtime = Int32(exactly: seconds) {
            extra.le16(0x5455)
            extra.le16(5)
            extra.append(1)
            extra.le32(UInt32(bitPattern: mtime))
        }
        extra.le16(0x7875)
        extra.le16(11)
        extra += [1, 4]
        extra.le32(node.uid)
        extra.append(4)
        extra.le32(node.gid)
        let utf8: UInt16 = String(validating: fullName, as: UTF8.self) != nil ? 0x0800 : 0
        let msdosDirectory: UInt32 = node.type == .directory ? 0x10 : 0
        var entry = Entry(
            name: fullName, flags: utf8, time: time, date: date, offset: offset,
            attributes: (typeBits | (node.mode & 0o7777)) << 16 | msdosDirectory, extra: extra, zip64InLocal: false)
        if node.type == .file {
            // Streamed: CRC and sizes follow in the descriptor. The size the tree records
            // decides the descriptor's width before the content is read (a file whose
            // content differs from it fails the dump).
            entry.flags |= 0x0008
            entry.zip64InLocal = node.size >= Self.limit32
            try write(Self.localHeader(entry))
            pending = entry
            crc = CRC32()
            size = 0
            return .content
        }
        // Written whole: a directory has no content, a symlink its target.
        let content = node.type == .symlink ? node.linkTarget : []
        var whole = CRC32()
        content.withUnsafeBytes { whole.update($0) }
        entry.crc = whole.value
        entry.size = UInt64(content.count)
        try write(Self.localHeader(entry) + content)
        try addToCentral(entry)
        return .done
    }

    mutating func content(_ bytes: [UInt8]) throws {
        bytes.withUnsafeBytes { crc.update($0) }
        size += UInt64(bytes.count)
        try write(bytes)
    }

    mutating func endContent() throws {
        guard var entry = pending else { return }
        pending = nil
        entry.crc = crc.value
        entry.size = size
        var d: [UInt8] = []
        d.le32(0x0807_4B50)
        d.le32(entry.crc)
        if entry.zip64InLocal {
            d.le64(size)
            d.le64(size)
        } else {
            d.le32(UInt32(size))
            d.le32(UInt32(size))
        }
        try write(d)
        try addToCentral(entry)
    }

    mutating func finish() throws {
        let centralOffset = offset
        let centralSize = central.size
        try central.copy { try write($0) }
        let zip64 = entries >= 0xFFFF || centralOffset >= Self.limit32 || centralSize >= Self.limit32
        var end: [UInt8] = []
        if zip64 {
            let recordOffset = offset
            end.le32(0x0606_4B50)
            end.le64(44)
            end.le16(Self.madeBy)
            end.le16(45)
            end.le32(0)
            end.le32(0)
            end.le64(entries)
            end.le64(entries)
            end.le64(centralSize)
            end.le64(centralOffset)
            // The locator.
            end.le32(0x0706_4B50)
            end.le32(0)
            end.le64(recordOffset)
            end.le32(1)
        }
        end.le32(0x0605_4B50)
        end.le16(0)
        end.le16(0)
        end.le16(UInt16(min(entries, 0xFFFF)))
        end.le16(UInt16(min(entries, 0xFFFF)))
        end.le32(UInt32(min(centralSize, Self.limit32)))
        end.le32(UInt32(min(centralOffset, Self.limit32)))
        end.le16(0)
        try write(end)
    }

    private mutating func write(_ bytes: [UInt8]) throws {
        try out.write(bytes)
        offset += UInt64(bytes.count)
    }

    /// Version made by: Unix (3), specification 6.3.
    private static let madeBy: UInt16 = 3 << 8 | 63

    private static func localHeader(_ e: Entry) -> [UInt8] {
        var extra: [UInt8] = []
        if e.zip64InLocal {
            // Both sizes, zero here as in the header: they follow in the descriptor.
            extra.le16(0x0001)
            extra.le16(16)
            extra.le64(0)
            extra.le64(0)
        }
        extra += e.extra
        let streamed = e.flags & 0x0008 != 0
        var h: [UInt8] = []
        h.le32(0x0403_4B50)
        h.le16(e.zip64InLocal ? 45 : 20)
        h.le16(e.flags)
        h.le16(0)  // stored
        h.le16(e.time)
        h.le16(e.date)
        h.le32(streamed ? 0 : e.crc)
        let sizes: UInt32 = e.zip64InLocal ? 0xFFFF_FFFF : streamed ? 0 : UInt32(e.size)
        h.le32(sizes)
        h.le32(sizes)
        h.le16(UInt16(e.name.count))
        h.le16(UInt16(extra.count))
        return h + e.name + extra
    }

    private mutating func addToCentral(_ e: Entry) throws {
        // ZIP64 fields for what does not fit, in the order the format lists them.
        var zip64: [UInt8] = []
        if e.size >= Self.limit32 {
            zip64.le64(e.size)
            zip64.le64(e.size)
        }
        if e.offset >= Self.limit32 { zip64.le64(e.offset) }
        var extra: [UInt8] = []
        if !zip64.isEmpty {
            extra.le16(0x0001)
            extra.le16(UInt16(zip64.count))
            extra += zip64
        }
        extra += e.extra
        var h: [UInt8] = []
        h.le32(0x0201_4B50)
        h.le16(Self.madeBy)
        h.le16(zip64.isEmpty && !e.zip64InLocal ? 20 : 45)
        h.le16(e.flags)
        h.le16(0)
        h.le16(e.time)
        h.le16(e.date)
        h.le32(e.crc)
        h.le32(UInt32(min(e.size, Self.limit32)))
        h.le32(UInt32(min(e.size, Self.limit32)))
        h.le16(UInt16(e.name.count))
        h.le16(UInt16(extra.count))
        h.le16(0)  // comment
        h.le16(0)  // disk
        h.le16(0)  // internal attributes
        h.le32(e.attributes)
        h.le32(UInt32(min(e.offset, Self.limit32)))
        try central.append(h + e.name + extra)
        entries += 1
    }

    /// A DOS date and time (local time, 2-second steps), clamped to 1980–2107.
    static func dosTime(_ seconds: Int64) -> (time: UInt16, date: UInt16) {
        var t = time_t(clamping: seconds)
        var tm = tm()
        guard localtime_r(&t, &tm) != nil else { return (0, 1 << 5 | 1) }
        let year = Int(tm.tm_year) + 1900
        if year < 1980 { return (0, 1 << 5 | 1) }
        if year > 2107 { return (23 << 11 | 59 << 5 | 29, 127 << 9 | 12 << 5 | 31) }
        let time = UInt16(tm.tm_hour) << 11 | UInt16(tm.tm_min) << 5 | UInt16(min(tm.tm_sec, 59) / 2)
        let date = UInt16(year - 1980) << 9 | UInt16(tm.tm_mon + 1) << 5 | UInt16(tm.tm_mday)
        return (time, date)
    }
}

/// Bytes appended in order and read back once: in memory up to `memoryLimit`, then in a
/// temporary file (in `TMPDIR`, else `/tmp`) unlinked as soon as it is made.
final class Spool {
    private let memoryLimit: Int
    private var buffer: [UInt8] = []
    private var fd: Int32 = -1
    private(set) var size: UInt64 = 0

    init(memoryLimit: Int) { self.memoryLimit = memoryLimit }

    deinit { if fd >= 0 { close(fd) } }

    func append(_ bytes: [UInt8]) throws {
        buffer += bytes
        size += UInt64(bytes.count)
        if buffer.count >= memoryLimit { try spill() }
    }

    /// Hands everything appended, in order, to `body`, in pieces of at most 1 MiB.
    func copy(_ body: ([UInt8]) throws -> Void) throws {
        if fd < 0 {
            if !buffer.isEmpty { try body(buffer) }
            return
        }
        try spill()
        var piece = [UInt8](repeating: 0, count: 1 << 20)
        var at: UInt64 = 0
        while at < size {
            let n = piece.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, $0.count, off_t(at)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw ioError("read", "the temporary file of the zip's central directory")
            }
            if n == 0 {
                throw ioError("read", "the temporary file of the zip's central directory", EIO)
            }
            try body(n == piece.count ? piece : Array(piece.prefix(n)))
            at += UInt64(n)
        }
    }

    private func spill() throws {
        if fd < 0 {
            var dir = getenv("TMPDIR").map { String(cString: $0) } ?? ""
            if dir.isEmpty { dir = "/tmp" }
            var template = Array((dir + "/cabackup-zip-XXXXXX").utf8CString)
            fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
            if fd < 0 { throw ioError("create a temporary file in", dir) }
            _ = template.withUnsafeBufferPointer { unlink($0.baseAddress!) }
        }
        try DumpOutput(fd: fd).write(buffer)
        buffer.removeAll(keepingCapacity: true)
    }
}

/// CRC-32 as zip, gzip and PNG use it (reflected polynomial 0xEDB88320), eight bytes
/// at a time through eight tables; a run of zero bytes (a sparse file's holes) in one
/// multiplication by x^(8n) modulo the polynomial, as zlib's `crc32_combine` does.
struct CRC32 {
    /// The register: the CRC before its final inversion.
    private var register: UInt32 = 0xFFFF_FFFF

    var value: UInt32 { ~register }

    private static let polynomial: UInt32 = 0xEDB8_8320

    private static let table: [UInt32] = {
        var t = [UInt32](repeating: 0, count: 8 * 256)
        for i in 0..<256 {
            var c = UInt32(i)
            for _ in 0..<8 { c = c & 1 != 0 ? polynomial ^ (c >> 1) : c >> 1 }
            t[i] = c
        }
        for k in 1..<8 {
            for i in 0..<256 {
                let previous = t[(k - 1) * 256 + i]
                t[k * 256 + i] = (previous >> 8) ^ t[Int(previous & 0xFF)]
            }
        }
        return t
    }()

    /// x^(2^k) modulo the polynomial, k = 0…31 (bit 31 is x^0).
    private static let powers: [UInt32] = {
        var p: UInt32 = 1 << 30
        var table = [p]
        for _ in 1..<32 {
            p = multiply(p, p)
            table.append(p)
        }
        return table
    }()

    private static let zeros = [UInt8](repeating: 0, count: 4096)

    mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress else { return }
        var at = 0
        while at < bytes.count {
            var zeroRun = 0
            Self.zeros.withUnsafeBytes { z in
                while bytes.count - at - zeroRun >= z.count, memcmp(base + at + zeroRun, z.baseAddress!, z.count) == 0 {
                    zeroRun += z.count
                }
            }
            if zeroRun > 0 {
                register = Self.multiply(Self.xPower8n(UInt64(zeroRun)), register)
                at += zeroRun
                continue
            }
            let n = min(4096, bytes.count - at)
            fold(UnsafeRawBufferPointer(start: base + at, count: n))
            at += n
        }
    }

    /// The table-driven update, eight bytes at a time.
    private mutating func fold(_ bytes: UnsafeRawBufferPointer) {
        var c = register
        Self.table.withUnsafeBufferPointer { t in
            var i = 0
            let n = bytes.count
            while n - i >= 8 {
                let lo = c ^ UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: i, as: UInt32.self))
                let hi = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: i + 4, as: UInt32.self))
                c =
                    t[7 * 256 + Int(lo & 0xFF)] ^ t[6 * 256 + Int((lo >> 8) & 0xFF)]
                    ^ t[5 * 256 + Int((lo >> 16) & 0xFF)] ^ t[4 * 256 + Int(lo >> 24)]
                    ^ t[3 * 256 + Int(hi & 0xFF)] ^ t[2 * 256 + Int((hi >> 8) & 0xFF)]
                    ^ t[256 + Int((hi >> 16) & 0xFF)] ^ t[Int(hi >> 24)]
                i += 8
            }
            while i < n {
                c = t[Int((c ^ UInt32(bytes[i])) & 0xFF)] ^ (c >> 8)
                i += 1
            }
        }
        register = c
    }

    /// a·b modulo the polynomial, both reflected (bit 31 is x^0).
    private static func multiply(_ a: UInt32, _ b: UInt32) -> UInt32 {
        var b = b
        var m: UInt32 = 1 << 31
        var p: UInt32 = 0
        while m != 0 {
            if a & m != 0 { p ^= b }
            m >>= 1
            b = b & 1 != 0 ? (b >> 1) ^ polynomial : b >> 1
        }
        return p
    }

    /// x^(8n) modulo the polynomial: n zero bytes' worth of shifting.
    private static func xPower8n(_ n: UInt64) -> UInt32 {
        var p: UInt32 = 1 << 31
        var n = n
        var k = 3
        while n != 0 {
            if n & 1 != 0 { p = multiply(powers[k & 31], p) }
            n >>= 1
            k += 1
        }
        return p
    }
}

extension [UInt8] {
    fileprivate mutating func le16(_ v: UInt16) { append(contentsOf: [UInt8(v & 0xFF), UInt8(v >> 8)]) }
    fileprivate mutating func le32(_ v: UInt32) { for i in 0..<4 { append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    fileprivate mutating func le64(_ v: UInt64) { for i in 0..<8 { append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
}
