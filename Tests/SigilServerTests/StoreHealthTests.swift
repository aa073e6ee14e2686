import Testing
import Foundation
import Logging
import Synchronization
import SigilStore
@testable import SigilServer

/// Log lines, kept for the test to read.
final class CapturedLog: Sendable {
    let lines = Mutex<[(level: Logger.Level, message: String, metadata: Logger.Metadata)]>([])

    var logger: Logger {
        var logger = Logger(label: "test") { _ in Handler(log: self) }
        logger.logLevel = .trace
        return logger
    }

    struct Handler: LogHandler {
        let log: CapturedLog
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            log.lines.withLock { $0.append((event.level, event.message.description, event.metadata ?? [:])) }
        }
    }
}

@Suite("Datastore failures in the server log")
struct StoreHealthTests {
    @Test("A failing datastore is logged once as it starts failing and once as a write goes through again")
    func loggedOncePerEpisode() {
        let log = CapturedLog()
        let health = StoreHealth(logger: log.logger)
        health.wrote("token create")
        #expect(log.lines.withLock { $0.isEmpty }, "nothing to say while it works")
        for _ in 0..<50 { health.failed("token create", error: "database or disk is full") }
        health.failed("SVID signing", error: "the certificates were signed but could not be recorded")
        let failing = log.lines.withLock { $0 }
        #expect(failing.count == 1)
        #expect(failing.first?.level == .error)
        #expect(failing.first?.message.contains("datastore is failing") == true)
        #expect(failing.first?.metadata["error"]?.description == "database or disk is full")
        #expect(health.isFailing)
        health.wrote("entry create")
        health.wrote("entry create")
        let all = log.lines.withLock { $0 }
        #expect(all.count == 2)
        #expect(all.last?.message.contains("works again") == true)
        #expect(all.last?.metadata["failed_calls"]?.description == "51")
        #expect(!health.isFailing)
        // A second episode is logged again.
        health.failed("ledger append", error: "disk I/O error")
        #expect(log.lines.withLock { $0.count } == 3)
    }

    @Test("Only the datastore's own failures count, not a refused write")
    func whatCounts() {
        #expect(StoreHealth.isStoreFailure(StoreError(.io, "database or disk is full")))
        #expect(StoreHealth.isStoreFailure(StoreError(.cannotOpen, "unable to open database file")))
        #expect(!StoreHealth.isStoreFailure(StoreError(.conflict, "an entry with this ID exists")))
        #expect(!StoreHealth.isStoreFailure(StoreError(.duplicateSerial, "serial recorded")))
    }
}
