import Foundation

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

/// Deterministic pseudo-random bytes (SplitMix64), so test data is the same on every run.
func pseudoRandomBytes(count: Int, seed: UInt64) -> [UInt8] {
    var rng = SplitMix64(seed: seed)
    var out = [UInt8](repeating: 0, count: count)
    out.withUnsafeMutableBytes { raw in
        var i = 0
        while i < count {
            let word = rng.next().littleEndian
            let n = min(8, count - i)
            withUnsafeBytes(of: word) { w in
                raw.baseAddress!.advanced(by: i).copyMemory(from: w.baseAddress!, byteCount: n)
            }
            i += n
        }
    }
    return out
}

/// SplitMix64: a small seeded generator for test data and the fuzzer.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A fresh temporary directory, removed when the test ends.
final class TemporaryDirectory {
    let path: String

    init() {
        var template = Array((NSTemporaryDirectory() + "/cabackup-test-XXXXXX").utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = String(cString: realpath(p!, nil)!)
    }

    deinit {
        try? FileManager.default.removeItem(atPath: path)
    }

    func file(_ name: String) -> String { path + "/" + name }

    @discardableResult
    func write(_ name: String, _ bytes: [UInt8]) -> String {
        let p = file(name)
        try? FileManager.default.createDirectory(
            atPath: (p as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: p, contents: Data(bytes))
        return p
    }
}

/// A fixed seed for tests whose expected values depend on the Gear table.
let testSeed: [UInt8] = Array(0..<32)

/// Small chunker parameters so tests see many chunks in little data.
/// The password of test repositories (opened with cheap scrypt parameters).
let testPassword = "test password"

let smallParameters = ChunkerParameters(minSize: 2048, averageSize: 8192, maxSize: 65536, seed: testSeed)

/// A repository at `dir/repo` with small chunks and cheap scrypt; encrypted with
/// ``testPassword`` unless `password` is nil.
func makeTestRepository(_ dir: TemporaryDirectory, password: String? = testPassword) throws -> Repository {
    try Repository.initialize(
        path: dir.file("repo"), password: password, chunker: smallParameters, kdf: .insecureFastForTesting,
        durable: false)
}

/// Chunk lengths of `data` cut in memory in one buffer.
func cutAll(_ chunker: Chunker, _ data: [UInt8]) -> [Int] {
    var out: [Int] = []
    data.withUnsafeBytes { raw in
        var off = 0
        while off < raw.count {
            let n = chunker.nextCut(in: UnsafeRawBufferPointer(rebasing: raw[off...]), isFinal: true)!
            out.append(n)
            off += n
        }
    }
    return out
}
