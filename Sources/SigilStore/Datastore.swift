#if canImport(FoundationEssentials)
public import FoundationEssentials
#else
public import Foundation
#endif

/// What the CA persists. SQLite (``SQLiteDatastore``) is the default; the protocol keeps room for a
/// PostgreSQL implementation for HA servers.
public protocol Datastore: LedgerStore {
    /// The trust domain this store belongs to, or nil before `sigil ca init`.
    func trustDomain() async throws(StoreError) -> String?

    /// Records a new CA: its trust domain and first authorities, in one transaction.
    /// Throws `.alreadyInitialized` if the store already holds a CA.
    func initialize(trustDomain: String, authorities: [AuthorityRecord], at: Date) async throws(StoreError)

    /// Every authority, oldest first.
    func authorities() async throws(StoreError) -> [AuthorityRecord]

    /// Records certificates issued together, and one issuance-log row each, in one transaction:
    /// either all are stored or none is. A serial seen before fails the whole batch.
    func recordIssued(_ certificates: [IssuedCertificate]) async throws(StoreError)

    /// How many certificates each authority has issued (authority id → count).
    func issuedCounts() async throws(StoreError) -> [String: Int]

    /// Issued certificates, newest first.
    func issuedCertificates(limit: Int) async throws(StoreError) -> [IssuedCertificate]

    /// The issuance log, oldest first, from sequence `after` (exclusive).
    func issuanceLog(after: Int64, limit: Int) async throws(StoreError) -> [IssuanceEvent]

    /// The trust bundle's sequence number (`spiffe_sequence`).
    func bundleSequence() async throws(StoreError) -> UInt64

    // MARK: authority lifecycle (rotation)

    /// Adds an authority made by a rotation (normally `.prepared`), recorded in the issuance log;
    /// the bundle's sequence moves when it is published in the bundle.
    func addAuthority(_ record: AuthorityRecord, at: Date, requester: String) async throws(StoreError)
    /// Adds several authorities in one transaction (all or none), in order (a parent before its
    /// children), as ``addAuthority(_:at:requester:)`` each.
    func addAuthorities(_ records: [AuthorityRecord], at: Date, requester: String) async throws(StoreError)
    /// Makes `id` (prepared) the active authority of its kind; the one active before becomes
    /// `.old`. One transaction; false if `id` was not prepared (someone else moved it first).
    func activateAuthority(id: String, at: Date, requester: String) async throws(StoreError) -> Bool
    /// Moves `id` from `from` to `to` (false if it was not in `from`); removing a bundle authority
    /// moves the bundle's sequence.
    func transitionAuthority(id: String, from: AuthorityState, to: AuthorityState, at: Date, requester: String, detail: String) async throws(StoreError) -> Bool
    /// The last expiry of each authority that signed any SVID, and with `inService` how many of
    /// its SVIDs are in service (a scan of every issued certificate: for status and the gates).
    func authorityUsage(now: Date, inService: Bool) async throws(StoreError) -> [String: AuthorityUsage]
    /// In one transaction: every authority in `activate` (each must be prepared) becomes active and
    /// every active one in `retire` becomes old. False (nothing changed) if one was not prepared.
    func switchAuthorities(activate: [String], retire: [String], at: Date, requester: String) async throws(StoreError) -> Bool
    /// A value that changes whenever an authority's state or taint, or the bundle, changes (a
    /// few small reads: polled to notice `sigil ca` commands made outside the server).
    func authorityVersion() async throws(StoreError) -> String
    /// Records that an agent holds the bundle with `sequence` (never moves backwards).
    func confirmBundle(agentID: String, sequence: UInt64, at: Date) async throws(StoreError)
    /// Agents that could still serve workloads (not evicted, SVID unexpired at `now`) and have not
    /// confirmed the bundle with `sequence`: the readiness gate of a root rotation.
    func unconfirmedAgents(sequence: UInt64, now: Date) async throws(StoreError) -> [AgentRecord]
    /// Marks an authority tainted (agents re-issue what chains to it); false if unknown or removed.
    func taintAuthority(id: String, at: Date, requester: String) async throws(StoreError) -> Bool
    /// IDs of tainted authorities that are not removed.
    func taintedAuthorities() async throws(StoreError) -> [String]

    // MARK: nodes and entries

    /// Appends one event to the issuance log (attestation, refusals, entry changes).
    func recordEvent(_ event: IssuanceEvent) async throws(StoreError)

    /// Stores a join token by its SHA-256 (the token itself is never stored).
    func createJoinToken(hash: String, agentID: String, expiresAt: Date, at: Date) async throws(StoreError)

    /// Uses a join token: accepted once, then `used`; `expired` after its time; `unknown` otherwise.
    /// The outcome is recorded in the issuance log either way.
    func consumeJoinToken(hash: String, now: Date, requester: String) async throws(StoreError) -> JoinTokenOutcome

    /// Creates or replaces an agent.
    func upsertAgent(_ agent: AgentRecord) async throws(StoreError)
    func agent(id: String) async throws(StoreError) -> AgentRecord?
    func agents() async throws(StoreError) -> [AgentRecord]
    /// Marks an agent evicted; returns it, or nil if unknown.
    func evictAgent(id: String, at: Date) async throws(StoreError) -> AgentRecord?
    /// Whether the certificate with `serial` and SHA-256 fingerprint `sha256` (of its DER) was issued
    /// to `spiffeID` no earlier than `issuedSince` and is unexpired at `now`. (A row recorded before
    /// fingerprints were kept matches by serial alone.)
    func isLiveCertificate(serial: String, sha256: String, spiffeID: String, issuedSince: Date, now: Date) async throws(StoreError) -> Bool
    /// Records an agent's renewed SVID as its next one (it becomes current when the agent first
    /// uses it) unless the agent is (or just became) evicted; returns whether it did.
    func updateAgentSVID(id: String, serial: String, notAfter: Date, at: Date) async throws(StoreError) -> Bool
    /// Makes the agent's next SVID (`serial`) its current one; false unless `serial` is its next.
    func promoteAgentSVID(id: String, serial: String, at: Date) async throws(StoreError) -> Bool

    /// Creates an entry (assigning its revision); throws `.conflict` for a duplicate.
    func createEntry(_ entry: EntryRecord) async throws(StoreError) -> EntryRecord
    func deleteEntry(id: String, at: Date) async throws(StoreError) -> EntryRecord?
    func entry(id: String) async throws(StoreError) -> EntryRecord?
    /// The entries with these IDs (missing IDs are simply absent), in one read.
    func entries(ids: [String]) async throws(StoreError) -> [String: EntryRecord]
    /// Entries, optionally only those parented to `parentID`, oldest first.
    func entries(parentID: String?) async throws(StoreError) -> [EntryRecord]
}
