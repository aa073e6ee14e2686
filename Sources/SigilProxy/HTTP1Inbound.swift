import Logging
import NIOCore
import SigilCore

/// Inbound HTTP/1.1: frames the client's bytes into requests (``HTTP1RequestFramer``: the head is
/// parsed for what authorization needs, bodies stay the bytes received), authorizes each request
/// by its head, forwards allowed ones to the app over a pooled keep-alive connection (with
/// `x-forwarded-client-cert`), and relays the app's response as the bytes it sent (a last
/// response, after the client's `Connection: close`, gains `connection: close`). One request is
/// in flight at a time; pipelined requests wait their turn, so responses keep their order. Denied
/// requests get Istio's `403 RBAC: access denied`; malformed ones 400 and the connection closes.
/// Back-pressure both ways: the client is not read while the app connection cannot take more of a
/// request body (or while one waits for its app connection), and the app is not read while the
/// client cannot take more of a response, so neither side can make the proxy buffer the other.
final class HTTP1InboundHandler: ChannelDuplexHandler, RemovableChannelHandler, AppResponseSink, LedgerRowWaiter {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// One framed piece of the client's stream, queued in order.
    private enum Part {
        case head(HTTP1RequestHead)
        case body(ByteBuffer, payload: Int)
        case end
        case malformed(HTTP1RequestFramer.FramingError)
        /// Bytes after a WebSocket upgrade request (for the app if it switches protocols).
        case tunnel(ByteBuffer)
    }

    private struct Active {
        var head: HTTP1RequestHead
        var uri: String
        var hostOverride: String?
        var facts: RequestFacts
        var requestEnded = false
        var responseEnded = false
        /// Body bytes that arrived before the app connection was ready (raw, framing included).
        var pending: [ByteBuffer] = []
        var pendingBytes = 0
        var retried = false
        var sentDownstream = false
        var discardBody = false
        var detail: String?
    }

    private let environment: ProxyEnvironment
    private let peer: PeerInfo
    private var context: ChannelHandlerContext?
    private var active: Active?
    private var app: AppConnection?
    private var framer = HTTP1RequestFramer()
    private var queue = CircularBuffer<Part>()
    /// Body bytes in `queue` (a pipelined request's, behind the response in flight).
    private var queuedBytes = 0
    private var malformed = false
    private var closeAfterResponse = false
    /// The client is not read while too many parts are queued (`readPaused`) or while the app
    /// connection cannot take more of the request body (`appBlocked`); `wantsRead`: a read waits.
    private var readPaused = false
    private var appBlocked = false
    private var wantsRead = false
    /// The client channel's writability as last reported (the app is not read while it is false).
    private var clientWritable = true
    private var draining = false
    /// A completed response's last bytes wait for its ledger row (see ``LedgerBatch``): no flush.
    private var rowPending = false
    /// The connection closes once the waiting response is flushed (nothing more is served on it).
    private var closing = false
    private var setup: FirstRequestSetup

    static let maxQueuedParts = 256

    init(environment: ProxyEnvironment, peer: PeerInfo) {
        self.environment = environment
        self.peer = peer
        setup = FirstRequestSetup(peer: peer)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    // MARK: inbound from the client

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !malformed else { return }  // nothing after a framing error is a request
        do {
            try framer.feed(unwrapInboundIn(data)) { event in
                switch event {
                case .head(let head):
                    setup.requestArrived(context)
                    queue.append(.head(head))
                case .body(let bytes, let payload):
                    queuedBytes += bytes.readableBytes
                    queue.append(.body(bytes, payload: payload))
                case .end: queue.append(.end)
                case .tunnel(let bytes):
                    queuedBytes += bytes.readableBytes
                    queue.append(.tunnel(bytes))
                }
            }
        } catch {
            malformed = true
            queue.append(.malformed(error))
        }
        if queue.count > Self.maxQueuedParts || queuedBytes > AppPool.maxHeldBody { readPaused = true }
        drain()
    }

    /// Hands queued parts to the request they belong to; a part of the next request waits until
    /// the current response is complete. Not re-entrant (``finish()`` calls it from within).
    private func drain() {
        guard !draining, !closing else { return }
        draining = true
        defer { draining = false }
        while let part = queue.first {
            if let active, active.requestEnded { break }
            queue.removeFirst()
            switch part {
            case .body(let bytes, _), .tunnel(let bytes): queuedBytes -= bytes.readableBytes
            default: break
            }
            dispatch(part)
        }
        if readPaused, queue.count <= Self.maxQueuedParts / 2, queuedBytes <= AppPool.maxHeldBody / 2 {
            readPaused = false
            readAgainIfWanted()
        }
    }

    private func clearQueue() {
        queue.removeAll()
        queuedBytes = 0
    }

    private func readAgainIfWanted() {
        guard wantsRead, !readPaused, !appBlocked else { return }
        wantsRead = false
        context?.read()
    }

    /// The app connection of the request in flight is gone (done, failed or never made) or takes
    /// no more of the body (it answered early): nothing holds the client back on its account.
    private func stopHoldingForApp() {
        guard appBlocked else { return }
        appBlocked = false
        readAgainIfWanted()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if !rowPending { context.flush() }
        app?.channel.flush()
    }

    func read(context: ChannelHandlerContext) {
        if readPaused || appBlocked {
            wantsRead = true
        } else {
            context.read()
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    /// The client can (not) take more: the app is read (not) on its behalf.
    func channelWritabilityChanged(context: ChannelHandlerContext) {
        clientWritable = context.channel.isWritable
        app?.handler.holdReads(!clientWritable)
        context.fireChannelWritabilityChanged()
    }

    /// A request that cannot be framed safely: answered with its status (when nothing of a
    /// response went out yet) and the connection is closed, so no byte after it is read as a request.
    private func refuse(_ error: HTTP1RequestFramer.FramingError) {
        guard let context else { return }
        if rowPending { environment.writeWaitingRows(on: context.eventLoop) }  // the previous response goes out first
        clearQueue()
        readPaused = true
        if var active {
            // The body of the request in flight was malformed: its app connection cannot be reused.
            active.detail = "malformed request: \(error.description)"
            active.facts.status = active.sentDownstream ? active.facts.status : error.status
            self.active = active
            if active.sentDownstream {
                context.close(promise: nil)
                return
            }
        }
        let reason = switch error.status {
        case 431: "Request Header Fields Too Large"
        case 501: "Not Implemented"
        case 505: "HTTP Version Not Supported"
        default: "Bad Request"
        }
        let buffer = HTTPBytes.closingTextResponse(status: error.status, reason: reason, body: "bad request: \(error.description)",
                                                   allocator: context.channel.allocator)
        context.writeAndFlush(wrapOutboundOut(buffer)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if var active {
            active.facts.status = active.facts.status ?? 499
            environment.record(active.facts, peer: peer, detail: active.detail ?? "client closed the connection before the response completed")
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

    private func dispatch(_ part: Part) {
        switch part {
        case .head(let head):
            begin(head)
        // `active!.…` mutates the request's state in place: a copy out and back would retain and
        // release every reference it holds, on every part of every request.
        case .body(let body, let payload):
            guard active != nil else { return }
            active!.facts.bytesIn += payload
            if active!.discardBody || !active!.facts.decision.allowed { return }
            if let app {
                app.channel.write(body, promise: nil)
            } else {
                active!.pending.append(body)
                active!.pendingBytes += body.readableBytes
                if active!.pendingBytes > AppPool.maxHeldBody { appBlocked = true }
            }
        case .end:
            guard active != nil else { return }
            active!.requestEnded = true
            if active!.facts.decision.allowed, !active!.discardBody, let app { app.channel.flush() }
            // The flush can call back into this handler before it returns (a failed write closes
            // the app connection at once: appEnd, appFailed or the client's close may finish or
            // drop the request), so the state is read again, not assumed.
            if active?.responseEnded == true { finish() }
        case .malformed(let error):
            refuse(error)
        case .tunnel:
            break  // the app did not switch protocols: the connection closes after its answer
        }
    }

    private func begin(_ head: HTTP1RequestHead) {
        guard let context else { return }
        if environment.refusesForLedger() {
            refuseForLedger(context: context)
            return
        }
        guard let target = RequestTarget.normalize(head.target, environment.pathNormalization) else {
            refuse(.init(400, "invalid request target"))
            return
        }
        let host = target.authority ?? head.host
        let facts = RequestFacts(method: head.method, path: target.uri, host: host, values: head.values,
                                 peer: peer, environment: environment, proto: "http/1.1")
        // After an upgrade request the client's bytes are not framed as HTTP (``Part/tunnel(_:)``):
        // unless the app switches protocols, the connection ends with the answer.
        if !head.keepAlive || head.websocketUpgrade { closeAfterResponse = true }
        active = Active(head: head, uri: target.uri, hostOverride: target.authority, facts: facts)
        guard facts.decision.allowed else {
            deny(context: context)
            return
        }
        connectApp(context: context, fresh: false)
    }

    /// The ledger spool is full: the request cannot be recorded, so it does not reach the app
    /// (fail closed). 503 and the connection closes (its unread body is not framed further).
    private func refuseForLedger(context: ChannelHandlerContext) {
        if rowPending { environment.writeWaitingRows(on: context.eventLoop) }
        clearQueue()
        malformed = true  // nothing more is read as a request
        readPaused = true
        var buffer = context.channel.allocator.buffer(capacity: 128)
        buffer.writeStaticString("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 17\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nledger spool full")
        context.writeAndFlush(wrapOutboundOut(buffer)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
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
        connection.handler.begin(sink: self, toHEAD: active.head.method == "HEAD", decodes: false, holdReads: !clientWritable,
                                 marksClose: !active.head.keepAlive, upgrade: active.head.websocketUpgrade)
        var buffer = connection.channel.allocator.buffer(capacity: 0)
        active.head.write(uri: active.uri, host: active.hostOverride, xfcc: peer.xfcc, into: &buffer)
        connection.channel.write(buffer, promise: nil)
        let pending = active.pending
        active.pending = []
        active.pendingBytes = 0
        self.active = active
        for body in pending { connection.channel.write(body, promise: nil) }
        connection.channel.flush()
        // The flush may have failed the connection at once (appFailed: detached, maybe retried).
        guard app === connection else { return }
        appBlocked = !connection.channel.isWritable
        readAgainIfWanted()
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
        context.write(wrapOutboundOut(buffer), promise: nil)
        finish(detail: detail)  // records the row, then flushes
    }

    // MARK: AppResponseSink

    func appBytes(_ buffer: ByteBuffer) {
        guard let context, active != nil else { return }
        active!.facts.bytesOut += buffer.readableBytes
        active!.sentDownstream = true
        context.write(wrapOutboundOut(buffer), promise: nil)
    }

    func appHead(status: Int, keepAlive: Bool, headers: [(String, String)]) {
        active?.facts.status = status
        if !keepAlive { closeAfterResponse = true }
    }

    func appBody(_ buffer: ByteBuffer) {}

    func appEnd() {
        guard active != nil else { return }
        active!.responseEnded = true
        if !active!.requestEnded {
            // The app answered before the whole request body arrived: the connection cannot be reused.
            app?.handler.reusable = false
            active!.discardBody = true
            stopHoldingForApp()  // the rest of the body is read and dropped
        }
        if active!.requestEnded { finish() }
    }

    func appReadComplete() {
        if !rowPending { context?.flush() }
    }

    /// The app switched to WebSocket (`101`, relayed with whatever followed it): the request's row
    /// is written now, then the client and app connections are joined by a ``GlueHandler`` pair
    /// (bytes both ways, back-pressure, a close on either side closes the other) and this handler
    /// and the app's response handler leave their pipelines. The app connection leaves the pool.
    func appUpgraded() {
        guard let context, let active = self.active.take(), let app else { return }
        self.app = nil
        environment.record(active.facts, peer: peer, detail: "websocket: switched protocols (the tunnel's bytes are not counted)")
        if rowPending {
            // A pipelined response before this one still waits for its row: written now (after
            // this one's, so that the flush it releases sends no byte of the 101 before its row).
            environment.writeWaitingRows(on: context.eventLoop)
        }
        var held: [ByteBuffer] = []
        for part in queue {
            if case .tunnel(let bytes) = part { held.append(bytes) }
        }
        clearQueue()
        let (local, remote) = GlueHandler.matchedPair()
        do {
            try app.channel.pipeline.syncOperations.addHandler(remote)
            try context.pipeline.syncOperations.addHandler(local, position: .after(self))
        } catch {
            app.channel.close(promise: nil)
            context.close(promise: nil)
            return
        }
        // Decided again when the policies change, like a TCP-mode connection: closed if refused.
        let (environment, peer, head) = (self.environment, self.peer, active.head)
        let (method, path, host) = (head.method, active.facts.path, active.hostOverride ?? head.host)
        // Decided under the state at its head; decided again here if a reload came since.
        let key = environment.tunnels.add(decidedUnder: nil, current: environment.policy.current) { state in
            RequestFacts.decide(method: method, path: path, host: host, values: { head.values($0) }, peer: peer,
                                appPort: environment.appPort, under: state)
        } close: { [weak channel = context.channel] reason in
            guard let channel else { return }
            channel.eventLoop.execute {
                environment.record(LedgerRecord(
                    kind: .connection, timeMicros: ProxyClock.nowMicros(), source: peer.spiffeID, destination: peer.ownID,
                    peerSerial: peer.serial, sourceIP: peer.sourceIP, port: environment.appPort, proto: "websocket",
                    decision: "deny", mtls: peer.mtls, detail: "\(reason): the WebSocket opened by \(method) \(path)"))
                channel.close(promise: nil)
            }
        }
        local.onClose = { environment.tunnels.remove(key) }
        app.handler.detach()
        for bytes in held { app.channel.write(bytes, promise: nil) }
        app.channel.flush()
        context.flush()
        let channel = context.channel
        self.context = nil
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        channel.read()
    }

    func appWritabilityChanged(_ writable: Bool) {
        guard active?.discardBody != true else { return }  // nothing more goes to the app
        appBlocked = !writable
        readAgainIfWanted()
    }

    func appFailed(receivedAnything: Bool) {
        guard let context, var active else { return }
        let failed = app
        app = nil
        stopHoldingForApp()
        if let failed { environment.pools.pool(for: context.eventLoop).discard(failed) }
        if !active.sentDownstream {
            // A pooled connection the app closed while idle: retry once on a fresh one if nothing
            // of the request body could have been consumed. (Bytes received but not relayed: a
            // head held back to be marked `connection: close`; the client gets a clean 502.)
            if !receivedAnything, failed?.reused == true, !active.head.hasBody, !active.retried {
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
        guard let context, let active = self.active.take() else { return }
        // The app connection goes back to the pool now: its read-complete won't reach us.
        if let app {
            self.app = nil
            environment.pools.pool(for: context.eventLoop).release(app)
        }
        stopHoldingForApp()
        if closeAfterResponse {
            closing = true
            clearQueue()
        }
        // The row is in the spool file before the response's last bytes are flushed: a client
        // that saw the response complete has its row even if the proxy is killed right after.
        if environment.recordBeforeFlush(active.facts, peer: peer, detail: detail, on: context.eventLoop, waiter: self) {
            rowPending = true
        } else {
            release(context: context)
        }
        drain()  // the next pipelined request, if any (its response queues behind this one)
    }

    func ledgerRowWritten() {
        rowPending = false
        if let context { release(context: context) }
    }

    /// Flushes the completed response (and closes the connection when it was the last).
    private func release(context: ChannelHandlerContext) {
        guard closing else {
            context.flush()
            return
        }
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(capacity: 0))).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }
}
