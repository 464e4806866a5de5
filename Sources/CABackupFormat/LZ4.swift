import CABackupCore
import CLZ4

/// LZ4 block compression (liblz4), the codec behind compression byte 1.
package enum LZ4 {
    /// The largest output `compress` may need for `count` input bytes.
    package static func bound(_ count: Int) -> Int { Int(LZ4_compressBound(Int32(clamping: count))) }

    /// Compresses `src` into `dst`; returns the compressed length, or `nil` when the
    /// result would not fit (the caller then stores the blob raw).
    ///
    /// `acceleration` 1 is LZ4's default; higher trades ratio for speed.
    package static func compress(
        _ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, acceleration: Int32 = 1
    )
        -> Int?
    {
        guard src.count > 0, src.count <= Int(LZ4_MAX_INPUT_SIZE) else { return nil }
        let n = LZ4_compress_fast(
            src.baseAddress!.assumingMemoryBound(to: CChar.self),
            dst.baseAddress!.assumingMemoryBound(to: CChar.self),
            Int32(src.count), Int32(clamping: dst.count), acceleration)
        return n > 0 ? Int(n) : nil
    }

    /// Decompresses exactly `dst.count` bytes from `src`; `false` when the input is
    /// malformed or does not decode to exactly that length.
    package static func decompress(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer) -> Bool {
        guard src.count > 0, src.count <= Int(Int32.max), dst.count <= Int(Int32.max) else {
            return dst.count == 0 && src.count == 0
        }
        let n = LZ4_decompress_safe(
            src.baseAddress!.assumingMemoryBound(to: CChar.self),
            dst.baseAddress!.assumingMemoryBound(to: CChar.self),
            Int32(src.count), Int32(dst.count))
        return Int(n) == dst.count
    }
}
