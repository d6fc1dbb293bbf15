import Foundation
import Hummingbird
import Logging
import NIOCore
import P2PKernel
import Prometheus

/// A node's metrics, kept in a Prometheus registry of its own.
///
/// ```swift
/// let exporter = MetricsExporter()
/// let node = try await Node.builder().metrics(exporter.factory).start()
/// print(exporter.text())   // the Prometheus text format
/// ```
public final class MetricsExporter: Sendable {
    public let registry: PrometheusCollectorRegistry
    /// Hand this to `NodeBuilder.metrics(_:)`.
    public let factory: PrometheusMetricsFactory

    public init() {
        registry = PrometheusCollectorRegistry()
        var f = PrometheusMetricsFactory(registry: registry)
        // RPC round trips on loopback take tens of microseconds; across the Internet, hundreds
        // of milliseconds; a timeout is seconds.
        f.defaultDurationHistogramBuckets = [
            .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2.5), .milliseconds(5),
            .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
            .seconds(1), .seconds(2.5), .seconds(5),
        ]
        factory = f
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4).
    public func text() -> String { registry.emitToString() }
}

/// What `StatusServer` serves.
public struct StatusRoutes: OptionSet, Sendable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }
    /// `GET /metrics`: the Prometheus text format.
    public static let metrics = StatusRoutes(rawValue: 1)
    /// `GET /` (the page), `GET /status.json`, `GET /status.part` (the page's body, for its refresh).
    public static let status = StatusRoutes(rawValue: 2)
}

/// Serves a node's `/metrics` and its live status page over HTTP (Hummingbird).
///
/// Everything shown comes from `Node.status()`; text that peers influence (addresses, reasons,
/// plugin rows) is escaped before it reaches the page. Only GET routes exist; bind it to
/// 127.0.0.1 (the CLI's default) unless the network in front of it is trusted.
public enum StatusServer {
    /// An HTTP application for `node` on `host:port` (port 0 picks one; `onRunning` gets the
    /// bound port). Run it with `run()` or in a `ServiceGroup`.
    public static func application(node: Node, host: String, port: Int, routes: StatusRoutes, exporter: MetricsExporter?,
                                   refreshSeconds: Int = 2, logger: Logger = Logger(label: "swiftp2p.status"),
                                   onRunning: @escaping @Sendable (Int) async -> Void = { _ in }) -> some ApplicationProtocol {
        let router = Router()
        if routes.contains(.metrics), let exporter {
            router.get("metrics") { _, _ -> Response in
                Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                         body: .init(byteBuffer: ByteBuffer(string: exporter.text())))
            }
        }
        if routes.contains(.status) {
            router.get("status.json") { _, _ -> Response in
                let status = try await node.status()
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                let data = try encoder.encode(status)
                return Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: data)))
            }
            router.get("status.part") { _, _ -> Response in
                html(StatusPage.body(try await node.status(), bucketSize: node.config.peerMap.bucketSize))
            }
            router.get("/") { _, _ -> Response in
                html(StatusPage.page(try await node.status(), bucketSize: node.config.peerMap.bucketSize, refreshSeconds: refreshSeconds))
            }
        }
        return Application(router: router, configuration: .init(address: .hostname(host, port: port), serverName: nil),
                           onServerRunning: { channel in await onRunning(channel.localAddress?.port ?? port) },
                           logger: logger)
    }

    private static func html(_ text: String) -> Response {
        Response(status: .ok, headers: [.contentType: "text/html; charset=utf-8", .cacheControl: "no-store"],
                 body: .init(byteBuffer: ByteBuffer(string: text)))
    }
}
