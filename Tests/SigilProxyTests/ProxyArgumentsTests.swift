import Foundation
import Testing
@testable import SigilProxy

/// `sigil proxy run` and `sigil-proxy` share one parser: bad input is a usage error naming the
/// flag, never a guess.
struct ProxyArgumentsTests {
    let policies: String = {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("policies-\(UUID().uuidString)").path
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }()

    func parse(_ extra: [String]) throws(ProxyArguments.UsageError) -> ProxyConfig {
        try ProxyArguments.parse(["--workload-api", "unix:///tmp/agent.sock", "--inbound", "127.0.0.1:15006",
                                  "--app", "127.0.0.1:8080", "--namespace", "shop", "--policies", policies] + extra,
                                 environment: [:]).0
    }

    @Test("the ledger sync window defaults to 250 ms and takes 0 (every batch) to 60000")
    func ledgerSync() throws {
        #expect(try parse([]).ledgerSyncMillis == 250)
        #expect(try parse(["--ledger-sync-ms", "0"]).ledgerSyncMillis == 0)
        #expect(try parse(["--ledger-sync-ms=1000"]).ledgerSyncMillis == 1000)
    }

    @Test("bad values are refused with the flag's name", arguments: [
        (["--ledger-sync-ms", "-1"], "--ledger-sync-ms"),
        (["--ledger-sync-ms", "1s"], "--ledger-sync-ms"),
        (["--ledger-sync-ms", "60001"], "--ledger-sync-ms"),
        (["--threads", "0"], "--threads"),
        (["--mtls", "LOOSE"], "--mtls"),
        (["--protocol", "udp"], "--protocol"),
        (["--outbound", "127.0.0.1:15001"], "--outbound"),
        (["--no-such-flag", "x"], "--no-such-flag"),
    ])
    func refused(_ extra: [String], _ flag: String) {
        do {
            _ = try parse(extra)
            Issue.record("\(extra) was accepted")
        } catch {
            #expect(error.description.contains(flag), "\(error.description)")
        }
    }
}
