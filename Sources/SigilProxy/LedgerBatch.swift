import NIOCore
import SigilCore

/// A response whose last bytes wait for its ledger row to be in the spool file.
protocol LedgerRowWaiter: AnyObject {
    /// The row is in the file: the response may be flushed now. Called on the waiter's loop.
    func ledgerRowWritten()
}

/// The rows of one event loop's completed requests, written to the spool together.
///
/// A request that completes hands its row here and holds back the flush of its response's last
/// bytes. At the end of the loop iteration (one task per batch) every row collected in it goes
/// into the spool with one lock and one `write`, and only then is each response flushed: a client
/// that saw its response complete still has its row in the file when the proxy is killed with
/// SIGKILL right after, and a busy loop pays one `write` per iteration, not one per request.
/// Confined to its event loop.
final class LedgerBatch: @unchecked Sendable {
    let loop: any EventLoop
    private let spool: LedgerSpool
    private var bodies: [[UInt8]] = []
    private var waiters: [any LedgerRowWaiter] = []
    private var scheduled = false

    init(loop: any EventLoop, spool: LedgerSpool) {
        self.loop = loop
        self.spool = spool
    }

    /// Adds a completed request's row; `waiter` hears when it is in the file.
    func add(_ row: LedgerRecord, waiter: any LedgerRowWaiter) {
        loop.assertInEventLoop()
        var body: [UInt8] = []
        body.reserveCapacity(512)
        row.appendBody(to: &body)
        bodies.append(body)
        waiters.append(waiter)
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
        guard !bodies.isEmpty else { return }
        let bodies = self.bodies
        let waiters = self.waiters
        self.bodies = []
        self.waiters = []
        spool.append(bodies: bodies)
        // Even a row the full spool could only hold in memory (or drop: counted and logged)
        // releases its response: the request was admitted before the spool filled.
        for waiter in waiters { waiter.ledgerRowWritten() }
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
