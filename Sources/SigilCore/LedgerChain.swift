import Crypto

/// The hash chain of one ledger writer, checked from the bytes of its rows.
///
/// A row is one JSON object on one line: `{"writer":…,"source":…,…,"seq":N,"prev":"<hex>","hash":"<hex>"}`.
/// `hash` is the SHA-256 of every byte before `,"hash":` and `prev` is the previous row's `hash`
/// (64 zeros for a writer's first row), so editing any byte of a row breaks its own hash and
/// deleting or reordering rows breaks the next row's `prev`. Checking reads bytes only, so rows
/// whose fields come in another order (older spools had `seq` second) check the same way.
///
/// `seq` and `prev`, the only fields that depend on the rows before, come last: a writer hashes
/// the rest of a row (``PartialHash``) before it takes its chain's lock, and under the lock hashes
/// only those last ~90 bytes (``seal(_:seq:prev:to:hash:)``).
public enum LedgerChain {
    /// The `prev` of a writer's first row.
    public static let genesis = String(repeating: "0", count: 64)

    static let hashKey: [UInt8] = Array(",\"hash\":\"".utf8)

    public struct Problem: Error, CustomStringConvertible, Sendable, Equatable {
        public let description: String
        public init(_ description: String) { self.description = description }
    }

    /// The SHA-256 state over a row's leading bytes (its head and body, before `seq`): computed
    /// where the row is serialized, finished when it is sealed. A copy continues independently,
    /// so a connection's who-called-whom prefix is hashed once and continued per request.
    public struct PartialHash: Sendable {
        private var sha = SHA256()

        public init() {}

        public mutating func update(_ bytes: ArraySlice<UInt8>) {
            bytes.withUnsafeBytes { sha.update(bufferPointer: $0) }
        }

        /// The hash of everything absorbed, as 64 lowercase hex digits, replacing `hex`.
        fileprivate func finish(into hex: inout [UInt8]) {
            hex.removeAll(keepingCapacity: true)
            sha.finalize().withUnsafeBytes { JSONText.appendHex($0, to: &hex) }
        }
    }

    /// The hash a row states and the hash of its bytes; throws when the row has no well-formed
    /// `hash` field at its end.
    public static func hashes(of line: some Collection<UInt8>) throws(Problem) -> (stated: String, computed: String) {
        let bytes = Array(line)
        // The row ends with `,"hash":"` + 64 hex digits + `"}`.
        let tail = hashKey.count + 64 + 2
        guard bytes.count > tail, bytes[bytes.count - 2] == 0x22, bytes[bytes.count - 1] == 0x7D,
              Array(bytes[(bytes.count - tail)..<(bytes.count - tail + hashKey.count)]) == hashKey else {
            throw Problem("the row does not end with its \"hash\" field")
        }
        let stated = String(decoding: bytes[(bytes.count - 66)..<(bytes.count - 2)], as: UTF8.self)
        let digest = SHA256.hash(data: bytes[..<(bytes.count - tail)])
        var hex: [UInt8] = []
        digest.withUnsafeBytes { JSONText.appendHex($0, to: &hex) }
        return (stated, String(decoding: hex, as: UTF8.self))
    }

    /// Serializes `record` as row `seq` of `writer`, chained after the row whose hash is `prev`
    /// (64 lowercase hex digits): the row's bytes (one JSON object, no newline) and its hash.
    public static func seal(_ record: LedgerRecord, writer: String, seq: UInt64, prev: [UInt8]) -> (line: [UInt8], hash: [UInt8]) {
        var line: [UInt8] = []
        line.reserveCapacity(512)
        var hash: [UInt8] = []
        hash.reserveCapacity(64)
        appendSealed(writer: writer, seq: seq, prev: prev, to: &line, hash: &hash) { record.appendBody(to: &$0) }
        return (line, hash)
    }

    /// Appends row `seq` of `writer` to `line` (no newline): its head, the body `body` writes
    /// (``LedgerRecord/appendBody(to:)``'s bytes), `seq`, `prev`, and its `hash` over exactly those
    /// bytes. `hash` is set to that hash (64 lowercase hex digits), the next row's `prev`. What
    /// every ledger writer seals with, in one step (the server's chain) or in two
    /// (``appendUnsealed(writer:to:body:)`` then ``seal(_:seq:prev:to:hash:)``: the proxy's spool).
    public static func appendSealed(writer: String, seq: UInt64, prev: [UInt8], to line: inout [UInt8], hash: inout [UInt8],
                                    body: (inout [UInt8]) -> Void) {
        let partial = appendUnsealed(writer: writer, to: &line, body: body)
        seal(partial, seq: seq, prev: prev, to: &line, hash: &hash)
    }

    /// Appends the first part of a row of `writer` to `line`: its head and the body `body` writes;
    /// returns the hash state over exactly those bytes, for ``seal(_:seq:prev:to:hash:)``.
    public static func appendUnsealed(writer: String, to line: inout [UInt8], body: (inout [UInt8]) -> Void) -> PartialHash {
        let start = line.count
        LedgerRecord.appendHead(to: &line, writer: writer)
        body(&line)
        var partial = PartialHash()
        partial.update(line[start...])
        return partial
    }

    /// Ends a row whose first part (``appendUnsealed(writer:to:body:)``'s bytes, hashed into
    /// `partial`) is already at the end of `line`: appends `,"seq":N,"prev":"<hex>"` and the
    /// row's `hash` field, and sets `hash` to it. Only these last bytes are hashed here.
    public static func seal(_ partial: PartialHash, seq: UInt64, prev: [UInt8], to line: inout [UInt8], hash: inout [UInt8]) {
        var partial = partial
        let start = line.count
        LedgerRecord.appendTail(to: &line, seq: seq, prev: prev)
        partial.update(line[start...])
        partial.finish(into: &hash)
        line.append(contentsOf: hashKey)
        line.append(contentsOf: hash)
        line.append(0x22)
        line.append(0x7D)
    }

    /// Checks one row against its own hash and against the row before it (`previousHash`, or
    /// ``genesis`` for the first), given the `seq` and `prev` the row states.
    public static func check(line: some Collection<UInt8>, seq: UInt64, prev: String, expectedSeq: UInt64,
                             previousHash: String) throws(Problem) -> String {
        let (stated, computed) = try hashes(of: line)
        guard stated == computed else { throw Problem("its bytes do not match its hash (the row was edited)") }
        guard seq == expectedSeq else {
            throw Problem(seq > expectedSeq
                ? "seq \(expectedSeq)\(seq - expectedSeq > 1 ? "-\(seq - 1)" : "") missing before it (rows were deleted)"
                : "seq \(seq) repeats or goes back (expected \(expectedSeq))")
        }
        guard prev == previousHash else { throw Problem("its prev does not match the hash of the row before it (the chain was cut or rows were replaced)") }
        return computed
    }
}

extension RFC3339 {
    /// What audit filters accept (`--since`, the ledger page's `since`): an RFC 3339 time, or a
    /// duration back from `nowMicros` (`30m`, `24h`, `7d`); nil for anything else.
    public static func micros(fromTimeOrAgo text: String, nowMicros: Int64) -> Int64? {
        if let micros = micros(from: text) { return micros }
        guard let ago = try? DurationText.parse(text) else { return nil }
        return nowMicros - ago.components.seconds * 1_000_000 - ago.components.attoseconds / 1_000_000_000_000
    }

    /// Microseconds since 1970 from RFC 3339 `YYYY-MM-DDTHH:MM:SS[.ffffff]` and `Z` (what the ledger
    /// writes) or an offset `+HH:MM` / `-HH:MM`; nil for anything else, a day the month does not
    /// have (February 31) included.
    public static func micros(from text: some StringProtocol) -> Int64? {
        let b = Array(text.utf8)
        func digits(_ start: Int, _ count: Int) -> Int? {
            guard start + count <= b.count else { return nil }
            var v = 0
            for i in start..<(start + count) {
                guard b[i] >= 0x30, b[i] <= 0x39 else { return nil }
                v = v * 10 + Int(b[i] - 0x30)
            }
            return v
        }
        guard b.count >= 20, b[4] == 0x2D, b[7] == 0x2D, b[10] == 0x54 || b[10] == 0x20, b[13] == 0x3A, b[16] == 0x3A,
              let year = digits(0, 4), let month = digits(5, 2), let day = digits(8, 2),
              let hour = digits(11, 2), let minute = digits(14, 2), let second = digits(17, 2),
              (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 61 else { return nil }
        var i = 19
        var fraction = 0
        if i < b.count, b[i] == 0x2E {
            i += 1
            var scale = 100_000
            let start = i
            while i < b.count, b[i] >= 0x30, b[i] <= 0x39 {
                if scale > 0 { fraction += Int(b[i] - 0x30) * scale }
                scale /= 10
                i += 1
            }
            guard i > start else { return nil }
        }
        var offsetSeconds = 0
        if i == b.count - 1, b[i] == 0x5A || b[i] == 0x7A {
            // Z
        } else if i + 6 == b.count, b[i] == 0x2B || b[i] == 0x2D, b[i + 3] == 0x3A,
                  let oh = digits(i + 1, 2), let om = digits(i + 4, 2), oh < 24, om < 60 {
            offsetSeconds = (oh * 3600 + om * 60) * (b[i] == 0x2B ? 1 : -1)
        } else {
            return nil
        }
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
        let monthDays = [31, leap ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
        guard day <= monthDays[month - 1] else { return nil }
        // Days from civil (Howard Hinnant's algorithm).
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let mp = (month + 9) % 12
        let doy = (153 * mp + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        let days = Int64(era * 146_097 + doe - 719_468)
        return (days * 86_400 + Int64(hour * 3600 + minute * 60 + second - offsetSeconds)) * 1_000_000 + Int64(fraction)
    }
}
