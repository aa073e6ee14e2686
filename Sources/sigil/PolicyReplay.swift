import ArgumentParser
import Foundation
import SigilCore
import SigilPolicy
import SigilStore

/// `sigil policy replay`: a candidate policy set evaluated against recorded traffic.
struct PolicyReplay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replay",
        abstract: "Evaluate a candidate policy set against recorded calls; print the calls whose decision would change.",
        discussion: """
            Reads the server's ledger (--data-dir) and, for every recorded authorization decision
            (HTTP requests and TCP connections at an inbound proxy), decides the call again under
            the policies in --policies for the workload that recorded it (its namespace and labels
            are in the row's writer), with Istio's evaluation order and PeerAuthentication (a
            plaintext call under a STRICT candidate is denied). Calls recorded under the kill switch
            are replayed against the policies too and marked.

            Recorded rows carry the caller, source IP, port, method, path and host, not request
            headers, destination IP or SNI: a candidate rule that reads those is evaluated without
            them, and the calls it touches are counted as approximate.

            Exit codes: 0 no decision changes, 1 some would change, 2 usage or policy load error.

            Example:
              sigil policy replay --policies ./candidate --since 7d --data-dir /var/lib/sigil
            """)

    @OptionGroup var data: DataDirOption
    @Option(name: .long, help: ArgumentHelp("Directory (or file) of candidate Istio YAML.", valueName: "dir")) var policies: String
    @Option(name: .long, help: ArgumentHelp("From this long ago (24h, 7d) or an RFC 3339 time.", valueName: "time")) var since: String = "7d"
    @Option(name: .long, help: ArgumentHelp("Up to this long ago or an RFC 3339 time (exclusive).", valueName: "time")) var until: String?
    @Option(name: .long, help: ArgumentHelp("Istio's root namespace (mesh-wide policies).", valueName: "ns")) var rootNamespace: String = PolicyEvaluator.defaultRootNamespace
    @Option(name: .long, help: ArgumentHelp("Print at most this many changed calls (the summary counts them all).", valueName: "n")) var limit: Int = 100
    @Flag(name: .long, help: "Print the summary and every changed call as JSON.") var json = false

    struct Change: Codable {
        var writer: String
        var seq: UInt64
        var time: String
        var source: String?
        var destination: String?
        var method: String?
        var path: String?
        var recorded: String
        var recordedPolicy: String?
        var candidate: String
        var candidatePolicy: String?
        var candidateRule: Int?
        var underKillSwitch: Bool
        var approximate: Bool
    }

    struct Summary: Codable {
        var replayed = 0
        var unchanged = 0
        var allowToDeny = 0
        var denyToAllow = 0
        var approximate = 0
        var skipped = 0
        var changes: [Change] = []
    }

    func validate() throws {
        if limit < 0 { throw ValidationError("--limit must be 0 or more") }
    }

    func run() async throws {
        let set: PolicySet
        do {
            set = try PolicyLoader.load(path: policies)
        } catch {
            throw CLIError.usage("policy load error: \(error.description)")
        }
        let query = LedgerQuery(sinceMicros: try parseAuditTime(since, flag: "--since"), untilMicros: try parseAuditTime(until, flag: "--until"),
                                limit: Int.max)
        let rows: [LedgerRow]
        do {
            rows = try await openLedger(data).ledgerRows(query)
        } catch let error as StoreError {
            throw ValidationError(error.message)
        }
        let summary = Self.replay(rows, against: set, rootNamespace: rootNamespace)
        if json {
            var shown = summary
            shown.changes = Array(summary.changes.prefix(limit))
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            print(String(decoding: try encoder.encode(shown), as: UTF8.self))
        } else {
            for change in summary.changes.prefix(limit) {
                let call = [change.method, change.path].compactMap { $0 }.joined(separator: " ")
                let was = change.recorded + (change.recordedPolicy.map { " (\($0))" } ?? "")
                let now = change.candidate + (change.candidatePolicy.map { " (\($0)\(change.candidateRule.map { " rule \($0)" } ?? ""))" } ?? "")
                let marks = (change.underKillSwitch ? " [kill switch]" : "") + (change.approximate ? " [approximate]" : "")
                print(terminalSafe("\(change.time) \(change.source ?? "(plaintext)") -> \(change.destination ?? "?") \(call.isEmpty ? "tcp" : call): \(was) -> \(now)\(marks)"))
            }
            if summary.changes.count > limit { print("… \(summary.changes.count - limit) more (raise --limit or use --json)") }
            print("replayed \(summary.replayed) recorded decisions: \(summary.unchanged) unchanged, \(summary.allowToDeny) allow -> deny, \(summary.denyToAllow) deny -> allow"
                  + (summary.approximate > 0 ? "; \(summary.approximate) approximate (the candidate reads fields the ledger does not keep)" : "")
                  + (summary.skipped > 0 ? "; \(summary.skipped) rows were not authorization decisions (TLS refusals, outbound connections, events)" : ""))
        }
        if !summary.changes.isEmpty { throw NegativeAnswer(message: "") }
    }

    /// The workload a row's writer names: `proxy:<namespace>/<k=v,...>@<port>`.
    static func workload(ofWriter writer: String) -> WorkloadSelector? {
        guard writer.hasPrefix("proxy:"), let slash = writer.firstIndex(of: "/"), let at = writer.lastIndex(of: "@"), slash < at else { return nil }
        let namespace = String(writer[writer.index(writer.startIndex, offsetBy: 6)..<slash])
        var labels: [String: String] = [:]
        for pair in writer[writer.index(after: slash)..<at].split(separator: ",") {
            guard let eq = pair.firstIndex(of: "=") else { return nil }
            labels[String(pair[..<eq])] = String(pair[pair.index(after: eq)...])
        }
        return namespace.isEmpty ? nil : WorkloadSelector(namespace: namespace, labels: labels)
    }

    /// Whether a row records an authorization decision of an inbound proxy.
    static func isDecision(_ row: LedgerRow) -> Bool {
        if row.kind == "request" { return row.decision != nil }
        guard row.kind == "connection", row.proto == "tcp" else { return false }
        let detail = row.detail ?? ""
        return !detail.hasPrefix("outbound") && !detail.hasPrefix("peer refused") && !detail.hasPrefix("plaintext connection refused")
    }

    /// Condition keys the ledger keeps what they read.
    /// The `when` keys a row's recorded fields answer. `remote.ip` is not one: the live proxy
    /// reads it from X-Forwarded-For, which the ledger does not record (nor `remoteIpBlocks`).
    static let replayableKeys: Set<String> = ["source.ip", "source.namespace", "source.principal", "destination.port"]

    static func readsUnrecordedFields(_ rule: AuthorizationPolicy.Rule) -> Bool {
        rule.when.contains { !replayableKeys.contains($0.key) }
            || rule.from.contains { $0.remoteIpBlocks != nil || $0.notRemoteIpBlocks != nil }
    }

    static func replay(_ rows: [LedgerRow], against set: PolicySet, rootNamespace: String) -> Summary {
        let evaluator = PolicyEvaluator(policies: set.authorizationPolicies, rootNamespace: rootNamespace)
        let peerAuthentication = PeerAuthenticationResolver(policies: set.peerAuthentications, rootNamespace: rootNamespace)
        var summary = Summary()
        // Per workload, once: the policies it is replayed against (split by action) and whether
        // any of them reads a field the ledger does not record (such rows replay approximately).
        var replayFor: [WorkloadSelector: (prepared: PreparedPolicies, approximate: Bool)] = [:]
        for row in rows {
            guard isDecision(row), let workload = workload(ofWriter: row.writer) else {
                summary.skipped += 1
                continue
            }
            summary.replayed += 1
            let (prepared, approximate) = replayFor[workload] ?? {
                let applicable = evaluator.applicable(to: workload)
                let approximate = applicable.contains { policy in
                    policy.rules.contains(where: readsUnrecordedFields)
                }
                let value = (PreparedPolicies(applicable), approximate)
                replayFor[workload] = value
                return value
            }()
            if approximate { summary.approximate += 1 }
            let allowed: Bool
            var policy: String?
            var rule: Int?
            if !row.mtls, peerAuthentication.mode(for: workload, port: row.port) == .strict {
                allowed = false
                policy = "PeerAuthentication STRICT"
            } else {
                let principal = row.source.flatMap { try? SpiffeID($0).istioPrincipal }
                let tcp = row.kind == "connection"
                let request = AuthorizationRequest(principal: principal, sourceIP: row.sourceIP, remoteIP: row.sourceIP, destinationPort: row.port,
                                                   host: tcp ? nil : row.host, method: tcp ? nil : row.method, path: tcp ? nil : row.path, isTCP: tcp)
                let decision = evaluator.evaluate(request, prepared: prepared)
                allowed = decision.allowed
                policy = decision.policy
                rule = decision.rule
            }
            let recordedAllowed = row.decision == "allow"
            if allowed == recordedAllowed {
                summary.unchanged += 1
                continue
            }
            if recordedAllowed { summary.allowToDeny += 1 } else { summary.denyToAllow += 1 }
            summary.changes.append(Change(writer: row.writer, seq: row.seq, time: RFC3339.format(micros: row.timeMicros), source: row.source,
                                          destination: row.destination, method: row.method, path: row.path,
                                          recorded: recordedAllowed ? "allow" : "deny", recordedPolicy: row.policy,
                                          candidate: allowed ? "allow" : "deny", candidatePolicy: policy, candidateRule: rule,
                                          underKillSwitch: row.policy == "kill-switch", approximate: approximate))
        }
        return summary
    }
}
