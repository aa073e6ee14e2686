#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
#if canImport(CoreFoundation)
import CoreFoundation  // the release build resolves Glibc struct members through it
#endif
import Foundation
public import Logging
import NIOConcurrencyHelpers
public import SigilCore
import Synchronization

/// The proxy's ledger spool: a JSON-lines file, one hash-chained row per request.
///
/// A row is in the file when ``append(_:)`` (or ``append(bodies:)``, ``append(unsealed:)``)
/// returns: its head and body are serialized and hashed on the caller's thread, without the lock
/// (``LedgerChain/appendUnsealed(writer:to:body:)``), then under one lock it gets its seq and prev,
/// the end of its hash (``LedgerChain/seal(_:seq:prev:to:hash:)``: ~90 bytes), and one `write` on
/// the O_APPEND descriptor, so the file's order is the chain's order and a proxy killed with SIGKILL
/// right after a response loses no row of it (the page cache has it; the kernel writes it out).
/// The proxy's event loops hand over all rows completed in one loop iteration at once
/// (``LedgerBatch``): one `write` per iteration, not per row. Durability against power loss is
/// batched: a background thread runs `fdatasync` at most every `syncInterval` (and at shutdown).
///
/// The spool is bounded: a row that would take the file past `maxSize`, or whose `write` fails
/// (ENOSPC, EIO: the file is truncated back to its last whole row), is kept in memory (at most
/// `capacity` rows, unchained until written) and the spool is FULL: ``isFull`` tells the inbound
/// paths to refuse new requests (503) until the background thread has written every held row.
/// One error line is logged when it fills and one line when it recovers. With a shipper the spool
/// starts over (``rotate(shippedThrough:minimumSize:)``) once the server has every row; without
/// one it is the only record and is never rotated.
///
/// The chain continues across restarts and rotations (the last row's seq and hash are read back
/// when the file is opened).
public final class LedgerSpool: Sendable {
    /// What became of a row handed to ``append(_:)``.
    public enum Outcome: Sendable, Equatable {
        /// In the file.
        case written
        /// Not in the file yet: the spool is full; kept in memory and written when space returns.
        case held
        /// Lost: the spool is full and so is its in-memory buffer (counted and logged).
        case dropped
    }

    struct State {
        var seq: UInt64
        /// The last row's hash, as its 64 lowercase hex digits.
        var hash: [UInt8]
        /// Scratch for the next hash (kept so a failed write leaves `hash` as it was).
        var nextHash: [UInt8] = []
        /// Scratch for the row being written (reused: no allocation under the lock).
        var line: [UInt8] = []
        /// Bytes in the file.
        var size: Int
        /// Rows written by this process.
        var written: UInt64 = 0
        /// Rows (not yet chained) waiting for space, oldest first.
        var held: [UnsealedRow] = []
        var dropped = 0
        var droppedSinceLog = 0
        var full = false
        var reason = ""
        var unsynced = false
        /// Disk blocks are reserved for the file up to this offset (``reserve(fd:headroom:into:)``).
        var reservedTo = 0
        /// The last reservation failed for want of space: FULL until one succeeds.
        var diskFull = false
    }

    public let path: String
    public let writer: String
    /// Rows kept in memory while the spool is full before rows are dropped.
    public let capacity: Int
    /// The largest the file may grow (bytes).
    public let maxSize: Int
    /// The spool is FULL (new requests are refused) from this size on: the room above it, up to
    /// `maxSize`, takes the rows of requests already admitted, so a served request's row still
    /// goes into the file (1/8 of the limit, at most 1 MiB: ~2000 rows in flight).
    public let fullSize: Int
    /// The longest time a written row waits for `fdatasync` (zero: a sync at every tick).
    public let syncInterval: Duration
    private let state: NIOLockedValueBox<State>
    /// ``State/full``, readable without the lock (every inbound request checks it).
    private let fullFlag = Atomic<Bool>(false)
    private let logger: Logger
    private let metrics: ProxyMetrics?
    private let fd: Int32
    private let lastSync = NIOLockedValueBox(ContinuousClock.now)

    public static let defaultMaxSize = 1 << 30

    public struct SpoolError: Error, CustomStringConvertible {
        public let description: String
    }

    /// A row ready to be chained: its head and body (``LedgerChain/appendUnsealed(writer:to:body:)``'s
    /// bytes, for this spool's writer) and the hash state over exactly those bytes.
    public struct UnsealedRow: Sendable {
        public var bytes: ArraySlice<UInt8>
        public var partial: LedgerChain.PartialHash

        public init(bytes: ArraySlice<UInt8>, partial: LedgerChain.PartialHash) {
            self.bytes = bytes
            self.partial = partial
        }
    }

    public init(path: String, writer: String, capacity: Int = 10_000, maxSize: Int = LedgerSpool.defaultMaxSize,
                syncInterval: Duration = .milliseconds(250), metrics: ProxyMetrics? = nil, logger: Logger) throws(SpoolError) {
        self.path = path
        self.writer = writer
        self.capacity = max(1, capacity)
        self.maxSize = maxSize
        self.fullSize = maxSize - Self.headroom(maxSize: maxSize)
        self.syncInterval = syncInterval
        self.logger = logger
        self.metrics = metrics
        let fd = open(path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw SpoolError(description: "cannot open the ledger spool \(path): \(String(cString: strerror(errno)))")
        }
        self.fd = fd
        let tail: (seq: UInt64, hash: String)
        do throws(SpoolError) {
            try Self.cutTornTail(fd: fd, path: path, logger: logger)
            tail = try Self.tail(of: path)
        } catch {
            close(fd)
            throw error
        }
        let end = lseek(fd, 0, SEEK_END)
        let size = end > 0 ? Int(end) : 0
        var state = State(seq: tail.seq, hash: Array(tail.hash.utf8), size: size)
        state.line.reserveCapacity(2048)
        state.nextHash.reserveCapacity(64)
        if size >= fullSize {
            state.full = true
            state.reason = "the spool is \(size) bytes, near or at its limit of \(maxSize) (--ledger-max-size)"
        } else if !Self.reserve(fd: fd, headroom: Self.headroom(maxSize: maxSize), into: &state) {
            state.full = true
        }
        self.state = NIOLockedValueBox(state)
        metrics?.spool(bytes: size)
        if state.full {
            fullFlag.store(true, ordering: .relaxed)
            metrics?.spool(full: true)
            logger.error("ledger spool full: new requests are refused with 503 until space returns",
                         metadata: ["spool": "\(path)", "reason": "\(state.reason)"])
        }
    }

    deinit {
        close(fd)
    }

    /// True while rows cannot be written: the inbound paths refuse new requests (fail closed).
    public var isFull: Bool { fullFlag.load(ordering: .relaxed) }

    /// Chains a row and writes it to the file (one `write`) before returning. The row's own
    /// fields are serialized and hashed before the lock is taken; under it go the seq, the prev
    /// hash, the end of the SHA-256 (the last ~90 bytes), a copy into a reused buffer and the `write`.
    @discardableResult
    public func append(_ row: LedgerRecord) -> Outcome {
        append(unsealed: CollectionOfOne(unsealed { row.appendBody(to: &$0) })).outcome
    }

    /// Chains rows (bodies as ``LedgerRecord/appendBody(to:)`` writes them, oldest first) and writes them
    /// all with one `write` before returning. Returns the last row's outcome and how many were written.
    @discardableResult
    public func append<Bodies: Collection>(bodies: Bodies) -> (outcome: Outcome, written: Int)
    where Bodies.Element: Collection, Bodies.Element.Element == UInt8 {
        append(unsealed: bodies.map { body in unsealed { $0.append(contentsOf: body) } })
    }

    /// A row of this spool's writer with the body `body` writes, serialized and hashed (no lock).
    func unsealed(body: (inout [UInt8]) -> Void) -> UnsealedRow {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(640)
        let partial = LedgerChain.appendUnsealed(writer: writer, to: &bytes, body: body)
        return UnsealedRow(bytes: bytes[...], partial: partial)
    }

    /// Chains rows already serialized and hashed for this spool's writer, oldest first, and writes
    /// them all with one `write` before returning: the proxy's event loops hand over every row
    /// completed in one loop iteration at once (``LedgerBatch``). Returns the last row's outcome
    /// and how many were written.
    @discardableResult
    public func append<Rows: Collection>(unsealed rows: Rows) -> (outcome: Outcome, written: Int) where Rows.Element == UnsealedRow {
        guard !rows.isEmpty else { return (.written, 0) }
        let fd = self.fd
        let maxSize = self.maxSize
        let capacity = self.capacity
        let fullSize = self.fullSize
        let (outcome, written, held, dropped, becameFull, reason) = state.withLockedValue { s -> (Outcome, Int, Int, Int, Bool, String) in
            let wasFull = s.full
            // While full, rows of requests admitted before go on into the room left up to
            // `maxSize`; once a row is held, every later row is held behind it (file order is
            // chain order). The whole batch in one write when it fits; row by row when not.
            var written = 0, held = 0, dropped = 0
            var outcome = Outcome.written
            if s.held.isEmpty, Self.writeRows(rows, fd: fd, maxSize: maxSize, into: &s) {
                written = rows.count
            } else {
                for row in rows {
                    if s.held.isEmpty, Self.writeRows(CollectionOfOne(row), fd: fd, maxSize: maxSize, into: &s) {
                        written += 1
                        outcome = .written
                    } else if s.held.count < capacity {
                        s.full = true
                        // Its own copy: the row may be a slice of a batch's reused buffer.
                        s.held.append(UnsealedRow(bytes: Array(row.bytes)[...], partial: row.partial))
                        held += 1
                        outcome = .held
                    } else {
                        s.full = true
                        s.dropped += 1
                        s.droppedSinceLog += 1
                        dropped += 1
                        outcome = .dropped
                    }
                }
            }
            if s.size >= fullSize, !s.full {
                s.full = true
                s.reason = "the spool reached \(s.size) bytes of its limit of \(maxSize) (--ledger-max-size; the rest is room for requests in flight)"
            }
            return (outcome, written, held, dropped, s.full && !wasFull, s.reason)
        }
        if written > 0 { metrics?.rowsWritten(written) }
        if held > 0 { metrics?.spool(held: heldCount) }
        if dropped > 0 { metrics?.rowDropped(dropped) }
        if becameFull { alarm(reason: reason) }
        return (outcome, written)
    }

    private func alarm(reason: String) {
        fullFlag.store(true, ordering: .relaxed)
        metrics?.spool(full: true)
        logger.error("ledger spool full: new requests are refused with 503 until space returns",
                     metadata: ["spool": "\(path)", "reason": "\(reason)", "max_size": "\(maxSize)"])
    }

    /// Chains `rows` as the next rows and writes them with one `write`. On a failed or partial
    /// write, or rows that would take the file past `maxSize`, the file goes back to its last
    /// whole row and the chain state stays as it was. Under the state lock.
    private static func writeRows<Rows: Collection>(_ rows: Rows, fd: Int32, maxSize: Int, into s: inout State) -> Bool
    where Rows.Element == UnsealedRow {
        s.line.removeAll(keepingCapacity: true)
        var seq = s.seq
        var prev = s.hash
        for row in rows {
            seq += 1
            s.line.append(contentsOf: row.bytes)
            LedgerChain.seal(row.partial, seq: seq, prev: prev, to: &s.line, hash: &s.nextHash)
            s.line.append(0x0A)
            swap(&prev, &s.nextHash)
        }
        guard s.size + s.line.count <= maxSize else {
            s.reason = "the spool reached its limit of \(maxSize) bytes (--ledger-max-size)"
            return false
        }
        var offset = 0
        var failure: Int32 = 0
        s.line.withUnsafeBytes { raw in
            while offset < raw.count {
                let n = write(fd, raw.baseAddress! + offset, raw.count - offset)
                if n < 0 {
                    if errno == EINTR { continue }
                    failure = errno
                    return
                }
                offset += n
            }
        }
        if failure != 0 {
            if offset > 0 { _ = ftruncate(fd, off_t(s.size)) }  // no half row stays behind
            s.reason = "write failed: \(String(cString: strerror(failure)))"
            return false
        }
        s.seq = seq
        s.hash = prev
        s.size += s.line.count
        s.written += UInt64(rows.count)
        s.unsynced = true
        let headroom = Self.headroom(maxSize: maxSize)
        if s.size + headroom > s.reservedTo, !reserve(fd: fd, headroom: headroom, into: &s) { s.full = true }
        return true
    }

    /// glibc's `fallocate` (not in Swift's Glibc module: it is a GNU extension), looked up once.
    private static let fallocate = ProcessMemory.libcFunction(
        "fallocate", as: (@convention(c) (Int32, Int32, Int64, Int64) -> Int32).self)

    /// The room kept for the rows of requests already admitted once the spool is FULL: 1/8 of
    /// `maxSize`, at most 1 MiB (~2000 rows).
    static func headroom(maxSize: Int) -> Int { min(maxSize / 8, 1 << 20) }

    /// Reserves disk blocks for the next `2 × headroom` bytes past the end of the file (Linux
    /// `fallocate` with KEEP_SIZE: the file's size does not change), so that when the filesystem
    /// fills up, the rows of requests already admitted still have room on disk: the spool turns
    /// FULL (new requests get 503) while a full reservation is still ahead of it, as at
    /// `--ledger-max-size`. Without it a full disk was found only by a failed `write`, and the rows
    /// in flight then waited in memory while their responses went out (lost if the proxy died).
    /// False when there is no space for it (``State/diskFull``); a filesystem that cannot reserve
    /// (no `fallocate`) is written without. Under the state lock.
    static func reserve(fd: Int32, headroom: Int, into s: inout State) -> Bool {
        #if os(Linux)
        let keepSize: Int32 = 0x01  // FALLOC_FL_KEEP_SIZE
        if let fallocate = Self.fallocate, fallocate(fd, keepSize, Int64(s.size), Int64(2 * headroom)) != 0 {
            let code = errno
            guard code == ENOSPC || code == EDQUOT else { return true }  // EOPNOTSUPP, EINTR, …: unreserved
            s.diskFull = true
            s.reason = "the filesystem has no room for the spool's reserve of \(2 * headroom) bytes (\(String(cString: strerror(code))))"
            return false
        }
        #endif
        s.reservedTo = s.size + 2 * headroom
        s.diskFull = false
        return true
    }

    /// Writes held rows, oldest first, while they fit; returns how many. Under the state lock.
    @discardableResult
    private static func writeHeld(fd: Int32, maxSize: Int, into s: inout State) -> Int {
        var n = 0
        while n < s.held.count, writeRows(CollectionOfOne(s.held[n]), fd: fd, maxSize: maxSize, into: &s) { n += 1 }
        if n > 0 { s.held.removeFirst(n) }
        return n
    }

    /// After a rotation: the chain, size and reservation of the new file (`fresh`, holding only
    /// its `spool_rotated` row) become the spool's, then held rows (a full spool) go in after it.
    /// Under the state lock.
    private static func adoptRotated(_ fresh: State, into s: inout State, fd: Int32, maxSize: Int) {
        s.seq = fresh.seq
        s.hash = fresh.hash
        s.size = fresh.size
        (s.reservedTo, s.diskFull) = (fresh.reservedTo, fresh.diskFull)
        s.written += 1
        writeHeld(fd: fd, maxSize: maxSize, into: &s)
    }

    /// Rows written to the file by this process.
    public var writtenCount: UInt64 { state.withLockedValue { $0.written } }
    /// Rows waiting in memory for space.
    public var heldCount: Int { state.withLockedValue { $0.held.count } }
    /// Rows lost because the spool and its memory buffer were full.
    public var droppedCount: Int { state.withLockedValue { $0.dropped } }
    /// The seq of the last row in the file.
    public var lastSeq: UInt64 { state.withLockedValue { $0.seq } }
    /// Bytes in the file.
    public var size: Int { state.withLockedValue { $0.size } }

    /// Writes held rows while they fit (the spool recovers when none is left) and runs
    /// `fdatasync` when `sync` is true or the last sync is `syncInterval` old. Returns the number
    /// of held rows written.
    @discardableResult
    public func flush(sync: Bool = true) -> Int {
        let written = retryHeld()
        let (unsynced, size) = state.withLockedValue { s -> (Bool, Int) in
            (s.unsynced, s.size)
        }
        metrics?.spool(bytes: size)
        if unsynced {
            let due = lastSync.withLockedValue { last in
                let now = ContinuousClock.now
                guard sync || now - last >= syncInterval else { return false }
                last = now
                return true
            }
            if due {
                state.withLockedValue { $0.unsynced = false }
                if fdatasync(fd) != 0 {
                    logger.error("ledger spool fdatasync failed", metadata: ["spool": "\(path)", "error": "\(String(cString: strerror(errno)))"])
                }
            }
        }
        return written
    }

    /// Writes the held rows, in order, while they fit; clears FULL when none is left.
    private func retryHeld() -> Int {
        let fd = self.fd
        let maxSize = self.maxSize
        let fullSize = self.fullSize
        let (written, recovered, held, dropped, reason) = state.withLockedValue { s -> (Int, Bool, Int, Int, String) in
            guard s.full else { return (0, false, 0, 0, "") }
            let n = Self.writeHeld(fd: fd, maxSize: maxSize, into: &s)
            let dropped = s.droppedSinceLog
            s.droppedSinceLog = 0
            // Without held rows and below `fullSize` the spool is not full any more; a file at
            // its limit needs a rotation (or an operator) for that.
            if s.held.isEmpty, s.size < fullSize, Self.reserve(fd: fd, headroom: Self.headroom(maxSize: maxSize), into: &s) {
                s.full = false
                s.reason = ""
                return (n, true, 0, dropped, "")
            }
            return (n, false, s.held.count, dropped, s.reason)
        }
        if written > 0 { metrics?.rowsWritten(written) }
        if dropped > 0 {
            logger.error("ledger rows were dropped while the spool was full", metadata: ["spool": "\(path)", "dropped": "\(dropped)", "reason": "\(reason)"])
        }
        metrics?.spool(held: held)
        if recovered {
            fullFlag.store(false, ordering: .relaxed)
            metrics?.spool(full: false)
            logger.notice("ledger spool has space again: requests are served", metadata: ["spool": "\(path)", "rows_written_from_memory": "\(written)"])
        }
        return written
    }

    /// Starts the file over when every row in it has been shipped: if the last row written is
    /// `seq` (the server's last confirmed row) and the file is at least `minimumSize` bytes (or
    /// the spool is full), the file is replaced, atomically, by one whose first row is a normal
    /// chained `spool_rotated` row (seq + 1, prev = the hash of row `seq`). Held rows follow it.
    /// Returns the rotated row's seq, or nil when nothing was done.
    public func rotate(shippedThrough seq: UInt64, minimumSize: Int) -> UInt64? {
        let fd = self.fd
        let maxSize = self.maxSize
        let path = self.path
        let result = state.withLockedValue { s -> Result<UInt64, SpoolError>? in
            guard s.seq == seq, seq > 0, s.size >= minimumSize || s.full else { return nil }
            let temporary = path + ".rotating"
            let row = LedgerRecord(kind: .spoolRotated, timeMicros: ProxyClock.nowMicros(),
                                   detail: "rows 1..\(seq) were shipped to the server; the spool starts over here")
            let rotatedRow = unsealed { row.appendBody(to: &$0) }
            var fresh = s
            fresh.size = 0
            fresh.reservedTo = 0  // a new file: nothing reserved for it yet
            fresh.reason = ""
            let newFD = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0o600)
            guard newFD >= 0, Self.writeRows(CollectionOfOne(rotatedRow), fd: newFD, maxSize: Int.max, into: &fresh), fdatasync(newFD) == 0 else {
                let code = errno
                if newFD >= 0 { close(newFD) }
                unlink(temporary)
                guard code == ENOSPC || code == EDQUOT || fresh.reason.contains(String(cString: strerror(ENOSPC))) else {
                    let error = fresh.reason.isEmpty ? String(cString: strerror(code)) : fresh.reason
                    return .failure(SpoolError(description: "cannot write \(temporary): \(error)"))
                }
                // The filesystem is full and every row is shipped: no second file fits beside
                // this one, so this one starts over in place. (Killed between the two steps it
                // is empty, and a restart begins a new writer's chain: the server has all of this one.)
                fresh = s
                fresh.size = 0
                fresh.reservedTo = 0
                fresh.reason = ""
                guard ftruncate(fd, 0) == 0 else {
                    return .failure(SpoolError(description: "the disk is full and \(path) cannot be cut: \(String(cString: strerror(errno)))"))
                }
                s.size = 0
                guard Self.writeRows(CollectionOfOne(rotatedRow), fd: fd, maxSize: Int.max, into: &fresh) else {
                    return .failure(SpoolError(description: "the disk is full; \(path) was emptied but its rotation row failed: \(fresh.reason)"))
                }
                _ = fdatasync(fd)
                Self.adoptRotated(fresh, into: &s, fd: fd, maxSize: maxSize)
                return .success(fresh.seq)
            }
            // The new file replaces the old one under its name, then under our descriptor.
            guard rename(temporary, path) == 0 else {
                let error = String(cString: strerror(errno))
                close(newFD)
                unlink(temporary)
                return .failure(SpoolError(description: "cannot rename \(temporary) to \(path): \(error)"))
            }
            Self.syncDirectory(of: path)
            _ = dup2(newFD, fd)
            close(newFD)
            Self.adoptRotated(fresh, into: &s, fd: fd, maxSize: maxSize)
            return .success(fresh.seq)
        }
        switch result {
        case nil:
            return nil
        case .failure(let error):
            logger.error("ledger spool rotation failed; the spool keeps growing", metadata: ["spool": "\(path)", "error": "\(error.description)"])
            return nil
        case .success(let rotated):
            metrics?.rowsWritten()
            logger.info("ledger spool rotated: every row was shipped", metadata: ["spool": "\(path)", "shipped_seq": "\(seq)", "seq": "\(rotated)"])
            flush(sync: false)  // clears FULL when nothing is held any more
            return rotated
        }
    }

    private static func syncDirectory(of path: String) {
        let parent = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        let dir = open(parent.isEmpty ? (path.hasPrefix("/") ? "/" : ".") : parent, O_RDONLY | O_CLOEXEC)
        guard dir >= 0 else { return }
        _ = fsync(dir)
        close(dir)
    }

    /// Every `interval`, on a dedicated, lower-priority (nice 10) thread until cancelled: writes
    /// held rows when the spool is full and runs `fdatasync` when the sync interval is up; once
    /// more with a sync at the end. Rows themselves are written by ``append(_:)``.
    public func run(interval: Duration = .milliseconds(20)) async {
        let stop = NIOLockedValueBox(false)
        let done = NIOLockedValueBox<CheckedContinuation<Void, Never>?>(nil)
        let micros = UInt32(interval.components.seconds * 1_000_000 + interval.components.attoseconds / 1_000_000_000_000)
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                done.withLockedValue { $0 = continuation }
                let thread = Thread {
                    _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10)  // on Linux: this thread only
                    while !stop.withLockedValue({ $0 }) {
                        usleep(micros)
                        self.flush(sync: false)
                    }
                    self.flush()
                    done.withLockedValue { $0?.resume(); $0 = nil }
                }
                thread.name = "sigil-ledger"
                thread.start()
            }
        } onCancel: {
            stop.withLockedValue { $0 = true }
        }
    }

    /// At shutdown: the last sync, and a log line for rows that never reached the file.
    public func finalFlush() {
        flush()
        let held = heldCount
        if held > 0 {
            logger.error("ledger rows still held in memory at shutdown are lost (the spool was full)", metadata: ["spool": "\(path)", "rows": "\(held)"])
        }
    }

    /// The seq and hash of the last row of an existing spool (0 and 64 zeros for an empty one).
    /// A last row without them is refused: starting the chain over at seq 1 behind it would fork
    /// the writer's chain (and the server refuses a seq it stored with other bytes).
    static func tail(of path: String) throws(SpoolError) -> (seq: UInt64, hash: String) {
        let zero = (UInt64(0), String(repeating: "0", count: 64))
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return zero }
        defer { close(fd) }
        let size = lseek(fd, 0, SEEK_END)
        guard size > 0 else { return zero }
        let window = min(Int(size), 256 * 1024)
        var bytes = [UInt8](repeating: 0, count: window)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, window, off_t(Int(size) - window)) }
        let line = n == window ? bytes.split(separator: 0x0A).last.map { String(decoding: $0, as: UTF8.self) } : nil
        guard let line, let seq = Self.value(of: "seq", in: line).flatMap({ UInt64($0) }),
              let hash = Self.value(of: "hash", in: line)?.replacingQuotes(), hash.count == 64 else {
            throw SpoolError(description: "the last row of the ledger spool \(path) has no seq and hash, so its chain cannot be continued; "
                             + "check it with `sigil audit verify --spool \(path)`, then move it aside to start a new chain")
        }
        return (seq, hash)
    }

    /// A spool that does not end with a newline ends in part of a row: the proxy died (or the
    /// power went) in the middle of its `write`, or before the truncation that undoes a failed
    /// one. No response waited for that row, so it is cut back to the last whole row (logged);
    /// appending behind the fragment would glue the next row onto it and break the chain.
    static func cutTornTail(fd: Int32, path: String, logger: Logger) throws(SpoolError) {
        let size = Int(lseek(fd, 0, SEEK_END))
        guard size > 0 else { return }
        var last: UInt8 = 0
        guard pread(fd, &last, 1, off_t(size - 1)) == 1 else {
            throw SpoolError(description: "cannot read the ledger spool \(path): \(String(cString: strerror(errno)))")
        }
        guard last != 0x0A else { return }
        // Back to the last newline, a window at a time (a row is a few hundred bytes).
        var end = size
        var cut = 0
        var window = [UInt8](repeating: 0, count: 64 * 1024)
        search: while end > 0 {
            let start = max(0, end - window.count)
            let n = window.withUnsafeMutableBytes { pread(fd, $0.baseAddress, end - start, off_t(start)) }
            guard n == end - start else {
                throw SpoolError(description: "cannot read the ledger spool \(path): \(String(cString: strerror(errno)))")
            }
            if let newline = window[0..<n].lastIndex(of: 0x0A) {
                cut = start + newline + 1
                break search
            }
            end = start
        }
        guard ftruncate(fd, off_t(cut)) == 0 else {
            throw SpoolError(description: "the ledger spool \(path) ends in part of a row and cannot be cut back to its last whole row: "
                             + String(cString: strerror(errno)))
        }
        logger.warning("the ledger spool ended in part of a row (the proxy stopped while writing it); cut back to its last whole row",
                       metadata: ["spool": "\(path)", "bytes_removed": "\(size - cut)"])
    }

    /// This proxy instance's writer name: `base` (namespace, labels, inbound port: the same for
    /// every replica of a workload) and a random suffix (`~` and 12 hex digits) chosen on the
    /// spool's first start and kept in `<spool>.writer`, so replicas shipping to one server keep
    /// separate chains and a writer name cannot be guessed by another workload. A spool written
    /// before suffixes existed keeps the name its rows carry, so its chain continues.
    public static func instanceWriter(base: String, spoolPath: String) throws(SpoolError) -> String {
        let namePath = spoolPath + ".writer"
        // A missing or empty spool starts a new chain: under a new name (and with no shipping
        // cursor), or the server would refuse it as not continuing the old name's stored chain.
        // (A rotated spool always holds its `spool_rotated` row.)
        if (FileStamp.size(of: spoolPath) ?? 0) == 0 {
            unlink(namePath)
            unlink(spoolPath + ".shipped")
        }
        if let text = try? String(contentsOfFile: namePath, encoding: .utf8) {
            let name = text.trimmingCharacters(in: .whitespacesAndNewlines)
            guard name.hasPrefix("proxy:") else {
                throw SpoolError(description: "\(namePath) does not hold a ledger writer name; remove it to start a new chain")
            }
            return name
        }
        var name = base + "~" + (0..<6).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
        if let handle = FileHandle(forReadingAtPath: spoolPath) {
            let head = handle.readData(ofLength: 64 * 1024)
            try? handle.close()
            if let line = head.split(separator: 0x0A).first,
               let row = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any], let existing = row["writer"] as? String {
                name = existing
            }
        }
        let temporary = namePath + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SpoolError(description: "cannot create \(temporary): \(String(cString: strerror(errno)))") }
        let bytes = Array((name + "\n").utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd) == 0
        close(fd)
        guard written == bytes.count, synced, rename(temporary, namePath) == 0 else {
            throw SpoolError(description: "cannot write \(namePath): \(String(cString: strerror(errno)))")
        }
        return name
    }

    static func value(of key: String, in line: String) -> String? {
        let needle = Array("\"\(key)\":".utf8)
        let bytes = Array(line.utf8)
        guard bytes.count >= needle.count else { return nil }
        for start in 0...(bytes.count - needle.count) where bytes[start..<(start + needle.count)].elementsEqual(needle) {
            var end = start + needle.count
            while end < bytes.count, bytes[end] != 0x2C, bytes[end] != 0x7D { end += 1 }
            return String(decoding: bytes[(start + needle.count)..<end], as: UTF8.self)
        }
        return nil
    }
}

extension String {
    fileprivate func replacingQuotes() -> String { filter { $0 != "\"" } }
}
