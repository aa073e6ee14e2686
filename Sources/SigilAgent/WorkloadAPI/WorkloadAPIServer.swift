import SigilRPC
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
public import Logging
import NIOCore
import NIOPosix
public import ServiceLifecycle
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The SPIFFE Workload API of the node agent, served on a Unix socket, as a swift-service-lifecycle
/// `Service`.
///
/// Callers are attested from the kernel's record of the connection (`SO_PEERCRED`, see
/// ``UnixWorkloadAttestor``), once per connection when it is accepted; the transport then strips every
/// client-sent `x-sigil-caller-*` header from each call and adds the attested selectors, which the
/// handlers read. The socket is made connectable by every local user (mode 0777): attestation, not
/// file permissions, decides what a caller gets.
///
/// On graceful shutdown, open streams end with Unavailable (clients reconnect), the listener closes
/// and the socket file is removed. `run()` may be called once per value.
public struct WorkloadAPIServer: Service {
    public let socketPath: String
    private let source: any WorkloadIdentitySource
    private let logger: Logger
    private let attestor: UnixWorkloadAttestor
    private let ready = ReadySignal()
    private let shutdown = ShutdownSignal()

    public init(socketPath: String, source: any WorkloadIdentitySource, logger: Logger) {
        self.init(socketPath: socketPath, source: source, logger: logger, attestor: UnixWorkloadAttestor())
    }

    init(socketPath: String, source: any WorkloadIdentitySource, logger: Logger, attestor: UnixWorkloadAttestor) {
        self.socketPath = socketPath
        self.source = source
        self.logger = logger
        self.attestor = attestor
    }

    /// Waits until `run()` accepts connections on the socket (bound, and mode 0777), then returns its
    /// path. Throws what made `run()` fail before that.
    public func listeningAddress() async throws -> String {
        try await ready.wait()
    }

    public func run() async throws {
        do {
            try prepareSocketPath()
        } catch {
            ready.resolve(.failure(error))
            throw error
        }
        let hooks = CallerAttestationHooks(attestor: attestor, logger: logger)
        let service = WorkloadAPIService(source: source, logger: logger, shutdown: shutdown)
        let server = GRPCServer(
            transport: .http2NIOPosix(
                address: .unixDomainSocket(path: socketPath),
                transportSecurity: .plaintext,
                config: .defaults { config in
                    config.channelDebuggingCallbacks = HTTP2ServerTransport.Config.ChannelDebuggingCallbacks(
                        onBindTCPListener: nil,
                        onAcceptTCPConnection: { hooks.connectionAccepted($0) },
                        onAcceptHTTP2Stream: { hooks.streamAccepted($0) }
                    )
                }
            ),
            services: [service, WorkloadAPIReflectionService(whileServing: { [shutdown] body in try await shutdown.endingOnShutdown(body) })]
        )
        let socketPath = self.socketPath
        let logger = self.logger
        let ready = self.ready
        let shutdown = self.shutdown
        defer {
            shutdown.trigger()
            Self.removeSocket(at: socketPath)
        }
        do {
            try await withGracefulShutdownHandler {
                try await withThrowingDiscardingTaskGroup { group in
                    group.addTask { try await server.serve() }
                    do {
                        _ = try await server.transport.listeningAddress
                        guard chmod(socketPath, 0o777) == 0 else {
                            throw WorkloadAPIError(.unavailable, "cannot make the Workload API socket \(socketPath) connectable (chmod 0777): \(Self.errnoText())")
                        }
                    } catch {
                        server.beginGracefulShutdown()
                        throw error
                    }
                    ready.resolve(.success(socketPath))
                    logger.info("Workload API listening", metadata: ["socket": "\(socketPath)"])
                }
            } onGracefulShutdown: {
                logger.info("Workload API shutting down", metadata: ["socket": "\(socketPath)"])
                shutdown.trigger()
                server.beginGracefulShutdown()
            }
        } catch {
            let wrapped = (error as? WorkloadAPIError)
                ?? WorkloadAPIError(.unavailable, "the Workload API on \(socketPath) failed: \(error)")
            ready.resolve(.failure(wrapped))
            throw wrapped
        }
        ready.resolve(.failure(WorkloadAPIError(.unavailable, "the Workload API on \(socketPath) has stopped")))
    }

    // MARK: Socket file

    /// Creates the socket's directory if missing and removes a stale socket file; refuses to replace
    /// anything that is not a socket, or a socket another process still serves.
    private func prepareSocketPath() throws(WorkloadAPIError) {
        try Self.prepareSocketPath(socketPath)
    }

    /// The same, for a path not yet served: an agent checks its `--socket` before it attests, so a
    /// bad path does not cost it its single-use join token.
    static func prepareSocketPath(_ socketPath: String) throws(WorkloadAPIError) {
        let maxLength = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1
        guard !socketPath.isEmpty, socketPath.utf8.count <= maxLength else {
            throw WorkloadAPIError(.invalidArgument, "Workload API socket path '\(socketPath)' must be 1 to \(maxLength) bytes long; choose a shorter --socket path")
        }
        if let slash = socketPath.lastIndex(of: "/"), slash != socketPath.startIndex {
            try Self.makeDirectories(String(socketPath[..<slash]))
        }
        let type: FileAttributeType
        do {
            // attributesOfItem does not follow a symbolic link (lstat).
            let attributes = try FileManager.default.attributesOfItem(atPath: socketPath)
            type = attributes[.type] as? FileAttributeType ?? .typeUnknown
        } catch {
            if access(socketPath, F_OK) != 0 && errno == ENOENT { return }
            throw WorkloadAPIError(.unavailable, "cannot inspect \(socketPath): \(error.localizedDescription)")
        }
        guard type == .typeSocket else {
            throw WorkloadAPIError(.unavailable, "\(socketPath) exists and is not a socket; remove it or choose another --socket path")
        }
        if Self.someoneListens(on: socketPath) {
            throw WorkloadAPIError(.unavailable, "another process already serves \(socketPath) (is another agent running?); stop it or choose another --socket path")
        }
        guard unlink(socketPath) == 0 || errno == ENOENT else {
            throw WorkloadAPIError(.unavailable, "cannot remove the stale socket \(socketPath): \(Self.errnoText())")
        }
    }

    /// `mkdir -p` with mode 0755 for what it creates (existing directories keep their mode).
    private static func makeDirectories(_ directory: String) throws(WorkloadAPIError) {
        var current = directory.hasPrefix("/") ? "" : "."
        for component in directory.split(separator: "/") {
            current += "/" + component
            if mkdir(current, 0o755) != 0 && errno != EEXIST {
                throw WorkloadAPIError(.unavailable, "cannot create the directory \(current) for the Workload API socket: \(errnoText())")
            }
        }
    }

    private static func someoneListens(on path: String) -> Bool {
        #if os(Linux)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        #else
        let fd = socket(AF_UNIX, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8.prefix(raw.count - 1))
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let rc = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        return rc == 0
    }

    private static func removeSocket(at path: String) {
        let type = (try? FileManager.default.attributesOfItem(atPath: path))?[.type] as? FileAttributeType
        if type == .typeSocket {
            unlink(path)
        }
    }

    private static func errnoText() -> String {
        String(cString: strerror(errno))
    }
}

/// The transport hooks that attach the kernel-attested caller to every call.
struct CallerAttestationHooks: Sendable {
    let attestor: UnixWorkloadAttestor
    let logger: Logger

    /// Once per connection, as it is accepted: read `SO_PEERCRED` and attest on the thread pool (procfs
    /// and NSS may block), keeping the outcome in the connection's pipeline.
    func connectionAccepted(_ channel: any Channel) -> EventLoopFuture<Void> {
        let acceptedAt = BootTime.now()
        return onLoop(channel.eventLoop) {
            if (try? channel.pipeline.syncOperations.handler(type: CallerAttestationHolder.self)) == nil {
                let holder = CallerAttestationHolder(outcome: attest(channel, acceptedAt: acceptedAt))
                try? channel.pipeline.syncOperations.addHandler(holder)
            }
        }
    }

    /// Once per RPC: put the injector first in the stream's pipeline. Never fails the future (a failed
    /// stream initializer trips an assertion in NIOHTTP2); a stream that cannot be guarded is closed.
    func streamAccepted(_ stream: any Channel) -> EventLoopFuture<Void> {
        onLoop(stream.eventLoop) { () -> EventLoopFuture<CallerAttestationOutcome> in
            guard let parent = stream.parent else {
                return stream.eventLoop.makeSucceededFuture(.failed(reason: "workload attestation failed: the call has no connection", credentials: nil))
            }
            if let holder = try? parent.pipeline.syncOperations.handler(type: CallerAttestationHolder.self) {
                return holder.outcome
            }
            // The connection hook did not run (it always should): attest now, once for the connection.
            let outcome = attest(parent, acceptedAt: nil)
            try? parent.pipeline.syncOperations.addHandler(CallerAttestationHolder(outcome: outcome))
            return outcome
        }
        .flatMap { $0 }
        .map { outcome in
            do {
                try stream.pipeline.syncOperations.addHandler(
                    CallerMetadataInjector(injecting: outcome.injectedHeaders),
                    position: .first
                )
            } catch {
                logger.error("Could not guard a Workload API call; closing it", metadata: ["error": "\(error)"])
                stream.close(promise: nil)
            }
        }
    }

    private func attest(_ channel: any Channel, acceptedAt: BootTime?) -> EventLoopFuture<CallerAttestationOutcome> {
        let attestor = self.attestor
        let logger = self.logger
        let loop = channel.eventLoop
        return PeerCredentials.read(from: channel)
            .flatMap { credentials in
                NIOThreadPool.singleton.runIfActive(eventLoop: loop) { () -> CallerAttestationOutcome in
                    do throws(WorkloadAPIError) {
                        return .attested(try attestor.attest(credentials, acceptedAt: acceptedAt))
                    } catch {
                        return .failed(reason: error.message, credentials: credentials)
                    }
                }
            }
            .recover { error in
                let reason = (error as? WorkloadAPIError)?.message
                    ?? "workload attestation failed: cannot read the caller's kernel credentials (SO_PEERCRED): \(error)"
                return .failed(reason: reason, credentials: nil)
            }
            .map { outcome in
                switch outcome {
                case .attested(let attestation):
                    logger.debug(
                        "Workload attested",
                        metadata: ["peer": "\(attestation.credentials)", "selectors": "\(attestation.selectors.joined(separator: " "))"]
                    )
                case .failed(let reason, let credentials):
                    logger.warning(
                        "Workload attestation failed",
                        metadata: ["peer": "\(credentials.map(\.description) ?? "unknown")", "error": "\(reason)"]
                    )
                }
                return outcome
            }
    }

    private func onLoop<T: Sendable>(_ loop: any EventLoop, _ body: @escaping @Sendable () -> T) -> EventLoopFuture<T> {
        if loop.inEventLoop {
            return loop.makeSucceededFuture(body())
        }
        return loop.submit(body)
    }
}

/// Resolves once; `wait()` returns the value or throws the failure (or CancellationError).
final class ReadySignal: Sendable {
    private struct State {
        var result: Result<String, any Error>?
        var nextID: UInt64 = 0
        var waiters: [UInt64: CheckedContinuation<String, any Error>] = [:]
    }

    private let state = Mutex(State())

    init() {}

    func resolve(_ result: Result<String, any Error>) {
        let waiters = state.withLock { state -> [CheckedContinuation<String, any Error>] in
            guard state.result == nil else { return [] }
            state.result = result
            defer { state.waiters = [:] }
            return Array(state.waiters.values)
        }
        for waiter in waiters { waiter.resume(with: result) }
    }

    func wait() async throws -> String {
        let id = state.withLock { state in
            state.nextID += 1
            return state.nextID
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<String, any Error>) in
                let immediate = state.withLock { state -> Result<String, any Error>? in
                    if let result = state.result { return result }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    state.waiters[id] = continuation
                    return nil
                }
                if let immediate { continuation.resume(with: immediate) }
            }
        } onCancel: {
            let waiter = state.withLock { $0.waiters.removeValue(forKey: id) }
            waiter?.resume(throwing: CancellationError())
        }
    }
}
