import NIOConcurrencyHelpers
import NIOCore
import SigilCore

/// The TCP-mode connections open now, each with the request it was authorized as. A TCP connection
/// is decided once, when it opens; when the policies, the PeerAuthentication mode or the kill
/// switch change, ``reauthorize(under:)`` decides every open one again and closes those the new
/// state refuses (Istio drains a listener's connections on a policy change; this closes only the
/// ones that would now be denied, at once, and leaves the others alone). HTTP needs none of this:
/// every request is decided under the state in force when it arrives.
final class OpenTCPConnections: Sendable {
    /// How to close one connection, given the reason (run on its event loop).
    typealias Closer = @Sendable (_ reason: String) -> Void

    private struct Entry {
        let request: AuthorizationRequest
        let mtls: Bool
        let close: Closer
    }

    private let entries = NIOLockedValueBox<(next: UInt64, open: [UInt64: Entry])>((0, [:]))

    /// Adds a connection; returns the key that ``remove(_:)`` takes when it closes.
    func add(request: AuthorizationRequest, mtls: Bool, close: @escaping Closer) -> UInt64 {
        entries.withLockedValue { state in
            state.next += 1
            state.open[state.next] = Entry(request: request, mtls: mtls, close: close)
            return state.next
        }
    }

    func remove(_ key: UInt64) {
        _ = entries.withLockedValue { $0.open.removeValue(forKey: key) }
    }

    var count: Int { entries.withLockedValue { $0.open.count } }

    /// Decides every open connection under `state` and closes the refused ones; returns how many.
    @discardableResult
    func reauthorize(under state: EnforcementState) -> Int {
        let open = entries.withLockedValue { $0.open }
        var closed = 0
        for (key, entry) in open {
            guard let reason = Self.refusal(of: entry.request, mtls: entry.mtls, under: state) else { continue }
            remove(key)
            entry.close(reason)
            closed += 1
        }
        return closed
    }

    /// Why `state` would refuse a connection opened as `request`, or nil when it still allows it.
    static func refusal(of request: AuthorizationRequest, mtls: Bool, under state: EnforcementState) -> String? {
        if !mtls, state.mode == .strict || state.mode == .unset {
            return "closed: policy generation \(state.generation) makes the port STRICT (PeerAuthentication) and this connection is plaintext"
        }
        let decision = state.decide(request)
        guard !decision.allowed else { return nil }
        let by = decision.policy.map { " (\($0)\(decision.rule.map { " rule \($0)" } ?? ""))" } ?? " (no ALLOW policy matches it)"
        return "closed: policy generation \(state.generation) denies it\(by)"
    }
}
