import GRDB
public import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The embedded datastore: one SQLite file in WAL mode, schema by versioned migrations.
public final class SQLiteDatastore: Datastore {
    private let writer: any DatabaseWriter
    public let path: String

    /// Opens (creating if needed) the database at `path`, file mode 0600, and migrates it.
    public init(path: String) throws(StoreError) {
        self.path = path
        let directory = (path as NSString).deletingLastPathComponent
        var isDirectory: ObjCBool = false
        if !directory.isEmpty, !FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory) || !isDirectory.boolValue {
            throw StoreError(.cannotOpen, "cannot open the database: directory '\(directory)' does not exist or is not a directory")
        }
        let existed = FileManager.default.fileExists(atPath: path)
        // A database this user may read but not write (an auditor's read-only copy): opened
        // read-only, for the commands that only read (status, bundle, audit); writes fail.
        if existed, access(path, W_OK) != 0, access(path, R_OK) == 0 {
            do {
                var config = Configuration()
                config.readonly = true
                config.busyMode = .timeout(10)
                // A copy in WAL mode whose directory this user cannot write (no -shm can be made)
                // opens only as immutable: nothing else may be writing it, which holds for a copy.
                func open(_ name: String) throws -> DatabaseQueue {
                    let queue = try DatabaseQueue(path: name, configuration: config)
                    _ = try queue.read { try Int.fetchOne($0, sql: "SELECT count(*) FROM sqlite_master") }
                    return queue
                }
                let queue: DatabaseQueue
                if let plain = try? open(path) {
                    queue = plain
                } else if FileManager.default.fileExists(atPath: path + "-wal") {
                    // Immutable would ignore the -wal file, and with it the newest rows.
                    throw StoreError(.cannotOpen, "the read-only database at '\(path)' has a -wal file that cannot be read without write access to its directory; make a single-file copy with `sqlite3 \(path) \".backup copy.db\"`, or let this user write the directory")
                } else {
                    queue = try open("file:" + path + "?immutable=1")
                }
                guard try queue.read({ try SQLiteDatastore.migrator.hasCompletedMigrations($0) }) else {
                    throw StoreError(.cannotOpen, "the database at '\(path)' is read-only and from an older version of Sigil; open it once with write access to upgrade it")
                }
                self.writer = queue
                return
            } catch let error as StoreError {
                throw error
            } catch {
                throw StoreError(.cannotOpen, "cannot open the read-only database at '\(path)': \(SQLiteDatastore.describe(error))")
            }
        }
        do {
            var config = Configuration()
            config.foreignKeysEnabled = true
            config.busyMode = .timeout(10)
            let pool = try DatabasePool(path: path, configuration: config)
            if !existed { chmod(path, 0o600) }
            try SQLiteDatastore.migrator.migrate(pool)
            self.writer = pool
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError(.cannotOpen, "cannot open the database at '\(path)': \(SQLiteDatastore.describe(error))")
        }
    }

    /// An in-memory store for unit tests.
    public init(inMemory: Void = ()) throws(StoreError) {
        self.path = ":memory:"
        do {
            var config = Configuration()
            config.foreignKeysEnabled = true
            let queue = try DatabaseQueue(configuration: config)
            try SQLiteDatastore.migrator.migrate(queue)
            self.writer = queue
        } catch {
            throw StoreError(.cannotOpen, "cannot open an in-memory database: \(SQLiteDatastore.describe(error))")
        }
    }

    /// The schema, one migration per version. Never edit a shipped migration: add a new one.
    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.create(table: "meta") { t in
                t.primaryKey("key", .text)
                t.column("value", .text).notNull()
            }
            try db.create(table: "authorities") { t in
                t.primaryKey("id", .text)
                t.column("kind", .text).notNull().check { ["root", "intermediate", "upstream"].contains($0) }
                t.column("state", .text).notNull().check { ["prepared", "active", "old", "removed"].contains($0) }
                t.column("parent_id", .text).references("authorities")
                t.column("not_before", .double).notNull()
                t.column("not_after", .double).notNull()
                t.column("fingerprint", .text).notNull().unique()
                t.column("certificate_pem", .text).notNull()
                t.column("in_bundle", .boolean).notNull()
                t.column("created_at", .double).notNull()
            }
            try db.create(table: "issued_certificates") { t in
                t.primaryKey("serial", .text)
                t.column("spiffe_id", .text).notNull().indexed()
                t.column("authority_id", .text).notNull().references("authorities")
                t.column("not_before", .double).notNull()
                t.column("not_after", .double).notNull()
                t.column("issued_at", .double).notNull()
                t.column("requester", .text).notNull()
            }
            // One index answers both "how many did this authority sign" and "which of its SVIDs are still live".
            try db.create(index: "issued_certificates_by_authority_expiry", on: "issued_certificates", columns: ["authority_id", "not_after"])
            try db.create(table: "issuance_log") { t in
                t.autoIncrementedPrimaryKey("seq")
                // Ordered by seq, which follows time: no separate index on `at`.
                t.column("at", .double).notNull()
                t.column("event", .text).notNull()
                t.column("serial", .text)
                t.column("spiffe_id", .text)
                t.column("authority_id", .text)
                t.column("requester", .text).notNull()
                t.column("detail", .text).notNull()
            }
            // The log is append-only: the database itself refuses edits and deletions.
            try db.execute(sql: """
                CREATE TRIGGER issuance_log_no_update BEFORE UPDATE ON issuance_log
                BEGIN SELECT RAISE(ABORT, 'issuance_log is append-only'); END;
                CREATE TRIGGER issuance_log_no_delete BEFORE DELETE ON issuance_log
                BEGIN SELECT RAISE(ABORT, 'issuance_log is append-only'); END;
                CREATE TRIGGER issued_certificates_no_update BEFORE UPDATE ON issued_certificates
                BEGIN SELECT RAISE(ABORT, 'issued_certificates rows are immutable'); END;
                CREATE TRIGGER issued_certificates_no_delete BEFORE DELETE ON issued_certificates
                BEGIN SELECT RAISE(ABORT, 'issued_certificates rows are immutable'); END;
                """)
        }
        migrator.registerMigration("v2-nodes") { db in
            try db.create(table: "join_tokens") { t in
                t.primaryKey("token_hash", .text)
                t.column("agent_id", .text).notNull()
                t.column("expires_at", .double).notNull()
                t.column("created_at", .double).notNull()
                t.column("used_at", .double)
            }
            try db.create(table: "agents") { t in
                t.primaryKey("id", .text)
                t.column("serial", .text).notNull()
                t.column("not_after", .double).notNull()
                t.column("attested_at", .double).notNull()
                t.column("evicted", .boolean).notNull().defaults(to: false)
                t.column("last_seen", .double).notNull()
            }
            try db.create(table: "entries") { t in
                t.primaryKey("id", .text)
                t.column("spiffe_id", .text).notNull()
                t.column("parent_id", .text).notNull().indexed()
                t.column("selectors", .text).notNull()
                t.column("ttl_seconds", .integer).notNull()
                t.column("dns_names", .text).notNull()
                t.column("revision", .integer).notNull()
                t.column("created_at", .double).notNull()
                t.uniqueKey(["spiffe_id", "parent_id", "selectors"])
            }
            try db.execute(sql: "INSERT OR IGNORE INTO meta (key, value) VALUES ('entries_revision', '0')")
        }
        migrator.registerMigration("v3-ledger") { db in try SQLiteDatastore.migrateLedger(db) }
        migrator.registerMigration("v4-ledger-checkpoints") { db in try SQLiteDatastore.migrateLedgerCheckpoints(db) }
        migrator.registerMigration("v5-rotation") { db in
            try db.alter(table: "agents") { t in
                t.add(column: "bundle_sequence", .integer).notNull().defaults(to: 0)
                t.add(column: "bundle_confirmed_at", .double)
            }
            try db.alter(table: "authorities") { t in t.add(column: "tainted_at", .double) }
            // SVIDs in service (the newest per holder) for `sigil ca status`, retire and revoke.
            try db.create(index: "issued_certificates_by_holder", on: "issued_certificates", columns: ["spiffe_id", "requester", "issued_at"])
        }
        migrator.registerMigration("v6-certificate-binding") { db in
            // A caller is its exact certificate (SHA-256 of the DER), not a serial anyone can read
            // and a stolen signing key could reuse. Rows from before this have none.
            try db.alter(table: "issued_certificates") { t in t.add(column: "sha256", .text) }
            // An agent's renewed SVID waits here until the agent first uses it (then it becomes
            // `serial`): only the current and that next SVID authenticate the agent.
            try db.alter(table: "agents") { t in
                t.add(column: "next_serial", .text)
                t.add(column: "next_not_after", .double)
            }
        }
        return migrator
    }

    public func trustDomain() async throws(StoreError) -> String? {
        try await read { db in try String.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'trust_domain'") }
    }

    public func initialize(trustDomain: String, authorities: [AuthorityRecord], at: Date) async throws(StoreError) {
        try await write { db in
            if let existing = try String.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'trust_domain'") {
                throw StoreError(.alreadyInitialized, "this store already holds a CA for trust domain '\(existing)'")
            }
            try db.execute(sql: "INSERT INTO meta (key, value) VALUES ('trust_domain', ?), ('bundle_sequence', '1')", arguments: [trustDomain])
            for a in authorities {
                try db.execute(sql: """
                    INSERT INTO authorities (id, kind, state, parent_id, not_before, not_after, fingerprint, certificate_pem, in_bundle, created_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """, arguments: [a.id, a.kind.rawValue, a.state.rawValue, a.parentID, a.notBefore.timeIntervalSince1970,
                                     a.notAfter.timeIntervalSince1970, a.fingerprint, a.certificatePEM, a.inBundle, a.createdAt.timeIntervalSince1970])
            }
            try Self.insertEvents(db, [IssuanceEvent(at: at, kind: .caInitialized, serial: nil, spiffeID: "spiffe://" + trustDomain, authorityID: nil,
                                                     requester: "cli", detail: authorities.map { "\($0.kind.rawValue) \($0.id)" }.joined(separator: ", "))])
        }
    }

    public func authorities() async throws(StoreError) -> [AuthorityRecord] {
        try await read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM authorities ORDER BY created_at, rowid").map { row throws(StoreError) in
                guard let kind = AuthorityKind(rawValue: row["kind"]), let state = AuthorityState(rawValue: row["state"]) else {
                    throw StoreError(.corrupt, "authority \(row["id"] as String? ?? "?") has an unknown kind or state")
                }
                return AuthorityRecord(
                    id: row["id"], kind: kind, state: state, parentID: row["parent_id"],
                    notBefore: Date(timeIntervalSince1970: row["not_before"]), notAfter: Date(timeIntervalSince1970: row["not_after"]),
                    fingerprint: row["fingerprint"], certificatePEM: row["certificate_pem"], inBundle: row["in_bundle"],
                    createdAt: Date(timeIntervalSince1970: row["created_at"]))
            }
        }
    }

    public func recordIssued(_ certificates: [IssuedCertificate]) async throws(StoreError) {
        guard !certificates.isEmpty else { return }
        try await write { db in
            let insertCert = try db.cachedStatement(sql: """
                INSERT INTO issued_certificates (serial, spiffe_id, authority_id, not_before, not_after, issued_at, requester, sha256)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """)
            var events: [IssuanceEvent] = []
            events.reserveCapacity(certificates.count)
            for c in certificates {
                do {
                    try insertCert.execute(arguments: [c.serial, c.spiffeID, c.authorityID, c.notBefore.timeIntervalSince1970,
                                                       c.notAfter.timeIntervalSince1970, c.issuedAt.timeIntervalSince1970, c.requester, c.sha256])
                } catch let error as DatabaseError where error.extendedResultCode == .SQLITE_CONSTRAINT_PRIMARYKEY {
                    throw StoreError(.duplicateSerial, "serial \(c.serial) was already issued; nothing from this batch was stored")
                } catch let error as DatabaseError where error.extendedResultCode == .SQLITE_CONSTRAINT_FOREIGNKEY {
                    throw StoreError(.conflict, "authority \(c.authorityID) is unknown to this store")
                }
                let ttl = Int((c.notAfter.timeIntervalSince1970 - c.notBefore.timeIntervalSince1970).rounded())
                events.append(IssuanceEvent(at: c.issuedAt, kind: .issued, serial: c.serial, spiffeID: c.spiffeID, authorityID: c.authorityID,
                                            requester: c.requester, detail: "validity \(ttl)s"))
            }
            try Self.insertEvents(db, events)
        }
    }

    public func issuedCounts() async throws(StoreError) -> [String: Int] {
        try await read { db in
            var counts: [String: Int] = [:]
            for row in try Row.fetchAll(db, sql: "SELECT authority_id, COUNT(*) AS n FROM issued_certificates GROUP BY authority_id") {
                counts[row["authority_id"]] = row["n"]
            }
            return counts
        }
    }

    public func issuedCertificates(limit: Int) async throws(StoreError) -> [IssuedCertificate] {
        try await read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM issued_certificates ORDER BY issued_at DESC, serial LIMIT ?", arguments: [limit]).map { row in
                IssuedCertificate(
                    serial: row["serial"], spiffeID: row["spiffe_id"], authorityID: row["authority_id"],
                    notBefore: Date(timeIntervalSince1970: row["not_before"]), notAfter: Date(timeIntervalSince1970: row["not_after"]),
                    issuedAt: Date(timeIntervalSince1970: row["issued_at"]), requester: row["requester"], sha256: row["sha256"])
            }
        }
    }

    public func issuanceLog(after: Int64, limit: Int) async throws(StoreError) -> [IssuanceEvent] {
        try await read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM issuance_log WHERE seq > ? ORDER BY seq LIMIT ?", arguments: [after, limit]).map { row throws(StoreError) in
                guard let kind = IssuanceEvent.Kind(rawValue: row["event"]) else {
                    throw StoreError(.corrupt, "issuance log row \(row["seq"] as Int64? ?? 0) has an unknown event")
                }
                return IssuanceEvent(
                    sequence: row["seq"], at: Date(timeIntervalSince1970: row["at"]), kind: kind, serial: row["serial"],
                    spiffeID: row["spiffe_id"], authorityID: row["authority_id"], requester: row["requester"], detail: row["detail"])
            }
        }
    }

    public func bundleSequence() async throws(StoreError) -> UInt64 {
        try await read { db in
            UInt64(try String.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'bundle_sequence'") ?? "0") ?? 0
        }
    }

    // MARK: - nodes and entries

    public func recordEvent(_ event: IssuanceEvent) async throws(StoreError) {
        try await write { db in try Self.insertEvent(db, event) }
    }

    static func insertEvent(_ db: Database, _ e: IssuanceEvent) throws {
        try insertEvents(db, [e])
    }

    public func createJoinToken(hash: String, agentID: String, expiresAt: Date, at: Date) async throws(StoreError) {
        try await write { db in
            try db.execute(sql: "INSERT INTO join_tokens (token_hash, agent_id, expires_at, created_at) VALUES (?, ?, ?, ?)",
                           arguments: [hash, agentID, expiresAt.timeIntervalSince1970, at.timeIntervalSince1970])
            try Self.insertEvent(db, IssuanceEvent(at: at, kind: .joinTokenCreated, serial: nil, spiffeID: agentID, authorityID: nil,
                                                   requester: "admin", detail: "expires \(Int(expiresAt.timeIntervalSince1970))"))
        }
    }

    public func consumeJoinToken(hash: String, now: Date, requester: String) async throws(StoreError) -> JoinTokenOutcome {
        try await write { db in
            let row = try Row.fetchOne(db, sql: "SELECT agent_id, expires_at, used_at FROM join_tokens WHERE token_hash = ?", arguments: [hash])
            let outcome: JoinTokenOutcome
            if let row {
                if (row["used_at"] as Double?) != nil {
                    outcome = .refused(.used)
                } else if (row["expires_at"] as Double) <= now.timeIntervalSince1970 {
                    outcome = .refused(.expired)
                } else {
                    // Single use: the UPDATE is in the same transaction as the read.
                    try db.execute(sql: "UPDATE join_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL",
                                   arguments: [now.timeIntervalSince1970, hash])
                    outcome = db.changesCount == 1 ? .accepted(agentID: row["agent_id"]) : .refused(.used)
                }
            } else {
                outcome = .refused(.unknown)
            }
            switch outcome {
            case .accepted(let agentID):
                try Self.insertEvent(db, IssuanceEvent(at: now, kind: .agentAttested, serial: nil, spiffeID: agentID, authorityID: nil, requester: requester, detail: "join token accepted"))
            case .refused(let reason):
                try Self.insertEvent(db, IssuanceEvent(at: now, kind: .joinTokenRefused, serial: nil, spiffeID: row?["agent_id"], authorityID: nil, requester: requester, detail: "join token \(reason.rawValue)"))
            }
            return outcome
        }
    }

    public func upsertAgent(_ a: AgentRecord) async throws(StoreError) {
        try await write { db in
            try db.execute(sql: """
                INSERT INTO agents (id, serial, not_after, attested_at, evicted, last_seen) VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT(id) DO UPDATE SET serial = excluded.serial, not_after = excluded.not_after,
                    attested_at = excluded.attested_at, evicted = excluded.evicted, last_seen = excluded.last_seen,
                    next_serial = NULL, next_not_after = NULL
                """, arguments: [a.id, a.serial, a.notAfter.timeIntervalSince1970, a.attestedAt.timeIntervalSince1970, a.evicted, a.lastSeen.timeIntervalSince1970])
        }
    }

    static func agentRecord(_ row: Row) -> AgentRecord {
        var record = AgentRecord(id: row["id"], serial: row["serial"], notAfter: Date(timeIntervalSince1970: row["not_after"]),
                                 attestedAt: Date(timeIntervalSince1970: row["attested_at"]), evicted: row["evicted"],
                                 lastSeen: Date(timeIntervalSince1970: row["last_seen"]), bundleSequence: UInt64((row["bundle_sequence"] as Int64?) ?? 0))
        record.nextSerial = row["next_serial"]
        return record
    }

    public func agent(id: String) async throws(StoreError) -> AgentRecord? {
        try await read { db in try Row.fetchOne(db, sql: "SELECT * FROM agents WHERE id = ?", arguments: [id]).map(Self.agentRecord) }
    }

    public func agents() async throws(StoreError) -> [AgentRecord] {
        try await read { db in try Row.fetchAll(db, sql: "SELECT * FROM agents ORDER BY id").map(Self.agentRecord) }
    }

    public func evictAgent(id: String, at: Date) async throws(StoreError) -> AgentRecord? {
        try await write { db in
            try db.execute(sql: "UPDATE agents SET evicted = 1 WHERE id = ?", arguments: [id])
            guard db.changesCount == 1 else { return nil }
            try Self.insertEvent(db, IssuanceEvent(at: at, kind: .agentEvicted, serial: nil, spiffeID: id, authorityID: nil, requester: "admin", detail: "evicted"))
            return try Row.fetchOne(db, sql: "SELECT * FROM agents WHERE id = ?", arguments: [id]).map(Self.agentRecord)
        }
    }

    public func isLiveCertificate(serial: String, sha256: String, spiffeID: String, issuedSince: Date, now: Date) async throws(StoreError) -> Bool {
        try await read { db in
            try Bool.fetchOne(db, sql: """
                SELECT 1 FROM issued_certificates WHERE serial = ? AND spiffe_id = ? AND not_after > ? AND issued_at >= ?
                    AND (sha256 IS NULL OR sha256 = ?)
                """, arguments: [serial, spiffeID, now.timeIntervalSince1970, issuedSince.timeIntervalSince1970, sha256]) ?? false
        }
    }

    public func updateAgentSVID(id: String, serial: String, notAfter: Date, at: Date) async throws(StoreError) -> Bool {
        try await write { db in
            try db.execute(sql: "UPDATE agents SET next_serial = ?, next_not_after = ?, last_seen = ? WHERE id = ? AND evicted = 0",
                           arguments: [serial, notAfter.timeIntervalSince1970, at.timeIntervalSince1970, id])
            return db.changesCount == 1
        }
    }

    public func promoteAgentSVID(id: String, serial: String, at: Date) async throws(StoreError) -> Bool {
        try await write { db in
            try db.execute(sql: """
                UPDATE agents SET serial = next_serial, not_after = next_not_after, next_serial = NULL, next_not_after = NULL,
                    last_seen = ? WHERE id = ? AND evicted = 0 AND next_serial = ?
                """, arguments: [at.timeIntervalSince1970, id, serial])
            return db.changesCount == 1
        }
    }

    static func entryRecord(_ row: Row) -> EntryRecord {
        let selectors: String = row["selectors"]
        let dns: String = row["dns_names"]
        return EntryRecord(id: row["id"], spiffeID: row["spiffe_id"], parentID: row["parent_id"],
                           selectors: selectors.split(separator: "\n").map(String.init), ttlSeconds: row["ttl_seconds"],
                           dnsNames: dns.split(separator: "\n").map(String.init), revision: row["revision"],
                           createdAt: Date(timeIntervalSince1970: row["created_at"]))
    }

    public func createEntry(_ entry: EntryRecord) async throws(StoreError) -> EntryRecord {
        try await write { db in
            let revision = (Int64(try String.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'entries_revision'") ?? "0") ?? 0) + 1
            var stored = entry
            stored.revision = revision
            do {
                try db.execute(sql: """
                    INSERT INTO entries (id, spiffe_id, parent_id, selectors, ttl_seconds, dns_names, revision, created_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                    """, arguments: [stored.id, stored.spiffeID, stored.parentID, stored.selectors.joined(separator: "\n"), stored.ttlSeconds,
                                     stored.dnsNames.joined(separator: "\n"), revision, stored.createdAt.timeIntervalSince1970])
            } catch let error as DatabaseError where error.resultCode == .SQLITE_CONSTRAINT {
                throw StoreError(.conflict, "an entry for \(entry.spiffeID) under \(entry.parentID) with selectors \(entry.selectors.joined(separator: ",")) already exists")
            }
            try db.execute(sql: "UPDATE meta SET value = ? WHERE key = 'entries_revision'", arguments: [String(revision)])
            try Self.insertEvent(db, IssuanceEvent(at: stored.createdAt, kind: .entryCreated, serial: nil, spiffeID: stored.spiffeID, authorityID: nil,
                                                   requester: "admin", detail: "entry \(stored.id) parent \(stored.parentID) selectors \(stored.selectors.joined(separator: ","))"))
            return stored
        }
    }

    public func deleteEntry(id: String, at: Date) async throws(StoreError) -> EntryRecord? {
        try await write { db in
            guard let existing = try Row.fetchOne(db, sql: "SELECT * FROM entries WHERE id = ?", arguments: [id]).map(Self.entryRecord) else { return nil }
            try db.execute(sql: "DELETE FROM entries WHERE id = ?", arguments: [id])
            let revision = (Int64(try String.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'entries_revision'") ?? "0") ?? 0) + 1
            try db.execute(sql: "UPDATE meta SET value = ? WHERE key = 'entries_revision'", arguments: [String(revision)])
            try Self.insertEvent(db, IssuanceEvent(at: at, kind: .entryDeleted, serial: nil, spiffeID: existing.spiffeID, authorityID: nil,
                                                   requester: "admin", detail: "entry \(id)"))
            return existing
        }
    }

    public func entry(id: String) async throws(StoreError) -> EntryRecord? {
        try await read { db in try Row.fetchOne(db, sql: "SELECT * FROM entries WHERE id = ?", arguments: [id]).map(Self.entryRecord) }
    }

    public func entries(ids: [String]) async throws(StoreError) -> [String: EntryRecord] {
        guard !ids.isEmpty else { return [:] }
        return try await read { db in
            var out: [String: EntryRecord] = [:]
            let unique = Array(Set(ids))
            for start in stride(from: 0, to: unique.count, by: 500) {
                let chunk = Array(unique[start..<min(start + 500, unique.count)])
                let marks = Array(repeating: "?", count: chunk.count).joined(separator: ",")
                for row in try Row.fetchAll(db, sql: "SELECT * FROM entries WHERE id IN (\(marks))", arguments: StatementArguments(chunk)) {
                    let entry = Self.entryRecord(row)
                    out[entry.id] = entry
                }
            }
            return out
        }
    }

    public func entries(parentID: String?) async throws(StoreError) -> [EntryRecord] {
        try await read { db in
            if let parentID {
                return try Row.fetchAll(db, sql: "SELECT * FROM entries WHERE parent_id = ? ORDER BY created_at, id", arguments: [parentID]).map(Self.entryRecord)
            }
            return try Row.fetchAll(db, sql: "SELECT * FROM entries ORDER BY created_at, id").map(Self.entryRecord)
        }
    }

    // MARK: - plumbing

    func read<T: Sendable>(_ body: @Sendable @escaping (Database) throws -> T) async throws(StoreError) -> T {
        do {
            return try await writer.read(body)
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError(.io, "database read failed: \(SQLiteDatastore.describe(error))")
        }
    }

    func write<T: Sendable>(_ body: @Sendable @escaping (Database) throws -> T) async throws(StoreError) -> T {
        do {
            return try await writer.write(body)
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError(.io, "database write failed: \(SQLiteDatastore.describe(error))")
        }
    }

    static func describe(_ error: any Error) -> String {
        if let db = error as? DatabaseError {
            return db.message ?? "\(db.resultCode)"
        }
        return "\(error)"
    }
}
