/// Appends little-endian integers, varints and byte strings to a growing buffer.
/// Used by every binary format in the repository (pack headers, trees).
package struct ByteWriter {
    package var bytes: [UInt8] = []

    @inlinable package init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }

    @inlinable package mutating func u8(_ v: UInt8) { bytes.append(v) }

    @inlinable package mutating func u32(_ v: UInt32) {
        bytes.append(UInt8(truncatingIfNeeded: v))
        bytes.append(UInt8(truncatingIfNeeded: v >> 8))
        bytes.append(UInt8(truncatingIfNeeded: v >> 16))
        bytes.append(UInt8(truncatingIfNeeded: v >> 24))
    }

    /// Unsigned LEB128.
    @inlinable package mutating func varint(_ v: UInt64) {
        var v = v
        while v >= 0x80 {
            bytes.append(UInt8(truncatingIfNeeded: v) | 0x80)
            v >>= 7
        }
        bytes.append(UInt8(v))
    }

    /// Zig-zag then LEB128, for signed values such as timestamps before 1970.
    @inlinable package mutating func svarint(_ v: Int64) {
        varint(UInt64(bitPattern: (v << 1) ^ (v >> 63)))
    }

    // Concrete overloads, not `some Sequence`: a generic one, called from the codecs in
    // another module, looked up type metadata at run time on every call.
    @inlinable package mutating func append(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    @inlinable package mutating func append(_ b: ArraySlice<UInt8>) { bytes.append(contentsOf: b) }
    @inlinable package mutating func append(_ b: UnsafeRawBufferPointer) { bytes.append(contentsOf: b) }

    package mutating func id(_ id: ObjectID) { id.withUnsafeBytes { bytes.append(contentsOf: $0) } }
}

/// Reads what ``ByteWriter`` writes, with bounds checks on every read: parsers built
/// on it throw ``FormatError`` on hostile input instead of trapping.
package struct ByteReader {
    // Cross-module inlinable: tree and pack parsing (in CABackupFormat) read a field at a
    // time, and a call per varint showed in profiles.
    @usableFromInline let bytes: [UInt8]
    @usableFromInline var offset: Int
    @usableFromInline let end: Int

    @inlinable package init(_ bytes: [UInt8], from start: Int = 0, to end: Int? = nil) {
        self.bytes = bytes
        self.offset = start
        self.end = end ?? bytes.count
    }

    @inlinable package var remaining: Int { end - offset }
    @inlinable package var isAtEnd: Bool { offset >= end }

    @inlinable package mutating func u8() throws -> UInt8 {
        guard offset < end else { throw FormatError.truncated }
        defer { offset += 1 }
        return bytes[offset]
    }

    @inlinable package mutating func u32() throws -> UInt32 {
        guard remaining >= 4 else { throw FormatError.truncated }
        defer { offset += 4 }
        return UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16
            | UInt32(bytes[offset + 3]) << 24
    }

    @inlinable package mutating func varint() throws -> UInt64 {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            let b = try u8()
            guard shift < 64 else { throw FormatError.malformed("varint longer than 64 bits") }
            result |= UInt64(b & 0x7F) << shift
            if b & 0x80 == 0 { return result }
            shift += 7
        }
    }

    @inlinable package mutating func svarint() throws -> Int64 {
        let u = try varint()
        return Int64(bitPattern: (u >> 1) ^ (0 &- (u & 1)))
    }

    /// A length-checked slice of `count` bytes.
    @inlinable package mutating func bytes(_ count: Int) throws -> ArraySlice<UInt8> {
        guard count >= 0, remaining >= count else { throw FormatError.truncated }
        defer { offset += count }
        return bytes[offset..<offset + count]
    }

    package mutating func id() throws -> ObjectID {
        guard remaining >= 32 else { throw FormatError.truncated }
        defer { offset += 32 }
        return bytes.withUnsafeBytes { ObjectID(UnsafeRawBufferPointer(rebasing: $0[offset..<offset + 32])) }
    }

    /// A sub-reader over the next `count` bytes; this reader skips past them.
    @inlinable package mutating func sub(_ count: Int) throws -> ByteReader {
        guard count >= 0, remaining >= count else { throw FormatError.truncated }
        defer { offset += count }
        return ByteReader(bytes, from: offset, to: offset + count)
    }
}

/// Why a stored object could not be parsed.
public enum FormatError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The object ends before a field it announces.
    case truncated
    /// A field holds a value the format does not allow.
    case malformed(String)

    public var description: String {
        switch self {
        case .truncated: return "truncated"
        case .malformed(let why): return why
        }
    }
}
