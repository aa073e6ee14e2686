import Logging
import NIOCore
import NIOHTTP1
import SigilCore

/// Inbound HTTP/1.1: authorizes each request by its head, forwards allowed ones to the app over a
/// pooled keep-alive connection (with `x-forwarded-client-cert`), and relays the app's response as
/// the bytes it sent. One request is in flight at a time; pipelined requests wait their turn, so
/// responses keep their order. Denied requests get Istio's `403 RBAC: access denied`.
final class HTTP1InboundHandler: ChannelDuplexHandler, AppResponseSink {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private struct Active {
        var head: HTTPRequestHead
        var facts: RequestFacts
        var chunked: Bool
        var requestEnded = false
        var responseEnded = false
        /// Body parts that arrived before the app connection was ready.
        var pending: [HTTPServerRequestPart] = []
        var hasBody: Bool
        var retried = false
        var sentDownstream = false
        var discardBody = false
    }

    private let environment: ProxyEnvironment
    private var peer: PeerInfo
    private var context: ChannelHandlerContext?
    private var active: Active?
    private var app: AppConnection?
    private var queue = CircularBuffer<HTTPServerRequestPart>()
    private var closeAfterResponse = false
    private var readPaused = false
    private var wantsRead = false
    private var draining = false

    static let maxQueuedParts = 256

    init(environment: ProxyEnvironment, peer: PeerInfo) {
        self.environment = environment
        self.peer = peer
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    // MARK: inbound from the client

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        queue.append(unwrapInboundIn(data))
        if queue.count > Self.maxQueuedParts { readPaused = true }
        drain()
    }

    /// Hands queued parts to the request they belong to; a part of the next request waits until
    /// the current response is complete. Not re-entrant (``finish()`` calls it from within).
    private func drain() {
        guard !draining else { return }
        draining = true
        defer { draining = false }
        while let part = queue.first {
            if let active, active.requestEnded { break }
            queue.removeFirst()
            dispatch(part)
        }
        if readPaused, queue.count <= Self.maxQueuedParts / 2 {
            readPaused = false
            if wantsRead {
                wantsRead = false
                context?.read()
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
        app?.channel.flush()
    }

    func read(context: ChannelHandlerContext) {
        if readPaused {
            wantsRead = true
        } else {
            context.read()
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if error is HTTPParserError, active == nil || active?.sentDownstream == false {
            // Malformed request: answer 400 (if nothing was sent yet) and close.
            if active == nil {
                var buffer = context.channel.allocator.buffer(capacity: 96)
                buffer.writeStaticString("HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\nconnection: close\r\n\r\nbad request")
                context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
            }
        }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if var active {
            active.facts.status = active.facts.status ?? 499
            environment.record(active.facts.ledgerRow(peer: peer, detail: "client closed the connection before the response completed", environment: environment))
            self.active = nil
        }
        if let app {
            self.app = nil
            let pool = environment.pools.pool(for: context.eventLoop)
            if app.handler.isIdle { pool.release(app) } else { pool.discard(app) }
        }
        self.context = nil
        context.fireChannelInactive()
    }

    private func dispatch(_ part: HTTPServerRequestPart) {
        switch part {
        case .head(let head):
            begin(head)
        case .body(let body):
            guard var active = self.active else { return }
            active.facts.bytesIn += body.readableBytes
            if active.discardBody || !active.facts.decision.allowed {
                self.active = active
                return
            }
            if let app {
                self.active = active
                writeBody(body, chunked: active.chunked, to: app)
            } else {
                active.pending.append(part)
                self.active = active
            }
        case .end(let trailers):
            guard var active = self.active else { return }
            active.requestEnded = true
            if active.facts.decision.allowed, !active.discardBody {
                if let app {
                    if active.chunked { writeEnd(trailers, to: app) }
                    app.channel.flush()
                } else {
                    active.pending.append(part)
                }
            }
            self.active = active
            if active.responseEnded { finish() }
        }
    }

    private func begin(_ head: HTTPRequestHead) {
        guard let context else { return }
        guard let target = RequestTarget.normalize(head.uri) else {
            var buffer = context.channel.allocator.buffer(capacity: 96)
            buffer.writeStaticString("HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\nconnection: close\r\n\r\nbad request")
            context.writeAndFlush(wrapOutboundOut(buffer)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            queue.removeAll()
            readPaused = true  // nothing more from this connection
            return
        }
        var head = head
        head.uri = target.uri
        if let authority = target.authority { head.headers.replaceOrAdd(name: "host", value: authority) }
        let facts = RequestFacts(head: head, peer: peer, environment: environment, proto: "http/1.1")
        if !head.isKeepAlive { closeAfterResponse = true }
        let length = head.headers.first(name: "content-length").flatMap { Int($0) } ?? 0
        let chunked = RequestHeadWriter.isChunked(head)
        active = Active(head: head, facts: facts, chunked: chunked, hasBody: chunked || length > 0)
        guard facts.decision.allowed else {
            deny(context: context)
            return
        }
        connectApp(context: context, fresh: false)
    }

    private func deny(context: ChannelHandlerContext) {
        guard var active else { return }
        var buffer = context.channel.allocator.buffer(capacity: 128)
        buffer.writeStaticString("HTTP/1.1 403 Forbidden\r\ncontent-length: 19\r\ncontent-type: text/plain\r\n")
        if closeAfterResponse { buffer.writeStaticString("connection: close\r\n") }
        buffer.writeStaticString("\r\nRBAC: access denied")
        active.facts.status = 403
        active.facts.bytesOut = buffer.readableBytes
        active.responseEnded = true
        active.sentDownstream = true
        self.active = active
        context.write(wrapOutboundOut(buffer), promise: nil)
        if active.requestEnded { finish() }
    }

    private func connectApp(context: ChannelHandlerContext, fresh: Bool) {
        let pool = environment.pools.pool(for: context.eventLoop)
        pool.acquire(fresh: fresh) { result in
            switch result {
            case .success(let connection):
                guard self.context != nil, self.active != nil else {
                    pool.release(connection)
                    return
                }
                self.attach(connection)
            case .failure(let error):
                self.failBeforeResponse(status: 502, detail: "app unreachable: \(error)")
            }
        }
    }

    private func attach(_ connection: AppConnection) {
        guard var active else { return }
        app = connection
        connection.handler.begin(sink: self, toHEAD: active.head.method == .HEAD, decodes: false)
        var buffer = connection.channel.allocator.buffer(capacity: 512)
        RequestHeadWriter.write(active.head, xfcc: peer.xfcc, into: &buffer)
        connection.channel.write(buffer, promise: nil)
        let pending = active.pending
        active.pending = []
        self.active = active
        for part in pending {
            switch part {
            case .body(let body): writeBody(body, chunked: active.chunked, to: connection)
            case .end(let trailers): if active.chunked { writeEnd(trailers, to: connection) }
            case .head: break
            }
        }
        connection.channel.flush()
    }

    private func writeBody(_ body: ByteBuffer, chunked: Bool, to connection: AppConnection) {
        guard body.readableBytes > 0 else { return }
        if chunked {
            var buffer = connection.channel.allocator.buffer(capacity: body.readableBytes + 16)
            RequestHeadWriter.writeChunk(body, into: &buffer)
            connection.channel.write(buffer, promise: nil)
        } else {
            connection.channel.write(body, promise: nil)
        }
    }

    private func writeEnd(_ trailers: HTTPHeaders?, to connection: AppConnection) {
        var buffer = connection.channel.allocator.buffer(capacity: 16)
        buffer.writeStaticString("0\r\n")
        if let trailers {
            for (name, value) in trailers {
                buffer.writeString(name)
                buffer.writeStaticString(": ")
                buffer.writeString(value)
                buffer.writeStaticString("\r\n")
            }
        }
        buffer.writeStaticString("\r\n")
        connection.channel.write(buffer, promise: nil)
    }

    /// The app could not be reached or dropped the connection before answering.
    private func failBeforeResponse(status: Int, detail: String) {
        guard let context, var active else { return }
        var buffer = context.channel.allocator.buffer(capacity: 128)
        buffer.writeStaticString(status == 502
            ? "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n"
            : "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n")
        if closeAfterResponse || !active.requestEnded { buffer.writeStaticString("connection: close\r\n") }
        buffer.writeStaticString(status == 502 ? "\r\nupstream failed" : "\r\nupstream failed")
        active.facts.status = status
        active.facts.bytesOut += buffer.readableBytes
        active.responseEnded = true
        active.sentDownstream = true
        if !active.requestEnded {
            active.discardBody = true
            closeAfterResponse = true
        }
        self.active = active
        environment.logger.warning("request failed at the app", metadata: ["detail": "\(detail)", "path": "\(active.facts.path)"])
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        finish(detail: detail)
    }

    // MARK: AppResponseSink

    func appBytes(_ buffer: ByteBuffer) {
        guard let context, var active else { return }
        active.facts.bytesOut += buffer.readableBytes
        active.sentDownstream = true
        self.active = active
        context.write(wrapOutboundOut(buffer), promise: nil)
    }

    func appHead(status: Int, keepAlive: Bool, headers: [(String, String)]) {
        active?.facts.status = status
        if !keepAlive { closeAfterResponse = true }
    }

    func appBody(_ buffer: ByteBuffer) {}

    func appEnd() {
        guard var active else { return }
        active.responseEnded = true
        if !active.requestEnded {
            // The app answered before the whole request body arrived: the connection cannot be reused.
            app?.handler.reusable = false
            active.discardBody = true
        }
        self.active = active
        if active.requestEnded { finish() }
    }

    func appReadComplete() {
        context?.flush()
    }

    func appFailed(receivedAnything: Bool) {
        guard let context, var active else { return }
        let failed = app
        app = nil
        if let failed { environment.pools.pool(for: context.eventLoop).discard(failed) }
        if !receivedAnything, !active.sentDownstream {
            // A pooled connection the app closed while idle: retry once on a fresh one if nothing
            // of the request body could have been consumed.
            if failed?.reused == true, !active.hasBody, !active.retried {
                active.retried = true
                self.active = active
                connectApp(context: context, fresh: true)
                return
            }
            failBeforeResponse(status: 502, detail: "the app closed the connection without answering")
            return
        }
        // Part of the response went out: the client must see the truncation.
        active.facts.status = active.facts.status ?? 502
        self.active = active
        context.close(promise: nil)
    }

    // MARK: completion

    private func finish(detail: String? = nil) {
        guard let context, let active else { return }
        self.active = nil
        context.flush()  // the app connection goes back to the pool now: its read-complete won't reach us
        environment.record(active.facts.ledgerRow(peer: peer, detail: detail, environment: environment))
        if let app {
            self.app = nil
            environment.pools.pool(for: context.eventLoop).release(app)
        }
        if closeAfterResponse {
            context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(capacity: 0))).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
            queue.removeAll()
            return
        }
        drain()  // the next pipelined request, if any
    }
}
