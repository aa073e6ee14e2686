#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Foundation
import SigilCore
import UnixSignals

/// `sigil demo`: the whole system on loopback, one command.
struct DemoCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Run the whole system on loopback: CA server, agent, two services behind proxies, calls, and the ledger.",
        usage: "sigil demo [--dir <dir>] [--keep-running] [--no-wait]",
        discussion: """
            Starts, in a fresh directory (embedded SQLite, loopback only):
              a CA server and a node agent (attested with a single-use join token);
              two sample HTTP services, "web" and "api", each behind a sigil proxy;
              identities spiffe://demo.sigil/ns/shop/sa/web and .../sa/api for them;
              an Istio AuthorizationPolicy: api accepts GET /api/* from web only, STRICT mTLS.
            Then makes an allowed call (web → api), a denied one, and a plaintext one, and prints
            the decisions and the api proxy's ledger rows. Interactive runs keep the system up until
            Ctrl-C (try the printed curl commands); non-interactive runs stop right away.
            """,
        subcommands: [DemoApp.self])

    @Option(name: .long, help: ArgumentHelp("Working directory (default: a new one under /tmp).", valueName: "dir")) var dir: String?
    @Flag(name: .long, help: "Keep running until Ctrl-C even when stdin is not a terminal.") var keepRunning = false
    @Flag(name: .long, help: "Stop right after the calls, even on a terminal.") var noWait = false

    func run() async throws {
        let work = try dir ?? makeTempDirectory()
        let demo = try DemoRun(work: work)
        // Signals are trapped from the start: Ctrl-C, SIGTERM or a closed terminal (SIGHUP) at any
        // moment stops every process the demo started (they run in process groups of their own,
        // so a terminal's signal does not reach them).
        let signals = await UnixSignalsSequence(trapping: .sigint, .sigterm, .sighup)
        let interrupted = DemoInterrupt()
        let watcher = Task {
            for await signal in signals {
                if interrupted.signal(signal) { continue }
                // Before the system is up: stop what has started, and end as a signal would.
                if signal != .sighup { demo.say("\ninterrupted: stopping what was started") }
                demo.stop(quiet: signal == .sighup)
                Glibc.exit(128 + signal.rawValue)
            }
        }
        defer { watcher.cancel() }
        var failure: (any Error)?
        do {
            try await demo.start()
            try await demo.calls()
            let interactive = isatty(STDIN_FILENO) == 1
            if !noWait && (keepRunning || interactive) {
                demo.say("\nThe system is up. Try:\n  curl http://127.0.0.1:\(demo.ports.webOutbound)/api/orders\n  curl http://127.0.0.1:\(demo.ports.webOutbound)/admin\n  tail -f \(work)/api-ledger.jsonl\nCtrl-C stops everything.")
                await interrupted.wait()
                demo.say("")
            }
        } catch {
            failure = error
        }
        demo.stop()
        if let failure {
            demo.say("demo failed; logs are in \(work)")
            throw failure
        }
        demo.say("stopped cleanly; files and logs are in \(work)")
    }

    func makeTempDirectory() throws -> String {
        var template = Array("/tmp/sigil-demo.XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw CLIError.usage("cannot create a directory under /tmp") }
        return String(cString: made)
    }
}

/// Where a signal goes: to the waiting demo once the system is up (a clean stop), else nowhere
/// (the caller stops everything and exits).
final class DemoInterrupt: @unchecked Sendable {
    private let lock = NSLock()
    private var waiter: CheckedContinuation<Void, Never>?
    private var fired = false

    /// Whether a waiting demo took the signal.
    func signal(_ signal: UnixSignal) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        guard let waiter else { return false }
        self.waiter = nil
        fired = true
        waiter.resume()
        return true
    }

    /// Waits for a signal (Ctrl-C, SIGTERM, SIGHUP).
    func wait() async {
        await withCheckedContinuation { continuation in
            lock.lock()
            if fired { lock.unlock(); continuation.resume(); return }
            waiter = continuation
            lock.unlock()
        }
    }
}

/// The running demo: child processes of this same binary, and what it prints.
final class DemoRun: @unchecked Sendable {
    struct Ports {
        let server = freePort()
        let webApp = freePort()
        let apiApp = freePort()
        let webInbound = freePort()
        let apiInbound = freePort()
        let webOutbound = freePort()
    }

    let work: String
    let ports = Ports()
    let binary: String
    let trustDomain = "demo.sigil"
    private var children: [(name: String, process: Process)] = []
    private var stopped = false
    private let childLock = NSLock()

    init(work: String) throws {
        self.work = work
        binary = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
    }

    var webID: String { "spiffe://\(trustDomain)/ns/shop/sa/web" }
    var apiID: String { "spiffe://\(trustDomain)/ns/shop/sa/api" }
    var adminSocket: String { work + "/admin.sock" }
    var agentSocket: String { work + "/agent.sock" }

    func say(_ text: String) {
        print(text)
        fflush(nil)
    }

    func start() async throws {
        say("==> working directory \(work) (SQLite, keys 0600, sockets; all on 127.0.0.1)")
        guard !FileManager.default.fileExists(atPath: work + "/ca/sigil.db") else {
            throw CLIError.usage("--dir '\(work)' already holds a demo: give a new directory (or leave out --dir for a fresh one)")
        }
        say("==> sigil ca init --trust-domain \(trustDomain)")
        try runOnce(["ca", "init", "--trust-domain", trustDomain, "--data-dir", work + "/ca"])
        say("==> sigil server run (agent API 127.0.0.1:\(ports.server))")
        try spawn("server", ["server", "run", "--data-dir", work + "/ca", "--listen", "127.0.0.1:\(ports.server)",
                             "--admin-socket", adminSocket, "--log-level", "warning"])
        try await waitFor("the server's admin socket") { FileManager.default.fileExists(atPath: self.adminSocket) }

        let uid = getuid()
        say("==> registering workloads (selector unix:uid:\(uid), parent node-1):")
        for id in [webID, apiID] {
            try runOnce(["entry", "create", "--admin-socket", adminSocket, "--spiffe-id", id, "--parent", "node-1",
                         "--selector", "unix:uid:\(uid)", "--ttl", "1h"])
            say("    \(id)")
        }
        let token = try runOnce(["token", "create", "--admin-socket", adminSocket, "--agent-id", "node-1", "--ttl", "5m"])
            .trimmingCharacters(in: .whitespacesAndNewlines)
        say("==> sigil agent run (join token, single use; Workload API on \(agentSocket))")
        try spawn("agent", ["agent", "run", "--server", "127.0.0.1:\(ports.server)", "--join-token", token,
                            "--trust-bundle", work + "/ca/bundle.pem", "--socket", agentSocket, "--data-dir", work + "/agent",
                            "--log-level", "warning"])

        let policies = work + "/policies"
        try FileManager.default.createDirectory(atPath: policies, withIntermediateDirectories: true)
        try Self.policyYAML(trustDomain: trustDomain).write(toFile: policies + "/shop.yaml", atomically: true, encoding: .utf8)
        say("==> policies (\(policies)/shop.yaml): PeerAuthentication STRICT for ns shop;")
        say("    AuthorizationPolicy shop/api-readers: api allows GET /api/* from \(trustDomain)/ns/shop/sa/web")

        say("==> two sample services: web on 127.0.0.1:\(ports.webApp), api on 127.0.0.1:\(ports.apiApp)")
        try spawn("web-app", ["demo", "app", "--name", "web", "--listen", "127.0.0.1:\(ports.webApp)"])
        try spawn("api-app", ["demo", "app", "--name", "api", "--listen", "127.0.0.1:\(ports.apiApp)"])

        say("==> sigil proxy run for api (inbound 127.0.0.1:\(ports.apiInbound)) and web (inbound 127.0.0.1:\(ports.webInbound), outbound 127.0.0.1:\(ports.webOutbound) → api)")
        try spawn("api-proxy", ["proxy", "run", "--workload-api", "unix://" + agentSocket, "--spiffe-id", apiID,
                                "--inbound", "127.0.0.1:\(ports.apiInbound)", "--app", "127.0.0.1:\(ports.apiApp)",
                                "--namespace", "shop", "--labels", "app=api", "--policies", policies,
                                "--ledger", work + "/api-ledger.jsonl", "--ledger-server", "127.0.0.1:\(ports.server)",
                                "--log-level", "warning"])
        try spawn("web-proxy", ["proxy", "run", "--workload-api", "unix://" + agentSocket, "--spiffe-id", webID,
                                "--inbound", "127.0.0.1:\(ports.webInbound)", "--app", "127.0.0.1:\(ports.webApp)",
                                "--namespace", "shop", "--labels", "app=web", "--policies", policies,
                                "--outbound", "127.0.0.1:\(ports.webOutbound)", "--upstream", "127.0.0.1:\(ports.apiInbound)",
                                "--upstream-id", apiID, "--ledger", work + "/web-ledger.jsonl",
                                "--ledger-server", "127.0.0.1:\(ports.server)", "--log-level", "warning"])
        // Through web's outbound to api: until api's proxy serves, the outbound answers 503
        // (upstream connect error) or nothing at all.
        try await waitFor("both proxies") {
            guard let status = (try? DemoHTTP.get(port: self.ports.webOutbound, path: "/healthz"))?.status else { return false }
            return status != 503
        }
    }

    func calls() async throws {
        say("")
        say("==> web calls api through its proxy: GET /api/orders")
        let allowed = try DemoHTTP.get(port: ports.webOutbound, path: "/api/orders")
        say("    \(allowed.status) \(allowed.body.trimmingCharacters(in: .whitespacesAndNewlines))")
        say("==> web calls api: GET /admin (no rule allows it)")
        let denied = try DemoHTTP.get(port: ports.webOutbound, path: "/admin")
        say("    \(denied.status) \(denied.body)")
        say("==> a plaintext caller goes straight to api's inbound port (STRICT mTLS)")
        if let plain = try? DemoHTTP.get(port: ports.apiInbound, path: "/api/orders") {
            say("    \(plain.status) \(plain.body)")
        } else {
            say("    refused: connection closed before any response")
        }
        // The ledger writer flushes every 100 ms.
        try await Task.sleep(for: .milliseconds(400))
        say("")
        say("==> api's ledger (\(work)/api-ledger.jsonl): who called whom")
        let text = (try? String(contentsOfFile: work + "/api-ledger.jsonl", encoding: .utf8)) ?? ""
        say("    " + ["time", "source", "method", "path", "status", "decision", "policy/rule", "mTLS"].joined(separator: " | "))
        for line in text.split(separator: "\n") {
            guard let row = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { continue }
            let kind = row["kind"] as? String ?? ""
            guard kind == "request" || kind == "connection" else { continue }
            func s(_ k: String) -> String { (row[k] as? String) ?? ((row[k] as? NSNumber)?.stringValue ?? "-") }
            let policy = row["policy"] is String ? "\(s("policy"))#\(s("rule"))" : "-"
            let mtls = (row["mtls"] as? Bool) == true ? "yes" : "no"
            let source = row["source"] is String ? s("source") : "(plaintext \(s("source_ip")))"
            say("    " + [String(s("time").suffix(16)), source, s("method"), s("path"), s("status"), s("decision"), policy, mtls].joined(separator: " | "))
            if kind == "connection", let detail = row["detail"] as? String { say("      \(detail)") }
        }
        guard allowed.status == 200, denied.status == 403 else {
            throw CLIError.negative("expected 200 for the allowed call and 403 for the denied one, got \(allowed.status) and \(denied.status)")
        }
        // The proxies ship their rows to the server (at least once, stored once): the auditor's view.
        let shippedSpools = [work + "/api-ledger.jsonl.shipped", work + "/web-ledger.jsonl.shipped"]
        try await waitFor("the proxies to ship their ledger rows to the server") {
            shippedSpools.allSatisfy { FileManager.default.fileExists(atPath: $0) }
        }
        say("")
        say("==> sigil audit verify --data-dir \(work)/ca   (the server's copy of both proxies' ledgers, and its own)")
        say("    " + (try runOnce(["audit", "verify", "--data-dir", work + "/ca"])).trimmingCharacters(in: .whitespacesAndNewlines))
        say("==> sigil audit graph --data-dir \(work)/ca   (who called whom)")
        for line in try runOnce(["audit", "graph", "--data-dir", work + "/ca"]).split(separator: "\n") { say("    \(line)") }
    }

    func runningChildren() -> [(name: String, process: Process)] {
        childLock.withLock { children }
    }

    /// Stops every child (SIGTERM, then SIGKILL after 10 s). Safe from a signal handler's task
    /// while the demo is starting: the list of children is taken under a lock.
    func stop(quiet: Bool = false) {
        childLock.lock()
        let running = children
        children.removeAll()
        stopped = true
        childLock.unlock()
        for (_, process) in running.reversed() where process.isRunning {
            process.terminate()
        }
        let deadline = Date().addingTimeInterval(10)
        for (name, process) in running.reversed() {
            while process.isRunning && Date() < deadline { usleep(50_000) }
            if process.isRunning {
                kill(process.processIdentifier, SIGKILL)
                if !quiet { say("    \(name) did not stop in time; killed") }
            }
        }
    }

    @discardableResult
    func runOnce(_ arguments: [String]) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let output = out.fileHandleForReading.readDataToEndOfFile()
        let errors = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw CLIError.negative("sigil \(arguments.prefix(2).joined(separator: " ")) failed: \(String(decoding: errors, as: UTF8.self))")
        }
        return String(decoding: output, as: UTF8.self)
    }

    func spawn(_ name: String, _ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        let log = work + "/\(name).log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.standardOutput = handle
        process.standardError = handle
        childLock.lock()
        defer { childLock.unlock() }
        // Stopping (a signal during start-up): start nothing more.
        guard !stopped else { throw CLIError.negative("the demo is stopping") }
        try process.run()
        children.append((name, process))
    }

    func waitFor(_ what: String, timeout: Duration = .seconds(60), _ check: @escaping () -> Bool) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while clock.now < deadline {
            if check() { return }
            for (name, process) in runningChildren() where !process.isRunning {
                throw CLIError.negative("\(name) exited (status \(process.terminationStatus)); see \(work)/\(name).log")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw CLIError.negative("timed out waiting for \(what); logs are in \(work)")
    }

    static func policyYAML(trustDomain: String) -> String {
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: default
          namespace: shop
        spec:
          mtls:
            mode: STRICT
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: api-readers
          namespace: shop
        spec:
          selector:
            matchLabels:
              app: api
          action: ALLOW
          rules:
          - from:
            - source:
                principals: ["\(trustDomain)/ns/shop/sa/web"]
            to:
            - operation:
                methods: ["GET"]
                paths: ["/api/*", "/healthz"]

        """
    }
}

/// A free TCP port on 127.0.0.1 (bind to 0, read it back, close).
func freePort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
    }
    _ = withUnsafeMutablePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// A blocking HTTP/1.1 GET over loopback (the demo's client; `Connection: close`, 5 s timeout).
enum DemoHTTP {
    struct Response {
        let status: Int
        let body: String
    }

    static func get(port: Int, path: String) throws -> Response {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw CLIError.negative("socket() failed") }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(port).bigEndian
        let connected = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { throw CLIError.negative("connection to 127.0.0.1:\(port) refused") }
        let request = Array("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nConnection: close\r\n\r\n".utf8)
        guard write(fd, request, request.count) == request.count else { throw CLIError.negative("write failed") }
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = read(fd, &chunk, chunk.count)
            if n <= 0 { break }
            data += chunk[0..<n]
        }
        let text = String(decoding: data, as: UTF8.self)
        guard text.hasPrefix("HTTP/1."), text.count >= 12, let status = Int(text.dropFirst(9).prefix(3)) else {
            throw CLIError.negative("no HTTP response from 127.0.0.1:\(port)")
        }
        let body = text.range(of: "\r\n\r\n").map { String(text[$0.upperBound...]) } ?? ""
        return Response(status: status, body: body)
    }
}
