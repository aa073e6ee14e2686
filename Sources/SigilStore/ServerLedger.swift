import GRDB
import Foundation
import SigilCore

/// The server's own ledger writer: every event of the issuance log (certificates issued and
/// refused, join tokens, attestations, evictions, entry changes, authority changes, retention
/// cuts) is also a hash-chained ledger row of writer `spiffe://<td>/sigil/server`, written in the
/// same transaction as the event, so `sigil audit verify` covers what the CA did as it covers
/// who called whom.
enum ServerLedger {
    /// The uploader recorded for the server's own writer; no proxy can ship as it.
    static let uploader = "sigil-server"

    static func writer(trustDomain: String) -> String { "spiffe://\(trustDomain)/sigil/server" }

    /// The server's writer name, or nil before `sigil ca init`.
    static func writer(_ db: Database) throws -> String? {
        try String.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'trust_domain'").map { writer(trustDomain: $0) }
    }

    /// The ledger row of an issuance-log event.
    static func record(of e: IssuanceEvent) -> LedgerRecord {
        let micros = Int64((e.at.timeIntervalSince1970 * 1_000_000).rounded())
        var detail = e.detail
        if let authority = e.authorityID { detail += detail.isEmpty ? "authority \(authority)" : "; authority \(authority)" }
        let kind: LedgerRecord.Kind
        var decision: String?
        switch e.kind {
        case .caInitialized: kind = .caInitialized
        case .issued: kind = .certificateIssued; decision = "allow"
        case .refused: kind = .certificateRefused; decision = "deny"
        case .joinTokenCreated: kind = .joinTokenCreated
        case .joinTokenRefused: kind = .joinTokenRefused; decision = "deny"
        case .agentAttested: kind = .agentAttested; decision = "allow"
        case .agentEvicted: kind = .agentEvicted
        case .entryCreated: kind = .entryCreated
        case .entryDeleted: kind = .entryDeleted
        case .authorityChanged: kind = .authorityChanged
        }
        // The requester as an identity where it is one (`agent:spiffe://…` in the issuance log).
        let source = e.requester.hasPrefix("agent:") ? String(e.requester.dropFirst(6)) : e.requester
        return LedgerRecord(kind: kind, timeMicros: micros, source: source, destination: e.spiffeID, peerSerial: e.serial,
                            decision: decision, detail: detail.isEmpty ? nil : detail)
    }

    /// Appends rows to one writer's chain inside a write transaction: reads the head once, inserts
    /// each row with its indexed columns, and moves the head at ``finish(_:at:)``.
    struct Appender {
        let writer: String
        private(set) var seq: UInt64
        private var hash: [UInt8]
        private var appended = 0

        init(_ db: Database, writer: String) throws {
            self.writer = writer
            let head = try Row.fetchOne(db, sql: "SELECT uploader, last_seq, last_hash FROM ledger_writers WHERE writer = ?", arguments: [writer])
            if let head, (head["uploader"] as String) != ServerLedger.uploader {
                throw StoreError(.conflict, "ledger writer '\(writer)' belongs to \(head["uploader"] as String), not the server")
            }
            seq = UInt64(clamping: (head?["last_seq"] as Int64?) ?? 0)  // an edited head is for verify to name, not a trap
            hash = Array(((head?["last_hash"] as String?) ?? LedgerChain.genesis).utf8)
        }

        mutating func append(_ db: Database, _ record: LedgerRecord) throws {
            seq += 1
            let (line, newHash) = LedgerChain.seal(record, writer: writer, seq: seq, prev: hash)
            let row = LedgerRow(writer: writer, seq: seq, timeMicros: record.timeMicros, kind: record.kind.rawValue,
                                source: record.source, destination: record.destination, decision: record.decision,
                                status: record.status, mtls: record.mtls, policy: record.policy, rule: record.rule,
                                method: record.method, path: record.path, host: record.host, proto: record.proto,
                                port: record.port, sourceIP: record.sourceIP, durationMicros: record.durationMicros,
                                detail: record.detail, prev: String(decoding: hash, as: UTF8.self),
                                hash: String(decoding: newHash, as: UTF8.self), line: line)
            try SQLiteDatastore.insertLedgerRow(db, row)
            hash = newHash
            appended += 1
        }

        func finish(_ db: Database, at: Date) throws {
            guard appended > 0 else { return }
            try SQLiteDatastore.saveLedgerHead(db, writer: writer, uploader: ServerLedger.uploader, lastSeq: seq,
                                               lastHash: String(decoding: hash, as: UTF8.self), at: at)
        }
    }
}

extension SQLiteDatastore {
    static func insertLedgerRow(_ db: Database, _ row: LedgerRow) throws {
        let statement = try db.cachedStatement(sql: """
            INSERT INTO ledger_rows (writer, seq, time_us, kind, source, destination, decision, status, mtls, policy, duration_us, hash, line)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """)
        try statement.execute(arguments: [row.writer, Int64(row.seq), row.timeMicros, row.kind, row.source, row.destination, row.decision,
                                          row.status, row.mtls, row.policy, row.durationMicros, row.hash, Data(row.line)])
    }

    static func saveLedgerHead(_ db: Database, writer: String, uploader: String, lastSeq: UInt64, lastHash: String, at: Date) throws {
        try db.execute(sql: """
            INSERT INTO ledger_writers (writer, uploader, first_seq, last_seq, last_hash, updated_at) VALUES (?, ?, 1, ?, ?, ?)
            ON CONFLICT(writer) DO UPDATE SET last_seq = excluded.last_seq, last_hash = excluded.last_hash, updated_at = excluded.updated_at
            """, arguments: [writer, uploader, Int64(lastSeq), lastHash, at.timeIntervalSince1970])
    }

    /// Appends issuance-log events to the log and to the server's chain, in the caller's transaction.
    static func insertEvents(_ db: Database, _ events: [IssuanceEvent]) throws {
        guard !events.isEmpty else { return }
        let log = try db.cachedStatement(sql: """
            INSERT INTO issuance_log (at, event, serial, spiffe_id, authority_id, requester, detail)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            """)
        var chain = try ServerLedger.writer(db).map { try ServerLedger.Appender(db, writer: $0) }
        for e in events {
            try log.execute(arguments: [e.at.timeIntervalSince1970, e.kind.rawValue, e.serial, e.spiffeID, e.authorityID, e.requester, e.detail])
            try chain?.append(db, ServerLedger.record(of: e))
        }
        try chain?.finish(db, at: events[events.count - 1].at)
    }

    /// Appends one row of the server's own (not an issuance-log event) to its chain.
    static func appendServerRow(_ db: Database, _ record: LedgerRecord, at: Date) throws {
        guard let writer = try ServerLedger.writer(db) else { return }
        var chain = try ServerLedger.Appender(db, writer: writer)
        try chain.append(db, record)
        try chain.finish(db, at: at)
    }
}
