import GRDB
public import Foundation

extension SQLiteDatastore {
    public func addAuthority(_ a: AuthorityRecord, at: Date, requester: String) async throws(StoreError) {
        try await addAuthorities([a], at: at, requester: requester)
    }

    public func addAuthorities(_ authorities: [AuthorityRecord], at: Date, requester: String) async throws(StoreError) {
        try await write { db in
            for a in authorities {
                try db.execute(sql: """
                    INSERT INTO authorities (id, kind, state, parent_id, not_before, not_after, fingerprint, certificate_pem, in_bundle, created_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """, arguments: [a.id, a.kind.rawValue, a.state.rawValue, a.parentID, a.notBefore.timeIntervalSince1970,
                                     a.notAfter.timeIntervalSince1970, a.fingerprint, a.certificatePEM, a.inBundle, a.createdAt.timeIntervalSince1970])
                if a.inBundle { try Self.bumpBundleSequence(db) }
                try Self.insertEvent(db, IssuanceEvent(at: at, kind: .authorityChanged, serial: nil, spiffeID: nil, authorityID: a.id, requester: requester,
                                                       detail: "\(a.kind.rawValue) \(a.state.rawValue)\(a.inBundle ? ", published in the bundle" : ""); valid until \(Self.iso(a.notAfter))"))
            }
        }
    }

    public func activateAuthority(id: String, at: Date, requester: String) async throws(StoreError) -> Bool {
        try await write { db in
            guard let kind = try String.fetchOne(db, sql: "SELECT kind FROM authorities WHERE id = ? AND state = 'prepared'", arguments: [id]) else {
                return false
            }
            let previous = try String.fetchAll(db, sql: "SELECT id FROM authorities WHERE kind = ? AND state = 'active'", arguments: [kind])
            try db.execute(sql: "UPDATE authorities SET state = 'old' WHERE kind = ? AND state = 'active'", arguments: [kind])
            try db.execute(sql: "UPDATE authorities SET state = 'active' WHERE id = ?", arguments: [id])
            for old in previous {
                try Self.insertEvent(db, IssuanceEvent(at: at, kind: .authorityChanged, serial: nil, spiffeID: nil, authorityID: old, requester: requester,
                                                       detail: "\(kind) old (replaced by \(id)); kept until its last SVID expires"))
            }
            try Self.insertEvent(db, IssuanceEvent(at: at, kind: .authorityChanged, serial: nil, spiffeID: nil, authorityID: id, requester: requester,
                                                   detail: "\(kind) active"))
            return true
        }
    }

    public func transitionAuthority(id: String, from: AuthorityState, to: AuthorityState, at: Date, requester: String, detail: String) async throws(StoreError) -> Bool {
        try await write { db in
            guard let row = try Row.fetchOne(db, sql: "SELECT kind, in_bundle FROM authorities WHERE id = ? AND state = ?", arguments: [id, from.rawValue]) else {
                return false
            }
            try db.execute(sql: "UPDATE authorities SET state = ? WHERE id = ?", arguments: [to.rawValue, id])
            if row["in_bundle"] as Bool, to == .removed || from == .removed { try Self.bumpBundleSequence(db) }
            try Self.insertEvent(db, IssuanceEvent(at: at, kind: .authorityChanged, serial: nil, spiffeID: nil, authorityID: id, requester: requester,
                                                   detail: "\(row["kind"] as String) \(to.rawValue)\(detail.isEmpty ? "" : ": " + detail)"))
            return true
        }
    }

    public func authorityUsage(now: Date, inService: Bool) async throws(StoreError) -> [String: AuthorityUsage] {
        try await read { db in
            var out: [String: AuthorityUsage] = [:]
            guard inService else {
                // The last expiry alone: answered by the (authority_id, not_after) index.
                for row in try Row.fetchAll(db, sql: "SELECT authority_id, MAX(not_after) AS last FROM issued_certificates GROUP BY authority_id") {
                    out[row["authority_id"]] = AuthorityUsage(live: 0, lastExpiry: (row["last"] as Double?).map { Date(timeIntervalSince1970: $0) })
                }
                return out
            }
            // In service: unexpired, and the newest issued to its holder (SPIFFE ID and requester):
            // an SVID re-issued (a renewal, a taint) is no longer served. The last expiry counts every SVID.
            for row in try Row.fetchAll(db, sql: """
                SELECT authority_id, SUM(not_after > ? AND newest = 1) AS live, MAX(not_after) AS last FROM (
                    SELECT authority_id, not_after,
                           ROW_NUMBER() OVER (PARTITION BY spiffe_id, requester ORDER BY issued_at DESC, rowid DESC) AS newest
                    FROM issued_certificates)
                GROUP BY authority_id
                """, arguments: [now.timeIntervalSince1970]) {
                out[row["authority_id"]] = AuthorityUsage(live: row["live"] ?? 0, lastExpiry: (row["last"] as Double?).map { Date(timeIntervalSince1970: $0) })
            }
            return out
        }
    }

    public func switchAuthorities(activate: [String], retire: [String], at: Date, requester: String) async throws(StoreError) -> Bool {
        try await write { db in
            for id in activate {
                guard try String.fetchOne(db, sql: "SELECT state FROM authorities WHERE id = ?", arguments: [id]) == "prepared" else { return false }
            }
            for id in retire {
                try db.execute(sql: "UPDATE authorities SET state = 'old' WHERE id = ? AND state = 'active'", arguments: [id])
                if db.changesCount > 0 {
                    try Self.insertEvent(db, IssuanceEvent(at: at, kind: .authorityChanged, serial: nil, spiffeID: nil, authorityID: id, requester: requester,
                                                           detail: "\(try Self.kind(db, id)) old; kept until nothing it signed is in service"))
                }
            }
            for id in activate {
                try db.execute(sql: "UPDATE authorities SET state = 'active' WHERE id = ?", arguments: [id])
                try Self.insertEvent(db, IssuanceEvent(at: at, kind: .authorityChanged, serial: nil, spiffeID: nil, authorityID: id, requester: requester,
                                                       detail: "\(try Self.kind(db, id)) active"))
            }
            return true
        }
    }

    static func kind(_ db: Database, _ id: String) throws -> String {
        try String.fetchOne(db, sql: "SELECT kind FROM authorities WHERE id = ?", arguments: [id]) ?? "authority"
    }

    public func authorityVersion() async throws(StoreError) -> String {
        try await read { db in
            try String.fetchOne(db, sql: """
                SELECT (SELECT value FROM meta WHERE key = 'bundle_sequence') || ':' ||
                       IFNULL((SELECT group_concat(id || state || IFNULL(tainted_at, ''), ',') FROM authorities), '')
                """) ?? ""
        }
    }

    public func confirmBundle(agentID: String, sequence: UInt64, at: Date) async throws(StoreError) {
        try await write { db in
            try db.execute(sql: """
                UPDATE agents SET bundle_sequence = ?, bundle_confirmed_at = ? WHERE id = ? AND bundle_sequence < ?
                """, arguments: [Int64(sequence), at.timeIntervalSince1970, agentID, Int64(sequence)])
        }
    }

    public func unconfirmedAgents(sequence: UInt64, now: Date) async throws(StoreError) -> [AgentRecord] {
        try await read { db in
            try Row.fetchAll(db, sql: """
                SELECT * FROM agents WHERE evicted = 0 AND not_after > ? AND bundle_sequence < ? ORDER BY id
                """, arguments: [now.timeIntervalSince1970, Int64(sequence)]).map(Self.agentRecord)
        }
    }

    public func taintAuthority(id: String, at: Date, requester: String) async throws(StoreError) -> Bool {
        try await write { db in
            guard let kind = try String.fetchOne(db, sql: "SELECT kind FROM authorities WHERE id = ? AND state != 'removed'", arguments: [id]) else {
                return false
            }
            try db.execute(sql: "UPDATE authorities SET tainted_at = COALESCE(tainted_at, ?) WHERE id = ?", arguments: [at.timeIntervalSince1970, id])
            try Self.insertEvent(db, IssuanceEvent(at: at, kind: .authorityChanged, serial: nil, spiffeID: nil, authorityID: id, requester: requester,
                                                   detail: "\(kind) tainted: agents re-issue every SVID that chains to it"))
            return true
        }
    }

    public func taintedAuthorities() async throws(StoreError) -> [String] {
        try await read { db in
            try String.fetchAll(db, sql: "SELECT id FROM authorities WHERE tainted_at IS NOT NULL AND state != 'removed' ORDER BY id")
        }
    }

    static func bumpBundleSequence(_ db: Database) throws {
        try db.execute(sql: "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'bundle_sequence'")
    }

    static func iso(_ date: Date) -> String {
        RFC3339Text.format(date)
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for event details.
enum RFC3339Text {
    static func format(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.string(from: date)
    }
}
