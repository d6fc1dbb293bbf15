// swift-tools-version:6.0
// A SwiftP2P plugin: `swift build -c release` (or `p2p plugin build .`) produces lib<Product>.so,
// which a node loads with `p2p node --plugin PATH`. SDK/ holds the plugin SDK and the C ABI
// header, compiled into the plugin: it needs nothing else.
import PackageDescription

let package = Package(
    name: "PeerVoteLoadable",
    products: [.library(name: "PeerVoteLoadable", type: .dynamic, targets: ["PeerVoteLoadable"])],
    targets: [
        .target(name: "P2PPluginABI", path: "SDK/P2PPluginABI"),
        .target(name: "P2PPluginSDK", dependencies: ["P2PPluginABI"], path: "SDK/P2PPluginSDK"),
        .target(name: "PeerVoteLoadable", dependencies: ["P2PPluginSDK"]),
    ]
)
