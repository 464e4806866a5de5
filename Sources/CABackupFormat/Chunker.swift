import CABackupCore
/// The first index in `from..<to` whose byte is not `byte` (`to` if none).
@usableFromInline @inline(__always)
func runEnd(_ p: UnsafePointer<UInt8>, from: Int, to end: Int, byte: UInt8) -> Int {
    var j = from
    let pattern = UInt64(byte) &* 0x0101_0101_0101_0101
    let raw = UnsafeRawPointer(p)
    while j + 8 <= end && raw.loadUnaligned(fromByteOffset: j, as: UInt64.self) == pattern { j += 8 }
    while j < end && p[j] == byte { j += 1 }
    return j
}

/// Content-defined chunking parameters, fixed when a repository is created.
///
/// Changing any of them changes every chunk boundary and so breaks deduplication
/// against existing data: they live in the repository config and never change.
public struct ChunkerParameters: Codable, Sendable, Equatable {
    /// No chunk is shorter than this, except the last chunk of a file.
    public var minSize: Int
    /// The mean chunk size on random data.
    public var averageSize: Int
    /// No chunk is longer than this.
    public var maxSize: Int
    /// 32 random bytes from which the Gear table is derived, so that chunk lengths
    /// do not fingerprint content across repositories.
    public var seed: [UInt8]

    /// 512 KiB / 1 MiB / 8 MiB: few enough chunks that per-chunk costs (index rows,
    /// tree entries) stay small, small enough that an edit costs about one chunk.
    public static func defaults(seed: [UInt8]) -> ChunkerParameters {
        ChunkerParameters(minSize: 512 << 10, averageSize: 1 << 20, maxSize: 8 << 20, seed: seed)
    }

    public init(minSize: Int, averageSize: Int, maxSize: Int, seed: [UInt8]) {
        self.minSize = minSize
        self.averageSize = averageSize
        self.maxSize = maxSize
        self.seed = seed
    }

    /// Checks the parameters describe a usable chunker.
    public func validate() throws {
        guard averageSize.nonzeroBitCount == 1 else {
            throw CABackupError.invalidArgument("chunker average size \(averageSize) must be a power of two")
        }
        guard 64 <= minSize, minSize < averageSize, averageSize < maxSize, maxSize <= 64 << 20 else {
            throw CABackupError.invalidArgument("chunker sizes must satisfy 64 <= min < avg < max <= 64 MiB")
        }
        guard seed.count == 32 else { throw CABackupError.invalidArgument("chunker seed must be 32 bytes") }
    }

    enum CodingKeys: String, CodingKey {
        case minSize = "min_size"
        case averageSize = "avg_size"
        case maxSize = "max_size"
        case seed = "gear_seed"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        minSize = try c.decode(Int.self, forKey: .minSize)
        averageSize = try c.decode(Int.self, forKey: .averageSize)
        maxSize = try c.decode(Int.self, forKey: .maxSize)
        let hex = try c.decode(String.self, forKey: .seed)
        guard let bytes = bytesFromHex(hex) else {
            throw DecodingError.dataCorruptedError(forKey: .seed, in: c, debugDescription: "gear_seed is not hex")
        }
        seed = bytes
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(minSize, forKey: .minSize)
        try c.encode(averageSize, forKey: .averageSize)
        try c.encode(maxSize, forKey: .maxSize)
        try c.encode(hexString(seed), forKey: .seed)
    }
}

/// FastCDC content-defined chunking with a Gear rolling hash and normalized chunking.
///
/// A pure function over a buffer: ``nextCut(in:isFinal:)`` says where the next chunk
/// ends. It never reads a file and never allocates, so boundaries depend only on the
/// bytes, not on how they were read.
///
/// The hash is `h = (h << 1) &+ gear[byte]`, so after 64 bytes it depends only on the
/// last 64 bytes. Cut-point tests begin at `minSize`; hashing starts 64 bytes earlier,
/// which gives the same hash there as hashing from the chunk start would, and skips
/// most of the bytes below the minimum (the largest single speed-up of the loop).
///
/// Normalized chunking: between `minSize` and the *normal point* a cut needs
/// `log2(avg) + 2` zero bits (rare); after it, `log2(avg) - 2` (common). The normal
/// point is `avg - avg/4`, so that the mean lands on `avg` rather than above it.
public struct Chunker: Sendable {
    public let parameters: ChunkerParameters
    private let gear: [UInt64]
    private let maskStrict: UInt64
    private let maskLoose: UInt64
    private let normalPoint: Int

    /// Makes a chunker; the Gear table is derived from `parameters.seed`.
    public init(_ parameters: ChunkerParameters) {
        self.parameters = parameters
        self.gear = Chunker.gearTable(seed: parameters.seed)
        let bits = parameters.averageSize.trailingZeroBitCount
        // Top bits of the hash: those depend on the most bytes of the window.
        maskStrict = ~UInt64(0) << UInt64(64 - (bits + 2))
        maskLoose = ~UInt64(0) << UInt64(64 - max(1, bits - 2))
        normalPoint = max(parameters.minSize, parameters.averageSize - parameters.averageSize / 4)
    }

    /// Derives the 256-entry Gear table: entry *i* is the first 8 bytes (little endian)
    /// of SHA-256(seed ‖ "gear" ‖ i as one byte).
    static func gearTable(seed: [UInt8]) -> [UInt64] {
        (0..<256).map { i -> UInt64 in
            let digest = sha256(seed + Array("gear".utf8) + [UInt8(i)])
            return digest.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        }
    }

    /// The length of the chunk that starts at the beginning of `buf`.
    ///
    /// A cut found inside `buf` is final even when more data follows: it depends only on
    /// the bytes before it. Only when `buf` holds no cut, is shorter than the maximum
    /// chunk and more data may follow is the answer `nil`.
    ///
    /// - Parameters:
    ///   - buf: bytes from the start of the chunk on.
    ///   - isFinal: `true` when `buf` ends where the stream ends.
    /// - Returns: the chunk length, or `nil` when the caller must read more and ask again
    ///   (with the same start: the bytes scanned so far are scanned again).
    @inlinable
    public func nextCut(in buf: UnsafeRawBufferPointer, isFinal: Bool) -> Int? {
        let n = buf.count
        if n == 0 { return isFinal ? 0 : nil }
        let end = min(n, parameters.maxSize)
        let complete = isFinal || n >= parameters.maxSize
        if end > parameters.minSize, let c = cut(buf.baseAddress!.assumingMemoryBound(to: UInt8.self), end) {
            return c
        }
        return complete ? end : nil
    }

    /// The first cut point in `p[0..<end]` (`end` > `minSize`), or `nil` when the hash
    /// matches nowhere before `end`.
    @usableFromInline
    func cut(_ p: UnsafePointer<UInt8>, _ end: Int) -> Int? {
        let minSize = parameters.minSize
        let normal = min(normalPoint, end)
        return gear.withUnsafeBufferPointer { g -> Int? in
            let gear = g.baseAddress!
            var h: UInt64 = 0
            // Safe: minSize >= 64 (validated), so the warm-up starts inside the buffer.
            var i = minSize - 64
            while i < minSize {
                h = (h &<< 1) &+ gear[Int(p[i])]
                i += 1
            }
            // Runs of one byte value: after 64 equal bytes b the hash is exactly -gear[b]
            // and stays there, so no further byte of the run can change the cut decision.
            // The byte loop runs in blocks of 64; between blocks, if the hash sits at the
            // last byte's fixed point, the rest of that byte's run is skipped with word
            // compares. Boundaries are identical to the plain loop (tested against a
            // reference implementation).
            if let c = Chunker.scan(p, gear, from: &i, to: normal, hash: &h, mask: maskStrict) { return c }
            return Chunker.scan(p, gear, from: &i, to: end, hash: &h, mask: maskLoose)
        }
    }

    /// The Gear loop over `p[i..<limit]` in blocks of 64 bytes, skipping runs between
    /// blocks: the first `j + 1` where the hash after byte `j` has no bit of `mask` set,
    /// or `nil` with `i == limit`.
    @inline(__always)
    static func scan(
        _ p: UnsafePointer<UInt8>, _ gear: UnsafePointer<UInt64>, from i: inout Int, to limit: Int,
        hash h: inout UInt64, mask: UInt64
    ) -> Int? {
        while i < limit {
            if let c = scanBlock(p, gear, from: &i, to: min(limit, i + 64), hash: &h, mask: mask) { return c }
            let last = p[i - 1]
            if h == 0 &- gear[Int(last)] { i = runEnd(p, from: i, to: limit, byte: last) }
        }
        return nil
    }

    /// The plain Gear loop over `p[i..<blockEnd]`: the first `j + 1` where the hash after
    /// byte `j` has no bit of `mask` set, or `nil` with `i == blockEnd`.
    ///
    /// Four bytes a step. The hash after them is `16h + t`, where `t` folds the four Gear
    /// values without `h`, so the dependency chain from one step's hash to the next is a
    /// few operations per four bytes, not a shift and an add per byte; the hashes after
    /// the first three bytes are computed from `h` the same way and only tested. 1.4x
    /// the byte-at-a-time loop's throughput here.
    @inline(__always)
    static func scanBlock(
        _ p: UnsafePointer<UInt8>, _ gear: UnsafePointer<UInt64>, from i: inout Int, to blockEnd: Int,
        hash h: inout UInt64, mask: UInt64
    ) -> Int? {
        while i + 4 <= blockEnd {
            let g0 = gear[Int(p[i])]
            let t1 = (g0 &<< 1) &+ gear[Int(p[i + 1])]
            let t2 = (t1 &<< 1) &+ gear[Int(p[i + 2])]
            let t3 = (t2 &<< 1) &+ gear[Int(p[i + 3])]
            let h1 = (h &<< 1) &+ g0
            let h2 = (h &<< 2) &+ t1
            let h3 = (h &<< 3) &+ t2
            h = (h &<< 4) &+ t3
            if h1 & mask == 0 { return i + 1 }
            if h2 & mask == 0 { return i + 2 }
            if h3 & mask == 0 { return i + 3 }
            if h & mask == 0 { return i + 4 }
            i += 4
        }
        while i < blockEnd {
            h = (h &<< 1) &+ gear[Int(p[i])]
            i += 1
            if h & mask == 0 { return i }
        }
        return nil
    }
}
