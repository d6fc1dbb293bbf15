import P2PAddress
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import SWXMLHash

/// Why an Internet Gateway Device refused or failed.
public enum UPnPError: Error, Equatable, Sendable, CustomStringConvertible {
    /// No IGD answered the SSDP search.
    case noGateway
    /// The device description has no WANIPConnection or WANPPPConnection service.
    case noConnectionService
    /// A SOAP fault with its UPnP error code (718 conflict, 725 permanent leases only, …).
    case fault(code: Int, description: String)
    /// HTTP or XML trouble.
    case http(String)

    public var description: String {
        switch self {
        case .noGateway: "no UPnP gateway answered"
        case .noConnectionService: "the UPnP gateway offers no WAN connection service"
        case .fault(let c, let d): "UPnP error \(c) \(d)"
        case .http(let w): "UPnP gateway: \(w)"
        }
    }
}

/// A UPnP Internet Gateway Device, found by SSDP and described by its rootDesc: the control URL
/// of its WANIPConnection (v2 or v1) or WANPPPConnection service.
public struct UPnPGateway: Sendable {
    public let location: String
    public let controlURL: String
    public let serviceType: String
    let loop: any EventLoop

    /// Bounds: a gateway's answers are claims like any other.
    static let maxBody = 64 << 10
    static let httpTimeout: TimeAmount = .seconds(2)

    /// Searches the LAN (SSDP M-SEARCH to 239.255.255.250:1900, sent twice, 300 ms apart) and
    /// takes the first IGD that answers within `wait`, preferring `preferred` (the default gateway).
    public static func discover(on loop: any EventLoop, preferred: IPAddress?, wait: TimeAmount = .seconds(1)) async throws -> UPnPGateway {
        let targets = ["urn:schemas-upnp-org:device:InternetGatewayDevice:2", "urn:schemas-upnp-org:device:InternetGatewayDevice:1"]
        let search = targets.map { st in
            Array("M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\nST: \(st)\r\n\r\n".utf8)
        }
        let found = NIOLockedValueBox<[(IPAddress?, String)]>([])
        let first = Once(loop.makePromise(of: Void.self))
        final class Listener: ChannelInboundHandler, @unchecked Sendable {
            typealias InboundIn = AddressedEnvelope<ByteBuffer>
            let onReply: (IPAddress?, String) -> Void
            init(_ onReply: @escaping (IPAddress?, String) -> Void) { self.onReply = onReply }
            func channelRead(context: ChannelHandlerContext, data: NIOAny) {
                let e = unwrapInboundIn(data)
                guard e.data.readableBytes < 4096 else { return }
                let text = String(decoding: e.data.readableBytesView, as: UTF8.self)
                for line in text.split(separator: "\r\n") where line.lowercased().hasPrefix("location:") {
                    let url = line.dropFirst("location:".count).trimmingCharacters(in: .whitespaces)
                    // The description must live on the host that answered: an answer naming another
                    // host would have us send requests wherever anyone on the LAN likes.
                    guard let from = IPAddress(e.remoteAddress), let host = URL(string: url)?.host, IPAddress(host) == from else { continue }
                    onReply(from, url)
                }
            }
        }
        let channel = try await DatagramBootstrap(group: loop)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(Listener { ip, url in
                        found.withLockedValue { $0.append((ip, url)) }
                        // The default gateway's answer ends the search; another waits for the deadline.
                        if preferred == nil || ip == preferred { first.succeed(()) }
                    })
                }
            }
            .bind(host: "0.0.0.0", port: 0).get()
        defer { channel.close(promise: nil) }
        let group = try SocketAddress(ipAddress: "239.255.255.250", port: 1900)
        for delay in [TimeAmount.zero, .milliseconds(300)] {
            loop.scheduleTask(in: delay) {
                for m in search {
                    var b = channel.allocator.buffer(capacity: m.count)
                    b.writeBytes(m)
                    channel.writeAndFlush(AddressedEnvelope(remoteAddress: group, data: b), promise: nil)
                }
            }
        }
        let deadline = loop.scheduleTask(in: wait) { first.succeed(()) }
        try await first.futureResult.get()
        deadline.cancel()
        let replies = found.withLockedValue { $0 }
        guard let (_, location) = replies.first(where: { $0.0 == preferred }) ?? replies.first else { throw UPnPError.noGateway }
        return try await describe(location: location, on: loop)
    }

    /// Reads the device description at `location` and picks the WAN connection service:
    /// WANIPConnection:2, then :1, then WANPPPConnection:1.
    public static func describe(location: String, on loop: any EventLoop) async throws -> UPnPGateway {
        let (status, body) = try await HTTP.request(method: .GET, url: location, headers: [], body: nil, on: loop)
        guard status == 200 else { throw UPnPError.http("GET \(location): status \(status)") }
        let xml = XMLHash.config { $0.shouldProcessNamespaces = true }.parse(String(decoding: body, as: UTF8.self))
        var services: [(type: String, control: String)] = []
        func walk(_ node: XMLIndexer) {
            for child in node.children {
                if child.element?.name == "service", let type = child["serviceType"].element?.text, let control = child["controlURL"].element?.text {
                    services.append((type.trimmingCharacters(in: .whitespacesAndNewlines), control.trimmingCharacters(in: .whitespacesAndNewlines)))
                }
                walk(child)
            }
        }
        walk(xml)
        let order = ["urn:schemas-upnp-org:service:WANIPConnection:2", "urn:schemas-upnp-org:service:WANIPConnection:1",
                     "urn:schemas-upnp-org:service:WANPPPConnection:1"]
        guard let pick = order.lazy.compactMap({ t in services.first { $0.type == t } }).first else { throw UPnPError.noConnectionService }
        let base = xml["root"]["URLBase"].element.map { $0.text.trimmingCharacters(in: .whitespacesAndNewlines) }.flatMap { $0.isEmpty ? nil : $0 }
        guard let control = URL(string: pick.control, relativeTo: URL(string: base ?? location))?.absoluteString,
              control.hasPrefix("http://"), URL(string: control)?.host == URL(string: location)?.host else {
            throw UPnPError.http("control URL \(pick.control) is not an http URL on the gateway's own host")
        }
        return UPnPGateway(location: location, controlURL: control, serviceType: pick.type, loop: loop)
    }

    /// Whether this is an IGD v2 service (it has AddAnyPortMapping).
    public var isV2: Bool { serviceType.hasSuffix(":2") }

    public func externalAddress() async throws -> IPAddress {
        let r = try await soap("GetExternalIPAddress", [])
        guard let text = r["NewExternalIPAddress"], let ip = IPAddress(text) else { throw UPnPError.http("no external address in the answer") }
        return ip
    }

    /// Adds a mapping external → `client`:`internalPort`; returns the external port granted.
    public func addMapping(_ p: MappingProtocol, externalPort: UInt16, internalPort: UInt16, client: IPAddress,
                           lease: UInt32, description: String) async throws -> UInt16 {
        let args: [(String, String)] = [("NewRemoteHost", ""), ("NewExternalPort", "\(externalPort)"), ("NewProtocol", p.rawValue.uppercased()),
                                        ("NewInternalPort", "\(internalPort)"), ("NewInternalClient", "\(client)"), ("NewEnabled", "1"),
                                        ("NewPortMappingDescription", description), ("NewLeaseDuration", "\(lease)")]
        do {
            _ = try await soap("AddPortMapping", args)
            return externalPort
        } catch UPnPError.fault(let code, _) where code == 725 && lease != 0 {
            // "Only permanent leases supported" (IGD v1): ask for one; it is deleted at shutdown.
            return try await addMapping(p, externalPort: externalPort, internalPort: internalPort, client: client, lease: 0, description: description)
        } catch UPnPError.fault(let code, _) where code == 718 && isV2 {
            // The port is taken: let the gateway pick one.
            let r = try await soap("AddAnyPortMapping", args)
            guard let port = r["NewReservedPort"].flatMap(UInt16.init) else { throw UPnPError.http("AddAnyPortMapping gave no port") }
            return port
        }
    }

    public func deleteMapping(_ p: MappingProtocol, externalPort: UInt16) async throws {
        _ = try await soap("DeletePortMapping", [("NewRemoteHost", ""), ("NewExternalPort", "\(externalPort)"), ("NewProtocol", p.rawValue.uppercased())])
    }

    /// Whether a mapping exists (GetSpecificPortMappingEntry; 714 means no).
    public func hasMapping(_ p: MappingProtocol, externalPort: UInt16) async throws -> Bool {
        do {
            _ = try await soap("GetSpecificPortMappingEntry", [("NewRemoteHost", ""), ("NewExternalPort", "\(externalPort)"), ("NewProtocol", p.rawValue.uppercased())])
            return true
        } catch UPnPError.fault(let code, _) where code == 714 || code == 730 {
            return false
        }
    }

    /// One SOAP call; returns the answer's out-arguments by name.
    func soap(_ action: String, _ args: [(String, String)]) async throws -> [String: String] {
        let body = "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" "
            + "s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><u:\(action) xmlns:u=\"\(serviceType)\">"
            + args.map { "<\($0.0)>\(UPnPGateway.escape($0.1))</\($0.0)>" }.joined() + "</u:\(action)></s:Body></s:Envelope>\r\n"
        let (status, reply) = try await HTTP.request(method: .POST, url: controlURL,
                                                     headers: [("Content-Type", "text/xml; charset=\"utf-8\""), ("SOAPAction", "\"\(serviceType)#\(action)\"")],
                                                     body: Array(body.utf8), on: loop)
        let xml = XMLHash.config { $0.shouldProcessNamespaces = true }.parse(String(decoding: reply, as: UTF8.self))
        let content = xml["Envelope"]["Body"]
        if status != 200 {
            let detail = content["Fault"]["detail"]["UPnPError"]
            let code = detail["errorCode"].element.flatMap { Int($0.text.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? status
            throw UPnPError.fault(code: code, description: detail["errorDescription"].element?.text ?? "HTTP \(status)")
        }
        var out: [String: String] = [:]
        for child in content["\(action)Response"].children {
            if let e = child.element { out[e.name] = e.text }
        }
        return out
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}

/// A minimal HTTP/1.1 client on SwiftNIO for the gateway's description and SOAP: one request per
/// connection, a 2-second budget and a 64-KiB cap on the answer.
enum HTTP {
    private final class Collector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = HTTPClientResponsePart
        let promise: Once<(Int, [UInt8])>
        var status = 0
        var body: [UInt8] = []
        init(_ promise: Once<(Int, [UInt8])>) { self.promise = promise }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): status = Int(h.status.code)
            case .body(let b):
                guard body.count + b.readableBytes <= UPnPGateway.maxBody else {
                    promise.fail(UPnPError.http("answer over \(UPnPGateway.maxBody) bytes"))
                    context.close(promise: nil)
                    return
                }
                body += b.readableBytesView
            case .end:
                promise.succeed((status, body))
                context.close(promise: nil)
            }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            promise.fail(error)
            context.close(promise: nil)
        }
        func channelInactive(context: ChannelHandlerContext) {
            promise.fail(UPnPError.http("connection closed before the answer"))
        }
    }

    static func request(method: HTTPMethod, url: String, headers: [(String, String)], body: [UInt8]?,
                        on loop: any EventLoop) async throws -> (Int, [UInt8]) {
        guard let u = URL(string: url), u.scheme == "http", let host = u.host, let ip = IPAddress(host) else {
            throw UPnPError.http("not an http URL with an IP address: \(url)")
        }
        let port = u.port ?? 80
        let path = u.path.isEmpty ? "/" : u.path + (u.query.map { "?\($0)" } ?? "")
        let promise = Once(loop.makePromise(of: (Int, [UInt8]).self))
        let timeout = loop.scheduleTask(in: UPnPGateway.httpTimeout) { promise.fail(UPnPError.http("no answer from \(host):\(port) in time")) }
        defer { timeout.cancel() }
        let channel = try await ClientBootstrap(group: loop)
            .connectTimeout(UPnPGateway.httpTimeout)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHTTPClientHandlers()
                    try ch.pipeline.syncOperations.addHandler(Collector(promise))
                }
            }
            .connect(to: ip.socketAddress(port: UInt16(clamping: port))).get()
        var head = HTTPRequestHead(version: .http1_1, method: method, uri: path)
        head.headers.add(name: "Host", value: "\(host):\(port)")
        head.headers.add(name: "Connection", value: "close")
        for (n, v) in headers { head.headers.add(name: n, value: v) }
        head.headers.add(name: "Content-Length", value: "\(body?.count ?? 0)")
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        if let body {
            var b = channel.allocator.buffer(capacity: body.count)
            b.writeBytes(body)
            channel.write(HTTPClientRequestPart.body(.byteBuffer(b)), promise: nil)
        }
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        defer { channel.close(promise: nil) }
        return try await promise.futureResult.get()
    }
}
