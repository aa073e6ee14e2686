import NIOConcurrencyHelpers
import NIOCore
import SigilCore

/// The long-lived connections open now that were authorized once, when they opened: TCP-mode
/// connections and upgraded WebSocket tunnels, each with how to decide it again. When the
/// policies, the PeerAuthentication mode or the kill switch change, ``reauthorize(under:)``
/// decides every one again and closes those the new state refuses (Istio drains a changed
/// listener's connections; this closes only the ones that would now be denied, at once, and leaves
/// the others alone). Plain HTTP needs none of this: every request is decided under the state in
/// force when it arrives.
final class OpenTunnels: Sendable {
    /// Decides the connection's opening request under a state.
    typealias Decider = @Sendable (EnforcementState) -> AuthorizationDecision
    /// Closes the connection, given the reason (hops to its event loop itself).
    typealias Closer = @Sendable (_ reason: String) -> Void

    private struct Entry {
        let decide: Decider
        let close: Closer
    }

    private let entries = NIOLockedValueBox<(next: UInt64, open: [UInt64: Entry])>((0, [:]))

    /// Adds a connection decided under policy generation `decidedUnder` (nil: not known); returns
    /// the key that ``remove(_:)`` takes when it closes. A reload that came between that decision
    /// and this call (a WebSocket's app may take seconds to answer 101) found no entry to check, so
    /// the connection is decided again here under `current` when its generation differs.
    func add(decidedUnder generation: Int?, current: EnforcementState, decide: @escaping Decider,
             close: @escaping Closer) -> UInt64 {
        let key = entries.withLockedValue { state in
            state.next += 1
            state.open[state.next] = Entry(decide: decide, close: close)
            return state.next
        }
        if generation != current.generation {
            let decision = decide(current)
            if !decision.allowed, remove(key) { close(Self.reason(decision, generation: current.generation)) }
        }
        return key
    }

    /// Forgets a connection; false when it was gone already (a reload closed it).
    @discardableResult
    func remove(_ key: UInt64) -> Bool {
        entries.withLockedValue { $0.open.removeValue(forKey: key) } != nil
    }

    var count: Int { entries.withLockedValue { $0.open.count } }

    /// Decides every open connection under `state` and closes the refused ones; returns how many.
    @discardableResult
    func reauthorize(under state: EnforcementState) -> Int {
        let open = entries.withLockedValue { $0.open }
        var closed = 0
        for (key, entry) in open {
            let decision = entry.decide(state)
            guard !decision.allowed, remove(key) else { continue }
            entry.close(Self.reason(decision, generation: state.generation))
            closed += 1
        }
        return closed
    }

    /// The ledger detail of a connection closed because `decision` refused it.
    static func reason(_ decision: AuthorizationDecision, generation: Int) -> String {
        if decision.policy == EnforcementState.strictRefusal.policy {
            return "closed: policy generation \(generation) makes the port STRICT (PeerAuthentication) and this connection is plaintext"
        }
        let by = decision.policy.map { " (\($0)\(decision.rule.map { " rule \($0)" } ?? ""))" } ?? " (no ALLOW policy matches it)"
        return "closed: policy generation \(generation) denies it\(by)"
    }
}
