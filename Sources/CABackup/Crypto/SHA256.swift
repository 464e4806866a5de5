import COpenSSL

/// SHA-256 through libcrypto's EVP interface, which uses the CPU's SHA extensions.
///
/// One hasher owns one `EVP_MD_CTX` and is reused for many digests, so hashing a chunk
/// allocates nothing. Not thread-safe: each worker thread keeps its own.
final class SHA256Hasher {
    // Safe: the context is created in init, freed in deinit, used by one thread at a time.
    private let ctx: OpaquePointer
    private let md: OpaquePointer

    init() {
        ctx = EVP_MD_CTX_new()!
        md = EVP_sha256()!
        EVP_DigestInit_ex(ctx, md, nil)
    }

    deinit { EVP_MD_CTX_free(ctx) }

    /// Starts a new digest.
    func reset() { EVP_DigestInit_ex(ctx, md, nil) }

    /// Feeds bytes into the digest in progress.
    func update(_ buf: UnsafeRawBufferPointer) {
        if buf.count > 0 { EVP_DigestUpdate(ctx, buf.baseAddress, buf.count) }
    }

    /// Finishes the digest in progress and starts a new one.
    func finish() -> ObjectID {
        var out = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &out) { raw in
            var len: UInt32 = 0
            EVP_DigestFinal_ex(ctx, raw.baseAddress!.assumingMemoryBound(to: UInt8.self), &len)
        }
        EVP_DigestInit_ex(ctx, md, nil)
        return withUnsafeBytes(of: &out) { ObjectID($0) }
    }

    /// The digest of one buffer.
    func hash(_ buf: UnsafeRawBufferPointer) -> ObjectID {
        update(buf)
        return finish()
    }
}

/// SHA-256 of a byte array in one call (small objects: configs, records, trees).
public func sha256(_ bytes: [UInt8]) -> ObjectID {
    bytes.withUnsafeBytes { sha256($0) }
}

/// SHA-256 of a buffer in one call.
public func sha256(_ buf: UnsafeRawBufferPointer) -> ObjectID {
    var out = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
    withUnsafeMutableBytes(of: &out) { raw in
        var len: UInt32 = 0
        EVP_Digest(
            buf.baseAddress, buf.count, raw.baseAddress!.assumingMemoryBound(to: UInt8.self), &len, EVP_sha256(), nil)
    }
    return withUnsafeBytes(of: &out) { ObjectID($0) }
}

/// Cryptographically secure random bytes from libcrypto.
func secureRandomBytes(_ count: Int) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    let rc = out.withUnsafeMutableBufferPointer { RAND_bytes($0.baseAddress, Int32(count)) }
    precondition(rc == 1, "RAND_bytes failed")
    return out
}
