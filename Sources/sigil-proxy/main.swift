// The lean sidecar executable: the proxy role and nothing else (no CA, store or CLI framework),
// so each sidecar maps and touches as little as possible. `sigil proxy run` hands over to it when
// it is installed beside `sigil`; it takes the same flags.
#if canImport(Glibc)
import Glibc
#endif
import Logging
import SigilProxy
import SigilRPC

func failWith(_ message: String) {
    let bytes = Array((message + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
}

let arguments = Array(CommandLine.arguments.dropFirst())
if arguments.first == "--help" || arguments.first == "-h" {
    print("usage: sigil-proxy <the flags of `sigil proxy run`> (see sigil proxy run --help)")
    exit(0)
}
do {
    let (config, level) = try ProxyArguments.parse(arguments)
    let parsed = level.flatMap { Logger.Level(rawValue: $0.lowercased()) } ?? .info
    LoggingSystem.bootstrap { label in OneLineLogHandler(label: label, level: parsed) }
    try await SigilProxyRole.run(config, logger: Logger(label: "sigil.proxy"))
} catch let error as ProxyArguments.UsageError {
    failWith("error: \(error.description)")
    exit(2)
} catch let error as ProxyError {
    failWith("error: \(error.message)")
    exit(2)
} catch {
    failWith("error: \(error)")
    exit(1)
}
