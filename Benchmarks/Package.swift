// swift-tools-version: 6.1
// The benchmark suite, a package of its own so that building cabackup (and CI) does not
// build the benchmark framework. Run from this directory: `swift package benchmark`.
import PackageDescription

let package = Package(
    name: "cabackup-benchmarks",
    platforms: [.macOS(.v14)],
    dependencies: [
        .package(name: "cabackup", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "CABackupBenchmarks",
            dependencies: [
                .product(name: "CABackup", package: "cabackup"),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/CABackupBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        )
    ],
    swiftLanguageModes: [.v6]
)
