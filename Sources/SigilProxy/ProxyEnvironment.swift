import Logging
import NIOCore
import NIOHTTP1
import SigilCore

/// What every connection handler of one proxy shares (all of it thread-safe or immutable).
final class ProxyEnvironment: Sendable {
    let policy: PolicyStore
    let identity: IdentityStore
    let ledger: LedgerSpool?
    /// Per event loop: rows of completed requests (and of closed connections), written once per
    /// loop iteration.
    let batches: LedgerBatches?
    let pools: AppPools
    /// The app's port: `destination.port` for authorization, and the PeerAuthentication port.
    let appPort: Int
    let appAddress: SocketAddress
    let tcpMode: Bool
    /// How request targets are normalized (`--path-normalization`).
    let pathNormalization: RequestTarget.Normalization
    let metrics: ProxyMetrics
    let logger: Logger
    /// TCP-mode connections and WebSocket tunnels: decided again when the policies change.
    let tunnels = OpenTunnels()

    init(policy: PolicyStore, identity: IdentityStore, ledger: LedgerSpool?, group: any EventLoopGroup, pools: AppPools, appPort: Int,
         appAddress: SocketAddress, tcpMode: Bool, pathNormalization: RequestTarget.Normalization = .base,
         metrics: ProxyMetrics = ProxyMetrics(), logger: Logger) {
        self.policy = policy
        self.identity = identity
        self.ledger = ledger
        self.batches = ledger.map { LedgerBatches(group: group, spool: $0) }
        self.pools = pools
        self.appPort = appPort
        self.appAddress = appAddress
        self.tcpMode = tcpMode
        self.pathNormalization = pathNormalization
        self.metrics = metrics
        self.logger = logger
        let tunnels = tunnels
        policy.onChange { state in
            let closed = tunnels.reauthorize(under: state)
            if closed > 0 {
                logger.warning("closed open connections the new policies refuse (TCP mode, WebSocket)",
                               metadata: ["count": "\(closed)", "generation": "\(state.generation)"])
            }
        }
    }

    /// Writes a row into the spool (it is in the file when this returns): rows that are not a
    /// response's completion and not a closed connection's on its loop (refusals, identity and
    /// policy rows). A completed response's row goes through ``recordBeforeFlush``.
    func record(_ row: LedgerRecord) {
        ledger?.append(row)
    }

    /// Records a row on the event loop `loop` is running: it joins the loop's batch and goes into
    /// the spool with the rows completed in the same iteration (one `write` for all), as a
    /// connection's row when the connection has ended (nothing waits for it). Off the loop, or
    /// on a loop without a batch, it is written now.
    func record(_ row: LedgerRecord, on loop: any EventLoop) {
        guard let ledger else { return }
        guard loop.inEventLoop, let batch = batches?.batch(for: loop) else {
            ledger.append(row)
            return
        }
        let writer = batch.writer
        batch.add(waiter: nil) { LedgerChain.appendUnsealed(writer: writer, to: &$0) { row.appendBody(to: &$0) } }
    }

    /// Writes a request's row into the spool now (a request that ended without a response to hold).
    func record(_ facts: RequestFacts, peer: PeerInfo, detail: String?) {
        guard let ledger else { return }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(640)
        let partial = facts.appendLedgerRow(peer: peer, writer: ledger.writer, detail: detail, port: appPort, to: &bytes)
        ledger.append(unsealed: CollectionOfOne(LedgerSpool.UnsealedRow(bytes: bytes[...], partial: partial)))
    }

    /// Records a completed request's row before its response is released. True: the row waits
    /// for the end of this loop iteration (one `write` for all rows completed in it) and the
    /// caller must not flush the response until `waiter.ledgerRowWritten()`. False: nothing
    /// waits (no ledger: no row is built; or a loop without a batch: written now); flush at once.
    func recordBeforeFlush(_ facts: RequestFacts, peer: PeerInfo, detail: String?, on loop: any EventLoop,
                           waiter: any LedgerRowWaiter) -> Bool {
        guard ledger != nil else { return false }
        guard let batch = batches?.batch(for: loop) else {
            record(facts, peer: peer, detail: detail)
            return false
        }
        let port = appPort
        let writer = batch.writer
        batch.add(waiter: waiter) { facts.appendLedgerRow(peer: peer, writer: writer, detail: detail, port: port, to: &$0) }
        return true
    }

    /// Writes this loop's waiting rows now (their responses are released): for a path that must
    /// flush or close a connection whose completed response still waits for its row.
    func writeWaitingRows(on loop: any EventLoop) {
        batches?.batch(for: loop)?.writeNow()
    }

    /// True while the ledger spool is full: new inbound requests (and TCP connections) are
    /// refused without reaching the app, since their rows could not be written. Counts the refusal.
    func refusesForLedger() -> Bool {
        guard let ledger, ledger.isFull else { return false }
        metrics.requestRefused()
        return true
    }
}

/// Who is on the other end of one inbound connection, settled once at the handshake. A class:
/// every request of the connection reads it, and passing one reference costs one retain where a
/// struct of ten reference-counted fields cost ten (the profile showed its copies per request).
final class PeerInfo: Sendable {
    /// The caller's SPIFFE ID (nil: plaintext).
    let spiffeID: String?
    /// Istio's form of it (`td/ns/x/sa/y`) for policy matching.
    let principal: String?
    let serial: String?
    let sourceIP: String?
    let destinationIP: String?
    let mtls: Bool
    /// Our own SPIFFE ID at accept time.
    let ownID: String?
    /// The `x-forwarded-client-cert` value for the app (mTLS peers only).
    let xfcc: String?
    let sni: String?
    /// The first part of this connection's ledger rows, serialized and hashed once: the row's
    /// head (`{"writer":…`) and its who-called-whom fields
    /// (``LedgerRecord/appendBodyParties(to:source:destination:peerSerial:sourceIP:port:)``), with
    /// the SHA-256 state over them, which each request's row continues. Empty: not prepared (no
    /// ledger; see ``preparedForLedger(_:)``).
    let ledgerPrefix: [UInt8]
    let ledgerPrefixHash: LedgerChain.PartialHash

    init(spiffeID: String?, principal: String?, serial: String?, sourceIP: String?, destinationIP: String?, mtls: Bool,
         ownID: String?, xfcc: String?, sni: String?, ledgerPrefix: [UInt8] = [], ledgerPrefixHash: LedgerChain.PartialHash = .init()) {
        self.spiffeID = spiffeID
        self.principal = principal
        self.serial = serial
        self.sourceIP = sourceIP
        self.destinationIP = destinationIP
        self.mtls = mtls
        self.ownID = ownID
        self.xfcc = xfcc
        self.sni = sni
        self.ledgerPrefix = ledgerPrefix
        self.ledgerPrefixHash = ledgerPrefixHash
    }

    func appendLedgerParties(port: Int, to out: inout [UInt8]) {
        LedgerRecord.appendBodyParties(to: &out, source: spiffeID, destination: ownID, peerSerial: serial, sourceIP: sourceIP, port: port)
    }

    /// This peer with ``ledgerPrefix`` serialized and hashed, when the proxy keeps a ledger (else
    /// this peer as it is).
    func preparedForLedger(_ environment: ProxyEnvironment) -> PeerInfo {
        guard let ledger = environment.ledger else { return self }
        var prefix: [UInt8] = []
        let hash = LedgerChain.appendUnsealed(writer: ledger.writer, to: &prefix) {
            self.appendLedgerParties(port: environment.appPort, to: &$0)
        }
        return PeerInfo(spiffeID: spiffeID, principal: principal, serial: serial, sourceIP: sourceIP, destinationIP: destinationIP,
                        mtls: mtls, ownID: ownID, xfcc: xfcc, sni: sni, ledgerPrefix: prefix, ledgerPrefixHash: hash)
    }

    static func plaintext(channel: any Channel, ownID: String?) -> PeerInfo {
        PeerInfo(spiffeID: nil, principal: nil, serial: nil, sourceIP: channel.remoteAddress?.ipAddress,
                 destinationIP: channel.localAddress?.ipAddress, mtls: false, ownID: ownID, xfcc: nil, sni: nil)
    }
}

/// One HTTP request as authorization and the ledger see it.
struct RequestFacts {
    var method: String
    var path: String
    var host: String?
    var proto: String
    var start: NIODeadline
    var startMicros: Int64
    var decision: AuthorizationDecision
    var status: Int?
    var bytesIn = 0
    var bytesOut = 0

    /// Facts whose decision is already made (no authorization runs, nothing is counted).
    init(method: String, path: String, host: String?, proto: String, start: NIODeadline = .now(), startMicros: Int64,
         decision: AuthorizationDecision) {
        self.method = method
        self.path = path
        self.host = host
        self.proto = proto
        self.start = start
        self.startMicros = startMicros
        self.decision = decision
    }

    /// Authorizes `head` from `peer` under the current enforcement state.
    init(head: HTTPRequestHead, peer: PeerInfo, environment: ProxyEnvironment, proto: String) {
        self.init(method: head.method.rawValue, path: head.uri, host: head.headers.first(name: "host"),
                  values: { head.headers[$0] }, peer: peer, environment: environment, proto: proto)
    }

    /// Authorizes a request from `peer`; `values` gives a header's values by lowercased name
    /// (called only for the headers a policy rule reads).
    init(method: String, path: String, host: String?, values: (String) -> [String], peer: PeerInfo,
         environment: ProxyEnvironment, proto: String) {
        let start = NIODeadline.now()
        let startMicros = ProxyClock.nowMicros()
        let decision = Self.decide(method: method, path: path, host: host, values: values, peer: peer, appPort: environment.appPort,
                                   under: environment.policy.current)
        self.init(method: method, path: path, host: host, proto: proto, start: start, startMicros: startMicros, decision: decision)
        environment.metrics.request(allowed: decision.allowed)
    }

    /// The decision on a request from `peer` under `state`: also how an upgraded WebSocket's
    /// handshake is decided again when the policies change (``OpenTunnels``).
    static func decide(method: String, path: String, host: String?, values: (String) -> [String], peer: PeerInfo, appPort: Int,
                       under state: EnforcementState) -> AuthorizationDecision {
        // A plaintext connection accepted under PERMISSIVE (or the kill switch) that is still
        // open after the mode became STRICT: each of its requests is refused from then on.
        if state.refusesPlaintext(mtls: peer.mtls) { return EnforcementState.strictRefusal }
        if state.allowsEverything { return state.decide(AuthorizationRequest()) }
        var headers: [String: [String]] = [:]
        for name in state.headerNames {
            // `x-forwarded-client-cert` is the proxy's own (the client's copy, in any spelling,
            // never reaches the app): a rule reads what the app will get, as in Envoy, where the
            // header is rewritten before any filter runs.
            let found = HTTPBytes.isForwardedClientCert(name)
                ? (name == "x-forwarded-client-cert" ? peer.xfcc.map { [$0] } ?? [] : [])
                : values(name)
            if !found.isEmpty { headers[name] = found }
        }
        let request = AuthorizationRequest(
            principal: peer.principal, sourceIP: peer.sourceIP, destinationIP: peer.destinationIP,
            destinationPort: appPort, host: host, method: method, path: path, headers: headers, sni: peer.sni)
        return state.decide(request)
    }

    /// The request's row up to its seq (``LedgerChain/appendUnsealed(writer:to:body:)``'s bytes for
    /// `writer`) written straight from these facts, and the hash state over them: the hot path, no
    /// record of Strings built first. The connection's part (head, who called whom) is copied from
    /// ``PeerInfo/ledgerPrefix`` and its hash continued when it was prepared; `writer` and `port`
    /// are used only when it was not (the prepared part holds the spool's writer and the
    /// environment's `appPort`, what every caller passes).
    func appendLedgerRow(peer: PeerInfo, writer: String, detail: String?, port: Int, to out: inout [UInt8]) -> LedgerChain.PartialHash {
        var partial: LedgerChain.PartialHash
        if peer.ledgerPrefix.isEmpty {
            partial = LedgerChain.appendUnsealed(writer: writer, to: &out) { peer.appendLedgerParties(port: port, to: &$0) }
        } else {
            out.append(contentsOf: peer.ledgerPrefix)
            partial = peer.ledgerPrefixHash
        }
        let rest = out.count
        LedgerRecord.appendBodyStart(to: &out, kind: .request, timeMicros: startMicros)
        LedgerRecord.appendBodyRest(to: &out, proto: proto, method: method, path: path, host: host, status: status,
                                    decision: decision.allowed ? "allow" : "deny", policy: decision.policy, rule: decision.rule,
                                    mtls: peer.mtls, bytesIn: bytesIn, bytesOut: bytesOut,
                                    durationMicros: (NIODeadline.now() - start).nanoseconds / 1000,
                                    detail: decision.ledgerDetail(detail))
        partial.update(out[rest...])
        return partial
    }
}

/// Writing an HTTP/1.1 request head for the app: the client's head with any client-supplied
/// `x-forwarded-client-cert` removed and ours added (mTLS peers only), as Envoy's SANITIZE_SET.
enum RequestHeadWriter {
    static func write(_ head: HTTPRequestHead, xfcc: String?, forceChunked: Bool = false, into buffer: inout ByteBuffer) {
        buffer.writeString(head.method.rawValue)
        buffer.writeStaticString(" ")
        buffer.writeString(head.uri)
        // HTTP/1.0 stays 1.0 (no keep-alive, no chunked body unless asked); everything else, an
        // HTTP/2 stream included, goes to the app as HTTP/1.1 (its 2.0 has minor 0 too).
        let http10 = head.version.major == 1 && head.version.minor == 0
        buffer.writeStaticString(http10 ? " HTTP/1.0\r\n" : " HTTP/1.1\r\n")
        for (name, value) in head.headers {
            if HTTPBytes.isForwardedClientCert(name) { continue }
            buffer.writeString(name)
            buffer.writeStaticString(": ")
            buffer.writeString(value)
            buffer.writeStaticString("\r\n")
        }
        if forceChunked { buffer.writeStaticString("transfer-encoding: chunked\r\n") }
        if let xfcc {
            buffer.writeStaticString("x-forwarded-client-cert: ")
            buffer.writeString(xfcc)
            buffer.writeStaticString("\r\n")
        }
        buffer.writeStaticString("\r\n")
    }

    static func writeChunk(_ body: ByteBuffer, into buffer: inout ByteBuffer) {
        buffer.writeString(String(body.readableBytes, radix: 16))
        buffer.writeStaticString("\r\n")
        var body = body
        buffer.writeBuffer(&body)
        buffer.writeStaticString("\r\n")
    }
}
