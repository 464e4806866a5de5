import CABackupCore
/// Turns plaintext blobs into stored bytes and back, for one thread: the blob id (SHA-256,
/// or HMAC-SHA-256 under the repository's id key), compression with the repository's codec
/// (LZ4 or zstd), and in an encrypted repository AES-256-GCM sealing with a fresh nonce per
/// blob.
///
/// Stored bytes: `payload` in a plaintext repository, `nonce ‖ AES-GCM(payload) ‖ tag` in an
/// encrypted one, where `payload` is the compressed blob or, when compression does not
/// shrink it, the blob itself. Scratch space grows to the largest blob seen and is reused,
/// and so are the zstd contexts (made on first use).
package final class BlobCodec {
    let hasher: SHA256Hasher
    package let aead: AESGCM?
    /// The codec ``encode(_:)`` compresses with: the repository's.
    package let compression: RepositoryCompression
    private var scratch: UnsafeMutableRawPointer
    private var capacity = 0
    private var zstdCompressor: Zstd.Compressor?
    private var zstdDecompressor: Zstd.Decompressor?

    package init(keys: RepositoryKeys?, compression: RepositoryCompression = .lz4) {
        hasher = SHA256Hasher(hmacKey: keys?.id)
        aead = keys.map { AESGCM(key: $0.encryption) }
        self.compression = compression
        scratch = .allocate(byteCount: 1, alignment: 64)
    }

    deinit { scratch.deallocate() }

    /// The id of a plaintext blob.
    package func id(_ raw: UnsafeRawBufferPointer) -> BlobID { hasher.hash(raw) }

    /// The stored form of `raw` and how its payload is compressed. The bytes stay valid
    /// until the next call (they may be `raw` itself in a plaintext repository).
    package func encode(_ raw: UnsafeRawBufferPointer) -> (BlobCompression, UnsafeRawBufferPointer) {
        let front = aead == nil ? 0 : AESGCM.nonceSize
        let bound = compression == .zstd ? Zstd.bound(raw.count) : LZ4.bound(raw.count)
        let need = bound + AESGCM.overhead
        if need > capacity {
            scratch.deallocate()
            capacity = max(need, 2 * capacity)
            scratch = .allocate(byteCount: capacity, alignment: 64)
        }
        let room = UnsafeMutableRawBufferPointer(start: scratch + front, count: bound)
        var stored = BlobCompression.none
        var payload = raw
        let compressed: Int?
        switch compression {
        case .lz4: compressed = LZ4.compress(raw, into: room)
        case .zstd:
            if zstdCompressor == nil { zstdCompressor = Zstd.Compressor() }
            compressed = zstdCompressor!.compress(raw, into: room)
        }
        if let n = compressed, n < raw.count {
            stored = compression == .zstd ? .zstd : .lz4
            payload = UnsafeRawBufferPointer(start: scratch + front, count: n)
        }
        guard let aead else { return (stored, payload) }
        let n = aead.seal(payload, aad: SealedKind.blob, into: scratch)
        return (stored, UnsafeRawBufferPointer(start: scratch, count: n))
    }

    /// Decompresses a payload stored with `compression` into exactly `output.count` bytes,
    /// the raw length its pack header records; `false` when it does not decode to exactly
    /// that. Any codec this build knows is read, whatever the repository writes.
    package func decompress(
        _ payload: UnsafeRawBufferPointer, _ compression: BlobCompression, into output: UnsafeMutableRawBufferPointer
    ) -> Bool {
        switch compression {
        case .none:
            guard payload.count == output.count else { return false }
            if payload.count > 0, payload.baseAddress != UnsafeRawPointer(output.baseAddress) {
                output.baseAddress!.copyMemory(from: payload.baseAddress!, byteCount: payload.count)
            }
            return true
        case .lz4:
            return LZ4.decompress(payload, into: output)
        case .zstd:
            if zstdDecompressor == nil { zstdDecompressor = Zstd.Decompressor() }
            return zstdDecompressor!.decompress(payload, into: output)
        }
    }
}
