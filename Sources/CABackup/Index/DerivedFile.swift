import CABackupCore
import CABackupFormat
/// Helpers for the files derived from the index and saved beside it (the absent-id filter,
/// the sorted id table): each begins with a magic string and the index's instance id.

/// The first `count` bytes of the open file `fd`, when they begin with `magic` and then
/// `instance`'s 32 bytes; `nil` when the file is shorter or names something else.
func readDerivedHeader(_ fd: Int32, count: Int, magic: [UInt8], instance: ObjectID, path: String) -> [UInt8]? {
    var header = [UInt8](repeating: 0, count: count)
    guard
        (try? header.withUnsafeMutableBytes({
            try preadFully(fd, into: $0.baseAddress!, count: count, offset: 0, path: path)
        })) != nil,
        header.starts(with: magic), Array(header[magic.count..<magic.count + 32]) == instance.bytes
    else { return nil }
    return header
}

/// The little-endian 64-bit word at byte `offset` of `bytes`.
func littleEndianWord(_ bytes: [UInt8], at offset: Int) -> UInt64 {
    bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
}
