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

            Ledger (--ledger): one hash-chained row per request, in the spool file before the
            response's last bytes go out. The spool is bounded (--ledger-max-size): when it is full
            the proxy fails closed, answering new requests 503 "ledger spool full" (TCP mode: new
            connections are closed) until space returns, and logs one error line. With
            --ledger-server the spool is started over once the server has every row in it.

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
    @Option(name: .long, help: ArgumentHelp("Longest a written ledger row waits for fdatasync (0: every batch; default 250).", valueName: "ms")) var ledgerSyncMs: Int?
    @Option(name: .long, help: ArgumentHelp("Ship the spool's rows to the server's ledger (its agent API address), over mTLS with this workload's SVID.", valueName: "host:port")) var ledgerServer: String?
    @Option(name: .long, help: ArgumentHelp("Largest the ledger spool may grow (e.g. 512MiB; default 1GiB); when full, new requests get 503 until space returns.", valueName: "size")) var ledgerMaxSize: String?
    @Option(name: .long, help: ArgumentHelp("With --ledger-server: start the spool over once it is this large and the server has every row (default 64MiB).", valueName: "size")) var ledgerSegmentSize: String?
    @Option(name: .long, help: ArgumentHelp("Serve Prometheus metrics at GET /metrics on this loopback address.", valueName: "host:port")) var metrics: String?
    @Option(name: .long, help: ArgumentHelp("Kill switch file (default <policies>/sigil-kill-switch).", valueName: "file")) var killSwitch: String?
    @Option(name: .long, help: ArgumentHelp("Istio's root namespace (mesh-wide policies).", valueName: "ns")) var rootNamespace: String?
    @Option(name: .long, help: ArgumentHelp("Event loop threads (default: one per core).", valueName: "n")) var threads: Int?
    @Option(name: .long, help: ArgumentHelp("Close an inbound connection whose TLS handshake (or first plaintext request) takes longer (default 10s).", valueName: "duration")) var handshakeTimeout: String?
    @Option(name: .long, help: ArgumentHelp("Close an inbound connection on which no data has moved either way for this long (default 1h).", valueName: "duration")) var idleTimeout: String?
    @Option(name: .long, help: ArgumentHelp("How request paths are normalized before policies see them, as Istio's meshConfig.pathNormalization: BASE (default), MERGE_SLASHES or DECODE_AND_MERGE_SLASHES.", valueName: "level")) var pathNormalization: String?
    @Option(name: .long, help: ArgumentHelp("trace, debug, info, notice, warning, error.", valueName: "level")) var logLevel: String?

    /// The flags as given, for the one parser (`ProxyArguments`) that the lean `sigil-proxy` shares.
    var forwarded: [String] {
        let pairs: [(String, String?)] = [
            ("config", config), ("workload-api", workloadApi), ("inbound", inbound), ("app", app), ("namespace", namespace),
            ("labels", labels), ("policies", policies), ("mtls", mtls), ("spiffe-id", spiffeId), ("outbound", outbound),
            ("upstream", upstream), ("upstream-id", upstreamId), ("protocol", self.protocol), ("ledger", ledger),
            ("ledger-sync-ms", ledgerSyncMs.map(String.init)), ("ledger-server", ledgerServer),
            ("ledger-max-size", ledgerMaxSize), ("ledger-segment-size", ledgerSegmentSize), ("metrics", metrics),
            ("kill-switch", killSwitch), ("root-namespace", rootNamespace), ("threads", threads.map(String.init)),
            ("handshake-timeout", handshakeTimeout), ("idle-timeout", idleTimeout),
            ("path-normalization", pathNormalization), ("log-level", logLevel),
        ]
        return pairs.flatMap { name, value in value.map { ["--\(name)", $0] } ?? [] }
    }

    func run() async throws {
        let arguments = forwarded
        let (settings, level): (ProxyConfig, String?)
        do {
            (settings, level) = try ProxyArguments.parse(arguments)
        } catch {
            throw CLIError.usage(error.description)
        }
        // Hand over to the lean proxy executable when it sits beside this one: the data plane then
        // carries no CA, store or CLI code (less memory per sidecar). SIGIL_PROXY_IN_PROCESS=1 opts out.
        let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let lean = URL(fileURLWithPath: me).deletingLastPathComponent().appendingPathComponent("sigil-proxy").path
        if ProcessInfo.processInfo.environment["SIGIL_PROXY_IN_PROCESS"] == nil, FileManager.default.isExecutableFile(atPath: lean) {
            let argv = ["sigil-proxy"] + arguments
            var cArgs = argv.map { strdup($0) } + [nil]
            execv(lean, &cArgs)
            // execv only returns on failure: fall through and run in this process.
        }
        try bootstrapLogging(level: level)
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
        // A mistyped path must not report OFF (or write a switch no proxy reads) while the real
        // one stays as it was.
        if file == nil, let policies, !FileManager.default.fileExists(atPath: policies) {
            throw CLIError.usage("--policies '\(policies)' does not exist; give the policy directory (or file) the proxies were started with")
        }
        // The switch is a small regular file of its own: never a directory, a policy file or
        // anything else a mistyped --file could name (on would overwrite it, off delete it).
        if let existing = FileStamp.kind(of: path) {
            guard existing.kind == .regular else {
                throw CLIError.usage("the kill switch '\(path)' exists and is not a regular file; give the --file the proxies were started with")
            }
            // What `on` writes: one short line of text. Anything else (a database, a key) is not
            // ours to overwrite or delete.
            let data = FileManager.default.contents(atPath: path) ?? Data()
            guard existing.size <= 16 * 1024, !data.contains(0), String(data: data, encoding: .utf8) != nil else {
                throw CLIError.usage("'\(path)' exists and is not a kill switch (not a short text file); give the --file the proxies were started with")
            }
        }
        if path.hasSuffix(".yaml") || path.hasSuffix(".yml") {
            throw CLIError.usage("the kill switch '\(path)' is named like a policy file; the proxies would read it as one: choose another --file")
        }
        let parent = (path as NSString).deletingLastPathComponent
        var isDirectory: ObjCBool = false
        if !parent.isEmpty, !FileManager.default.fileExists(atPath: parent, isDirectory: &isDirectory) || !isDirectory.boolValue {
            throw CLIError.usage("the kill switch's directory '\(parent)' does not exist; give the --file the proxies were started with")
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
            guard FileManager.default.fileExists(atPath: path) else {
                print("kill switch already OFF: there is no \(path)")
                return
            }
            do { try FileManager.default.removeItem(atPath: path) } catch {
                throw CLIError.usage("cannot remove the kill switch \(path): \(error.localizedDescription)")
            }
            print("kill switch OFF: \(path) removed; policies enforced again within 1 s")
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
    do {
        return try ProxyArguments.parseLabels(text)
    } catch {
        throw CLIError.usage(error.description)
    }
}
