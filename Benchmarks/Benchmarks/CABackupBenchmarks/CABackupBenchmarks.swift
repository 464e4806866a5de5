// The cabackup benchmark suite: each stage of the data path alone, then end to end.
// Run from Benchmarks/: `swift package benchmark` (release build). Results print as a
// table; `swift package benchmark baseline update NAME` saves a baseline and
// `swift package benchmark baseline compare NAME` compares against it; `--format jsonSmallerIsBetter`
// (or `histogramEncoded`) exports JSON. Throughput is the custom metric "MB/s" (decimal
// megabytes of input per second); index lookups report "lookups/s".
import Benchmark
@_spi(Benchmarks) import CABackup
import Foundation

let megabyte = 1_000_000.0

/// Deterministic pseudo-random bytes (SplitMix64).
func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var state = seed
    var out = [UInt8](repeating: 0, count: count)
    out.withUnsafeMutableBytes { raw in
        let words = count / 8
        for i in 0..<words {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            raw.storeBytes(of: z ^ (z >> 31), toByteOffset: i * 8, as: UInt64.self)
        }
    }
    return out
}

/// Compressible English-like text from a small vocabulary, deterministic.
func textBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    let words = [
        "backup", "chunk", "the", "of", "repository", "snapshot", "and", "file", "data", "a", "restore", "to", "is",
        "index", "pack", "tree", "with", "for", "content", "hash", "defined", "compression", "in", "that", "on",
    ].map { Array($0.utf8) }
    var out: [UInt8] = []
    out.reserveCapacity(count + 32)
    var state = seed
    var n = 0
    while out.count < count {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        out += words[Int(state >> 59) % words.count]
        n += 1
        out.append(n % 12 == 0 ? 0x0A : 0x20)
    }
    return Array(out.prefix(count))
}

func seconds(_ body: () throws -> Void) rethrows -> Double {
    let start = DispatchTime.now().uptimeNanoseconds
    try body()
    return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
}

let mbps = BenchmarkMetric.custom("MB/s", polarity: .prefersLarger, useScalingFactor: false)
let lookupsPerSecond = BenchmarkMetric.custom("lookups/s", polarity: .prefersLarger, useScalingFactor: false)
let insertsPerSecond = BenchmarkMetric.custom("inserts/s", polarity: .prefersLarger, useScalingFactor: false)

func scratchDirectory(_ name: String) -> String {
    let base = ProcessInfo.processInfo.environment["CABACKUP_BENCH_DIR"] ?? NSTemporaryDirectory()
    let path = base + "/cabackup-bench-" + name
    try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

func remove(_ path: String) { try? FileManager.default.removeItem(atPath: path) }

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .peakMemoryResident, mbps], warmupIterations: 1, maxDuration: .seconds(10),
        maxIterations: 10)

    // MARK: Stages alone

    // Made on first use, so benchmarks that do not need them do not carry them in RSS.
    final class Lazy: @unchecked Sendable {
        lazy var random64 = randomBytes(64 << 20, seed: 1)
        lazy var text64 = textBytes(64 << 20, seed: 2)
        /// 64 MiB of a real executable on this machine (the Swift compiler), or random
        /// bytes where there is none.
        lazy var binary64: [UInt8] = {
            let path = "/opt/swift/usr/bin/swift-frontend"
            guard let h = FileHandle(forReadingAtPath: path), let d = try? h.read(upToCount: 64 << 20),
                d.count == 64 << 20
            else { return randomBytes(64 << 20, seed: 9) }
            return [UInt8](d)
        }()
    }
    let data = Lazy()

    Benchmark("Chunker: FastCDC, default parameters, 64 MiB random") { benchmark in
        let chunker = Chunker(.defaults(seed: Array(0..<32)))
        var count = 0
        let random64 = data.random64
        let t = random64.withUnsafeBytes { raw in
            seconds {
                var off = 0
                while off < raw.count {
                    off += chunker.nextCut(in: UnsafeRawBufferPointer(rebasing: raw[off...]), isFinal: true)!
                    count += 1
                }
            }
        }
        blackHole(count)
        benchmark.measurement(mbps, Int(Double(random64.count) / megabyte / t))
    }

    Benchmark("SHA-256: EVP, 1 MiB pieces, 64 MiB") { benchmark in
        let hasher = Primitives.Hasher()
        let random64 = data.random64
        let t = random64.withUnsafeBytes { raw in
            seconds {
                for off in stride(from: 0, to: raw.count, by: 1 << 20) {
                    blackHole(hasher.hash(UnsafeRawBufferPointer(rebasing: raw[off..<off + (1 << 20)])))
                }
            }
        }
        benchmark.measurement(mbps, Int(Double(random64.count) / megabyte / t))
    }

    for name in ["text", "random", "binary"] {
        Benchmark("LZ4 compress: 1 MiB pieces, 64 MiB \(name)") { benchmark in
            let data = name == "text" ? data.text64 : name == "binary" ? data.binary64 : data.random64
            var out = [UInt8](repeating: 0, count: Primitives.lz4Bound(1 << 20))
            var total = 0
            let t = data.withUnsafeBytes { raw in
                out.withUnsafeMutableBytes { dst in
                    seconds {
                        for off in stride(from: 0, to: raw.count, by: 1 << 20) {
                            total +=
                                Primitives.lz4Compress(
                                    UnsafeRawBufferPointer(rebasing: raw[off..<off + (1 << 20)]), into: dst) ?? 0
                        }
                    }
                }
            }
            blackHole(total)
            benchmark.measurement(mbps, Int(Double(data.count) / megabyte / t))
        }
    }

    Benchmark("LZ4 decompress: 1 MiB pieces, 64 MiB text") { benchmark in
        let piece = Array(data.text64[0..<(1 << 20)])
        var compressed = [UInt8](repeating: 0, count: Primitives.lz4Bound(piece.count))
        let n = piece.withUnsafeBytes { src in
            compressed.withUnsafeMutableBytes { Primitives.lz4Compress(src, into: $0)! }
        }
        var out = [UInt8](repeating: 0, count: piece.count)
        let t = compressed.withUnsafeBytes { src in
            out.withUnsafeMutableBytes { dst in
                seconds {
                    for _ in 0..<64 {
                        blackHole(Primitives.lz4Decompress(UnsafeRawBufferPointer(rebasing: src[0..<n]), into: dst))
                    }
                }
            }
        }
        benchmark.measurement(mbps, Int(Double(64 << 20) / megabyte / t))
    }

    Benchmark("Pack writing: 128 × 1 MiB random blobs, fsync on") { benchmark in
        let dir = scratchDirectory("packs")
        remove(dir + "/repo")
        let repo = try Repository.initialize(path: dir + "/repo", password: "benchmark")
        let random64 = data.random64
        let blobs = (0..<128).map { (i: Int) -> [UInt8] in
            let start = (i % 64) << 20
            var blob = Array(random64[start..<start + (1 << 20)])
            blob.append(UInt8(i))
            return blob
        }
        let t = try seconds { try repo.storeBlobsForBenchmark(blobs) }
        benchmark.measurement(mbps, Int(Double(128 << 20) / megabyte / t))
        remove(dir)
    }

    // MARK: The index at scale

    // 10M blob ids is the index of a ~10 TB repository (1 MiB chunks). The database is built
    // once (minutes) and kept in CABACKUP_BENCH_DIR; each run opens it from a fresh process
    // and looks up 1M ids, half of them absent, as a backup of new data would.
    let indexCount = Int(ProcessInfo.processInfo.environment["CABACKUP_BENCH_INDEX_IDS"] ?? "") ?? 10_000_000
    func blobID(_ i: Int) -> BlobID {
        let v = UInt64(bitPattern: Int64(i)).littleEndian
        return withUnsafeBytes(of: v) { sha256($0) }
    }

    Benchmark(
        "Index: \(indexCount / 1_000_000)M ids, 1M batched lookups, half absent",
        configuration: .init(metrics: [.wallClock, .peakMemoryResident, lookupsPerSecond], maxIterations: 5)
    ) { benchmark in
        let path = scratchDirectory("index-\(indexCount)") + "/index.sqlite"
        do {
            let index = try IndexBenchmarkHandle(path: path)
            if index.blobCount < indexCount {
                print("building the \(indexCount)-id index at \(path) (once) …")
                var i = index.blobCount
                while i < indexCount {
                    let batch = (i..<min(indexCount, i + 10_000)).map(blobID)
                    try index.addPack(blobID(-1 - i), ids: batch)
                    i += batch.count
                }
            }
            // The first question builds the absent-id filter and the sorted id table from
            // the rows (when no saved ones match) and saves them, as the first snapshot
            // after an upgrade would.
            _ = try index.contains(blobID(0))
        }
        // Even k: a stored id (spread over the whole range); odd k: never stored.
        let ids = (0..<1_000_000).map { k in k % 2 == 0 ? blobID((k &* 7_919) % indexCount) : blobID(indexCount + k) }
        var missing = 0
        benchmark.startMeasurement()
        let t = try seconds {
            // Opened afresh (the saved filter is read and checked) each time, then asked in
            // batches of 1,000 per read transaction, as the archiver asks.
            let index = try IndexBenchmarkHandle(path: path)
            for start in stride(from: 0, to: ids.count, by: 1000) {
                missing += try index.missing(Array(ids[start..<start + 1000])).count
            }
        }
        benchmark.stopMeasurement()
        precondition(missing == 500_000, "index lookups found \(missing) missing, expected 500000")
        benchmark.measurement(lookupsPerSecond, Int(1_000_000 / t))
    }

    Benchmark(
        "Index: insert 1M ids in packs of 10k",
        configuration: .init(metrics: [.wallClock, .peakMemoryResident, insertsPerSecond], maxIterations: 3)
    ) { benchmark in
        let dir = scratchDirectory("index-insert")
        remove(dir + "/index.sqlite")
        let index = try IndexBenchmarkHandle(path: dir + "/index.sqlite")
        let t = try seconds {
            for p in 0..<100 {
                try index.addPack(blobID(-1 - p), ids: (p * 10_000..<(p + 1) * 10_000).map(blobID))
            }
        }
        benchmark.measurement(insertsPerSecond, Int(1_000_000 / t))
        remove(dir)
    }

    // MARK: End to end

    // Source data is written once per benchmark process; every iteration backs it up into
    // a fresh repository with the shipped defaults (fsync on), or restores it.
    struct Dataset: Sendable {
        let name: String
        let write: @Sendable (String) throws -> Int
    }
    let datasets = [
        Dataset(name: "one 512 MiB random file") { dir in
            try Data(randomBytes(512 << 20, seed: 3)).write(to: URL(fileURLWithPath: dir + "/random.bin"))
            return 512 << 20
        },
        Dataset(name: "one 512 MiB text file") { dir in
            try Data(textBytes(512 << 20, seed: 4)).write(to: URL(fileURLWithPath: dir + "/text.txt"))
            return 512 << 20
        },
        Dataset(name: "one 512 MiB file of zeros") { dir in
            try Data(count: 512 << 20).write(to: URL(fileURLWithPath: dir + "/zeros"))
            return 512 << 20
        },
        Dataset(name: "20,000 small files (8 KiB text)") { dir in
            let text = textBytes(8 << 10 * 64, seed: 5)
            for i in 0..<20_000 {
                let sub = dir + "/d\(i / 500)"
                if i % 500 == 0 {
                    try FileManager.default.createDirectory(atPath: sub, withIntermediateDirectories: true)
                }
                let off = (i % 64) * (8 << 10)
                try Data(text[off..<off + (8 << 10)] + Array("\(i)".utf8)).write(
                    to: URL(fileURLWithPath: sub + "/f\(i)"))
            }
            return 20_000 * (8 << 10)
        },
    ]

    for (k, ds) in datasets.enumerated() {
        let base = scratchDirectory("e2e-\(k)")
        let source = base + "/source"
        nonisolated(unsafe) var size = 0
        func prepare() throws {
            if size == 0 {
                remove(source)
                try FileManager.default.createDirectory(atPath: source, withIntermediateDirectories: true)
                size = try ds.write(source)
            }
        }
        // Encrypted (the shipped default) and plaintext, to measure what encryption costs.
        for encrypted in [true, false] {
            let name = encrypted ? "Snapshot: \(ds.name)" : "Snapshot, no encryption: \(ds.name)"
            Benchmark(name, configuration: .init(maxIterations: 5)) { benchmark in
                try prepare()
                remove(base + "/repo")
                let repo = try Repository.initialize(path: base + "/repo", password: encrypted ? "benchmark" : nil)
                sync()
                benchmark.startMeasurement()
                let t = try seconds { _ = try repo.snapshot(paths: [source]) }
                benchmark.stopMeasurement()
                benchmark.measurement(mbps, Int(Double(size) / megabyte / t))
            }
        }
        Benchmark("Restore: \(ds.name)", configuration: .init(maxIterations: 5)) { benchmark in
            try prepare()
            if !FileManager.default.fileExists(atPath: base + "/restore-repo/config") {
                remove(base + "/restore-repo")
                _ = try Repository.initialize(path: base + "/restore-repo", password: "benchmark").snapshot(
                    paths: [source])
            }
            let repo = try Repository.open(path: base + "/restore-repo", password: "benchmark")
            let snap = try repo.findSnapshot("latest")
            remove(base + "/out")
            sync()  // no writeback of earlier iterations inside this one
            benchmark.startMeasurement()
            let t = try seconds { _ = try repo.restore(snap, to: base + "/out") }
            benchmark.stopMeasurement()
            benchmark.measurement(mbps, Int(Double(size) / megabyte / t))
            remove(base + "/out")
        }
    }
}
