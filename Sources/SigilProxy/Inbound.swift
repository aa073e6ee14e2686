#if canImport(Glibc)
import Glibc
#endif
#if canImport(CoreFoundation)
import CoreFoundation  // the release build resolves Glibc struct members (tcp_info) through it
#endif
import Foundation
import Crypto
import NIOCore
import NIOHTTP2
import NIOPosix
import NIOSSL
import NIOTLS
import SwiftASN1
import SigilCore
import SigilTLS
import X509

/// Closes an inbound connection whose set-up has not finished in time: a TLS handshake (with the
/// check of the peer's certificate) still running, or a plaintext HTTP connection (PERMISSIVE,
/// DISABLE) that has not sent its first whole request head or HTTP/2 stream. Without it a peer
/// could hold a socket for ever by sending nothing, one byte, or half a ClientHello and a FIN
/// (which ``EOFHolder`` keeps back until the handshake ends). Removed once the connection is set
/// up: by ``ApplicationPipeline`` after a handshake (and for plaintext TCP mode, whose first byte
/// is the connection's data), and for plaintext HTTP by the HTTP/1.1 handler at the first request
/// head or the HTTP/2 handler at the first stream (``FirstRequestSetup``). A closed connection
/// cancels it too. At the deadline it
/// raises ``SetupTimedOut`` down the pipeline (the TLS path records the refusal) and closes.
final class SetupDeadline: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    private let timeout: TimeAmount
    private var task: Scheduled<Void>?

    init(timeout: TimeAmount) { self.timeout = timeout }

    func handlerAdded(context: ChannelHandlerContext) {
        let timeout = self.timeout
        task = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) {
            context.fireErrorCaught(SetupTimedOut(timeout: timeout))
            context.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        task?.cancel()
        task = nil
    }

    /// Takes the deadline out of `pipeline`, if it is there (call on the channel's event loop).
    static func remove(from pipeline: ChannelPipeline.SynchronousOperations) {
        if let deadline = try? pipeline.handler(type: SetupDeadline.self) {
            pipeline.removeHandler(deadline, promise: nil)
        }
    }
}

/// A plaintext HTTP connection is set up at its first request: the HTTP handlers' note of whether
/// that is still to come (an mTLS connection was set up at its handshake).
struct FirstRequestSetup {
    private var pending: Bool

    init(peer: PeerInfo) { pending = !peer.mtls }

    /// A whole request head (HTTP/1.1) or a stream (HTTP/2) arrived: the set-up deadline goes.
    mutating func requestArrived(_ context: ChannelHandlerContext) {
        guard pending else { return }
        pending = false
        SetupDeadline.remove(from: context.pipeline.syncOperations)
    }
}

/// Closes an inbound connection on which no data has moved either way for `--idle-timeout`
/// (default 1 h, like Envoy's TCP proxy idle_timeout): a set-up peer that goes quiet, or a TCP-mode
/// connection nobody uses, cannot hold a socket for ever. Nothing is counted per byte or per
/// request: when the timer fires it asks the kernel (TCP_INFO) how long ago the last data segment
/// was received and sent, and closes the connection (abruptly, no GOAWAY) or sleeps for the rest
/// of the timeout. A request that waits that long for its app with no byte either way, and a
/// transfer stalled that long (the reader's window shut), are closed too. The watch starts at
/// accept; the flag is at least `--handshake-timeout`, so set-up is bounded by the latter. Linux
/// only (TCP_INFO); elsewhere it does nothing. Confined to the channel's event loop.
final class IdleWatch {
    private let channel: any Channel
    private let timeoutMillis: Int64
    private var task: Scheduled<Void>?

    private init(channel: any Channel, timeout: TimeAmount) {
        self.channel = channel
        self.timeoutMillis = max(1, timeout.nanoseconds / 1_000_000)
    }

    /// Watches `channel` until it closes (call on its event loop).
    static func start(on channel: any Channel, timeout: TimeAmount) {
        let watch = IdleWatch(channel: channel, timeout: timeout)
        watch.schedule(in: timeout)
        channel.closeFuture.assumeIsolated().whenComplete { _ in
            watch.task?.cancel()
            watch.task = nil
        }
    }

    private func schedule(in delay: TimeAmount) {
        task = channel.eventLoop.assumeIsolated().scheduleTask(in: delay) { self.check() }
    }

    private func check() {
        task = nil
        #if os(Linux)
        guard channel.isActive, let socket = channel as? any SocketOptionProvider else { return }
        socket.getTCPInfo().assumeIsolated().whenComplete { result in
            guard self.channel.isActive else { return }
            switch result {
            case .success(let info):
                let idle = Int64(min(info.tcpi_last_data_recv, info.tcpi_last_data_sent))
                if idle >= self.timeoutMillis {
                    self.channel.close(promise: nil)
                } else {
                    self.schedule(in: .milliseconds(self.timeoutMillis - idle))
                }
            case .failure:
                self.schedule(in: .milliseconds(self.timeoutMillis))  // asked again next time
            }
        }
        #endif
    }
}

/// The error ``SetupDeadline`` raises.
struct SetupTimedOut: Error, CustomStringConvertible {
    let timeout: TimeAmount
    var description: String {
        let ms = timeout.nanoseconds / 1_000_000
        let limit = ms % 1000 == 0 ? "\(ms / 1000)s" : "\(ms) ms"
        return "connection set-up (TLS handshake, or a plaintext connection's first request) not finished within \(limit) (--handshake-timeout)"
    }
}

/// The first handler of every inbound connection: looks at the first byte to tell TLS (0x16, a
/// handshake record) from plaintext, applies the PeerAuthentication mode in force (STRICT refuses
/// plaintext; PERMISSIVE takes both on one port; DISABLE takes plaintext only), and builds the
/// rest of the pipeline.
final class InboundSniffer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let environment: ProxyEnvironment
    private var decided = false

    init(environment: ProxyEnvironment) {
        self.environment = environment
    }

    func channelActive(context: ChannelHandlerContext) {
        // DISABLE in TCP mode: there is no TLS to tell apart, so nothing to wait for; a
        // server-first protocol (SMTP, MySQL: the app speaks first) must reach the app at once.
        if environment.tcpMode, environment.policy.current.mode == .disable {
            decided = true
            let peer = PeerInfo.plaintext(channel: context.channel, ownID: environment.identity.ownID)
            do {
                try ApplicationPipeline.configure(context.channel, after: self, peer: peer, alpn: nil, firstBytes: nil, environment: environment)
            } catch {
                context.close(promise: nil)
                return
            }
            context.fireChannelActive()
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            return
        }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !decided else {
            context.fireChannelRead(data)
            return
        }
        decided = true
        let buffer = unwrapInboundIn(data)
        let mode = environment.policy.current.mode
        let looksLikeTLS = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) == 0x16
        do {
            if looksLikeTLS && mode != .disable {
                guard let material = environment.identity.current else {
                    context.close(promise: nil)
                    return
                }
                let bundle = environment.identity.bundle
                let tls = NIOSSLServerHandler(
                    context: material.serverContext,
                    customVerificationCallbackWithMetadata: SpiffeTLS.verificationCallback(bundle: bundle))
                let holder = EOFHolder()
                try context.pipeline.syncOperations.addHandlers(
                    [holder, tls, TLSPeerHandler(environment: environment, ownID: material.spiffeID.description, eofHolder: holder)],
                    position: .after(self))
            } else if mode == .strict || mode == .unset {
                environment.record(LedgerRecord(
                    kind: .connection, timeMicros: ProxyClock.nowMicros(), destination: environment.identity.ownID,
                    sourceIP: context.channel.remoteAddress?.ipAddress, port: environment.appPort, decision: "deny",
                    detail: "plaintext connection refused: PeerAuthentication mode is STRICT"))
                context.close(promise: nil)
                return
            } else {
                let peer = PeerInfo.plaintext(channel: context.channel, ownID: environment.identity.ownID)
                try ApplicationPipeline.configure(context.channel, after: self, peer: peer, alpn: nil, firstBytes: buffer, environment: environment)
            }
        } catch {
            context.close(promise: nil)
            return
        }
        context.fireChannelRead(data)
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if !decided, let event = event as? ChannelEvent, case .inputClosed = event {
            context.close(promise: nil)  // EOF before the first byte (half-closure is on in TCP mode)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// Sits in front of the TLS handler and holds back a half-close (TCP FIN) that arrives while the
/// handshake, and our asynchronous check of the peer's certificate, are still running: a client
/// that sends its request and shuts down its write side at once (`nc -N`, batch protocols) would
/// otherwise end the handshake with "EOF during handshake". The FIN is passed on once the
/// handshake is done; everything read before it already has been.
final class EOFHolder: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    private var context: ChannelHandlerContext?
    private var held = false
    private var done = false

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if !done, let event = event as? ChannelEvent, case .inputClosed = event {
            held = true
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// Called (on the channel's event loop) when the handshake has completed. The held FIN goes on
    /// one loop turn later: the handshake-completed event comes while the TLS handler is still in
    /// the middle of the bytes that arrived with the handshake (application data and, from a peer
    /// that half-closed, its close_notify), which it decodes right after the event. A FIN passed on
    /// before that looks to it like a truncated session (an unclean shutdown error, which closes the
    /// connection and loses the answer); after it, it is the expected end of a closed input.
    func handshakeDone() {
        done = true
        guard let context else { return }
        guard held else {
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            return
        }
        held = false
        context.eventLoop.assumeIsolated().execute {
            guard let context = self.context else { return }
            context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }
}

/// Waits for the TLS handshake, settles who the peer is (its verified SPIFFE ID, serial, and the
/// hash for `x-forwarded-client-cert`), then builds the application pipeline for the negotiated
/// protocol. A failed handshake is recorded in the ledger as a refused connection.
final class TLSPeerHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private let environment: ProxyEnvironment
    private let ownID: String
    private let eofHolder: EOFHolder
    private var recorded = false

    init(environment: ProxyEnvironment, ownID: String, eofHolder: EOFHolder) {
        self.environment = environment
        self.ownID = ownID
        self.eofHolder = eofHolder
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let event = event as? TLSUserEvent, case .handshakeCompleted(let alpn) = event else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        do {
            let tls = try context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self)
            let verified = tls.peerValidatedCertificateChain
            guard let leaf = verified?.first ?? tls.peerCertificate else {
                throw ProxyError(.identity, "no peer certificate after the handshake")
            }
            let facts = try PeerLeafFacts.shared.facts(der: try leaf.toDERBytes())
            // A resumed TLS session (a ticket from an earlier handshake) skips the verification
            // callback: its leaf was verified when the session began, under this same context (a
            // new SVID or bundle builds a new context, whose ticket keys are new), but it may
            // have expired since. Fail closed then.
            if verified == nil, let invalid = facts.validity(at: Date()) {
                throw ProxyError(.identity, "resumed TLS session refused: the peer's certificate \(invalid)")
            }
            let peer = PeerInfo(
                spiffeID: facts.spiffeID, principal: facts.principal, serial: facts.serial,
                sourceIP: context.channel.remoteAddress?.ipAddress, destinationIP: context.channel.localAddress?.ipAddress,
                mtls: true, ownID: ownID, xfcc: "By=\(ownID);Hash=\(facts.hash);URI=\(facts.spiffeID)", sni: nil)
            try ApplicationPipeline.configure(context.channel, after: self, peer: peer, alpn: alpn, firstBytes: nil, environment: environment)
            context.fireUserInboundEventTriggered(event)
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            eofHolder.handshakeDone()
        } catch {
            refuse(context: context, reason: "\(error)")
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        refuse(context: context, reason: error is SetupTimedOut ? "\(error)" : "TLS handshake failed: \(error)")
    }

    private func refuse(context: ChannelHandlerContext, reason: String) {
        if !recorded {
            recorded = true
            environment.record(LedgerRecord(
                kind: .connection, timeMicros: ProxyClock.nowMicros(), destination: ownID,
                sourceIP: context.channel.remoteAddress?.ipAddress, port: environment.appPort, decision: "deny",
                mtls: false, detail: "peer refused: \(reason)"))
        }
        context.close(promise: nil)
    }
}

/// What the inbound proxy reads from a verified peer leaf (its SPIFFE ID, Istio principal,
/// serial, and the SHA-256 `x-forwarded-client-cert` carries), by the leaf's SHA-256. These are a
/// pure function of the certificate's bytes and a workload opens many connections with one SVID,
/// so each leaf is parsed once: swift-certificates' parse and the SAN walk were ~3 % of the
/// inbound proxy's CPU per new connection. Only read after a handshake the chain check passed:
/// a full handshake's (``SpiffeTLS``, every time), or for a resumed session the one that began it
/// (then the leaf's validity is checked again here). Failures are not kept. At most 4,096
/// entries (``DigestTable``).
final class PeerLeafFacts: Sendable {
    struct Facts: Sendable {
        let spiffeID: String
        let principal: String
        let serial: String
        /// The leaf's SHA-256 in lowercase hex.
        let hash: String
        let notBefore: Date
        let notAfter: Date

        /// Nil while `now` is inside the leaf's validity; else what is wrong, for the refusal.
        func validity(at now: Date) -> String? {
            if now < notBefore { return "is not valid before \(notBefore)" }
            if now > notAfter { return "expired at \(notAfter)" }
            return nil
        }
    }

    static let shared = PeerLeafFacts()
    private let table = DigestTable<Facts>(capacity: 4096)

    /// The facts of the leaf `der`; throws if it is not a certificate or carries no SPIFFE ID.
    func facts(der: [UInt8]) throws -> Facts {
        let digest = SHA256.hash(data: der)
        if let known = table[digest] { return known }
        let certificate = try Certificate(derEncoded: der)
        guard let id = certificate.spiffeID else { throw ProxyError(.identity, "peer certificate has no SPIFFE ID") }
        let facts = Facts(spiffeID: id.description, principal: id.istioPrincipal, serial: certificate.serialHex, hash: hex(digest),
                          notBefore: certificate.notValidBefore, notAfter: certificate.notValidAfter)
        table.insert(facts, for: digest)
        return facts
    }

    var count: Int { table.count }
}

/// The protocol layer of an inbound connection, once the peer is known.
enum ApplicationPipeline {
    static let h2Preface: [UInt8] = Array(OutboundRefusal.http2Preface.prefix(14))  // "PRI * HTTP/2.0"

    static func configure(_ channel: any Channel, after handler: any ChannelHandler, peer: PeerInfo, alpn: String?,
                          firstBytes: ByteBuffer?, environment: ProxyEnvironment) throws {
        let pipeline = channel.pipeline.syncOperations
        // Set up: an mTLS peer, or plaintext TCP. A plaintext HTTP peer is set up at its first request.
        if peer.mtls || environment.tcpMode { SetupDeadline.remove(from: pipeline) }
        if environment.tcpMode {
            try pipeline.addHandler(TCPInbound.handler(peer: peer, environment: environment, channel: channel), position: .after(handler))
            return
        }
        let peer = peer.preparedForLedger(environment)  // HTTP rows: the connection's part of every row, serialized once
        let priorKnowledgeH2 = firstBytes.map { $0.readableBytesView.starts(with: h2Preface.prefix($0.readableBytes)) && $0.readableBytes >= 3 } ?? false
        if alpn == "h2" || priorKnowledgeH2 {
            // Frames, not a child channel per stream: see HTTP2InboundHandler. A header list up to
            // 64 KiB, as on HTTP/1.1 (NIOHTTP2's default is 16 KiB).
            try pipeline.addHandler(GoAwayCloser(), position: .last)
            try pipeline.addHandler(NIOHTTP2Handler(mode: .server, initialSettings: HTTP2InboundHandler.settings), position: .last)
            try pipeline.addHandler(HTTP2InboundHandler(environment: environment, peer: peer), position: .last)
            return
        }
        try pipeline.addHandler(HTTP1InboundHandler(environment: environment, peer: peer), position: .after(handler))
    }
}

/// Raw TCP mode: the connection is authorized once (Istio's TCP rules: HTTP-only fields cannot
/// match an ALLOW rule), then spliced to a fresh connection to the app. One ledger row per connection.
enum TCPInbound {
    static func handler(peer: PeerInfo, environment: ProxyEnvironment, channel: any Channel) -> any ChannelHandler & RemovableChannelHandler {
        // The ledger spool is full: the connection cannot be recorded, so it is closed (fail closed).
        if environment.refusesForLedger() { return DenyConnectionHandler() }
        let state = environment.policy.current
        let request = AuthorizationRequest(principal: peer.principal, sourceIP: peer.sourceIP, destinationIP: peer.destinationIP,
                                           destinationPort: environment.appPort, sni: peer.sni, isTCP: true)
        let decision = state.decide(request)
        environment.metrics.request(allowed: decision.allowed)
        let start = ProxyClock.nowMicros()
        func row(bytesIn: Int, bytesOut: Int, duration: TimeAmount, detail: String?) -> LedgerRecord {
            LedgerRecord(kind: .connection, timeMicros: start, source: peer.spiffeID, destination: peer.ownID, peerSerial: peer.serial,
                         sourceIP: peer.sourceIP, port: environment.appPort, proto: "tcp",
                         decision: decision.allowed ? "allow" : "deny", policy: decision.policy, rule: decision.rule,
                         mtls: peer.mtls, bytesIn: bytesIn, bytesOut: bytesOut, durationMicros: duration.nanoseconds / 1000,
                         detail: decision.ledgerDetail(detail))
        }
        guard decision.allowed else {
            environment.record(row(bytesIn: 0, bytesOut: 0, duration: .zero, detail: "connection denied"))
            return DenyConnectionHandler()
        }
        // Decided again when the policies change: closed (with the reason in its row) if refused.
        let closedBecause = NIOLoopBoundBox<String?>(nil, eventLoop: channel.eventLoop)
        let mtls = peer.mtls
        let key = environment.tunnels.add(decidedUnder: state.generation, current: environment.policy.current) { state in
            state.decide(request, mtls: mtls)
        } close: { [weak channel] reason in
            guard let channel else { return }
            channel.eventLoop.execute {
                closedBecause.value = reason
                channel.close(promise: nil)
            }
        }
        let address = environment.appAddress
        let splice = SpliceHandler(connectOnFirstRead: false) { loop, partner, _ in
            let bound = NIOLoopBound(partner, eventLoop: loop)
            return ClientBootstrap(group: loop)
                .connectTimeout(.seconds(5))
                .channelOption(.allowRemoteHalfClosure, value: true)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(bound.value) }
                }
                .connect(to: address)
        }
        splice.onDone = { bytesIn, bytesOut, error, duration in
            environment.tunnels.remove(key)
            let detail = error.map { "app unreachable: \($0)" } ?? closedBecause.value
            environment.record(row(bytesIn: bytesIn, bytesOut: bytesOut, duration: duration, detail: detail), on: channel.eventLoop)
        }
        return splice
    }
}

/// Closes a connection that authorization refused (TCP mode: no HTTP status to send).
final class DenyConnectionHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    func handlerAdded(context: ChannelHandlerContext) {
        context.close(promise: nil)
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}
