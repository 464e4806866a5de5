// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "cabackup",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "CABackup", targets: ["CABackup"]),
        .executable(name: "cabackup", targets: ["cabackup"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2")
    ],
    targets: [
        // The only places C headers are imported.
        .systemLibrary(name: "CLZ4", providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "COpenSSL", providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CSQLite", providers: [.apt(["libsqlite3-dev"])]),
        .target(
            name: "CABackup",
            dependencies: ["CLZ4", "COpenSSL", "CSQLite"]
        ),
        .executableTarget(
            name: "cabackup",
            dependencies: [
                "CABackup",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // The README's library example, compiled from the very file the README quotes.
        .executableTarget(
            name: "library-example",
            dependencies: ["CABackup"],
            path: "Examples/LibraryExample/Sources/LibraryExample"
        ),
        .testTarget(
            name: "CABackupTests",
            dependencies: ["CABackup"]
        ),
        .testTarget(
            name: "CLITests",
            dependencies: ["cabackup", "library-example", "CABackup"],
            exclude: ["treetool.py"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
