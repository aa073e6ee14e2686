#if canImport(FoundationEssentials)
public import FoundationEssentials
#else
public import Foundation
#endif

/// What the CA persists. SQLite (``SQLiteDatastore``) is the default; the protocol keeps room for a
/// PostgreSQL implementation for HA servers.
public protocol Datastore: Sendable {
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
}
