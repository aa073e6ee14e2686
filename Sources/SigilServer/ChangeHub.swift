import Foundation

/// Fan-out of "something changed" to the open Sync streams: per agent (its entries changed) or to
/// all (the bundle changed). A stream re-reads the state it needs after each signal, so signals
/// may coalesce without losing anything.
actor ChangeHub {
    enum Signal: Sendable { case changed, evicted }

    private var subscribers: [String: [UUID: AsyncStream<Signal>.Continuation]] = [:]

    /// Subscribes `agentID`'s stream; the returned stream ends when `unsubscribe` is called.
    func subscribe(agentID: String) -> (UUID, AsyncStream<Signal>) {
        let id = UUID()
        let (stream, continuation) = AsyncStream.makeStream(of: Signal.self, bufferingPolicy: .bufferingNewest(1))
        subscribers[agentID, default: [:]][id] = continuation
        return (id, stream)
    }

    func unsubscribe(agentID: String, id: UUID) {
        subscribers[agentID]?[id]?.finish()
        subscribers[agentID]?[id] = nil
        if subscribers[agentID]?.isEmpty == true { subscribers[agentID] = nil }
    }

    func notify(agentID: String) {
        for continuation in subscribers[agentID]?.values ?? [:].values { continuation.yield(.changed) }
    }

    func notifyAll() {
        for streams in subscribers.values {
            for continuation in streams.values { continuation.yield(.changed) }
        }
    }

    func evict(agentID: String) {
        for continuation in subscribers[agentID]?.values ?? [:].values { continuation.yield(.evicted) }
    }

    /// Ends every Sync stream (server shutdown): agents reconnect to whichever server is up.
    func finishAll() {
        for streams in subscribers.values {
            for continuation in streams.values { continuation.finish() }
        }
        subscribers = [:]
    }

    var streamCount: Int { subscribers.values.reduce(0) { $0 + $1.count } }
}
