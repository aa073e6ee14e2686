public import GRPCCore
public import SigilRPC
import GRPCNIOTransportHTTP2
import SigilCore
import SigilCA
import SigilStore
import X509
import Logging
import Foundation

/// The agent API: node attestation with join tokens, the agent's own SVID renewal, entry sync
/// (pushed), batched workload SVID signing. Every call but Attest requires the caller's mTLS
/// certificate to be an unexpired agent SVID this server issued to an agent that is not evicted;
/// an agent only ever obtains identities of entries parented to it.
public struct AgentAPIService: SigilAgentAPI.SimpleServiceProtocol {
    let core: ServerCore

    public init(core: ServerCore) {
        self.core = core
    }

    // MARK: attestation

    public func attest(request: SigilAttestRequest, context: ServerContext) async throws -> SigilAgentSVIDResponse {
        let peer = context.remotePeer
        guard !request.joinToken.isEmpty else {
            throw RPCError(code: .invalidArgument, message: "join token missing")
        }
        let signing: SigningRequest
        do {
            signing = try SigningRequest(bytes: Array(request.csr))
        } catch {
            throw RPCError(code: .invalidArgument, message: error.message)
        }
        let outcome: JoinTokenOutcome
        do {
            outcome = try await core.store.consumeJoinToken(hash: ServerCore.tokenHash(request.joinToken), now: core.clock.now, requester: "peer:\(peer)")
        } catch {
            throw core.storeFailed(error, during: "attest")
        }
        let agentText: String
        switch outcome {
        case .refused(let reason):
            core.logger.warning("join token refused", metadata: ["peer": "\(peer)", "reason": "\(reason.rawValue)"])
            throw RPCError(code: .permissionDenied, message: "join token refused: \(reason.rawValue) (create a new one with 'sigil token create')")
        case .accepted(let id):
            agentText = id
        }
        let svid = try await issueAgentSVID(agentID: agentText, request: signing)
        // attestedAt is the new SVID's issue time: certificates issued before it (an earlier
        // incarnation of this agent ID, perhaps evicted) are no longer accepted.
        var agent = AgentRecord(id: agentText, serial: svid.record.serial, notAfter: svid.record.notAfter, attestedAt: svid.record.issuedAt, lastSeen: core.clock.now)
        agent.evicted = false
        try await upsert(agent)
        core.storeHealth.wrote("attest")
        core.logger.info("agent attested", metadata: ["agent_id": "\(agentText)", "serial": "\(svid.record.serial)", "peer": "\(peer)"])
        return response(agentID: agentText, svid: svid)
    }

    public func renewAgent(request: SigilRenewAgentRequest, context: ServerContext) async throws -> SigilAgentSVIDResponse {
        let agentID = try await authenticate(context)
        let signing: SigningRequest
        do {
            signing = try SigningRequest(bytes: Array(request.csr))
        } catch {
            throw RPCError(code: .invalidArgument, message: error.message)
        }
        let svid = try await issueAgentSVID(agentID: agentID, request: signing)
        let updated: Bool
        do {
            updated = try await core.store.updateAgentSVID(id: agentID, serial: svid.record.serial, notAfter: svid.record.notAfter, at: core.clock.now)
        } catch {
            throw core.storeFailed(error, during: "agent SVID renewal")
        }
        core.storeHealth.wrote("agent SVID renewal")
        guard updated else {
            throw RPCError(code: .permissionDenied, message: "agent \(agentID) was evicted")
        }
        return response(agentID: agentID, svid: svid)
    }

    // MARK: entries

    public func sync(request: SigilSyncRequest, response: RPCWriter<SigilSyncUpdate>, context: ServerContext) async throws {
        let agentID = try await authenticate(context)
        let (subscription, signals) = await core.hub.subscribe(agentID: agentID)
        defer { Task { [hub = core.hub] in await hub.unsubscribe(agentID: agentID, id: subscription) } }
        var lastSent: SigilSyncUpdate?
        func sendSnapshot() async throws {
            // Re-check on every snapshot: an eviction signal may have been coalesced away.
            if let agent = try? await core.store.agent(id: agentID), agent.evicted {
                throw RPCError(code: .permissionDenied, message: "agent \(agentID) was evicted")
            }
            let entries: [EntryRecord]
            do {
                entries = try await core.store.entries(parentID: agentID)
            } catch {
                throw core.storeFailed(error, during: "sync")
            }
            var update = SigilSyncUpdate()
            update.entries = entries.map(SigilEntry.init(record:))
            let bundle = core.bundle
            update.bundle = bundle.authorities.map { Data($0.derBytes) }
            update.bundleSequence = bundle.sequenceNumber
            update.jwtBundle = Data(core.jwtKeysJSON)
            update.revision = entries.map(\.revision).max() ?? 0
            update.taintedAuthorities = core.tainted
            if update != lastSent {
                try await response.write(update)
                lastSent = update
            }
        }
        try await sendSnapshot()
        for await signal in signals {
            if case .evicted = signal {
                throw RPCError(code: .permissionDenied, message: "agent \(agentID) was evicted")
            }
            try await sendSnapshot()
        }
    }

    public func confirmBundle(request: SigilConfirmBundleRequest, context: ServerContext) async throws -> SigilConfirmBundleResponse {
        let agentID = try await authenticate(context)
        let current = core.bundle.sequenceNumber
        guard request.bundleSequence <= current else {
            throw RPCError(code: .invalidArgument, message: "bundle sequence \(request.bundleSequence) is newer than the server's (\(current))")
        }
        do {
            try await core.store.confirmBundle(agentID: agentID, sequence: request.bundleSequence, at: core.clock.now)
        } catch {
            throw core.storeFailed(error, during: "bundle confirmation")
        }
        return SigilConfirmBundleResponse()
    }

    /// The most SVID requests one call may carry (the agent sends at most 100): one call's work,
    /// answer and issuance-log writes stay bounded.
    static let maximumBatch = 1000

    /// Whether `id` has the form of an entry ID (the server makes 32 hex digits): anything else is
    /// refused before it is looked up, logged or recorded.
    static func isWellFormedEntryID(_ id: String) -> Bool {
        !id.isEmpty && id.utf8.count <= 64 && id.utf8.allSatisfy { $0 == UInt8(ascii: "-") || (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) }
    }

    public func signX509SVIDs(request: SigilSignX509SVIDsRequest, context: ServerContext) async throws -> SigilSignX509SVIDsResponse {
        let agentID = try await authenticate(context)
        guard request.requests.count <= Self.maximumBatch else {
            throw RPCError(code: .invalidArgument, message: "at most \(Self.maximumBatch) SVID requests per call (this one has \(request.requests.count))")
        }
        if let bad = request.requests.firstIndex(where: { !Self.isWellFormedEntryID($0.entryID) }) {
            throw RPCError(code: .invalidArgument, message: "request \(bad): an entry ID is 1-64 letters, digits or '-'")
        }
        var results = [SigilSVIDResult](repeating: SigilSVIDResult(), count: request.requests.count)
        var batch: [(Int, SigningRequest, SVIDProfile)] = []
        // One read for the whole batch's entries.
        let entries: [String: EntryRecord]
        do {
            entries = try await core.store.entries(ids: request.requests.map(\.entryID))
        } catch {
            throw core.storeFailed(error, during: "SVID signing")
        }
        for (index, item) in request.requests.enumerated() {
            results[index].entryID = item.entryID
            do {
                guard let entry = entries[item.entryID] else {
                    throw CAError(.policy, "entry \(item.entryID) does not exist")
                }
                guard entry.parentID == agentID else {
                    throw CAError(.policy, "entry \(item.entryID) (\(entry.spiffeID)) is not parented to \(agentID)")
                }
                let signing = try SigningRequest(bytes: Array(item.csr))
                let profile: SVIDProfile
                do {
                    profile = try SVIDProfile(spiffeID: SpiffeID(entry.spiffeID), ttl: .seconds(entry.ttlSeconds), dnsNames: entry.dnsNames)
                } catch {
                    throw CAError(.policy, error.message)
                }
                batch.append((index, signing, profile))
            } catch let error as CAError {
                results[index].error = error.message
                await refuse(agentID: agentID, entryID: item.entryID, reason: error.message)
            } catch {
                results[index].error = "\(error)"
            }
        }
        let signed = await core.ca.signBatch(batch.map { ($0.1, $0.2) }, requester: "agent:\(agentID)")
        var recorded = false
        var storeFailure: String?
        for ((index, _, _), outcome) in zip(batch, signed) {
            switch outcome {
            case .success(let svid):
                results[index].svidChain = svid.chainDER.map { Data($0) }
                results[index].expiresAt = Int64(svid.record.notAfter.timeIntervalSince1970)
                recorded = true
            case .failure(let error):
                results[index].error = error.message
                if error.code == .store { storeFailure = error.message }
            }
        }
        // Once per batch, not per SVID: the health log counts failed calls.
        if let storeFailure { core.storeHealth.failed("SVID signing", error: storeFailure) }
        if recorded { core.storeHealth.wrote("SVID signing") }
        var out = SigilSignX509SVIDsResponse()
        out.results = results
        return out
    }

    public func signJWTSVID(request: SigilSignJWTSVIDRequest, context: ServerContext) async throws -> SigilSignJWTSVIDResponse {
        let agentID = try await authenticate(context)
        guard !request.audience.isEmpty, request.audience.allSatisfy({ !$0.isEmpty }) else {
            throw RPCError(code: .invalidArgument, message: "a JWT-SVID needs at least one non-empty audience")
        }
        guard request.audience.count <= 32, request.audience.allSatisfy({ $0.utf8.count <= 1024 }) else {
            throw RPCError(code: .invalidArgument, message: "at most 32 audiences of at most 1024 bytes each")
        }
        guard Self.isWellFormedEntryID(request.entryID) else {
            throw RPCError(code: .invalidArgument, message: "an entry ID is 1-64 letters, digits or '-'")
        }
        guard let entry = try? await core.store.entry(id: request.entryID), entry.parentID == agentID else {
            let reason = "entry \(request.entryID) is not parented to \(agentID)"
            await refuse(agentID: agentID, entryID: request.entryID, reason: reason)
            throw RPCError(code: .permissionDenied, message: reason)
        }
        guard let key = core.jwtKey else {
            throw RPCError(code: .unavailable, message: "the server has no JWT signing key")
        }
        let now = core.clock.now
        let ttl = min(ServerCore.jwtSVIDTTL, .seconds(entry.ttlSeconds))
        do {
            let token = try JWTSVIDSigner().sign(spiffeID: SpiffeID(entry.spiffeID), audience: request.audience, ttl: ttl, now: now, key: key)
            var out = SigilSignJWTSVIDResponse()
            out.token = token
            out.expiresAt = Int64(now.addingTimeInterval(ttl.timeInterval).timeIntervalSince1970)
            return out
        } catch {
            throw RPCError(code: .invalidArgument, message: error.message)
        }
    }

    // MARK: helpers

    /// The caller's agent ID, from its mTLS certificate; throws unless it is a live agent SVID.
    func authenticate(_ context: ServerContext) async throws -> String {
        guard let posix = context.transportSpecific as? HTTP2ServerTransport.Posix.Context, let leaf = posix.peerCertificate,
              let id = leaf.spiffeID, id.trustDomain == core.trustDomain, id.path.hasPrefix("/sigil/agent/")
        else {
            throw RPCError(code: .unauthenticated, message: "this call needs an agent SVID as the TLS client certificate")
        }
        let agentID = id.description
        let serial = leaf.serialHex, fingerprint = leaf.sha256Fingerprint
        let agent: AgentRecord?
        let live: Bool
        do {
            agent = try await core.store.agent(id: agentID)
            live = try await core.store.isLiveCertificate(serial: serial, sha256: fingerprint, spiffeID: agentID,
                                                          issuedSince: agent?.attestedAt ?? .distantFuture, now: core.clock.now)
        } catch {
            throw core.storeFailed(error, during: "agent authentication")
        }
        guard let agent, !agent.evicted else {
            throw RPCError(code: .permissionDenied, message: "agent \(agentID) is \(agent == nil ? "unknown" : "evicted"); attest again with a new join token")
        }
        guard live else {
            // An SVID of this incarnation that merely expired (a connection opened before the agent
            // renewed): unauthenticated, which the agent retries on a new connection carrying its
            // current SVID. Anything else (unknown, or from before a re-attestation) is final.
            let expiredOnly: Bool
            do {
                expiredOnly = try await core.store.isLiveCertificate(serial: serial, sha256: fingerprint, spiffeID: agentID,
                                                                     issuedSince: agent.attestedAt, now: .distantPast)
            } catch {
                throw core.storeFailed(error, during: "agent authentication")
            }
            if expiredOnly {
                throw RPCError(code: .unauthenticated, message: "the certificate presented by \(agentID) has expired; connect again with the current agent SVID")
            }
            throw RPCError(code: .permissionDenied, message: "the certificate presented by \(agentID) was not issued by this server to this incarnation of the agent")
        }
        // Only the agent's current SVID authenticates it, or the renewed one it has not used yet,
        // which becomes current now (as SPIRE's agent authorizer): an older SVID, say from a
        // stolen backup, stops working once the agent has moved on.
        if serial != agent.serial {
            var current = false
            do throws(StoreError) {
                if serial == agent.nextSerial {
                    current = try await core.store.promoteAgentSVID(id: agentID, serial: serial, at: core.clock.now)
                    // promoted by a concurrent call
                    if !current { current = try await core.store.agent(id: agentID)?.serial == serial }
                }
            } catch {
                throw core.storeFailed(error, during: "agent authentication")
            }
            guard current else {
                // A connection opened before the agent renewed: it reconnects with its newest SVID.
                throw RPCError(code: .unauthenticated, message: "the certificate presented by \(agentID) was superseded by a newer agent SVID; connect again with the current one")
            }
        }
        return agentID
    }

    func issueAgentSVID(agentID: String, request: SigningRequest) async throws -> IssuedSVID {
        do {
            let profile = try SVIDProfile(spiffeID: SpiffeID(agentID), ttl: core.agentSVIDTTL)
            let issued = try await core.ca.sign(request, profile: profile, requester: "agent:\(agentID)")
            core.storeHealth.wrote("agent SVID")
            return issued
        } catch let error as CAError {
            if error.code == .store {
                // Signed but not recorded (a full disk, say): the agent retries; the server says so once.
                core.storeHealth.failed("agent SVID", error: error.message)
                throw RPCError(code: .unavailable, message: "datastore: \(error.message)")
            }
            throw RPCError(code: .internalError, message: error.message)
        } catch let error as SigilError {
            throw RPCError(code: .invalidArgument, message: error.message)
        }
    }

    func upsert(_ agent: AgentRecord) async throws {
        do {
            try await core.store.upsertAgent(agent)
        } catch {
            throw core.storeFailed(error, during: "agent record")
        }
    }

    func refuse(agentID: String, entryID: String, reason: String) async {
        core.logger.warning("refused SVID request", metadata: ["agent_id": "\(agentID)", "entry": "\(entryID)", "reason": "\(reason)"])
        try? await core.store.recordEvent(IssuanceEvent(at: core.clock.now, kind: .refused, serial: nil, spiffeID: nil, authorityID: nil,
                                                        requester: "agent:\(agentID)", detail: reason))
    }

    func response(agentID: String, svid: IssuedSVID) -> SigilAgentSVIDResponse {
        var out = SigilAgentSVIDResponse()
        out.agentID = agentID
        out.svidChain = svid.chainDER.map { Data($0) }
        out.bundle = core.bundle.authorities.map { Data($0.derBytes) }
        return out
    }
}

extension SigilEntry {
    init(record: EntryRecord) {
        self.init()
        id = record.id
        spiffeID = record.spiffeID
        parentID = record.parentID
        selectors = record.selectors
        ttlSeconds = record.ttlSeconds
        dnsNames = record.dnsNames
        revision = record.revision
        createdAt = Int64(record.createdAt.timeIntervalSince1970)
    }
}
