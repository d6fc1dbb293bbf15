// swift-tools-version:6.2
import PackageDescription

let package = Package(
    name: "SwiftP2P",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "P2PKernel", targets: ["P2PKernel"]),
        .library(name: "P2PTesting", targets: ["P2PTesting"]),
        .executable(name: "p2p", targets: ["p2p"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
    ],
    targets: [
        .target(
            name: "P2PKernel",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "P2PTesting",
            dependencies: ["P2PKernel"]
        ),
        .executableTarget(
            name: "p2p",
            dependencies: [
                "P2PKernel", "P2PTesting",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "P2PKernelTests",
            dependencies: ["P2PKernel", "P2PTesting"]
        ),
    ]
)
