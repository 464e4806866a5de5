import CABackupCore
/// Turns plaintext blobs into stored bytes and back, for one thread: the blob id (SHA-256,
/// or HMAC-SHA-256 under the repository's id key), LZ4 compression, and in an encrypted
/// repository AES-256-GCM sealing with a fresh nonce per blob.
///
/// Stored bytes: `payload` in a plaintext repository, `nonce ‖ AES-GCM(payload) ‖ tag` in an
/// encrypted one, where `payload` is the LZ4 block or, when LZ4 does not shrink the blob,
/// the blob itself. Scratch space grows to the largest blob seen and is reused.
package final class BlobCodec {
    let hasher: SHA256Hasher
    package let aead: AESGCM?
    private var scratch: UnsafeMutableRawPointer
    private var capacity = 0

    package init(keys: RepositoryKeys?) {
        hasher = SHA256Hasher(hmacKey: keys?.id)
        aead = keys.map { AESGCM(key: $0.encryption) }
        scratch = .allocate(byteCount: 1, alignment: 64)
    }

    deinit { scratch.deallocate() }

    /// The id of a plaintext blob.
    package func id(_ raw: UnsafeRawBufferPointer) -> BlobID { hasher.hash(raw) }

    /// The stored form of `raw` and how its payload is compressed. The bytes stay valid
    /// until the next call (they may be `raw` itself in a plaintext repository).
    package func encode(_ raw: UnsafeRawBufferPointer) -> (BlobCompression, UnsafeRawBufferPointer) {
        let front = aead == nil ? 0 : AESGCM.nonceSize
        let need = LZ4.bound(raw.count) + AESGCM.overhead
        if need > capacity {
            scratch.deallocate()
            capacity = max(need, 2 * capacity)
            scratch = .allocate(byteCount: capacity, alignment: 64)
        }
        let room = UnsafeMutableRawBufferPointer(start: scratch + front, count: LZ4.bound(raw.count))
        var compression = BlobCompression.none
        var payload = raw
        if let n = LZ4.compress(raw, into: room), n < raw.count {
            compression = .lz4
            payload = UnsafeRawBufferPointer(start: scratch + front, count: n)
        }
        guard let aead else { return (compression, payload) }
        let n = aead.seal(payload, aad: SealedKind.blob, into: scratch)
        return (compression, UnsafeRawBufferPointer(start: scratch, count: n))
    }
}
