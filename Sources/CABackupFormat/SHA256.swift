import CABackupCore
import COpenSSL

/// SHA-256, or HMAC-SHA-256 under a fixed key, through libcrypto's EVP interface, which
/// uses the CPU's SHA extensions.
///
/// One hasher owns its `EVP_MD_CTX`s and is reused for many digests, so hashing a chunk
/// allocates nothing. For HMAC the key's inner and outer pad blocks are hashed once, at
/// init, into two template contexts; each digest starts from a copy of the inner one
/// (RFC 2104 computed the usual way, checked against RFC 4231's vectors).
/// Not thread-safe: each worker thread keeps its own.
package final class SHA256Hasher {
    // Safe: the contexts are created in init, freed in deinit, used by one thread at a time.
    private let ctx: OpaquePointer
    private let md: OpaquePointer
    /// The contexts after absorbing `key ⊕ ipad` and `key ⊕ opad`, for HMAC.
    private let inner: OpaquePointer?
    private let outer: OpaquePointer?

    /// A plain SHA-256 hasher, or HMAC-SHA-256 when `hmacKey` is given (at most 64 bytes).
    package init(hmacKey: [UInt8]? = nil) {
        ctx = EVP_MD_CTX_new()!
        md = EVP_sha256()!
        if let key = hmacKey {
            precondition(key.count <= 64, "HMAC keys longer than the block size are not used here")
            let padded = key + [UInt8](repeating: 0, count: 64 - key.count)
            let i = EVP_MD_CTX_new()!
            let o = EVP_MD_CTX_new()!
            EVP_DigestInit_ex(i, md, nil)
            EVP_DigestInit_ex(o, md, nil)
            let ipad = padded.map { $0 ^ 0x36 }
            let opad = padded.map { $0 ^ 0x5C }
            EVP_DigestUpdate(i, ipad, 64)
            EVP_DigestUpdate(o, opad, 64)
            inner = i
            outer = o
        } else {
            inner = nil
            outer = nil
        }
        reset()
    }

    deinit {
        EVP_MD_CTX_free(ctx)
        if let inner { EVP_MD_CTX_free(inner) }
        if let outer { EVP_MD_CTX_free(outer) }
    }

    /// Starts a new digest.
    package func reset() {
        if let inner {
            EVP_MD_CTX_copy_ex(ctx, inner)
        } else {
            EVP_DigestInit_ex(ctx, md, nil)
        }
    }

    /// Feeds bytes into the digest in progress.
    package func update(_ buf: UnsafeRawBufferPointer) {
        if buf.count > 0 { EVP_DigestUpdate(ctx, buf.baseAddress, buf.count) }
    }

    /// Finishes the digest in progress and starts a new one.
    package func finish() -> ObjectID {
        // A temporary allocation rather than a tuple passed inout: see docs/toolchain.md.
        let id = withUnsafeTemporaryAllocation(byteCount: 32, alignment: 8) { raw in
            let p = raw.baseAddress!.assumingMemoryBound(to: UInt8.self)
            var len: UInt32 = 0
            EVP_DigestFinal_ex(ctx, p, &len)
            if let outer {
                EVP_MD_CTX_copy_ex(ctx, outer)
                EVP_DigestUpdate(ctx, p, 32)
                EVP_DigestFinal_ex(ctx, p, &len)
            }
            return ObjectID(UnsafeRawBufferPointer(raw))
        }
        reset()
        return id
    }

    /// The digest of one buffer.
    package func hash(_ buf: UnsafeRawBufferPointer) -> ObjectID {
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
    withUnsafeTemporaryAllocation(byteCount: 32, alignment: 8) { raw in
        var len: UInt32 = 0
        EVP_Digest(
            buf.baseAddress, buf.count, raw.baseAddress!.assumingMemoryBound(to: UInt8.self), &len, EVP_sha256(), nil)
        return ObjectID(UnsafeRawBufferPointer(raw))
    }
}

/// HMAC-SHA-256 of a byte array in one call.
func hmacSHA256(key: [UInt8], _ bytes: [UInt8]) -> ObjectID {
    bytes.withUnsafeBytes { SHA256Hasher(hmacKey: key).hash($0) }
}

/// Cryptographically secure random bytes from libcrypto.
package func secureRandomBytes(_ count: Int) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    let rc = out.withUnsafeMutableBufferPointer { RAND_bytes($0.baseAddress, Int32(count)) }
    precondition(rc == 1, "RAND_bytes failed")
    return out
}
