import ArgumentParser
import NIOCore
import NIOHTTP1
import NIOPosix
import SigilCore

/// `sigil demo app`: the demo's sample service. Answers every request with JSON naming itself, the
/// request, and the caller as its sidecar proxy vouched for it (x-forwarded-client-cert).
struct DemoApp: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "app", abstract: "A sample HTTP service for the demo (plaintext, loopback).", shouldDisplay: false)

    @Option(name: .long, help: "Service name.") var name: String
    @Option(name: .long, help: ArgumentHelp("Listen address.", valueName: "host:port")) var listen: String

    func run() async throws {
        let (host, port) = try parseHostPort(listen, flag: "--listen")
        let name = self.name
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(DemoAppHandler(name: name))
                }
            }
            .bind(host: host, port: port).get()
        try await channel.closeFuture.get()
    }
}

final class DemoAppHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let name: String
    private var head: HTTPRequestHead?
    private var bodyBytes = 0

    init(name: String) { self.name = name }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            bodyBytes = 0
        case .body(let body):
            bodyBytes += body.readableBytes
        case .end:
            guard let head else { return }
            let xfcc = head.headers.first(name: "x-forwarded-client-cert")
            let caller = xfcc?.split(separator: ";").first { $0.hasPrefix("URI=") }.map { String($0.dropFirst(4)) }
            var json = "{\"service\":" + JSONText.quoted(name) + ",\"method\":" + JSONText.quoted(head.method.rawValue)
            json += ",\"path\":" + JSONText.quoted(head.uri) + ",\"caller\":" + (caller.map(JSONText.quoted) ?? "null")
            json += ",\"body_bytes\":\(bodyBytes)}\n"
            var buffer = context.channel.allocator.buffer(capacity: json.utf8.count)
            buffer.writeString(json)
            var headers = HTTPHeaders([("content-type", "application/json"), ("content-length", "\(buffer.readableBytes)")])
            if !head.isKeepAlive { headers.add(name: "connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .ok, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
            let keepAlive = head.isKeepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
                if !keepAlive { context.close(promise: nil) }
            }
            self.head = nil
        }
    }
}
