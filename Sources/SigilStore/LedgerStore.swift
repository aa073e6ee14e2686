import GRDB
public import Foundation
public import SigilCore

/// One stored ledger row: the exact bytes its writer chained, and the fields audits filter on
/// (read out of those bytes, never supplied separately).
public struct LedgerRow: Sendable, Hashable {
    public var writer: String
    public var seq: UInt64
    public var timeMicros: Int64
    public var kind: String
    public var source: String?
    public var destination: String?
    public var decision: String?
    public var status: Int?
    public var mtls: Bool
    public var policy: String?
    public var rule: Int?
    public var method: String?
    public var path: String?
    public var host: String?
    public var proto: String?
    public var port: Int?
    public var sourceIP: String?
    public var durationMicros: Int64
    public var detail: String?
    public var prev: String
    public var hash: String
    /// The row as its writer wrote it (one JSON object, no newline).
    public var line: [UInt8]

    /// Reads a row out of its bytes and checks that they match the hash the row states.
    public static func parse(line: some Collection<UInt8>) throws(LedgerChain.Problem) -> LedgerRow {
        let bytes = Array(line)
        // Rows are one line of compact JSON as Sigil writes them: `{"writer":` first, no raw
        // control character below 0x20 anywhere (JSON escapes them inside strings; a raw DEL,
        // which JSON allows and rows written before it was escaped hold, stays readable). A row with a raw newline
        // would print as several lines in `audit query --json`, one of which could pass for a row.
        guard bytes.starts(with: Array(#"{"writer":"#.utf8)) else { throw LedgerChain.Problem("the row does not start with {\"writer\":") }
        guard !bytes.contains(where: { $0 < 0x20 }) else { throw LedgerChain.Problem("the row holds a raw control character") }
        let (stated, computed) = try LedgerChain.hashes(of: bytes)
        guard stated == computed else { throw LedgerChain.Problem("its bytes do not match its hash (the row was edited)") }
        guard let object = (try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any] else {
            throw LedgerChain.Problem("the row is not a JSON object")
        }
        func string(_ key: String) -> String? { object[key] as? String }
        func int(_ key: String) -> Int? { (object[key] as? NSNumber)?.intValue }
        guard let writer = string("writer"), !writer.isEmpty else { throw LedgerChain.Problem("the row has no writer") }
        guard let seqNumber = object["seq"] as? NSNumber, seqNumber.int64Value > 0 else { throw LedgerChain.Problem("the row has no positive seq") }
        guard let time = string("time").flatMap({ RFC3339.micros(from: $0) }) else { throw LedgerChain.Problem("the row's time is not RFC 3339") }
        guard let kind = string("kind") else { throw LedgerChain.Problem("the row has no kind") }
        guard let prev = string("prev"), prev.utf8.count == 64 else { throw LedgerChain.Problem("the row has no prev hash") }
        return LedgerRow(writer: writer, seq: UInt64(seqNumber.int64Value), timeMicros: time, kind: kind,
                         source: string("source"), destination: string("destination"), decision: string("decision"),
                         status: int("status"), mtls: (object["mtls"] as? Bool) ?? false, policy: string("policy"), rule: int("rule"),
                         method: string("method"), path: string("path"), host: string("host"), proto: string("protocol"),
                         port: int("port"), sourceIP: string("source_ip"), durationMicros: Int64(int("duration_us") ?? 0),
                         detail: string("detail"), prev: prev, hash: stated, line: bytes)
    }
}

/// What one upload did.
public struct LedgerIngestResult: Sendable, Equatable {
    /// Rows stored now.
    public var accepted: Int
    /// Rows already stored (a retry): skipped.
    public var duplicates: Int
    /// The seq the server expects next from this writer: everything before it is stored.
    public var nextSeq: UInt64

    public init(accepted: Int, duplicates: Int, nextSeq: UInt64) {
        self.accepted = accepted
        self.duplicates = duplicates
        self.nextSeq = nextSeq
    }
}

/// Filters for ``LedgerStore/ledgerRows(_:)``.
public struct LedgerQuery: Sendable {
    public var source: String?
    public var destination: String?
    public var sinceMicros: Int64?
    public var untilMicros: Int64?
    public var decision: String?
    public var kind: String?
    public var writer: String?
    public var limit: Int

    public init(source: String? = nil, destination: String? = nil, sinceMicros: Int64? = nil, untilMicros: Int64? = nil,
                decision: String? = nil, kind: String? = nil, writer: String? = nil, limit: Int = 1000) {
        self.source = source
        self.destination = destination
        self.sinceMicros = sinceMicros
        self.untilMicros = untilMicros
        self.decision = decision
        self.kind = kind
        self.writer = writer
        self.limit = limit
    }
}

/// The outcome of ``LedgerStore/verifyLedger()``.
public struct LedgerVerification: Sendable {
    public struct Break: Sendable, CustomStringConvertible {
        public var writer: String
        public var seq: UInt64
        public var problem: String
        public var description: String { "writer \(writer) row seq \(seq): \(problem)" }

        public init(writer: String, seq: UInt64, problem: String) {
            self.writer = writer
            self.seq = seq
            self.problem = problem
        }
    }

    public init() {}

    public var writers = 0
    public var rows = 0
    /// Signed checkpoints where retention cut a chain, and whether their signatures were checked.
    public var checkpoints = 0
    public var checkpointsChecked = false
    /// The first broken row of each broken writer.
    public var breaks: [Break] = []
    public var intact: Bool { breaks.isEmpty }
}

/// Who called whom over a time range: one edge per (source, destination).
public struct LedgerEdge: Sendable, Hashable, Codable {
    /// The caller's SPIFFE ID; nil for plaintext callers.
    public var source: String?
    public var destination: String?
    public var calls: Int
    public var denied: Int
    public var overMTLS: Int
    public var p99Micros: Int64

    public var mtlsShare: Double { calls == 0 ? 0 : Double(overMTLS) / Double(calls) }
}

/// The server's ledger: rows shipped by proxies, stored once per (writer, seq), chains verifiable.
public protocol LedgerStore: Sendable {
    /// Stores `rows` of one writer (each already parsed and hash-checked), in seq order, in one
    /// transaction. Rows already stored are skipped (retries are harmless); a row whose seq is
    /// stored with a different hash, or whose prev does not continue the stored chain, fails the
    /// upload; rows after a gap are not stored (``LedgerIngestResult/nextSeq`` says where to resume).
    /// The first uploader of a writer owns it: another uploader appending to it is refused.
    func ingestLedger(writer: String, uploader: String, rows: [LedgerRow], at: Date) async throws(StoreError) -> LedgerIngestResult
    /// The seq the server expects next from `writer` (1 for a writer it has not seen).
    func ledgerNextSeq(writer: String) async throws(StoreError) -> UInt64
    /// The SPIFFE ID that owns `writer` (the first to ship it), nil for a writer not seen yet.
    func ledgerWriterUploader(writer: String) async throws(StoreError) -> String?
    /// Rows matching `query`, oldest first (the newest `limit` of them).
    func ledgerRows(_ query: LedgerQuery) async throws(StoreError) -> [LedgerRow]
    /// Checks every writer's chain from its bytes: each row's own hash, seq continuity, prev links,
    /// the stored columns against the row's bytes, and the last row against the writer's head. A
    /// chain cut by retention continues from its signed checkpoint, whose signature is checked with
    /// `checkpointKey` (nil: not checked, and the report says so).
    func verifyLedger(checkpointKey: LedgerCheckpointKey?) async throws(StoreError) -> LedgerVerification
    /// Retention: removes each writer's rows before the first one stamped at or after
    /// `beforeMicros`, leaving a checkpoint signed with `key` (see ``LedgerCheckpoint``).
    func pruneLedger(beforeMicros: Int64, key: LedgerCheckpointKey, at: Date) async throws(StoreError) -> [String: LedgerPruneResult]
    /// Every retention checkpoint, oldest cut first.
    func ledgerCheckpoints() async throws(StoreError) -> [LedgerCheckpoint]
    /// Request and connection rows in `[since, until)` grouped by caller and callee, as the callee
    /// recorded them (a caller's own outbound connection rows would count the same calls twice).
    func ledgerEdges(sinceMicros: Int64?, untilMicros: Int64?) async throws(StoreError) -> [LedgerEdge]
}

extension SQLiteDatastore {
    static func migrateLedger(_ db: Database) throws {
        try db.create(table: "ledger_writers") { t in
            t.primaryKey("writer", .text)
            t.column("uploader", .text).notNull()
            t.column("first_seq", .integer).notNull()
            t.column("last_seq", .integer).notNull()
            t.column("last_hash", .text).notNull()
            t.column("updated_at", .double).notNull()
        }
        try db.create(table: "ledger_rows", options: [.withoutRowID]) { t in
            t.column("writer", .text).notNull()
            t.column("seq", .integer).notNull()
            t.column("time_us", .integer).notNull()
            t.column("kind", .text).notNull()
            t.column("source", .text)
            t.column("destination", .text)
            t.column("decision", .text)
            t.column("status", .integer)
            t.column("mtls", .boolean).notNull()
            t.column("policy", .text)
            t.column("duration_us", .integer).notNull()
            t.column("hash", .text).notNull()
            t.column("line", .blob).notNull()
            t.primaryKey(["writer", "seq"])
        }
        try db.create(index: "ledger_rows_by_time", on: "ledger_rows", columns: ["time_us"])
        try db.create(index: "ledger_rows_by_source", on: "ledger_rows", columns: ["source", "time_us"])
        try db.create(index: "ledger_rows_by_destination", on: "ledger_rows", columns: ["destination", "time_us"])
        try db.create(index: "ledger_rows_by_decision", on: "ledger_rows", columns: ["decision", "time_us"])
    }

    public func ingestLedger(writer: String, uploader: String, rows: [LedgerRow], at: Date) async throws(StoreError) -> LedgerIngestResult {
        try await write { db in
            if try ServerLedger.writer(db) == writer || uploader == ServerLedger.uploader {
                throw StoreError(.conflict, "ledger writer '\(writer)' is the server's own; no proxy may append to it")
            }
            let head = try Row.fetchOne(db, sql: "SELECT uploader, first_seq, last_seq, last_hash FROM ledger_writers WHERE writer = ?", arguments: [writer])
            if let head, (head["uploader"] as String) != uploader {
                throw StoreError(.conflict, "ledger writer '\(writer)' is shipped by \(head["uploader"] as String); \(uploader) may not append to it")
            }
            guard let last = UInt64(exactly: (head?["last_seq"] as Int64?) ?? 0), last < UInt64(Int64.max) else {
                throw StoreError(.corrupt, "ledger writer '\(writer)' has an impossible head (seq \((head?["last_seq"] as Int64?) ?? 0)); run sigil audit verify")
            }
            var expected = last + 1
            var previous = (head?["last_hash"] as String?) ?? LedgerChain.genesis
            var accepted = 0, duplicates = 0
            for row in rows.sorted(by: { $0.seq < $1.seq }) {
                guard row.writer == writer else {
                    throw StoreError(.conflict, "row seq \(row.seq) names writer '\(row.writer)', not '\(writer)'")
                }
                if row.seq < expected {
                    let stored = try String.fetchOne(db, sql: "SELECT hash FROM ledger_rows WHERE writer = ? AND seq = ?", arguments: [writer, Int64(row.seq)])
                    if let stored, stored != row.hash {
                        throw StoreError(.conflict, "writer '\(writer)' row seq \(row.seq) differs from the stored row with that seq: the writer's spool was replaced or reset; give it a new spool file and writer name, or restore the old spool")
                    }
                    duplicates += 1
                    continue
                }
                if row.seq > expected { break }  // a gap: the uploader resends from `expected`
                guard row.prev == previous else {
                    throw StoreError(.conflict, "writer '\(writer)' row seq \(row.seq) does not continue the stored chain (its prev is not the hash of seq \(row.seq - 1))")
                }
                try Self.insertLedgerRow(db, row)
                expected += 1
                previous = row.hash
                accepted += 1
            }
            if accepted > 0 {
                try Self.saveLedgerHead(db, writer: writer, uploader: uploader, lastSeq: expected - 1, lastHash: previous, at: at)
            }
            return LedgerIngestResult(accepted: accepted, duplicates: duplicates, nextSeq: expected)
        }
    }

    public func ledgerWriterUploader(writer: String) async throws(StoreError) -> String? {
        try await read { db in
            try String.fetchOne(db, sql: "SELECT uploader FROM ledger_writers WHERE writer = ?", arguments: [writer])
        }
    }

    public func ledgerNextSeq(writer: String) async throws(StoreError) -> UInt64 {
        try await read { db in
            UInt64(clamping: try Int64.fetchOne(db, sql: "SELECT last_seq FROM ledger_writers WHERE writer = ?", arguments: [writer]) ?? 0) &+ 1
        }
    }

    public func ledgerRows(_ query: LedgerQuery) async throws(StoreError) -> [LedgerRow] {
        try await read { db in
            var clauses: [String] = []
            var arguments = StatementArguments()
            func add(_ clause: String, _ value: (any DatabaseValueConvertible)?) {
                guard let value else { return }
                clauses.append(clause)
                _ = arguments.append(contentsOf: [value])
            }
            add("source = ?", query.source)
            add("destination = ?", query.destination)
            add("time_us >= ?", query.sinceMicros)
            add("time_us < ?", query.untilMicros)
            add("decision = ?", query.decision)
            add("kind = ?", query.kind)
            add("writer = ?", query.writer)
            let filter = clauses.isEmpty ? "" : "WHERE " + clauses.joined(separator: " AND ")
            let sql = "SELECT line FROM ledger_rows \(filter) ORDER BY time_us DESC, writer, seq DESC LIMIT \(max(0, query.limit))"
            var rows: [LedgerRow] = []
            for data in try Data.fetchAll(db, sql: sql, arguments: arguments) {
                do {
                    rows.append(try LedgerRow.parse(line: data))
                } catch {
                    throw StoreError(.corrupt, "a stored ledger row fails its own check (\(error)); run `sigil audit verify`")
                }
            }
            return rows.reversed()
        }
    }

    public func verifyLedger(checkpointKey: LedgerCheckpointKey?) async throws(StoreError) -> LedgerVerification {
        try await read { db in
            var report = LedgerVerification()
            report.checkpointsChecked = checkpointKey != nil
            var checkpoints: [String: [UInt64: LedgerCheckpoint]] = [:]
            for row in try Row.fetchAll(db, sql: "SELECT * FROM ledger_checkpoints ORDER BY writer, seq") {
                let checkpoint = Self.checkpoint(of: row)
                report.checkpoints += 1
                if let checkpointKey, !checkpointKey.isValid(checkpoint) {
                    report.breaks.append(.init(writer: checkpoint.writer, seq: checkpoint.seq,
                                               problem: "the retention checkpoint at seq \(checkpoint.seq) is not validly signed by the ledger checkpoint key \(checkpointKey.keyID) (it was edited or forged)"))
                }
                checkpoints[checkpoint.writer, default: [:]][checkpoint.seq] = checkpoint
            }
            let heads = try Row.fetchAll(db, sql: "SELECT writer, first_seq, last_seq, last_hash FROM ledger_writers ORDER BY writer")
            var known = Set<String>()
            for head in heads {
                let writer: String = head["writer"]
                known.insert(writer)
                report.writers += 1
                // Out-of-range numbers (an edited database) are breaks to name, never a trap.
                guard let first = UInt64(exactly: head["first_seq"] as Int64), first >= 1,
                      let last = UInt64(exactly: head["last_seq"] as Int64) else {
                    report.breaks.append(.init(writer: writer, seq: 0, problem: "the writer's head holds an impossible seq (first \(head["first_seq"] as Int64), last \(head["last_seq"] as Int64)): the ledger tables were edited"))
                    continue
                }
                var expected = first
                var previous = LedgerChain.genesis
                var broken: LedgerVerification.Break?
                if expected > 1 {
                    if let checkpoint = checkpoints[writer]?[expected - 1] {
                        previous = checkpoint.hash
                    } else {
                        broken = .init(writer: writer, seq: expected, problem: "rows 1-\(expected - 1) were removed without a signed retention checkpoint")
                    }
                }
                let cursor = try Row.fetchCursor(db, sql: """
                    SELECT seq, time_us, kind, source, destination, decision, status, mtls, policy, duration_us, hash, line
                    FROM ledger_rows WHERE writer = ? ORDER BY seq
                    """, arguments: [writer])
                while let row = try cursor.next() {
                    report.rows += 1
                    guard broken == nil else { continue }
                    guard let seq = UInt64(exactly: row["seq"] as Int64) else {
                        broken = .init(writer: writer, seq: 0, problem: "a row holds the impossible seq \(row["seq"] as Int64): the ledger tables were edited")
                        continue
                    }
                    do {
                        let parsed = try LedgerRow.parse(line: row["line"] as Data)
                        guard parsed.writer == writer, parsed.seq == seq else {
                            throw LedgerChain.Problem("its bytes name writer \(parsed.writer) seq \(parsed.seq)")
                        }
                        previous = try LedgerChain.check(line: parsed.line, seq: seq, prev: parsed.prev, expectedSeq: expected, previousHash: previous)
                        if let column = Self.mismatchedColumn(row, parsed) {
                            throw LedgerChain.Problem("the stored \(column) column differs from the row's bytes (the row was edited)")
                        }
                        expected = seq + 1
                    } catch {
                        broken = .init(writer: writer, seq: seq, problem: "\(error)")
                    }
                }
                if broken == nil {
                    if expected - 1 != last {
                        broken = .init(writer: writer, seq: expected, problem: expected - 1 < last
                            ? "rows seq \(expected)-\(last) are missing (the writer's head says it stored up to \(last))"
                            : "rows after the writer's head (\(last)) were added outside ingest")
                    } else if previous != (head["last_hash"] as String), last > 0 {
                        broken = .init(writer: writer, seq: last, problem: "the last row's hash differs from the writer's head")
                    }
                }
                if let broken { report.breaks.append(broken) }
            }
            // Whole chains deleted: a checkpoint names a writer that has no head any more, or the
            // server's own chain (every issuance is a row of it) is gone while its issuance log is not.
            for writer in checkpoints.keys.sorted() where !known.contains(writer) {
                report.breaks.append(.init(writer: writer, seq: checkpoints[writer]?.keys.min() ?? 0,
                                           problem: "retention checkpoints name this writer, but its chain (rows and head) was deleted"))
            }
            if let server = try ServerLedger.writer(db), !known.contains(server),
               let events = try Int.fetchOne(db, sql: "SELECT count(*) FROM issuance_log"), events > 0 {
                report.breaks.append(.init(writer: server, seq: 1,
                                           problem: "the server's own chain is missing, but the issuance log holds \(events) events it recorded (the chain was deleted)"))
            }
            for orphan in try String.fetchAll(db, sql: "SELECT DISTINCT writer FROM ledger_rows") where !known.contains(orphan) {
                let seq = try Int64.fetchOne(db, sql: "SELECT MIN(seq) FROM ledger_rows WHERE writer = ?", arguments: [orphan]) ?? 0
                report.breaks.append(.init(writer: orphan, seq: UInt64(clamping: seq), problem: "rows of a writer the ledger has no head for (inserted outside ingest)"))
            }
            return report
        }
    }

    public func ledgerEdges(sinceMicros: Int64?, untilMicros: Int64?) async throws(StoreError) -> [LedgerEdge] {
        try await read { db in
            struct Key: Hashable { var source: String?; var destination: String? }
            var edges: [Key: (calls: Int, denied: Int, mtls: Int, durations: [Int64])] = [:]
            let cursor = try Row.fetchCursor(db, sql: """
                SELECT source, destination, decision, mtls, duration_us FROM ledger_rows
                WHERE kind IN ('request', 'connection') AND time_us >= ? AND time_us < ?
                  AND instr(line, CAST('"detail":"outbound' AS BLOB)) = 0
                """, arguments: [sinceMicros ?? Int64.min, untilMicros ?? Int64.max])
            while let row = try cursor.next() {
                let key = Key(source: row["source"], destination: row["destination"])
                let denied = (row["decision"] as String?) == "deny", mtls = row["mtls"] as Bool
                let duration: Int64 = row["duration_us"]
                // Updated in place (a copy of the edge per row would copy its durations: quadratic).
                edges[key, default: (0, 0, 0, [])].calls += 1
                if denied { edges[key]!.denied += 1 }
                if mtls { edges[key]!.mtls += 1 }
                edges[key]!.durations.append(duration)
            }
            return edges.map { key, value in
                let sorted = value.durations.sorted()
                let index = max(0, Int((Double(sorted.count) * 0.99).rounded(.up)) - 1)
                return LedgerEdge(source: key.source, destination: key.destination, calls: value.calls, denied: value.denied,
                                  overMTLS: value.mtls, p99Micros: sorted.isEmpty ? 0 : sorted[index])
            }.sorted { ($0.source ?? "", $0.destination ?? "") < ($1.source ?? "", $1.destination ?? "") }
        }
    }

    /// The first indexed column whose stored value is not what the row's bytes say.
    static func mismatchedColumn(_ row: Row, _ parsed: LedgerRow) -> String? {
        if (row["time_us"] as Int64) != parsed.timeMicros { return "time" }
        if (row["kind"] as String) != parsed.kind { return "kind" }
        if (row["source"] as String?) != parsed.source { return "source" }
        if (row["destination"] as String?) != parsed.destination { return "destination" }
        if (row["decision"] as String?) != parsed.decision { return "decision" }
        if (row["status"] as Int?) != parsed.status { return "status" }
        if (row["mtls"] as Bool) != parsed.mtls { return "mtls" }
        if (row["policy"] as String?) != parsed.policy { return "policy" }
        if (row["duration_us"] as Int64) != parsed.durationMicros { return "duration" }
        if (row["hash"] as String) != parsed.hash { return "hash" }
        return nil
    }
}

extension LedgerStore {
    /// ``verifyLedger(checkpointKey:)`` without checking checkpoint signatures (chains are still
    /// continued from each checkpoint's hash).
    public func verifyLedger() async throws(StoreError) -> LedgerVerification {
        try await verifyLedger(checkpointKey: nil)
    }
}
