import Foundation
import Logging
import ServiceLifecycle
import SigilCore
import SigilStore

/// `--ledger-retention`: removes ledger rows older than the retention period, leaving a signed
/// checkpoint where each writer's chain was cut (so `sigil audit verify` still proves the rest
/// intact). Runs at start and then every tenth of the period (at least every second, at most
/// hourly), and stops with the server.
struct LedgerRetentionService: Service {
    let store: any LedgerStore
    let retention: Duration
    let key: LedgerCheckpointKey
    let clock: any SigilClock
    let logger: Logger

    init(store: any LedgerStore, retention: Duration, key: LedgerCheckpointKey, clock: any SigilClock, logger: Logger) {
        self.store = store
        self.retention = retention
        self.key = key
        self.clock = clock
        self.logger = logger
    }

    var interval: Duration { min(.seconds(3600), max(.seconds(1), retention / 10)) }

    func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                await self.pass()
                try? await Task.sleep(for: self.interval)
            }
        }
    }

    /// One retention pass; failures are logged and retried at the next pass.
    func pass() async {
        let now = clock.now
        let cutoff = Int64((now.timeIntervalSince1970 - Double(retention.components.seconds)) * 1_000_000)
        do {
            for (writer, result) in try await store.pruneLedger(beforeMicros: cutoff, key: key, at: now).sorted(by: { $0.key < $1.key }) {
                if let checkpoint = result.checkpoint {
                    logger.info("ledger retention removed rows", metadata: ["writer": "\(writer)", "rows": "\(checkpoint.rowsRemoved)",
                                                                            "checkpoint_seq": "\(checkpoint.seq)"])
                } else if let refused = result.refused {
                    logger.error("ledger retention skipped a writer whose chain does not verify", metadata: ["writer": "\(writer)", "reason": "\(refused)"])
                }
            }
        } catch {
            logger.error("ledger retention pass failed; retrying at the next pass", metadata: ["error": "\(error)"])
        }
    }
}
