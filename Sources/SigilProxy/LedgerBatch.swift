import NIOCore
import SigilCore

/// A response whose last bytes wait for its ledger row to be in the spool file.
protocol LedgerRowWaiter: AnyObject {
    /// The row is in the file: the response may be flushed now. Called on the waiter's loop.
    func ledgerRowWritten()
}

/// The rows of one event loop's completed requests (and closed connections), written to the
/// spool together.
///
/// A request that completes hands its row here and holds back the flush of its response's last
/// bytes (a closed connection's row has nothing to hold back). At the end of the loop iteration
/// (one task per batch) every row collected in it goes into the spool with one lock and one
/// `write`, and only then is each response flushed: a client
/// that saw its response complete still has its row in the file when the proxy is killed with
/// SIGKILL right after, and a busy loop pays one `write` per iteration, not one per request.
/// Confined to its event loop.
final class LedgerBatch: @unchecked Sendable {
    let loop: any EventLoop
    private let spool: LedgerSpool
    /// The collected rows (head and body, not yet chained), back to back; `ends[i]` is where row i
    /// ends and `partials[i]` is the hash state over its bytes. The arrays are reused from one
    /// iteration to the next, so a busy loop does not allocate for its rows' bytes.
    private var buffer: [UInt8] = []
    private var ends: [Int] = []
    private var partials: [LedgerChain.PartialHash] = []
    private var waiters: [any LedgerRowWaiter] = []
    /// An empty array with capacity, swapped in for `waiters` when a batch is released.
    private var releasing: [any LedgerRowWaiter] = []
    private var scheduled = false

    init(loop: any EventLoop, spool: LedgerSpool) {
        self.loop = loop
        self.spool = spool
        buffer.reserveCapacity(16 * 1024)
        ends.reserveCapacity(32)
        partials.reserveCapacity(32)
        waiters.reserveCapacity(32)
        releasing.reserveCapacity(32)
    }

    /// The writer whose rows this batch collects (the head of every row).
    var writer: String { spool.writer }

    /// Adds a completed request's (or a closed connection's) row, serialized by `row` straight
    /// into the batch's buffer: the row's head and body
    /// (``LedgerChain/appendUnsealed(writer:to:body:)``'s bytes for ``writer``), returning the
    /// hash state over exactly the bytes it appended. `waiter` hears when the row is in the file
    /// (nil: nothing waits, such as the row of a connection that ended).
    func add(waiter: (any LedgerRowWaiter)?, row: (inout [UInt8]) -> LedgerChain.PartialHash) {
        loop.assertInEventLoop()
        partials.append(row(&buffer))
        ends.append(buffer.count)
        if let waiter { waiters.append(waiter) }
        if !scheduled {
            scheduled = true
            loop.execute { self.writeNow() }
        }
    }

    /// Writes every collected row now and releases their responses. Also for a handler that
    /// must flush before the iteration ends (a connection refused after a completed response).
    func writeNow() {
        loop.assertInEventLoop()
        scheduled = false
        guard !ends.isEmpty else { return }
        spool.append(unsealed: Rows(buffer: buffer, ends: ends, partials: partials))
        buffer.removeAll(keepingCapacity: true)
        ends.removeAll(keepingCapacity: true)
        partials.removeAll(keepingCapacity: true)
        // This batch's waiters move to a local array and `waiters` takes the empty spare, so a
        // release that completes another request (or writes the batch again) starts a new batch
        // and never sees these waiters twice.
        var released: [any LedgerRowWaiter] = []
        swap(&released, &releasing)
        swap(&released, &waiters)
        // Even a row the full spool could only hold in memory (or drop: counted and logged)
        // releases its response: the request was admitted before the spool filled.
        for waiter in released { waiter.ledgerRowWritten() }
        released.removeAll(keepingCapacity: true)
        releasing = released
    }

    /// The rows of one batch as slices of its buffer (no copy).
    struct Rows: RandomAccessCollection {
        let buffer: [UInt8]
        let ends: [Int]
        let partials: [LedgerChain.PartialHash]
        var startIndex: Int { 0 }
        var endIndex: Int { ends.count }
        subscript(i: Int) -> LedgerSpool.UnsealedRow {
            LedgerSpool.UnsealedRow(bytes: buffer[(i == 0 ? 0 : ends[i - 1])..<ends[i]], partial: partials[i])
        }
    }
}

/// One ``LedgerBatch`` per event loop of the proxy's group.
final class LedgerBatches: Sendable {
    private let batches: [ObjectIdentifier: LedgerBatch]

    init(group: any EventLoopGroup, spool: LedgerSpool) {
        var batches: [ObjectIdentifier: LedgerBatch] = [:]
        for loop in group.makeIterator() {
            batches[ObjectIdentifier(loop)] = LedgerBatch(loop: loop, spool: spool)
        }
        self.batches = batches
    }

    /// The batch of `loop` (nil for a loop outside the group); only touch it on that loop.
    func batch(for loop: any EventLoop) -> LedgerBatch? {
        batches[ObjectIdentifier(loop)]
    }
}
