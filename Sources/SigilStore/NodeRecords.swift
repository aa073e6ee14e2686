#if canImport(FoundationEssentials)
public import FoundationEssentials
#else
public import Foundation
#endif

/// A registration entry: which workload (selectors) on which node (parent agent) gets which ID.
public struct EntryRecord: Sendable, Hashable, Codable {
    public var id: String
    public var spiffeID: String
    /// The SPIFFE ID of the agent the entry is parented to.
    public var parentID: String
    /// Sorted, e.g. `["unix:uid:1000"]`.
    public var selectors: [String]
    public var ttlSeconds: Int64
    public var dnsNames: [String]
    /// The store-wide entries revision at which this entry was written.
    public var revision: Int64
    public var createdAt: Date

    public init(id: String, spiffeID: String, parentID: String, selectors: [String], ttlSeconds: Int64, dnsNames: [String], revision: Int64 = 0, createdAt: Date) {
        self.id = id
        self.spiffeID = spiffeID
        self.parentID = parentID
        self.selectors = selectors.sorted()
        self.ttlSeconds = ttlSeconds
        self.dnsNames = dnsNames
        self.revision = revision
        self.createdAt = createdAt
    }
}

/// An attested node agent.
public struct AgentRecord: Sendable, Hashable, Codable {
    public var id: String
    /// Serial of the agent's newest SVID.
    public var serial: String
    public var notAfter: Date
    public var attestedAt: Date
    public var evicted: Bool
    public var lastSeen: Date
    /// The trust bundle sequence the agent last confirmed holding (0: none yet).
    public var bundleSequence: UInt64
    /// Serial of a renewed SVID the agent has not used yet (it then replaces ``serial``).
    public var nextSerial: String?

    public init(id: String, serial: String, notAfter: Date, attestedAt: Date, evicted: Bool = false, lastSeen: Date, bundleSequence: UInt64 = 0) {
        self.id = id
        self.serial = serial
        self.notAfter = notAfter
        self.attestedAt = attestedAt
        self.evicted = evicted
        self.lastSeen = lastSeen
        self.bundleSequence = bundleSequence
    }
}

/// Why a join token was refused.
public enum JoinTokenRefusal: String, Sendable, Hashable {
    case unknown, used, expired
}

/// The outcome of presenting a join token.
public enum JoinTokenOutcome: Sendable, Hashable {
    case accepted(agentID: String)
    case refused(JoinTokenRefusal)
}
