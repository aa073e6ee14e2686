import Foundation
public import SigilRPC

/// One X509-SVID as the Workload API hands it to a workload.
public struct WorkloadX509SVID: Sendable, Hashable {
    public let spiffeID: String
    /// DER certificates concatenated, leaf first (the Workload API's `x509_svid`).
    public let chainDER: [UInt8]
    /// The private key, PKCS#8 DER (the Workload API's `x509_svid_key`).
    public let keyPKCS8DER: [UInt8]
    /// The entry's hint (empty for none).
    public let hint: String

    public init(spiffeID: String, chainDER: [UInt8], keyPKCS8DER: [UInt8], hint: String = "") {
        self.spiffeID = spiffeID
        self.chainDER = chainDER
        self.keyPKCS8DER = keyPKCS8DER
        self.hint = hint
    }
}

/// The trust bundle of the agent's trust domain as the Workload API sends it.
public struct WorkloadBundle: Sendable, Hashable {
    public let trustDomain: String
    /// DER root certificates concatenated (the Workload API's `bundle` bytes).
    public let rootsDER: [UInt8]
    /// JWT signing keys as a JWK Set (JSON), `use: jwt-svid`.
    public let jwtKeysJSON: [UInt8]

    public init(trustDomain: String, rootsDER: [UInt8], jwtKeysJSON: [UInt8]) {
        self.trustDomain = trustDomain
        self.rootsDER = rootsDER
        self.jwtKeysJSON = jwtKeysJSON
    }
}

/// What one caller is entitled to right now: every SVID whose entry's selectors the caller matches,
/// and the bundle. `entitled` is whether the caller matches any entry at all: a caller that matches
/// none gets PermissionDenied, while one whose SVIDs are not minted yet (a new entry, or the last
/// one expired while the server was away) is kept waiting for them, as SPIRE's agent does.
public struct WorkloadX509Snapshot: Sendable, Hashable {
    public let svids: [WorkloadX509SVID]
    public let bundle: WorkloadBundle
    public let entitled: Bool

    /// `entitled` defaults to holding an SVID.
    public init(svids: [WorkloadX509SVID], bundle: WorkloadBundle, entitled: Bool? = nil) {
        self.svids = svids
        self.bundle = bundle
        self.entitled = entitled ?? !svids.isEmpty
    }
}

/// A signed JWT-SVID.
public struct WorkloadJWTSVID: Sendable, Hashable {
    public let spiffeID: String
    public let token: String
    public let hint: String

    public init(spiffeID: String, token: String, hint: String = "") {
        self.spiffeID = spiffeID
        self.token = token
        self.hint = hint
    }
}

/// The seam between the Workload API (transport, caller attestation) and the agent (entries,
/// keys, SVID cache, rotation). The Workload API asks with the caller's selectors, as produced by
/// the Unix attestor (`unix:uid:1000`, `unix:gid:1000`, `unix:user:web`, `unix:group:web`,
/// `unix:path:/usr/bin/web`); the agent matches them against its entries (an entry matches when
/// every one of its selectors is among the caller's).
public protocol WorkloadIdentitySource: Sendable {
    /// The caller's current X.509 state first, then a new snapshot every time it changes
    /// (rotation, entry added or removed, bundle change). The stream ends when the agent stops.
    func x509Snapshots(selectors: Set<String>) -> AsyncStream<WorkloadX509Snapshot>

    /// The bundle now, then on every change.
    func bundles() -> AsyncStream<WorkloadBundle>

    /// Signs a JWT-SVID for each of the caller's identities (or only `spiffeID` if given) for `audience`.
    func jwtSVIDs(selectors: Set<String>, spiffeID: String?, audience: [String]) async throws(WorkloadAPIError) -> [WorkloadJWTSVID]

    /// Validates a JWT-SVID against the JWT bundle and the audience; returns its SPIFFE ID and claims (JSON object).
    func validateJWTSVID(token: String, audience: String) async throws(WorkloadAPIError) -> (spiffeID: String, claimsJSON: [UInt8])
}
