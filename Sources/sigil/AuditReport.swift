import ArgumentParser
import Foundation
import SigilCA
import SigilCore
import SigilStore

/// `sigil audit report`: the compliance report an auditor asks for, from the server's store.
struct AuditReport: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "A compliance report: ledger integrity, identities, who called whom, mTLS share, plaintext edges, denials, certificates, CA, kill switch.",
        discussion: """
            Example:
              sigil audit report --since 30d --format html --data-dir /var/lib/sigil > soc2-evidence.html
            """)

    enum Format: String, ExpressibleByArgument, CaseIterable { case md, html }

    @OptionGroup var data: DataDirOption
    @Option(name: .long, help: ArgumentHelp("From this long ago (30d) or an RFC 3339 time.", valueName: "time")) var since: String = "30d"
    @Option(name: .long, help: ArgumentHelp("Up to this long ago or an RFC 3339 time (exclusive; default now).", valueName: "time")) var until: String?
    @Option(name: .long, help: "md or html.") var format: Format = .md

    /// A report is a title, paragraphs and tables; rendered as Markdown or HTML.
    enum Block {
        case heading(String)
        case text(String)
        case table([String], [[String]])
    }

    func run() async throws {
        let now = Date()
        let sinceMicros = try parseAuditTime(since, flag: "--since", now: now)!
        let untilMicros = try parseAuditTime(until, flag: "--until", now: now) ?? Int64(now.timeIntervalSince1970 * 1_000_000)
        guard sinceMicros < untilMicros else {
            throw ValidationError("--since \(since) is not before --until \(until ?? "now"): the report's period would be empty (durations count back from now: --since 2h --until 1h)")
        }
        let store = try openLedger(data)
        let blocks: [Block]
        do {
            blocks = try await Self.build(store: store, since: sinceMicros, until: untilMicros, now: now,
                                          checkpointKey: try? LedgerCheckpointKeyFile.load(data.directory))
        } catch let error as StoreError {
            throw ValidationError(error.message)
        }
        print(format == .md ? Self.markdown(blocks) : Self.html(blocks))
    }

    static func build(store: SQLiteDatastore, since: Int64, until: Int64, now: Date, checkpointKey: LedgerCheckpointKey? = nil) async throws -> [Block] {
        var blocks: [Block] = []
        let td = try await store.trustDomain() ?? "?"
        blocks.append(.heading("Sigil compliance report: trust domain \(td)"))
        blocks.append(.text("Period \(RFC3339.format(micros: since)) to \(RFC3339.format(micros: until)); generated \(RFC3339.format(micros: Int64(now.timeIntervalSince1970 * 1_000_000)))."))

        var verification = try await store.verifyLedger(checkpointKey: checkpointKey)
        if checkpointKey == nil, verification.checkpoints > 0 {
            verification.breaks.append(.init(writer: "-", seq: 0, problem: "retention checkpoints cannot be checked without the ledger checkpoint key"))
        }
        blocks.append(.heading("Ledger integrity"))
        if verification.intact {
            blocks.append(.text("Intact: \(verification.rows) rows from \(verification.writers) writers; every row matches its SHA-256, every chain is continuous (`sigil audit verify`)."))
        } else {
            blocks.append(.text("BROKEN: \(verification.breaks.count) of \(verification.writers) writers fail verification. The figures below come from rows that may have been altered."))
            blocks.append(.table(["writer", "first broken row", "problem"], verification.breaks.map { [$0.writer, "\($0.seq)", $0.problem] }))
        }

        let edges = try await store.ledgerEdges(sinceMicros: since, untilMicros: until)
        let calls = edges.reduce(0) { $0 + $1.calls }
        let mtls = edges.reduce(0) { $0 + $1.overMTLS }
        let denied = edges.reduce(0) { $0 + $1.denied }
        blocks.append(.heading("Calls"))
        blocks.append(.text("\(calls) calls recorded; \(percent(mtls, calls)) over mutually authenticated TLS; \(denied) denied by policy or refused."))

        var made: [String: Int] = [:]
        var received: [String: Int] = [:]
        for edge in edges {
            if let source = edge.source { made[source, default: 0] += edge.calls }
            if let destination = edge.destination { received[destination, default: 0] += edge.calls }
        }
        let identities = Set(made.keys).union(received.keys).sorted()
        blocks.append(.heading("Identities seen (\(identities.count))"))
        blocks.append(.table(["SPIFFE ID", "calls made", "calls received"],
                             identities.map { [$0, "\(made[$0] ?? 0)", "\(received[$0] ?? 0)"] }))

        blocks.append(.heading("Who called whom"))
        blocks.append(.table(["source", "destination", "calls", "denied", "mTLS", "p99"], edges.map {
            [$0.source ?? "(plaintext)", $0.destination ?? "?", "\($0.calls)", "\($0.denied)", percent($0.overMTLS, $0.calls),
             String(format: "%.2f ms", Double($0.p99Micros) / 1000)]
        }))

        let plaintext = edges.filter { $0.overMTLS < $0.calls }
        blocks.append(.heading("Plaintext edges (what blocks STRICT)"))
        if plaintext.isEmpty {
            blocks.append(.text("None: every recorded call was over mTLS; every destination can run PeerAuthentication STRICT."))
        } else {
            blocks.append(.table(["source", "destination", "plaintext calls"], plaintext.map {
                [$0.source ?? "(plaintext caller)", $0.destination ?? "?", "\($0.calls - $0.overMTLS)"]
            }))
        }

        let denials = try await store.ledgerRows(LedgerQuery(sinceMicros: since, untilMicros: until, decision: "deny", limit: Int.max))
        var denialCounts: [String: Int] = [:]
        var denialPaths: [String: Set<String>] = [:]
        for row in denials where row.kind == "request" || (row.kind == "connection" && !(row.detail ?? "").hasPrefix("outbound")) {
            let key = row.policy.map { "\($0)\(row.rule.map { " rule \($0)" } ?? "")" } ?? (row.kind == "request" ? "no ALLOW rule matched" : (row.detail ?? "connection refused"))
            denialCounts[key, default: 0] += 1
            if let path = row.path, denialPaths[key, default: []].count < 5 { denialPaths[key, default: []].insert(path) }
        }
        blocks.append(.heading("Denials by policy"))
        blocks.append(denialCounts.isEmpty ? .text("No denials in the period.") :
            .table(["policy / reason", "denials", "example paths"], denialCounts.sorted { $0.value > $1.value }.map {
                [$0.key, "\($0.value)", (denialPaths[$0.key] ?? []).sorted().joined(separator: ", ")]
            }))

        let issued = try await store.issuedCertificates(limit: Int.max).filter {
            let at = Int64($0.issuedAt.timeIntervalSince1970 * 1_000_000)
            return at >= since && at < until
        }
        struct Issued { var count = 0; var minTTL = Double.infinity; var maxTTL = 0.0 }
        var bySPIFFE: [String: Issued] = [:]
        for cert in issued {
            // The lifetime asked for: notBefore is backdated for clock skew, issuedAt is not.
            let ttl = cert.notAfter.timeIntervalSince(cert.issuedAt).rounded()
            var entry = bySPIFFE[cert.spiffeID] ?? Issued()
            entry.count += 1
            entry.minTTL = min(entry.minTTL, ttl)
            entry.maxTTL = max(entry.maxTTL, ttl)
            bySPIFFE[cert.spiffeID] = entry
        }
        let refused = try await store.issuanceLog(after: 0, limit: Int.max).filter {
            let at = Int64($0.at.timeIntervalSince1970 * 1_000_000)
            return $0.kind == .refused && at >= since && at < until
        }
        blocks.append(.heading("Certificates issued"))
        blocks.append(.text("\(issued.count) certificates issued, \(refused.count) requests refused."))
        if !bySPIFFE.isEmpty {
            blocks.append(.table(["SPIFFE ID", "issued", "TTL"], bySPIFFE.sorted { $0.key < $1.key }.map {
                [$0.key, "\($0.value.count)", $0.value.minTTL == $0.value.maxTTL ? duration($0.value.minTTL) : "\(duration($0.value.minTTL))–\(duration($0.value.maxTTL))"]
            }))
        }

        let authorities = try await store.authorities()
        blocks.append(.heading("Certificate authorities"))
        blocks.append(.table(["id", "kind", "state", "valid from", "valid until", "created in period"], authorities.map {
            let created = Int64($0.createdAt.timeIntervalSince1970 * 1_000_000)
            return [String($0.id.prefix(16)), $0.kind.rawValue, $0.state.rawValue, iso($0.notBefore), iso($0.notAfter),
                    created >= since && created < until ? "yes" : "no"]
        }))

        var events: [LedgerRow] = []
        for kind in ["kill_switch_on", "kill_switch_off", "policy_reload", "policy_rejected"] {
            events += try await store.ledgerRows(LedgerQuery(sinceMicros: since, untilMicros: until, kind: kind, limit: Int.max))
        }
        events.sort { $0.timeMicros < $1.timeMicros }
        let kills = events.filter { $0.kind.hasPrefix("kill_switch") }
        blocks.append(.heading("Kill switch"))
        blocks.append(kills.isEmpty ? .text("Not used in the period.") :
            .table(["time", "proxy", "event", "reason"], kills.map { [RFC3339.format(micros: $0.timeMicros), $0.writer, $0.kind, $0.detail ?? ""] }))
        let policyEvents = events.filter { $0.kind.hasPrefix("policy") }
        blocks.append(.heading("Policy changes"))
        blocks.append(.text("\(policyEvents.filter { $0.kind == "policy_reload" }.count) policy reloads, \(policyEvents.filter { $0.kind == "policy_rejected" }.count) rejected edits (the previous set stayed in force)."))
        return blocks
    }

    static func percent(_ part: Int, _ whole: Int) -> String {
        whole == 0 ? "–" : String(format: "%.1f %%", Double(part) * 100 / Double(whole))
    }

    static func duration(_ seconds: Double) -> String {
        if seconds >= 86_400, seconds.truncatingRemainder(dividingBy: 86_400) == 0 { return "\(Int(seconds / 86_400))d" }
        if seconds >= 3600, seconds.truncatingRemainder(dividingBy: 3600) == 0 { return "\(Int(seconds / 3600))h" }
        if seconds >= 60, seconds.truncatingRemainder(dividingBy: 60) == 0 { return "\(Int(seconds / 60))m" }
        return "\(Int(seconds))s"
    }

    static func iso(_ date: Date) -> String { RFC3339.format(micros: Int64(date.timeIntervalSince1970) * 1_000_000) }

    static func markdown(_ blocks: [Block]) -> String {
        var out = ""
        var first = true
        for block in blocks {
            switch block {
            case .heading(let text):
                out += (first ? "# " : "\n## ") + text + "\n\n"
                first = false
            case .text(let text):
                out += terminalSafe(text).replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;") + "\n"
            case .table(let header, let rows):
                // A cell stays one cell and renders as the literal text recorded: no line break, pipe
                // or control character gets out of it, no HTML passes through to a renderer that would
                // keep it (`<` and `>` as entities), and Markdown's own punctuation is escaped, so a
                // recorded path cannot become a link, an image or emphasis in the auditor's copy.
                func cell(_ s: String) -> String {
                    var out = ""
                    for ch in terminalSafe(s) {
                        switch ch {
                        case "<": out += "&lt;"
                        case ">": out += "&gt;"
                        case "&": out += "&amp;"
                        case "\\", "`", "*", "_", "[", "]", "(", ")", "!", "~", "|", "#", "{", "}":
                            out.append("\\"); out.append(ch)
                        default: out.append(ch)
                        }
                    }
                    return out
                }
                out += "| " + header.map(cell).joined(separator: " | ") + " |\n"
                out += "|" + header.map { _ in "---|" }.joined() + "\n"
                for row in rows { out += "| " + row.map(cell).joined(separator: " | ") + " |\n" }
            }
        }
        return out
    }

    static func html(_ blocks: [Block]) -> String {
        func e(_ s: String) -> String {
            s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
                .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
        }
        var out = """
            <!doctype html>
            <html><head><meta charset="utf-8"><title>Sigil compliance report</title>
            <style>body{font-family:sans-serif;max-width:72em;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}th{background:#f4f4f4}</style>
            </head><body>

            """
        var first = true
        for block in blocks {
            switch block {
            case .heading(let text):
                out += first ? "<h1>\(e(text))</h1>\n" : "<h2>\(e(text))</h2>\n"
                first = false
            case .text(let text):
                out += "<p>\(e(text))</p>\n"
            case .table(let header, let rows):
                out += "<table><tr>" + header.map { "<th>\(e($0))</th>" }.joined() + "</tr>\n"
                for row in rows { out += "<tr>" + row.map { "<td>\(e($0))</td>" }.joined() + "</tr>\n" }
                out += "</table>\n"
            }
        }
        return out + "</body></html>"
    }
}
