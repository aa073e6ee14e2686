import NIOCore
import NIOHTTP1
import NIOPosix

/// `--metrics HOST:PORT`: Prometheus text at `GET /metrics` on a loopback listener (no TLS, no
/// authentication: loopback only, checked when the flag is parsed). Anything else is 404 (405 for
/// another method on /metrics).
enum MetricsEndpoint {
    static func bind(host: String, port: Int, metrics: ProxyMetrics, group: any EventLoopGroup) async throws -> any Channel {
        do {
            return try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                        try channel.pipeline.syncOperations.addHandler(MetricsHandler(metrics: metrics))
                    }
                }
                .bind(host: host, port: port).get()
        } catch {
            throw ProxyError(.bind, "cannot listen on --metrics \(host):\(port): \(error)")
        }
    }
}

final class MetricsHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let metrics: ProxyMetrics
    private var head: HTTPRequestHead?

    init(metrics: ProxyMetrics) {
        self.metrics = metrics
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
        case .body:
            break
        case .end:
            guard let head else { return }
            self.head = nil
            let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
            let status: HTTPResponseStatus
            let text: String
            var contentType = "text/plain; charset=utf-8"
            if path != "/metrics" {
                status = .notFound
                text = "not found: the metrics are at GET /metrics\n"
            } else if head.method != .GET && head.method != .HEAD {
                status = .methodNotAllowed
                text = "use GET /metrics\n"
            } else {
                status = .ok
                text = metrics.text()
                contentType = "text/plain; version=0.0.4; charset=utf-8"
            }
            var body = context.channel.allocator.buffer(capacity: text.utf8.count)
            body.writeString(text)
            var headers = HTTPHeaders([("content-type", contentType), ("content-length", "\(body.readableBytes)")])
            if !head.isKeepAlive { headers.add(name: "connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
            if head.method != .HEAD { context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil) }
            let keepAlive = head.isKeepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
                if !keepAlive { context.close(promise: nil) }
            }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
