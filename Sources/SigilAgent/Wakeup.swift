import Synchronization

/// Wakes one waiting task early: `wait(upTo:)` returns after the duration or as soon as `fire()`
/// is called (a `fire()` with nobody waiting is remembered for the next wait).
final class Wakeup: Sendable {
    private struct State {
        var continuation: CheckedContinuation<Void, Never>?
        var pending = false
        var generation = 0
    }
    private let state = Mutex(State())

    func fire() {
        let continuation = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if let c = s.continuation {
                s.continuation = nil
                return c
            }
            s.pending = true
            return nil
        }
        continuation?.resume()
    }

    func wait(upTo duration: Duration) async {
        let generation: Int? = state.withLock { s in
            if s.pending {
                s.pending = false
                return nil
            }
            s.generation += 1
            return s.generation
        }
        guard let generation else { return }
        let timer = Task { [weak self] in
            try? await Task.sleep(for: duration)
            self?.timeout(generation)
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { s -> Bool in
                    if s.pending || s.generation != generation {
                        s.pending = false
                        return true
                    }
                    s.continuation = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            self.fire()
        }
        timer.cancel()
    }

    private func timeout(_ generation: Int) {
        let continuation = state.withLock { s -> CheckedContinuation<Void, Never>? in
            guard s.generation == generation else { return nil }
            // Bumping the generation also releases a waiter that has not installed itself yet.
            s.generation += 1
            let c = s.continuation
            s.continuation = nil
            return c
        }
        continuation?.resume()
    }
}

/// A value shared between tasks behind a lock (a reference, unlike `Mutex` itself).
final class LockedBox<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<R>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
    var value: Value { mutex.withLock { $0 } }
}
