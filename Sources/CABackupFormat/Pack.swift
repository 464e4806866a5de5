import CABackupCore

/// What a blob holds.
public enum BlobType: UInt8, Sendable, Codable {
    /// A chunk of file content.
    case data = 0
    /// A directory listing (a tree blob).
    case tree = 1
}

/// How a blob's bytes are stored in its pack. One byte per blob, so codecs can be added
/// without a new pack format.
public enum BlobCompression: UInt8, Sendable, CustomStringConvertible {
    /// Stored as is (compression did not shrink it).
    case none = 0
    /// LZ4 block format; the raw length is in the pack header.
    case lz4 = 1
    /// One Zstandard frame, decoded into exactly the raw length the pack header records
    /// (the frame's own content size is not trusted). Written in repositories whose config
    /// says `compression: zstd` (format version 4).
    case zstd = 2

    /// The codec's name, for messages: `none`, `LZ4` or `zstd`.
    public var description: String {
        switch self {
        case .none: return "none"
        case .lz4: return "LZ4"
        case .zstd: return "zstd"
        }
    }
}

/// One blob's entry in a pack header.
public struct PackEntry: Sendable, Equatable {
    public var id: BlobID
    public var type: BlobType
    public var compression: BlobCompression
    /// Where the stored bytes start in the pack.
    public var offset: Int64
    /// The stored (possibly compressed) length.
    public var length: Int
    /// The length of the plaintext.
    public var rawLength: Int

    package init(
        id: BlobID, type: BlobType, compression: BlobCompression, offset: Int64, length: Int, rawLength: Int
    ) {
        self.id = id
        self.type = type
        self.compression = compression
        self.offset = offset
        self.length = length
        self.rawLength = rawLength
    }
}

/// Why a pack could not be read.
public enum PackError: Error, Sendable, CustomStringConvertible {
    /// The file is shorter than the smallest valid pack.
    case truncated(size: Int64)
    /// The trailer's magic bytes are wrong: not a cabackup pack.
    case badMagic
    /// The header length points outside the file.
    case headerOutOfRange(UInt32)
    /// The header does not parse or does not account for every byte.
    case badHeader(String)

    public var description: String {
        switch self {
        case .truncated(let size): return "pack of \(size) bytes is too short"
        case .badMagic: return "pack trailer has the wrong magic"
        case .headerOutOfRange(let n): return "pack header length \(n) points outside the file"
        case .badHeader(let why): return "pack header: \(why)"
        }
    }
}

/// The pack file format.
///
/// Layout: `blob₁ … blobₙ ‖ header ‖ UInt32 LE header length ‖ "CApk"`.
/// Plain header (flags 0): `version u8 (1) ‖ flags u8 ‖ count u32 LE ‖ count × entry`,
/// entry: `type u8 ‖ compression u8 ‖ length u32 LE ‖ raw length u32 LE ‖ id (32)`.
/// Sealed header (flags 1, encrypted repositories): `version ‖ flags ‖ count ‖
/// count × (length u32 LE ‖ id (32)) ‖ sealed details`, where the details are
/// `count × (type u8 ‖ compression u8 ‖ raw length u32 LE)` sealed with AES-256-GCM, the
/// clear part being additional data. So the storage side sees only keyed ids and stored
/// lengths, and can still check the framing and answer which ids it holds.
/// Blob offsets are implicit: blobs are stored back to back from offset 0 in header
/// order.
public enum PackFormat {
    static let magic: [UInt8] = Array("CApk".utf8)
    static let version: UInt8 = 1
    package static let trailerSize = 8
    static let entrySize = 42
    static let clearEntrySize = 36
    static let detailSize = 6
    static let headerFixedSize = 6
    static let flagSealed: UInt8 = 1
    /// A header larger than this is refused unread (a 16 MiB pack of 512 KiB chunks
    /// needs about 1.4 KiB; this leaves room for packs of tiny tree blobs).
    package static let maxHeaderSize = 16 << 20
    /// The most blobs a writer puts in one pack, whatever their size: a pack of tiny
    /// files fills its header, not its bytes (16 MiB of 8-byte files would need a 16 MiB
    /// header, more than ``maxHeaderSize``). At 42 bytes an entry this keeps a header
    /// under 1.4 MiB, and the writer's per-pack memory (entries, ids in flight) small.
    package static let maxBlobsPerPack = 32_768

    /// Whether a writer closes a pack holding `blobs` blobs of `bytes` bytes in all: the
    /// one rule the blob writer follows and prune's prediction of it repeats.
    package static func isFull(bytes: Int, blobs: Int, packSize: Int) -> Bool {
        bytes >= packSize || blobs >= maxBlobsPerPack
    }

    /// The size of what ``encodeHeader(_:aead:)`` returns for `count` entries.
    package static func encodedHeaderSize(count: Int, sealed: Bool) -> Int {
        headerFixedSize + count * entrySize + (sealed ? AESGCM.overhead : 0) + trailerSize
    }

    /// The header and trailer for blobs stored back to back in `entries` order; sealed
    /// when `aead` is given.
    package static func encodeHeader(_ entries: [PackEntry], aead: AESGCM? = nil) -> [UInt8] {
        var w = ByteWriter(capacity: encodedHeaderSize(count: entries.count, sealed: aead != nil))
        w.u8(version)
        w.u8(aead == nil ? 0 : flagSealed)
        w.u32(UInt32(entries.count))
        if let aead {
            for e in entries {
                w.u32(UInt32(e.length))
                w.id(e.id)
            }
            var details = ByteWriter(capacity: entries.count * detailSize)
            for e in entries {
                details.u8(e.type.rawValue)
                details.u8(e.compression.rawValue)
                details.u32(UInt32(e.rawLength))
            }
            w.append(aead.seal(details.bytes, aad: SealedKind.packHeader + w.bytes))
        } else {
            for e in entries {
                w.u8(e.type.rawValue)
                w.u8(e.compression.rawValue)
                w.u32(UInt32(e.length))
                w.u32(UInt32(e.rawLength))
                w.id(e.id)
            }
        }
        let headerLength = UInt32(w.bytes.count)
        w.u32(headerLength)
        w.append(magic)
        return w.bytes
    }

    /// Parses the trailer (last 8 bytes): the header length.
    package static func parseTrailer(_ trailer: [UInt8], packSize: Int64) throws -> Int {
        guard packSize >= Int64(trailerSize + headerFixedSize), trailer.count == trailerSize else {
            throw PackError.truncated(size: packSize)
        }
        guard Array(trailer[4..<8]) == magic else { throw PackError.badMagic }
        let n = UInt32(trailer[0]) | UInt32(trailer[1]) << 8 | UInt32(trailer[2]) << 16 | UInt32(trailer[3]) << 24
        guard Int(n) >= headerFixedSize, Int64(n) <= packSize - Int64(trailerSize), Int(n) <= maxHeaderSize else {
            throw PackError.headerOutOfRange(n)
        }
        return Int(n)
    }

    /// What anyone can read from a header without the key: whether it is sealed, and
    /// each blob's id and stored length, with offsets. Checks that the blobs exactly fill
    /// the space before the header.
    package static func parseClearHeader(
        _ header: [UInt8], packSize: Int64
    ) throws -> (
        sealed: Bool, entries: [(id: BlobID, offset: Int64, length: Int)]
    ) {
        var r = ByteReader(header)
        do {
            guard try r.u8() == version else { throw PackError.badHeader("unknown version") }
            let flags = try r.u8()
            guard flags == 0 || flags == flagSealed else { throw PackError.badHeader("unknown flags") }
            let sealed = flags == flagSealed
            let count = Int(try r.u32())
            let expected = sealed ? count * (clearEntrySize + detailSize) + AESGCM.overhead : count * entrySize
            guard expected == r.remaining else { throw PackError.badHeader("entry count does not match size") }
            var entries: [(id: BlobID, offset: Int64, length: Int)] = []
            entries.reserveCapacity(count)
            var offset: Int64 = 0
            for _ in 0..<count {
                let length: Int
                if sealed {
                    length = Int(try r.u32())
                } else {
                    _ = try r.u8()
                    _ = try r.u8()
                    length = Int(try r.u32())
                    _ = try r.u32()
                }
                entries.append((try r.id(), offset, length))
                offset += Int64(length)
            }
            guard offset + Int64(header.count + trailerSize) == packSize else {
                throw PackError.badHeader("blob lengths do not add up to the pack size")
            }
            return (sealed, entries)
        } catch let e as PackError {
            throw e
        } catch {
            throw PackError.badHeader("truncated")
        }
    }

    /// Parses a header of a pack of `packSize` bytes, checking that the blobs exactly
    /// fill the space before it. A sealed header needs `aead` (the repository's key).
    package static func parseHeader(_ header: [UInt8], packSize: Int64, aead: AESGCM? = nil) throws -> [PackEntry] {
        let (sealed, clear) = try parseClearHeader(header, packSize: packSize)
        var details = ByteReader(header)
        if sealed {
            guard let aead else { throw PackError.badHeader("sealed: it needs the repository key") }
            let clearSize = headerFixedSize + clear.count * clearEntrySize
            guard
                let plain = aead.open(
                    Array(header[clearSize...]), aad: SealedKind.packHeader + Array(header[0..<clearSize]))
            else {
                throw PackError.badHeader("sealed details fail authentication")
            }
            details = ByteReader(plain)
        } else {
            if aead != nil { throw PackError.badHeader("plaintext header in an encrypted repository") }
            _ = try? details.bytes(headerFixedSize)
        }
        do {
            var entries: [PackEntry] = []
            entries.reserveCapacity(clear.count)
            for c in clear {
                guard let type = BlobType(rawValue: try details.u8()) else {
                    throw PackError.badHeader("unknown blob type")
                }
                guard let comp = BlobCompression(rawValue: try details.u8()) else {
                    throw PackError.badHeader("unknown compression")
                }
                if !sealed { _ = try details.u32() }
                let raw = Int(try details.u32())
                if !sealed { _ = try details.bytes(32) }
                if sealed {
                    if comp == .none && raw + AESGCM.overhead != c.length {
                        throw PackError.badHeader("raw length differs for stored blob")
                    }
                    if c.length < AESGCM.overhead { throw PackError.badHeader("sealed blob shorter than its overhead") }
                } else if comp == .none && raw != c.length {
                    throw PackError.badHeader("raw length differs for stored blob")
                }
                entries.append(
                    PackEntry(
                        id: c.id, type: type, compression: comp, offset: c.offset, length: c.length, rawLength: raw))
            }
            return entries
        } catch let e as PackError {
            throw e
        } catch {
            throw PackError.badHeader("truncated")
        }
    }

    /// The header bytes of a pack of `size` bytes, found through its trailer; `read` reads
    /// `length` bytes at `offset` of the pack (from a storage, or a file being uploaded).
    package static func readHeaderBytes(
        size: Int64, read: (_ offset: Int64, _ length: Int, _ into: UnsafeMutableRawPointer) throws -> Void
    ) throws -> [UInt8] {
        guard size >= Int64(trailerSize) else { throw PackError.truncated(size: size) }
        // One read of the pack's end holds the trailer and, in most packs, the whole
        // header: over a network that is one round trip per pack instead of two.
        let tailLength = Int(min(size, Int64(headerReadAhead)))
        var tail = [UInt8](repeating: 0, count: tailLength)
        try tail.withUnsafeMutableBytes { try read(size - Int64(tailLength), tailLength, $0.baseAddress!) }
        let hlen = try parseTrailer(Array(tail.suffix(trailerSize)), packSize: size)
        if hlen + trailerSize <= tailLength {
            return Array(tail[(tailLength - trailerSize - hlen)..<(tailLength - trailerSize)])
        }
        var header = [UInt8](repeating: 0, count: hlen)
        try header.withUnsafeMutableBytes { try read(size - Int64(trailerSize + hlen), hlen, $0.baseAddress!) }
        return header
    }

    /// How many bytes of a pack's end are read to find its header (a header of 1,000 or
    /// so blobs fits).
    package static let headerReadAhead = 64 << 10
}
