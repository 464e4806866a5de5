import CABackupCore
import COpenSSL

/// AES-256-GCM through libcrypto (AES-NI/VAES and carry-less multiply where the CPU has
/// them).
///
/// A sealed message is `nonce (12) ‖ ciphertext ‖ tag (16)`, with a fresh random nonce
/// for every message, and additional data that names what the message is (a blob, a
/// pack header, a snapshot record, a key slot), so one kind of sealed object cannot be
/// passed off as another. Keys are set once per context, so sealing a chunk allocates
/// nothing. Not thread-safe: each worker thread keeps its own.
package final class AESGCM {
    static let nonceSize = 12
    static let tagSize = 16
    /// Bytes a sealed message has beyond its plaintext.
    package static let overhead = nonceSize + tagSize

    // OpenSSL's EVP_CTRL_AEAD_GET_TAG / EVP_CTRL_AEAD_SET_TAG.
    private static let getTag: Int32 = 0x10
    private static let setTag: Int32 = 0x11

    private let enc: OpaquePointer
    private let dec: OpaquePointer

    /// A context for one 32-byte key.
    package init(key: [UInt8]) {
        precondition(key.count == 32, "AES-256 needs a 32-byte key")
        enc = EVP_CIPHER_CTX_new()!
        dec = EVP_CIPHER_CTX_new()!
        precondition(EVP_EncryptInit_ex(enc, EVP_aes_256_gcm(), nil, key, nil) == 1)
        precondition(EVP_DecryptInit_ex(dec, EVP_aes_256_gcm(), nil, key, nil) == 1)
    }

    deinit {
        EVP_CIPHER_CTX_free(enc)
        EVP_CIPHER_CTX_free(dec)
    }

    /// Seals `plain` into `out`, which must hold `plain.count + overhead` bytes. The
    /// plaintext may already sit at `out + nonceSize` (sealing in place). Returns the
    /// sealed length. `nonce` is for known-answer tests only.
    @discardableResult
    package func seal(
        _ plain: UnsafeRawBufferPointer, aad: [UInt8], into out: UnsafeMutableRawPointer, nonce: [UInt8]? = nil
    ) -> Int {
        precondition(plain.count <= Int(Int32.max) - 64)
        let n = out.assumingMemoryBound(to: UInt8.self)
        if let nonce {
            precondition(nonce.count == Self.nonceSize)
            nonce.withUnsafeBytes { UnsafeMutableRawPointer(n).copyMemory(from: $0.baseAddress!, byteCount: 12) }
        } else {
            precondition(RAND_bytes(n, Int32(Self.nonceSize)) == 1, "RAND_bytes failed")
        }
        var len: Int32 = 0
        precondition(EVP_EncryptInit_ex(enc, nil, nil, nil, n) == 1)
        if !aad.isEmpty { precondition(EVP_EncryptUpdate(enc, nil, &len, aad, Int32(aad.count)) == 1) }
        let body = n + Self.nonceSize
        if plain.count > 0 {
            precondition(
                EVP_EncryptUpdate(
                    enc, body, &len, plain.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(plain.count)) == 1)
        }
        var tail: Int32 = 0
        precondition(EVP_EncryptFinal_ex(enc, body + plain.count, &tail) == 1)
        precondition(EVP_CIPHER_CTX_ctrl(enc, Self.getTag, Int32(Self.tagSize), body + plain.count) == 1)
        return plain.count + Self.overhead
    }

    /// Opens a sealed message into `out` (at least `sealed.count - overhead` bytes; may be
    /// `sealed.baseAddress + nonceSize`, opening in place). Returns the plaintext length,
    /// or nil when the message is too short or fails authentication (wrong key, changed
    /// bytes, other additional data).
    package func open(_ sealed: UnsafeRawBufferPointer, aad: [UInt8], into out: UnsafeMutableRawPointer) -> Int? {
        guard sealed.count >= Self.overhead, sealed.count <= Int(Int32.max) - 64 else { return nil }
        let s = sealed.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let count = sealed.count - Self.overhead
        var tag = [UInt8](repeating: 0, count: Self.tagSize)
        for i in 0..<Self.tagSize { tag[i] = s[Self.nonceSize + count + i] }
        var len: Int32 = 0
        guard EVP_DecryptInit_ex(dec, nil, nil, nil, s) == 1 else { return nil }
        if !aad.isEmpty { guard EVP_DecryptUpdate(dec, nil, &len, aad, Int32(aad.count)) == 1 else { return nil } }
        let o = out.assumingMemoryBound(to: UInt8.self)
        if count > 0 {
            guard EVP_DecryptUpdate(dec, o, &len, s + Self.nonceSize, Int32(count)) == 1 else { return nil }
        }
        guard EVP_CIPHER_CTX_ctrl(dec, Self.setTag, Int32(Self.tagSize), &tag) == 1 else { return nil }
        var tail: Int32 = 0
        guard EVP_DecryptFinal_ex(dec, o + count, &tail) > 0 else { return nil }
        return count
    }

    /// Seals a byte array (small objects: configs, records, headers, key slots).
    package func seal(_ plain: [UInt8], aad: [UInt8], nonce: [UInt8]? = nil) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: plain.count + Self.overhead)
        plain.withUnsafeBytes { p in
            out.withUnsafeMutableBytes { o in _ = seal(p, aad: aad, into: o.baseAddress!, nonce: nonce) }
        }
        return out
    }

    /// Opens a sealed byte array, or nil when it fails authentication.
    package func open(_ sealed: [UInt8], aad: [UInt8]) -> [UInt8]? {
        guard sealed.count >= Self.overhead else { return nil }
        // One spare byte, so an empty plaintext still has an address to open into.
        var out = [UInt8](repeating: 0, count: sealed.count - Self.overhead + 1)
        let n = sealed.withUnsafeBytes { s in
            out.withUnsafeMutableBytes { o in open(s, aad: aad, into: o.baseAddress!) }
        }
        out.removeLast()
        return n == nil ? nil : out
    }
}

/// Additional authenticated data naming each kind of sealed object.
package enum SealedKind {
    package static let blob = Array("cabackup blob v1".utf8)
    static let packHeader = Array("cabackup pack header v1".utf8)
    package static let snapshot = Array("cabackup snapshot v1".utf8)
    static let config = Array("cabackup config v1".utf8)
    static let keySlot = Array("cabackup key slot v1".utf8)
    package static let forget = Array("cabackup forget v1".utf8)
}

/// scrypt (RFC 7914) through libcrypto's `EVP_PBE_scrypt`: one lane after another; the tests
/// and benchmarks hold ``scrypt(password:salt:n:r:p:length:threads:halfMemory:pairs:)`` against it.
///
/// - Throws: ``CABackupError/invalidArgument(_:)`` when the parameters are out of range
///   or need more memory than 1 GiB.
func scryptOpenSSL(password: [UInt8], salt: [UInt8], n: UInt64, r: UInt64, p: UInt64, length: Int) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: length)
    // A trailing NUL keeps the pointers valid for an empty password or salt.
    let pw = password + [0]
    let s = salt + [0]
    let rc = pw.withUnsafeBytes { pw in
        s.withUnsafeBytes { s in
            EVP_PBE_scrypt(
                pw.baseAddress!.assumingMemoryBound(to: CChar.self), password.count,
                s.baseAddress!.assumingMemoryBound(to: UInt8.self), salt.count, n, r, p, 1 << 30, &out, length)
        }
    }
    guard rc == 1 else { throw CABackupError.invalidArgument("scrypt parameters N=\(n) r=\(r) p=\(p) are not usable") }
    return out
}

/// PBKDF2-HMAC-SHA-256 through libcrypto (the server's hash of login secrets).
package func pbkdf2SHA256(_ secret: [UInt8], salt: [UInt8], iterations: Int, length: Int = 32) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: length)
    let s = secret + [0]
    let rc = s.withUnsafeBytes { p in
        PKCS5_PBKDF2_HMAC(
            p.baseAddress!.assumingMemoryBound(to: CChar.self), Int32(secret.count), salt, Int32(salt.count),
            Int32(iterations), EVP_sha256(), Int32(length), &out)
    }
    precondition(rc == 1, "PKCS5_PBKDF2_HMAC failed")
    return out
}

/// Compares two byte strings in time that depends only on their length.
package func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    a.count == b.count && CRYPTO_memcmp(a, b, a.count) == 0
}
