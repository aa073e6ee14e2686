import ArgumentParser
import SigilCore
import SigilPolicy
import Foundation

struct PolicyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy", abstract: "Evaluate Istio AuthorizationPolicy YAML: one request, or recorded traffic.", subcommands: [PolicyCheck.self, PolicyReplay.self])
}

struct PolicyCheck: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Decide one request against a policy directory, naming the policy and rule that decided.",
        discussion: """
            Istio's order: any matching DENY rule denies; if no ALLOW policy applies to the workload
            the request is allowed; if an ALLOW rule matches it is allowed; otherwise denied.
            Policies apply by namespace (plus the root namespace, mesh-wide) and selector.matchLabels.

            --principal takes a SPIFFE ID or Istio's form (cluster.local/ns/x/sa/y); without it the
            caller is plaintext. --json prints {"decision":"ALLOW"|"DENY","policy":"ns/name"|null,"rule":n|null}.
            Exit codes: 0 ALLOW, 1 DENY, 2 usage or policy load error.

            Example:
              sigil policy check --policies deploy/policies --namespace prod --labels app=web \\
                  --principal spiffe://cluster.local/ns/prod/sa/sleep --method GET --path /api/users
            """)

    @Option(name: .long, help: ArgumentHelp("Directory (or file) of Istio YAML.", valueName: "dir")) var policies: String
    @Option(name: .long, help: ArgumentHelp("The workload's namespace.", valueName: "ns")) var namespace: String
    @Option(name: .long, help: ArgumentHelp("The workload's labels.", valueName: "k=v,...")) var labels: String = ""
    @Option(name: .long, help: ArgumentHelp("The caller's SPIFFE ID or Istio principal.", valueName: "id")) var principal: String?
    @Option(name: .long, help: ArgumentHelp("HTTP method.", valueName: "M")) var method: String = "GET"
    @Option(name: .long, help: ArgumentHelp("HTTP path.", valueName: "P")) var path: String = "/"
    @Option(name: .long, help: ArgumentHelp("Host / :authority.", valueName: "H")) var host: String?
    @Option(name: .long, help: ArgumentHelp("Destination port.", valueName: "N")) var port: Int?
    @Option(name: .long, help: ArgumentHelp("A request header (repeatable).", valueName: "k:v")) var header: [String] = []
    @Option(name: .long, help: ArgumentHelp("The caller's IP address.", valueName: "IP")) var sourceIp: String?
    @Option(name: .long, help: ArgumentHelp("Istio's root namespace (mesh-wide policies).", valueName: "ns")) var rootNamespace: String = PolicyEvaluator.defaultRootNamespace
    @Option(name: .long, help: ArgumentHelp("The proxy's --path-normalization: BASE (default), MERGE_SLASHES or DECODE_AND_MERGE_SLASHES.", valueName: "level")) var pathNormalization: String = "BASE"
    @Flag(name: .long, help: "Evaluate as raw TCP (HTTP-only fields cannot match an ALLOW rule).") var tcp = false
    @Flag(name: .long, help: "Print the decision as JSON.") var json = false

    func run() async throws {
        let labelMap = try parseLabels(labels)
        var headers: [String: [String]] = [:]
        for h in header {
            guard let colon = h.firstIndex(of: ":"), colon != h.startIndex else { throw CLIError.usage("--header '\(h)' must be name:value") }
            headers[h[..<colon].lowercased(), default: []].append(String(h[h.index(after: colon)...]).trimmingCharacters(in: .whitespaces))
        }
        var istioPrincipal: String?
        if let principal {
            do {
                istioPrincipal = try SpiffeID(istioPrincipal: principal).istioPrincipal
            } catch {
                throw CLIError.usage("--principal: \(error.message)")
            }
        }
        if let sourceIp, IPBlock.parse(sourceIp) == nil { throw CLIError.usage("--source-ip '\(sourceIp)' is not an IP address") }
        let set: PolicySet
        do {
            set = try PolicyLoader.load(path: policies)
        } catch {
            throw CLIError.usage("policy load error: \(error.description)")
        }
        for warning in set.warnings { FileHandle.standardError.write(Data("warning: \(warning)\n".utf8)) }
        // The path as the proxy would see it after Istio's normalization (BASE: %-decoding of
        // unreserved characters, backslashes, dot segments): `/%61dmin` is checked as `/admin`.
        guard let normalization = RequestTarget.Normalization(flag: pathNormalization) else {
            throw CLIError.usage("--path-normalization '\(pathNormalization)' is not one of "
                                 + RequestTarget.Normalization.allCases.map(\.rawValue).joined(separator: ", "))
        }
        guard let target = RequestTarget.normalize(path, normalization) else {
            throw CLIError.usage("--path '\(path)' is not a valid request target (the proxy answers it with 400)")
        }
        let path = target.uri
        // `--header host:H` is the host, as the proxy reads it.
        let host = target.authority ?? host ?? headers["host"]?.first
        let request = AuthorizationRequest(principal: istioPrincipal, sourceIP: sourceIp, destinationPort: port, host: tcp ? nil : host,
                                           method: tcp ? nil : method, path: tcp ? nil : path, headers: tcp ? [:] : headers, isTCP: tcp)
        let decision = PolicyEvaluator(policies: set.authorizationPolicies, rootNamespace: rootNamespace)
            .evaluate(request, for: WorkloadSelector(namespace: namespace, labels: labelMap))
        let word = decision.allowed ? "ALLOW" : "DENY"
        if json {
            let policyJSON = decision.policy.map { "\"\(escapeJSON($0))\"" } ?? "null"
            let ruleJSON = decision.rule.map(String.init) ?? "null"
            print("{\"decision\":\"\(word)\",\"policy\":\(policyJSON),\"rule\":\(ruleJSON)}")
        } else if let policy = decision.policy, let rule = decision.rule {
            print("\(word) by \(policy), rule \(rule)")
        } else if decision.allowed {
            print("ALLOW: no ALLOW policy applies to this workload and no DENY rule matched")
        } else {
            print("DENY: no rule of the ALLOW policies that apply to this workload matched")
        }
        if !decision.audited.isEmpty, !json { print("audited by: \(decision.audited.joined(separator: ", "))") }
        if !decision.allowed { throw NegativeAnswer(message: "") }
    }
}

func escapeJSON(_ s: String) -> String {
    var out = ""
    for ch in s.unicodeScalars {
        switch ch {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        default:
            if ch.value < 0x20 { out += String(format: "\\u%04x", ch.value) } else { out.unicodeScalars.append(ch) }
        }
    }
    return out
}
