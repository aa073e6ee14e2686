/// A SPIFFE trust domain name: the authority part of a SPIFFE ID (`spiffe://<trust-domain>/...`).
///
/// Validated by the rules of the SPIFFE-ID specification, section 2.1: lowercase letters, digits,
/// dots, dashes and underscores only; no port, no userinfo; at most 255 bytes.
public struct TrustDomain: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The trust domain name, e.g. `cluster.local`.
    public let name: String

    /// The longest trust domain name the SPIFFE-ID spec allows, in bytes.
    public static let maximumLength = 255

    /// Parses a bare trust domain name (`example.org`) or a SPIFFE ID whose trust domain is taken
    /// (`spiffe://example.org` or `spiffe://example.org/any/path`).
    public init(_ string: String) throws(SigilError) {
        if string.hasPrefix(SpiffeID.scheme) {
            self = try SpiffeID(string).trustDomain
            return
        }
        try TrustDomain.validate(name: string)
        self.name = string
    }

    init(validatedName: String) {
        self.name = validatedName
    }

    /// The SPIFFE ID of the trust domain itself (`spiffe://<name>`, no path), carried by CA certificates.
    public var id: SpiffeID { SpiffeID(trustDomain: self, validatedPath: "") }

    public var description: String { name }

    public static func < (lhs: TrustDomain, rhs: TrustDomain) -> Bool { lhs.name < rhs.name }

    static func validate(name: String) throws(SigilError) {
        let bytes = name.utf8
        if bytes.isEmpty {
            throw SigilError(.invalidTrustDomain, "trust domain is missing: a SPIFFE ID needs a trust domain name after 'spiffe://'")
        }
        if bytes.count > maximumLength {
            throw SigilError(.invalidTrustDomain, "trust domain is \(bytes.count) bytes long; the SPIFFE-ID spec allows at most \(maximumLength)")
        }
        for byte in bytes where !isTrustDomainByte(byte) {
            if byte == UInt8(ascii: ":") {
                throw SigilError(.invalidTrustDomain, "trust domain '\(name)' contains ':'; a SPIFFE ID must not carry a port")
            }
            if byte == UInt8(ascii: "@") {
                throw SigilError(.invalidTrustDomain, "trust domain '\(name)' contains '@'; a SPIFFE ID must not carry userinfo")
            }
            if byte == UInt8(ascii: "%") {
                throw SigilError(.invalidTrustDomain, "trust domain '\(name)' contains '%'; percent-encoding is not allowed in a SPIFFE ID")
            }
            if byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") {
                throw SigilError(.invalidTrustDomain, "trust domain '\(name)' has an uppercase letter; trust domain names must be lowercase")
            }
            throw SigilError(.invalidTrustDomain, "trust domain '\(name)' has the character \(describe(byte)); trust domain characters are limited to lowercase letters, digits, dots, dashes and underscores")
        }
    }

    static func isTrustDomainByte(_ b: UInt8) -> Bool {
        (b >= UInt8(ascii: "a") && b <= UInt8(ascii: "z")) || (b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9"))
            || b == UInt8(ascii: ".") || b == UInt8(ascii: "-") || b == UInt8(ascii: "_")
    }
}

/// A SPIFFE ID: `spiffe://<trust-domain><path>`, validated against every MUST of the SPIFFE-ID spec.
///
/// Sigil names workloads in Istio's form, `spiffe://<td>/ns/<namespace>/sa/<service-account>`; the
/// helpers ``namespace``, ``serviceAccount`` and ``istioPrincipal`` read that form, and
/// ``init(istioPrincipal:)`` builds an ID from an Istio principal (`<td>/ns/<ns>/sa/<sa>`).
public struct SpiffeID: Hashable, Sendable, Comparable, CustomStringConvertible {
    public static let scheme = "spiffe://"
    /// The longest SPIFFE ID the spec allows, in bytes.
    public static let maximumLength = 2048

    public let trustDomain: TrustDomain
    /// The path, empty or starting with `/` (never ending with one).
    public let path: String

    /// Parses and validates a SPIFFE ID. Each rejection names the rule of the spec that was broken.
    public init(_ string: String) throws(SigilError) {
        let bytes = Array(string.utf8)
        if bytes.isEmpty {
            throw SigilError(.invalidSpiffeID, "SPIFFE ID is empty")
        }
        if bytes.count > SpiffeID.maximumLength {
            throw SigilError(.invalidSpiffeID, "SPIFFE ID is \(bytes.count) bytes long; the spec allows at most \(SpiffeID.maximumLength)")
        }
        let schemeBytes = Array(SpiffeID.scheme.utf8)
        guard bytes.starts(with: schemeBytes) else {
            throw SigilError(.invalidSpiffeID, "'\(string)' does not start with 'spiffe://'; the scheme must be 'spiffe' (lowercase) followed by '://'")
        }
        let rest = bytes[schemeBytes.count...]
        let slash = rest.firstIndex(of: UInt8(ascii: "/")) ?? rest.endIndex
        let authority = rest[rest.startIndex..<slash]
        let path = rest[slash...]

        // Query and fragment are forbidden anywhere; report them before the character rules would.
        if bytes.contains(UInt8(ascii: "?")) {
            throw SigilError(.invalidSpiffeID, "'\(string)' has a query ('?'); a SPIFFE ID must not have a query")
        }
        if bytes.contains(UInt8(ascii: "#")) {
            throw SigilError(.invalidSpiffeID, "'\(string)' has a fragment ('#'); a SPIFFE ID must not have a fragment")
        }
        let td: String
        do {
            td = String(decoding: authority, as: UTF8.self)
            try TrustDomain.validate(name: td)
        } catch {
            throw SigilError(.invalidSpiffeID, "invalid SPIFFE ID '\(string)': \(error.message)")
        }
        let pathString = String(decoding: path, as: UTF8.self)
        try SpiffeID.validate(path: pathString, in: string)
        self.trustDomain = TrustDomain(validatedName: td)
        self.path = pathString
    }

    /// Builds an ID from a trust domain and a path such as `/ns/default/sa/web` (validated).
    public init(trustDomain: TrustDomain, path: String) throws(SigilError) {
        let full = SpiffeID.scheme + trustDomain.name + path
        if full.utf8.count > SpiffeID.maximumLength {
            throw SigilError(.invalidSpiffeID, "SPIFFE ID is \(full.utf8.count) bytes long; the spec allows at most \(SpiffeID.maximumLength)")
        }
        try SpiffeID.validate(path: path, in: full)
        self.trustDomain = trustDomain
        self.path = path
    }

    init(trustDomain: TrustDomain, validatedPath: String) {
        self.trustDomain = trustDomain
        self.path = validatedPath
    }

    /// The ID of workload `serviceAccount` in `namespace`: `spiffe://<td>/ns/<namespace>/sa/<serviceAccount>`.
    public init(trustDomain: TrustDomain, namespace: String, serviceAccount: String) throws(SigilError) {
        for (what, value) in [("namespace", namespace), ("service account", serviceAccount)] where value.isEmpty || value.contains("/") {
            throw SigilError(.invalidSpiffeID, "\(what) '\(value)' must be one non-empty path segment (no '/')")
        }
        try self.init(trustDomain: trustDomain, path: "/ns/\(namespace)/sa/\(serviceAccount)")
    }

    /// Parses an Istio principal (`cluster.local/ns/default/sa/web`) or a full SPIFFE ID.
    public init(istioPrincipal: String) throws(SigilError) {
        if istioPrincipal.hasPrefix(SpiffeID.scheme) {
            try self.init(istioPrincipal)
        } else {
            try self.init(SpiffeID.scheme + istioPrincipal)
        }
    }

    /// The textual form, `spiffe://<td><path>`.
    public var description: String { SpiffeID.scheme + trustDomain.name + path }

    /// Istio's principal form: the ID without its scheme (`cluster.local/ns/default/sa/web`).
    public var istioPrincipal: String { trustDomain.name + path }

    /// Whether this is the ID of a trust domain itself (no path), as carried by CA certificates.
    public var isTrustDomainID: Bool { path.isEmpty }

    /// The path's segments (`["ns", "default", "sa", "web"]`).
    public var segments: [Substring] { path.split(separator: "/", omittingEmptySubsequences: true) }

    /// The namespace of an Istio-form ID (`/ns/<namespace>/sa/<sa>`), or nil for any other shape.
    public var namespace: String? {
        let s = segments
        guard s.count == 4, s[0] == "ns", s[2] == "sa" else { return nil }
        return String(s[1])
    }

    /// The service account of an Istio-form ID (`/ns/<namespace>/sa/<sa>`), or nil for any other shape.
    public var serviceAccount: String? {
        let s = segments
        guard s.count == 4, s[0] == "ns", s[2] == "sa" else { return nil }
        return String(s[3])
    }

    /// Whether the ID belongs to `trustDomain`.
    public func isMember(of trustDomain: TrustDomain) -> Bool { self.trustDomain == trustDomain }

    public static func < (lhs: SpiffeID, rhs: SpiffeID) -> Bool { lhs.description < rhs.description }

    static func validate(path: String, in whole: String) throws(SigilError) {
        let bytes = Array(path.utf8)
        if bytes.isEmpty { return }
        guard bytes[0] == UInt8(ascii: "/") else {
            throw SigilError(.invalidSpiffeID, "path '\(path)' of '\(whole)' must start with '/'")
        }
        var segmentStart = 1
        var index = 1
        while index <= bytes.count {
            if index == bytes.count || bytes[index] == UInt8(ascii: "/") {
                let segment = bytes[segmentStart..<index]
                if segment.isEmpty {
                    if index == bytes.count {
                        throw SigilError(.invalidSpiffeID, "'\(whole)' ends with '/'; a SPIFFE ID path must not have a trailing slash")
                    }
                    throw SigilError(.invalidSpiffeID, "'\(whole)' has an empty path segment ('//'); empty segments are not allowed")
                }
                if segment.elementsEqual([UInt8(ascii: ".")]) || segment.elementsEqual([UInt8(ascii: "."), UInt8(ascii: ".")]) {
                    throw SigilError(.invalidSpiffeID, "'\(whole)' has a '\(String(decoding: segment, as: UTF8.self))' path segment; dot segments are not allowed")
                }
                segmentStart = index + 1
            } else {
                let b = bytes[index]
                if !isPathByte(b) {
                    if b == UInt8(ascii: "%") {
                        throw SigilError(.invalidSpiffeID, "'\(whole)' contains '%'; percent-encoding is not allowed in a SPIFFE ID path")
                    }
                    throw SigilError(.invalidSpiffeID, "'\(whole)' has the character \(describe(b)) in its path; path segment characters are limited to letters, digits, dots, dashes and underscores")
                }
            }
            index += 1
        }
    }

    static func isPathByte(_ b: UInt8) -> Bool {
        (b >= UInt8(ascii: "a") && b <= UInt8(ascii: "z")) || (b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z"))
            || (b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9"))
            || b == UInt8(ascii: ".") || b == UInt8(ascii: "-") || b == UInt8(ascii: "_")
    }
}

/// Describes a byte for an error message: printable ASCII quoted, anything else in hex.
func describe(_ byte: UInt8) -> String {
    if byte >= 0x21 && byte < 0x7f { return "'\(Character(Unicode.Scalar(byte)))'" }
    if byte == 0x20 { return "' ' (space)" }
    let hex = String(byte, radix: 16, uppercase: true)
    return "0x" + (hex.count == 1 ? "0" + hex : hex)
}
