import NIOCore

/// Joins two channels and copies bytes both ways (TCP mode, outbound): one flush per read batch,
/// reads paused while the partner cannot take more (back-pressure), and a close on either side
/// closes the other. Counts bytes for the ledger.
final class GlueHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var partner: GlueHandler?
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    /// Bytes read from this side's channel.
    private(set) var bytesRead = 0
    /// Runs once, when this side closes (after the partner has been told).
    var onClose: (() -> Void)?

    private init() {}

    static func matchedPair() -> (GlueHandler, GlueHandler) {
        let first = GlueHandler()
        let second = GlueHandler()
        first.partner = second
        second.partner = first
        return (first, second)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        partner = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        bytesRead += buffer.readableBytes
        partner?.partnerWrite(buffer)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        partner?.partnerFlush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        partner?.partnerClose()
        let done = onClose
        onClose = nil
        done?()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            partner?.partnerWriteEOF()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.partnerBecameWritable() }
    }

    func read(context: ChannelHandlerContext) {
        if let partner, partner.partnerWritable {
            context.read()
        } else {
            pendingRead = true
        }
    }

    // MARK: calls from the partner

    private func partnerWrite(_ buffer: ByteBuffer) {
        context?.write(wrapOutboundOut(buffer), promise: nil)
    }

    private func partnerFlush() {
        context?.flush()
    }

    /// Shuts down this side's output once everything already written to it has gone out. A
    /// half-close right away would lose that tail when this side's input is closed already (the
    /// other direction ended first): a channel whose input and output are both closed closes
    /// fully, and a full close drops writes still queued behind back-pressure.
    private func partnerWriteEOF() {
        afterQueuedWrites { $0.close(mode: .output, promise: nil) }
    }

    /// Closes this side once everything already written to it has gone out: a close right away
    /// would drop writes still queued behind back-pressure (the end of an answer the partner
    /// sent just before it closed).
    private func partnerClose() {
        afterQueuedWrites { $0.close(promise: nil) }
    }

    /// Runs `action` once every write queued on this side so far is out (or has failed): an empty
    /// write is flushed behind them, and writes complete in order (through TLS too).
    private func afterQueuedWrites(_ action: @escaping (ChannelHandlerContext) -> Void) {
        guard let context else { return }
        let empty = context.channel.allocator.buffer(capacity: 0)
        context.writeAndFlush(wrapOutboundOut(empty)).assumeIsolated().whenComplete { _ in
            action(context)
        }
    }

    private func partnerBecameWritable() {
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }

    private var partnerWritable: Bool {
        context?.channel.isWritable ?? false
    }
}
