import ArgumentParser
import Foundation
import SigilCA
import SigilCore
import SigilStore

struct AuditCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "Answer auditors from the ledger: who called whom, was it mTLS, was it allowed, is the record intact.",
        discussion: """
            The server stores every row the proxies ship (see `sigil proxy run --ledger-server`).
            These commands read the server's database in --data-dir directly (read-only; the
            server may be running).
            """,
        subcommands: [AuditVerify.self, AuditQuery.self, AuditGraph.self, AuditReport.self]
    )
}

/// Opens the server's ledger for reading; a clear error when there is none.
func openLedger(_ data: DataDirOption) throws -> SQLiteDatastore {
    let path = data.directory.databasePath
    guard FileManager.default.fileExists(atPath: path) else {
        throw ValidationError("no Sigil database at \(path): pass the server's --data-dir (or set SIGIL_DATA_DIR)")
    }
    do {
        return try SQLiteDatastore(path: path)
    } catch {
        throw ValidationError(error.message)
    }
}

/// `--since 24h` (that long ago) or an RFC 3339 time.
func parseAuditTime(_ text: String?, flag: String, now: Date = Date()) throws -> Int64? {
    guard let text else { return nil }
    guard let micros = RFC3339.micros(fromTimeOrAgo: text, nowMicros: Int64(now.timeIntervalSince1970 * 1_000_000)) else {
        throw ValidationError("\(flag) '\(text)': give a duration back from now (30m, 24h, 7d) or an RFC 3339 time (2026-12-01T00:00:00Z)")
    }
    return micros
}

struct AuditVerify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every ledger chain: each row's hash, seq continuity, prev links, stored columns, retention checkpoints.",
        discussion: """
            Exits 0 when every chain is intact; otherwise prints the first broken row of each
            broken writer (writer and seq) and exits 1. With --spool, checks proxy spool files
            instead of the server's store: each writer's rows start at seq 1 with the genesis prev,
            or, in a spool that was started over after shipping, at a spool_rotated row (seq > 1)
            whose prev is the hash of the last shipped row (the server's store has the rows before it).
            """
    )

    @OptionGroup var data: DataDirOption

    @Option(name: .long, help: ArgumentHelp("A proxy's ledger spool to check instead of the server's store (repeatable).", valueName: "file"))
    var spool: [String] = []

    @Flag(name: .long, help: "Print the result as JSON.")
    var json = false

    func run() async throws {
        var report: LedgerVerification
        var notes: [String] = []
        if spool.isEmpty {
            let store = try openLedger(data)
            let key: LedgerCheckpointKey?
            do {
                key = try LedgerCheckpointKeyFile.load(data.directory)
            } catch {
                throw ValidationError(error.message)
            }
            report = try await Self.verifyStore(store, key: key)
            if key == nil, report.checkpoints > 0 {
                report.breaks.append(.init(writer: "-", seq: 0, problem: "\(report.checkpoints) retention checkpoint(s) cannot be checked: no ledger checkpoint key at \(data.directory.ledgerCheckpointKeyPath)"))
            }
        } else {
            report = LedgerVerification()
            for path in spool { try Self.verifySpool(path, into: &report, notes: &notes) }
        }
        if json {
            var object: [String: Any] = ["intact": report.intact, "writers": report.writers, "rows": report.rows, "checkpoints": report.checkpoints,
                                         "breaks": report.breaks.map { ["writer": $0.writer, "seq": $0.seq, "problem": $0.problem] }]
            if !notes.isEmpty { object["notes"] = notes }
            print(String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self))
        } else if report.intact {
            let cuts = report.checkpoints == 0 ? "" : " (\(report.checkpoints) signed retention checkpoint\(report.checkpoints == 1 ? "" : "s") checked)"
            print("ledger intact: \(report.rows) rows from \(report.writers) writer\(report.writers == 1 ? "" : "s"), every chain verified\(cuts)")
            for note in notes { print("  \(note)") }
        } else {
            // Counted as problems, not writers: a line that is no row at all has no writer.
            let failing = Set(report.breaks.map(\.writer).filter { $0 != "-" && $0 != "?" }).count
            print("ledger BROKEN: \(report.breaks.count) problem\(report.breaks.count == 1 ? "" : "s") in \(failing) of \(report.writers) writer\(report.writers == 1 ? "" : "s") (\(report.rows) rows read)")
            for broken in report.breaks { print(terminalSafe("  \(broken)")) }
        }
        if !report.intact { throw NegativeAnswer(message: "") }
    }

    static func verifyStore(_ store: SQLiteDatastore, key: LedgerCheckpointKey?) async throws -> LedgerVerification {
        do {
            return try await store.verifyLedger(checkpointKey: key)
        } catch {
            throw ValidationError(error.message)
        }
    }

    /// Checks one spool file line by line (every writer in it keeps its own chain).
    static func verifySpool(_ path: String, into report: inout LedgerVerification, notes: inout [String]) throws {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ValidationError("cannot read the spool \(path)")
        }
        var chains: [String: (next: UInt64, hash: String)] = [:]
        var broken = Set<String>()
        for (number, line) in data.split(separator: 0x0A, omittingEmptySubsequences: false).enumerated() where !line.isEmpty {
            report.rows += 1
            do {
                let row = try LedgerRow.parse(line: line)
                if chains[row.writer] == nil { report.writers += 1 }
                guard !broken.contains(row.writer) else { continue }
                var chain = chains[row.writer] ?? (1, LedgerChain.genesis)
                if chains[row.writer] == nil, row.kind == LedgerRecord.Kind.spoolRotated.rawValue, row.seq > 1 {
                    // A spool started over after shipping: the rows before it are in the server's
                    // store; the chain goes on from the last of them (its hash is this row's prev).
                    chain = (row.seq, row.prev)
                    notes.append("\(path): writer \(row.writer) begins at seq \(row.seq) after rotation (rows 1..\(row.seq - 1) were shipped)")
                }
                do {
                    let hash = try LedgerChain.check(line: row.line, seq: row.seq, prev: row.prev, expectedSeq: chain.next, previousHash: chain.hash)
                    chains[row.writer] = (row.seq + 1, hash)
                } catch {
                    chains[row.writer] = chain
                    broken.insert(row.writer)
                    report.breaks.append(.init(writer: row.writer, seq: row.seq, problem: "\(error.description) (\(path) line \(number + 1))"))
                }
            } catch {
                report.breaks.append(.init(writer: "?", seq: 0, problem: "\(path) line \(number + 1): \(error.description)"))
            }
        }
    }
}

struct AuditFilter: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Only calls from this SPIFFE ID.", valueName: "id")) var from: String?
    @Option(name: .long, help: ArgumentHelp("Only calls to this SPIFFE ID.", valueName: "id")) var to: String?
    @Option(name: .long, help: ArgumentHelp("From this long ago (24h, 7d) or an RFC 3339 time.", valueName: "time")) var since: String?
    @Option(name: .long, help: ArgumentHelp("Up to this long ago or an RFC 3339 time (exclusive).", valueName: "time")) var until: String?

    func validate() throws {
        for (flag, value) in [("--from", from), ("--to", to)] {
            if let value {
                do { _ = try SpiffeID(value) } catch { throw ValidationError("\(flag) '\(value)' is not a SPIFFE ID: \(error)") }
            }
        }
        _ = try parseAuditTime(since, flag: "--since")
        _ = try parseAuditTime(until, flag: "--until")
    }
}

struct AuditQuery: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "query",
        abstract: "List ledger rows (oldest first) by caller, callee, time and decision.",
        discussion: """
            Examples:
              sigil audit query --to spiffe://example.org/ns/shop/sa/api --since 24h --decision deny
              sigil audit query --from spiffe://example.org/ns/shop/sa/web --json   # the rows as stored
            """
    )

    @OptionGroup var data: DataDirOption
    @OptionGroup var filter: AuditFilter
    @Option(name: .long, help: ArgumentHelp("allow or deny.", valueName: "decision")) var decision: String?
    @Option(name: .long, help: ArgumentHelp("Row kind: request, connection, policy_reload, kill_switch_on, …", valueName: "kind")) var kind: String?
    @Option(name: .long, help: ArgumentHelp("At most this many rows (the newest).", valueName: "n")) var limit: Int = 1000
    @Flag(name: .long, help: "Print each row as stored (JSON lines, hash chain included).") var json = false

    func validate() throws {
        if let decision, decision != "allow", decision != "deny" { throw ValidationError("--decision must be allow or deny, not '\(decision)'") }
        if limit < 1 { throw ValidationError("--limit must be at least 1") }
    }

    func run() async throws {
        let query = LedgerQuery(source: filter.from, destination: filter.to, sinceMicros: try parseAuditTime(filter.since, flag: "--since"),
                                untilMicros: try parseAuditTime(filter.until, flag: "--until"), decision: decision, kind: kind, limit: limit)
        let rows: [LedgerRow]
        do {
            rows = try await openLedger(data).ledgerRows(query)
        } catch let error as StoreError {
            throw ValidationError(error.message)
        }
        // A cut answer says so (on stderr, so JSON lines stay pure): the auditor must not take
        // the newest `limit` rows for all of them.
        let truncated = rows.count >= limit
            ? "; the newest \(limit) shown: more rows match (raise --limit, or narrow --since/--until)" : ""
        if json {
            for row in rows { print(String(decoding: row.line, as: UTF8.self)) }
            if !truncated.isEmpty { FileHandle.standardError.write(Data("\(rows.count) rows\(truncated)\n".utf8)) }
            return
        }
        for row in rows {
            let time = RFC3339.format(micros: row.timeMicros)
            let who = "\(row.source ?? "(plaintext)") -> \(row.destination ?? "?")"
            let what = [row.method, row.path].compactMap { $0 }.joined(separator: " ")
            let outcome = [row.decision, row.status.map(String.init)].compactMap { $0 }.joined(separator: " ")
            let policy = row.policy.map { " policy=\($0)\(row.rule.map { "#\($0)" } ?? "")" } ?? ""
            print(terminalSafe("\(time) \(row.kind) \(who) \(what.isEmpty ? "" : what + " ")\(outcome) \(row.mtls ? "mtls" : "plaintext")\(policy) \(row.durationMicros)us"))
        }
        FileHandle.standardError.write(Data("\(rows.count) row\(rows.count == 1 ? "" : "s")\(truncated)\n".utf8))
    }
}

struct AuditGraph: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "graph",
        abstract: "Who called whom: calls, denials, share over mTLS and p99 latency per edge.",
        discussion: """
            --format dot draws it with Graphviz: `sigil audit graph --format dot | dot -Tpng > calls.png`
            (mTLS edges solid, plaintext dashed, edges with denials red).
            """
    )

    enum Format: String, ExpressibleByArgument, CaseIterable { case text, json, dot }

    @OptionGroup var data: DataDirOption
    @Option(name: .long, help: ArgumentHelp("From this long ago (24h, 7d) or an RFC 3339 time.", valueName: "time")) var since: String?
    @Option(name: .long, help: ArgumentHelp("Up to this long ago or an RFC 3339 time (exclusive).", valueName: "time")) var until: String?
    @Option(name: .long, help: "text, json or dot.") var format: Format = .text

    func run() async throws {
        let edges: [LedgerEdge]
        do {
            edges = try await openLedger(data).ledgerEdges(sinceMicros: try parseAuditTime(since, flag: "--since"),
                                                           untilMicros: try parseAuditTime(until, flag: "--until"))
        } catch let error as StoreError {
            throw ValidationError(error.message)
        }
        switch format {
        case .json:
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
            print(String(decoding: try encoder.encode(edges), as: UTF8.self))
        case .dot:
            print("digraph sigil {\n  rankdir=LR;\n  node [shape=box, style=rounded];")
            for edge in edges {
                let label = "\(edge.calls) calls, \(edge.denied) denied, \(Self.percent(edge.mtlsShare)) mTLS, p99 \(Self.millis(edge.p99Micros))"
                var attributes = ["label=\(Self.dotQuote(label))"]
                if edge.denied > 0 { attributes.append("color=red, fontcolor=red") }
                if edge.overMTLS < edge.calls { attributes.append("style=dashed") }
                print("  \(Self.dotQuote(edge.source ?? "(plaintext)")) -> \(Self.dotQuote(edge.destination ?? "?")) [\(attributes.joined(separator: ", "))];")
            }
            print("}")
        case .text:
            if edges.isEmpty {
                print("no calls recorded in that time")
                return
            }
            print("SOURCE -> DESTINATION  CALLS  DENIED  MTLS  P99")
            for edge in edges {
                print(terminalSafe("\(edge.source ?? "(plaintext)") -> \(edge.destination ?? "?")  \(edge.calls)  \(edge.denied)  \(Self.percent(edge.mtlsShare))  \(Self.millis(edge.p99Micros))"))
            }
        }
    }

    static func percent(_ share: Double) -> String { String(format: "%.1f%%", share * 100) }
    static func millis(_ micros: Int64) -> String { String(format: "%.2fms", Double(micros) / 1000) }
    static func dotQuote(_ text: String) -> String {
        "\"" + text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
    }
}
