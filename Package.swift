// swift-tools-version: 6.1
import PackageDescription

/// Test hooks (cheap key slots, a file changed during its read) exist only in debug builds,
/// which the test suite runs; the release binary users run has none of them.
let testHooks: [SwiftSetting] = [.define("CABACKUP_TEST_HOOKS", .when(configuration: .debug))]

let package = Package(
    name: "cabackup",
    platforms: [.macOS(.v14)],
    products: [
        // The engine and local repositories: builds and links no network stack.
        .library(name: "CABackup", targets: ["CABackup"]),
        // Remote storages (a private data space on a cabackup server over HTTP(S)).
        .library(name: "CABackupRemote", targets: ["CABackupRemote"]),
        // Snapshots as a read-only file system through FUSE (links libfuse 3 on Linux).
        .library(name: "CABackupMount", targets: ["CABackupMount"]),
        .executable(name: "cabackup", targets: ["cabackup"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
        .package(url: "https://github.com/apple/swift-nio-extras", from: "1.34.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // The only places C headers are imported (and the one piece of C we write).
        .systemLibrary(name: "CLZ4", providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "CZstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "COpenSSL", providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CSQLite", providers: [.apt(["libsqlite3-dev"])]),
        .systemLibrary(name: "CFuse3", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        // scrypt's ROMix in C with SSE2 (Swift's SIMD types do not compile its shuffles).
        .target(name: "CScrypt"),
        // <sys/xattr.h> (extended attributes), which Swift's Glibc module leaves out.
        .target(name: "CFileMetadata"),
        // The engine, in layers whose imports point one way (docs/architecture.md):
        // core (ids, errors, bytes, threads, POSIX, SQLite) ← format (pure codecs),
        // storage (the seam) ← CABackup (repository, snapshots; re-exports the layers below).
        .target(
            name: "CABackupCore",
            dependencies: ["CSQLite"],
            swiftSettings: testHooks
        ),
        .target(
            name: "CABackupFormat",
            dependencies: ["CABackupCore", "CLZ4", "CZstd", "COpenSSL", "CScrypt"],
            swiftSettings: testHooks
        ),
        // The storage seam: the protocol over named files, the registry by URL scheme,
        // local directories and lock objects. Knows nothing of packs, indexes or snapshots.
        .target(
            name: "CABackupStorage",
            dependencies: ["CABackupCore", "CABackupFormat"],
            swiftSettings: testHooks
        ),
        .target(
            name: "CABackup",
            dependencies: ["CABackupCore", "CABackupFormat", "CABackupStorage", "CSQLite", "COpenSSL", "CFileMetadata"],
            swiftSettings: testHooks
        ),
        // `cabackup mount`: the snapshot namespace and its FUSE server. Its own target, so
        // neither library users nor systems without libfuse 3 (macOS) need it.
        .target(
            name: "CABackupMount",
            dependencies: ["CABackup", .target(name: "CFuse3", condition: .when(platforms: [.linux]))]
        ),
        // The client of a private data space: HTTPStorage, accounts, tokens. The only
        // target of the engine's that links SwiftNIO and AsyncHTTPClient.
        .target(
            name: "CABackupRemote",
            dependencies: [
                "CABackup",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        // The private-data-space server: accounts, tokens and one repository per user; the
        // accounts in SQLite, or in PostgreSQL shared by several instances.
        .target(
            name: "CABackupServer",
            dependencies: [
                "CABackup",
                "CABackupRemote",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        // `cabackup ui`: the device's own web app on a loopback address (docs/ui.md): the
        // device configuration, the page and its JSON API.
        .target(
            name: "CABackupUI",
            dependencies: [
                "CABackup",
                "CABackupRemote",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "cabackup",
            dependencies: [
                "CABackup",
                "CABackupRemote",
                "CABackupServer",
                "CABackupMount",
                "CABackupUI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: testHooks
        ),
        // The README's library example, compiled from the very file the README quotes.
        .executableTarget(
            name: "library-example",
            dependencies: ["CABackup"],
            path: "Examples/LibraryExample/Sources/LibraryExample"
        ),
        .testTarget(
            name: "CABackupTests",
            dependencies: ["CABackup", "CABackupRemote"]
        ),
        .testTarget(
            name: "CLITests",
            dependencies: [
                "cabackup", "library-example", "CABackup", "CABackupRemote", "CABackupServer", "CABackupMount",
                "CABackupUI",
            ],
            exclude: ["treetool.py", "httptool.py", "hostileproxy.py", "abusetool.py", "repotool.py", "uitool.py", "uibrowser.py"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
