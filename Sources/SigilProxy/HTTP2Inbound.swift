import NIOCore
import NIOHTTP1
import NIOHTTP2
import SigilCore

/// Inbound HTTP/2 (ALPN `h2`): each stream is one request, authorized by its head and forwarded
/// to the app as HTTP/1.1 over the same pooled connections; the response is decoded (status,
/// headers, de-chunked body) and sent back as HTTP/2 frames.
///
/// Back-pressure both ways, through HTTP/2 flow control: while the app connection cannot take more
/// of the request body (or while the stream waits for one), the stream is not read, so NIOHTTP2
/// sends the client no WINDOW_UPDATE and the client stops at its stream window; while the stream
/// cannot send (the client's window is spent or the connection is not writable), the app is not
/// read.
final class HTTP2StreamHandler: ChannelDuplexHandler, AppResponseSink, LedgerRowWaiter {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let environment: ProxyEnvironment
    private let peer: PeerInfo
    private var context: ChannelHandlerContext?
    private var head: HTTPRequestHead?
    private var facts: RequestFacts?
    private var pending: [HTTPServerRequestPart] = []
    private var pendingBytes = 0
    /// The stream is not read while the app connection cannot take more; `wantsRead`: a read waits.
    private var appBlocked = false
    private var wantsRead = false
    /// The stream's writability as last reported (the app is not read while it is false).
    private var streamWritable = true
    /// Request body written to the app since its last flush (flushed at the read batch's end).
    private var appNeedsFlush = false
    private var app: AppConnection?
    private var chunked = false
    private var requestEnded = false
    private var done = false
    private var retried = false
    private var connecting = false
    /// The response's END_STREAM waits, unflushed, for its ledger row (see ``LedgerBatch``).
    private var rowPending = false

    /// Connection-specific headers that HTTP/2 forbids.
    static let hopByHop: Set<String> = ["connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection"]

    init(environment: ProxyEnvironment, peer: PeerInfo) {
        self.environment = environment
        self.peer = peer
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        switch part {
        case .head(var head):
            guard self.head == nil else { return }
            guard let target = RequestTarget.normalize(head.uri) else {
                done = true
                let headers = HTTPHeaders([("content-length", "0")])
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http2, status: .badRequest, headers: headers))), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
                return
            }
            if environment.refusesForLedger() {
                // The ledger spool is full: the request cannot be recorded, so it does not reach
                // the app (fail closed).
                done = true
                var body = context.channel.allocator.buffer(capacity: 17)
                body.writeStaticString("ledger spool full")
                let headers = HTTPHeaders([("content-type", "text/plain"), ("content-length", "17")])
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http2, status: .serviceUnavailable, headers: headers))), promise: nil)
                context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
                return
            }
            head.uri = target.uri
            if let authority = target.authority { head.headers.replaceOrAdd(name: "host", value: authority) }
            self.head = head
            let facts = RequestFacts(head: head, peer: peer, environment: environment, proto: "h2")
            self.facts = facts
            if !facts.decision.allowed {
                deny(context: context)
                return
            }
            // The app connection is taken at the first body part or the end of the request, so a
            // request without a body (END_STREAM on its HEADERS) goes upstream without framing
            // and one with a body of unknown length as chunked.
        case .body(let body):
            facts?.bytesIn += body.readableBytes
            guard facts?.decision.allowed == true, !done else { return }
            if let app {
                writeBody(body, to: app)
            } else {
                pending.append(part)
                pendingBytes += body.readableBytes
                if pendingBytes > HTTP1InboundHandler.maxPendingBytes { appBlocked = true }
                if !connecting { connectApp(context: context, fresh: false) }
            }
        case .end:
            requestEnded = true
            guard facts?.decision.allowed == true, !done else { return }
            if let app {
                if chunked { writeEnd(to: app) }
                appNeedsFlush = false
                app.channel.flush()
            } else {
                pending.append(part)
                if !connecting { connectApp(context: context, fresh: false) }
            }
        }
    }

    /// The request body read in this batch goes to the app now (it was only written).
    func channelReadComplete(context: ChannelHandlerContext) {
        if appNeedsFlush, let app {
            appNeedsFlush = false
            app.channel.flush()
        }
        context.fireChannelReadComplete()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !done, var facts {
            facts.status = facts.status ?? 499
            environment.record(facts, peer: peer, detail: "stream closed before the response completed")
            done = true
        }
        if let app {
            self.app = nil
            environment.pools.pool(for: context.eventLoop).discard(app)
        }
        self.context = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    func read(context: ChannelHandlerContext) {
        if appBlocked {
            wantsRead = true
        } else {
            context.read()
        }
    }

    /// The stream can (not) send: the app is read (not) on its behalf.
    func channelWritabilityChanged(context: ChannelHandlerContext) {
        streamWritable = context.channel.isWritable
        app?.handler.holdReads(!streamWritable)
        context.fireChannelWritabilityChanged()
    }

    private func setAppBlocked(_ blocked: Bool) {
        appBlocked = blocked
        if !blocked, wantsRead {
            wantsRead = false
            context?.read()
        }
    }

    private func deny(context: ChannelHandlerContext) {
        var body = context.channel.allocator.buffer(capacity: 19)
        body.writeStaticString("RBAC: access denied")
        facts?.status = 403
        facts?.bytesOut = body.readableBytes
        let headers = HTTPHeaders([("content-type", "text/plain"), ("content-length", "19")])
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http2, status: .forbidden, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        finish(detail: nil)
        endStream(context: context)
    }

    private func connectApp(context: ChannelHandlerContext, fresh: Bool) {
        let pool = environment.pools.pool(for: context.eventLoop)
        connecting = true
        pool.acquire(fresh: fresh) { result in
            switch result {
            case .success(let connection):
                guard self.context != nil, !self.done else {
                    pool.release(connection)
                    return
                }
                self.attach(connection)
            case .failure(let error):
                self.fail(detail: "app unreachable: \(error)")
            }
        }
    }

    private func attach(_ connection: AppConnection) {
        connecting = false
        guard let head else { return }
        app = connection
        connection.handler.begin(sink: self, toHEAD: head.method == .HEAD, decodes: true, holdReads: !streamWritable)
        let hasLength = head.headers.first(name: "content-length") != nil
        let noBody = requestEnded && !pending.contains { if case .body = $0 { return true } else { return false } }
        chunked = !hasLength && !noBody
        var buffer = connection.channel.allocator.buffer(capacity: 512)
        RequestHeadWriter.write(head, xfcc: peer.xfcc, forceChunked: chunked, into: &buffer)
        connection.channel.write(buffer, promise: nil)
        for part in pending {
            switch part {
            case .body(let body): writeBody(body, to: connection)
            case .end: if chunked { writeEnd(to: connection) }
            case .head: break
            }
        }
        pending = []
        pendingBytes = 0
        connection.channel.flush()
        appNeedsFlush = false
        // The flush may have failed the connection at once (appFailed: detached, maybe retried).
        guard app === connection else { return }
        setAppBlocked(!connection.channel.isWritable)
    }

    private func writeBody(_ body: ByteBuffer, to connection: AppConnection) {
        guard body.readableBytes > 0 else { return }
        appNeedsFlush = true
        if chunked {
            var buffer = connection.channel.allocator.buffer(capacity: body.readableBytes + 16)
            RequestHeadWriter.writeChunk(body, into: &buffer)
            connection.channel.write(buffer, promise: nil)
        } else {
            connection.channel.write(body, promise: nil)
        }
    }

    private func writeEnd(to connection: AppConnection) {
        var buffer = connection.channel.allocator.buffer(capacity: 5)
        buffer.writeStaticString("0\r\n\r\n")
        connection.channel.write(buffer, promise: nil)
    }

    private func fail(detail: String) {
        guard let context, !done else { return }
        facts?.status = 502
        let headers = HTTPHeaders([("content-type", "text/plain"), ("content-length", "15")])
        var body = context.channel.allocator.buffer(capacity: 15)
        body.writeStaticString("upstream failed")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http2, status: .badGateway, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        finish(detail: detail)
        endStream(context: context)
    }

    // MARK: AppResponseSink

    func appBytes(_ buffer: ByteBuffer) {
        facts?.bytesOut += buffer.readableBytes
    }

    func appHead(status: Int, keepAlive: Bool, headers: [(String, String)]) {
        facts?.status = status
        var out = HTTPHeaders()
        out.reserveCapacity(headers.count)
        for (name, value) in headers where !Self.hopByHop.contains(name.lowercased()) {
            out.add(name: name.lowercased(), value: value)
        }
        context?.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http2, status: .init(statusCode: status), headers: out))), promise: nil)
    }

    func appBody(_ buffer: ByteBuffer) {
        context?.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
    }

    func appEnd() {
        guard let context else { return }
        if !requestEnded { app?.handler.reusable = false }
        finish(detail: nil)
        endStream(context: context)
    }

    func appReadComplete() {
        if !rowPending { context?.flush() }
    }

    func appWritabilityChanged(_ writable: Bool) {
        setAppBlocked(!writable)
    }

    /// Writes END_STREAM; it is flushed once the row is in the spool file. The flush closes the
    /// stream channel (channelInactive) before it returns, so the row and the app connection are
    /// taken care of first (``finish(detail:)``).
    private func endStream(context: ChannelHandlerContext) {
        if rowPending {
            context.write(wrapOutboundOut(.end(nil)), promise: nil)
        } else {
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }

    func ledgerRowWritten() {
        rowPending = false
        context?.flush()
    }

    func appFailed(receivedAnything: Bool) {
        guard let context else { return }
        let failed = app
        app = nil
        if let failed { environment.pools.pool(for: context.eventLoop).discard(failed) }
        if !receivedAnything {
            if failed?.reused == true, !retried, facts?.bytesIn == 0 {
                retried = true
                connectApp(context: context, fresh: true)
                return
            }
            fail(detail: "the app closed the connection without answering")
        } else {
            if facts?.status == nil { facts?.status = 502 }
            context.close(promise: nil)
        }
    }

    private func finish(detail: String?) {
        guard !done, let facts, let context else { return }
        done = true
        if let app {
            self.app = nil
            environment.pools.pool(for: context.eventLoop).release(app)
        }
        rowPending = environment.recordBeforeFlush(facts, peer: peer, detail: detail, on: context.eventLoop, waiter: self)
        setAppBlocked(false)  // the rest of the request body, if any, is read (at once: re-entrant) and dropped
    }
}
