import ArgumentParser
import SigilCore
import SigilProxy
import Logging
import Foundation

struct ProxyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "proxy",
        abstract: "Run the mTLS sidecar proxy, or flip its kill switch.",
        subcommands: [ProxyRun.self, ProxyKillSwitch.self])
}

struct ProxyRun: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Serve one workload: inbound mTLS + authorization in front of --app, outbound mTLS to --upstream.",
        discussion: """
            Inbound (--inbound): TLS 1.3 with a client certificate that chains to the trust bundle and
            carries one SPIFFE ID; PeerAuthentication decides whether plaintext is also accepted
            (STRICT: never; PERMISSIVE: on the same port; DISABLE: plaintext only). Each HTTP/1.1 or
            HTTP/2 request (or each connection with --protocol tcp) is checked against the Istio
            AuthorizationPolicies in --policies that select this workload (--namespace, --labels);
            a denied request gets 403 "RBAC: access denied". Allowed requests reach --app with
            x-forwarded-client-cert: By=<own id>;Hash=<peer cert sha256>;URI=<peer id>.

            Outbound (--outbound, with --upstream and --upstream-id): the app talks plaintext to a
            loopback port; the proxy connects to the upstream proxy with mTLS and refuses it unless it
            proves --upstream-id.

            Identity comes from the Workload API (--workload-api, or SPIFFE_ENDPOINT_SOCKET); every
            rotation is served to new handshakes without dropping open connections. The policy
            directory is re-read when it changes; a broken edit is refused and the last good set
            stays in force. The kill switch is a file (default <policies>/sigil-kill-switch; see
            `sigil proxy kill-switch`): while it exists the proxy is PERMISSIVE and allows everything.

            A --config YAML file may set any flag by its long name (workload_api, inbound, app, ...).

            Example:
              sigil proxy run --workload-api unix:///tmp/sigil/agent.sock --spiffe-id spiffe://example.org/ns/shop/sa/web \\
                  --inbound 127.0.0.1:15006 --app 127.0.0.1:8080 --namespace shop --labels app=web \\
                  --policies deploy/policies --ledger /var/lib/sigil/web-ledger.jsonl
            """)

    @Option(name: .long, help: ArgumentHelp("YAML config file.", valueName: "file")) var config: String?
    @Option(name: .long, help: ArgumentHelp("The agent's Workload API socket (unix:///path or /path).", valueName: "addr")) var workloadApi: String?
    @Option(name: .long, help: ArgumentHelp("Inbound mTLS listener.", valueName: "host:port")) var inbound: String?
    @Option(name: .long, help: ArgumentHelp("The app behind this proxy (plaintext, loopback).", valueName: "host:port")) var app: String?
    @Option(name: .long, help: ArgumentHelp("The workload's namespace.", valueName: "ns")) var namespace: String?
    @Option(name: .long, help: ArgumentHelp("The workload's labels (for policy selectors).", valueName: "k=v,...")) var labels: String?
    @Option(name: .long, help: ArgumentHelp("Directory (or file) of Istio AuthorizationPolicy/PeerAuthentication YAML.", valueName: "dir")) var policies: String?
    @Option(name: .long, help: ArgumentHelp("Override PeerAuthentication: STRICT, PERMISSIVE or DISABLE.", valueName: "mode")) var mtls: String?
    @Option(name: .long, help: ArgumentHelp("Which of the workload's SVIDs to serve.", valueName: "id")) var spiffeId: String?
    @Option(name: .long, help: ArgumentHelp("Outbound plaintext listener for the app.", valueName: "host:port")) var outbound: String?
    @Option(name: .long, help: ArgumentHelp("Where outbound connections go (the peer's inbound).", valueName: "host:port")) var upstream: String?
    @Option(name: .long, help: ArgumentHelp("The SPIFFE ID the upstream must prove.", valueName: "id")) var upstreamId: String?
    @Option(name: .long, help: ArgumentHelp("http (HTTP/1.1 and HTTP/2) or tcp.", valueName: "p")) var `protocol`: String?
    @Option(name: .long, help: ArgumentHelp("Ledger spool (JSON lines, 0600).", valueName: "file")) var ledger: String?
    @Option(name: .long, help: ArgumentHelp("Kill switch file (default <policies>/sigil-kill-switch).", valueName: "file")) var killSwitch: String?
    @Option(name: .long, help: ArgumentHelp("Istio's root namespace (mesh-wide policies).", valueName: "ns")) var rootNamespace: String?
    @Option(name: .long, help: ArgumentHelp("Event loop threads (default: one per core).", valueName: "n")) var threads: Int?
    @Option(name: .long, help: ArgumentHelp("trace, debug, info, notice, warning, error.", valueName: "level")) var logLevel: String?

    func run() async throws {
        let file = try loadConfig(config)
        bootstrapLogging(level: logLevel ?? file["log_level"])
        func required(_ value: String?, _ key: String, _ flag: String, _ example: String) throws -> String {
            guard let v = value ?? file[key], !v.isEmpty else { throw CLIError.usage("\(flag) is required, e.g. \(flag) \(example)") }
            return v
        }
        let socket = try required(workloadApi ?? ProcessInfo.processInfo.environment["SPIFFE_ENDPOINT_SOCKET"], "workload_api",
                                  "--workload-api", "unix:///tmp/sigil/agent.sock")
        let (inHost, inPort) = try parseHostPort(try required(inbound, "inbound", "--inbound", "127.0.0.1:15006"), flag: "--inbound")
        let (appHost, appPort) = try parseHostPort(try required(app, "app", "--app", "127.0.0.1:8080"), flag: "--app")
        let ns = try required(namespace, "namespace", "--namespace", "default")
        let policyPath = try required(policies, "policies", "--policies", "deploy/policies")
        let labelMap = try parseLabels(labels ?? file["labels"] ?? "")
        var mode: PeerAuthentication.Mode?
        if let text = mtls ?? file["mtls"] {
            guard let m = PeerAuthentication.Mode(rawValue: text.uppercased()), m != .unset else {
                throw CLIError.usage("--mtls '\(text)' must be STRICT, PERMISSIVE or DISABLE")
            }
            mode = m
        }
        let proto = (self.protocol ?? file["protocol"] ?? "http").lowercased()
        guard proto == "http" || proto == "tcp" else { throw CLIError.usage("--protocol '\(proto)' must be http or tcp") }
        let wanted = spiffeId ?? file["spiffe_id"]
        if let wanted {
            do { _ = try SpiffeID(wanted) } catch { throw CLIError.usage("--spiffe-id: \(error.message)") }
        }
        var outboundHostPort: (String, Int)?
        var upstreamHostPort: (String, Int)?
        var upstreamSpiffeID: SpiffeID?
        let outText = outbound ?? file["outbound"]
        let upText = upstream ?? file["upstream"]
        let upIDText = upstreamId ?? file["upstream_id"]
        if outText != nil || upText != nil || upIDText != nil {
            guard let outText, let upText, let upIDText else {
                throw CLIError.usage("--outbound, --upstream and --upstream-id go together (the app's listener, the peer's inbound, and the SPIFFE ID it must prove)")
            }
            outboundHostPort = try parseHostPort(outText, flag: "--outbound")
            upstreamHostPort = try parseHostPort(upText, flag: "--upstream")
            do { upstreamSpiffeID = try SpiffeID(istioPrincipal: upIDText) } catch { throw CLIError.usage("--upstream-id: \(error.message)") }
        }
        guard FileManager.default.fileExists(atPath: policyPath) else {
            throw CLIError.usage("--policies '\(policyPath)' does not exist (an empty directory means: no policies, allow all)")
        }
        let settings = ProxyConfig(
            workloadAPISocket: socket, inboundHost: inHost, inboundPort: inPort, appHost: appHost, appPort: appPort,
            namespace: ns, labels: labelMap, policiesPath: policyPath,
            rootNamespace: rootNamespace ?? file["root_namespace"] ?? PolicyEvaluator.defaultRootNamespace,
            mtls: mode, spiffeID: wanted, outboundHost: outboundHostPort?.0, outboundPort: outboundHostPort?.1,
            upstreamHost: upstreamHostPort?.0, upstreamPort: upstreamHostPort?.1, upstreamID: upstreamSpiffeID,
            ledgerPath: ledger ?? file["ledger"], killSwitchPath: killSwitch ?? file["kill_switch"],
            tcpMode: proto == "tcp", threads: threads ?? file["threads"].flatMap { Int($0) } ?? 0)
        do {
            try await SigilProxyRole.run(settings, logger: Logger(label: "sigil.proxy"))
        } catch let error as ProxyError {
            throw CLIError.usage(error.message)
        }
    }
}

struct ProxyKillSwitch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kill-switch",
        abstract: "Emergency: drop the proxies that read this policy directory to PERMISSIVE + allow-all (or back).",
        discussion: """
            `on` writes the kill switch file with your reason; every proxy reading that directory
            (or started with that --kill-switch file) switches within a second, logs it, and records
            a kill_switch_on row in its ledger. `off` removes the file and policies apply again
            (kill_switch_off). `status` says whether it is on.

            Example:
              sigil proxy kill-switch on --policies deploy/policies --reason "INC-1234: authz outage"
            """)

    @Argument(help: "on, off or status") var action: String
    @Option(name: .long, help: ArgumentHelp("The policy directory the proxies read.", valueName: "dir")) var policies: String?
    @Option(name: .long, help: ArgumentHelp("The kill switch file (instead of <policies>/sigil-kill-switch).", valueName: "file")) var file: String?
    @Option(name: .long, help: ArgumentHelp("Why (recorded in every proxy's ledger).", valueName: "text")) var reason: String?

    func run() async throws {
        guard let path = file ?? policies.map({ ProxyConfig.defaultKillSwitchPath(policies: $0) }) else {
            throw CLIError.usage("give --policies DIR (or --file PATH) to say which proxies")
        }
        switch action {
        case "on":
            let who = ProcessInfo.processInfo.environment["USER"] ?? "uid \(getuid())"
            let text = "\(reason ?? "no reason given") (by \(who) at \(ISO8601DateFormatter().string(from: Date())))\n"
            do {
                try Data(text.utf8).write(to: URL(fileURLWithPath: path), options: .atomic)
            } catch {
                throw CLIError.usage("cannot write the kill switch \(path): \(error.localizedDescription)")
            }
            print("kill switch ON: \(path)\nproxies reading it are PERMISSIVE + allow-all within 1 s; `sigil proxy kill-switch off` to restore")
        case "off":
            if FileManager.default.fileExists(atPath: path) {
                do { try FileManager.default.removeItem(atPath: path) } catch {
                    throw CLIError.usage("cannot remove the kill switch \(path): \(error.localizedDescription)")
                }
            }
            print("kill switch OFF: policies enforced again")
        case "status":
            if let data = FileManager.default.contents(atPath: path) {
                print("ON: \(String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))")
                return
            }
            print("OFF")
        default:
            throw CLIError.usage("kill-switch takes on, off or status, not '\(action)'")
        }
    }
}

func parseLabels(_ text: String) throws -> [String: String] {
    var labelMap: [String: String] = [:]
    for pair in text.split(separator: ",") where !pair.isEmpty {
        let kv = pair.split(separator: "=", maxSplits: 1)
        guard kv.count == 2, !kv[0].isEmpty else { throw CLIError.usage("--labels '\(pair)' must be key=value") }
        labelMap[String(kv[0]).trimmingCharacters(in: .whitespaces)] = String(kv[1]).trimmingCharacters(in: .whitespaces)
    }
    return labelMap
}
