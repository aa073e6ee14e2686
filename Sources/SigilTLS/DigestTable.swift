public import Crypto
import NIOConcurrencyHelpers

/// Values by SHA-256 digest, shared by every event loop behind one lock, bounded: an insertion
/// into a full table empties it first (entries are facts worked out again on demand, so losing
/// them costs one recomputation each). The handshake caches use it: ``VerifiedChains`` here and
/// the inbound proxy's per-leaf facts.
public final class DigestTable<Value: Sendable>: Sendable {
    public let capacity: Int
    private let entries = NIOLockedValueBox<[SHA256Digest: Value]>([:])

    public init(capacity: Int) {
        self.capacity = capacity
    }

    public subscript(key: SHA256Digest) -> Value? {
        entries.withLockedValue { $0[key] }
    }

    public func insert(_ value: Value, for key: SHA256Digest) {
        entries.withLockedValue { table in
            if table.count >= capacity { table.removeAll(keepingCapacity: true) }
            table[key] = value
        }
    }

    public var count: Int { entries.withLockedValue { $0.count } }
}
