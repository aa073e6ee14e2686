public import GRPCCore
public import SigilRPC
import SigilCore
import SigilStore
import X509
import Logging
import Foundation

/// The operator API, served on a Unix socket of mode 0600 (file permissions are its access control).
public struct AdminAPIService: SigilAdminAPI.SimpleServiceProtocol {
    let core: ServerCore

    public static let defaultTokenTTL: Duration = .seconds(600)
    /// Selector types the Unix workload attestor produces.
    static let selectorTypes: Set<String> = ["uid", "gid", "user", "group", "path", "supplementary_gid", "supplementary_group"]

    public init(core: ServerCore) {
        self.core = core
    }

    public func createJoinToken(request: SigilCreateJoinTokenRequest, context: ServerContext) async throws -> SigilCreateJoinTokenResponse {
        let agentID = try invalidArgument { () throws(SigilError) in try core.agentID(from: request.agentID) }
        let ttl = request.ttlSeconds == 0 ? Self.defaultTokenTTL : .seconds(request.ttlSeconds)
        guard ttl >= .seconds(1), ttl <= .seconds(7 * 86_400) else {
            throw RPCError(code: .invalidArgument, message: "join token TTL must be between 1s and 7d")
        }
        let token = ServerCore.newToken()
        let now = core.clock.now
        let expires = now.addingTimeInterval(ttl.timeInterval)
        try await storeCall(write: "token create") { () throws(StoreError) in
            try await core.store.createJoinToken(hash: ServerCore.tokenHash(token), agentID: agentID.description, expiresAt: expires, at: now)
        }
        core.logger.info("join token created", metadata: ["agent_id": "\(agentID)"])
        var out = SigilCreateJoinTokenResponse()
        out.token = token
        out.expiresAt = Int64(expires.timeIntervalSince1970)
        out.agentID = agentID.description
        return out
    }

    public func listAgents(request: SigilListAgentsRequest, context: ServerContext) async throws -> SigilListAgentsResponse {
        let agents = try await storeCall { () throws(StoreError) in try await core.store.agents() }
        var out = SigilListAgentsResponse()
        out.agents = agents.map(SigilAgent.init(record:))
        return out
    }

    public func evictAgent(request: SigilEvictAgentRequest, context: ServerContext) async throws -> SigilEvictAgentResponse {
        let agentID = try invalidArgument { () throws(SigilError) in try core.agentID(from: request.id) }
        let evicted = try await storeCall(write: "agent evict") { () throws(StoreError) in try await core.store.evictAgent(id: agentID.description, at: core.clock.now) }
        guard let evicted else {
            throw RPCError(code: .notFound, message: "no agent \(agentID)")
        }
        await core.hub.evict(agentID: agentID.description)
        core.logger.warning("agent evicted", metadata: ["agent_id": "\(agentID)"])
        var out = SigilEvictAgentResponse()
        out.agent = SigilAgent(record: evicted)
        return out
    }

    public func createEntry(request: SigilEntry, context: ServerContext) async throws -> SigilEntry {
        let record = try validate(request)
        let stored = try await storeCall(write: "entry create") { () throws(StoreError) in try await core.store.createEntry(record) }
        await core.hub.notify(agentID: stored.parentID)
        core.logger.info("entry created", metadata: ["spiffe_id": "\(stored.spiffeID)", "agent_id": "\(stored.parentID)", "entry": "\(stored.id)"])
        return SigilEntry(record: stored)
    }

    public func listEntries(request: SigilListEntriesRequest, context: ServerContext) async throws -> SigilListEntriesResponse {
        var parent: String?
        if !request.parentID.isEmpty {
            parent = try invalidArgument { () throws(SigilError) in try core.agentID(from: request.parentID).description }
        }
        var entries = try await storeCall { () throws(StoreError) in try await core.store.entries(parentID: parent) }
        if !request.spiffeID.isEmpty { entries = entries.filter { $0.spiffeID == request.spiffeID } }
        var out = SigilListEntriesResponse()
        out.entries = entries.map(SigilEntry.init(record:))
        return out
    }

    public func getEntry(request: SigilGetEntryRequest, context: ServerContext) async throws -> SigilEntry {
        guard let entry = try await storeCall({ () throws(StoreError) in try await core.store.entry(id: request.id) }) else {
            throw RPCError(code: .notFound, message: "no entry with ID \(request.id.prefix(80))\(request.id.count > 80 ? "..." : "")")
        }
        return SigilEntry(record: entry)
    }

    public func deleteEntry(request: SigilDeleteEntryRequest, context: ServerContext) async throws -> SigilDeleteEntryResponse {
        guard let entry = try await storeCall(write: "entry delete", { () throws(StoreError) in try await core.store.deleteEntry(id: request.id, at: core.clock.now) }) else {
            throw RPCError(code: .notFound, message: "no entry with ID \(request.id.prefix(80))\(request.id.count > 80 ? "..." : "")")
        }
        await core.hub.notify(agentID: entry.parentID)
        core.logger.info("entry deleted", metadata: ["spiffe_id": "\(entry.spiffeID)", "entry": "\(entry.id)"])
        var out = SigilDeleteEntryResponse()
        out.entry = SigilEntry(record: entry)
        return out
    }

    public func getBundle(request: SigilGetBundleRequest, context: ServerContext) async throws -> SigilGetBundleResponse {
        let bundle = core.bundle
        var out = SigilGetBundleResponse()
        out.trustDomain = bundle.trustDomain.name
        out.roots = bundle.authorities.map { Data($0.derBytes) }
        out.sequence = bundle.sequenceNumber
        out.jwtBundle = Data(core.jwtKeysJSON)
        return out
    }

    // MARK: validation

    /// Checks an entry on the way in: a workload SPIFFE ID in our trust domain, an agent parent,
    /// known selectors, a TTL of at least 10 s, valid DNS names.
    static let maximumSelectors = 32
    static let maximumDNSNames = 32
    static let maximumSelectorBytes = 1024

    func validate(_ e: SigilEntry) throws -> EntryRecord {
        let id = try invalidArgument { () throws(SigilError) in try SpiffeID(e.spiffeID) }
        guard id.trustDomain == core.trustDomain else {
            throw RPCError(code: .invalidArgument, message: "SPIFFE ID \(id) is not in trust domain \(core.trustDomain)")
        }
        guard !id.isTrustDomainID, !id.path.hasPrefix("/sigil/") else {
            throw RPCError(code: .invalidArgument, message: "SPIFFE ID \(id) is reserved or has no path; use a workload ID such as spiffe://\(core.trustDomain)/ns/default/sa/web")
        }
        let parent = try invalidArgument { () throws(SigilError) in try core.agentID(from: e.parentID) }
        guard !e.selectors.isEmpty else {
            throw RPCError(code: .invalidArgument, message: "an entry needs at least one selector, e.g. unix:uid:1000")
        }
        // Bounds that keep every agent's Sync answer far below the RPC size limit.
        guard e.selectors.count <= Self.maximumSelectors, e.dnsNames.count <= Self.maximumDNSNames else {
            throw RPCError(code: .invalidArgument, message: "an entry takes at most \(Self.maximumSelectors) selectors and \(Self.maximumDNSNames) DNS names (got \(e.selectors.count) and \(e.dnsNames.count))")
        }
        for selector in e.selectors {
            guard !selector.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) else {
                throw RPCError(code: .invalidArgument, message: "selector \(selector.debugDescription) contains a control character")
            }
            let parts = selector.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3, parts[0] == "unix", Self.selectorTypes.contains(String(parts[1])), !parts[2].isEmpty else {
                throw RPCError(code: .invalidArgument, message: "selector '\(selector)' is not one of unix:uid:<n>, unix:gid:<n>, unix:user:<name>, unix:group:<name>, unix:path:<absolute path>, unix:supplementary_gid:<n>, unix:supplementary_group:<name>")
            }
            guard selector.utf8.count <= Self.maximumSelectorBytes else {
                throw RPCError(code: .invalidArgument, message: "selector '\(selector.prefix(40))...' is longer than \(Self.maximumSelectorBytes) bytes")
            }
            // The agent compares selectors as text with the ones it derives from the kernel's
            // credentials, so only the canonical spelling can ever match: anything else is refused
            // with the spelling that would.
            if ["uid", "gid", "supplementary_gid"].contains(String(parts[1])) {
                guard let n = UInt32(parts[2]) else {
                    throw RPCError(code: .invalidArgument, message: "selector '\(selector)': \(parts[1]) must be a number")
                }
                guard String(n) == parts[2] else {
                    throw RPCError(code: .invalidArgument, message: "selector '\(selector)' never matches as written; write unix:\(parts[1]):\(n)")
                }
            }
            if parts[1] == "path" {
                guard parts[2].hasPrefix("/") else {
                    throw RPCError(code: .invalidArgument, message: "selector '\(selector)': the path must be absolute")
                }
                let segments = parts[2].split(separator: "/", omittingEmptySubsequences: false).dropFirst()
                guard !segments.contains(where: { $0.isEmpty || $0 == "." || $0 == ".." }) || parts[2] == "/" else {
                    throw RPCError(code: .invalidArgument, message: "selector '\(selector)' never matches as written: the agent sees the executable's resolved path, without '.', '..', '//' or a trailing '/'")
                }
            }
        }
        let ttl = e.ttlSeconds == 0 ? Int64(SVIDProfile.defaultTTL.components.seconds) : e.ttlSeconds
        guard ttl >= 10, ttl <= 30 * 86_400 else {
            throw RPCError(code: .invalidArgument, message: "entry TTL must be between 10s and 30d (got \(ttl)s)")
        }
        for name in e.dnsNames {
            try invalidArgument { () throws(SigilError) in try DNSName.validate(name) }
        }
        let entryID = randomHex(byteCount: 16)
        return EntryRecord(id: entryID, spiffeID: id.description, parentID: parent.description, selectors: Array(Set(e.selectors)),
                           ttlSeconds: ttl, dnsNames: e.dnsNames, createdAt: core.clock.now)
    }

    func invalidArgument<T>(_ body: () throws(SigilError) -> T) throws -> T {
        do {
            return try body()
        } catch {
            throw RPCError(code: .invalidArgument, message: error.message)
        }
    }

    /// A datastore call's errors as RPC errors; a failing datastore is logged (once, see
    /// ``StoreHealth``), and a write that goes through (`write` names it) ends that.
    func storeCall<T>(write: String? = nil, _ body: () async throws(StoreError) -> T) async throws -> T {
        do {
            let result = try await body()
            if let write { core.storeHealth.wrote(write) }
            return result
        } catch {
            switch error.code {
            case .conflict: throw RPCError(code: .alreadyExists, message: error.message)
            default: throw core.storeFailed(error, during: write ?? "admin read")
            }
        }
    }
}

extension SigilAgent {
    init(record: AgentRecord) {
        self.init()
        id = record.id
        serial = record.serial
        expiresAt = Int64(record.notAfter.timeIntervalSince1970)
        attestedAt = Int64(record.attestedAt.timeIntervalSince1970)
        evicted = record.evicted
        lastSeen = Int64(record.lastSeen.timeIntervalSince1970)
    }
}
