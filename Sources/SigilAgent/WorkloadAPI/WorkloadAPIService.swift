import Foundation
import GRPCCore
import Logging
import SigilCore
import SigilRPC
import SwiftProtobuf
import Synchronization

/// The SPIFFE Workload API (`/SpiffeWorkloadAPI/...`) over a ``WorkloadIdentitySource``.
///
/// Every call must carry `workload.spiffe.io: true` (else InvalidArgument, as the spec requires).
/// The caller is known only through the headers the transport adds after attesting the connection
/// (``CallerMetadata``); without them the answer is PermissionDenied. Responses follow SPIRE's agent:
/// bundle maps are keyed by the trust domain's SPIFFE ID (`spiffe://<td>`), and the bundle streams
/// too require the caller to be entitled to at least one identity. An entitled caller whose SVIDs
/// are not minted yet waits on FetchX509SVID for them instead of being refused.
struct WorkloadAPIService: SPIFFESpiffeWorkloadAPI.ServiceProtocol {
    static let securityHeaderKey = "workload.spiffe.io"

    let source: any WorkloadIdentitySource
    let logger: Logger
    let shutdown: ShutdownSignal
    /// The last X.509 response built, for the snapshot it was built from: a rotation hands one
    /// shared snapshot to every stream of a workload, and they all send the same message.
    private let lastResponse = LastX509Response()

    init(source: any WorkloadIdentitySource, logger: Logger, shutdown: ShutdownSignal) {
        self.source = source
        self.logger = logger
        self.shutdown = shutdown
    }

    // MARK: X.509

    func fetchX509SVID(
        request: ServerRequest<SPIFFEX509SVIDRequest>,
        context: ServerContext
    ) async throws -> StreamingServerResponse<SPIFFEX509SVIDResponse> {
        let (caller, log) = try authorize(request.metadata, method: "FetchX509SVID")
        let snapshots = source.x509Snapshots(selectors: caller.selectors)
        return StreamingServerResponse { writer in
            try await shutdown.endingOnShutdown {
                var previous: WorkloadX509Snapshot?
                for await snapshot in snapshots where snapshot != previous {
                    try Self.requireEntitlement(snapshot, log: log)
                    // Entitled, but no SVID to send yet: wait for it (never an empty response).
                    guard !snapshot.svids.isEmpty else { continue }
                    try await writer.write(response(for: snapshot))
                    previous = snapshot
                    log.debug(
                        "Sent X509-SVIDs",
                        metadata: ["spiffe_id": "\(snapshot.svids.map(\.spiffeID).joined(separator: ","))"]
                    )
                }
                try Self.sourceEnded()
            }
            return [:]
        }
    }

    func fetchX509Bundles(
        request: ServerRequest<SPIFFEX509BundlesRequest>,
        context: ServerContext
    ) async throws -> StreamingServerResponse<SPIFFEX509BundlesResponse> {
        try bundleStream(request.metadata, method: "FetchX509Bundles") { bundle in
            var response = SPIFFEX509BundlesResponse()
            response.bundles = [Self.bundleKey(bundle.trustDomain): Data(bundle.rootsDER)]
            return response
        }
    }

    /// The two bundle streams: the caller must be entitled to an identity (as in SPIRE), minted or
    /// not yet; a response is sent at once and again whenever it changes.
    private func bundleStream<Response: Equatable & Sendable>(
        _ metadata: Metadata, method: String, _ make: @escaping @Sendable (WorkloadBundle) -> Response
    ) throws -> StreamingServerResponse<Response> {
        let (caller, log) = try authorize(metadata, method: method)
        let snapshots = source.x509Snapshots(selectors: caller.selectors)
        return StreamingServerResponse { writer in
            try await shutdown.endingOnShutdown {
                var previous: Response?
                for await snapshot in snapshots {
                    try Self.requireEntitlement(snapshot, log: log)
                    let response = make(snapshot.bundle)
                    guard response != previous else { continue }
                    try await writer.write(response)
                    previous = response
                    log.debug("Sent bundles")
                }
                try Self.sourceEnded()
            }
            return [:]
        }
    }

    // MARK: JWT

    func fetchJWTSVID(
        request: ServerRequest<SPIFFEJWTSVIDRequest>,
        context: ServerContext
    ) async throws -> ServerResponse<SPIFFEJWTSVIDResponse> {
        let (caller, log) = try authorize(request.metadata, method: "FetchJWTSVID")
        let audience = request.message.audience.filter { !$0.isEmpty }
        guard !audience.isEmpty else {
            throw RPCError(code: .invalidArgument, message: "audience must be specified")
        }
        // The server's bounds, answered here as the caller's error (not an Unavailable to retry).
        guard audience.count <= 32, audience.allSatisfy({ $0.utf8.count <= 1024 }) else {
            throw RPCError(code: .invalidArgument, message: "at most 32 audiences of at most 1024 bytes each")
        }
        var requestedID: String?
        if !request.message.spiffeID.isEmpty {
            do {
                requestedID = try SpiffeID(request.message.spiffeID).description
            } catch {
                throw RPCError(code: .invalidArgument, message: "invalid requested SPIFFE ID: \(error.message)")
            }
        }
        let svids: [WorkloadJWTSVID]
        do {
            svids = try await source.jwtSVIDs(selectors: caller.selectors, spiffeID: requestedID, audience: audience)
        } catch {
            log.warning("Could not issue a JWT-SVID", metadata: ["error": "\(error.message)"])
            throw Self.rpcError(error)
        }
        guard !svids.isEmpty else {
            log.warning("No identity issued")
            throw RPCError(code: .permissionDenied, message: "no identity issued")
        }
        var response = SPIFFEJWTSVIDResponse()
        response.svids = svids.map { svid in
            var out = SPIFFEJWTSVID()
            out.spiffeID = svid.spiffeID
            out.svid = svid.token
            out.hint = svid.hint
            return out
        }
        log.debug("Sent JWT-SVIDs", metadata: ["spiffe_id": "\(svids.map(\.spiffeID).joined(separator: ","))"])
        return ServerResponse(message: response)
    }

    func fetchJWTBundles(
        request: ServerRequest<SPIFFEJWTBundlesRequest>,
        context: ServerContext
    ) async throws -> StreamingServerResponse<SPIFFEJWTBundlesResponse> {
        try bundleStream(request.metadata, method: "FetchJWTBundles") { bundle in
            var response = SPIFFEJWTBundlesResponse()
            // An empty JWK Set, not empty bytes: clients parse every value as a JWKS document.
            let keys = bundle.jwtKeysJSON
            response.bundles = [Self.bundleKey(bundle.trustDomain): keys.isEmpty ? Data(#"{"keys":[]}"#.utf8) : Data(keys)]
            return response
        }
    }

    func validateJWTSVID(
        request: ServerRequest<SPIFFEValidateJWTSVIDRequest>,
        context: ServerContext
    ) async throws -> ServerResponse<SPIFFEValidateJWTSVIDResponse> {
        let (_, log) = try authorize(request.metadata, method: "ValidateJWTSVID")
        guard !request.message.audience.isEmpty else {
            throw RPCError(code: .invalidArgument, message: "audience must be specified")
        }
        guard !request.message.svid.isEmpty else {
            throw RPCError(code: .invalidArgument, message: "svid must be specified")
        }
        let validated: (spiffeID: String, claimsJSON: [UInt8])
        do {
            validated = try await source.validateJWTSVID(token: request.message.svid, audience: request.message.audience)
        } catch {
            log.info("JWT-SVID rejected", metadata: ["error": "\(error.message)"])
            throw Self.rpcError(error)
        }
        var response = SPIFFEValidateJWTSVIDResponse()
        response.spiffeID = validated.spiffeID
        do {
            response.claims = try Google_Protobuf_Struct(jsonUTF8Bytes: validated.claimsJSON)
        } catch {
            log.error("The identity source returned claims that are not a JSON object", metadata: ["spiffe_id": "\(validated.spiffeID)"])
            throw RPCError(code: .internalError, message: "the agent could not encode the token's claims")
        }
        log.debug("Validated a JWT-SVID", metadata: ["spiffe_id": "\(validated.spiffeID)"])
        return ServerResponse(message: response)
    }

    // MARK: Caller

    struct Caller: Sendable {
        let selectors: Set<String>
        let pid: String
    }

    /// Checks the security header, then reads the attested caller the transport added.
    func authorize(_ metadata: Metadata, method: String) throws(RPCError) -> (Caller, Logger) {
        var log = logger
        log[metadataKey: "rpc"] = "\(method)"
        let security = Array(metadata[stringValues: Self.securityHeaderKey])
        guard security.count == 1, security[0] == "true" else {
            log.warning("Security header missing from request")
            throw RPCError(code: .invalidArgument, message: "security header missing from request")
        }
        let caller: Caller
        do {
            caller = try Self.caller(from: metadata)
        } catch {
            log.warning("Caller not attested", metadata: ["error": "\(error.message)"])
            throw error
        }
        let uid = caller.selectors.first { $0.hasPrefix("unix:uid:") }.map { String($0.dropFirst("unix:uid:".count)) } ?? "?"
        log[metadataKey: "peer"] = "pid=\(caller.pid) uid=\(uid)"
        return (caller, log)
    }

    static func caller(from metadata: Metadata) throws(RPCError) -> Caller {
        let failures = Array(metadata[stringValues: CallerMetadata.errorKey])
        if let failure = failures.first {
            throw RPCError(code: .permissionDenied, message: CallerMetadata.decode(failure[...]) ?? "workload attestation failed")
        }
        let encoded = Array(metadata[stringValues: CallerMetadata.selectorsKey])
        let pids = Array(metadata[stringValues: CallerMetadata.pidKey])
        // The injector adds exactly one of each after removing any the client sent; anything else
        // means the transport hook did not run for this stream.
        guard encoded.count == 1, pids.count == 1 else {
            throw RPCError(code: .permissionDenied, message: "the caller could not be attested: no kernel credentials are attached to this call")
        }
        var selectors = Set<String>()
        for part in encoded[0].split(separator: ",") {
            guard let selector = CallerMetadata.decode(part) else {
                throw RPCError(code: .permissionDenied, message: "the caller could not be attested: malformed caller selectors")
            }
            selectors.insert(selector)
        }
        guard !selectors.isEmpty else {
            throw RPCError(code: .permissionDenied, message: "the caller could not be attested: no selectors")
        }
        return Caller(selectors: selectors, pid: pids[0])
    }

    // MARK: Helpers

    /// PermissionDenied for a caller that matches no entry (an entitled caller whose SVIDs are
    /// still being minted is not refused).
    static func requireEntitlement(_ snapshot: WorkloadX509Snapshot, log: Logger) throws(RPCError) {
        guard snapshot.entitled else {
            log.warning("No identity issued")
            throw RPCError(code: .permissionDenied, message: "no identity issued")
        }
    }

    static func sourceEnded() throws(RPCError) {
        // The snapshot stream ends when the agent stops, or when this RPC was cancelled.
        if Task.isCancelled { return }
        throw RPCError(code: .unavailable, message: "the Sigil agent stopped serving identities; reconnect")
    }

    /// The response for `snapshot`, built once for all the streams that share it (comparing a shared
    /// snapshot with itself is a buffer-identity check, not a byte compare).
    private func response(for snapshot: WorkloadX509Snapshot) -> SPIFFEX509SVIDResponse {
        if let last = lastResponse.value.withLock({ $0 }), last.snapshot == snapshot { return last.response }
        let built = Self.x509SVIDResponse(snapshot)
        lastResponse.value.withLock { $0 = (snapshot, built) }
        return built
    }

    static func x509SVIDResponse(_ snapshot: WorkloadX509Snapshot) -> SPIFFEX509SVIDResponse {
        let bundle = Data(snapshot.bundle.rootsDER)
        var seenHints = Set<String>()
        var response = SPIFFEX509SVIDResponse()
        // At most one SVID per non-empty hint, the first (as SPIRE's agent filters).
        response.svids = snapshot.svids.filter { $0.hint.isEmpty || seenHints.insert($0.hint).inserted }.map { svid in
            var out = SPIFFEX509SVID()
            out.spiffeID = svid.spiffeID
            out.x509Svid = Data(svid.chainDER)
            out.x509SvidKey = Data(svid.keyPKCS8DER)
            out.bundle = bundle
            out.hint = svid.hint
            return out
        }
        return response
    }

    /// The key of a bundle map: the trust domain's SPIFFE ID, `spiffe://<td>`, as SPIRE's agent sends
    /// (`TrustDomain.IDString()`); go-spiffe and py-spiffe accept it and the bare name alike.
    static func bundleKey(_ trustDomain: String) -> String {
        if let parsed = try? TrustDomain(trustDomain) {
            return parsed.id.description
        }
        return trustDomain.hasPrefix(SpiffeID.scheme) ? trustDomain : SpiffeID.scheme + trustDomain
    }

    static func rpcError(_ error: WorkloadAPIError) -> RPCError {
        switch error.code {
        case .permissionDenied: RPCError(code: .permissionDenied, message: error.message)
        case .invalidArgument: RPCError(code: .invalidArgument, message: error.message)
        case .unavailable: RPCError(code: .unavailable, message: error.message)
        }
    }
}

/// Ends every open Workload API stream when the server shuts down (streams never end by themselves,
/// and a graceful shutdown waits for open RPCs). Clients see Unavailable and reconnect.
final class ShutdownSignal: Sendable {
    private struct State {
        var triggered = false
        var nextID: UInt64 = 0
        var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
    }

    private let state = Mutex(State())

    init() {}

    var isTriggered: Bool { state.withLock { $0.triggered } }

    func trigger() {
        let waiters = state.withLock { state in
            state.triggered = true
            defer { state.waiters = [:] }
            return state.waiters
        }
        for waiter in waiters.values { waiter.resume() }
    }

    /// Returns once triggered, or when the calling task is cancelled.
    func wait() async {
        let id = state.withLock { state in
            state.nextID += 1
            return state.nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { state in
                    if state.triggered || Task.isCancelled { return true }
                    state.waiters[id] = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            let waiter = state.withLock { $0.waiters.removeValue(forKey: id) }
            waiter?.resume()
        }
    }

    /// Runs `body`; if the signal fires first, cancels it and throws Unavailable.
    func endingOnShutdown(_ body: @escaping @Sendable () async throws -> Void) async throws {
        try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask {
                try await body()
                return false
            }
            group.addTask {
                await self.wait()
                return !Task.isCancelled
            }
            let shutDown = try await group.next() ?? false
            group.cancelAll()
            if shutDown {
                throw RPCError(code: .unavailable, message: "the Sigil agent is shutting down; reconnect")
            }
        }
    }
}

/// One remembered X.509 response and the snapshot it was built from (see `response(for:)`).
final class LastX509Response: Sendable {
    let value = Mutex<(snapshot: WorkloadX509Snapshot, response: SPIFFEX509SVIDResponse)?>(nil)
}
