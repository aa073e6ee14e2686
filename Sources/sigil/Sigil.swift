#if canImport(CoreFoundation)
import CoreFoundation  // the release build resolves Glibc struct members (stat, timespec) through it
#endif
import ArgumentParser
import SigilCore
import SigilCA
import SigilStore
import Foundation

@main
struct Sigil: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sigil",
        abstract: "Sigil: SPIFFE workload identity, mTLS and a who-called-whom ledger.",
        discussion: """
            Start here:
              sigil ca init --trust-domain example.org --data-dir pki     create a trust root and a signing CA
              sigil ca sign --data-dir pki --csr req.pem --spiffe-id spiffe://example.org/ns/default/sa/web
              sigil ca status --data-dir pki                               list authorities and their states
              sigil bundle show --data-dir pki --format spiffe             print the trust bundle

            Exit codes: 0 success, 1 a negative answer (denied, verification failed), 2 usage or input error.
            """,
        version: SigilVersion.current,
        subcommands: [CACommand.self, BundleCommand.self, ServerCommand.self, TokenCommand.self, EntryCommand.self, AgentCommand.self, SvidCommand.self, PolicyCommand.self, ProxyCommand.self, AuditCommand.self, DemoCommand.self]
    )

    static func main() async {
        var command: any ParsableCommand
        do {
            command = try parseAsRoot()
        } catch {
            exit(with: error)
        }
        do {
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let error as ValidationError {
            // Found while running: the command line parsed, so the root's usage would only mislead.
            FileHandle.standardError.write(Data("error: \(error.message)\n".utf8))
            Foundation.exit(2)
        } catch {
            // `--help` and the like also arrive here (ArgumentParser's help command throws them).
            exit(with: error, parsed: true)
        }
    }

    /// Prints the error and exits: 0 for help/version, 1 for a negative answer, 2 for usage or input errors.
    static func exit(with error: any Error, parsed: Bool = false) -> Never {
        let code: Int32
        switch error {
        case let e as CAError:
            FileHandle.standardError.write(Data("error: \(e.message)\n".utf8))
            code = 2
        case let e as SigilError:
            FileHandle.standardError.write(Data("error: \(e.message)\n".utf8))
            code = 2
        case let e as StoreError:
            FileHandle.standardError.write(Data("error: \(e.message)\n".utf8))
            code = 2
        case CLIError.usage(let message):
            FileHandle.standardError.write(Data("error: \(message)\n".utf8))
            code = 2
        case CLIError.negative(let message):
            FileHandle.standardError.write(Data("error: \(message)\n".utf8))
            code = 1
        case let e as NegativeAnswer:
            if !e.message.isEmpty { FileHandle.standardError.write(Data("\(e.message)\n".utf8)) }
            code = 1
        case _ where parsed && !String(reflecting: type(of: error)).hasPrefix("ArgumentParser."):
            // A role's own error (server, agent, proxy), after the command line parsed: its message
            // alone, without the root command's usage.
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            code = 2
        default:
            let parserCode = Sigil.exitCode(for: error)
            let message = Sigil.fullMessage(for: error)
            if parserCode == .success {
                if !message.isEmpty { print(message) }
                code = 0
            } else {
                // House style: "error: ..." in lower case, as for every other error.
                let text = message.hasPrefix("Error: ") ? "error: " + message.dropFirst(7) : Substring(message)
                if !text.isEmpty { FileHandle.standardError.write(Data("\(text)\n".utf8)) }
                // ArgumentParser says 64 (EX_USAGE) for usage errors; Sigil's convention is 2.
                code = parserCode.rawValue == 64 || parserCode.rawValue == 1 ? 2 : parserCode.rawValue
            }
        }
        Foundation.exit(code)
    }
}

/// A well-formed question whose answer is "no" (denied, failed verification): exit code 1.
struct NegativeAnswer: Error {
    let message: String
}

enum SigilVersion {
    static let current = "0.1.0"
}

/// `--data-dir`, shared by the commands that read a CA's files directly.
struct DataDirOption: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The CA's data directory (default: $SIGIL_DATA_DIR or ./pki).", valueName: "dir"))
    var dataDir: String?

    var directory: DataDirectory {
        DataDirectory(dataDir ?? ProcessInfo.processInfo.environment["SIGIL_DATA_DIR"] ?? "pki")
    }
}

func parseDuration(_ text: String, flag: String) throws -> Duration {
    do {
        return try DurationText.parse(text)
    } catch {
        throw ValidationError("\(flag): \(error.message)")
    }
}

/// Reads a small input file (a CSR, a certificate): a regular file of at most 1 MiB, or '-' for stdin.
func readInput(_ path: String, what: String) throws -> [UInt8] {
    let limit = 1 << 20
    if path == "-" {
        let data = FileHandle.standardInput.readData(ofLength: limit + 1)
        guard data.count <= limit else { throw CAError(.invalidCSR, "\(what) on standard input is larger than 1 MiB") }
        return Array(data)
    }
    var st = stat()
    guard stat(path, &st) == 0 else {
        throw CAError(.invalidCSR, "cannot read \(what) '\(path)': \(String(cString: strerror(errno)))")
    }
    guard st.st_mode & S_IFMT == S_IFREG else {
        throw CAError(.invalidCSR, "\(what) '\(path)' is not a regular file")
    }
    guard st.st_size <= limit else {
        throw CAError(.invalidCSR, "\(what) '\(path)' is \(st.st_size) bytes; a CSR is at most 1 MiB")
    }
    guard let data = FileManager.default.contents(atPath: path) else {
        throw CAError(.invalidCSR, "cannot read \(what) '\(path)': permission denied")
    }
    return Array(data)
}

func printJSON<T: Encodable>(_ value: T) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
    encoder.dateEncodingStrategy = .iso8601
    if let data = try? encoder.encode(value) {
        print(String(decoding: data, as: UTF8.self))
    }
}

func iso8601(_ date: Date) -> String {
    date.formatted(.iso8601)
}

/// Prints rows as an aligned table.
func printTable(_ header: [String], _ rows: [[String]]) {
    var widths = header.map(\.count)
    for row in rows {
        for (i, cell) in row.enumerated() where i < widths.count { widths[i] = max(widths[i], cell.count) }
    }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in i == cells.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
            .joined(separator: "  ")
    }
    print(line(header))
    for row in rows { print(line(row)) }
}

