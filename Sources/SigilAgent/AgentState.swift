import X509
import SwiftASN1
import SigilRPC
import SigilCore
import Foundation

/// A registration entry as the agent holds it.
struct AgentEntry: Sendable, Hashable, Codable {
    var id: String
    var spiffeID: String
    var selectors: [String]
    var ttlSeconds: Int64
    var dnsNames: [String]
    var revision: Int64

    func matches(_ callerSelectors: Set<String>) -> Bool {
        !selectors.isEmpty && selectors.allSatisfy(callerSelectors.contains)
    }
}

/// An SVID the agent holds for an entry: chain and key as DER, and when to renew it.
struct HeldSVID: Sendable, Hashable, Codable {
    var entryID: String
    var spiffeID: String
    var chainDER: [[UInt8]]
    var keyPKCS8DER: [UInt8]
    var serial: String
    var notBefore: Date
    var notAfter: Date
    var renewAt: Date
    /// The entry revision it was issued for (a changed entry is re-issued).
    var entryRevision: Int64
}

/// Everything the agent knows, and the fan-out of changes to open Workload API streams.
/// One actor owns it; the Workload API reads snapshots from it.
actor AgentState: WorkloadIdentitySource {
    let trustDomain: TrustDomain
    private(set) var entries: [String: AgentEntry] = [:]
    private(set) var svids: [String: HeldSVID] = [:]
    private(set) var bundleRoots: [[UInt8]] = []
    private(set) var bundleSequence: UInt64 = 0
    private(set) var jwtKeysJSON: [UInt8] = Array(#"{"keys":[]}"#.utf8)
    private var x509Subscribers: [UUID: (Set<String>, AsyncStream<WorkloadX509Snapshot>.Continuation)] = [:]
    private var bundleSubscribers: [UUID: AsyncStream<WorkloadBundle>.Continuation] = [:]
    private var lastSent: [UUID: WorkloadX509Snapshot] = [:]
    /// Streams that ended before their registration ran (the two happen in separate tasks).
    private var endedEarly: Set<UUID> = []
    /// Wakes the reconciler when entries or the bundle change.
    nonisolated let changes: AsyncStream<Void>
    private let changesContinuation: AsyncStream<Void>.Continuation
    var jwtSigner: (@Sendable (_ entryID: String, _ audience: [String]) async throws -> (token: String, expiresAt: Date))?
    /// JWT-SVIDs already signed, by entry and audience, reused while more than half their life
    /// remains (as SPIRE's agent does): fewer round trips, and a workload keeps getting tokens
    /// through a short server outage.
    var jwtCache: [String: (token: String, issuedAt: Date, expiresAt: Date)] = [:]

    init(trustDomain: TrustDomain) {
        self.trustDomain = trustDomain
        currentBundle = WorkloadBundle(trustDomain: trustDomain.name, rootsDER: [], jwtKeysJSON: jwtKeysJSON)
        (changes, changesContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    }

    // MARK: updates

    func restore(from cache: AgentCache.Snapshot) {
        entries = Dictionary(uniqueKeysWithValues: cache.entries.map { ($0.id, $0) })
        svids = Dictionary(uniqueKeysWithValues: cache.svids.map { ($0.entryID, $0) })
        servedSVIDs = [:]
        bundleRoots = cache.bundleRoots
        bundleSequence = cache.bundleSequence
        jwtKeysJSON = cache.jwtKeysJSON
        refreshServedBundle()
        publish()
    }

    func apply(entries newEntries: [AgentEntry], bundleRoots roots: [[UInt8]], bundleSequence sequence: UInt64, jwtKeysJSON jwt: [UInt8]) {
        let bundleChanged = roots != bundleRoots || jwt != jwtKeysJSON
        entries = Dictionary(uniqueKeysWithValues: newEntries.map { ($0.id, $0) })
        // SVIDs of deleted entries are dropped at once: the workload loses that identity.
        svids = svids.filter { entries[$0.key] != nil }
        servedSVIDs = servedSVIDs.filter { svids[$0.key] != nil }
        bundleRoots = roots
        bundleSequence = sequence
        jwtKeysJSON = jwt
        refreshServedBundle()
        changesContinuation.yield()
        publish()
        if bundleChanged { publishBundle() }
    }

    func store(_ svid: HeldSVID) {
        guard entries[svid.entryID] != nil else { return }
        svids[svid.entryID] = svid
        publish()
    }

    func setJWTSigner(_ signer: @escaping @Sendable (_ entryID: String, _ audience: [String]) async throws -> (token: String, expiresAt: Date)) {
        jwtSigner = signer
    }

    /// Makes every held SVID whose chain includes a tainted authority due now; returns how many.
    @discardableResult
    func taint(_ authorities: Set<String>, now: Date) -> Int {
        guard !authorities.isEmpty else { return 0 }
        var marked = 0
        for (id, held) in svids where held.renewAt > now && Self.chains(held.chainDER, toAny: authorities) {
            svids[id]?.renewAt = now
            marked += 1
        }
        if marked > 0 { changesContinuation.yield() }
        return marked
    }

    /// Whether a chain (leaf first) holds a certificate issued by, or being, one of `authorities`.
    static func chains(_ chainDER: [[UInt8]], toAny authorities: Set<String>) -> Bool {
        for der in chainDER.dropFirst() {
            guard let certificate = try? Certificate(derEncoded: der) else { continue }
            if authorities.contains(certificate.authorityID) { return true }
            if let aki = (try? certificate.extensions.authorityKeyIdentifier)??.keyIdentifier, authorities.contains(hex(aki)) { return true }
        }
        return false
    }

    /// Entries whose SVID is missing, due for renewal, or issued for an older revision of the entry.
    func due(at now: Date) -> [AgentEntry] {
        entries.values.filter { entry in
            guard let held = svids[entry.id] else { return true }
            return held.renewAt <= now || held.entryRevision != entry.revision || held.notAfter <= now
        }.sorted { $0.id < $1.id }
    }

    /// The earliest renewal time of any held SVID.
    func nextRenewal() -> Date? { svids.values.map(\.renewAt).min() }

    func snapshotForCache(agentID: String) -> AgentCache.Snapshot {
        AgentCache.Snapshot(trustDomain: trustDomain.name, agentID: agentID, entries: Array(entries.values), svids: Array(svids.values),
                            bundleRoots: bundleRoots, bundleSequence: bundleSequence, jwtKeysJSON: jwtKeysJSON)
    }

    var openStreams: Int { x509Subscribers.count }

    // MARK: WorkloadIdentitySource

    nonisolated func x509Snapshots(selectors: Set<String>) -> AsyncStream<WorkloadX509Snapshot> {
        let (stream, continuation) = AsyncStream.makeStream(of: WorkloadX509Snapshot.self, bufferingPolicy: .bufferingNewest(1))
        let id = UUID()
        continuation.onTermination = { [weak self] _ in
            Task { await self?.removeX509(id) }
        }
        Task { await self.addX509(id, selectors: selectors, continuation: continuation) }
        return stream
    }

    nonisolated func bundles() -> AsyncStream<WorkloadBundle> {
        let (stream, continuation) = AsyncStream.makeStream(of: WorkloadBundle.self, bufferingPolicy: .bufferingNewest(1))
        let id = UUID()
        continuation.onTermination = { [weak self] _ in
            Task { await self?.removeBundle(id) }
        }
        Task { await self.addBundle(id, continuation: continuation) }
        return stream
    }

    func jwtSVIDs(selectors: Set<String>, spiffeID: String?, audience: [String]) async throws(WorkloadAPIError) -> [WorkloadJWTSVID] {
        var matching = entries(matching: selectors)
        if let spiffeID, !spiffeID.isEmpty { matching = matching.filter { $0.spiffeID == spiffeID } }
        guard !matching.isEmpty else {
            throw WorkloadAPIError(.permissionDenied, spiffeID.map { "no identity \($0) issued to this caller" } ?? "no identity issued")
        }
        guard let signer = jwtSigner else {
            throw WorkloadAPIError(.unavailable, "the agent cannot reach the server to sign JWT-SVIDs yet")
        }
        var out: [WorkloadJWTSVID] = []
        for entry in matching {
            // By entry and audience set (order aside), each length-prefixed: no two requests share
            // a key unless they ask for the same token.
            let key = ([entry.id] + audience.sorted()).map { "\($0.utf8.count):\($0)" }.joined()
            let now = Date()
            if let cached = jwtCache[key], cached.expiresAt.timeIntervalSince(now) > cached.expiresAt.timeIntervalSince(cached.issuedAt) / 2 {
                out.append(WorkloadJWTSVID(spiffeID: entry.spiffeID, token: cached.token))
                continue
            }
            do {
                let signed = try await signer(entry.id, audience)
                out.append(WorkloadJWTSVID(spiffeID: entry.spiffeID, token: signed.token))
                // Bounded: at most 1,024 tokens, none for an audience list over 4 KiB (~10 MB at most).
                if jwtCache.count >= 1024 { jwtCache = jwtCache.filter { $0.value.expiresAt > now } }
                if jwtCache.count < 1024, key.utf8.count <= 4096 { jwtCache[key] = (signed.token, now, signed.expiresAt) }
            } catch {
                throw WorkloadAPIError(.unavailable, "JWT-SVID signing failed: \(error)")
            }
        }
        return out
    }

    func validateJWTSVID(token: String, audience: String) async throws(WorkloadAPIError) -> (spiffeID: String, claimsJSON: [UInt8]) {
        // The agent's own JWT bundle failing to read is the agent's problem (Unavailable: retry),
        // not the caller's; a token that does not validate is InvalidArgument (do not retry).
        let bundle: JWTBundle
        do {
            bundle = try JWTBundle(jwksJSON: jwtKeysJSON, trustDomain: trustDomain)
        } catch {
            throw WorkloadAPIError(.unavailable, "the agent's JWT bundle cannot be read: \(error.message)")
        }
        do {
            let (id, claims) = try JWTSVIDValidator().validate(token: token, audience: audience, bundle: bundle, now: Date())
            return (id.description, claims)
        } catch {
            throw WorkloadAPIError(.invalidArgument, error.message)
        }
    }

    // MARK: fan-out

    private func addX509(_ id: UUID, selectors: Set<String>, continuation: AsyncStream<WorkloadX509Snapshot>.Continuation) {
        if endedEarly.remove(id) != nil { return }
        x509Subscribers[id] = (selectors, continuation)
        let snapshot = makeSnapshot(for: selectors)
        lastSent[id] = snapshot
        continuation.yield(snapshot)
    }

    private func removeX509(_ id: UUID) {
        if x509Subscribers.removeValue(forKey: id) == nil { endedEarly.insert(id) }
        lastSent[id] = nil
    }

    private func addBundle(_ id: UUID, continuation: AsyncStream<WorkloadBundle>.Continuation) {
        if endedEarly.remove(id) != nil { return }
        bundleSubscribers[id] = continuation
        continuation.yield(currentBundle)
    }

    private func removeBundle(_ id: UUID) {
        if bundleSubscribers.removeValue(forKey: id) == nil { endedEarly.insert(id) }
    }

    /// What the Workload API sends, kept from one snapshot to the next while unchanged: snapshots then
    /// share their byte buffers, and comparing two of them is an identity check, not a byte compare.
    private var currentBundle: WorkloadBundle
    private var servedSVIDs: [String: (serial: String, svid: WorkloadX509SVID)] = [:]

    private func refreshServedBundle() {
        let rootsDER = bundleRoots.flatMap { $0 }
        guard rootsDER != currentBundle.rootsDER || jwtKeysJSON != currentBundle.jwtKeysJSON else { return }
        currentBundle = WorkloadBundle(trustDomain: trustDomain.name, rootsDER: rootsDER, jwtKeysJSON: jwtKeysJSON)
    }

    /// A caller's entries, oldest registration first (by revision): the Workload API's first SVID
    /// is the default one (a proxy without --spiffe-id serves it), and registering another
    /// identity for the same workload must not change which one that is.
    func entries(matching selectors: Set<String>) -> [AgentEntry] {
        entries.values.filter { $0.matches(selectors) }.sorted { ($0.revision, $0.id) < ($1.revision, $1.id) }
    }

    func makeSnapshot(for selectors: Set<String>) -> WorkloadX509Snapshot {
        let matching = entries(matching: selectors)
        let now = Date()
        let held = matching.compactMap { entry -> WorkloadX509SVID? in
            // Never hand out an expired SVID.
            guard let svid = svids[entry.id], svid.notAfter > now else { return nil }
            if let served = servedSVIDs[entry.id], served.serial == svid.serial, served.svid.spiffeID == svid.spiffeID { return served.svid }
            let view = WorkloadX509SVID(spiffeID: svid.spiffeID, chainDER: svid.chainDER.flatMap { $0 }, keyPKCS8DER: svid.keyPKCS8DER)
            servedSVIDs[entry.id] = (svid.serial, view)
            return view
        }
        return WorkloadX509Snapshot(svids: held, bundle: currentBundle, entitled: !matching.isEmpty)
    }

    /// Sends every open stream its new snapshot, if it changed.
    /// Callers with the same selectors (one workload's many streams) share one snapshot, made once:
    /// its arrays are then the same buffers, so comparing and handing them on copies nothing.
    private func publish() {
        var made: [Set<String>: WorkloadX509Snapshot] = [:]
        for (id, (selectors, continuation)) in x509Subscribers {
            let snapshot: WorkloadX509Snapshot
            if let known = made[selectors] {
                snapshot = known
            } else {
                snapshot = makeSnapshot(for: selectors)
                made[selectors] = snapshot
            }
            if lastSent[id] != snapshot {
                lastSent[id] = snapshot
                continuation.yield(snapshot)
            }
        }
    }

    private func publishBundle() {
        let bundle = currentBundle
        for continuation in bundleSubscribers.values { continuation.yield(bundle) }
    }

    func finishAll() {
        for (_, continuation) in x509Subscribers.values { continuation.finish() }
        for continuation in bundleSubscribers.values { continuation.finish() }
    }
}
