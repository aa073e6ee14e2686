import GRDB
public import Foundation
public import SigilCore

/// What one retention pass did to one writer.
public struct LedgerPruneResult: Sendable, Hashable {
    public var checkpoint: LedgerCheckpoint?
    /// Why the writer was left as it was (a broken chain is never cut: the break would be hidden).
    public var refused: String?
}

extension SQLiteDatastore {
    /// The most rows one retention transaction removes.
    static let pruneChunk: UInt64 = 10_000

    static func migrateLedgerCheckpoints(_ db: Database) throws {
        try db.create(table: "ledger_checkpoints", options: [.withoutRowID]) { t in
            t.column("writer", .text).notNull()
            t.column("seq", .integer).notNull()
            t.column("hash", .text).notNull()
            t.column("rows_removed", .integer).notNull()
            t.column("cutoff_us", .integer).notNull()
            t.column("made_at_us", .integer).notNull()
            t.column("key_id", .text).notNull()
            t.column("signature", .blob).notNull()
            t.primaryKey(["writer", "seq"])
        }
    }

    /// Removes every writer's oldest rows up to (not including) the first row stamped at or after
    /// `beforeMicros`, leaving a checkpoint signed with `key` where each chain was cut, and records
    /// each cut as a row of the server's own chain. A writer whose rows to be removed do not verify
    /// is left untouched (reported in the result), so retention never launders an edited row.
    public func pruneLedger(beforeMicros: Int64, key: LedgerCheckpointKey, at: Date) async throws(StoreError) -> [String: LedgerPruneResult] {
        let writers = try await read { db in try String.fetchAll(db, sql: "SELECT writer FROM ledger_writers ORDER BY writer") }
        var results: [String: LedgerPruneResult] = [:]
        for writer in writers {
            // At most `pruneChunk` rows per transaction, so that issuance never waits long on the lock.
            for _ in 0..<10_000 {
                let result = try await write { db -> LedgerPruneResult? in
                    try Self.pruneWriter(db, writer: writer, beforeMicros: beforeMicros, key: key, at: at)
                }
                guard let result else { break }
                results[writer] = result
                guard result.checkpoint != nil else { break }
            }
        }
        return results
    }

    static func pruneWriter(_ db: Database, writer: String, beforeMicros: Int64, key: LedgerCheckpointKey, at: Date) throws -> LedgerPruneResult? {
        guard let head = try Row.fetchOne(db, sql: "SELECT first_seq, last_seq FROM ledger_writers WHERE writer = ?", arguments: [writer]) else { return nil }
        // An edited head or row (impossible seqs) is left alone for `sigil audit verify` to name:
        // nothing is cut from a chain that cannot be checked.
        guard let first = UInt64(exactly: head["first_seq"] as Int64), first >= 1,
              let last = UInt64(exactly: head["last_seq"] as Int64), last < UInt64(Int64.max) else { return nil }
        let minimum = try Int64.fetchOne(db, sql: "SELECT MIN(seq) FROM ledger_rows WHERE writer = ? AND time_us >= ?",
                                         arguments: [writer, beforeMicros])
        if let minimum, minimum < 1 { return nil }
        let firstKept = minimum.map { UInt64($0) } ?? last + 1
        guard firstKept > first else { return nil }
        let cut = min(firstKept - 1, first + pruneChunk - 1)
        // The rows to remove must verify from the previous cut (or genesis) before they go.
        var previous = LedgerChain.genesis
        if first > 1 {
            guard let checkpoint = try checkpoint(db, writer: writer, seq: first - 1), key.isValid(checkpoint) else {
                return LedgerPruneResult(refused: "rows before seq \(first) were removed without a valid signed checkpoint; run `sigil audit verify`")
            }
            previous = checkpoint.hash
        }
        var expected = first
        let cursor = try Data.fetchCursor(db, sql: "SELECT line FROM ledger_rows WHERE writer = ? AND seq <= ? ORDER BY seq",
                                          arguments: [writer, Int64(cut)])
        while let line = try cursor.next() {
            do {
                let row = try LedgerRow.parse(line: line)
                previous = try LedgerChain.check(line: row.line, seq: row.seq, prev: row.prev, expectedSeq: expected, previousHash: previous)
                expected += 1
            } catch {
                return LedgerPruneResult(refused: "row seq \(expected) does not verify (\(error)); retention left this writer as it is")
            }
        }
        guard expected == cut + 1 else {
            return LedgerPruneResult(refused: "rows seq \(expected)-\(cut) are missing; retention left this writer as it is")
        }
        let micros = Int64((at.timeIntervalSince1970 * 1_000_000).rounded())
        guard let checkpoint = key.sign(LedgerCheckpoint(writer: writer, seq: cut, hash: previous, rowsRemoved: cut - first + 1,
                                                         cutoffMicros: beforeMicros, madeAtMicros: micros)) else {
            throw StoreError(.io, "the ledger checkpoint key cannot sign (no private key)")
        }
        try db.execute(sql: """
            INSERT INTO ledger_checkpoints (writer, seq, hash, rows_removed, cutoff_us, made_at_us, key_id, signature)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?)
            """, arguments: [writer, Int64(cut), checkpoint.hash, Int64(checkpoint.rowsRemoved), beforeMicros, micros,
                             checkpoint.keyID, Data(checkpoint.signature)])
        try db.execute(sql: "DELETE FROM ledger_rows WHERE writer = ? AND seq <= ?", arguments: [writer, Int64(cut)])
        try db.execute(sql: "UPDATE ledger_writers SET first_seq = ? WHERE writer = ?", arguments: [Int64(cut + 1), writer])
        try appendServerRow(db, LedgerRecord(kind: .ledgerPruned, timeMicros: micros, source: ServerLedger.uploader, destination: writer,
                                             detail: "retention removed rows \(first)-\(cut) (older than \(RFC3339.format(micros: beforeMicros))); checkpoint seq \(cut) hash \(checkpoint.hash) signed by key \(checkpoint.keyID)"),
                            at: at)
        return LedgerPruneResult(checkpoint: checkpoint)
    }

    static func checkpoint(_ db: Database, writer: String, seq: UInt64) throws -> LedgerCheckpoint? {
        try Row.fetchOne(db, sql: "SELECT * FROM ledger_checkpoints WHERE writer = ? AND seq = ?", arguments: [writer, Int64(seq)])
            .map(checkpoint(of:))
    }

    static func checkpoint(of row: Row) -> LedgerCheckpoint {
        LedgerCheckpoint(writer: row["writer"], seq: UInt64(clamping: row["seq"] as Int64), hash: row["hash"],
                         rowsRemoved: UInt64(clamping: row["rows_removed"] as Int64),
                         cutoffMicros: row["cutoff_us"], madeAtMicros: row["made_at_us"], keyID: row["key_id"],
                         signature: Array(row["signature"] as Data))
    }

    /// Every checkpoint, oldest cut first.
    public func ledgerCheckpoints() async throws(StoreError) -> [LedgerCheckpoint] {
        try await read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM ledger_checkpoints ORDER BY made_at_us, writer, seq").map(Self.checkpoint(of:))
        }
    }
}
