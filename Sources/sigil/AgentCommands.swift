import ArgumentParser
import SigilCore
import SigilAgent
import SigilRPC
import Logging
import Foundation

struct AgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Run the node agent, or list and evict agents.",
        subcommands: [AgentRun.self, AgentList.self, AgentEvict.self])
}

struct AgentRun: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Attest to the server and serve the SPIFFE Workload API on a Unix socket.",
        discussion: """
            First start: --join-token (from `sigil token create`) and --trust-bundle (the server's
            bundle.pem) are required. Later starts reuse the agent SVID cached in --data-dir and need
            no token; while the server is away the agent keeps serving what it has cached.
            A refused token (used, expired, unknown) ends the agent with the server's reason.

            A --config YAML file may set: server, join_token, trust_bundle, trust_domain, socket,
            data_dir, log_level. Flags win over the file.

            Example:
              sigil agent run --server 127.0.0.1:8081 --join-token $TOKEN --trust-bundle pki/bundle.pem \\
                  --socket /tmp/sigil/agent.sock --data-dir /tmp/sigil/agent
            """)

    @Option(name: .long, help: ArgumentHelp("YAML config file.", valueName: "file")) var config: String?
    @Option(name: .long, help: ArgumentHelp("The server's agent API address.", valueName: "host:port")) var server: String?
    @Option(name: .long, help: ArgumentHelp("Single-use join token (first start only).", valueName: "token")) var joinToken: String?
    @Option(name: .long, help: ArgumentHelp("PEM roots to trust the server with (the server's bundle.pem).", valueName: "file")) var trustBundle: String?
    @Option(name: .long, help: ArgumentHelp("Trust domain, if the bundle does not name it.", valueName: "td")) var trustDomain: String?
    @Option(name: .long, help: ArgumentHelp("Workload API socket: a path or unix:///path (default /tmp/sigil/agent.sock).", valueName: "path")) var socket: String?
    @Option(name: .long, help: ArgumentHelp("Where the agent keeps its SVID and cache, 0700 (default /tmp/sigil/agent: give a persistent directory in production, or a reboot costs a new join token).", valueName: "dir")) var dataDir: String?
    @Option(name: .long, help: ArgumentHelp("trace, debug, info, notice, warning, error.", valueName: "level")) var logLevel: String?

    func run() async throws {
        let file = try loadConfig(config, allowed: ["server", "join_token", "trust_bundle", "trust_domain", "socket", "data_dir", "log_level"],
                                  example: "server: 127.0.0.1:8081")
        try bootstrapLogging(level: logLevel ?? file["log_level"])
        guard let serverText = server ?? file["server"] else {
            throw CLIError.usage("--server HOST:PORT is required (the server's --listen address)")
        }
        let (host, port) = try parseHostPort(serverText, flag: "--server")
        if let problem = ServerTarget.problem(host: host) ?? (port == 0 ? "port 0 is not a server's port" : nil) {
            throw CLIError.usage("--server '\(serverText)': \(problem); give the server's HOST:PORT, e.g. 127.0.0.1:8081, [::1]:8081 or sigil-server.example:8081")
        }
        // A path, or the SPIFFE_ENDPOINT_SOCKET form workloads are given (unix:///path).
        let socketPath: String
        do { socketPath = try WorkloadAPIClient.socketPath(fromOption: socket ?? file["socket"] ?? "/tmp/sigil/agent.sock") } catch {
            throw CLIError.usage("--socket: \(error.message)")
        }
        let settings = AgentConfig(
            serverHost: host, serverPort: port,
            joinToken: joinToken ?? file["join_token"],
            trustBundlePath: trustBundle ?? file["trust_bundle"],
            trustDomain: trustDomain ?? file["trust_domain"],
            socketPath: socketPath,
            dataDirectory: dataDir ?? file["data_dir"] ?? "/tmp/sigil/agent")
        do {
            try await SigilAgentRole.run(settings, logger: Logger(label: "sigil.agent"))
        } catch let error as AgentError {
            throw error.isUsage ? CLIError.usage(error.message) : CLIError.negative(error.message)
        } catch let error as WorkloadAPIError {
            throw CLIError.negative("Workload API: \(error.message)")
        }
    }
}
