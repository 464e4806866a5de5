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
/// With `halfMemory`, each lane keeps only the even entries of its table and recomputes
/// an odd one when it is read (one more BlockMix for half of the N reads: 1.25× the work
/// per lane): two lanes at once then take the memory of one, and four lanes on two cores
/// take 2.5 lane-times instead of 4. The output is the same.
///
/// - Parameters:
///   - threads: lanes run at once; memory is `min(threads, p)` × N·128·r bytes, or
///     half that with `halfMemory`.
///   - halfMemory: keep half of each lane's table (see above).
/// - Throws: ``CABackupError/invalidArgument(_:)`` when the parameters are out of range.
func scrypt(
    password: [UInt8], salt: [UInt8], n: UInt64, r: UInt64, p: UInt64, length: Int, threads: Int = 1,
    halfMemory: Bool = false
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
    // Each thread's table is mapped directly, not taken from malloc: freeing a block of
    // 16 MiB would raise glibc's mmap threshold to that size, and the snapshot's later
    // buffers would then come from heaps that keep their pages (measured: +5 to +15 MB
    // peak RSS on a first snapshot of 51k files).
    let tableBytes = Int(n) * laneBytes / (halfMemory ? 2 : 1)
    var tables: [Int] = []
    defer { for t in tables { munmap(UnsafeMutableRawPointer(bitPattern: t), tableBytes) } }
    for _ in 0..<running {
        guard let m = mmap(nil, tableBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
            m != MAP_FAILED
        else { throw CABackupError.io(operation: "map \(tableBytes) bytes for scrypt", path: "memory", errno: errno) }
        tables.append(Int(bitPattern: m))
    }
    b.withUnsafeMutableBytes { all in
        // Thread k mixes lanes k, k + running, …: lanes cost the same, so no queue is needed.
        let address = Int(bitPattern: all.baseAddress!)
        let mix: @Sendable (Int, Int) -> Void = { first, table in
            let v = UnsafeMutableRawPointer(bitPattern: table)!
            let xy = UnsafeMutableRawPointer.allocate(byteCount: 3 * laneBytes, alignment: 64)
            defer { xy.deallocate() }
            for lane in stride(from: first, to: lanes, by: running) {
                let block = (UnsafeMutableRawPointer(bitPattern: address)! + lane * laneBytes)
                    .assumingMemoryBound(to: UInt8.self)
                if halfMemory {
                    cabackup_romix_half(block, Int(r), n, v, xy)
                } else {
                    cabackup_romix(block, Int(r), n, v, xy)
                }
            }
        }
        let helpers = (1..<running).map { k in startThread { [tables] in mix(k, tables[k]) } }
        mix(0, tables[0])
        for t in helpers { joinThread(t) }
    }
    return pbkdf2SHA256(password, salt: b, iterations: 1, length: length)
}
