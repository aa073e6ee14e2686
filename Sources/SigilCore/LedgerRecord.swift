/// One row of the who-called-whom ledger: a proxied request (or TCP connection), or an event
/// that changes what the proxy enforces (policy reload, kill switch). Written as one JSON object
/// per line; the writer adds `seq` (monotonic per writer) and a SHA-256 chain (`prev`, `hash`).
public struct LedgerRecord: Sendable, Hashable {
    public enum Kind: String, Sendable {
        case request, connection, policyReload = "policy_reload", policyRejected = "policy_rejected"
        case killSwitchOn = "kill_switch_on", killSwitchOff = "kill_switch_off", identity
        // The server's own rows (writer `spiffe://<td>/sigil/server`): what the CA did and refused.
        case caInitialized = "ca_initialized", certificateIssued = "certificate_issued", certificateRefused = "certificate_refused"
        case certificateRevoked = "certificate_revoked", joinTokenCreated = "join_token_created", joinTokenRefused = "join_token_refused"
        case agentAttested = "agent_attested", agentEvicted = "agent_evicted", entryCreated = "entry_created", entryDeleted = "entry_deleted"
        case authorityChanged = "authority_changed", ledgerPruned = "ledger_pruned"
        /// The first row of a proxy spool that was started over once every row before it was shipped.
        case spoolRotated = "spool_rotated"
    }

    public var kind: Kind
    /// Unix time in microseconds.
    public var timeMicros: Int64
    /// The caller's SPIFFE ID (nil: plaintext caller).
    public var source: String?
    /// The callee's SPIFFE ID (the proxy's own identity on inbound).
    public var destination: String?
    /// Serial (hex) of the caller's certificate.
    public var peerSerial: String?
    public var sourceIP: String?
    public var port: Int?
    /// `http/1.1`, `h2`, `tcp`.
    public var proto: String?
    public var method: String?
    public var path: String?
    public var host: String?
    public var status: Int?
    /// `allow` or `deny` (nil for events).
    public var decision: String?
    public var policy: String?
    public var rule: Int?
    public var mtls: Bool
    public var bytesIn: Int
    public var bytesOut: Int
    public var durationMicros: Int64
    /// Free text for events (what changed, why).
    public var detail: String?

    public init(kind: Kind, timeMicros: Int64, source: String? = nil, destination: String? = nil, peerSerial: String? = nil,
                sourceIP: String? = nil, port: Int? = nil, proto: String? = nil, method: String? = nil, path: String? = nil,
                host: String? = nil, status: Int? = nil, decision: String? = nil, policy: String? = nil, rule: Int? = nil,
                mtls: Bool = false, bytesIn: Int = 0, bytesOut: Int = 0, durationMicros: Int64 = 0, detail: String? = nil) {
        self.kind = kind
        self.timeMicros = timeMicros
        self.source = source
        self.destination = destination
        self.peerSerial = peerSerial
        self.sourceIP = sourceIP
        self.port = port
        self.proto = proto
        self.method = method
        self.path = path
        self.host = host
        self.status = status
        self.decision = decision
        self.policy = policy
        self.rule = rule
        self.mtls = mtls
        self.bytesIn = bytesIn
        self.bytesOut = bytesOut
        self.durationMicros = durationMicros
        self.detail = detail
    }

    /// The row as one JSON object (no trailing newline), fields in a fixed order, with the writer's
    /// sequence number and the hash of its previous row. The writer appends `hash` over exactly
    /// these bytes.
    public func json(writer: String, seq: UInt64, prev: String) -> String {
        var bytes: [UInt8] = []
        appendJSON(to: &bytes, writer: writer, seq: seq, prev: prev)
        return String(decoding: bytes, as: UTF8.self)
    }

    /// ``json(writer:seq:prev:)`` appended to a byte buffer: head, body and tail, the same bytes
    /// the spool writes.
    public func appendJSON(to out: inout [UInt8], writer: String, seq: UInt64, prev: String) {
        Self.appendHead(to: &out, writer: writer)
        appendBody(to: &out)
        Self.appendTail(to: &out, seq: seq, prev: Array(prev.utf8))
    }

    /// The row's first field: `{"writer":…`.
    public static func appendHead(to out: inout [UInt8], writer: String) {
        JSONText.appendRaw("{\"writer\":", to: &out)
        JSONText.appendString(writer, to: &out)
    }

    /// The row's last fields, the only ones that depend on the rows before it:
    /// `,"seq":N,"prev":"<hex>"` (the object stays open for the writer's `hash`). They come last
    /// so that everything before them can be hashed before the writer takes its chain's lock
    /// (``LedgerChain``).
    public static func appendTail(to out: inout [UInt8], seq: UInt64, prev: [UInt8]) {
        JSONText.appendRaw(",\"seq\":", to: &out)
        JSONText.appendDecimal(seq, to: &out)
        JSONText.appendRaw(",\"prev\":\"", to: &out)
        out.append(contentsOf: prev)
        out.append(0x22)
    }

    /// Every field that belongs to the row itself (`,"source":…` to `,"detail":…`), in the fixed
    /// order, without `writer`, `seq` and `prev`: what a writer serializes before it takes its
    /// chain's lock. Who called whom comes first, the same for every request of one connection: a
    /// proxy serializes that part once per connection and hashes it once
    /// (``appendBodyParties(to:source:destination:peerSerial:sourceIP:port:)``), then the rest per
    /// request (``appendBodyStart(to:kind:timeMicros:)``,
    /// ``appendBodyRest(to:proto:method:path:host:status:decision:policy:rule:mtls:bytesIn:bytesOut:durationMicros:detail:)``).
    public func appendBody(to out: inout [UInt8]) {
        Self.appendBodyParties(to: &out, source: source, destination: destination, peerSerial: peerSerial, sourceIP: sourceIP, port: port)
        Self.appendBodyStart(to: &out, kind: kind, timeMicros: timeMicros)
        Self.appendBodyRest(to: &out, proto: proto, method: method, path: path, host: host, status: status, decision: decision,
                            policy: policy, rule: rule, mtls: mtls, bytesIn: bytesIn, bytesOut: bytesOut,
                            durationMicros: durationMicros, detail: detail)
    }

    /// The body's second part: `,"time":…,"kind":…`.
    public static func appendBodyStart(to out: inout [UInt8], kind: Kind, timeMicros: Int64) {
        JSONText.appendRaw(",\"time\":\"", to: &out)
        RFC3339.append(micros: timeMicros, to: &out)
        out.append(0x22)
        JSONText.appendField(",\"kind\":", kind.rawValue, to: &out)
    }

    /// The body's first part, who called whom: `,"source":…` to `,"port":…`. The same for every
    /// request of one connection: a proxy serializes it once per connection.
    public static func appendBodyParties(to out: inout [UInt8], source: String?, destination: String?, peerSerial: String?,
                                         sourceIP: String?, port: Int?) {
        JSONText.appendField(",\"source\":", source, to: &out)
        JSONText.appendField(",\"destination\":", destination, to: &out)
        JSONText.appendField(",\"peer_serial\":", peerSerial, to: &out)
        JSONText.appendField(",\"source_ip\":", sourceIP, to: &out)
        JSONText.appendField(",\"port\":", port, to: &out)
    }

    /// The body's last part: `,"protocol":…` to `,"detail":…`.
    public static func appendBodyRest(to out: inout [UInt8], proto: String?, method: String?, path: String?, host: String?,
                                      status: Int?, decision: String?, policy: String?, rule: Int?, mtls: Bool,
                                      bytesIn: Int, bytesOut: Int, durationMicros: Int64, detail: String?) {
        JSONText.appendField(",\"protocol\":", proto, to: &out)
        JSONText.appendField(",\"method\":", method, to: &out)
        JSONText.appendField(",\"path\":", path, to: &out)
        JSONText.appendField(",\"host\":", host, to: &out)
        JSONText.appendField(",\"status\":", status, to: &out)
        JSONText.appendField(",\"decision\":", decision, to: &out)
        JSONText.appendField(",\"policy\":", policy, to: &out)
        JSONText.appendField(",\"rule\":", rule, to: &out)
        JSONText.appendRaw(mtls ? ",\"mtls\":true" : ",\"mtls\":false", to: &out)
        JSONText.appendField(",\"bytes_in\":", bytesIn, to: &out)
        JSONText.appendField(",\"bytes_out\":", bytesOut, to: &out)
        JSONText.appendRaw(",\"duration_us\":", to: &out)
        JSONText.appendDecimal(durationMicros, to: &out)
        JSONText.appendField(",\"detail\":", detail, to: &out)
    }
}

/// JSON string escaping (RFC 8259): quotes, backslash and control characters.
public enum JSONText {
    public static func appendString(_ value: String, to out: inout String) {
        out += "\""
        var plain = true
        for unit in value.utf8 where unit < 0x20 || unit == 0x22 || unit == 0x5C || unit == 0x7F {
            plain = false
            break
        }
        if plain {
            out += value
        } else {
            for scalar in value.unicodeScalars {
                switch scalar {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                case "\n": out += "\\n"
                case "\r": out += "\\r"
                case "\t": out += "\\t"
                default:
                    if scalar.value < 0x20 || scalar.value == 0x7F {
                        let h = String(scalar.value, radix: 16)
                        out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
                    } else {
                        out.unicodeScalars.append(scalar)
                    }
                }
            }
        }
        out += "\""
    }

    /// The same escaping, appended as UTF-8 bytes.
    public static func appendString(_ value: String, to out: inout [UInt8]) {
        out.append(0x22)
        var value = value
        value.withUTF8 { utf8 in
            // The common case (nothing to escape) is one copy.
            var plain = true
            for unit in utf8 where unit < 0x20 || unit == 0x22 || unit == 0x5C || unit == 0x7F {
                plain = false
                break
            }
            if plain {
                out.append(contentsOf: utf8)
                return
            }
            for unit in utf8 {
                switch unit {
                case 0x22: out.append(0x5C); out.append(0x22)
                case 0x5C: out.append(0x5C); out.append(0x5C)
                case 0x0A: out.append(0x5C); out.append(0x6E)
                case 0x0D: out.append(0x5C); out.append(0x72)
                case 0x09: out.append(0x5C); out.append(0x74)
                case 0..<0x20, 0x7F:  // DEL too: a row stays printable
                    out.append(contentsOf: [0x5C, 0x75, 0x30, 0x30, hexDigit(unit >> 4), hexDigit(unit & 0xF)])
                default: out.append(unit)
                }
            }
        }
        out.append(0x22)
    }

    @inline(__always)
    static func hexDigit(_ nibble: UInt8) -> UInt8 { nibble < 10 ? 0x30 + nibble : 0x57 + nibble }

    /// Bytes of a static string, appended as they are (keys, literals).
    @inline(__always)
    public static func appendRaw(_ text: StaticString, to out: inout [UInt8]) {
        text.withUTF8Buffer { out.append(contentsOf: $0) }
    }

    /// `key` then the value as a JSON string, or `null`.
    public static func appendField(_ key: StaticString, _ value: String?, to out: inout [UInt8]) {
        appendRaw(key, to: &out)
        if let value { appendString(value, to: &out) } else { appendRaw("null", to: &out) }
    }

    /// `key` then the value in decimal, or `null`.
    public static func appendField(_ key: StaticString, _ value: Int?, to out: inout [UInt8]) {
        appendRaw(key, to: &out)
        if let value { appendDecimal(Int64(value), to: &out) } else { appendRaw("null", to: &out) }
    }

    /// A signed integer in decimal, without building a String.
    public static func appendDecimal(_ value: Int64, to out: inout [UInt8]) {
        if value < 0 {
            out.append(0x2D)
            appendDecimal(value.magnitude, to: &out)
        } else {
            appendDecimal(UInt64(value), to: &out)
        }
    }

    public static func appendDecimal(_ value: UInt64, to out: inout [UInt8]) {
        var digits: (UInt64, Int) = (value, 0)
        var scratch: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                      UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        withUnsafeMutableBytes(of: &scratch) { buf in
            repeat {
                digits.1 += 1
                buf[20 - digits.1] = 0x30 + UInt8(digits.0 % 10)
                digits.0 /= 10
            } while digits.0 > 0
            out.append(contentsOf: UnsafeRawBufferPointer(rebasing: buf[(20 - digits.1)...]))
        }
    }

    /// Lowercase hex of some bytes, appended as ASCII.
    public static func appendHex<Bytes: Sequence>(_ bytes: Bytes, to out: inout [UInt8]) where Bytes.Element == UInt8 {
        let contiguous: Bool? = bytes.withContiguousStorageIfAvailable { appendHex(UnsafeRawBufferPointer($0), to: &out); return true }
        if contiguous != true { Array(bytes).withUnsafeBytes { appendHex($0, to: &out) } }
    }

    /// The same for raw bytes (a digest's `withUnsafeBytes`): written into scratch space, then
    /// appended at once (no per-byte append, no generic dispatch).
    public static func appendHex(_ bytes: UnsafeRawBufferPointer, to out: inout [UInt8]) {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 2 * bytes.count) { hex in
            for (i, b) in bytes.enumerated() {
                hex[2 * i] = hexDigit(b >> 4)
                hex[2 * i + 1] = hexDigit(b & 0x0F)
            }
            out.append(contentsOf: hex)
        }
    }

    public static func quoted(_ value: String) -> String {
        var out = ""
        appendString(value, to: &out)
        return out
    }
}

/// RFC 3339 timestamps in UTC with microseconds, without Foundation.
public enum RFC3339 {
    public static func format(micros: Int64) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(27)
        append(micros: micros, to: &out)
        return String(decoding: out, as: UTF8.self)
    }

    /// `YYYY-MM-DDTHH:MM:SS.ffffffZ` appended as ASCII (the ledger's hot path: no String).
    public static func append(micros: Int64, to out: inout [UInt8]) {
        // Floor division that cannot overflow (Int64.min included).
        let seconds = micros >= 0 ? micros / 1_000_000 : -((-(micros + 1)) / 1_000_000) - 1
        let remainder = Int(micros % 1_000_000)
        let fraction = remainder < 0 ? remainder + 1_000_000 : remainder
        let days = seconds >= 0 ? seconds / 86_400 : (seconds - 86_399) / 86_400
        let secondOfDay = Int(seconds - days * 86_400)
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yoe + era * 400 + (month <= 2 ? 1 : 0)
        appendYear(Int(year), to: &out)
        // The rest, 23 fixed-width bytes, written into scratch space and appended at once.
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 23) { text in
            func put(_ v: Int, at start: Int, width: Int) {
                var v = v
                for i in stride(from: start + width - 1, through: start, by: -1) {
                    text[i] = 0x30 + UInt8(v % 10)
                    v /= 10
                }
            }
            text[0] = 0x2D; put(Int(month), at: 1, width: 2)
            text[3] = 0x2D; put(Int(day), at: 4, width: 2)
            text[6] = 0x54; put(secondOfDay / 3600, at: 7, width: 2)
            text[9] = 0x3A; put(secondOfDay / 60 % 60, at: 10, width: 2)
            text[12] = 0x3A; put(secondOfDay % 60, at: 13, width: 2)
            text[15] = 0x2E; put(fraction, at: 16, width: 6)
            text[22] = 0x5A
            out.append(contentsOf: text)
        }
    }

    /// Four digits for 0...9999; outside it (never a ledger's time, never a crash) a sign and at
    /// least four digits.
    private static func appendYear(_ year: Int, to out: inout [UInt8]) {
        if year < 0 { out.append(0x2D) }
        let magnitude = year.magnitude
        if magnitude > 9999 {
            JSONText.appendDecimal(UInt64(magnitude), to: &out)
            return
        }
        out.append(0x30 + UInt8(magnitude / 1000))
        out.append(0x30 + UInt8(magnitude / 100 % 10))
        out.append(0x30 + UInt8(magnitude / 10 % 10))
        out.append(0x30 + UInt8(magnitude % 10))
    }
}
