import ArgumentParser
import SigilCore
import SigilCA
import SigilRPC
import SigilServer
import GRPCCore
import Logging
import SigilPolicy
import Foundation

/// `--admin-socket`, shared by the commands that talk to a running server.
struct AdminSocketOption: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The server's admin socket (default: $SIGIL_ADMIN_SOCKET or \(ServerConfig.defaultAdminSocket)).", valueName: "path"))
    var adminSocket: String?

    init() {}
    init(adminSocket: String?) { self.adminSocket = adminSocket }

    var path: String {
        adminSocket ?? ProcessInfo.processInfo.environment["SIGIL_ADMIN_SOCKET"] ?? ServerConfig.defaultAdminSocket
    }

    /// Runs an admin call, turning gRPC failures into errors a person can act on.
    func call<T: Sendable>(_ body: @Sendable @escaping (SigilAdminAPI.Client<GRPCNIOTransportHTTP2.HTTP2ClientTransport.Posix>) async throws -> T) async throws -> T {
        guard FileManager.default.fileExists(atPath: path) else {
            throw CLIError.usage("no admin socket at \(path): is `sigil server run` running? (set --admin-socket or SIGIL_ADMIN_SOCKET)")
        }
        do {
            return try await withAdminClient(socketPath: path, body)
        } catch let error as RPCError {
            switch error.code {
            case .notFound: throw CLIError.negative(error.message)
            case .unavailable where error.message.contains("connect"):
                throw CLIError.usage("cannot reach the server on \(path): \(error.message)")
            default: throw CLIError.usage(error.message)
            }
        }
    }
}

import GRPCNIOTransportHTTP2

/// CLI failures: `usage` exits 2, `negative` exits 1.
enum CLIError: Error {
    case usage(String)
    case negative(String)
}

func bootstrapLogging(level: String?) throws {
    let name = level ?? ProcessInfo.processInfo.environment["SIGIL_LOG_LEVEL"] ?? "info"
    guard let parsed = Logger.Level(rawValue: name.lowercased()) else {
        throw CLIError.usage("log level '\(name)' is not one of trace, debug, info, notice, warning, error, critical"
                             + (level == nil ? " (from SIGIL_LOG_LEVEL)" : ""))
    }
    LoggingSystem.bootstrap { label in OneLineLogHandler(label: label, level: parsed) }
}

/// A YAML config file: a flat map of the long flag names (`data_dir`, `listen`, ...); `allowed`:
/// the settings the command reads (see ``SettingsFile``).
func loadConfig(_ path: String?, allowed: Set<String>, example: String) throws -> [String: String] {
    guard let path else { return [:] }
    do {
        return try SettingsFile.load(path: path, allowed: allowed, example: example)
    } catch {
        throw CLIError.usage(error.description)
    }
}

func parseHostPort(_ text: String, flag: String) throws -> (String, Int) {
    guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
        throw CLIError.usage("\(flag) '\(text)' must be HOST:PORT, e.g. 127.0.0.1:8081")
    }
    var host = String(text[..<colon])
    if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    return (host.isEmpty ? "0.0.0.0" : host, port)
}

// MARK: - server

struct ServerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "server",
        abstract: "Run the CA server (agent API over mTLS, admin API over a Unix socket).",
        subcommands: [ServerRun.self])
}

struct ServerRun: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Serve the agent API and the admin API until SIGTERM or SIGINT.",
        discussion: """
            The CA must exist first (sigil ca init). Agents connect to --listen over mTLS; operators
            use the admin socket (mode 0600) through `sigil token|entry|agent|bundle` commands.

            A --config YAML file may set: data_dir, listen, admin_socket, agent_svid_ttl, log_level,
            ledger_retention, ui.
            Flags win over the file.

            Example:
              sigil server run --data-dir pki --listen 127.0.0.1:8081 --admin-socket /tmp/sigil/admin.sock
            """)

    @Option(name: .long, help: ArgumentHelp("YAML config file.", valueName: "file")) var config: String?
    @Option(name: .long, help: ArgumentHelp("The CA's data directory (default: $SIGIL_DATA_DIR or ./pki).", valueName: "dir")) var dataDir: String?
    @Option(name: .long, help: ArgumentHelp("Agent API address (default 127.0.0.1:8081).", valueName: "host:port")) var listen: String?
    @Option(name: .long, help: ArgumentHelp("Admin API socket (default: $SIGIL_ADMIN_SOCKET or \(ServerConfig.defaultAdminSocket)).", valueName: "path")) var adminSocket: String?
    @Option(name: .long, help: ArgumentHelp("Lifetime of agent SVIDs (default 1h).", valueName: "duration")) var agentSvidTtl: String?
    @Option(name: .long, help: ArgumentHelp("trace, debug, info, notice, warning, error.", valueName: "level")) var logLevel: String?
    @Option(name: .long, help: ArgumentHelp("Keep ledger rows this long (e.g. 400d); older rows are removed, leaving a signed checkpoint so the rest still verifies (default: keep everything).", valueName: "duration"))
    var ledgerRetention: String?
    @Option(name: .long, help: ArgumentHelp("Serve the read-only ledger page at http://HOST:PORT/ui (loopback only).", valueName: "host:port")) var ui: String?

    func run() async throws {
        let file = try loadConfig(config, allowed: ["data_dir", "listen", "admin_socket", "agent_svid_ttl", "log_level", "ledger_retention", "ui"],
                                  example: "data_dir: /var/lib/sigil")
        try bootstrapLogging(level: logLevel ?? file["log_level"])
        let listenText = listen ?? file["listen"] ?? "127.0.0.1:8081"
        let (host, port) = try parseHostPort(listenText, flag: "--listen")
        guard ServerTarget.isIPv4(host) || ServerTarget.isIPv6(host) else {
            throw CLIError.usage("--listen '\(listenText)' must be an IP address and port, e.g. 127.0.0.1:8081 or [::1]:8081 (0.0.0.0 for every interface)")
        }
        let ttl = try parseDuration(agentSvidTtl ?? file["agent_svid_ttl"] ?? "1h", flag: "--agent-svid-ttl")
        // Checked here, not at the first attestation (where it would fail after the join token was spent).
        guard ttl >= SVIDProfile.minimumTTL else {
            throw CLIError.usage("--agent-svid-ttl \(DurationText.format(ttl)) is too short; the minimum is \(DurationText.format(SVIDProfile.minimumTTL))")
        }
        var settings = ServerConfig(
            dataDirectory: DataDirectory(dataDir ?? file["data_dir"] ?? ProcessInfo.processInfo.environment["SIGIL_DATA_DIR"] ?? "pki"),
            listenHost: host, listenPort: port,
            adminSocketPath: adminSocket ?? file["admin_socket"] ?? ProcessInfo.processInfo.environment["SIGIL_ADMIN_SOCKET"] ?? ServerConfig.defaultAdminSocket,
            agentSVIDTTL: ttl)
        if let text = ledgerRetention ?? file["ledger_retention"] {
            let retention = try parseDuration(text, flag: "--ledger-retention")
            guard retention >= .seconds(1) else { throw CLIError.usage("--ledger-retention must be at least 1s") }
            settings.ledgerRetention = retention
        }
        if let text = ui ?? file["ui"] {
            do { settings.ledgerUI = try LedgerUIAddress(parsing: text) } catch { throw CLIError.usage(error.message) }
        }
        do {
            try await SigilServer.run(settings, logger: Logger(label: "sigil.server"))
        } catch let error as ServerError {
            throw CLIError.usage(error.message)
        } catch where "\(error)".contains("Address already in use") {
            throw CLIError.usage("--listen \(host):\(port) is already in use; stop what listens there or choose another port")
        }
    }
}

// MARK: - token

struct TokenCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "token", abstract: "Create single-use join tokens for agents.", subcommands: [TokenCreate.self])
}

struct TokenCreate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a single-use, expiring join token; prints the token.",
        discussion: """
            --agent-id is a name (web-node-1) or a full ID (spiffe://<td>/sigil/agent/web-node-1).
            The token works once, before it expires; the server stores only its SHA-256.

            Example:
              sigil agent run --join-token "$(sigil token create --agent-id node-1)" ...
            """)

    @Option(name: .long, help: ArgumentHelp("The agent's name or SPIFFE ID.", valueName: "id")) var agentId: String
    @Option(name: .long, help: ArgumentHelp("How long the token is valid.", valueName: "duration")) var ttl: String = "10m"
    @Flag(name: .long, help: "Print the result as JSON.") var json = false
    @OptionGroup var admin: AdminSocketOption

    func run() async throws {
        let seconds = try parseDuration(ttl, flag: "--ttl").components.seconds
        guard seconds >= 1 else { throw CLIError.usage("--ttl must be at least 1s") }
        let agentId = self.agentId
        let response = try await admin.call { client in
            var request = SigilCreateJoinTokenRequest()
            request.agentID = agentId
            request.ttlSeconds = seconds
            return try await client.createJoinToken(request, options: adminCallOptions)
        }
        if json {
            struct Out: Encodable { let token: String; let agent_id: String; let expires_at: Date }
            printJSON(Out(token: response.token, agent_id: response.agentID, expires_at: Date(timeIntervalSince1970: Double(response.expiresAt))))
        } else {
            print(response.token)
        }
    }
}

// MARK: - entry

struct EntryCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "entry", abstract: "Register which workloads get which SPIFFE IDs.",
        subcommands: [EntryCreate.self, EntryList.self, EntryShow.self, EntryDelete.self])
}

struct EntryCreate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a registration entry.",
        discussion: """
            A workload on the node of agent --parent whose process matches every --selector gets
            --spiffe-id. Selectors: unix:uid:<n>, unix:gid:<n>, unix:user:<name>, unix:group:<name>,
            unix:path:<absolute executable path>, unix:supplementary_gid:<n>,
            unix:supplementary_group:<name>.

            Example:
              sigil entry create --spiffe-id spiffe://example.org/ns/default/sa/web \\
                  --parent node-1 --selector unix:uid:1000 --ttl 1h
            """)

    @Option(name: .long, help: ArgumentHelp("The workload's SPIFFE ID.", valueName: "id")) var spiffeId: String
    @Option(name: .long, help: ArgumentHelp("The agent (name or SPIFFE ID) whose node runs the workload.", valueName: "agent")) var parent: String
    @Option(name: .long, help: ArgumentHelp("A selector (repeatable; all must match).", valueName: "type:key:value")) var selector: [String] = []
    @Option(name: .long, help: ArgumentHelp("SVID lifetime (min 10s).", valueName: "duration")) var ttl: String = "1h"
    @Option(name: .long, help: ArgumentHelp("A DNS name SAN (repeatable).", valueName: "name")) var dns: [String] = []
    @Flag(name: .long, help: "Print the result as JSON.") var json = false
    @OptionGroup var admin: AdminSocketOption

    func run() async throws {
        var entry = SigilEntry()
        entry.spiffeID = spiffeId
        entry.parentID = parent
        entry.selectors = selector
        entry.ttlSeconds = try parseDuration(ttl, flag: "--ttl").components.seconds
        guard entry.ttlSeconds >= 10 else { throw CLIError.usage("--ttl must be at least 10s") }
        entry.dnsNames = dns
        let request = entry
        let created = try await admin.call { client in try await client.createEntry(request, options: adminCallOptions) }
        if json { printJSON(EntryOut(created)) } else { printEntries([created]) }
    }
}

struct EntryList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List registration entries.")
    @Option(name: .long, help: ArgumentHelp("Only entries of this agent.", valueName: "agent")) var parent: String?
    @Option(name: .long, help: ArgumentHelp("Only entries with this SPIFFE ID.", valueName: "id")) var spiffeId: String?
    @Flag(name: .long, help: "Print the result as JSON.") var json = false
    @OptionGroup var admin: AdminSocketOption

    func run() async throws {
        var request = SigilListEntriesRequest()
        request.parentID = parent ?? ""
        request.spiffeID = spiffeId ?? ""
        let r = request
        let entries = try await admin.call { client in try await client.listEntries(r, options: adminCallOptions).entries }
        if json { printJSON(entries.map(EntryOut.init)) } else { printEntries(entries) }
    }
}

struct EntryShow: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "show", abstract: "Show one registration entry.")
    @Argument(help: "The entry ID.") var id: String
    @Flag(name: .long, help: "Print the result as JSON.") var json = false
    @OptionGroup var admin: AdminSocketOption

    func run() async throws {
        var request = SigilGetEntryRequest()
        request.id = id
        let r = request
        let entry = try await admin.call { client in try await client.getEntry(r, options: adminCallOptions) }
        if json { printJSON(EntryOut(entry)) } else { printEntries([entry]) }
    }
}

struct EntryDelete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "delete", abstract: "Delete a registration entry (its workloads lose that identity).")
    @Argument(help: "The entry ID.") var id: String
    @OptionGroup var admin: AdminSocketOption

    func run() async throws {
        var request = SigilDeleteEntryRequest()
        request.id = id
        let r = request
        let deleted = try await admin.call { client in try await client.deleteEntry(r, options: adminCallOptions) }
        print("deleted entry \(deleted.entry.id) (\(deleted.entry.spiffeID))")
    }
}

struct EntryOut: Encodable {
    let id, spiffe_id, parent_id: String
    let selectors, dns_names: [String]
    let ttl_seconds, revision: Int64
    init(_ e: SigilEntry) {
        id = e.id; spiffe_id = e.spiffeID; parent_id = e.parentID; selectors = e.selectors
        dns_names = e.dnsNames; ttl_seconds = e.ttlSeconds; revision = e.revision
    }
}

func printEntries(_ entries: [SigilEntry]) {
    printTable(["ENTRY ID", "SPIFFE ID", "PARENT", "SELECTORS", "TTL", "DNS"], entries.map {
        [$0.id, $0.spiffeID, $0.parentID, $0.selectors.joined(separator: ","), DurationText.format(.seconds($0.ttlSeconds)), $0.dnsNames.joined(separator: ",")]
    })
}

// MARK: - agent (admin side)

struct AgentList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List attested agents.")
    @Flag(name: .long, help: "Print the result as JSON.") var json = false
    @OptionGroup var admin: AdminSocketOption

    func run() async throws {
        let agents = try await admin.call { client in try await client.listAgents(SigilListAgentsRequest(), options: adminCallOptions).agents }
        if json {
            struct Out: Encodable { let id, serial: String; let expires_at, attested_at: Date; let evicted: Bool }
            printJSON(agents.map { Out(id: $0.id, serial: $0.serial, expires_at: Date(timeIntervalSince1970: Double($0.expiresAt)),
                                       attested_at: Date(timeIntervalSince1970: Double($0.attestedAt)), evicted: $0.evicted) })
            return
        }
        printTable(["AGENT ID", "SVID SERIAL", "SVID EXPIRES", "ATTESTED", "STATUS"], agents.map {
            [$0.id, $0.serial, iso8601(Date(timeIntervalSince1970: Double($0.expiresAt))), iso8601(Date(timeIntervalSince1970: Double($0.attestedAt))),
             $0.evicted ? "evicted" : "active"]
        })
    }
}

struct AgentEvict: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "evict", abstract: "Evict an agent: its next call to the server fails; it must attest again with a new token.")
    @Argument(help: "The agent's name or SPIFFE ID.") var id: String
    @OptionGroup var admin: AdminSocketOption

    func run() async throws {
        var request = SigilEvictAgentRequest()
        request.id = id
        let r = request
        let evicted = try await admin.call { client in try await client.evictAgent(r, options: adminCallOptions) }
        print("evicted \(evicted.agent.id)")
    }
}
