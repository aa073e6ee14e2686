#if canImport(CoreFoundation)
import CoreFoundation  // the release build resolves Glibc struct members (stat, timespec) through it
#endif
import ArgumentParser
import SigilCore
import SigilAgent
import SigilRPC
import SigilCA
import X509
import Foundation

/// `--socket`, shared by the Workload API commands.
struct WorkloadSocketOption: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The Workload API socket: a path or unix:///path (default: $SPIFFE_ENDPOINT_SOCKET or /tmp/sigil/agent.sock).", valueName: "path"))
    var socket: String?

    func path() throws -> String {
        // --socket: a path as given or an address; SPIFFE_ENDPOINT_SOCKET: an address (or absolute path).
        do {
            if let socket { return try WorkloadAPIClient.socketPath(fromOption: socket) }
        } catch {
            throw CLIError.usage("--socket: \(error.message)")
        }
        guard let endpoint = ProcessInfo.processInfo.environment["SPIFFE_ENDPOINT_SOCKET"], !endpoint.isEmpty else {
            return "/tmp/sigil/agent.sock"
        }
        do {
            return try WorkloadAPIClient.socketPath(fromEndpoint: endpoint)
        } catch {
            throw CLIError.usage("SPIFFE_ENDPOINT_SOCKET: \(error.message)")
        }
    }
}

struct SvidCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "svid", abstract: "Fetch this process's X509-SVIDs from the Workload API (like spire-agent api fetch x509).",
        subcommands: [SvidFetch.self, SvidWatch.self])
}

struct SvidFetch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fetch",
        abstract: "Fetch and print the X509-SVIDs the agent gives this process; optionally write them to files.",
        discussion: """
            --write DIR writes svid.pem (chain), svid.key (PKCS#8, mode 0600) and bundle.pem for the first
            SVID, and svid.<n>.pem / svid.<n>.key / bundle.<n>.pem for further ones.
            """)

    @OptionGroup var workload: WorkloadSocketOption
    @Option(name: .long, help: ArgumentHelp("Write the SVIDs, keys and bundle into this directory.", valueName: "dir")) var write: String?
    @Flag(name: .long, help: "Print the result as JSON.") var json = false

    func run() async throws {
        let context: FetchedX509Context
        do {
            context = try await WorkloadAPIClient().fetchX509(socketPath: try workload.path())
        } catch let error as WorkloadAPIError {
            throw error.code == .permissionDenied ? CLIError.negative(error.message) : CLIError.usage(error.message)
        }
        printSVIDs(context, json: json)
        if let write { try writeSVIDs(context, to: write) }
    }
}

struct SvidWatch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "watch", abstract: "Print every X509-SVID update (rotation, entry change) until interrupted.")

    @OptionGroup var workload: WorkloadSocketOption
    @Flag(name: .long, help: "Print each update as one JSON line.") var json = false

    func run() async throws {
        let json = self.json
        do {
            try await WorkloadAPIClient().watchX509(socketPath: try workload.path()) { context in
                if !json { print("--- update at \(iso8601(Date()))") }
                printSVIDs(context, json: json, compact: true)
                fflush(nil)
            }
        } catch let error as WorkloadAPIError {
            throw error.code == .permissionDenied ? CLIError.negative(error.message) : CLIError.usage(error.message)
        }
    }
}

struct SVIDOut: Encodable {
    let spiffe_id, serial, hint: String
    let not_after: Date
    let chain_length, bundle_roots: Int
}

func printSVIDs(_ context: FetchedX509Context, json: Bool, compact: Bool = false) {
    let rows = context.svids.map { svid in
        SVIDOut(spiffe_id: svid.spiffeID, serial: svid.certificates.first?.serialHex ?? "", hint: svid.hint,
                not_after: svid.certificates.first?.notValidAfter ?? Date(timeIntervalSince1970: 0),
                chain_length: svid.certificates.count, bundle_roots: svid.bundle.count)
    }
    if json {
        if compact {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            encoder.dateEncodingStrategy = .iso8601
            if let data = try? encoder.encode(rows) { print(String(decoding: data, as: UTF8.self)) }
        } else {
            printJSON(rows)
        }
        return
    }
    for (index, svid) in context.svids.enumerated() {
        if index > 0 { print() }
        print("SPIFFE ID:      \(svid.spiffeID)")
        print("Serial:         \(rows[index].serial)")
        print("Valid until:    \(iso8601(rows[index].not_after))")
        for (n, cert) in svid.certificates.enumerated() {
            print("Chain [\(n)]:      \(cert.subject) (issuer \(cert.issuer))")
        }
        print("Trust bundle:   \(svid.bundle.count) root(s)")
        if !svid.hint.isEmpty { print("Hint:           \(svid.hint)") }
    }
}

func writeSVIDs(_ context: FetchedX509Context, to directory: String) throws {
    do {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    } catch {
        throw CLIError.usage("cannot create --write directory '\(directory)': \(error.localizedDescription)")
    }
    // spire-agent's names (`api fetch x509 -write`): svid.N.pem, svid.N.key, bundle.N.pem for the
    // Nth SVID; the first is also written as svid.pem, svid.key, bundle.pem (Sigil's first names).
    for (index, svid) in context.svids.enumerated() {
        let chain = svid.certificates.map(\.pemString).joined()
        let key = pemEncode(svid.privateKeyPKCS8DER, label: "PRIVATE KEY")
        let bundle = svid.bundle.map(\.pemString).joined()
        for suffix in index == 0 ? [".0", ""] : [".\(index)"] {
            try writeFile(directory + "/svid\(suffix).pem", chain, mode: 0o644)
            try writeFile(directory + "/svid\(suffix).key", key, mode: 0o600)
            try writeFile(directory + "/bundle\(suffix).pem", bundle, mode: 0o644)
        }
        let names = index == 0 ? "svid.0.pem, svid.0.key, bundle.0.pem (and svid.pem, svid.key, bundle.pem)" : "svid.\(index).pem, svid.\(index).key, bundle.\(index).pem"
        FileHandle.standardError.write(Data("wrote \(directory)/\(names) for \(svid.spiffeID)\n".utf8))
    }
}

func writeFile(_ path: String, _ text: String, mode: mode_t) throws {
    try KeyFiles.writeAtomically(Array(text.utf8), to: path, mode: mode)
}
