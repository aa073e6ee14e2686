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

/// The proxy's ledger spool: rows are handed over on the request path (an append under a lock),
/// and a background thread serialises, hash-chains and appends them to a JSON-lines file in
/// batches. Every batch is written (to the page cache: a killed proxy loses nothing written) at
/// once; `fdatasync` runs at most every `syncInterval` (and at shutdown), which bounds what a power
/// loss can take without putting a disk flush behind every batch. The chain continues across
/// restarts (the last row's seq and hash are read back when the file is opened).
public final class LedgerSpool: Sendable {
    struct Pending {
        var rows: [LedgerRecord] = []
        var dropped = 0
        var written: UInt64 = 0
    }

    public let path: String
    public let writer: String
    /// Rows held in memory before new rows are refused (and counted, with an alarm in the log).
    public let capacity: Int
    /// The longest time a written row waits for `fdatasync` (zero: a sync after every batch).
    public let syncInterval: Duration
    private let pending = NIOLockedValueBox(Pending())
    private let logger: Logger
    private let fd: Int32
    /// The chain's tail and the sync state; held for a whole flush, so that two flushes (the
    /// writer thread's and the one at shutdown) never interleave their rows.
    private let chain: NIOLockedValueBox<Chain>

    struct Chain {
        var seq: UInt64
        var hash: String
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
        self.chain = NIOLockedValueBox(Chain(seq: tail.seq, hash: tail.hash))
    }

    deinit {
        close(fd)
    }

    /// Hands a row to the writer. Never blocks; never does I/O.
    public func append(_ row: LedgerRecord) {
        let accepted = pending.withLockedValue { state -> Bool in
            guard state.rows.count < capacity else {
                state.dropped += 1
                return false
            }
            state.rows.append(row)
            return true
        }
        if !accepted, pending.withLockedValue({ $0.dropped }) == 1 {
            logger.error("ledger spool is full: rows are being dropped until the writer catches up", metadata: ["spool": "\(path)"])
        }
    }

    /// Rows written to disk so far.
    public var writtenCount: UInt64 { pending.withLockedValue { $0.written } }

    /// Writes out everything handed over so far (one write) and makes it durable (`fdatasync`)
    /// when `sync` is true or the last sync is `syncInterval` old. Returns the number of rows.
    @discardableResult
    public func flush(sync: Bool = true) -> Int {
        chain.withLockedValue { chain in
            let count = writeOut(&chain)
            if chain.unsynced, sync || ContinuousClock.now - chain.lastSync >= syncInterval {
                _ = fdatasync(fd)
                chain.unsynced = false
                chain.lastSync = ContinuousClock.now
            }
            return count
        }
    }

    private func writeOut(_ chain: inout Chain) -> Int {
        let (rows, dropped) = pending.withLockedValue { state -> ([LedgerRecord], Int) in
            let taken = state.rows
            state.rows = []
            state.rows.reserveCapacity(min(taken.count, 4096))
            let d = state.dropped
            state.dropped = 0
            return (taken, d)
        }
        if dropped > 0 {
            logger.error("ledger spool dropped rows while full", metadata: ["spool": "\(path)", "dropped": "\(dropped)"])
        }
        guard !rows.isEmpty else { return 0 }
        let before = (seq: chain.seq, hash: chain.hash, size: lseek(fd, 0, SEEK_END))
        var utf8: [UInt8] = []
        utf8.reserveCapacity(rows.count * 460)
        for row in rows {
            chain.seq += 1
            let start = utf8.count
            row.appendJSON(to: &utf8, writer: writer, seq: chain.seq, prev: chain.hash)
            let digest = utf8.withUnsafeBytes { SHA256.hash(data: UnsafeRawBufferPointer(rebasing: $0[start...])) }
            chain.hash = hex(digest)
            utf8.append(contentsOf: ",\"hash\":\"".utf8)
            utf8.append(contentsOf: chain.hash.utf8)
            utf8.append(contentsOf: "\"}\n".utf8)
        }
        var offset = 0
        while offset < utf8.count {
            let n = utf8.withUnsafeMutableBytes { raw in
                write(fd, raw.baseAddress! + offset, raw.count - offset)
            }
            if n < 0 {
                if errno == EINTR { continue }
                // Nothing half-written stays and nothing is lost: the file goes back to its last
                // whole row, the chain to its tail, and the rows back to the front of the queue.
                logger.error("ledger spool write failed; retrying with the next batch", metadata: ["spool": "\(path)", "error": "\(String(cString: strerror(errno)))"])
                if before.size >= 0 { _ = ftruncate(fd, before.size) }
                chain.seq = before.seq
                chain.hash = before.hash
                pending.withLockedValue { $0.rows.insert(contentsOf: rows, at: 0) }
                return 0
            }
            offset += n
        }
        chain.unsynced = true
        utf8.removeAll()
        pending.withLockedValue { $0.written += UInt64(rows.count) }
        return rows.count
    }

    /// Flushes every `interval` on a dedicated, lower-priority thread until cancelled, then once
    /// more. Serializing and hashing rows costs CPU in bursts; on its own thread at nice 10 the
    /// writer yields to the event loops instead of delaying requests (the p99 stays the proxy's),
    /// and frequent small batches keep each burst short.
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
