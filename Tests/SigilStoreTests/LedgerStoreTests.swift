import Testing
import Foundation
import SigilCore
import SigilStore
import SigilTestSupport

/// The server's ledger store: idempotent ingest by (writer, seq), chain continuity enforced at
/// ingest, and `verifyLedger` finding the first edited or missing row of a writer.
@Suite("LedgerStore")
struct LedgerStoreTests {
    /// Rows 1...count of one writer, chained exactly as a proxy spool chains them.
    static func chain(_ writer: String, count: Int, from first: UInt64 = 1, prev: String = LedgerChain.genesis,
                      decision: (Int) -> String = { $0 % 3 == 0 ? "deny" : "allow" }) throws -> [LedgerRow] {
        var rows: [LedgerRow] = []
        var previous = prev
        for i in 0..<count {
            let seq = first + UInt64(i)
            let record = LedgerRecord(kind: .request, timeMicros: 1_764_000_000_000_000 + Int64(seq) * 1000,
                                      source: "spiffe://example.org/ns/shop/sa/web", destination: "spiffe://example.org/ns/shop/sa/api",
                                      proto: "http/1.1", method: "GET", path: "/orders/\(seq)", status: 200,
                                      decision: decision(Int(seq)), policy: "shop/api-from-web", rule: 0, mtls: true, durationMicros: 250)
            let body = Array(record.json(writer: writer, seq: seq, prev: previous).utf8)
            let placeholder = body + Array(",\"hash\":\"\(LedgerChain.genesis)\"}".utf8)
            let hash = try LedgerChain.hashes(of: placeholder).computed
            let row = try LedgerRow.parse(line: body + Array(",\"hash\":\"\(hash)\"}".utf8))
            rows.append(row)
            previous = hash
        }
        return rows
    }

    /// Runs one SQL statement on the store's file from another process (python3's sqlite3), as
    /// someone with access to the database would.
    static func tamper(_ store: SQLiteDatastore, _ sql: String) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", "import sqlite3,sys; d=sqlite3.connect(sys.argv[1]); d.execute(sys.argv[2]); d.commit()", store.path, sql]
        try process.run()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
    }

    func fileStore() throws -> (SQLiteDatastore, TemporaryDirectory) {
        let dir = try TemporaryDirectory()
        return (try SQLiteDatastore(path: dir.path + "/sigil.db"), dir)
    }

    @Test func retriesAndOverlapsStoreEachRowOnce() async throws {
        let store = try SQLiteDatastore(inMemory: ())
        let rows = try Self.chain("proxy:a", count: 10)
        var result = try await store.ingestLedger(writer: "proxy:a", uploader: "spiffe://example.org/ns/shop/sa/api", rows: Array(rows[0..<6]), at: Date())
        #expect(result == LedgerIngestResult(accepted: 6, duplicates: 0, nextSeq: 7))
        // a retry of a lost answer, overlapping the next batch
        result = try await store.ingestLedger(writer: "proxy:a", uploader: "spiffe://example.org/ns/shop/sa/api", rows: Array(rows[3..<10]), at: Date())
        #expect(result == LedgerIngestResult(accepted: 4, duplicates: 3, nextSeq: 11))
        #expect(try await store.ledgerNextSeq(writer: "proxy:a") == 11)
        #expect(try await store.ledgerNextSeq(writer: "proxy:new") == 1)
        let stored = try await store.ledgerRows(LedgerQuery(writer: "proxy:a"))
        #expect(stored.map(\.seq) == Array(1...10))
        #expect(stored.map(\.line) == rows.map(\.line))
        let report = try await store.verifyLedger()
        #expect(report.intact && report.rows == 10 && report.writers == 1)
    }

    @Test func gapsStopIngestAndForksAreRefused() async throws {
        let store = try SQLiteDatastore(inMemory: ())
        let rows = try Self.chain("w", count: 6)
        let uploader = "spiffe://example.org/ns/shop/sa/api"
        _ = try await store.ingestLedger(writer: "w", uploader: uploader, rows: Array(rows[0..<2]), at: Date())
        // rows 5-6 without 3-4: nothing after the gap is stored, the answer says where to resume
        let gap = try await store.ingestLedger(writer: "w", uploader: uploader, rows: Array(rows[4..<6]), at: Date())
        #expect(gap == LedgerIngestResult(accepted: 0, duplicates: 0, nextSeq: 3))
        // a different chain reusing the writer name (its spool was reset): refused, named
        let fork = try Self.chain("w", count: 3, decision: { _ in "deny" })
        await #expect(throws: StoreError.self) {
            _ = try await store.ingestLedger(writer: "w", uploader: uploader, rows: fork, at: Date())
        }
        do {
            _ = try await store.ingestLedger(writer: "w", uploader: uploader, rows: Array(fork[2...]), at: Date())
            Issue.record("a row that does not continue the chain was stored")
        } catch {
            #expect(error.message.contains("does not continue the stored chain"))
        }
        // another workload may not append to this writer
        do {
            _ = try await store.ingestLedger(writer: "w", uploader: "spiffe://example.org/ns/shop/sa/web", rows: Array(rows[2..<4]), at: Date())
            Issue.record("a second uploader appended to a writer it does not own")
        } catch {
            #expect(error.code == .conflict && error.message.contains("may not append"))
        }
        #expect(try await store.verifyLedger().intact)
    }

    @Test func queriesFilterByCallerCalleeTimeAndDecision() async throws {
        let store = try SQLiteDatastore(inMemory: ())
        let rows = try Self.chain("w", count: 9)
        _ = try await store.ingestLedger(writer: "w", uploader: "u", rows: rows, at: Date())
        #expect(try await store.ledgerRows(LedgerQuery(decision: "deny")).map(\.seq) == [3, 6, 9])
        #expect(try await store.ledgerRows(LedgerQuery(source: "spiffe://example.org/ns/shop/sa/other")).isEmpty)
        let since = rows[4].timeMicros
        #expect(try await store.ledgerRows(LedgerQuery(sinceMicros: since, untilMicros: rows[7].timeMicros)).map(\.seq) == [5, 6, 7])
        #expect(try await store.ledgerRows(LedgerQuery(limit: 2)).map(\.seq) == [8, 9])
        let edges = try await store.ledgerEdges(sinceMicros: nil, untilMicros: nil)
        #expect(edges.count == 1 && edges[0].calls == 9 && edges[0].denied == 3 && edges[0].overMTLS == 9 && edges[0].p99Micros == 250)
    }

    @Test func rowsWhoseBytesDoNotMatchTheirHashAreRefused() throws {
        let row = try Self.chain("w", count: 1)[0]
        var edited = row.line
        let index = edited.firstIndex(of: UInt8(ascii: "G"))!  // the method
        edited[index] = UInt8(ascii: "P")
        #expect(throws: LedgerChain.Problem.self) { _ = try LedgerRow.parse(line: edited) }
        #expect(throws: LedgerChain.Problem.self) { _ = try LedgerRow.parse(line: Array(#"{"writer":"w","seq":1}"#.utf8)) }
    }

    @Test func rowsInTheEarlierFieldOrderIngestAndVerifyBesideTheCurrentOne() async throws {
        // Spools written before `seq` and `prev` moved to the end have `seq` second. Checking
        // reads bytes, not field order, so a chain that crosses the upgrade stays intact.
        let old = #"{"writer":"w","seq":1,"time":"2026-12-01T10:00:00.000000Z","kind":"request","source":null,"# +
            #""destination":"spiffe://example.org/ns/shop/sa/api","peer_serial":null,"source_ip":"127.0.0.1","port":8080,"# +
            #""protocol":"http/1.1","method":"GET","path":"/","host":null,"status":200,"decision":"allow","policy":null,"# +
            #""rule":null,"mtls":false,"bytes_in":0,"bytes_out":2,"duration_us":7,"detail":null,"prev":"\#(LedgerChain.genesis)""#
        let oldHash = try LedgerChain.hashes(of: Array((old + #","hash":"\#(LedgerChain.genesis)"}"#).utf8)).computed
        let first = try LedgerRow.parse(line: Array((old + #","hash":"\#(oldHash)"}"#).utf8))
        let second = try Self.chain("w", count: 1, from: 2, prev: oldHash)[0]
        #expect(String(decoding: second.line, as: UTF8.self).contains(#""detail":null,"seq":2,"prev":"\#(oldHash)","hash":"#))
        let store = try SQLiteDatastore(inMemory: ())
        let result = try await store.ingestLedger(writer: "w", uploader: "u", rows: [first, second], at: Date())
        #expect(result == LedgerIngestResult(accepted: 2, duplicates: 0, nextSeq: 3))
        #expect(try await store.verifyLedger().intact)
    }

    @Test func rfc3339RoundTrips() {
        for micros: Int64 in [0, 1, 999_999, 1_764_000_000_123_456, 951_782_400_000_000 /* 2000-02-29 */, -1] {
            #expect(RFC3339.micros(from: RFC3339.format(micros: micros)) == micros, "\(micros)")
        }
        #expect(RFC3339.micros(from: "2026-12-02T10:00:00Z") == 1_796_205_600_000_000)
        #expect(RFC3339.micros(from: "2026-13-02T10:00:00Z") == nil)
        #expect(RFC3339.micros(from: "yesterday") == nil)
    }

    @Test func verifyNamesTheFirstEditedOrMissingRow() async throws {
        let (store, dir) = try fileStore()
        defer { dir.remove() }
        let rows = try Self.chain("w", count: 8)
        _ = try await store.ingestLedger(writer: "w", uploader: "u", rows: rows, at: Date())
        _ = try await store.ingestLedger(writer: "v", uploader: "u", rows: try Self.chain("v", count: 3), at: Date())
        #expect(try await store.verifyLedger().intact)
        func tamper(_ sql: String) throws { try Self.tamper(store, sql) }
        // one byte of a stored row
        try tamper("UPDATE ledger_rows SET line = CAST(replace(CAST(line AS TEXT), '/orders/4', '/orders/5') AS BLOB) WHERE writer = 'w' AND seq = 4")
        var report = try await store.verifyLedger()
        #expect(report.breaks.count == 1 && report.breaks[0].writer == "w" && report.breaks[0].seq == 4)
        #expect(report.breaks[0].problem.contains("edited"))
        // a deleted row (the edited one): the next row names the gap
        try tamper("DELETE FROM ledger_rows WHERE writer = 'w' AND seq = 4")
        report = try await store.verifyLedger()
        #expect(report.breaks.map(\.seq) == [5] && report.breaks[0].problem.contains("seq 4 missing"))
        // the last rows deleted: the writer's head still knows how far it went
        try tamper("DELETE FROM ledger_rows WHERE writer = 'v' AND seq = 3")
        report = try await store.verifyLedger()
        #expect(report.breaks.contains { $0.writer == "v" && $0.seq == 3 && $0.problem.contains("missing") })
    }

    /// One certificate batch and one refusal on a store with a CA: the server's own chain.
    static func storeWithServerRows() async throws -> SQLiteDatastore {
        let store = try SQLiteDatastore(inMemory: ())
        let now = Date()
        let root = AuthorityRecord(id: "root", kind: .root, state: .active, parentID: nil, notBefore: now, notAfter: now.addingTimeInterval(3600),
                                   fingerprint: "fp-root", certificatePEM: "pem", inBundle: true, createdAt: now)
        try await store.initialize(trustDomain: "example.org", authorities: [root], at: now)
        try await store.recordIssued((1...3).map {
            IssuedCertificate(serial: "0\($0)", spiffeID: "spiffe://example.org/ns/shop/sa/web", authorityID: "root", notBefore: now,
                              notAfter: now.addingTimeInterval(600), issuedAt: now, requester: "spiffe://example.org/sigil/agent/node-1")
        })
        try await store.recordEvent(IssuanceEvent(at: now, kind: .refused, serial: nil, spiffeID: "spiffe://example.org/ns/shop/sa/db", authorityID: nil,
                                                  requester: "spiffe://example.org/sigil/agent/node-1", detail: "not parented to this agent"))
        return store
    }

    @Test func theServerChainsWhatTheCADidAndNoProxyMayWriteAsIt() async throws {
        let store = try await Self.storeWithServerRows()
        let server = "spiffe://example.org/sigil/server"
        let rows = try await store.ledgerRows(LedgerQuery(writer: server))
        #expect(rows.map(\.kind) == ["ca_initialized", "certificate_issued", "certificate_issued", "certificate_issued", "certificate_refused"])
        #expect(rows.map(\.seq) == Array(1...5))
        #expect(rows[1].destination == "spiffe://example.org/ns/shop/sa/web" && rows[1].decision == "allow" && rows[1].detail?.contains("validity 600s") == true)
        #expect(rows[4].decision == "deny" && rows[4].source == "spiffe://example.org/sigil/agent/node-1")
        let report = try await store.verifyLedger()
        #expect(report.intact && report.rows == 5 && report.writers == 1)
        // a proxy shipping rows under the server's writer name is refused
        let forged = try Self.chain(server, count: 1)
        do {
            _ = try await store.ingestLedger(writer: server, uploader: "spiffe://example.org/ns/shop/sa/api", rows: forged, at: Date())
            Issue.record("a proxy appended to the server's own chain")
        } catch {
            #expect(error.code == .conflict && error.message.contains("server's own"))
        }
    }

    @Test func retentionCutsAtASignedCheckpointThatVerifyChecks() async throws {
        let (store, dir) = try fileStore()
        defer { dir.remove() }
        let rows = try Self.chain("w", count: 10)
        _ = try await store.ingestLedger(writer: "w", uploader: "u", rows: rows, at: Date())
        let key = LedgerCheckpointKey()
        // everything before row 7's time goes: rows 1-6, a checkpoint at seq 6
        let results = try await store.pruneLedger(beforeMicros: rows[6].timeMicros, key: key, at: Date())
        let checkpoint = try #require(results["w"]?.checkpoint)
        #expect(checkpoint.seq == 6 && checkpoint.rowsRemoved == 6 && checkpoint.hash == rows[5].hash && key.isValid(checkpoint))
        #expect(try await store.ledgerRows(LedgerQuery(writer: "w")).map(\.seq) == [7, 8, 9, 10])
        var report = try await store.verifyLedger(checkpointKey: key)
        #expect(report.intact && report.rows == 4 && report.checkpoints == 1)
        // a retry of already-removed rows is harmless; the chain continues after the cut
        let more = try Self.chain("w", count: 2, from: 11, prev: rows[9].hash)
        let retry = try await store.ingestLedger(writer: "w", uploader: "u", rows: Array(rows[4...]) + more, at: Date())
        #expect(retry.accepted == 2 && retry.nextSeq == 13)
        // pruning again with the same cutoff does nothing; cutting everything leaves a head-only writer that verifies
        #expect(try await store.pruneLedger(beforeMicros: rows[6].timeMicros, key: key, at: Date())["w"] == nil)
        _ = try await store.pruneLedger(beforeMicros: Int64.max, key: key, at: Date())
        report = try await store.verifyLedger(checkpointKey: key)
        #expect(report.intact && report.rows == 0 && report.checkpoints == 2)
        // another key's view: every checkpoint fails, named
        report = try await store.verifyLedger(checkpointKey: LedgerCheckpointKey())
        #expect(report.breaks.count == 2 && report.breaks.allSatisfy { $0.problem.contains("not validly signed") })
    }

    @Test func rowsRemovedWithoutACheckpointOrEditedBeforeACutAreNamed() async throws {
        let (store, dir) = try fileStore()
        defer { dir.remove() }
        let rows = try Self.chain("w", count: 6)
        _ = try await store.ingestLedger(writer: "w", uploader: "u", rows: rows, at: Date())
        let key = LedgerCheckpointKey()
        func sql(_ statement: String) throws { try Self.tamper(store, statement) }
        // an edited row is never laundered by retention: the writer is left alone and reported
        try sql("UPDATE ledger_rows SET line = CAST(replace(CAST(line AS TEXT), '/orders/2', '/orders/9') AS BLOB) WHERE writer = 'w' AND seq = 2")
        let refused = try await store.pruneLedger(beforeMicros: rows[4].timeMicros, key: key, at: Date())
        #expect(refused["w"]?.checkpoint == nil && refused["w"]?.refused?.contains("row seq 2") == true)
        #expect(try await store.verifyLedger(checkpointKey: key).breaks.map(\.seq) == [2])  // still there, still named
        // the oldest rows deleted by hand and the head moved as retention would: no checkpoint, named
        try sql("DELETE FROM ledger_rows WHERE writer = 'w' AND seq <= 3")
        try sql("UPDATE ledger_writers SET first_seq = 4 WHERE writer = 'w'")
        let report = try await store.verifyLedger(checkpointKey: key)
        #expect(report.breaks.count == 1 && report.breaks[0].seq == 4 && report.breaks[0].problem.contains("without a signed retention checkpoint"))
    }
}
