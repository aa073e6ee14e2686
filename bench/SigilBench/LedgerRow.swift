// sigil-bench ledger-row [--count N]: what one proxied request's ledger row costs on one core,
// step by step, in the order the proxy pays it (docs/benchmarks.md, the ledger's cost):
//   body      the row up to its seq as JSON, and its SHA-256 continued from the connection's part
//             (serialized and hashed once per connection, as the proxy does): on the event loop
//   chain     seq, prev, the end of the SHA-256 and its hex, the copy into the write buffer (what
//             the spool does under its lock); sha256 beside it: one SHA-256 over all the bytes
//             the chain covers, as if nothing had been hashed before the lock
//   write/N   one write(2) of N chained rows to an O_APPEND file on the work directory's disk, per row
import Crypto
import Foundation
import SigilCore

func runLedgerRow() throws {
    let count = argument("--count", 200_000)
    let source = "spiffe://bench.local/ns/bench/sa/client"
    let destination = "spiffe://bench.local/ns/bench/sa/server"
    var prefix: [UInt8] = []
    let prefixHash = LedgerChain.appendUnsealed(writer: destination, to: &prefix) {
        LedgerRecord.appendBodyParties(to: &$0, source: source, destination: destination,
                                       peerSerial: "5f0c2a9be1d3477f8a6b0c1d2e3f4a5b6c7d8e9f", sourceIP: "127.0.0.1", port: 8080)
    }
    var body: [UInt8] = []
    body.reserveCapacity(1024)
    var partial = prefixHash
    let start = Int64(Date().timeIntervalSince1970 * 1_000_000)
    func serialize(_ i: Int) {
        body.removeAll(keepingCapacity: true)
        body.append(contentsOf: prefix)
        partial = prefixHash
        let rest = body.count
        LedgerRecord.appendBodyStart(to: &body, kind: .request, timeMicros: start + Int64(i))
        LedgerRecord.appendBodyRest(to: &body, proto: "http/1.1", method: "GET", path: "/", host: "127.0.0.1:8080", status: 200,
                                    decision: "allow", policy: "bench/allow-client", rule: 0, mtls: true,
                                    bytesIn: 0, bytesOut: 612, durationMicros: Int64(180 + i % 50), detail: nil)
        partial.update(body[rest...])
    }
    let bodyTime = seconds { for i in 0..<count { serialize(i) } }

    var line: [UInt8] = []
    line.reserveCapacity(2048)
    var prev = Array(String(repeating: "0", count: 64).utf8)
    var next: [UInt8] = []
    next.reserveCapacity(64)
    func chain(_ seq: UInt64) {  // as the spool chains a row
        line.append(contentsOf: body)
        LedgerChain.seal(partial, seq: seq, prev: prev, to: &line, hash: &next)
        line.append(0x0A)
        swap(&prev, &next)
    }
    serialize(0)
    let chainTime = seconds { for i in 0..<count { line.removeAll(keepingCapacity: true); chain(UInt64(i + 1)) } }
    let rowBytes = line.count
    let hashed = line.count - 76  // what the chain hashes: the line before `,"hash":"…"}` and the newline
    let hashOnly = seconds {
        for _ in 0..<count { _ = SHA256.hash(data: line[..<hashed]) }
    }

    let path = FileManager.default.currentDirectoryPath + "/.sigil-bench-ledger-\(getpid()).jsonl"
    let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_TRUNC, 0o600)
    guard fd >= 0 else { fatalError("cannot open \(path): \(String(cString: strerror(errno)))") }
    unlink(path)  // nothing left behind, even if the run is interrupted
    defer { close(fd) }
    var writes: [(Int, Double)] = []
    for batch in [1, 4, 16] {
        line.removeAll(keepingCapacity: true)
        for i in 0..<batch { chain(UInt64(i + 1)) }
        let rounds = max(1, count / batch)
        let t = seconds {
            for _ in 0..<rounds {
                let n = line.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                // A short or failed write (a full disk) would make the figure meaningless.
                guard n == line.count else { fatalError("write returned \(n) of \(line.count) bytes: \(String(cString: strerror(errno)))") }
            }
        }
        _ = ftruncate(fd, 0)
        writes.append((batch, t / Double(rounds * batch)))
    }
    func ns(_ s: Double) -> String { String(format: "%.0f", s * 1e9) }
    print("ledger_row_bytes \(rowBytes)")
    print("body_ns \(ns(bodyTime / Double(count)))")
    print("chain_ns \(ns(chainTime / Double(count)))")
    print("sha256_of_row_ns \(ns(hashOnly / Double(count)))")
    for (batch, perRow) in writes { print("write_batch\(batch)_ns_per_row \(ns(perRow))") }
}
