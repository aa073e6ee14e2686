public import Logging
import NIOCore
#if canImport(Glibc)
import Glibc
#endif
import NIOPosix
public import SigilCore
import SigilRPC
import ServiceLifecycle
import UnixSignals

/// `sigil proxy run` settings.
public struct ProxyConfig: Sendable {
    public var workloadAPISocket: String
    public var inboundHost: String
    public var inboundPort: Int
    public var appHost: String
    public var appPort: Int
    public var namespace: String
    public var labels: [String: String]
    public var policiesPath: String
    public var rootNamespace: String
    /// `--mtls`: overrides PeerAuthentication for this workload when set.
    public var mtls: PeerAuthentication.Mode?
    public var spiffeID: String?
    public var outboundHost: String?
    public var outboundPort: Int?
    public var upstreamHost: String?
    public var upstreamPort: Int?
    public var upstreamID: SpiffeID?
    /// JSON-lines ledger spool (nil: no ledger).
    public var ledgerPath: String?
    /// The longest a written ledger row waits for `fdatasync` (0: every batch is synced).
    public var ledgerSyncMillis: Int
    public static let defaultLedgerSyncMillis = 250
    /// The server's agent API address (`host:port`) to ship ledger rows to (nil: they stay in the spool).
    public var ledgerServer: String?
    /// The largest the spool file may grow; at the limit the proxy refuses new requests (503).
    public var ledgerMaxSize: Int = ProxyConfig.defaultLedgerMaxSize
    public static let defaultLedgerMaxSize = 1 << 30
    /// With a shipper: a spool at least this large whose every row the server has is started over.
    public var ledgerSegmentSize: Int = ProxyConfig.defaultLedgerSegmentSize
    public static let defaultLedgerSegmentSize = 64 << 20
    /// `--metrics`: where to serve Prometheus text at `GET /metrics` (loopback only; nil: nowhere).
    public var metricsHost: String?
    public var metricsPort: Int?
    /// The kill switch file: present = PERMISSIVE + allow-all.
    public var killSwitchPath: String
    public var tcpMode: Bool
    public var threads: Int
    /// `--handshake-timeout`: an inbound connection that has not finished its TLS handshake (or,
    /// plaintext HTTP, sent its first whole request) by then is closed.
    public var handshakeTimeout: Duration = ProxyConfig.defaultHandshakeTimeout
    public static let defaultHandshakeTimeout: Duration = .seconds(10)
    /// `--idle-timeout`: an inbound connection on which no data has moved either way for this long
    /// is closed (like Envoy's TCP proxy idle_timeout, with its default of 1 h).
    public var idleTimeout: Duration = ProxyConfig.defaultIdleTimeout
    public static let defaultIdleTimeout: Duration = .seconds(3600)
    /// `--path-normalization`: how request paths are normalized before authorization (and as the
    /// app receives them), as Istio's meshConfig.pathNormalization (default BASE).
    public var pathNormalization: RequestTarget.Normalization = .base
    /// What `--handshake-timeout` and `--idle-timeout` accept (TCP_INFO's idle times are 32-bit
    /// milliseconds: 7 days fit).
    static let handshakeTimeoutRange: ClosedRange<Duration> = .seconds(1) ... .seconds(3600)
    static let idleTimeoutRange: ClosedRange<Duration> = .seconds(1) ... .seconds(7 * 86_400)

    public init(workloadAPISocket: String, inboundHost: String, inboundPort: Int, appHost: String, appPort: Int,
                namespace: String, labels: [String: String], policiesPath: String,
                rootNamespace: String = PolicyEvaluator.defaultRootNamespace, mtls: PeerAuthentication.Mode? = nil,
                spiffeID: String? = nil, outboundHost: String? = nil, outboundPort: Int? = nil, upstreamHost: String? = nil,
                upstreamPort: Int? = nil, upstreamID: SpiffeID? = nil, ledgerPath: String? = nil, ledgerSyncMillis: Int = ProxyConfig.defaultLedgerSyncMillis, killSwitchPath: String? = nil,
                tcpMode: Bool = false, threads: Int = 0) {
        self.workloadAPISocket = workloadAPISocket
        self.inboundHost = inboundHost
        self.inboundPort = inboundPort
        self.appHost = appHost
        self.appPort = appPort
        self.namespace = namespace
        self.labels = labels
        self.policiesPath = policiesPath
        self.rootNamespace = rootNamespace
        self.mtls = mtls
        self.spiffeID = spiffeID
        self.outboundHost = outboundHost
        self.outboundPort = outboundPort
        self.upstreamHost = upstreamHost
        self.upstreamPort = upstreamPort
        self.upstreamID = upstreamID
        self.ledgerPath = ledgerPath
        self.ledgerSyncMillis = ledgerSyncMillis
        self.ledgerServer = nil
        self.killSwitchPath = killSwitchPath ?? ProxyConfig.defaultKillSwitchPath(policies: policiesPath)
        self.tcpMode = tcpMode
        self.threads = threads > 0 ? threads : System.coreCount
    }

    /// `<policies dir>/sigil-kill-switch` (beside a policy file when --policies is a file).
    public static func defaultKillSwitchPath(policies: String) -> String {
        if let directory = opendir(policies) {
            closedir(directory)
            return policies + "/sigil-kill-switch"
        }
        let parent = policies.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        return (parent.isEmpty ? "." : parent) + "/sigil-kill-switch"
    }
}

/// The sidecar proxy role (see ``ProxyConfig``): inbound mTLS with PeerAuthentication and
/// AuthorizationPolicy, outbound mTLS origination, identity from the Workload API, policy hot
/// reload, a ledger row per request. Runs until SIGTERM/SIGINT, then stops accepting, lets open
/// requests finish (up to a grace period), and flushes the ledger.
public enum SigilProxyRole {
    public static func run(_ config: ProxyConfig, logger: Logger, ready: (@Sendable (String) -> Void)? = nil) async throws {
        ProcessMemory.useOneArena()
        let socketPath: String
        do { socketPath = try WorkloadAPIClient.socketPath(fromEndpoint: config.workloadAPISocket) } catch {
            throw ProxyError(.configuration, error.message)
        }
        let ledger: LedgerSpool?
        let metrics = ProxyMetrics()
        let identity = IdentityStore()
        var shipper: LedgerShipper?
        if let path = config.ledgerPath {
            let base = "proxy:\(config.namespace)/\(config.labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ","))@\(config.inboundPort)"
            do {
                let writer = try LedgerSpool.instanceWriter(base: base, spoolPath: path)
                let spool = try LedgerSpool(path: path, writer: writer, maxSize: config.ledgerMaxSize,
                                            syncInterval: .milliseconds(config.ledgerSyncMillis), metrics: metrics, logger: logger)
                ledger = spool
                if let server = config.ledgerServer {
                    shipper = try LedgerShipper(spoolPath: path, writer: writer, server: server, identity: identity,
                                                spool: spool, segmentSize: config.ledgerSegmentSize, logger: logger)
                }
            } catch let error as LedgerShipper.ShipError {
                throw ProxyError(.configuration, error.description)
            } catch {
                throw ProxyError(.configuration, "\(error)")
            }
        } else {
            ledger = nil
        }
        let record: @Sendable (LedgerRecord) -> Void = { _ = ledger?.append($0) }
        let policy = try PolicyStore(
            settings: .init(policiesPath: config.policiesPath, killSwitchPath: config.killSwitchPath,
                            workload: WorkloadSelector(namespace: config.namespace, labels: config.labels),
                            rootNamespace: config.rootNamespace, modeOverride: config.mtls, appPort: config.appPort),
            logger: logger, record: record)

        let appAddress: SocketAddress
        do { appAddress = try SocketAddress.makeAddressResolvingHost(config.appHost, port: config.appPort) } catch {
            throw ProxyError(.configuration, "--app \(config.appHost):\(config.appPort) does not resolve: \(error)")
        }
        var upstream: (SocketAddress, SpiffeID)?
        if let host = config.upstreamHost, let port = config.upstreamPort, let id = config.upstreamID {
            do { upstream = (try SocketAddress.makeAddressResolvingHost(host, port: port), id) } catch {
                throw ProxyError(.configuration, "--upstream \(host):\(port) does not resolve: \(error)")
            }
        }

        let group = MultiThreadedEventLoopGroup(numberOfThreads: config.threads)
        let environment = ProxyEnvironment(policy: policy, identity: identity, ledger: ledger, group: group,
                                           pools: AppPools(group: group, target: appAddress), appPort: config.appPort,
                                           appAddress: appAddress, tcpMode: config.tcpMode, pathNormalization: config.pathNormalization,
                                           metrics: metrics, logger: logger)
        let service = ProxyService(config: config, environment: environment, group: group, socketPath: socketPath,
                                   upstream: upstream, shipper: shipper, logger: logger, ready: ready)
        let serviceGroup = ServiceGroup(configuration: .init(
            services: [.init(service: service)],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        do {
            try await serviceGroup.run()
        } catch {
            try? await group.shutdownGracefully()
            ledger?.finalFlush()
            throw error
        }
        // Connections still open (keep-alive clients) are served until the event loops stop, and
        // each of their requests writes its row: the spool's last sync comes after that.
        try? await group.shutdownGracefully()
        ledger?.finalFlush()
    }
}

/// The proxy's listeners and background tasks as one lifecycle `Service`.
struct ProxyService: Service {
    let config: ProxyConfig
    let environment: ProxyEnvironment
    let group: MultiThreadedEventLoopGroup
    let socketPath: String
    let upstream: (SocketAddress, SpiffeID)?
    let shipper: LedgerShipper?
    let logger: Logger
    let ready: (@Sendable (String) -> Void)?

    func run() async throws {
        let watcher = IdentityWatcher(socketPath: socketPath, wantedID: config.spiffeID, httpMode: !config.tcpMode,
                                      store: environment.identity, logger: logger, group: group) { material in
            environment.record(LedgerRecord(kind: .identity, timeMicros: ProxyClock.nowMicros(), destination: material.spiffeID.description,
                                            peerSerial: material.serial, detail: "serving a new X509-SVID"))
        }
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { await watcher.run() }
            tasks.addTask { await environment.policy.watch() }
            if let ledger = environment.ledger { tasks.addTask { await ledger.run() } }
            if let shipper { tasks.addTask { await shipper.run() } }
            tasks.addTask { await IdleTrimmer().run() }

            // Serve only with an identity: wait for the first SVID (SIGTERM/SIGINT still stop the
            // proxy meanwhile: no agent, no entry, a wrong --spiffe-id must not make it unkillable).
            var waited = 0
            while environment.identity.current == nil {
                if Task.isShuttingDownGracefully || Task.isCancelled {
                    logger.notice("proxy stopping before it had an X509-SVID")
                    tasks.cancelAll()
                    return
                }
                try await Task.sleep(for: .milliseconds(100))
                waited += 1
                if waited % 50 == 0 {
                    logger.warning("waiting for an X509-SVID from the Workload API", metadata: ["socket": "\(socketPath)", "spiffe_id": "\(config.spiffeID ?? "any")"])
                }
            }
            let inbound = try await bindInbound()
            var channels = [inbound]
            if let host = config.metricsHost, let port = config.metricsPort {
                channels.append(try await MetricsEndpoint.bind(host: host, port: port, metrics: environment.metrics, group: group))
            }
            var outbound: (any Channel)?
            if let host = config.outboundHost, let port = config.outboundPort, let upstream {
                outbound = try await bindOutbound(host: host, port: port, upstream: upstream)
                channels.append(outbound!)
            }
            let id = environment.identity.current?.spiffeID.description ?? "?"
            logger.notice("proxy ready", metadata: [
                "spiffe_id": "\(id)", "inbound": "\(inbound.localAddress.map { "\($0)" } ?? "?")",
                "outbound": "\(outbound?.localAddress.map { "\($0)" } ?? "-")", "app": "\(config.appHost):\(config.appPort)",
                "mode": "\(environment.policy.current.mode.rawValue)",
                "metrics": "\(config.metricsHost.map { "\($0):\(config.metricsPort ?? 0)" } ?? "-")",
            ])
            ready?(id)
            ProcessMemory.release()

            try await gracefulShutdown()
            logger.notice("proxy stopping: no new connections; open requests get 5 s to finish")
            for channel in channels { try? await channel.close() }
            try? await Task.sleep(for: .milliseconds(300))
            environment.pools.closeAll()
            // Rows of everything served so far go to disk now, before waiting for the background
            // tasks to stop; the last flush, after the event loops stop, takes the rest.
            environment.ledger?.flush()
            tasks.cancelAll()
        }
        environment.ledger?.flush()
        logger.info("proxy stopped: background tasks ended")
    }

    private func bindInbound() async throws -> any Channel {
        let environment = self.environment
        // At least 100 ms, whatever a caller of the library put in the config (the flag takes 1s to 1h).
        let setupTimeout = max(TimeAmount(config.handshakeTimeout), .milliseconds(100))
        // 1s to 7d whatever a library caller put in the config (TCP_INFO's milliseconds are 32-bit),
        // and never shorter than the set-up deadline (which records its refusals).
        let range = ProxyConfig.idleTimeoutRange
        let idleTimeout = min(max(TimeAmount(config.idleTimeout), TimeAmount(range.lowerBound), setupTimeout), TimeAmount(range.upperBound))
        do {
            return try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 1024)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelOption(.allowRemoteHalfClosure, value: config.tcpMode)  // TCP mode: a FIN is passed on as a FIN
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        IdleWatch.start(on: channel, timeout: idleTimeout)
                        try channel.pipeline.syncOperations.addHandlers(SetupDeadline(timeout: setupTimeout), InboundSniffer(environment: environment))
                    }
                }
                .bind(host: config.inboundHost, port: config.inboundPort).get()
        } catch {
            throw ProxyError(.bind, "cannot listen on --inbound \(config.inboundHost):\(config.inboundPort): \(error)")
        }
    }

    private func bindOutbound(host: String, port: Int, upstream: (SocketAddress, SpiffeID)) async throws -> any Channel {
        let environment = self.environment
        do {
            return try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 1024)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelOption(.allowRemoteHalfClosure, value: config.tcpMode)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            Outbound.splice(environment: environment, upstream: upstream.0, upstreamID: upstream.1, channel: channel))
                    }
                }
                .bind(host: host, port: port).get()
        } catch {
            throw ProxyError(.bind, "cannot listen on --outbound \(host):\(port): \(error)")
        }
    }
}
