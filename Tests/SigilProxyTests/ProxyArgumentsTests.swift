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

    @Test("the spool's size limit and segment size take bytes or binary and decimal units")
    func ledgerSizes() throws {
        let defaults = try parse([])
        #expect(defaults.ledgerMaxSize == 1 << 30)
        #expect(defaults.ledgerSegmentSize == 64 << 20)
        #expect(try parse(["--ledger-max-size", "512MiB"]).ledgerMaxSize == 512 << 20)
        #expect(try parse(["--ledger-max-size=2GiB"]).ledgerMaxSize == 2 << 30)
        #expect(try parse(["--ledger-max-size", "20000"]).ledgerMaxSize == 20000)
        #expect(try parse(["--ledger-max-size", "1GB"]).ledgerMaxSize == 1_000_000_000)
        #expect(try parse(["--ledger-segment-size", "8KiB"]).ledgerSegmentSize == 8192)
    }

    @Test("metrics listen on loopback only")
    func metricsAddress() throws {
        let config = try parse(["--metrics", "127.0.0.1:9464"])
        #expect(config.metricsHost == "127.0.0.1" && config.metricsPort == 9464)
        #expect(try parse(["--metrics", "[::1]:9464"]).metricsHost == "::1")
        #expect(try parse([]).metricsHost == nil)
    }

    @Test("the handshake timeout defaults to 10s and takes a duration from 1s to 1h")
    func handshakeTimeout() throws {
        #expect(try parse([]).handshakeTimeout == .seconds(10))
        #expect(try parse(["--handshake-timeout", "2s"]).handshakeTimeout == .seconds(2))
        #expect(try parse(["--handshake-timeout=1m30s"]).handshakeTimeout == .seconds(90))
    }

    @Test("the idle timeout defaults to 1h and takes a duration from 1s to 7d, not shorter than the handshake timeout")
    func idleTimeout() throws {
        #expect(try parse([]).idleTimeout == .seconds(3600))
        #expect(try parse(["--idle-timeout", "90s"]).idleTimeout == .seconds(90))
        #expect(try parse(["--idle-timeout=7d"]).idleTimeout == .seconds(7 * 86_400))
        #expect(try parse(["--idle-timeout", "3s", "--handshake-timeout", "1s"]).idleTimeout == .seconds(3))
    }

    @Test("bad values are refused with the flag's name", arguments: [
        (["--ledger-max-size", "1 GiB and more"], "--ledger-max-size"),
        (["--ledger-max-size", "1GiBs"], "--ledger-max-size"),
        (["--ledger-max-size", "-5"], "--ledger-max-size"),
        (["--ledger-max-size", "100"], "--ledger-max-size"),
        (["--ledger-max-size", "99999999999TiB"], "--ledger-max-size"),
        (["--ledger-segment-size", "lots"], "--ledger-segment-size"),
        (["--metrics", "0.0.0.0:9464"], "--metrics"),
        (["--metrics", "10.0.0.1:9464"], "--metrics"),
        (["--metrics", "9464"], "--metrics"),
        (["--ledger-sync-ms", "-1"], "--ledger-sync-ms"),
        (["--ledger-sync-ms", "1s"], "--ledger-sync-ms"),
        (["--ledger-sync-ms", "60001"], "--ledger-sync-ms"),
        (["--threads", "0"], "--threads"),
        (["--handshake-timeout", "0s"], "--handshake-timeout"),
        (["--handshake-timeout", "2h"], "--handshake-timeout"),
        (["--handshake-timeout", "10"], "--handshake-timeout"),
        (["--idle-timeout", "0s"], "--idle-timeout"),
        (["--idle-timeout", "8d"], "--idle-timeout"),
        (["--idle-timeout", "soon"], "--idle-timeout"),
        (["--idle-timeout", "5s"], "--handshake-timeout"),  // shorter than the default 10s set-up deadline
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
