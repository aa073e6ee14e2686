#if canImport(FoundationEssentials)
public import FoundationEssentials
#else
public import Foundation
#endif

/// What part an authority plays in the trust chain.
public enum AuthorityKind: String, Sendable, Codable, CaseIterable {
    /// A self-signed root made by `sigil ca init`; in the trust bundle.
    case root
    /// An intermediate signing CA whose key Sigil holds; signs SVIDs.
    case intermediate
    /// A certificate of an upstream (corporate) CA that Sigil chains to; Sigil holds no key for it.
    case upstream
}

/// Where an authority is in its life (see docs/operations.md): prepared → active → old → removed.
public enum AuthorityState: String, Sendable, Codable, CaseIterable {
    /// Published in the bundle, not yet signing.
    case prepared
    /// Signing (intermediates) or trusted as the current root.
    case active
    /// Still published until every SVID it signed has expired.
    case old
    /// No longer published.
    case removed
}

/// A CA certificate Sigil knows about.
public struct AuthorityRecord: Sendable, Hashable, Codable {
    /// The hex subject key identifier: stable, and what `sigil ca status` shows.
    public var id: String
    public var kind: AuthorityKind
    public var state: AuthorityState
    /// The authority that signed this one, or nil for a root or an upstream certificate.
    public var parentID: String?
    public var notBefore: Date
    public var notAfter: Date
    /// SHA-256 of the DER certificate, lowercase hex.
    public var fingerprint: String
    public var certificatePEM: String
    /// Whether this authority's certificate belongs in the trust bundle (roots and upstream roots).
    public var inBundle: Bool
    public var createdAt: Date

    public init(id: String, kind: AuthorityKind, state: AuthorityState, parentID: String?, notBefore: Date, notAfter: Date, fingerprint: String, certificatePEM: String, inBundle: Bool, createdAt: Date) {
        self.id = id
        self.kind = kind
        self.state = state
        self.parentID = parentID
        self.notBefore = notBefore
        self.notAfter = notAfter
        self.fingerprint = fingerprint
        self.certificatePEM = certificatePEM
        self.inBundle = inBundle
        self.createdAt = createdAt
    }
}

/// A certificate Sigil issued.
public struct IssuedCertificate: Sendable, Hashable, Codable {
    /// Serial number, lowercase hex; unique across the store.
    public var serial: String
    public var spiffeID: String
    public var authorityID: String
    public var notBefore: Date
    public var notAfter: Date
    public var issuedAt: Date
    /// Who asked: `cli:uid:0`, `agent:spiffe://...`.
    public var requester: String
    /// SHA-256 of the certificate's DER, lowercase hex (nil for rows from before it was kept).
    public var sha256: String?

    public init(serial: String, spiffeID: String, authorityID: String, notBefore: Date, notAfter: Date, issuedAt: Date, requester: String,
                sha256: String? = nil) {
        self.sha256 = sha256
        self.serial = serial
        self.spiffeID = spiffeID
        self.authorityID = authorityID
        self.notBefore = notBefore
        self.notAfter = notAfter
        self.issuedAt = issuedAt
        self.requester = requester
    }
}

/// One row of the append-only issuance log.
public struct IssuanceEvent: Sendable, Hashable, Codable {
    public enum Kind: String, Sendable, Codable {
        case caInitialized = "ca_initialized"
        case issued
        case refused
        case joinTokenCreated = "join_token_created"
        case joinTokenRefused = "join_token_refused"
        case agentAttested = "agent_attested"
        case agentEvicted = "agent_evicted"
        case entryCreated = "entry_created"
        case entryDeleted = "entry_deleted"
        /// An authority changed state (prepared, active, old, removed); the detail says which.
        case authorityChanged = "authority_changed"
    }
    public var sequence: Int64
    public var at: Date
    public var kind: Kind
    public var serial: String?
    public var spiffeID: String?
    public var authorityID: String?
    public var requester: String
    public var detail: String

    public init(sequence: Int64 = 0, at: Date, kind: Kind, serial: String?, spiffeID: String?, authorityID: String?, requester: String, detail: String) {
        self.sequence = sequence
        self.at = at
        self.kind = kind
        self.serial = serial
        self.spiffeID = spiffeID
        self.authorityID = authorityID
        self.requester = requester
        self.detail = detail
    }
}

/// How an authority's SVIDs stand at one instant (for rotation and `sigil ca status`).
public struct AuthorityUsage: Sendable, Hashable {
    /// SVIDs it signed that are in service: unexpired and not since replaced by a newer SVID for
    /// the same holder (SPIFFE ID and requester).
    public var live: Int
    /// When the last SVID it signed expires (nil: it signed none).
    public var lastExpiry: Date?

    public init(live: Int, lastExpiry: Date?) {
        self.live = live
        self.lastExpiry = lastExpiry
    }
}
