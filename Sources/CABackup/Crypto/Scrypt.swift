import CScrypt

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// scrypt (RFC 7914) with its `p` lanes spread over threads.
///
/// libcrypto's `EVP_PBE_scrypt` runs the lanes one after another on one core; the lanes
/// are independent by design, so here they run on up to `threads` cores at once, each in
/// its own N·128·r bytes. PBKDF2-HMAC-SHA-256 (the first and last steps) comes from
/// libcrypto; ROMix is the C target CScrypt, which mixes Salsa20/8 with SSE2 vectors.
/// The output is exactly scrypt's: the tests compare it with the RFC's vectors and with
/// libcrypto's for many parameter sets.
///
/// - Parameter threads: lanes run at once; memory is `min(threads, p)` × N·128·r bytes.
/// - Throws: ``CABackupError/invalidArgument(_:)`` when the parameters are out of range.
func scrypt(
    password: [UInt8], salt: [UInt8], n: UInt64, r: UInt64, p: UInt64, length: Int, threads: Int = 1
) throws -> [UInt8] {
    guard n >= 2, n.nonzeroBitCount == 1, n <= 1 << 24, r >= 1, r <= 64, p >= 1, p <= 64,
        n * 128 * r <= 1 << 30, length >= 1
    else {
        throw CABackupError.invalidArgument("scrypt parameters N=\(n) r=\(r) p=\(p) are not usable")
    }
    let laneBytes = 128 * Int(r)
    var b = pbkdf2SHA256(password, salt: salt, iterations: 1, length: Int(p) * laneBytes)
    let lanes = Int(p)
    let running = max(1, min(threads, lanes))
    b.withUnsafeMutableBytes { all in
        // Thread k mixes lanes k, k + running, …: lanes cost the same, so no queue is needed.
        let address = Int(bitPattern: all.baseAddress!)
        let mix: @Sendable (Int) -> Void = { first in
            let v = UnsafeMutableRawPointer.allocate(byteCount: Int(n) * laneBytes, alignment: 64)
            let xy = UnsafeMutableRawPointer.allocate(byteCount: 2 * laneBytes, alignment: 64)
            defer {
                v.deallocate()
                xy.deallocate()
            }
            for lane in stride(from: first, to: lanes, by: running) {
                let block = UnsafeMutableRawPointer(bitPattern: address)! + lane * laneBytes
                cabackup_romix(block.assumingMemoryBound(to: UInt8.self), Int(r), n, v, xy)
            }
        }
        let helpers = (1..<running).map { k in startThread { mix(k) } }
        mix(0)
        for t in helpers { joinThread(t) }
    }
    return pbkdf2SHA256(password, salt: b, iterations: 1, length: length)
}
