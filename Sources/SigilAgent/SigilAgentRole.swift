public import Logging
import SigilCore
import SigilRPC
import SigilTLS
import GRPCCore
import GRPCNIOTransportHTTP2
import ServiceLifecycle
import UnixSignals
import X509
import SwiftASN1
import Crypto
import Synchronization
import NIOCore
import NIOSSL
import Foundation

/// `sigil agent run` settings.
public struct AgentConfig: Sendable {
    public var serverHost: String
    public var serverPort: Int
    public var joinToken: String?
    /// PEM roots to trust the server with before the first sync (required on first start).
    public var trustBundlePath: String?
    public var trustDomain: String?
    public var socketPath: String
    public var dataDirectory: String
    /// Fraction of an SVID's life after which it is renewed (½ by default), before jitter.
    public var renewFraction: Double

    public init(serverHost: String, serverPort: Int, joinToken: String?, trustBundlePath: String?, trustDomain: String?,
                socketPath: String, dataDirectory: String, renewFraction: Double = 0.5) {
        self.serverHost = serverHost
        self.serverPort = serverPort
        self.joinToken = joinToken
        self.trustBundlePath = trustBundlePath
        self.trustDomain = trustDomain
        self.socketPath = socketPath
        self.dataDirectory = dataDirectory
        self.renewFraction = renewFraction
    }
}

/// The node agent role: attests once with a join token, then holds its own SVID; syncs its
/// entries (pushed by the server); makes each workload key locally and gets SVIDs signed in
/// batches; renews at ½ TTL with jitter; serves the SPIFFE Workload API on a Unix socket; keeps
/// serving from its on-disk cache while the server is away.
public enum SigilAgentRole {
    public static func run(_ config: AgentConfig, logger: Logger) async throws {
        let cache = try AgentCache(directory: config.dataDirectory)
        do { try InstanceLock.acquire(directory: config.dataDirectory, name: ".agent.lock", role: "agent") } catch {
            throw AgentError(usage: error.message)
        }
        let cachedIdentity = cache.loadIdentity()
        let cachedSnapshot = cache.loadSnapshot()
        if cachedSnapshot == nil, FileManager.default.fileExists(atPath: cache.cachePath) {
            logger.warning("the SVID cache cannot be read (damaged?) and is ignored: until the server is reached, workloads get nothing from it",
                           metadata: ["path": "\(cache.cachePath)"])
        }
        let identityUnreadable = cachedIdentity == nil && FileManager.default.fileExists(atPath: cache.identityPath)

        // Trust: the bundle file, or what the last sync left in the cache.
        var roots: [Certificate] = []
        if let path = config.trustBundlePath {
            guard let data = FileManager.default.contents(atPath: path) else {
                throw AgentError(usage: "cannot read --trust-bundle '\(path)'")
            }
            do {
                roots = try Certificate.parseChain(pem: String(decoding: data, as: UTF8.self), what: "--trust-bundle '\(path)'")
            } catch {
                throw AgentError(usage: error.message)
            }
        }
        // The newest bundle the agent has synced counts too (after a root rotation the file may be old).
        for root in cachedSnapshot?.bundleRoots.compactMap({ try? Certificate(derEncoded: $0) }) ?? [] where !roots.contains(root) {
            roots.append(root)
        }
        let tdName = config.trustDomain ?? cachedIdentity?.trustDomain ?? roots.lazy.compactMap { $0.uriSANs.first.flatMap { try? SpiffeID($0).trustDomain.name } }.first
        guard let tdName else {
            throw AgentError(usage: "cannot tell the trust domain: pass --trust-bundle with the server's bundle.pem (or --trust-domain)")
        }
        let trustDomain: TrustDomain
        do { trustDomain = try TrustDomain(tdName) } catch { throw AgentError(usage: error.message) }
        guard !roots.isEmpty else {
            throw AgentError(usage: "no trust bundle: pass --trust-bundle with the server's bundle.pem (sigil bundle show)")
        }
        let initialBundle: TrustBundle
        do { initialBundle = try TrustBundle(trustDomain: trustDomain, authorities: roots) } catch { throw AgentError(usage: error.message) }
        let bundleBox = LockedBox(initialBundle)
        let serverID: SpiffeID
        do { serverID = try SpiffeID(trustDomain: trustDomain, path: "/sigil/server") } catch { throw AgentError(error.message) }
        let verify = SpiffeTLS.verificationCallback(bundle: { bundleBox.withLock { $0 } }, expectedPeer: serverID)

        // The Workload API socket's path, checked before attesting: a bad --socket must not cost
        // the single-use join token.
        do { try WorkloadAPIServer.prepareSocketPath(config.socketPath) } catch { throw AgentError(usage: error.message) }

        // The agent's own identity: cached and unexpired, or a fresh attestation with the join token.
        var identity: AgentCache.AgentIdentity
        if let cached = cachedIdentity, cached.notAfter > Date(), cached.trustDomain == trustDomain.name {
            identity = cached
            logger.info("using cached agent SVID", metadata: ["agent_id": "\(cached.agentID)"])
        } else {
            guard let token = config.joinToken, !token.isEmpty else {
                throw AgentError(usage: identityUnreadable
                    ? "the cached agent identity \(cache.identityPath) cannot be read (damaged?): attest again with a new --join-token"
                    : cachedIdentity == nil
                    ? "this agent has not attested yet: pass --join-token (sigil token create --agent-id <name>)"
                    : "the cached agent SVID has expired: attest again with a new --join-token")
            }
            // The data directory must take the SVID before the single-use token is spent on it.
            try cache.probeWritable()
            identity = try await attest(config: config, token: token, trustDomain: trustDomain, verify: verify, logger: logger)
            do {
                try cache.saveIdentity(identity)
            } catch {
                throw AgentError("attested as \(identity.agentID) but cannot save its SVID in --data-dir '\(config.dataDirectory)' (\(error.message)); the join token is spent: free space there and start the agent with a new --join-token")
            }
            logger.info("attested", metadata: ["agent_id": "\(identity.agentID)"])
        }

        let state = AgentState(trustDomain: trustDomain)
        if let cachedSnapshot, cachedSnapshot.agentID == identity.agentID {
            await state.restore(from: cachedSnapshot)
        } else {
            await state.restore(from: AgentCache.Snapshot(trustDomain: trustDomain.name, agentID: identity.agentID, entries: [], svids: [],
                                                          bundleRoots: roots.map(\.derBytes), bundleSequence: 0, jwtKeysJSON: Array(#"{"keys":[]}"#.utf8)))
        }

        let reloader: SVIDCertificateReloader
        do {
            reloader = try SVIDCertificateReloader(chainDER: identity.chainDER, keyPKCS8DER: identity.keyPKCS8DER)
        } catch {
            throw AgentError("the cached agent SVID cannot be loaded (\(error)); delete \(cache.identityPath) and attest again")
        }
        let transport = try HTTP2ClientTransport.Posix(
            target: ServerTarget.resolvable(host: config.serverHost, port: config.serverPort),
            transportSecurity: .mTLS(certificateReloader: reloader) { tls in
                tls.serverCertificateVerification = .noHostnameVerification
                tls.trustRoots = .certificates([])
                tls.customVerificationCallback = verify
            },
            config: .defaults { $0.backoff = .init(initial: .milliseconds(200), max: .seconds(5), multiplier: 1.6, jitter: 0.2) })
        let grpc = GRPCClient(transport: transport)
        let client = SigilAgentAPI.Client(wrapping: grpc)
        await state.setJWTSigner { entryID, audience in
            var request = SigilSignJWTSVIDRequest()
            request.entryID = entryID
            request.audience = audience
            // Bounded, and failing fast while the server is away: the workload gets Unavailable
            // (and retries) instead of a call that never returns.
            var options = CallOptions.defaults
            options.timeout = .seconds(10)
            options.waitForReady = false
            let response = try await client.signJWTSVID(request, options: options)
            return (response.token, Date(timeIntervalSince1970: TimeInterval(response.expiresAt)))
        }

        let worker = AgentWorker(client: client, state: state, cache: cache, reloader: reloader, bundleBox: bundleBox,
                                 identity: LockedBox(identity), trustDomain: trustDomain, renewFraction: config.renewFraction, logger: logger)
        let workloadAPI = WorkloadAPIServer(socketPath: config.socketPath, source: state, logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: [
                    .init(service: GRPCClientService(grpc)),
                    .init(service: workloadAPI),
                    .init(service: worker, successTerminationBehavior: .gracefullyShutdownGroup, failureTerminationBehavior: .gracefullyShutdownGroup),
                ],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        FileHandle.standardError.write(Data("sigil agent: \(identity.agentID), Workload API on \(config.socketPath)\n".utf8))
        try await group.run()
        await state.finishAll()
        if let failure = worker.failure { throw failure }
    }

    /// Node attestation: a throwaway self-signed certificate proves possession of the new agent key
    /// over TLS; the join token proves the right to an agent ID.
    static func attest(config: AgentConfig, token: String, trustDomain: TrustDomain,
                       verify: @escaping @Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResultWithMetadata>) -> Void,
                       logger: Logger) async throws -> AgentCache.AgentIdentity {
        let key = P256.Signing.PrivateKey()
        let bootstrap = try KeyMaterial.selfSigned(key: key)
        // Whether this agent refused the server's certificate: then the failure is named for what
        // it is (a --trust-bundle of another CA, or not the server), not as a closed connection.
        let refusedServer = LockedBox(false)
        let watchedVerify: @Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResultWithMetadata>) -> Void = { chain, promise in
            let inner = promise.futureResult.eventLoop.makePromise(of: NIOSSLVerificationResultWithMetadata.self)
            inner.futureResult.whenComplete { result in
                if case .success(.failed) = result { refusedServer.withLock { $0 = true } }
                promise.completeWith(result)
            }
            verify(chain, inner)
        }
        let transport = try HTTP2ClientTransport.Posix(
            target: ServerTarget.resolvable(host: config.serverHost, port: config.serverPort),
            transportSecurity: .mTLS(certificateChain: [.bytes(bootstrap, format: .der)], privateKey: .bytes(Array(key.derRepresentation), format: .der)) { tls in
                tls.serverCertificateVerification = .noHostnameVerification
                tls.trustRoots = .certificates([])
                tls.customVerificationCallback = watchedVerify
            },
            config: .defaults { $0.backoff = .init(initial: .milliseconds(200), max: .seconds(2), multiplier: 1.6, jitter: 0.2) })
        var request = SigilAttestRequest()
        request.joinToken = token
        request.csr = Data(try KeyMaterial.csr(key: key))
        let response: SigilAgentSVIDResponse
        do {
            response = try await withGRPCClient(transport: transport) { grpc in
                var options = CallOptions.defaults
                options.timeout = .seconds(30)
                return try await SigilAgentAPI.Client(wrapping: grpc).attest(request, options: options)
            }
        } catch let error as RPCError {
            if error.code != .permissionDenied, error.code != .invalidArgument, refusedServer.withLock({ $0 }) {
                throw AgentError(usage: "the server at \(config.serverHost):\(config.serverPort) presented a certificate that does not verify against --trust-bundle \(config.trustBundlePath ?? "(the cached bundle)") as \(trustDomain)'s Sigil server: is that file this server CA's bundle.pem?")
            }
            switch error.code {
            case .permissionDenied, .invalidArgument:
                throw AgentError("the server refused attestation: \(error.message)")
            default:
                throw AgentError("cannot attest with the server at \(config.serverHost):\(config.serverPort): \(error.message)")
            }
        }
        let chain = response.svidChain.map { Array($0) }
        guard let leafDER = chain.first, let leaf = try? Certificate(derEncoded: leafDER) else {
            throw AgentError("the server's attestation answer holds no agent SVID")
        }
        return AgentCache.AgentIdentity(agentID: response.agentID, chainDER: chain, keyPKCS8DER: Array(key.derRepresentation),
                                        notAfter: leaf.notValidAfter, trustDomain: trustDomain.name, receivedAt: Date())
    }
}

/// A gRPC client's connections as a `Service`.
struct GRPCClientService<Transport: ClientTransport>: Service {
    let client: GRPCClient<Transport>
    init(_ client: GRPCClient<Transport>) { self.client = client }
    func run() async throws {
        try await withGracefulShutdownHandler {
            try await client.runConnections()
        } onGracefulShutdown: {
            client.beginGracefulShutdown()
        }
    }
}

/// Keys, CSRs and the bootstrap certificate.
enum KeyMaterial {
    static func csr(key: P256.Signing.PrivateKey) throws -> [UInt8] {
        let request = try CertificateSigningRequest(
            version: .v1, subject: DistinguishedName { CommonName("sigil") }, privateKey: Certificate.PrivateKey(key),
            attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256)
        var serializer = DER.Serializer()
        try serializer.serialize(request)
        return serializer.serializedBytes
    }

    static func selfSigned(key: P256.Signing.PrivateKey) throws -> [UInt8] {
        let name = try DistinguishedName { CommonName("sigil-agent-bootstrap") }
        let now = Date()
        let certificate = try Certificate(
            version: .v3, serialNumber: .random128(), publicKey: Certificate.PublicKey(key.publicKey),
            notValidBefore: now.addingTimeInterval(-60), notValidAfter: now.addingTimeInterval(600),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256, extensions: Certificate.Extensions(),
            issuerPrivateKey: Certificate.PrivateKey(key))
        return certificate.derBytes
    }
}
