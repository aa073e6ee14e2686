import Logging
import GRPCCore
import SigilCA
import SigilStore
import NIOConcurrencyHelpers
import Foundation

/// Whether the datastore takes writes. A failing datastore (a full disk, a database that cannot be
/// written) is logged at error level once when it starts failing, and once (notice) when a write
/// succeeds again; not per call: callers see the failure in their own answers, the operator in the log.
final class StoreHealth: Sendable {
    /// While failing: since when, how many calls failed, the first error.
    struct Failing: Equatable {
        var since: Date
        var failures: Int
        var firstError: String
    }

    private let state = NIOLockedValueBox<Failing?>(nil)
    let logger: Logger

    init(logger: Logger) {
        self.logger = logger
    }

    /// Whether the last outcome recorded was a failure.
    var isFailing: Bool { state.withLockedValue { $0 != nil } }

    /// A call failed because the datastore did (`operation` names the call, e.g. "token create").
    func failed(_ operation: String, error: String, at now: Date = Date()) {
        let first = state.withLockedValue { failing -> Bool in
            if failing == nil {
                failing = Failing(since: now, failures: 1, firstError: error)
                return true
            }
            failing?.failures += 1
            return false
        }
        guard first else { return }
        logger.error("the datastore is failing: calls that write are refused until it works again (is its disk full?)",
                     metadata: ["operation": "\(operation)", "error": "\(error)"])
    }

    /// A write went through: the datastore works (again).
    func wrote(_ operation: String, at now: Date = Date()) {
        guard let ended = state.withLockedValue({ failing -> Failing? in
            defer { failing = nil }
            return failing
        }) else { return }
        logger.notice("the datastore works again",
                     metadata: ["operation": "\(operation)", "failed_calls": "\(ended.failures)",
                                "failing_for": "\(Int(now.timeIntervalSince(ended.since)))s", "first_error": "\(ended.firstError)"])
    }
}

extension ServerCore {
    /// The answer to a call the datastore failed: Unavailable (the caller retries), and, when the
    /// datastore itself failed (not a conflict), recorded in ``storeHealth`` for the log.
    func storeFailed(_ error: any Error, during operation: String) -> RPCError {
        let message = (error as? StoreError)?.message ?? "\(error)"
        if StoreHealth.isStoreFailure(error) {
            storeHealth.failed(operation, error: message)
        }
        return RPCError(code: .unavailable, message: "datastore: \(message)")
    }
}

extension StoreHealth {
    /// Whether `error` says the datastore cannot do its work (rather than refusing this one write).
    static func isStoreFailure(_ error: any Error) -> Bool {
        if let store = error as? StoreError {
            return store.code == .io || store.code == .cannotOpen || store.code == .corrupt
        }
        if let ca = error as? CAError { return ca.code == .store }
        return true
    }
}
