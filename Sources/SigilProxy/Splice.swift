import NIOCore
import NIOPosix

/// Holds a new connection's first bytes while its other end is being connected, then joins the two
/// with a ``GlueHandler`` pair and steps out of the pipeline. Used by TCP mode (inbound) and by the
/// outbound listener.
final class SpliceHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    /// Opens the other end on `loop`, with `partner` as its last handler.
    typealias Connector = (_ loop: any EventLoop, _ partner: GlueHandler, _ firstBytes: ByteBuffer?) -> EventLoopFuture<any Channel>

    private let connector: Connector
    private let connectOnFirstRead: Bool
    private var buffered: [ByteBuffer] = []
    private var started = false
    private var local: GlueHandler?
    private var remote: GlueHandler?
    private var openedAt = NIODeadline.now()
    /// The client half-closed before the other end was joined: passed on right after the join.
    private var inputClosed = false
    /// Called once when both sides are closed: bytes from the client, bytes to the client, the
    /// connect error if the other end never came up, and the time open.
    var onDone: ((_ bytesIn: Int, _ bytesOut: Int, _ error: (any Error)?, _ duration: TimeAmount) -> Void)?
    /// What to tell the client when the other end never came up (an HTTP 503 on the outbound), from
    /// the connect error and the client's first bytes; nil closes the connection without a word.
    var refusal: ((_ error: any Error, _ firstBytes: ByteBuffer?) -> ByteBuffer?)?
    /// The refusal is written: what the client still sends is read and dropped until it closes or
    /// ``lingerAfterRefusal`` passes, so that its late bytes do not reset the connection (and
    /// discard the answer) before it has read it.
    private var refused = false
    static let lingerAfterRefusal = TimeAmount.seconds(2)

    init(connectOnFirstRead: Bool, connector: @escaping Connector) {
        self.connectOnFirstRead = connectOnFirstRead
        self.connector = connector
    }

    func handlerAdded(context: ChannelHandlerContext) {
        openedAt = .now()
        if !connectOnFirstRead, context.channel.isActive { start(context: context, firstBytes: nil) }
    }

    func channelActive(context: ChannelHandlerContext) {
        if !connectOnFirstRead { start(context: context, firstBytes: nil) }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if refused { return }
        let buffer = unwrapInboundIn(data)
        buffered.append(buffer)
        if !started {
            // Hold further reads until the other end is up.
            context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
            start(context: context, firstBytes: buffer)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if local == nil { report(error: nil) }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if local == nil, let event = event as? ChannelEvent, case .inputClosed = event {
            inputClosed = true
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    private func start(context: ChannelHandlerContext, firstBytes: ByteBuffer?) {
        guard !started else { return }
        started = true
        let (local, remote) = GlueHandler.matchedPair()
        connector(context.eventLoop, remote, firstBytes).assumeIsolated().whenComplete { result in
            switch result {
            case .success(let channel):
                guard context.channel.isActive else {
                    channel.close(promise: nil)
                    return
                }
                self.join(context: context, local: local, remote: remote, remoteChannel: channel)
            case .failure(let error):
                self.report(error: error)
                self.refuse(context: context, error: error, firstBytes: firstBytes)
            }
        }
    }

    /// Answers the client with ``refusal``'s bytes, if any, then half-closes and lingers; or closes.
    private func refuse(context: ChannelHandlerContext, error: any Error, firstBytes: ByteBuffer?) {
        guard context.channel.isActive, let answer = refusal?(error, firstBytes) else {
            context.close(promise: nil)
            return
        }
        refused = true
        buffered = []
        let channel = context.channel
        let loop = context.eventLoop
        context.writeAndFlush(wrapOutboundOut(answer)).assumeIsolated().whenComplete { _ in
            channel.close(mode: .output, promise: nil)
        }
        channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        loop.scheduleTask(in: Self.lingerAfterRefusal) { channel.close(promise: nil) }
    }

    private func join(context: ChannelHandlerContext, local: GlueHandler, remote: GlueHandler, remoteChannel: any Channel) {
        self.local = local
        self.remote = remote
        var closed = 0
        let finish = { [self] in
            closed += 1
            if closed == 2 { self.report(error: nil) }
        }
        local.onClose = finish
        remote.onClose = finish
        do {
            try context.pipeline.syncOperations.addHandler(local, position: .after(self))
        } catch {
            remoteChannel.close(promise: nil)
            context.close(promise: nil)
            return
        }
        let pending = buffered
        buffered = []
        for buffer in pending { context.fireChannelRead(wrapInboundOut(buffer)) }
        if !pending.isEmpty { context.fireChannelReadComplete() }
        if inputClosed { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    private func report(error: (any Error)?) {
        guard let done = onDone else { return }
        onDone = nil
        done(local?.bytesRead ?? buffered.reduce(0) { $0 + $1.readableBytes }, remote?.bytesRead ?? 0, error, .now() - openedAt)
    }
}

extension SpliceHandler {
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer
}
