import Testing
import Crypto
import Foundation
import Logging
import NIOCore
import NIOPosix
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

    @Test("each proxy instance writes under its own name: a random suffix kept beside the spool; an older spool keeps its rows' name")
    func instanceWriterNames() throws {
        let base = "proxy:shop/app=api,tier=b@8443"
        let first = tempFile(), second = tempFile()
        defer { for p in [first, second] { unlink(p); unlink(p + ".writer") } }
        let a = try LedgerSpool.instanceWriter(base: base, spoolPath: first)
        let b = try LedgerSpool.instanceWriter(base: base, spoolPath: second)
        #expect(a.hasPrefix(base + "~") && a.utf8.count == base.utf8.count + 13)
        #expect(a != b)  // two replicas of one workload: two chains
        _ = try LedgerSpool(path: first, writer: a, logger: Logger(label: "test")).append(row("/y"))
        #expect(try LedgerSpool.instanceWriter(base: base, spoolPath: first) == a)  // a restart with rows keeps it
        let old = tempFile()
        defer { unlink(old); unlink(old + ".writer") }
        let spool = try LedgerSpool(path: old, writer: base, logger: Logger(label: "test"))
        _ = spool.append(row("/x"))
        #expect(try LedgerSpool.instanceWriter(base: base, spoolPath: old) == base)
        // A deleted spool starts a new chain under a new name (the old name's chain is stored).
        unlink(first)
        let renamed = try LedgerSpool.instanceWriter(base: base, spoolPath: first)
        #expect(renamed != a && renamed.hasPrefix(base + "~"))
    }

    @Test("a DEL byte in a recorded field is escaped: every row is printable and the server reads it")
    func deleteIsEscaped() throws {
        let path = tempFile()
        defer { unlink(path) }
        let spool = try LedgerSpool(path: path, writer: "proxy:t", logger: Logger(label: "test"))
        _ = spool.append(row("/a\u{7f}b"))
        let bytes = try #require(FileManager.default.contents(atPath: path))
        #expect(!bytes.contains(0x7F))
        #expect(String(decoding: bytes, as: UTF8.self).contains(#""path":"/a\u007fb""#))
        #expect(try lines(path).first?["path"] as? String == "/a\u{7f}b")
    }

    @Test("rows are JSON, numbered, and hash-chained across a restart")
    func chain() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        do {
            let spool = try LedgerSpool(path: path, writer: "w1", logger: Logger(label: "test"))
            #expect(spool.append(row("/a")) == .written)
            #expect(spool.append(row("/quote\"and\\slash\nnewline")) == .written)
            spool.finalFlush()
        }
        do {
            let reopened = try LedgerSpool(path: path, writer: "w1", logger: Logger(label: "test"))
            #expect(reopened.append(row("/c", status: 403)) == .written)
        }
        let rows = try lines(path)
        #expect(rows.count == 3)
        #expect(rows.map { $0["seq"] as? Int } == [1, 2, 3])
        #expect(rows[1]["path"] as? String == "/quote\"and\\slash\nnewline")
        #expect(rows[0]["time"] as? String == "2025-11-24T16:00:00.123456Z")
        try checkChain(path, from: 1, prev: String(repeating: "0", count: 64))
    }

    @Test("a torn last row is cut back and the chain goes on; a whole last row without seq and hash refuses to open")
    func tornTail() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        do {
            let spool = try LedgerSpool(path: path, writer: "w1", logger: Logger(label: "test"))
            #expect(spool.append(row("/a")) == .written)
            #expect(spool.append(row("/b")) == .written)
        }
        let whole = try String(contentsOfFile: path, encoding: .utf8)
        try (whole + "{\"writer\":\"w1\",\"source\":nu").write(toFile: path, atomically: false, encoding: .utf8)
        do {
            let reopened = try LedgerSpool(path: path, writer: "w1", logger: Logger(label: "test"))
            #expect(reopened.lastSeq == 2)
            #expect(reopened.append(row("/c")) == .written)
        }
        #expect(try checkChain(path, from: 1, prev: String(repeating: "0", count: 64)).count == 3)
        try (whole + "not a row\n").write(toFile: path, atomically: false, encoding: .utf8)
        #expect(throws: LedgerSpool.SpoolError.self) { try LedgerSpool(path: path, writer: "w1", logger: Logger(label: "test")) }
    }

    /// Every line's hash is SHA-256 of the line up to `,"hash":`, its prev the hash before it, its
    /// seq one more than the one before. Returns the rows.
    @discardableResult
    func checkChain(_ path: String, from firstSeq: Int, prev: String) throws -> [[String: Any]] {
        var previous = prev
        var seq = firstSeq
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(text.hasSuffix("\n"))
        var rows: [[String: Any]] = []
        for line in text.split(separator: "\n") {
            let cut = line.range(of: ",\"hash\":")!
            let body = String(line[..<cut.lowerBound])
            let stated = (try JSONSerialization.jsonObject(with: Data(line.utf8)) as! [String: Any])
            #expect(stated["prev"] as? String == previous)
            #expect(stated["seq"] as? Int == seq)
            let digest = SHA256.hash(data: Array(body.utf8)).map { String(format: "%02x", $0) }.joined()
            #expect(stated["hash"] as? String == digest)
            previous = digest
            seq += 1
            rows.append(stated)
        }
        return rows
    }

    @Test("a row is in the file when append returns: no flush, no background thread")
    func rowInFileOnReturn() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let spool = try LedgerSpool(path: path, writer: "w", syncInterval: .seconds(60), logger: Logger(label: "test"))
        for i in 1...5 {
            #expect(spool.append(row("/\(i)")) == .written)
            // Read through another descriptor right away: what a SIGKILL would leave behind.
            let rows = try lines(path)
            #expect(rows.count == i)
            #expect(rows.last?["path"] as? String == "/\(i)")
        }
        #expect(spool.writtenCount == 5)
        #expect(spool.size == Int(try FileManager.default.attributesOfItem(atPath: path)[.size] as! UInt64))
    }

    @Test("appends racing from several threads keep one unbroken chain in file order")
    func concurrentAppends() async throws {
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
        let rows = try checkChain(path, from: 1, prev: String(repeating: "0", count: 64))
        #expect(rows.count == 1000)
        #expect(spool.writtenCount == 1000)
    }

    func bodies(_ paths: [String]) -> [[UInt8]] {
        paths.map { path in
            var body: [UInt8] = []
            row(path).appendBody(to: &body)
            return body
        }
    }

    @Test("a request row written part by part, the connection's part serialized once, is the record's body byte for byte")
    func rowParts() throws {
        let peer = PeerInfo(spiffeID: "spiffe://td/ns/a/sa/\"quoted\"\\x", principal: nil, serial: "0a1b", sourceIP: "127.0.0.1",
                            destinationIP: nil, mtls: true, ownID: "spiffe://td/ns/b/sa/api", xfcc: nil, sni: nil)
        var parties: [UInt8] = []
        peer.appendLedgerParties(port: 8080, to: &parties)
        let record = LedgerRecord(kind: .request, timeMicros: 1_700_000_000_123_456, source: peer.spiffeID, destination: peer.ownID,
                                  peerSerial: "0a1b", sourceIP: "127.0.0.1", port: 8080, proto: "h2", method: "GET", path: "/a\tb",
                                  host: nil, status: 200, decision: "allow", policy: "ns/p", rule: 0, mtls: true,
                                  bytesIn: 3, bytesOut: 4, durationMicros: 5, detail: nil)
        var expected: [UInt8] = []
        record.appendBody(to: &expected)
        var parts: [UInt8] = []
        parts.append(contentsOf: parties)
        LedgerRecord.appendBodyStart(to: &parts, kind: .request, timeMicros: record.timeMicros)
        LedgerRecord.appendBodyRest(to: &parts, proto: "h2", method: "GET", path: "/a\tb", host: nil, status: 200, decision: "allow",
                                    policy: "ns/p", rule: 0, mtls: true, bytesIn: 3, bytesOut: 4, durationMicros: 5, detail: nil)
        #expect(parts == expected)
        // The format itself, field by field (what spools, the server and `sigil audit verify` read).
        let golden = #","source":"spiffe://td/ns/a/sa/\"quoted\"\\x","# +
            #""destination":"spiffe://td/ns/b/sa/api","peer_serial":"0a1b","source_ip":"127.0.0.1","port":8080,"# +
            #""time":"2023-11-14T22:13:20.123456Z","kind":"request","protocol":"h2","# +
            #""method":"GET","path":"/a\tb","host":null,"status":200,"decision":"allow","policy":"ns/p","rule":0,"# +
            #""mtls":true,"bytes_in":3,"bytes_out":4,"duration_us":5,"detail":null"#
        #expect(String(decoding: expected, as: UTF8.self) == golden)
        // The proxy's own path, from a request's facts, with the connection's part prepared or not
        // (its duration is its own: compared apart).
        var facts = RequestFacts(method: "GET", path: "/a\tb", host: nil, proto: "h2", startMicros: record.timeMicros,
                                 decision: AuthorizationDecision(allowed: true, policy: "ns/p", rule: 0))
        facts.status = 200
        facts.bytesIn = 3
        facts.bytesOut = 4
        var unprepared: [UInt8] = []
        let unpreparedHash = facts.appendLedgerRow(peer: peer, writer: "w", detail: nil, port: 8080, to: &unprepared)
        var prefix: [UInt8] = []
        let prefixHash = LedgerChain.appendUnsealed(writer: "w", to: &prefix) { $0.append(contentsOf: parties) }
        let prepared = PeerInfo(spiffeID: peer.spiffeID, principal: peer.principal, serial: peer.serial, sourceIP: peer.sourceIP,
                                destinationIP: peer.destinationIP, mtls: peer.mtls, ownID: peer.ownID, xfcc: peer.xfcc, sni: peer.sni,
                                ledgerPrefix: prefix, ledgerPrefixHash: prefixHash)
        var fromPrepared: [UInt8] = []
        let preparedHash = facts.appendLedgerRow(peer: prepared, writer: "w", detail: nil, port: 8080, to: &fromPrepared)
        func fixedDuration(_ bytes: [UInt8]) -> String {
            String(decoding: bytes, as: UTF8.self).replacing(/"duration_us":\d+/, with: #""duration_us":5"#)
        }
        #expect(fixedDuration(unprepared) == #"{"writer":"w""# + golden)
        #expect(fixedDuration(fromPrepared) == #"{"writer":"w""# + golden)
        // Either way the hash carried with the bytes is the hash of those bytes: sealed, each row
        // checks (the prepared one continues the connection's hash from its prefix).
        for (bytes, partial) in [(unprepared, unpreparedHash), (fromPrepared, preparedHash)] {
            var line = bytes
            var hash: [UInt8] = []
            LedgerChain.seal(partial, seq: 1, prev: Array(LedgerChain.genesis.utf8), to: &line, hash: &hash)
            let (stated, computed) = try LedgerChain.hashes(of: line)
            #expect(stated == computed && stated == String(decoding: hash, as: UTF8.self))
        }
    }

    @Test("a batch of rows is chained in order and written at once; at the size limit the rest is held")
    func batchAppend() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let spool = try LedgerSpool(path: path, writer: "w", capacity: 100, maxSize: 4096, logger: Logger(label: "test"))
        #expect(spool.append(bodies: bodies(["/1", "/2", "/3"])) == (.written, 3))
        #expect(spool.append(row("/4")) == .written)
        #expect(try checkChain(path, from: 1, prev: String(repeating: "0", count: 64)).map { $0["path"] as? String } == ["/1", "/2", "/3", "/4"])
        // Forty rows do not fit in 4 KiB: those that fit are written, the rest held in order.
        let result = spool.append(bodies: bodies((5...44).map { "/\($0)" }))
        #expect(result.outcome == .held)
        #expect(result.written > 0 && result.written < 40)
        #expect(spool.heldCount == 40 - result.written)
        #expect(spool.isFull)
        let rows = try checkChain(path, from: 1, prev: String(repeating: "0", count: 64))
        #expect(rows.count == 4 + result.written)
        #expect(rows.last?["path"] as? String == "/\(4 + result.written)")
    }

    /// Hears when its row is written and looks at the file right then.
    /// Confined to the test's event loop.
    final class FileWatcher: LedgerRowWaiter, @unchecked Sendable {
        let path: String
        var linesSeen: [Int] = []
        init(path: String) { self.path = path }
        func ledgerRowWritten() {
            linesSeen.append((try? String(contentsOfFile: path, encoding: .utf8))?.split(separator: "\n").count ?? 0)
        }
    }

    /// A spool in a temporary file and one event loop with its ledger batch, for `body`.
    func withLoopBatch(_ body: (String, any EventLoop, LedgerBatches) throws -> Void) throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let spool = try LedgerSpool(path: path, writer: "w", logger: Logger(label: "test"))
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        try body(path, group.next(), LedgerBatches(group: group, spool: spool))
    }

    /// A connection's row when it ends has nothing waiting on it: it goes out with the rows of its
    /// iteration, in the order added, and a batch of such rows alone is still written.
    @Test("a row nothing waits for goes out with its iteration's rows")
    func rowWithoutWaiter() throws {
        try withLoopBatch { path, loop, batches in
            let (before, later) = try loop.submit { () -> (String?, EventLoopFuture<[[Int]]>) in
                let batch = batches.batch(for: loop)!
                let first = FileWatcher(path: path), last = FileWatcher(path: path)
                batch.add(self.row("/a"), waiter: first)
                self.addAlone(batch, "/connection")
                batch.add(self.row("/b"), waiter: last)
                let before = try? String(contentsOfFile: path, encoding: .utf8)
                return (before, loop.submit { [first, last].map(\.linesSeen) })
            }.wait()
            #expect(before == "")
            #expect(try later.wait() == [[3], [3]])  // each waiter released once, all three rows in the file
            let lines = try loop.submit { () -> EventLoopFuture<Int> in
                self.addAlone(batches.batch(for: loop)!, "/alone")
                return loop.submit { (try? String(contentsOfFile: path, encoding: .utf8))?.split(separator: "\n").count ?? 0 }
            }.wait().wait()
            #expect(lines == 4)
            let rows = try checkChain(path, from: 1, prev: String(repeating: "0", count: 64))
            #expect(rows.map { $0["path"] as? String } == ["/a", "/connection", "/b", "/alone"])
        }
    }

    /// Adds a row to `batch` with nothing waiting on it (as a closed connection's row is added).
    func addAlone(_ batch: LedgerBatch, _ path: String) {
        let row = self.row(path)
        batch.add(waiter: nil) { LedgerChain.appendUnsealed(writer: batch.writer, to: &$0) { row.appendBody(to: &$0) } }
    }

    @Test("rows completed in one event-loop iteration go out in one write, before any waiter is released")
    func loopBatch() throws {
        try withLoopBatch { path, loop, batches in
            let (before, releasedEarly, later) = try loop.submit { () -> (String?, Bool, EventLoopFuture<[[Int]]>) in
                let batch = batches.batch(for: loop)!
                let watchers = (0..<5).map { _ in FileWatcher(path: path) }
                for (i, watcher) in watchers.enumerated() { batch.add(self.row("/\(i)"), waiter: watcher) }
                // Nothing is written, and no waiter released, until the iteration's task runs.
                let before = try? String(contentsOfFile: path, encoding: .utf8)
                return (before, !watchers.allSatisfy { $0.linesSeen.isEmpty }, loop.submit { watchers.map(\.linesSeen) })
            }.wait()
            #expect(before == "")
            #expect(!releasedEarly)
            let seen = try later.wait()
            #expect(seen == Array(repeating: [5], count: 5))  // each released once, with all five rows in the file
            #expect(try checkChain(path, from: 1, prev: String(repeating: "0", count: 64)).count == 5)
            // The next iteration reuses the batch's buffer: its rows are whole and follow in order,
            // and a waiter released in it hears of its own rows only.
            let second = try loop.submit { () -> EventLoopFuture<[[Int]]> in
                let batch = batches.batch(for: loop)!
                let watchers = (0..<3).map { _ in FileWatcher(path: path) }
                for (i, watcher) in watchers.enumerated() {
                    let row = self.row("/second/\(i)")
                    batch.add(waiter: watcher) { LedgerChain.appendUnsealed(writer: batch.writer, to: &$0) { row.appendBody(to: &$0) } }
                }
                return loop.submit { watchers.map(\.linesSeen) }
            }.wait().wait()
            #expect(second == Array(repeating: [8], count: 3))
            let rows = try checkChain(path, from: 1, prev: String(repeating: "0", count: 64))
            #expect(rows.map { $0["path"] as? String } == (0..<5).map { "/\($0)" } + (0..<3).map { "/second/\($0)" })
        }
    }

    /// Runs `onRelease` (once) when its row is written: a response whose release completes another request.
    final class ChainedWatcher: LedgerRowWaiter, @unchecked Sendable {
        let watcher: FileWatcher
        var onRelease: (() -> Void)?
        init(path: String, onRelease: (() -> Void)?) {
            watcher = FileWatcher(path: path)
            self.onRelease = onRelease
        }
        func ledgerRowWritten() {
            watcher.ledgerRowWritten()
            let next = onRelease
            onRelease = nil
            next?()
        }
    }

    @Test("a release that adds a row and writes the batch again releases every waiter once, each after its row")
    func reentrantRelease() throws {
        try withLoopBatch { path, loop, batches in
            let seen = try loop.submit { () -> EventLoopFuture<[[Int]]> in
                let batch = batches.batch(for: loop)!
                let nested = ChainedWatcher(path: path, onRelease: nil)
                let first = ChainedWatcher(path: path) {
                    batch.add(self.row("/b"), waiter: nested)
                    batch.writeNow()
                }
                let third = ChainedWatcher(path: path, onRelease: nil)
                batch.add(self.row("/a"), waiter: first)
                batch.add(self.row("/c"), waiter: third)
                // A later batch: a waiter left behind in the batch would be released again with it.
                let later = ChainedWatcher(path: path, onRelease: nil)
                return loop.submit { batch.add(self.row("/d"), waiter: later) }
                    .flatMap { loop.submit { [first, nested, third, later].map(\.watcher.linesSeen) } }
            }.wait().wait()
            // Each waiter released once: /a's after /a and /c went out together (2 rows), /b's after
            // /b (3), and /c's, released after /a's nested write, with all three in the file.
            #expect(seen == [[2], [3], [3], [4]])
            #expect(try checkChain(path, from: 1, prev: String(repeating: "0", count: 64)).map { $0["path"] as? String } == ["/a", "/c", "/b", "/d"])
        }
    }

    @Test("at its size limit the spool is full: rows are held, then dropped, and the file never passes the limit")
    func fullAtLimit() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let metrics = ProxyMetrics()
        let spool = try LedgerSpool(path: path, writer: "w", capacity: 2, maxSize: 4096, metrics: metrics, logger: Logger(label: "test"))
        var written = 0
        while spool.append(row("/fill/\(written)")) == .written { written += 1 }
        #expect(written > 3)
        #expect(spool.isFull)
        #expect(spool.heldCount == 1)  // the row that did not fit
        #expect(spool.append(row("/next")) == .held)
        #expect(spool.append(row("/lost")) == .dropped)
        #expect(spool.droppedCount == 1)
        spool.flush()  // a retry cannot make room: still full
        #expect(spool.isFull)
        let size = Int(try FileManager.default.attributesOfItem(atPath: path)[.size] as! UInt64)
        #expect(size <= 4096)
        #expect(size == spool.size)
        #expect(try checkChain(path, from: 1, prev: String(repeating: "0", count: 64)).count == written)
        let text = metrics.text()
        spool.flush()  // the background thread's tick updates the size gauge
        #expect(text.contains("sigil_proxy_ledger_spool_full 1.0\n"))
        #expect(text.contains("sigil_proxy_ledger_rows_total \(written)\n"))
        #expect(text.contains("sigil_proxy_ledger_dropped_rows_total 1\n"))
        #expect(metrics.text().contains("sigil_proxy_ledger_spool_bytes \(Double(size))\n"))
        // A restart over a spool at its limit starts full.
        let reopened = try LedgerSpool(path: path, writer: "w", maxSize: size, logger: Logger(label: "test"))
        #expect(reopened.isFull)
        #expect(reopened.append(row("/after-restart")) == .held)
    }

    @Test("the spool is started over only when every row in it is shipped, and only when large enough or full")
    func rotationOnlyWhenShipped() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let spool = try LedgerSpool(path: path, writer: "w", logger: Logger(label: "test"))
        for i in 1...10 { spool.append(row("/\(i)")) }
        let before = try lines(path)
        #expect(spool.rotate(shippedThrough: 9, minimumSize: 0) == nil)  // row 10 is not shipped yet
        #expect(spool.rotate(shippedThrough: 10, minimumSize: 1 << 30) == nil)  // small and not full
        #expect(try lines(path).count == 10)
        #expect(spool.rotate(shippedThrough: 10, minimumSize: 0) == 11)
        let after = try checkChain(path, from: 11, prev: before[9]["hash"] as! String)
        #expect(after.count == 1)
        #expect(after[0]["kind"] as? String == "spool_rotated")
        #expect((after[0]["detail"] as? String)?.contains("rows 1..10 were shipped") == true)
        #expect(!FileManager.default.fileExists(atPath: path + ".rotating"))
        // Rows go on into the new file (the descriptor follows the rename).
        #expect(spool.append(row("/12")) == .written)
        #expect(try checkChain(path, from: 11, prev: before[9]["hash"] as! String).count == 2)
    }

    @Test("a full spool recovers after a rotation: held rows follow the rotated row, in order")
    func recoveryAfterRotation() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let spool = try LedgerSpool(path: path, writer: "w", capacity: 10, maxSize: 4096, logger: Logger(label: "test"))
        var written = 0
        while spool.append(row("/fill/\(written)")) == .written { written += 1 }
        #expect(spool.append(row("/held/2")) == .held)
        #expect(spool.isFull && spool.heldCount == 2)
        let last = try lines(path).last!["hash"] as! String
        // Full, so even a small spool is rotated once everything in the file is shipped.
        #expect(spool.rotate(shippedThrough: UInt64(written), minimumSize: 1 << 30) == UInt64(written + 1))
        #expect(!spool.isFull)
        #expect(spool.heldCount == 0)
        let rows = try checkChain(path, from: written + 1, prev: last)
        #expect(rows.map { $0["kind"] as? String } == ["spool_rotated", "request", "request"])
        #expect(rows.dropFirst().map { $0["path"] as? String } == ["/fill/\(written)", "/held/2"])
        #expect(spool.append(row("/after")) == .written)
    }

    @Test("a failed write leaves no half row and loses no row: it is held, unchained, and the spool is full")
    func failedWriteKeepsRows() throws {
        // /dev/full fails every write with ENOSPC.
        let spool = try LedgerSpool(path: "/dev/full", writer: "w", capacity: 3, logger: Logger(label: "test"))
        for i in 0..<3 { #expect(spool.append(row("/\(i)")) == .held) }
        #expect(spool.isFull)
        #expect(spool.flush() == 0)  // the background retry fails too
        #expect(spool.writtenCount == 0)
        #expect(spool.lastSeq == 0)  // the chain did not advance past rows that are not in the file
        #expect(spool.heldCount == 3)
        #expect(spool.append(row("/3")) == .dropped)  // the memory buffer is bounded too
        #expect(spool.heldCount == 3)
    }

    @Test("a restart after a rotation continues the chain from the rotated file's last row")
    func restartAfterRotation() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        var hash10 = ""
        do {
            let spool = try LedgerSpool(path: path, writer: "w", logger: Logger(label: "test"))
            for i in 1...10 { spool.append(row("/\(i)")) }
            hash10 = try lines(path).last!["hash"] as! String
            #expect(spool.rotate(shippedThrough: 10, minimumSize: 0) == 11)
            spool.append(row("/12"))
            spool.finalFlush()
        }
        let reopened = try LedgerSpool(path: path, writer: "w", logger: Logger(label: "test"))
        #expect(reopened.lastSeq == 12)
        #expect(reopened.append(row("/13")) == .written)
        let rows = try checkChain(path, from: 11, prev: hash10)
        #expect(rows.map { $0["seq"] as? Int } == [11, 12, 13])
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
        #expect(spool.append(record) == .written)
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
        (Int64(253_402_300_799_999_999), "9999-12-31T23:59:59.999999Z"),
        // Outside the fixed-width years, digit by digit (never a ledger's time, never a crash).
        (Int64(253_402_300_800_000_000), "10000-01-01T00:00:00.000000Z"),
        (Int64(-62_167_219_200_000_001), "-0001-12-31T23:59:59.999999Z"),
    ])
    func rfc3339(micros: Int64, text: String) {
        #expect(RFC3339.format(micros: micros) == text)
    }

    @Test("a shipper's cursor check finds the seq of a row longer than one read (seq is near the row's end)")
    func seqOfLongRow() throws {
        let path = tempFile()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let spool = try LedgerSpool(path: path, writer: "w", logger: Logger(label: "test"))
        #expect(spool.append(row("/short")) == .written)
        let offset = LedgerShipper.fileSize(path)
        #expect(spool.append(row("/" + String(repeating: "x", count: 40_000))) == .written)
        #expect(spool.append(row("/after")) == .written)
        #expect(LedgerShipper.seqOfLine(at: 0, in: path) == 1)
        #expect(LedgerShipper.seqOfLine(at: offset, in: path) == 2)
        #expect(LedgerShipper.seqOfLine(at: offset + 1, in: path) == nil)  // not the start of a row
    }

    @Test("RFC 3339 formatting at the ends of Int64 neither traps nor loses the shape")
    func rfc3339Extremes() {
        for micros in [Int64.min, Int64.min + 1, Int64.max] {
            let text = RFC3339.format(micros: micros)
            #expect(text.hasSuffix("Z") && text.contains("T"), "\(micros): \(text)")
        }
        #expect(RFC3339.format(micros: -1_000_000) == "1969-12-31T23:59:59.000000Z")
        #expect(RFC3339.format(micros: -1_000_001) == "1969-12-31T23:59:58.999999Z")
    }
}

extension LedgerBatch {
    /// Adds a row built as a record (the proxy serializes its rows straight into the batch).
    func add(_ row: LedgerRecord, waiter: any LedgerRowWaiter) {
        let writer = self.writer
        add(waiter: waiter) { LedgerChain.appendUnsealed(writer: writer, to: &$0) { row.appendBody(to: &$0) } }
    }
}
