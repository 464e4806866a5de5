import CABackupCore
import CZstd

/// Zstandard (libzstd), the codec behind compression byte 2: each blob is one standard
/// zstd frame, made and read with contexts a ``BlobCodec`` keeps for its thread, so a
/// blob costs no allocation in steady state.
package enum Zstd {
    /// The level new blobs are compressed at. Level 1 against 3 was measured on real data
    /// (docs/benchmarks.md, "zstd or LZ4"); the level is the writer's choice and not part
    /// of the format: any level decodes alike.
    package static let level: Int32 = 3

    /// The largest output ``Compressor/compress(_:into:)`` may need for `count` input bytes.
    package static func bound(_ count: Int) -> Int { ZSTD_compressBound(count) }

    /// A compression context, reused for every blob of one thread.
    package final class Compressor {
        private let context: OpaquePointer

        package init() {
            guard let c = ZSTD_createCCtx() else { fatalError("ZSTD_createCCtx failed: out of memory") }
            context = c
        }

        deinit { ZSTD_freeCCtx(context) }

        /// Compresses `src` into one frame in `dst`; returns its length, or `nil` when it
        /// does not fit (the caller then stores the blob raw).
        package func compress(
            _ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, level: Int32 = Zstd.level
        ) -> Int? {
            guard src.count > 0, dst.count > 0 else { return nil }
            let n = ZSTD_compressCCtx(context, dst.baseAddress, dst.count, src.baseAddress, src.count, level)
            return ZSTD_isError(n) != 0 ? nil : n
        }
    }

    /// A decompression context, reused for every blob of one thread.
    package final class Decompressor {
        private let context: OpaquePointer

        package init() {
            guard let c = ZSTD_createDCtx() else { fatalError("ZSTD_createDCtx failed: out of memory") }
            context = c
        }

        deinit { ZSTD_freeDCtx(context) }

        /// Decompresses exactly `dst.count` bytes (the raw length the pack header records)
        /// from `src`; `false` when the input is malformed or does not decode to exactly
        /// that length.
        ///
        /// The output never goes past `dst`, whatever content size the frame declares: a
        /// one-shot decompression writes straight into `dst` and fails when the frame
        /// needs more room, and it allocates nothing beyond the context.
        package func decompress(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer) -> Bool {
            guard src.count > 0, dst.count > 0 else { return false }
            let n = ZSTD_decompressDCtx(context, dst.baseAddress, dst.count, src.baseAddress, src.count)
            return ZSTD_isError(n) == 0 && n == dst.count
        }
    }
}
