#if canImport(CoreFoundation)
import CoreFoundation  // the release build resolves Glibc struct members (stat) through it
#endif
public import SigilCore
public import SigilCA
public import Logging
import SigilStore
import SigilRPC
import SigilTLS
import GRPCCore
import GRPCNIOTransportHTTP2
import ServiceLifecycle
import UnixSignals
import X509
import Crypto
import Foundation
import NIOCore
import NIOSSL
import NIOTLS
#if canImport(Glibc)
import Glibc
#endif

/// `sigil server run` settings.
public struct ServerConfig: Sendable {
    public var dataDirectory: DataDirectory
    public var listenHost: String
    public var listenPort: Int
    public var adminSocketPath: String
    public var agentSVIDTTL: Duration
    /// How long ledger rows are kept (nil: forever).
    public var ledgerRetention: Duration?
    /// `--ui`: where to serve the read-only ledger page (loopback only); nil for none.
    public var ledgerUI: LedgerUIAddress?

    public static let defaultAdminSocket = "/tmp/sigil/admin.sock"

    public init(dataDirectory: DataDirectory, listenHost: String = "127.0.0.1", listenPort: Int = 8081,
                adminSocketPath: String = ServerConfig.defaultAdminSocket, agentSVIDTTL: Duration = .seconds(3600)) {
        self.dataDirectory = dataDirectory
        self.listenHost = listenHost
        self.listenPort = listenPort
        self.adminSocketPath = adminSocketPath
        self.agentSVIDTTL = agentSVIDTTL
        self.ledgerRetention = nil
    }
}

/// Errors that stop the server from starting.
public struct ServerError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public var description: String { message }
}

/// The CA server role: the agent API (gRPC, mTLS, TCP) and the admin API (gRPC, Unix socket 0600),
/// run as swift-service-lifecycle services that stop gracefully on SIGTERM and SIGINT.
public enum SigilServer {
    /// How long an accepted agent-port connection has to complete its TLS handshake.
    static let handshakeDeadlineSeconds: Int64 = 10

    public static func run(_ config: ServerConfig, logger: Logger, clock: any SigilClock = SystemClock()) async throws {
        if FileManager.default.fileExists(atPath: config.dataDirectory.path) {
            do { try InstanceLock.acquire(directory: config.dataDirectory.path, name: ".server.lock", role: "server") } catch {
                throw ServerError(message: error.message)
            }
        }
        let ca: CertificateAuthority
        do {
            ca = try await CertificateAuthority.open(config.dataDirectory, clock: clock, logger: logger)
        } catch {
            throw ServerError(message: error.message)
        }
        let core = ServerCore(ca: ca, store: ca.store, bundle: try await ca.bundle(), clock: clock, logger: logger, agentSVIDTTL: config.agentSVIDTTL)
        let identity = try await ServerIdentity.issue(core: core)
        try core.setJWTKey(try loadOrCreateJWTKey(config.dataDirectory, logger: logger))
        let checkpointKey: LedgerCheckpointKey
        do {
            // A lost key is not replaced while checkpoints it signed exist: a new key would make
            // every one of them look forged.
            if try LedgerCheckpointKeyFile.load(config.dataDirectory) == nil,
               let count = try? await core.store.ledgerCheckpoints().count, count > 0 {
                throw ServerError(message: "the ledger checkpoint key \(config.dataDirectory.ledgerCheckpointKeyPath) is missing but \(count) retention checkpoint(s) were signed with it: restore it from your backup of the data directory's keys")
            }
            checkpointKey = try LedgerCheckpointKeyFile.loadOrCreate(config.dataDirectory)
        } catch let error as ServerError {
            throw error
        } catch let error as CAError {
            throw ServerError(message: error.message)
        }

        // The admin socket: its directory 0700 and the socket 0600, so only the server's user may connect.
        let socketDirectory = (config.adminSocketPath as NSString).deletingLastPathComponent
        if !socketDirectory.isEmpty, !FileManager.default.fileExists(atPath: socketDirectory) {
            guard mkdir(socketDirectory, 0o700) == 0 || errno == EEXIST else {
                throw ServerError(message: "cannot create admin socket directory '\(socketDirectory)': \(String(cString: strerror(errno)))")
            }
        }
        var st = stat()
        if !socketDirectory.isEmpty, lstat(socketDirectory, &st) == 0, st.st_uid != geteuid() || st.st_mode & 0o022 != 0 {
            throw ServerError(message: "admin socket directory '\(socketDirectory)' is owned by uid \(st.st_uid) or writable by others; use a directory only the server's user controls")
        }
        if socketAnswers(config.adminSocketPath) {
            throw ServerError(message: "another server is already serving the admin socket \(config.adminSocketPath); stop it or choose another --admin-socket")
        }
        // Only a stale socket is removed: a path that names anything else (a typo pointing at the
        // CA's database, say) is refused, never deleted.
        if lstat(config.adminSocketPath, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else {
                throw ServerError(message: "--admin-socket '\(config.adminSocketPath)' exists and is not a socket; the server removes only a stale socket there: choose another path")
            }
            unlink(config.adminSocketPath)
        }
        let previousMask = umask(0o077)

        // An agent SVID lives at most --agent-svid-ttl, and at least 1/6 of the intermediate's life
        // (SVIDs end with their intermediate, which signs until 5/6 of its life); the agent uses
        // it until half its life: a connection (its age plus the grace time) must end before that.
        let intermediateLife = (try? await ca.status())?.first { $0.record.kind == .intermediate && $0.record.state == .active }
            .map { Duration.seconds(Int64($0.record.notAfter.timeIntervalSince($0.record.notBefore))) } ?? config.agentSVIDTTL
        let connectionAge = max(Duration.seconds(1), min(config.agentSVIDTTL, intermediateLife / 6) / 5)
        let agentTransport = HTTP2ServerTransport.Posix(
            address: ServerTarget.isIPv6(config.listenHost)
                ? .ipv6(host: config.listenHost, port: config.listenPort) : .ipv4(host: config.listenHost, port: config.listenPort),
            transportSecurity: try .mTLS(certificateReloader: identity.reloader) { tls in
                tls.clientCertificateVerification = .noHostnameVerification
                tls.trustRoots = .certificates([])
                tls.customVerificationCallback = SpiffeTLS.verificationCallback(bundle: { core.bundle }, allowBootstrap: true)
            },
            config: .defaults { transport in
                transport.rpc.maxRequestPayloadSize = 16 << 20
                // An agent presents its SVID only at the handshake: recycle connections well within
                // the agent SVID's life so that a renewed SVID is what the server sees next.
                let age = connectionAge
                transport.connection.maxAge = age
                transport.connection.maxGraceTime = age
                // A connection that has not finished its TLS handshake 10 s after it was accepted is
                // closed, and one with no call open for 5 minutes: otherwise sockets that never
                // speak (or that only shook hands with a throwaway bootstrap certificate) hold file
                // descriptors until the server can accept no agent. Agents keep a Sync stream open
                // and reconnect for anything else.
                transport.connection.maxIdleTime = .seconds(300)
                transport.channelDebuggingCallbacks.onAcceptTCPConnection = { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let sync = channel.pipeline.syncOperations
                        let tls = try sync.handler(type: NIOSSLServerHandler.self)
                        try sync.addHandler(HandshakeDeadline(seconds: Self.handshakeDeadlineSeconds), position: .after(tls))
                    }
                }
            })
        let agentServer = GRPCServer(transport: agentTransport, services: [AgentAPIService(core: core), LedgerAPIService(core: core, ledger: core.store)])
        let adminServer = GRPCServer(
            transport: .http2NIOPosix(address: .unixDomainSocket(path: config.adminSocketPath), transportSecurity: .plaintext),
            services: [AdminAPIService(core: core)])

        let announce = Announcer(agentServer: agentServer, adminServer: adminServer, adminSocket: config.adminSocketPath,
                                 previousMask: previousMask, logger: logger, trustDomain: core.trustDomain, core: core)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [
            .init(service: GRPCServerService(agentServer)),
            .init(service: GRPCServerService(adminServer)),
            .init(service: announce),
            .init(service: identity),
            .init(service: RotationService(core: core, schedule: RotationSchedule(), renewServerSVID: { await identity.renewNow() })),
        ]
        if let retention = config.ledgerRetention {
            services.append(.init(service: LedgerRetentionService(store: core.store, retention: retention, key: checkpointKey, clock: clock, logger: logger)))
        }
        let group = ServiceGroup(
            configuration: .init(
                services: services + LedgerUIServer.services(config.ledgerUI, core: core, checkpointKey: checkpointKey),
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        try await group.run()
    }
}

/// Whether something accepts connections on the Unix socket at `path`.
func socketAnswers(_ path: String) -> Bool {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (i, b) in bytes.enumerated() { raw[i] = b }
    }
    return withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
    }
}

/// The JWT-SVID signing key: `<data-dir>/keys/jwt-<kid>.key.pem` (0600), made on first start.
func loadOrCreateJWTKey(_ directory: DataDirectory, logger: Logger) throws -> JWTSigningKey {
    let existing: [JWTSigningKey]
    do { existing = try CertificateAuthority.jwtSigningKeys(directory) } catch { throw ServerError(message: error.message) }
    if let key = existing.first { return key }
    let key = JWTSigningKey()
    let path = directory.keysPath + "/jwt-\(key.keyID).key.pem"
    try KeyFiles.writeAtomically(Array((key.privateKey.pemRepresentation + "\n").utf8), to: path, mode: 0o600)
    logger.info("created JWT signing key", metadata: ["kid": "\(key.keyID)"])
    return key
}

/// Logs where the server listens once both listeners are bound, and restores the umask.
struct Announcer: Service {
    let agentServer: GRPCServer<HTTP2ServerTransport.Posix>
    let adminServer: GRPCServer<HTTP2ServerTransport.Posix>
    let adminSocket: String
    let previousMask: mode_t
    let logger: Logger
    let trustDomain: TrustDomain
    let core: ServerCore

    func run() async throws {
        let agentAddress = try await agentServer.listeningAddress
        _ = try await adminServer.listeningAddress
        chmod(adminSocket, 0o600)
        umask(previousMask)
        let port = agentAddress?.ipv4?.port ?? agentAddress?.ipv6?.port ?? 0
        logger.info("sigil server ready", metadata: ["trust_domain": "\(trustDomain)", "agent_api": "\(agentAddress.map { "\($0)" } ?? "?")", "admin_socket": "\(adminSocket)"])
        FileHandle.standardError.write(Data("sigil server: trust domain \(trustDomain), agent API on port \(port), admin API on \(adminSocket)\n".utf8))
        try? await gracefulShutdown()
        // Shut down in reverse order: this runs before the listeners stop, so that long-lived Sync
        // streams end now instead of holding the graceful shutdown open.
        await core.hub.finishAll()
        logger.info("shutting down: Sync streams closed")
    }
}

/// The server's own TLS identity, `spiffe://<td>/sigil/server`: a key made in memory, an SVID from
/// the CA, renewed at half its life and swapped into the listener without a restart.
final class ServerIdentity: Service, Sendable {
    let reloader: SVIDCertificateReloader
    let core: ServerCore
    static let ttl: Duration = .seconds(86_400)

    /// When the first SVID expires (it may be shorter than `ttl`: clamped to the intermediate's life).
    let firstNotAfter: Date

    init(reloader: SVIDCertificateReloader, core: ServerCore, firstNotAfter: Date) {
        self.reloader = reloader
        self.core = core
        self.firstNotAfter = firstNotAfter
    }

    static func issue(core: ServerCore) async throws -> ServerIdentity {
        let (chain, key, notAfter) = try await mint(core: core)
        return ServerIdentity(reloader: try SVIDCertificateReloader(chainDER: chain, keyPKCS8DER: key), core: core, firstNotAfter: notAfter)
    }

    /// Half the remaining life of an SVID expiring at `notAfter` (at least a second).
    static func renewalWait(_ notAfter: Date) -> Duration {
        .milliseconds(Int64(max(1_000, notAfter.timeIntervalSinceNow * 1000 / 2)))
    }

    static func mint(core: ServerCore) async throws -> (chain: [[UInt8]], key: [UInt8], notAfter: Date) {
        let key = P256.Signing.PrivateKey()
        do {
            let request = try SigningRequest(trustedPublicKey: Certificate.PublicKey(key.publicKey))
            // A DNS SAN of localhost too, so that ordinary TLS clients (grpcurl, openssl, grpcio) can check the name.
            let profile = try SVIDProfile(spiffeID: SpiffeID(trustDomain: core.trustDomain, path: "/sigil/server"), ttl: ttl, dnsNames: ["localhost"])
            let svid = try await core.ca.sign(request, profile: profile, requester: "server")
            return (svid.chainDER, Array(key.derRepresentation), svid.record.notAfter)
        } catch let error as CAError {
            throw ServerError(message: "cannot issue the server's own SVID: \(error.message)")
        }
    }

    func run() async throws {
        try await cancelWhenGracefulShutdown { try await self.renewLoop() }
    }

    /// Issues a fresh SVID now (the signing intermediate changed); failures are logged and the
    /// renewal loop keeps its own schedule.
    func renewNow() async {
        do {
            let (chain, key, notAfter) = try await ServerIdentity.mint(core: core)
            try reloader.update(chainDER: chain, keyPKCS8DER: key)
            core.logger.info("server SVID re-issued under the new signing authority", metadata: ["not_after": "\(notAfter)"])
        } catch {
            core.logger.error("server SVID re-issue failed; the renewal schedule retries: \(error)")
        }
    }

    func renewLoop() async throws {
        var wait = Self.renewalWait(firstNotAfter)
        while !Task.isCancelled {
            // Renew at half the life of a fresh SVID; after a failure, retry every minute until it works.
            try? await Task.sleep(for: wait)
            if Task.isCancelled { break }
            do {
                let (chain, key, notAfter) = try await ServerIdentity.mint(core: core)
                try reloader.update(chainDER: chain, keyPKCS8DER: key)
                core.logger.info("server SVID renewed", metadata: ["not_after": "\(notAfter)"])
                wait = Self.renewalWait(notAfter)
            } catch {
                core.logger.error("server SVID renewal failed; retrying in 5s: \(error)")
                wait = .seconds(5)
            }
        }
    }
}

/// Closes a connection whose TLS handshake has not completed `seconds` after it was accepted.
/// Sits right after the TLS handler, so it sees the handshake-completed event (a peer certificate
/// alone is no proof: it is stored before the client's CertificateVerify and Finished).
final class HandshakeDeadline: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    private let seconds: Int64
    private var timer: Scheduled<Void>?

    init(seconds: Int64) { self.seconds = seconds }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        timer = context.eventLoop.assumeIsolated().scheduleTask(in: .seconds(seconds)) { channel.close(promise: nil) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        context.fireUserInboundEventTriggered(event)  // first: once removed, this context forwards nothing
        if case .handshakeCompleted = event as? TLSUserEvent {
            timer?.cancel()
            timer = nil
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        context.fireChannelInactive()
    }
}
