import Logging
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import SigilCore
import SigilTLS

/// The outbound side: the app connects in plaintext on loopback; the proxy originates mTLS to the
/// upstream with its own SVID, accepts the upstream only if it proves the expected SPIFFE ID, and
/// copies bytes both ways. In HTTP mode the first bytes pick the ALPN protocol offered upstream
/// (the HTTP/2 preface → `h2`, else `http/1.1`), so the inbound proxy parses what the app speaks.
enum Outbound {
    static func splice(environment: ProxyEnvironment, upstream: SocketAddress, upstreamID: SpiffeID, channel: any Channel) -> SpliceHandler {
        let start = ProxyClock.nowMicros()
        let ownID = environment.identity.ownID
        let tcpMode = environment.tcpMode
        let bundle = environment.identity.bundle
        let identity = environment.identity
        var chosenALPN = tcpMode ? "" : "http/1.1"
        let note = UpstreamFailureNote(logger: environment.logger, upstream: "\(upstream)", expected: upstreamID.description)
        let splice = SpliceHandler(connectOnFirstRead: !tcpMode) { loop, partner, firstBytes in
            if !tcpMode, let firstBytes, firstBytes.readableBytesView.starts(with: ApplicationPipeline.h2Preface.prefix(min(firstBytes.readableBytes, 14))) {
                chosenALPN = "h2"
            }
            guard let material = identity.current, let context = material.clientContexts[chosenALPN] else {
                return loop.makeFailedFuture(ProxyError(.identity, "no X509-SVID yet"))
            }
            let bound = NIOLoopBound(partner, eventLoop: loop)
            let boundNote = NIOLoopBound(note, eventLoop: loop)
            let handshake = loop.makePromise(of: Void.self)
            return ClientBootstrap(group: loop)
                .connectTimeout(.seconds(5))
                .channelOption(.allowRemoteHalfClosure, value: tcpMode)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let tls = try NIOSSLClientHandler(
                            context: context, serverHostname: nil,
                            customVerificationCallbackWithMetadata: SpiffeTLS.verificationCallback(bundle: bundle, expectedPeer: upstreamID))
                        try channel.pipeline.syncOperations.addHandlers(
                            [tls, boundNote.value.handler(), HandshakeWaiter(handshake)])
                    }
                }
                .connect(to: upstream)
                // Joined only once TLS is up: a client that half-closes (or closes) while the
                // handshake runs must not have its FIN turned into a close of an unfinished session.
                // The glue goes in then too: until it has a partner it holds reads back, and the
                // handshake needs them.
                .flatMap { channel in
                    handshake.futureResult.flatMapThrowing {
                        try channel.pipeline.syncOperations.addHandler(bound.value)
                        return channel
                    }
                }
        }
        if !tcpMode {
            splice.refusal = { error, firstBytes in
                OutboundRefusal.response(
                    reason: OutboundRefusal.reason(error, tlsFailure: note.failure, upstream: upstream, expected: upstreamID),
                    http2: chosenALPN == "h2", firstBytes: firstBytes, allocator: channel.allocator)
            }
        }
        splice.onDone = { bytesIn, bytesOut, error, duration in
            // On the client channel's loop: the row joins the rows of this loop iteration.
            environment.record(LedgerRecord(
                kind: .connection, timeMicros: start, source: ownID, destination: upstreamID.description,
                sourceIP: channel.remoteAddress?.ipAddress, port: upstream.port, proto: chosenALPN.isEmpty ? "tcp" : chosenALPN,
                decision: error == nil && note.failure == nil ? "allow" : "deny", mtls: true, bytesIn: bytesIn, bytesOut: bytesOut,
                durationMicros: duration.nanoseconds / 1000,
                detail: (error.map { "\($0)" } ?? note.failure).map { "outbound to \(upstream) failed: \($0)" } ?? "outbound"),
                on: channel.eventLoop)
        }
        return splice
    }
}

/// Remembers why an upstream TLS connection failed (a wrong SPIFFE ID shows up as a handshake
/// error), for the ledger row and one log line.
final class UpstreamFailureNote {
    var failure: String?
    let logger: Logger
    let upstream: String
    let expected: String

    init(logger: Logger, upstream: String, expected: String) {
        self.logger = logger
        self.upstream = upstream
        self.expected = expected
    }

    func handler() -> Watcher { Watcher(note: self) }

    final class Watcher: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let note: UpstreamFailureNote
        init(note: UpstreamFailureNote) { self.note = note }
        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            if note.failure == nil {
                note.failure = "\(error)"
                note.logger.warning("upstream refused: TLS failed or it is not the expected SPIFFE ID",
                                    metadata: ["peer": "\(note.upstream)", "spiffe_id": "\(note.expected)", "error": "\(error)"])
            }
            context.fireErrorCaught(error)
        }
    }
}

/// Completes a promise when the TLS handshake on its channel completes, or fails it when the
/// channel errors or closes first. The events pass on unchanged.
final class HandshakeWaiter: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private var promise: EventLoopPromise<Void>?

    init(_ promise: EventLoopPromise<Void>) {
        self.promise = promise
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? TLSUserEvent, case .handshakeCompleted = event {
            promise?.succeed()
            promise = nil
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        promise?.fail(error)
        promise = nil
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise?.fail(ChannelError.ioOnClosedChannel)
        promise = nil
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        promise?.fail(ChannelError.ioOnClosedChannel)
        promise = nil
    }
}
