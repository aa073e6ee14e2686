import Logging
import NIOConcurrencyHelpers
import NIOCore
public import NIOSSL
public import SigilCore
import SigilRPC
import SigilTLS
import X509

/// What a proxy proves and trusts at one moment: its own X509-SVID and the trust bundle, as ready
/// TLS contexts. A rotation builds a new one; new handshakes use it, open connections keep theirs.
public final class TLSMaterial: Sendable {
    public let spiffeID: SpiffeID
    public let serial: String
    public let bundle: TrustBundle
    /// Inbound: TLS 1.3, client certificate required, ALPN h2 + http/1.1 (HTTP mode).
    public let serverContext: NIOSSLContext
    /// Outbound, by ALPN protocol offered to the upstream ("h2", "http/1.1", "" for none).
    public let clientContexts: [String: NIOSSLContext]
    /// The SVID chain (leaf first) and its PKCS#8 key, for the ledger shipper's gRPC client.
    public let chainDER: [[UInt8]]
    public let keyDER: [UInt8]

    init(svid: FetchedX509SVID, httpMode: Bool) throws {
        guard let id = svid.certificates.first?.spiffeID else {
            throw ProxyError(.identity, "the Workload API sent an SVID without a SPIFFE ID")
        }
        spiffeID = id
        serial = svid.certificates[0].serialHex
        bundle = try TrustBundle(trustDomain: id.trustDomain, authorities: svid.bundle)
        let chain = try svid.certificates.map { NIOSSLCertificateSource.certificate(try NIOSSLCertificate(bytes: $0.derBytes, format: .der)) }
        let key = NIOSSLPrivateKeySource.privateKey(try NIOSSLPrivateKey(bytes: svid.privateKeyPKCS8DER, format: .der))

        var server = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: key)
        server.minimumTLSVersion = .tlsv13
        server.certificateVerification = .noHostnameVerification  // a client certificate is required
        if httpMode { server.applicationProtocols = ["h2", "http/1.1"] }
        serverContext = try NIOSSLContext(configuration: server)

        var contexts: [String: NIOSSLContext] = [:]
        for alpn in httpMode ? ["h2", "http/1.1"] : [""] {
            var client = TLSConfiguration.makeClientConfiguration()
            client.minimumTLSVersion = .tlsv13
            client.certificateChain = chain
            client.privateKey = key
            client.certificateVerification = .noHostnameVerification
            client.trustRoots = .certificates([])  // the SPIFFE callback decides, never the system store
            if !alpn.isEmpty { client.applicationProtocols = [alpn] }
            contexts[alpn] = try NIOSSLContext(configuration: client)
        }
        clientContexts = contexts
        chainDER = svid.certificates.map(\.derBytes)
        keyDER = svid.privateKeyPKCS8DER
    }
}

/// The proxy's current ``TLSMaterial``, replaced on every Workload API update.
public final class IdentityStore: Sendable {
    private let box = NIOLockedValueBox<TLSMaterial?>(nil)
    /// The SPIFFE ID last served, kept when the SVID is withdrawn: the proxy is still that
    /// workload, and its ledger rows (a refused plaintext caller, a failed outbound call) name it.
    private let last = NIOLockedValueBox<String?>(nil)

    public init() {}

    public var current: TLSMaterial? { box.withLockedValue { $0 } }

    /// This workload's SPIFFE ID: the one served now, or the last one served.
    public var ownID: String? { current?.spiffeID.description ?? last.withLockedValue { $0 } }

    func replace(_ material: TLSMaterial) {
        box.withLockedValue { $0 = material }
        last.withLockedValue { $0 = material.spiffeID.description }
    }

    /// Stops serving the current identity (the Workload API withdrew it): new handshakes fail
    /// closed until an SVID is issued again; open connections keep theirs. Returns whether there
    /// was one.
    @discardableResult
    func withdraw() -> Bool {
        box.withLockedValue { current in
            defer { current = nil }
            return current != nil
        }
    }

    /// The bundle for SPIFFE peer verification, read on every handshake.
    @Sendable public func bundle() -> TrustBundle? { current?.bundle }
}

/// Follows the Workload API stream and keeps the ``IdentityStore`` current. Reconnects (with
/// backoff) when the agent restarts; the proxy keeps serving its last identity meanwhile, and new
/// handshakes fail closed once that identity has expired. An SVID the Workload API withdraws (an
/// update without the SVID this proxy serves, or a stream that delivered SVIDs ending with
/// PermissionDenied: every SVID withdrawn) stops being served at once, as the Workload API spec
/// asks of clients (5.2.1).
struct IdentityWatcher: Sendable {
    let socketPath: String
    let wantedID: String?
    let httpMode: Bool
    let store: IdentityStore
    let logger: Logger
    /// The proxy's own event loops (no extra threads for the stream).
    let group: any EventLoopGroup
    let onChange: @Sendable (TLSMaterial) -> Void

    func run() async {
        var backoff: Duration = .milliseconds(200)
        while !Task.isCancelled {
            // Whether this stream delivered SVIDs before it ended: a PermissionDenied then is the
            // agent withdrawing them (an entry deleted); one at (re)connect may be a passing
            // attestation failure (an agent restarting, a binary being replaced), so the current
            // SVID is kept until it expires, as while the agent is away.
            let delivered = NIOLockedValueBox(false)
            do {
                try await WorkloadAPIClient(eventLoopGroup: group).watchX509(socketPath: socketPath) { context in
                    try self.apply(context, streamDelivered: delivered.withLockedValue { $0 })
                    delivered.withLockedValue { $0 = true }
                }
                logger.warning("Workload API stream ended; reconnecting", metadata: ["socket": "\(socketPath)"])
            } catch let error as ProxyError {
                logger.error("\(error.message)")
            } catch let error as WorkloadAPIError where error.code == .permissionDenied && delivered.withLockedValue({ $0 }) {
                if store.withdraw() {
                    logger.error("the Workload API withdrew every SVID of this workload (PermissionDenied); no longer serving one, refusing new mTLS connections until an SVID is issued again")
                } else {
                    logger.warning("\(error.message)")
                }
            } catch is CancellationError {
                return
            } catch {
                logger.warning(store.current == nil ? "Workload API unavailable; no identity yet, retrying"
                                                     : "Workload API unavailable; keeping the current identity and retrying",
                               metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: backoff)
            backoff = min(backoff * 2, .seconds(5))
        }
    }

    /// Serves the SVID `context` offers this proxy. `streamDelivered`: this stream already gave
    /// one, so an update without it is a withdrawal (not a first answer that may be partial).
    func apply(_ context: FetchedX509Context, streamDelivered: Bool = true) throws {
        let svid: FetchedX509SVID
        if let wantedID {
            guard let match = context.svids.first(where: { $0.spiffeID == wantedID }) else {
                let offered = context.svids.map(\.spiffeID).joined(separator: ", ")
                let withdrawn = streamDelivered && store.withdraw() ? " (withdrawn: no longer serving it, refusing new mTLS connections)" : ""
                throw ProxyError(.identity, "the Workload API offers no SVID for --spiffe-id \(wantedID)\(withdrawn) (it offers: \(offered)); register an entry for it")
            }
            svid = match
        } else {
            svid = context.svids[0]
        }
        let material = try TLSMaterial(svid: svid, httpMode: httpMode)
        let previous = store.current
        store.replace(material)
        if previous?.serial != material.serial {
            logger.info("serving X509-SVID", metadata: ["spiffe_id": "\(material.spiffeID)", "serial": "\(material.serial)"])
            onChange(material)
        }
    }
}

/// The proxy's errors: a code and a message that says what to do.
public struct ProxyError: Error, Sendable, CustomStringConvertible {
    public enum Code: Sendable { case configuration, identity, policy, bind }
    public let code: Code
    public let message: String
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { message }
}
