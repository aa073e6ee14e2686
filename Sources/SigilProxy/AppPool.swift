import NIOCore
import NIOPosix

/// Receives what the app sends back for the request in flight on an ``AppConnection``.
protocol AppResponseSink: AnyObject {
    /// Raw response bytes as received (the HTTP/1.1 path forwards these as they are, but for a
    /// last response marked `connection: close`, whose head is held back until whole).
    func appBytes(_ buffer: ByteBuffer)
    /// The final response head was seen.
    func appHead(status: Int, keepAlive: Bool, headers: [(String, String)])
    /// De-chunked body bytes (only when the framer decodes: the HTTP/2 path).
    func appBody(_ buffer: ByteBuffer)
    /// The response is complete.
    func appEnd()
    /// The end of one read batch: flush now.
    func appReadComplete()
    /// The connection failed before the response completed.
    func appFailed(receivedAnything: Bool)
    /// The app answered a WebSocket upgrade with `101`: the head (and whatever followed it in the
    /// same read) went to ``appBytes(_:)``; the connection is the sink's to turn into a tunnel.
    func appUpgraded()
    /// The app connection's writability changed: while it cannot take more, the sink stops
    /// reading the request body from its client (back-pressure towards the client).
    func appWritabilityChanged(_ writable: Bool)
}

/// The app side of the proxy: reads responses off a pooled loopback connection and hands them to
/// the current sink, using ``HTTP1ResponseFramer`` to know where each one ends.
///
/// Back-pressure: while the sink's client cannot take more (``holdReads(_:)``), the app is not
/// read, so a slow client leaves the rest of a large response in the kernel's socket buffers and
/// the app blocks, instead of the proxy holding it in memory; the app connection's writability goes
/// to the sink (``AppResponseSink/appWritabilityChanged(_:)``) for the other direction.
final class AppResponseHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer

    private var framer = HTTP1ResponseFramer()
    weak var sink: (any AppResponseSink)?
    private(set) var receivedBytes = 0
    /// False once the connection can no longer carry another request.
    var reusable = true
    /// Called when the connection closes (the pool drops it).
    var onClose: (() -> Void)?
    private var context: ChannelHandlerContext?
    private var readsHeld = false
    private var readWanted = false
    /// The response in flight is the last on its client's connection (the client asked to close):
    /// `connection: close` goes into its head, right after the status line, since the app (whose
    /// connection stays pooled) answers as if the connection went on.
    private var marksClose = false
    /// That response's head bytes, held back while the head is split across reads.
    private var heldHead: ByteBuffer?
    /// The request in flight asked for a WebSocket upgrade: a `101` hands the connection over.
    private var upgrade = false

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// `hold`: the response's reader cannot take more, stop reading the app; false: read again.
    func holdReads(_ hold: Bool) {
        guard hold != readsHeld else { return }
        readsHeld = hold
        if !hold, readWanted {
            readWanted = false
            context?.read()
        }
    }

    func read(context: ChannelHandlerContext) {
        if readsHeld {
            readWanted = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        sink?.appWritabilityChanged(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    /// Starts a request's response: `holdReads` is the state of its reader (not writable: held);
    /// `marksClose`: the response is the last on its client's connection.
    func begin(sink: any AppResponseSink, toHEAD: Bool, decodes: Bool, holdReads hold: Bool, marksClose: Bool = false,
               upgrade: Bool = false) {
        self.sink = sink
        self.upgrade = upgrade
        framer.decodes = decodes
        framer.expectResponse(toHEAD: toHEAD)
        receivedBytes = 0
        self.marksClose = marksClose
        heldHead = nil
        holdReads(hold)
    }

    var isIdle: Bool { !framer.isBusy }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        guard let sink, framer.isBusy else {
            // Bytes nobody asked for: the connection is out of step with its requests.
            reusable = false
            context.close(promise: nil)
            return
        }
        receivedBytes += buffer.readableBytes
        var ended = false
        var switched = false
        let consumed: Int
        do {
            consumed = try framer.feed(buffer) { event in
                switch event {
                case .head(let status, let keepAlive, let headers):
                    if status == 101, upgrade { switched = true }
                    if !keepAlive { reusable = false }
                    sink.appHead(status: status, keepAlive: keepAlive, headers: headers)
                case .body(let slice):
                    sink.appBody(slice)
                case .end:
                    ended = true
                }
            }
        } catch {
            reusable = false
            context.close(promise: nil)
            return
        }
        if switched, ended {
            // The bytes after the 101 head are the new protocol's: relayed too, then the sink
            // takes the connection (``detach()``).
            reusable = false
            var relayed = buffer
            if var held = heldHead.take() {
                // The head's first part, held back to be marked `connection: close` (the client
                // asked to close, yet upgraded): relayed unmarked, before the rest.
                held.writeImmutableBuffer(buffer)
                relayed = held
            }
            sink.appBytes(relayed)
            sink.appUpgraded()
            return
        }
        var relayed = buffer
        if consumed < buffer.readableBytes {
            relayed = buffer.getSlice(at: buffer.readerIndex, length: consumed) ?? buffer
            reusable = false  // extra bytes after the response: never reuse
        }
        if marksClose { relayed = markingClose(relayed, allocator: context.channel.allocator) }
        if relayed.readableBytes > 0 { sink.appBytes(relayed) }
        if ended {
            sink.appEnd()
            if !reusable { context.close(promise: nil) }
        }
    }

    /// What of `bytes` (this read's part of the response) may be relayed now: once the final head
    /// is complete, everything, with `connection: close` after its status line (clients combine
    /// every `Connection` field, and `close` among them ends the connection whatever else the app
    /// wrote); before that, all but the incomplete head, which is held back until the rest of it
    /// arrives (nothing of it reaches the client if the app fails first: the client gets a 502).
    private func markingClose(_ bytes: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        guard bytes.readableBytes > 0 else { return bytes }  // nothing read: keep holding
        var bytes = bytes
        var shift = 0
        if var held = heldHead.take() {
            shift = held.readableBytes
            held.writeImmutableBuffer(bytes)
            bytes = held
        }
        func offset(_ start: HTTP1ResponseFramer.HeadStart) -> Int {
            if case .inRead(let at) = start { return shift + at }
            return 0  // began in an earlier read: the held bytes start with it
        }
        if let start = framer.finalHeadStart {
            marksClose = false
            let from = offset(start)
            guard let lineEnd = bytes.withUnsafeReadableBytes({ $0[from...].firstIndex(of: 0x0A) }),
                  let line = bytes.getSlice(at: bytes.readerIndex, length: lineEnd + 1),
                  let rest = bytes.getSlice(at: bytes.readerIndex + lineEnd + 1, length: bytes.readableBytes - lineEnd - 1) else {
                return bytes  // not reached: a complete head has its status line
            }
            var marked = allocator.buffer(capacity: bytes.readableBytes + 19)
            marked.writeImmutableBuffer(line)
            marked.writeStaticString("connection: close\r\n")
            marked.writeImmutableBuffer(rest)
            return marked
        }
        if let start = framer.incompleteHeadStart {
            let from = offset(start)
            heldHead = bytes.getSlice(at: bytes.readerIndex + from, length: bytes.readableBytes - from)
            return bytes.getSlice(at: bytes.readerIndex, length: from) ?? bytes
        }
        return bytes
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        sink?.appReadComplete()
    }

    /// Leaves the pipeline of an upgraded connection (its bytes are no longer HTTP responses),
    /// asking for the read it may have held back.
    func detach() {
        guard let context else { return }
        sink = nil
        onClose = nil
        readsHeld = false
        let channel = context.channel
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        channel.read()
    }

    func channelInactive(context: ChannelHandlerContext) {
        reusable = false
        readsHeld = false
        var ended = false
        let complete = framer.connectionClosed { event in
            if case .end = event { ended = true }
        }
        if let sink {
            if ended {
                sink.appEnd()
            } else if !complete {
                sink.appFailed(receivedAnything: receivedBytes > 0)
            }
        }
        sink = nil
        let done = onClose
        onClose = nil
        done?()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        reusable = false
        context.close(promise: nil)
    }
}

/// One loopback connection to the app.
/// Confined to its channel's event loop (checked by the pool), hence `@unchecked Sendable`.
final class AppConnection: @unchecked Sendable {
    let channel: any Channel
    let handler: AppResponseHandler
    /// True when it came from the idle list (a request that fails on it before any response byte
    /// may be retried once on a fresh connection: the app may have closed it while idle).
    var reused = false

    init(channel: any Channel, handler: AppResponseHandler) {
        self.channel = channel
        self.handler = handler
    }
}

/// Keep-alive connections to the app, one pool per event loop and used only on that loop (no
/// locks on the request path).
final class AppPool: @unchecked Sendable {
    let eventLoop: any EventLoop
    let target: SocketAddress
    let maxIdle: Int
    private var idle: [AppConnection] = []
    static let receiveBuffer = 256 * 1024
    /// Request body bytes an inbound handler holds for one request (waiting for its app connection,
    /// or queued behind the response in flight) before it stops reading its client.
    static let maxHeldBody = 256 * 1024

    init(eventLoop: any EventLoop, target: SocketAddress, maxIdle: Int = 256) {
        self.eventLoop = eventLoop
        self.target = target
        self.maxIdle = maxIdle
    }

    /// Hands `body` a connection for one request: an idle pooled one at once (the request path's
    /// fast case: no future), else a new one when it is connected (`fresh`: always a new one).
    func acquire(fresh: Bool, _ body: @escaping (Result<AppConnection, any Error>) -> Void) {
        if !fresh, let connection = takeIdle() {
            body(.success(connection))
            return
        }
        connect().assumeIsolated().whenComplete(body)
    }

    /// An idle pooled connection that can carry another request, if there is one.
    private func takeIdle() -> AppConnection? {
        eventLoop.preconditionInEventLoop()
        while let connection = idle.popLast() {
            connection.handler.onClose = nil  // out of the idle list now: nothing to remove on close
            if connection.channel.isActive, connection.handler.reusable {
                connection.reused = true
                return connection
            }
        }
        return nil
    }

    func connect() -> EventLoopFuture<AppConnection> {
        ClientBootstrap(group: eventLoop)
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
            // A fixed receive buffer: when the app closes, NIO reads everything up to the FIN even
            // while reads are held, so this (not the kernel's autotuned maximum, up to tens of MB)
            // bounds what a closing app can push past a slow client. Loopback needs no more.
            .channelOption(.socketOption(.so_rcvbuf), value: AppPool.receiveBuffer)
            .connectTimeout(.seconds(5))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(AppResponseHandler())
                }
            }
            .connect(to: target)
            .flatMapThrowing { channel in
                let handler = try channel.pipeline.syncOperations.handler(type: AppResponseHandler.self)
                return AppConnection(channel: channel, handler: handler)
            }
    }

    /// Returns a connection after its response completed; closes it if it cannot be reused.
    func release(_ connection: AppConnection) {
        eventLoop.preconditionInEventLoop()
        connection.handler.sink = nil
        connection.handler.holdReads(false)  // an idle connection is read: the app's close is seen
        guard connection.handler.reusable, connection.handler.isIdle, connection.channel.isActive, idle.count < maxIdle else {
            connection.channel.close(promise: nil)
            return
        }
        // Weak, not unowned: a connection handed out again and then failed may be gone (its
        // request dropped the last reference) before its channel's close runs this.
        connection.handler.onClose = { [weak self, weak connection] in
            guard let self, let connection else { return }
            self.idle.removeAll { $0 === connection }
        }
        idle.append(connection)
    }

    func discard(_ connection: AppConnection) {
        connection.handler.sink = nil
        connection.handler.reusable = false
        connection.channel.close(promise: nil)
    }

    func closeAll() {
        for connection in idle { connection.channel.close(promise: nil) }
        idle.removeAll()
    }
}

/// The pools of every event loop of the proxy, created once at start (immutable map).
final class AppPools: @unchecked Sendable {
    private let pools: [ObjectIdentifier: AppPool]

    init(group: any EventLoopGroup, target: SocketAddress) {
        var pools: [ObjectIdentifier: AppPool] = [:]
        for loop in group.makeIterator() {
            pools[ObjectIdentifier(loop)] = AppPool(eventLoop: loop, target: target)
        }
        self.pools = pools
    }

    /// The pool of `loop`; only touch it on that loop.
    func pool(for loop: any EventLoop) -> AppPool {
        if let pool = pools[ObjectIdentifier(loop)] { return pool }
        preconditionFailure("no app pool for this event loop")
    }

    func closeAll() {
        for pool in pools.values {
            pool.eventLoop.execute { pool.closeAll() }
        }
    }
}
