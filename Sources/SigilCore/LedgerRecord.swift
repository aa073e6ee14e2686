/// One row of the who-called-whom ledger: a proxied request (or TCP connection), or an event
/// that changes what the proxy enforces (policy reload, kill switch). Written as one JSON object
/// per line; the writer adds `seq` (monotonic per writer) and a SHA-256 chain (`prev`, `hash`).
public struct LedgerRecord: Sendable, Hashable {
    public enum Kind: String, Sendable {
        case request, connection, policyReload = "policy_reload", policyRejected = "policy_rejected"
        case killSwitchOn = "kill_switch_on", killSwitchOff = "kill_switch_off", identity
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
    /// sequence number and the hash of its previous row. `hash` is appended by the writer over
    /// exactly these bytes.
    public func json(writer: String, seq: UInt64, prev: String) -> String {
        var out = "{\"writer\":"
        out.reserveCapacity(384)
        JSONText.appendString(writer, to: &out)
        out += ",\"seq\":\(seq),\"time\":"
        JSONText.appendString(RFC3339.format(micros: timeMicros), to: &out)
        out += ",\"kind\":\"\(kind.rawValue)\""
        func field(_ name: String, _ value: String?) {
            out += ",\"\(name)\":"
            if let value { JSONText.appendString(value, to: &out) } else { out += "null" }
        }
        func number(_ name: String, _ value: Int?) {
            out += ",\"\(name)\":" + (value.map(String.init) ?? "null")
        }
        field("source", source)
        field("destination", destination)
        field("peer_serial", peerSerial)
        field("source_ip", sourceIP)
        number("port", port)
        field("protocol", proto)
        field("method", method)
        field("path", path)
        field("host", host)
        number("status", status)
        field("decision", decision)
        field("policy", policy)
        number("rule", rule)
        out += ",\"mtls\":\(mtls),\"bytes_in\":\(bytesIn),\"bytes_out\":\(bytesOut),\"duration_us\":\(durationMicros)"
        field("detail", detail)
        out += ",\"prev\":\"\(prev)\""
        return out
    }
}

/// JSON string escaping (RFC 8259): quotes, backslash and control characters.
public enum JSONText {
    public static func appendString(_ value: String, to out: inout String) {
        out += "\""
        var plain = true
        for unit in value.utf8 where unit < 0x20 || unit == 0x22 || unit == 0x5C {
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
                    if scalar.value < 0x20 {
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

    public static func quoted(_ value: String) -> String {
        var out = ""
        appendString(value, to: &out)
        return out
    }
}

/// RFC 3339 timestamps in UTC with microseconds, without Foundation.
public enum RFC3339 {
    public static func format(micros: Int64) -> String {
        let seconds = micros >= 0 ? micros / 1_000_000 : (micros - 999_999) / 1_000_000
        let fraction = Int(micros - seconds * 1_000_000)
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
        func pad(_ v: Int, _ width: Int) -> String {
            let s = String(v)
            return s.count >= width ? s : String(repeating: "0", count: width - s.count) + s
        }
        return "\(pad(Int(year), 4))-\(pad(Int(month), 2))-\(pad(Int(day), 2))T\(pad(secondOfDay / 3600, 2)):\(pad(secondOfDay / 60 % 60, 2)):\(pad(secondOfDay % 60, 2)).\(pad(fraction, 6))Z"
    }
}
