// swift-tools-version: 6.1
// A separate package that uses cabackup as a library, exactly as the README shows.
import PackageDescription

let package = Package(
    name: "LibraryExample",
    dependencies: [.package(name: "cabackup", path: "../..")],
    targets: [
        .executableTarget(
            name: "LibraryExample",
            dependencies: [.product(name: "CABackup", package: "cabackup")]
        )
    ],
    swiftLanguageModes: [.v6]
)
