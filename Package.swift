// swift-tools-version:6.2
import PackageDescription

let package = Package(
    name: "SwiftP2P",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "P2PKernel", targets: ["P2PKernel"]),
        .library(name: "P2PPortMapping", targets: ["P2PPortMapping"]),
        .library(name: "P2PTesting", targets: ["P2PTesting"]),
        .library(name: "P2PStorage", targets: ["P2PStorage"]),
        .library(name: "P2PDHT", targets: ["P2PDHT"]),
        .library(name: "P2PMessaging", targets: ["P2PMessaging"]),
        .library(name: "P2PEvaluation", targets: ["P2PEvaluation"]),
        .library(name: "P2PPeerVote", targets: ["P2PPeerVote"]),
        .library(name: "P2PReplication", targets: ["P2PReplication"]),
        .library(name: "P2PTracker", targets: ["P2PTracker"]),
        .library(name: "P2PSQLite", targets: ["P2PSQLite"]),
        .library(name: "P2PLoader", targets: ["P2PLoader"]),
        .library(name: "P2PWasm", targets: ["P2PWasm"]),
        .library(name: "P2PPluginHost", targets: ["P2PPluginHost"]),
        .executable(name: "p2p", targets: ["p2p"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/drmohundro/SWXMLHash.git", from: "8.1.1"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        // SQLite storage (Debian's libsqlite3-dev).
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        // Metrics: the kernel records through swift-metrics' API only; Prometheus, the status
        // page's HTTP server and the lifecycle live in their own targets.
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1", traits: []),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        // WebAssembly plugins: an interpreter with fuel metering and memory limits.
        .package(url: "https://github.com/swiftwasm/WasmKit.git", from: "0.4.2"),
    ],
    targets: [
        // IP addresses, which the kernel and the port-mapping clients share (re-exported by the kernel).
        .target(name: "P2PAddress", dependencies: [.product(name: "NIOCore", package: "swift-nio")]),
        // UPnP IGD, PCP and NAT-PMP clients (HTTP, XML): the kernel's NAT ladder uses them, they
        // are not part of it.
        .target(
            name: "P2PPortMapping",
            dependencies: [
                "P2PAddress",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                // UPnP gateways describe themselves in XML.
                .product(name: "SWXMLHash", package: "SWXMLHash"),
            ]
        ),
        .target(
            name: "P2PKernel",
            dependencies: [
                "P2PAddress", "P2PPortMapping",
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "HeapModule", package: "swift-collections"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ]
        ),
        // The data model every storage plugin shares (values, TTL, versions, signatures,
        // protection, queries), the storage pipeline and the memory backend: not the kernel.
        .target(
            name: "P2PStorage",
            dependencies: [
                "P2PKernel",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "HeapModule", package: "swift-collections"),
            ]
        ),
        // In-process testnets: on loopback sockets, or on the simulated network (virtual time,
        // latency, loss, partitions, NAT, one seed).
        .target(
            name: "P2PTesting",
            dependencies: [
                "P2PKernel",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "HeapModule", package: "swift-collections"),
            ]
        ),
        // libffi (Debian's libffi-dev), for manifest-declared C functions.
        .systemLibrary(name: "CFFI", pkgConfig: "libffi", providers: [.apt(["libffi-dev"])]),
        // What a node needs to call code it does not trust to be quick or small — a loaded .so or
        // a WebAssembly module: bounded calls, the executor they run on, the result codes both
        // ABIs share. Not the kernel's.
        .target(
            name: "P2PPluginHost",
            dependencies: [
                "P2PEvaluation",
                "P2PKernel",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The C ABI of loadable plugins: header only.
        .target(name: "P2PPluginABI"),
        // What plugin authors link statically into their .so: Swift protocols over the C ABI.
        .target(name: "P2PPluginSDK", dependencies: ["P2PPluginABI"]),
        // dlopen + ABI checks; adapts a loaded plugin's callbacks into registry conformances.
        .target(
            name: "P2PLoader",
            dependencies: [
                "P2PKernel", "P2PStorage", "P2PEvaluation", "P2PPluginHost", "P2PPluginABI", "CFFI",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // WebAssembly plugins in WasmKit: fuel per call, a memory limit per instance, reload.
        .target(
            name: "P2PWasm",
            dependencies: [
                "P2PKernel", "P2PStorage", "P2PEvaluation", "P2PPluginHost",
                .product(name: "WasmKit", package: "WasmKit"),
                .product(name: "WasmParser", package: "WasmKit"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Built-in plugins: each uses only the kernel's public registry API.
        .target(name: "P2PDHT", dependencies: ["P2PKernel", "P2PStorage", "P2PEvaluation", .product(name: "NIOCore", package: "swift-nio")], path: "Plugins/DHT"),
        .target(name: "P2PMessaging", dependencies: ["P2PKernel", .product(name: "NIOCore", package: "swift-nio")], path: "Plugins/Messaging"),
        .target(name: "P2PEvaluation", dependencies: ["P2PKernel"], path: "Plugins/Evaluation"),
        .target(name: "P2PPeerVote", dependencies: ["P2PKernel", "P2PStorage"], path: "Plugins/PeerVote"),
        .target(name: "P2PReplication", dependencies: ["P2PKernel", "P2PStorage", "P2PDHT", .product(name: "NIOCore", package: "swift-nio"),
                                                       .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                                                       .product(name: "DequeModule", package: "swift-collections"),
                                                       .product(name: "Crypto", package: "swift-crypto")], path: "Plugins/Replication"),
        .target(name: "P2PTracker", dependencies: ["P2PKernel", .product(name: "NIOCore", package: "swift-nio"),
                                                   .product(name: "NIOConcurrencyHelpers", package: "swift-nio")], path: "Plugins/Tracker"),
        // Durable storage and the saved routing table in one SQLite file: its own target, so a
        // node that does not use it does not link SQLite.
        .target(name: "P2PSQLite", dependencies: ["P2PKernel", "P2PStorage", .product(name: "GRDB", package: "GRDB.swift"),
                                                  .product(name: "NIOCore", package: "swift-nio"),
                                                  .product(name: "NIOConcurrencyHelpers", package: "swift-nio")], path: "Plugins/SQLite"),
        // What an operator watches: /metrics in the Prometheus text format and the live status
        // page, served by Hummingbird; a node that does not use them does not link either.
        .target(name: "P2PStatus", dependencies: ["P2PKernel",
                                                  .product(name: "Hummingbird", package: "hummingbird"),
                                                  .product(name: "Prometheus", package: "swift-prometheus"),
                                                  .product(name: "CoreMetrics", package: "swift-metrics"),
                                                  .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                                                  .product(name: "NIOCore", package: "swift-nio"),
                                                  .product(name: "NIOConcurrencyHelpers", package: "swift-nio")]),
        .executableTarget(
            name: "p2p",
            dependencies: [
                "P2PKernel", "P2PStorage", "P2PTesting", "P2PDHT", "P2PMessaging", "P2PEvaluation", "P2PPeerVote", "P2PLoader", "P2PReplication", "P2PTracker",
                "P2PSQLite", "P2PStatus", "P2PWasm", "P2PPluginHost",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Tests, by what they test. The kernel's, routing's and NAT logic's tests run on the
        // simulated network (no sockets, no sleeps); the end-to-end suite keeps real sockets,
        // processes, the NAT lab (namespaces, nftables, miniupnpd), SQLite kill -9 and Chromium.
        .testTarget(name: "P2PKernelTests", dependencies: ["P2PKernel", "P2PTesting"]),
        .testTarget(name: "P2PNATTests", dependencies: ["P2PKernel", "P2PTesting", "P2PPortMapping", "P2PAddress",
                                                        .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                                                        .product(name: "NIOConcurrencyHelpers", package: "swift-nio")]),
        // Helpers the plugin, DHT and storage tests share.
        .target(name: "P2PTestSupport", dependencies: ["P2PKernel", "P2PStorage", "P2PTesting", "P2PDHT", "P2PMessaging", "P2PEvaluation", "P2PPeerVote"],
                path: "Tests/Support"),
        .testTarget(name: "P2PDHTTests",
                    dependencies: ["P2PKernel", "P2PStorage", "P2PTesting", "P2PTestSupport", "P2PDHT", "P2PMessaging", "P2PEvaluation", "P2PPeerVote",
                                   "P2PReplication", "P2PTracker", "P2PStatus", .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "P2PStorageTests",
                    dependencies: ["P2PKernel", "P2PStorage", "P2PTesting", "P2PTestSupport", "P2PDHT", "P2PSQLite", "P2PEvaluation",
                                   .product(name: "Crypto", package: "swift-crypto"), .product(name: "GRDB", package: "GRDB.swift")]),
        .testTarget(
            name: "P2PPluginsTests",
            dependencies: ["P2PKernel", "P2PStorage", "P2PTesting", "P2PTestSupport", "P2PDHT", "P2PMessaging", "P2PEvaluation", "P2PPeerVote",
                           "P2PReplication", "P2PTracker", "P2PSQLite", "P2PStatus", .product(name: "Crypto", package: "swift-crypto")]
        ),
        .testTarget(
            name: "P2PLoaderTests",
            dependencies: ["P2PKernel", "P2PStorage", "P2PTesting", "P2PLoader", "P2PDHT", "P2PMessaging", "P2PEvaluation", "P2PPeerVote", "P2PWasm", "P2PPluginHost"],
            exclude: ["Fixtures"]
        ),
        .testTarget(
            name: "P2PEndToEndTests",
            // P2PDHT: the hostile-peer suite's Sybils answer storage requests like a real peer.
            dependencies: ["P2PKernel", "P2PStorage", "P2PTesting", "P2PDHT"]
        ),
    ]
)
