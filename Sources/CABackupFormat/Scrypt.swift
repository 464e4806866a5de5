import CABackupCore
import CScrypt

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// scrypt (RFC 7914) with its `p` lanes spread over threads.
///
/// libcrypto's `EVP_PBE_scrypt` runs the lanes one after another on one core; the lanes
/// are independent by design, so here they run on up to `threads` cores at once.
/// PBKDF2-HMAC-SHA-256 (the first and last steps) comes from libcrypto; ROMix is the C
/// target CScrypt, which mixes Salsa20/8 with SSE2 vectors, or two lanes in lockstep
/// with AVX2 where the CPU has it. The output is exactly scrypt's: the tests compare it
/// with the RFC's vectors and with libcrypto's for many parameter sets, on both paths.
///
/// Each thread mixes one lane at a time, or with `pairs` two lanes at once (AVX2: lane A
/// in the low and lane B in the high half of each 256-bit vector, 1.8-2x the throughput of
/// one lane after the other). Scrypt trades memory for work: a lane may keep only every
/// second (or fourth) entry of its table and recompute the others as they are read, at
/// 1.25x (or 1.56x, and more for a pair, which waits for the farther of its two lanes)
/// the work of the full table. `halfMemory` makes each thread keep half the memory of
/// one lane's table: a single lane keeps every second entry, a pair every fourth entry
/// of each of its two tables. Four lanes on two cores then take 32 MiB at the default
/// parameters, in 2.5 lane-times on one lane at a time and about 2.1 with pairs.
///
/// - Parameters:
///   - threads: lanes (or pairs) mixed at once; memory is one N·128·r-byte table per
///     running thread (at most one per lane or pair), or half that with `halfMemory`.
///   - halfMemory: keep half a table per thread (see above).
///   - pairs: mix two lanes at once when the CPU can (``scryptPairsSupported``).
/// - Throws: ``CABackupError/invalidArgument(_:)`` when the parameters are out of range.
package func scrypt(
    password: [UInt8], salt: [UInt8], n: UInt64, r: UInt64, p: UInt64, length: Int, threads: Int = 1,
    halfMemory: Bool = false, pairs: Bool = scryptPairsSupported
) throws -> [UInt8] {
    guard n >= 2, n.nonzeroBitCount == 1, n <= 1 << 24, r >= 1, r <= 64, p >= 1, p <= 64,
        n * 128 * r <= 1 << 30, length >= 1
    else {
        throw CABackupError.invalidArgument("scrypt parameters N=\(n) r=\(r) p=\(p) are not usable")
    }
    let laneBytes = 128 * Int(r)
    var b = pbkdf2SHA256(password, salt: salt, iterations: 1, length: Int(p) * laneBytes)
    let lanes = Int(p)
    // Units of work: pairs of lanes first (when paired), then a single lane if one is left.
    let pairCount = pairs && scryptPairsSupported ? lanes / 2 : 0
    let units = pairCount + (lanes - 2 * pairCount)
    let running = max(1, min(threads, units))
    let pairShift: UInt32 = halfMemory ? 2 : 1
    let pairRows = (Int(n) + (1 << pairShift) - 1) >> pairShift
    let tableBytes = max(
        Int(n) * laneBytes / (halfMemory ? 2 : 1), pairCount > 0 ? 2 * pairRows * laneBytes : 0)
    // Each thread's table is mapped directly, not taken from malloc: freeing a block of
    // 16 MiB would raise glibc's mmap threshold to that size, and the snapshot's later
    // buffers would then come from heaps that keep their pages (measured: +5 to +15 MB
    // peak RSS on a first snapshot of 51k files).
    var tables: [Int] = []
    defer { for t in tables { munmap(UnsafeMutableRawPointer(bitPattern: t), tableBytes) } }
    for _ in 0..<running {
        guard let m = mmap(nil, tableBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
            m != MAP_FAILED
        else { throw CABackupError.io(operation: "map \(tableBytes) bytes for scrypt", path: "memory", errno: errno) }
        tables.append(Int(bitPattern: m))
    }
    b.withUnsafeMutableBytes { all in
        // Thread k takes units k, k + running, …: units cost about the same, so no queue.
        let address = Int(bitPattern: all.baseAddress!)
        let mix: @Sendable (Int, Int) -> Void = { first, table in
            let v = UnsafeMutableRawPointer(bitPattern: table)!
            // The largest working set: a pair with quarter tables, (3 + 4) × 256·r bytes.
            let work = UnsafeMutableRawPointer.allocate(byteCount: 8 * 2 * laneBytes, alignment: 64)
            defer { work.deallocate() }
            func block(_ lane: Int) -> UnsafeMutablePointer<UInt8> {
                (UnsafeMutableRawPointer(bitPattern: address)! + lane * laneBytes).assumingMemoryBound(to: UInt8.self)
            }
            for unit in stride(from: first, to: units, by: running) {
                if unit < pairCount {
                    cabackup_romix_pair(block(2 * unit), block(2 * unit + 1), Int(r), n, pairShift, v, work)
                } else if halfMemory {
                    cabackup_romix_half(block(unit + pairCount), Int(r), n, v, work)
                } else {
                    cabackup_romix(block(unit + pairCount), Int(r), n, v, work)
                }
            }
        }
        let helpers = (1..<running).map { k in startThread { [tables] in mix(k, tables[k]) } }
        mix(0, tables[0])
        for t in helpers { joinThread(t) }
    }
    return pbkdf2SHA256(password, salt: b, iterations: 1, length: length)
}

/// Whether ``scrypt(password:salt:n:r:p:length:threads:halfMemory:pairs:)`` can mix two
/// lanes at once on this CPU (x86-64 with AVX2).
let scryptPairsSupported = cabackup_romix_pair_supported() == 1
