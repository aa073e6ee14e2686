#if canImport(Glibc)
import Glibc
#endif
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
public import Logging
import NIOConcurrencyHelpers
import SigilCore
import SigilRPC
import SigilTLS

/// Ships the rows of a ledger spool to the server's ledger API, at least once: it asks the server
/// where the writer's stored chain ends, reads the spool from there and sends the rows in batches;
/// the server stores each (writer, seq) once, so a retry after a crash or a lost answer duplicates
/// nothing. The spool is the buffer: while the server is away rows stay on disk (nothing is lost,
/// and the proxy keeps serving); a `<spool>.shipped` file remembers how far shipping got so a
/// restart does not rescan the spool.
public final class LedgerShipper: Sendable {
    public let spoolPath: String
    public let writer: String
    let host: String
    let port: Int
    let identity: IdentityStore
    let logger: Logger
    /// The spool itself, to start it over once the server has every row (nil: never rotated).
    let spool: LedgerSpool?
    /// A spool at least this large is started over once everything in it is shipped.
    let segmentSize: Int
    static let batchRows = 2000
    static let batchBytes = 4 << 20
    static let idlePoll: Duration = .milliseconds(200)
    /// Reconnect this often so a rotated SVID is what the server sees.
    static let connectionLife: Duration = .seconds(300)

    /// Rows the server has confirmed, and whether shipping is behind (for logs and tests).
    private let progress = NIOLockedValueBox(Progress())
    struct Progress {
        var shippedSeq: UInt64 = 0
        var failing = false
        /// Where the next row to send starts, once known.
        var cursor: Cursor?
    }

    /// Where the next row to send starts in the spool.
    struct Cursor: Equatable {
        var offset: Int
        var seq: UInt64
    }

    public struct ShipError: Error, CustomStringConvertible {
        public let description: String
    }

    public init(spoolPath: String, writer: String, server: String, identity: IdentityStore, spool: LedgerSpool? = nil,
                segmentSize: Int = 64 << 20, logger: Logger) throws(ShipError) {
        guard let colon = server.lastIndex(of: ":"), let port = Int(server[server.index(after: colon)...]), (1...65535).contains(port),
              colon > server.startIndex else {
            throw ShipError(description: "--ledger-server '\(server)' is not HOST:PORT")
        }
        var host = String(server[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if let problem = ServerTarget.problem(host: host) {
            throw ShipError(description: "--ledger-server '\(server)': \(problem); give the server's HOST:PORT, e.g. 127.0.0.1:8081")
        }
        self.host = host
        self.port = port
        self.spoolPath = spoolPath
        self.writer = writer
        self.identity = identity
        self.spool = spool
        self.segmentSize = segmentSize
        self.logger = logger
    }

    public var shippedSeq: UInt64 { progress.withLockedValue { $0.shippedSeq } }

    public func run() async {
        var backoff: Duration = .milliseconds(200)
        let remembered = Self.readCursorFile(spoolPath + ".shipped")
        progress.withLockedValue { $0.cursor = remembered }
        while !Task.isCancelled {
            guard let material = identity.current else {
                try? await Task.sleep(for: .milliseconds(200))
                continue
            }
            let (chain, key) = (material.chainDER, material.keyDER)
            do {
                try await withLedgerClient(chain: chain, key: key, bundle: material.bundle) { client in
                    try await self.session(client)
                }
                backoff = .milliseconds(200)
            } catch is CancellationError {
                return
            } catch {
                let first = progress.withLockedValue { p in
                    defer { p.failing = true }
                    return !p.failing
                }
                if let refusal = error as? RPCError, [.invalidArgument, .permissionDenied, .failedPrecondition].contains(refusal.code) {
                    // The server refuses rows the spool holds: a chain cannot skip a row, so this
                    // lasts until an operator acts. Said every time, at error level, with why.
                    logger.error("the server refuses this proxy's ledger rows; shipping is stuck until that is resolved (the spool keeps every row)",
                                 metadata: ["server": "\(host):\(port)", "error": "\(refusal.message)"])
                } else if first {
                    logger.warning("cannot ship ledger rows to the server; they stay in the spool and are sent when it is back",
                                   metadata: ["server": "\(host):\(port)", "error": "\(error)"])
                }
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(5))
            }
        }
    }

    /// One connection's worth of shipping: from where the server's chain ends, batch after batch,
    /// until the connection is old enough to be replaced (a rotated SVID) or a call fails.
    private func session(_ client: SigilLedgerAPI.Client<HTTP2ClientTransport.Posix>) async throws {
        let opened = ContinuousClock.now
        var next = try await append(client, rows: []).nextSeq
        // A cursor this session found or moved itself is used as is; anything else is looked up.
        var trusted: Cursor?
        while !Task.isCancelled, ContinuousClock.now - opened < Self.connectionLife {
            let at: Cursor
            if let trusted, trusted.seq == next {
                at = trusted
            } else {
                at = try locate(seq: next, from: progress.withLockedValue { $0.cursor })
                guard at.seq == next else {
                    throw ShipError(description: "the spool \(spoolPath) has no row seq \(next), which the server expects next (its first row there is \(at.seq)): the spool was truncated or replaced")
                }
                progress.withLockedValue { $0.cursor = at }
                trusted = at
            }
            let (rows, end) = try readRows(from: at)
            if rows.isEmpty {
                if let rotated = rotateIfShipped(through: next - 1) {
                    trusted = rotated
                    continue
                }
                try await Task.sleep(for: Self.idlePoll)
                continue
            }
            next = try await append(client, rows: rows.map(\.bytes)).nextSeq
            var cursor: Cursor?
            if let last = rows.last, next == last.seq + 1 { cursor = Cursor(offset: end, seq: next) }
            trusted = cursor
            confirmed(next - 1, cursor: cursor)
            if cursor != nil, let rotated = rotateIfShipped(through: next - 1) { trusted = rotated }
        }
    }

    /// Asks the spool to start over when the server has confirmed its last row (`seq`) and the
    /// file is at least a segment large (or full); the cursor then points at the new file's first
    /// row, the `spool_rotated` row (seq + 1), which is shipped like any other.
    private func rotateIfShipped(through seq: UInt64) -> Cursor? {
        guard let spool, seq > 0, let rotated = spool.rotate(shippedThrough: seq, minimumSize: segmentSize) else { return nil }
        let cursor = Cursor(offset: 0, seq: rotated)
        progress.withLockedValue { $0.cursor = cursor }
        Self.writeCursorFile(spoolPath + ".shipped", cursor)
        return cursor
    }

    private func confirmed(_ seq: UInt64, cursor: Cursor?) {
        let recovered = progress.withLockedValue { p in
            p.shippedSeq = seq
            if let cursor { p.cursor = cursor }
            defer { p.failing = false }
            return p.failing
        }
        if recovered { logger.info("ledger shipping resumed", metadata: ["shipped_seq": "\(seq)"]) }
        if let cursor { Self.writeCursorFile(spoolPath + ".shipped", cursor) }
    }

    private func append(_ client: SigilLedgerAPI.Client<HTTP2ClientTransport.Posix>, rows: [[UInt8]]) async throws -> SigilLedgerAppendResponse {
        var request = SigilLedgerAppendRequest()
        request.writer = writer
        request.rows = rows.map { Data($0) }
        var options = CallOptions.defaults
        options.timeout = .seconds(30)
        return try await client.append(request, options: options)
    }

    private func withLedgerClient(chain: [[UInt8]], key: [UInt8], bundle: TrustBundle,
                                  _ body: @Sendable (SigilLedgerAPI.Client<HTTP2ClientTransport.Posix>) async throws -> Void) async throws {
        let serverID = try SpiffeID(trustDomain: bundle.trustDomain, path: "/sigil/server")
        let identity = self.identity
        let transport = try HTTP2ClientTransport.Posix(
            target: ServerTarget.resolvable(host: host, port: port),
            transportSecurity: .mTLS(certificateChain: chain.map { .bytes($0, format: .der) }, privateKey: .bytes(key, format: .der)) { tls in
                tls.serverCertificateVerification = .noHostnameVerification
                tls.trustRoots = .certificates([])
                tls.customVerificationCallback = SpiffeTLS.verificationCallback(bundle: { identity.current?.bundle }, expectedPeer: serverID)
            },
            config: .defaults { $0.backoff = .init(initial: .milliseconds(200), max: .seconds(2), multiplier: 1.6, jitter: 0.2) })
        try await withGRPCClient(transport: transport) { grpc in
            try await body(SigilLedgerAPI.Client(wrapping: grpc))
        }
    }

    // MARK: reading the spool

    struct SpoolRow {
        var seq: UInt64
        var bytes: [UInt8]
    }

    /// The cursor of the row with `seq`: the remembered one when it matches, else found by
    /// scanning (forward from the cursor when `seq` lies ahead, from the start otherwise).
    func locate(seq: UInt64, from cursor: Cursor?) throws -> Cursor {
        if let cursor, cursor.seq == seq, Self.seqOfLine(at: cursor.offset, in: spoolPath) == seq || Self.fileSize(spoolPath) == cursor.offset {
            return cursor
        }
        // Scan forward from a remembered cursor that still points at its row and lies before `seq`.
        var offset = 0
        if let cursor, cursor.seq <= seq, Self.seqOfLine(at: cursor.offset, in: spoolPath) == cursor.seq { offset = cursor.offset }
        let fd = open(spoolPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw ShipError(description: "cannot read the ledger spool \(spoolPath): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var carry: [UInt8] = []
        var lineStart = offset
        while true {
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(offset)) }
            if n <= 0 { return Cursor(offset: lineStart, seq: seq) }  // not written yet: it is the next row
            var start = 0
            for i in 0..<n where buffer[i] == 0x0A {
                carry.append(contentsOf: buffer[start..<i])
                if let lineSeq = Self.seq(in: carry), lineSeq >= seq {
                    return Cursor(offset: lineStart, seq: lineSeq)
                }
                carry.removeAll(keepingCapacity: true)
                start = i + 1
                lineStart = offset + start
            }
            carry.append(contentsOf: buffer[start..<n])
            offset += n
        }
    }

    /// Complete rows from `cursor`, at most one batch; and the offset after the last of them.
    func readRows(from cursor: Cursor) throws -> ([SpoolRow], Int) {
        let size = Self.fileSize(spoolPath)
        guard size > cursor.offset else { return ([], cursor.offset) }  // nothing new: no buffer, no read
        let fd = open(spoolPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ShipError(description: "cannot read the ledger spool \(spoolPath): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: min(Self.batchBytes, size - cursor.offset))
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(cursor.offset)) }
        guard n > 0 else { return ([], cursor.offset) }
        var rows: [SpoolRow] = []
        var start = 0
        var i = 0
        while i < n, rows.count < Self.batchRows {
            if bytes[i] == 0x0A {
                let line = Array(bytes[start..<i])
                guard let seq = Self.seq(in: line) else {
                    throw ShipError(description: "ledger spool \(spoolPath) has a malformed row at byte \(cursor.offset + start)")
                }
                rows.append(SpoolRow(seq: seq, bytes: line))
                start = i + 1
            }
            i += 1
        }
        return (rows, cursor.offset + start)
    }

    static let seqKey: [UInt8] = Array(",\"seq\":".utf8)

    /// The `seq` a row states (the first `,"seq":` of a row is its own: a JSON string cannot hold
    /// an unescaped quote).
    static func seq(in line: some Collection<UInt8>) -> UInt64? {
        let bytes = Array(line)
        guard bytes.count > seqKey.count else { return nil }
        var i = 0
        while i + seqKey.count <= bytes.count {
            if bytes[i] == 0x2C, bytes[i..<(i + seqKey.count)].elementsEqual(seqKey) {
                var j = i + seqKey.count
                var value: UInt64 = 0
                let first = j
                while j < bytes.count, bytes[j] >= 0x30, bytes[j] <= 0x39 {
                    value = value &* 10 &+ UInt64(bytes[j] - 0x30)
                    j += 1
                }
                return j > first ? value : nil
            }
            i += 1
        }
        return nil
    }

    static func seqOfLine(at offset: Int, in path: String) -> UInt64? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        if offset > 0 {
            // A cursor points at the start of a row: the byte before it ends the previous row.
            var before: UInt8 = 0
            guard pread(fd, &before, 1, off_t(offset - 1)) == 1, before == 0x0A else { return nil }
        }
        // The whole row, up to its newline (`seq` is near its end; a row with a long path or
        // detail can be tens of KiB), read in chunks; at most 1 MiB.
        var line: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16 * 1024)
        while line.count < 1 << 20 {
            let n = chunk.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(offset + line.count)) }
            guard n > 0 else { break }
            if let end = chunk[0..<n].firstIndex(of: 0x0A) {
                line.append(contentsOf: chunk[0..<end])
                return seq(in: line)
            }
            line.append(contentsOf: chunk[0..<n])
        }
        return line.isEmpty ? nil : seq(in: line)
    }

    static func fileSize(_ path: String) -> Int {
        FileStamp.size(of: path) ?? -1
    }

    static func readCursorFile(_ path: String) -> Cursor? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        let parts = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
        guard parts.count == 2, let offset = Int(parts[0]), let seq = UInt64(parts[1]), offset >= 0 else { return nil }
        return Cursor(offset: offset, seq: seq)
    }

    static func writeCursorFile(_ path: String, _ cursor: Cursor) {
        let temporary = path + ".tmp"
        let text = "\(cursor.offset) \(cursor.seq)\n"
        guard FileManager.default.createFile(atPath: temporary, contents: Data(text.utf8), attributes: [.posixPermissions: 0o600]) else { return }
        _ = rename(temporary, path)
    }
}
