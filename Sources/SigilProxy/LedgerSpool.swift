#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
#if canImport(CoreFoundation)
import CoreFoundation  // the release build resolves Glibc struct members through it
#endif
import Crypto
import Foundation
public import Logging
import NIOConcurrencyHelpers
public import SigilCore

/// The proxy's ledger spool. A row is serialized and hash-chained when it is handed over, on the
/// thread that handles its request, into one shared byte buffer (a few microseconds under a lock,
/// no I/O): the request's own strings are freed where they were made and no burst of work builds
/// up. A background thread appends the buffer to a JSON-lines file every 20 ms with one `write` (a
/// killed proxy loses nothing written); `fdatasync` runs at most every `syncInterval` (and at
/// shutdown), which bounds what a power loss can take without a disk flush behind every batch.
/// The chain continues across restarts (the last row's seq and hash are read back when the file
/// is opened).
public final class LedgerSpool: Sendable {
    struct Pending {
        /// Serialized, chained rows not yet written.
        var bytes: [UInt8] = []
        var rows = 0
        var dropped = 0
        var written: UInt64 = 0
        var seq: UInt64
        /// The last row's hash, as its 64 lowercase hex digits.
        var hash: [UInt8]
    }

    public let path: String
    public let writer: String
    /// Rows held in memory before new rows are refused (and counted, with an alarm in the log).
    public let capacity: Int
    /// The longest time a written row waits for `fdatasync` (zero: a sync after every batch).
    public let syncInterval: Duration
    private let pending: NIOLockedValueBox<Pending>
    private let logger: Logger
    private let fd: Int32
    /// Held for a whole flush, so that two flushes (the writer thread's and the one at shutdown)
    /// never interleave their bytes.
    private let output = NIOLockedValueBox(SyncState())

    struct SyncState {
        var unsynced = false
        var lastSync = ContinuousClock.now
    }

    public struct SpoolError: Error, CustomStringConvertible {
        public let description: String
    }

    public init(path: String, writer: String, capacity: Int = 200_000, syncInterval: Duration = .milliseconds(250),
                logger: Logger) throws(SpoolError) {
        self.path = path
        self.writer = writer
        self.capacity = capacity
        self.syncInterval = syncInterval
        self.logger = logger
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw SpoolError(description: "cannot open the ledger spool \(path): \(String(cString: strerror(errno)))")
        }
        self.fd = fd
        let tail = Self.tail(of: path)
        var state = Pending(seq: tail.seq, hash: Array(tail.hash.utf8))
        state.bytes.reserveCapacity(64 * 1024)
        self.pending = NIOLockedValueBox(state)
    }

    deinit {
        close(fd)
    }

    /// Serializes and chains a row for the writer. Never blocks on I/O. The row's own fields are
    /// serialized before the lock is taken; under it go only the sequence number, the previous
    /// hash, one SHA-256 over the row (~0.5 µs) and a copy into the shared buffer.
    public func append(_ row: LedgerRecord) {
        var body: [UInt8] = []
        body.reserveCapacity(512)
        row.appendBody(to: &body)
        let writer = self.writer
        let accepted = pending.withLockedValue { state -> Bool in
            guard state.rows < capacity else {
                state.dropped += 1
                return false
            }
            state.seq += 1
            let start = state.bytes.count
            LedgerRecord.appendHead(to: &state.bytes, writer: writer, seq: state.seq)
            state.bytes.append(contentsOf: body)
            LedgerRecord.appendTail(to: &state.bytes, prev: state.hash)
            let digest = state.bytes.withUnsafeBytes { SHA256.hash(data: UnsafeRawBufferPointer(rebasing: $0[start...])) }
            state.hash.removeAll(keepingCapacity: true)
            digest.withUnsafeBytes { JSONText.appendHex($0, to: &state.hash) }
            JSONText.appendRaw(",\"hash\":\"", to: &state.bytes)
            state.bytes.append(contentsOf: state.hash)
            JSONText.appendRaw("\"}\n", to: &state.bytes)
            state.rows += 1
            return true
        }
        if !accepted, pending.withLockedValue({ $0.dropped }) == 1 {
            logger.error("ledger spool is full: rows are being dropped until the writer catches up", metadata: ["spool": "\(path)"])
        }
    }

    /// Rows written to disk so far.
    public var writtenCount: UInt64 { pending.withLockedValue { $0.written } }

    /// Rows handed over and not yet written.
    var pendingCount: Int { pending.withLockedValue { $0.rows } }

    /// Writes out everything handed over so far (one write) and makes it durable (`fdatasync`)
    /// when `sync` is true or the last sync is `syncInterval` old. Returns the number of rows.
    @discardableResult
    public func flush(sync: Bool = true) -> Int {
        output.withLockedValue { output in
            let count = writeOut(&output)
            if output.unsynced, sync || ContinuousClock.now - output.lastSync >= syncInterval {
                _ = fdatasync(fd)
                output.unsynced = false
                output.lastSync = ContinuousClock.now
            }
            return count
        }
    }

    private func writeOut(_ output: inout SyncState) -> Int {
        var spare: [UInt8] = []
        spare.reserveCapacity(64 * 1024)  // allocated outside the lock the request path takes
        let (bytes, rows, dropped) = pending.withLockedValue { state -> ([UInt8], Int, Int) in
            swap(&state.bytes, &spare)
            let taken = (spare, state.rows, state.dropped)
            state.rows = 0
            state.dropped = 0
            return taken
        }
        if dropped > 0 {
            logger.error("ledger spool dropped rows while full", metadata: ["spool": "\(path)", "dropped": "\(dropped)"])
        }
        guard rows > 0 else { return 0 }
        let size = lseek(fd, 0, SEEK_END)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                write(fd, raw.baseAddress! + offset, raw.count - offset)
            }
            if n < 0 {
                if errno == EINTR { continue }
                // Nothing half-written stays and nothing is lost: the file goes back to its last
                // whole row and the rows (already chained) back to the front of the buffer.
                logger.error("ledger spool write failed; retrying with the next batch", metadata: ["spool": "\(path)", "error": "\(String(cString: strerror(errno)))"])
                if size >= 0 { _ = ftruncate(fd, size) }
                pending.withLockedValue { state in
                    state.bytes.insert(contentsOf: bytes, at: 0)
                    state.rows += rows
                }
                return 0
            }
            offset += n
        }
        output.unsynced = true
        pending.withLockedValue { $0.written += UInt64(rows) }
        return rows
    }

    /// Flushes every `interval` on a dedicated, lower-priority (nice 10) thread until cancelled,
    /// then once more. The rows are serialized already: each flush is one buffer swap and one
    /// `write`.
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

    /// The seq and hash of the last complete row of an existing spool (0 and 64 zeros if none).
    static func tail(of path: String) -> (seq: UInt64, hash: String) {
        let zero = (UInt64(0), String(repeating: "0", count: 64))
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return zero }
        defer { close(fd) }
        let size = lseek(fd, 0, SEEK_END)
        guard size > 0 else { return zero }
        let window = min(Int(size), 16 * 1024)
        var bytes = [UInt8](repeating: 0, count: window)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, window, off_t(Int(size) - window)) }
        guard n == window else { return zero }
        let lines = bytes.split(separator: 0x0A)
        guard let last = lines.last else { return zero }
        let line = String(decoding: last, as: UTF8.self)
        guard let seq = Self.value(of: "seq", in: line).flatMap({ UInt64($0) }),
              let hash = Self.value(of: "hash", in: line)?.replacingQuotes(), hash.count == 64 else { return zero }
        return (seq, hash)
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
