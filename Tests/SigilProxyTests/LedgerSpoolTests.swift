import Testing
import Crypto
import Foundation
import Logging
import SigilCore
@testable import SigilProxy

/// The spool is the proxy's part of the ledger: rows go to disk as JSON lines, each hash-chained to
/// the one before, and the chain survives a restart.
struct LedgerSpoolTests {
    func tempFile() -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("spool-\(UUID().uuidString).jsonl").path
    }

    func row(_ path: String, status: Int = 200) -> LedgerRecord {
        LedgerRecord(kind: .request, timeMicros: 1_764_000_000_123_456, source: "spiffe://td/ns/a/sa/b", destination: "spiffe://td/ns/c/sa/d",
                     method: "GET", path: path, status: status, decision: "allow", policy: "c/p", rule: 0, mtls: true)
    }

    func lines(_ path: String) throws -> [[String: Any]] {
        try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any]
        }
    }

    @Test("rows are JSON, numbered, and hash-chained across a restart")
    func chain() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        do {
            let spool = try LedgerSpool(path: path, writer: "w1", logger: Logger(label: "test"))
            spool.append(row("/a"))
            spool.append(row("/quote\"and\\slash\nnewline"))
            #expect(spool.flush() == 2)
        }
        do {
            let reopened = try LedgerSpool(path: path, writer: "w1", logger: Logger(label: "test"))
            reopened.append(row("/c", status: 403))
            #expect(reopened.flush() == 1)
        }
        let rows = try lines(path)
        #expect(rows.count == 3)
        #expect(rows.map { $0["seq"] as? Int } == [1, 2, 3])
        #expect(rows[1]["path"] as? String == "/quote\"and\\slash\nnewline")
        #expect(rows[0]["time"] as? String == "2025-11-24T16:00:00.123456Z")
        var previous = String(repeating: "0", count: 64)
        let text = try String(contentsOfFile: path, encoding: .utf8)
        for line in text.split(separator: "\n") {
            // hash = sha256 of the line up to (not including) `,"hash":`
            let cut = line.range(of: ",\"hash\":")!
            let body = String(line[..<cut.lowerBound])
            let stated = (try JSONSerialization.jsonObject(with: Data(line.utf8)) as! [String: Any])
            #expect(stated["prev"] as? String == previous)
            let digest = SHA256.hash(data: Array(body.utf8)).map { String(format: "%02x", $0) }.joined()
            #expect(stated["hash"] as? String == digest)
            previous = digest
        }
    }

    @Test("flushes racing from several threads keep one unbroken chain in file order")
    func concurrentFlushes() async throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let spool = try LedgerSpool(path: path, writer: "w", syncInterval: .seconds(60), logger: Logger(label: "test"))
        await withTaskGroup(of: Void.self) { group in
            for t in 0..<4 {
                group.addTask {
                    for i in 0..<250 {
                        spool.append(row("/t\(t)/\(i)"))
                        if i % 7 == 0 { spool.flush(sync: i % 2 == 0) }
                    }
                }
            }
        }
        spool.flush()
        let rows = try lines(path)
        #expect(rows.count == 1000)
        #expect(rows.map { $0["seq"] as? Int } == Array(1...1000))
        for (earlier, later) in zip(rows, rows.dropFirst()) {
            #expect(later["prev"] as? String == earlier["hash"] as? String)
        }
        #expect(spool.writtenCount == 1000)
    }

    @Test("a failed write loses no row: they stay queued, chained, for the next flush")
    func failedWriteKeepsRows() throws {
        // /dev/full fails every write with ENOSPC.
        let spool = try LedgerSpool(path: "/dev/full", writer: "w", capacity: 3, logger: Logger(label: "test"))
        for i in 0..<3 { spool.append(row("/\(i)")) }
        #expect(spool.flush() == 0)
        #expect(spool.flush() == 0)
        #expect(spool.writtenCount == 0)
        #expect(spool.pendingCount == 3)
        // The three rows were put back, so the spool is still full and refuses a fourth.
        spool.append(row("/3"))
        #expect(spool.pendingCount == 3)
    }

    @Test("a full spool refuses rows instead of growing without bound")
    func bounded() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let spool = try LedgerSpool(path: path, writer: "w", capacity: 3, logger: Logger(label: "test"))
        for i in 0..<5 { spool.append(row("/\(i)")) }
        #expect(spool.flush() == 3)
        #expect(spool.writtenCount == 3)
    }

    @Test("the spool's byte-level row is the record's JSON, and parses back to every field")
    func spoolRowMatchesRecordJSON() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let record = LedgerRecord(kind: .request, timeMicros: -1, source: nil, destination: "spiffe://td/ns/c/sa/d",
                                  sourceIP: "10.0.0.1", port: 0, proto: "h2", method: "POST", path: "/ctl\u{01}é",
                                  host: "h:8080", status: 503, decision: "deny", policy: nil, rule: nil, mtls: false,
                                  bytesIn: Int.max, bytesOut: 0, durationMicros: Int64.min, detail: "tab\tquote\"")
        let spool = try LedgerSpool(path: path, writer: "w\"x", logger: Logger(label: "test"))
        spool.append(record)
        #expect(spool.flush() == 1)
        let line = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n")[0]
        let expected = record.json(writer: "w\"x", seq: 1, prev: String(repeating: "0", count: 64))
        #expect(line.hasPrefix(expected + ",\"hash\":\""))
        let row = try lines(path)[0]
        #expect(row["time"] as? String == "1969-12-31T23:59:59.999999Z")
        #expect(row["path"] as? String == "/ctl\u{01}é")
        #expect(row["detail"] as? String == "tab\tquote\"")
        #expect(row["bytes_in"] as? Int == Int.max)
        #expect((row["duration_us"] as? NSNumber)?.int64Value == Int64.min)
        #expect(row["source"] is NSNull)
        #expect(row["port"] as? Int == 0)
    }

    @Test("decimal and hex digits without String building", arguments: [
        (Int64(0), "0"), (Int64(7), "7"), (Int64(-42), "-42"), (Int64.max, "9223372036854775807"),
        (Int64.min, "-9223372036854775808"),
    ])
    func decimal(value: Int64, text: String) {
        var out: [UInt8] = []
        JSONText.appendDecimal(value, to: &out)
        #expect(String(decoding: out, as: UTF8.self) == text)
        var big: [UInt8] = []
        JSONText.appendDecimal(UInt64.max, to: &big)
        #expect(String(decoding: big, as: UTF8.self) == "18446744073709551615")
        #expect(hex([0x00, 0x0f, 0xa5, 0xff]) == "000fa5ff")
        #expect(hex(Array<UInt8>().lazy.map { $0 }) == "")
    }

    @Test("RFC 3339 formatting", arguments: [
        (Int64(-1), "1969-12-31T23:59:59.999999Z"),
        (Int64(0), "1970-01-01T00:00:00.000000Z"),
        (Int64(951_782_400_000_001), "2000-02-29T00:00:00.000001Z"),
        (Int64(4_102_444_799_999_999), "2099-12-31T23:59:59.999999Z"),
    ])
    func rfc3339(micros: Int64, text: String) {
        #expect(RFC3339.format(micros: micros) == text)
    }
}
