import NIOCore
import NIOHPACK
import NIOHTTP1
import NIOHTTP2
import SigilCore

/// Inbound HTTP/2 (ALPN `h2`, or h2c with prior knowledge where plaintext is allowed), handled at
/// the frame level: one handler per connection after `NIOHTTP2Handler`, each stream an
/// ``HTTP2InboundStream`` in a table, no child channel per stream (a child channel with its own
/// pipeline, activation and close was most of the HTTP/2 path's CPU).
///
/// Each stream is one request, authorized by its head and forwarded to the app as HTTP/1.1 over the
/// pooled connections; the response is decoded (status, headers, de-chunked body) and sent back as
/// HEADERS and DATA frames. Flow control, both ways:
/// - request bodies: a stream's WINDOW_UPDATE is sent only while its app connection takes more (and
///   while a body waiting for its app connection is under 256 KiB), so a client stops at its stream
///   window while the app does not read; the connection window is credited on receipt (each stream's
///   window bounds what it may send);
/// - responses: NIOHTTP2 holds DATA the client's windows do not admit yet; while a stream has more
///   than 64 KiB of such DATA, or the connection is not writable, its app connection is not read.
/// A stream's END_STREAM is written only once its ledger row is in the spool (see ``LedgerBatch``):
/// a flush for another stream cannot complete a response whose row is not yet in the file.
final class HTTP2InboundHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame
    typealias OutboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    let environment: ProxyEnvironment
    let peer: PeerInfo
    private(set) var context: ChannelHandlerContext?
    /// This event loop's app connections (set when the handler is added).
    private(set) var pool: AppPool?
    private var streams: [HTTP2StreamID: HTTP2InboundStream] = [:]
    /// The connection's writability as last reported.
    private(set) var writable = true
    /// Streams that wrote request body to their app connection in this read batch.
    private var appFlushes: [HTTP2InboundStream] = []
    /// Frames (window updates, refusals) were written in this read batch.
    private var needsFlush = false
    private var setup: FirstRequestSetup

    /// The stream and connection windows this side keeps open: HTTP/2's initial window, which
    /// ``settings`` do not change.
    static let windowTarget = 65_535
    /// What the inbound advertises: NIOHTTP2's defaults (100 concurrent streams), with a header
    /// list of up to 64 KiB, as HTTP/1.1 heads may be (``HTTP1RequestFramer/maxHeadBytes``).
    static let settings: HTTP2Settings = [
        HTTP2Setting(parameter: .maxConcurrentStreams, value: 100),
        HTTP2Setting(parameter: .maxHeaderListSize, value: HTTP1RequestFramer.maxHeadBytes),
    ]
    /// A stream whose DATA waiting for the client's window exceeds this stops reading its app
    /// connection, and reads again below half of it.
    static let outstandingLimit = 64 * 1024

    init(environment: ProxyEnvironment, peer: PeerInfo) {
        self.environment = environment
        self.peer = peer
        setup = FirstRequestSetup(peer: peer)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        pool = environment.pools.pool(for: context.eventLoop)
        writable = context.channel.isWritable
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.payload {
        case .headers(let headers):
            if let stream = streams[frame.streamID] {
                stream.trailers(endStream: headers.endStream)  // trailers end the request; not forwarded
            } else {
                setup.requestArrived(context)
                let stream = HTTP2InboundStream(id: frame.streamID, connection: self)
                streams[frame.streamID] = stream
                stream.begin(headers.headers, endStream: headers.endStream)
            }
        case .data(let data):
            guard let stream = streams[frame.streamID], case .byteBuffer(let buffer) = data.data else { return }
            stream.body(buffer, endStream: data.endStream)
        default:
            break  // RST_STREAM and stream ends arrive as StreamClosedEvent; the rest is the connection's
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if !appFlushes.isEmpty {
            for stream in appFlushes { stream.flushApp() }
            appFlushes.removeAll(keepingCapacity: true)
        }
        if needsFlush {
            needsFlush = false
            context.flush()
        }
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? NIOHTTP2WindowUpdatedEvent, let inbound = event.inboundWindowSize {
            if event.streamID == .rootStream {
                if inbound <= Self.windowTarget / 2 {
                    write(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: Self.windowTarget - inbound)))
                }
            } else {
                streams[event.streamID]?.inboundWindowChanged(inbound)
            }
        } else if let event = event as? StreamClosedEvent {
            streams.removeValue(forKey: event.streamID)?.streamClosed()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        writable = context.channel.isWritable
        for stream in streams.values { stream.updateAppReads() }
        if writable, needsFlush { flush() }  // a window update written while the connection was full
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        let open = streams.values
        streams.removeAll()
        for stream in open { stream.streamClosed() }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let error = error as? NIOHTTP2Errors.StreamError {
            // A frame this side wrote was refused for its stream (one HTTP/2 does not allow there):
            // the stream is reset, once, and its StreamClosedEvent settles it.
            if let stream = streams[error.streamID], !stream.resetSent {
                stream.resetSent = true
                write(HTTP2Frame(streamID: error.streamID, payload: .rstStream(.internalError)))
                flush()
            }
            return
        }
        // Errors of the peer's frames: NIOHTTP2 has already reset that stream (a stream error;
        // other streams go on) or sent GOAWAY (a connection error: GoAwayCloser closes the
        // connection once it is written).
        if error is any NIOHTTP2Error { return }
        context.close(promise: nil)
    }

    // MARK: for the streams

    func write(_ frame: HTTP2Frame, promise: EventLoopPromise<Void>? = nil) {
        context?.write(wrapOutboundOut(frame), promise: promise)
        needsFlush = true
    }

    func flush() {
        needsFlush = false
        context?.flush()
    }

    func needsAppFlush(_ stream: HTTP2InboundStream) {
        appFlushes.append(stream)
    }
}

/// One request on an inbound HTTP/2 connection (see ``HTTP2InboundHandler``). Confined to the
/// connection's event loop.
final class HTTP2InboundStream: AppResponseSink, LedgerRowWaiter {
    let id: HTTP2StreamID
    /// Every callback that may run after the stream ended checks `closed` first: the connection
    /// handler outlives every open stream (it closes them in channelInactive).
    private unowned let connection: HTTP2InboundHandler
    private let environment: ProxyEnvironment
    private var head: HTTPRequestHead?
    private var isHEAD = false
    /// This side reset the stream after one of its frames was refused (see errorCaught).
    var resetSent = false
    private var facts: RequestFacts?
    private var pending: [ByteBuffer] = []
    private var pendingBytes = 0
    private var app: AppConnection?
    private var chunked = false
    private var requestEnded = false
    /// The response is complete (or refused): its row is recorded.
    private var done = false
    /// The stream is gone (reset, ended both ways, or the connection closed).
    private var closed = false
    private var retried = false
    private var connecting = false
    /// The response's END_STREAM waits for its ledger row; `finalBody` goes with it.
    private var rowPending = false
    private var finalBody: ByteBuffer?
    /// Response body decoded in this app read, written at the read's end (or with END_STREAM).
    private var bodyBuffer: ByteBuffer?
    /// Request body is not credited (no WINDOW_UPDATE) while the app connection cannot take more.
    private var appBlocked = false
    private var inboundWindow = HTTP2InboundHandler.windowTarget
    /// Response DATA written but not yet sent (the client's windows); the app is not read above the limit.
    private var outstanding = 0
    private var appReadsHeld = false
    private var appNeedsFlush = false

    init(id: HTTP2StreamID, connection: HTTP2InboundHandler) {
        self.id = id
        self.connection = connection
        self.environment = connection.environment
    }

    /// Connection-specific response fields HTTP/2 forbids (checked by length first: most fields
    /// are none of these).
    static func isHopByHop(_ name: String) -> Bool {
        switch name.utf8.count {
        case 7: return name == "upgrade"
        case 10: return name == "connection" || name == "keep-alive"
        case 16: return name == "proxy-connection"
        case 17: return name == "transfer-encoding"
        default: return false
        }
    }

    // MARK: the request

    func begin(_ headers: HPACKHeaders, endStream: Bool) {
        requestEnded = endStream
        let parsed = Self.requestHead(headers)
        isHEAD = parsed?.method == .HEAD
        guard var head = parsed, let target = RequestTarget.normalize(head.uri, environment.pathNormalization) else {
            refuse(status: 400, body: "")
            return
        }
        if environment.refusesForLedger() {
            // The ledger spool is full: the request cannot be recorded, so it does not reach the app
            // (fail closed).
            refuse(status: 503, body: "ledger spool full")
            return
        }
        head.uri = target.uri
        if let authority = target.authority { head.headers.replaceOrAdd(name: "host", value: authority) }
        self.head = head
        let facts = RequestFacts(head: head, peer: connection.peer, environment: environment, proto: "h2")
        self.facts = facts
        if !facts.decision.allowed {
            respond(status: 403, body: "RBAC: access denied")
            return
        }
        // The app connection is taken at the first body part or the end of the request, so a
        // request without a body (END_STREAM on its HEADERS) goes upstream without framing and one
        // with a body of unknown length as chunked.
        if endStream { connectApp(fresh: false) }
    }

    func body(_ buffer: ByteBuffer, endStream: Bool) {
        facts?.bytesIn += buffer.readableBytes
        if endStream { requestEnded = true }
        guard facts?.decision.allowed == true, !done else { return }  // dropped: the window is credited
        if let app {
            writeBody(buffer, to: app)
            if endStream { endBody(to: app) }
        } else {
            if buffer.readableBytes > 0 {
                pending.append(buffer)
                pendingBytes += buffer.readableBytes
                if pendingBytes > AppPool.maxHeldBody { appBlocked = true }
            }
            if !connecting { connectApp(fresh: false) }
        }
    }

    func trailers(endStream: Bool) {
        guard endStream else { return }
        requestEnded = true
        guard facts?.decision.allowed == true, !done else { return }
        if let app {
            endBody(to: app)
        } else if !connecting {
            connectApp(fresh: false)
        }
    }

    /// NIOHTTP2's view of the stream's receive window after DATA arrived.
    func inboundWindowChanged(_ size: Int) {
        inboundWindow = size
        credit()
    }

    /// Opens the stream's window again (WINDOW_UPDATE) once half of it is used, unless the body
    /// cannot go on to the app now. Returns whether it wrote one (unflushed).
    @discardableResult
    private func credit() -> Bool {
        guard !appBlocked, !requestEnded, !closed, inboundWindow <= HTTP2InboundHandler.windowTarget / 2 else { return false }
        connection.write(HTTP2Frame(streamID: id, payload: .windowUpdate(windowSizeIncrement: HTTP2InboundHandler.windowTarget - inboundWindow)))
        inboundWindow = HTTP2InboundHandler.windowTarget
        return true
    }

    /// Called from the app connection's events too (outside the client's read batch): a window
    /// opened here is flushed at once.
    private func setAppBlocked(_ blocked: Bool) {
        appBlocked = blocked
        if !blocked, credit() { connection.flush() }
    }

    /// The stream ended (both ways, reset, or the connection closed).
    func streamClosed() {
        closed = true
        if !done, var facts {
            done = true
            facts.status = facts.status ?? 499
            environment.record(facts, peer: connection.peer, detail: "stream closed before the response completed")
        }
        if let app {
            self.app = nil
            connection.pool?.discard(app)
        }
        rowPending = false
        finalBody = nil
        bodyBuffer = nil
    }

    // MARK: the app connection

    private func connectApp(fresh: Bool) {
        guard let pool = connection.pool else { return }
        connecting = true
        pool.acquire(fresh: fresh) { result in
            switch result {
            case .success(let connection):
                guard !self.closed, !self.done else {
                    pool.release(connection)
                    return
                }
                self.attach(connection)
            case .failure(let error):
                self.connecting = false
                self.fail(detail: "app unreachable: \(error)")
            }
        }
    }

    private func attach(_ connection: AppConnection) {
        connecting = false
        guard var head else {
            self.connection.pool?.release(connection)
            return
        }
        app = connection
        updateAppReads(connection)
        connection.handler.begin(sink: self, toHEAD: isHEAD, decodes: true, holdReads: appReadsHeld)
        let hasLength = head.headers.first(name: "content-length") != nil
        let noBody = requestEnded && pending.isEmpty
        chunked = !hasLength && !noBody
        if noBody, !hasLength, head.method == .POST || head.method == .PUT || head.method == .PATCH {
            head.headers.add(name: "content-length", value: "0")  // some apps answer 411 without it
        }
        var buffer = connection.channel.allocator.buffer(capacity: 512)
        RequestHeadWriter.write(head, xfcc: self.connection.peer.xfcc, forceChunked: chunked, into: &buffer)
        connection.channel.write(buffer, promise: nil)
        for body in pending { writeBody(body, to: connection) }
        pending = []
        pendingBytes = 0
        if requestEnded, chunked { writeEnd(to: connection) }
        appNeedsFlush = false
        connection.channel.flush()
        // The flush may have failed the connection at once (appFailed: detached, maybe retried).
        guard app === connection else { return }
        setAppBlocked(!connection.channel.isWritable)
    }

    private func writeBody(_ body: ByteBuffer, to connection: AppConnection) {
        guard body.readableBytes > 0 else { return }
        if chunked {
            var buffer = connection.channel.allocator.buffer(capacity: body.readableBytes + 16)
            RequestHeadWriter.writeChunk(body, into: &buffer)
            connection.channel.write(buffer, promise: nil)
        } else {
            connection.channel.write(body, promise: nil)
        }
        markAppFlush()
    }

    private func endBody(to connection: AppConnection) {
        if chunked { writeEnd(to: connection) }
        markAppFlush()
    }

    /// What this stream wrote to its app connection is flushed at the end of the read batch.
    private func markAppFlush() {
        if !appNeedsFlush {
            appNeedsFlush = true
            connection.needsAppFlush(self)
        }
    }

    private func writeEnd(to connection: AppConnection) {
        var buffer = connection.channel.allocator.buffer(capacity: 5)
        buffer.writeStaticString("0\r\n\r\n")
        connection.channel.write(buffer, promise: nil)
    }

    /// The request body written in this read batch goes to the app.
    func flushApp() {
        guard appNeedsFlush else { return }
        appNeedsFlush = false
        app?.channel.flush()
    }

    /// Holds the app connection's reads while this stream cannot send more (see the type's notes).
    func updateAppReads(_ app: AppConnection? = nil) {
        let held = !connection.writable || outstanding > HTTP2InboundHandler.outstandingLimit
            || (appReadsHeld && outstanding > HTTP2InboundHandler.outstandingLimit / 2)
        appReadsHeld = held
        (app ?? self.app)?.handler.holdReads(held)
    }

    // MARK: AppResponseSink

    func appBytes(_ buffer: ByteBuffer) {
        facts?.bytesOut += buffer.readableBytes
    }

    func appHead(status: Int, keepAlive: Bool, headers: [(String, String)]) {
        facts?.status = status
        connection.write(HTTP2Frame(streamID: id, payload: .headers(.init(headers: Self.responseHeaders(status: status, headers)))))
    }

    /// The app's HTTP/1.1 response head as an HTTP/2 header block: `:status` first, then the
    /// fields (names lowercase, as the framer gives them) without the hop-by-hop ones, including
    /// any the app's Connection field names (RFC 9110, 7.6.1; its tokens in any case).
    static func responseHeaders(status: Int, _ headers: [(String, String)]) -> HPACKHeaders {
        var out = HPACKHeaders()
        out.reserveCapacity(headers.count + 1)
        out.add(name: ":status", value: String(status))
        let connectionValues = headers.lazy.filter { $0.0 == "connection" }.map(\.1)
        for (name, value) in headers {
            if isHopByHop(name) || connectionValues.contains(where: { HTTPBytes.containsToken($0, name) }) { continue }
            out.add(name: name, value: value)
        }
        return out
    }

    func appBody(_ buffer: ByteBuffer) {
        guard !closed else { return }
        if bodyBuffer == nil {
            bodyBuffer = buffer
        } else {
            var buffer = buffer
            bodyBuffer!.writeBuffer(&buffer)
        }
    }

    func appEnd() {
        if !requestEnded { app?.handler.reusable = false }
        let body = bodyBuffer
        bodyBuffer = nil
        finish(detail: nil, lastBody: body)
    }

    func appReadComplete() {
        if let body = bodyBuffer, !closed {
            bodyBuffer = nil
            sendData(body)
        }
        if !rowPending { connection.flush() }
    }

    /// A response DATA frame that is not the last: counted until NIOHTTP2 has sent it.
    private func sendData(_ body: ByteBuffer) {
        let size = body.readableBytes
        guard size > 0, let loop = connection.context?.eventLoop else { return }
        outstanding += size
        let promise = loop.makePromise(of: Void.self)
        promise.futureResult.assumeIsolated().whenComplete { _ in
            self.outstanding -= size
            if self.appReadsHeld, !self.closed { self.updateAppReads() }
        }
        connection.write(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(body)))), promise: promise)
        if outstanding > HTTP2InboundHandler.outstandingLimit { updateAppReads() }
    }

    func appWritabilityChanged(_ writable: Bool) {
        guard !done else { return }
        setAppBlocked(!writable)
    }

    /// Never called: HTTP/2 streams ask for no upgrade (RFC 8441 extended CONNECT is refused).
    func appUpgraded() {}

    func appFailed(receivedAnything: Bool) {
        guard !closed else { return }
        let failed = app
        app = nil
        if let failed { connection.pool?.discard(failed) }
        if !receivedAnything {
            if failed?.reused == true, !retried, facts?.bytesIn == 0 {
                retried = true
                connectApp(fresh: true)
                return
            }
            fail(detail: "the app closed the connection without answering")
        } else {
            // Part of the response went out: the client must see the truncation.
            bodyBuffer = nil
            if facts?.status == nil { facts?.status = 502 }
            if !done, let facts {
                done = true
                environment.record(facts, peer: connection.peer, detail: "the app closed the connection before the response completed")
            }
            connection.write(HTTP2Frame(streamID: id, payload: .rstStream(.internalError)))
            connection.flush()
        }
    }

    func ledgerRowWritten() {
        guard rowPending else { return }
        rowPending = false
        let body = finalBody ?? ByteBuffer()
        finalBody = nil
        connection.write(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(body), endStream: true))))
        connection.flush()
    }

    // MARK: answers of the proxy's own

    private func fail(detail: String) {
        guard !done, !closed else { return }
        respond(status: 502, body: "upstream failed", detail: detail)
    }

    /// A request refused before it has facts (400, 503): no row, as on HTTP/1.1.
    private func refuse(status: Int, body: String) {
        done = true
        let buffer = writeOwnAnswer(status: status, body: body)
        connection.write(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(buffer), endStream: true))))
    }

    /// The proxy's own answer (403, 502), recorded with its status, its END_STREAM after the row.
    private func respond(status: Int, body: String, detail: String? = nil) {
        let buffer = writeOwnAnswer(status: status, body: body)
        facts?.status = status
        facts?.bytesOut = buffer.readableBytes
        finish(detail: detail, lastBody: buffer)
    }

    /// Writes the HEADERS of a plain-text answer of the proxy's own; returns its body (empty to a
    /// HEAD request: a HEAD answer has the fields, never a body).
    private func writeOwnAnswer(status: Int, body: String) -> ByteBuffer {
        let headers = HPACKHeaders([(":status", String(status)), ("content-type", "text/plain"), ("content-length", String(body.utf8.count))])
        connection.write(HTTP2Frame(streamID: id, payload: .headers(.init(headers: headers))))
        var buffer = ByteBuffer()
        if !isHEAD { buffer.writeString(body) }
        return buffer
    }

    /// Records the row, releases the app connection, and ends the stream with `lastBody` once the
    /// row is in the spool.
    private func finish(detail: String?, lastBody: ByteBuffer?) {
        guard !done, !closed, let facts, let loop = connection.context?.eventLoop else { return }
        done = true
        if let app {
            self.app = nil
            connection.pool?.release(app)
        }
        if environment.recordBeforeFlush(facts, peer: connection.peer, detail: detail, on: loop, waiter: self) {
            rowPending = true
            finalBody = lastBody
        } else {
            connection.write(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(lastBody ?? ByteBuffer()), endStream: true))))
            connection.flush()
        }
        setAppBlocked(false)  // the rest of the request body, if any, is dropped and its window credited
    }

    /// The HTTP/1.1 request head of an HTTP/2 header block (nil without `:method`, `:path`, or
    /// either `:authority` or `host`).
    /// `:authority` becomes `Host`; `cookie` fields are joined with "; " (RFC 9113, 8.2.3).
    static func requestHead(_ headers: HPACKHeaders) -> HTTPRequestHead? {
        var method: String?
        var path: String?
        var authority: String?
        var cookies: [String] = []
        var out = HTTPHeaders()
        out.reserveCapacity(headers.count)
        // Pseudo-fields come first (NIOHTTP2 checks), so Host from :authority leads the fields.
        var hostAdded = false
        var hosts = 0
        var contentLengths = 0
        for (name, value, _) in headers {
            // RFC 9113, 8.2.1: a field value starting or ending with SP or HTAB makes the request
            // malformed. Forwarded as is, an HTTP/1.1 app would trim what the policy saw untrimmed.
            if let first = value.utf8.first, let last = value.utf8.last,
               first == 0x20 || first == 0x09 || last == 0x20 || last == 0x09 { return nil }
            if name.utf8.first == UInt8(ascii: ":") {
                switch name {
                case ":method": method = value
                case ":path": path = value
                case ":authority": authority = value
                default: break
                }
                continue
            }
            if !hostAdded, let authority {
                hostAdded = true
                out.add(name: "host", value: authority)
            }
            if name == "host" { hosts += 1 }
            if name == "content-length" {
                // One field of plain digits: it goes to the app as sent (`+3` or `3, 3` would be
                // read differently by different HTTP/1.1 servers), as HTTP/1.1 requests are checked.
                contentLengths += 1
                guard contentLengths == 1, !value.isEmpty, value.utf8.count <= 18,
                      value.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
            }
            if name == "cookie" {
                cookies.append(value)
            } else if authority == nil || name != "host" {
                out.add(name: name, value: value)
            }
        }
        guard let method, let path else { return nil }
        // A method not in upper case: 400, as on HTTP/1.1 (policies match methods case-sensitively).
        guard !method.utf8.contains(where: { $0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "z") }) else { return nil }
        if !hostAdded, let authority { out.add(name: "host", value: authority) }
        guard authority != nil || out.contains(name: "host") else { return nil }  // no Host: 400, as on HTTP/1.1
        guard hosts <= 1 else { return nil }  // two Host fields: 400, as on HTTP/1.1 (authorization reads one)
        if !cookies.isEmpty { out.add(name: "cookie", value: cookies.joined(separator: "; ")) }
        return HTTPRequestHead(version: .http2, method: HTTPMethod(rawValue: method), uri: path, headers: out)
    }
}
