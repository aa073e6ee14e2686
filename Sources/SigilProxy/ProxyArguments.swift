import Foundation
import SigilCore
import SigilRPC
import SigilPolicy

/// The arguments of `sigil proxy run` (and of the lean `sigil-proxy` executable it hands over to),
/// parsed in one place: `--flag value` or `--flag=value`, a `--config` YAML file of the same
/// settings by long name (`workload_api`, `inbound`, ...), flags winning over the file.
public enum ProxyArguments {
    public struct UsageError: Error, CustomStringConvertible, Sendable {
        public let description: String
        init(_ message: String) { description = message }
    }

    public static let flags: Set<String> = [
        "config", "workload-api", "inbound", "app", "namespace", "labels", "policies", "mtls", "spiffe-id",
        "outbound", "upstream", "upstream-id", "protocol", "ledger", "ledger-sync-ms", "ledger-server",
        "ledger-max-size", "ledger-segment-size", "metrics", "kill-switch", "root-namespace", "threads", "handshake-timeout", "idle-timeout",
        "path-normalization", "log-level",
    ]

    /// Parsed settings plus the log level (handled by the caller's logging bootstrap).
    public static func parse(_ arguments: [String]) throws(UsageError) -> (ProxyConfig, logLevel: String?) {
        try parse(arguments, environment: ProcessInfo.processInfo.environment)
    }

    public static func parse(_ arguments: [String], environment: [String: String]) throws(UsageError) -> (ProxyConfig, logLevel: String?) {
        var values: [String: String] = [:]
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            guard argument.hasPrefix("--") else { throw UsageError("unexpected argument '\(argument)'") }
            var name = String(argument.dropFirst(2))
            var value: String
            if let equals = name.firstIndex(of: "=") {
                value = String(name[name.index(after: equals)...])
                name = String(name[..<equals])
            } else {
                index += 1
                guard index < arguments.count else { throw UsageError("--\(name) needs a value") }
                value = arguments[index]
            }
            guard flags.contains(name) else { throw UsageError("unknown option --\(name) (see sigil proxy run --help)") }
            values[name] = value
            index += 1
        }
        var file: [String: String] = [:]
        if let path = values["config"] { file = try loadConfig(path) }
        func get(_ name: String) -> String? { values[name] ?? file[name.replacingOccurrences(of: "-", with: "_")] }
        func required(_ name: String, _ example: String) throws(UsageError) -> String {
            guard let v = get(name), !v.isEmpty else { throw UsageError("--\(name) is required, e.g. --\(name) \(example)") }
            return v
        }
        let socket: String
        if let v = get("workload-api") ?? environment["SPIFFE_ENDPOINT_SOCKET"], !v.isEmpty {
            socket = v
        } else {
            throw UsageError("--workload-api is required (or SPIFFE_ENDPOINT_SOCKET), e.g. --workload-api unix:///tmp/sigil/agent.sock")
        }
        let (inHost, inPort) = try hostPort(try required("inbound", "127.0.0.1:15006"), flag: "--inbound")
        let (appHost, appPort) = try hostPort(try required("app", "127.0.0.1:8080"), flag: "--app")
        // The app is reached in plaintext, after the proxy has taken TLS off: only over loopback,
        // never across a network where the decrypted traffic (and the XFCC header) could be read.
        guard isLoopback(appHost) else {
            throw UsageError("--app '\(appHost):\(appPort)' must be on loopback (127.0.0.1, ::1 or localhost): the proxy forwards decrypted traffic to it in plaintext")
        }
        let namespace = try required("namespace", "default")
        let policies = try required("policies", "deploy/policies")
        guard FileManager.default.fileExists(atPath: policies) else {
            throw UsageError("--policies '\(policies)' does not exist (an empty directory means: no policies, allow all)")
        }
        let labels = try parseLabels(get("labels") ?? "")
        var mode: PeerAuthentication.Mode?
        if let text = get("mtls") {
            guard let m = PeerAuthentication.Mode(rawValue: text.uppercased()), m != .unset else {
                throw UsageError("--mtls '\(text)' must be STRICT, PERMISSIVE or DISABLE")
            }
            mode = m
        }
        let proto = (get("protocol") ?? "http").lowercased()
        guard proto == "http" || proto == "tcp" else { throw UsageError("--protocol '\(proto)' must be http or tcp") }
        let wanted = get("spiffe-id")
        if let wanted {
            do { _ = try SpiffeID(wanted) } catch { throw UsageError("--spiffe-id: \(error.message)") }
        }
        var outbound: (String, Int)?
        var upstream: (String, Int)?
        var upstreamID: SpiffeID?
        let outText = get("outbound"), upText = get("upstream"), upIDText = get("upstream-id")
        if outText != nil || upText != nil || upIDText != nil {
            guard let outText, let upText, let upIDText else {
                throw UsageError("--outbound, --upstream and --upstream-id go together (the app's listener, the peer's inbound, and the SPIFFE ID it must prove)")
            }
            outbound = try hostPort(outText, flag: "--outbound")
            // Whoever reaches the outbound listener calls the upstream under this workload's SVID.
            guard let listener = outbound, isLoopback(listener.0) else {
                throw UsageError("--outbound '\(outText)' must listen on loopback (127.0.0.1, ::1 or localhost): whoever reaches it calls the upstream as this workload")
            }
            upstream = try hostPort(upText, flag: "--upstream")
            do { upstreamID = try SpiffeID(istioPrincipal: upIDText) } catch { throw UsageError("--upstream-id: \(error.message)") }
        }
        var threads = 0
        if let text = get("threads") {
            guard let n = Int(text), (1...256).contains(n) else { throw UsageError("--threads '\(text)' must be a number from 1 to 256") }
            threads = n
        }
        var ledgerSync = ProxyConfig.defaultLedgerSyncMillis
        if let text = get("ledger-sync-ms") {
            guard let n = Int(text), (0...60_000).contains(n) else {
                throw UsageError("--ledger-sync-ms '\(text)' must be a number of milliseconds from 0 (sync every batch) to 60000")
            }
            ledgerSync = n
        }
        /// A duration flag inside `range`; the error names the flag, the range and an example.
        func duration(_ flag: String, _ text: String, _ range: ClosedRange<Duration>, example: String) throws(UsageError) -> Duration {
            let limit = "--\(flag) '\(text)' must be a duration from \(DurationText.format(range.lowerBound)) to \(DurationText.format(range.upperBound)), e.g. \(example)"
            let value: Duration
            do { value = try DurationText.parse(text) } catch { throw UsageError("\(limit): \(error.message)") }
            guard range.contains(value) else { throw UsageError(limit) }
            return value
        }
        var handshakeTimeout = ProxyConfig.defaultHandshakeTimeout
        if let text = get("handshake-timeout") {
            handshakeTimeout = try duration("handshake-timeout", text, ProxyConfig.handshakeTimeoutRange, example: "10s")
        }
        var idleTimeout = ProxyConfig.defaultIdleTimeout
        if let text = get("idle-timeout") {
            idleTimeout = try duration("idle-timeout", text, ProxyConfig.idleTimeoutRange, example: "1h")
            guard idleTimeout >= handshakeTimeout else {
                throw UsageError("--idle-timeout '\(text)' must not be shorter than --handshake-timeout (\(DurationText.format(handshakeTimeout)))")
            }
        }
        let ledgerServer = get("ledger-server")
        if let ledgerServer {
            guard get("ledger") != nil else { throw UsageError("--ledger-server ships the rows of --ledger: give the spool file too") }
            _ = try hostPort(ledgerServer, flag: "--ledger-server")
        }
        var ledgerMaxSize = ProxyConfig.defaultLedgerMaxSize
        if let text = get("ledger-max-size") { ledgerMaxSize = try size(text, flag: "--ledger-max-size") }
        var ledgerSegmentSize = ProxyConfig.defaultLedgerSegmentSize
        if let text = get("ledger-segment-size") { ledgerSegmentSize = try size(text, flag: "--ledger-segment-size") }
        var metrics: (String, Int)?
        if let text = get("metrics") {
            let (host, port) = try hostPort(text, flag: "--metrics")
            guard isLoopback(host) else {
                throw UsageError("--metrics '\(text)' must listen on loopback (127.0.0.1, ::1 or localhost): the metrics endpoint has no authentication")
            }
            metrics = (host, port)
        }
        do { _ = try WorkloadAPIClient.socketPath(fromEndpoint: socket) } catch { throw UsageError(error.message) }
        var config = ProxyConfig(
            workloadAPISocket: socket, inboundHost: inHost, inboundPort: inPort, appHost: appHost, appPort: appPort,
            namespace: namespace, labels: labels, policiesPath: policies,
            rootNamespace: get("root-namespace") ?? PolicyEvaluator.defaultRootNamespace, mtls: mode, spiffeID: wanted,
            outboundHost: outbound?.0, outboundPort: outbound?.1, upstreamHost: upstream?.0, upstreamPort: upstream?.1,
            upstreamID: upstreamID, ledgerPath: get("ledger"), ledgerSyncMillis: ledgerSync, killSwitchPath: get("kill-switch"), tcpMode: proto == "tcp",
            threads: threads)
        config.ledgerServer = ledgerServer
        config.handshakeTimeout = handshakeTimeout
        config.idleTimeout = idleTimeout
        config.ledgerMaxSize = ledgerMaxSize
        config.ledgerSegmentSize = ledgerSegmentSize
        if let text = get("path-normalization") {
            guard let mode = RequestTarget.Normalization(flag: text) else {
                throw UsageError("--path-normalization '\(text)' is not one of "
                                 + RequestTarget.Normalization.allCases.map(\.rawValue).joined(separator: ", ")
                                 + " (Istio's levels; NONE is not offered)")
            }
            config.pathNormalization = mode
        }
        config.metricsHost = metrics?.0
        config.metricsPort = metrics?.1
        let level = get("log-level")
        if let level, !["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(level.lowercased()) {
            throw UsageError("--log-level '\(level)' is not one of trace, debug, info, notice, warning, error, critical")
        }
        return (config, level)
    }

    public static func hostPort(_ text: String, flag: String) throws(UsageError) -> (String, Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
            throw UsageError("\(flag) '\(text)' must be HOST:PORT, e.g. 127.0.0.1:15006")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host.isEmpty ? "0.0.0.0" : host, port)
    }

    /// A size in bytes: digits with an optional unit, B, KiB, MiB, GiB, TiB (powers of 1024) or
    /// KB, MB, GB, TB (powers of 1000); at least 4 KiB.
    public static func size(_ text: String, flag: String) throws(UsageError) -> Int {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        let digits = trimmed.prefix { $0.isASCII && $0.isNumber }
        let unit = trimmed.dropFirst(digits.count).trimmingCharacters(in: .whitespaces).lowercased()
        let multipliers: [String: Int] = [
            "": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
            "kb": 1_000, "mb": 1_000_000, "gb": 1_000_000_000, "tb": 1_000_000_000_000,
        ]
        guard !digits.isEmpty, let value = Int(digits), let multiplier = multipliers[unit] else {
            throw UsageError("\(flag) '\(text)' must be a size in bytes, e.g. 1GiB, 512MiB or 20000")
        }
        let (bytes, overflow) = value.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { throw UsageError("\(flag) '\(text)' is too large, e.g. 1GiB") }
        guard bytes >= 4096 else {
            throw UsageError("\(flag) '\(text)' must be at least 4KiB (4096 bytes), e.g. 1GiB")
        }
        return bytes
    }

    static func isLoopback(_ host: String) -> Bool {
        if host == "localhost" || host == "::1" { return true }
        let parts = host.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts[0] == "127" && parts.allSatisfy { UInt8($0) != nil }
    }

    public static func parseLabels(_ text: String) throws(UsageError) -> [String: String] {
        var labels: [String: String] = [:]
        for pair in text.split(separator: ",") where !pair.isEmpty {
            let kv = pair.split(separator: "=", maxSplits: 1)
            guard kv.count == 2, !kv[0].isEmpty else { throw UsageError("--labels '\(pair)' must be key=value") }
            labels[String(kv[0]).trimmingCharacters(in: .whitespaces)] = String(kv[1]).trimmingCharacters(in: .whitespaces)
        }
        return labels
    }

    static func loadConfig(_ path: String) throws(UsageError) -> [String: String] {
        do {
            return try SettingsFile.load(path: path, allowed: flags.subtracting(["config"]), example: "inbound: 127.0.0.1:15006")
        } catch {
            throw UsageError(error.description)
        }
    }
}
