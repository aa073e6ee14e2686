/// Istio's default request-target normalization (meshConfig.pathNormalization BASE, see
/// istio.io/latest/docs/reference/config/security/normalization): the normalized target is what
/// authorization sees and what the app receives, so `/%61dmin`, `/x/../admin`, `/x\\..\\admin` and
/// `http://h/admin` cannot slip past a `paths`/`notPaths` rule and still reach `/admin` in the app.
/// Percent-encoded unreserved characters are decoded once; `%00` is refused; a backslash becomes a slash;
/// dot segments are removed (RFC 3986 5.2.4); slashes are not merged (that is MERGE_SLASHES); the query
/// is kept as sent. An absolute-form target (`http://host/p`) becomes `/p` with its authority as the host.
public enum RequestTarget {
    /// Istio's `meshConfig.pathNormalization` levels (NONE, which authorizes one path and sends the
    /// app another, is not offered).
    public enum Normalization: String, Sendable, CaseIterable {
        /// RFC 3986 normalization as described above (Istio's default).
        case base = "BASE"
        /// BASE, then runs of slashes become one (`/a//b` → `/a/b`).
        case mergeSlashes = "MERGE_SLASHES"
        /// `%2F` and `%5C` (any case) are decoded to slashes first, then MERGE_SLASHES: what Istio
        /// recommends when policies match paths (CVE-2021-31920), since apps and front proxies
        /// often decode or merge them.
        case decodeAndMergeSlashes = "DECODE_AND_MERGE_SLASHES"

        public init?(flag text: String) {
            self.init(rawValue: text.uppercased())
        }

        var mergesSlashes: Bool { self != .base }
    }

    /// nil: answer 400.
    public static func normalize(_ uri: String, _ mode: Normalization = .base) -> (uri: String, authority: String?)? {
        if uri == "*" { return (uri, nil) }
        // A fragment is never part of a request target (RFC 9112 §3.2): Envoy refuses it, and an
        // app that kept `/x#/../admin` as its path would see what `/x` was authorized for.
        if uri.utf8.contains(UInt8(ascii: "#")) { return nil }
        if isAlreadyNormal(uri, mergingSlashes: mode.mergesSlashes) { return (uri, nil) }  // the common case: no allocation
        var rest = Substring(uri)
        var authority: String?
        let lower = uri.lowercased()
        let schemeLength = lower.hasPrefix("http://") ? 7 : lower.hasPrefix("https://") ? 8 : 0
        if schemeLength > 0 {
            let afterScheme = uri.dropFirst(schemeLength)
            let pathStart = afterScheme.firstIndex { $0 == "/" || $0 == "?" } ?? afterScheme.endIndex
            authority = String(afterScheme[..<pathStart])
            rest = afterScheme[pathStart...]
            if !rest.hasPrefix("/") { rest = Substring("/" + rest) }
        }
        guard rest.hasPrefix("/") else { return nil }
        let queryStart = rest.firstIndex { $0 == "?" } ?? rest.endIndex
        guard let path = normalizePath(Array(rest[..<queryStart].utf8), mode) else { return nil }
        return (path + rest[queryStart...], authority)
    }

    public static func normalizePath(_ bytes: [UInt8], _ mode: Normalization = .base) -> String? {
        var decoded: [UInt8] = []
        decoded.reserveCapacity(bytes.count)
        var i = 0
        while i < bytes.count {
            let byte = bytes[i]
            if byte == UInt8(ascii: "%"), i + 2 < bytes.count, let hi = hexValue(bytes[i + 1]), let lo = hexValue(bytes[i + 2]) {
                let c = hi << 4 | lo
                if c == 0 { return nil }
                if isUnreserved(c) {
                    decoded.append(c)
                } else if mode == .decodeAndMergeSlashes, c == UInt8(ascii: "/") || c == UInt8(ascii: "\\") {
                    decoded.append(UInt8(ascii: "/"))
                } else {
                    decoded.append(contentsOf: bytes[i...(i + 2)])
                }
                i += 3
                continue
            }
            decoded.append(byte == UInt8(ascii: "\\") ? UInt8(ascii: "/") : byte)
            i += 1
        }
        let segments = decoded.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: false)
        var output: [ArraySlice<UInt8>] = []
        for (index, segment) in segments.enumerated().dropFirst() {
            let last = index == segments.count - 1
            if segment.elementsEqual([0x2E]) {
                if last { output.append([]) }
            } else if segment.elementsEqual([0x2E, 0x2E]) {
                if !output.isEmpty { output.removeLast() }
                if last { output.append([]) }
            } else {
                output.append(segment)
            }
        }
        if mode.mergesSlashes {
            // After the dot segments, as Envoy merges after normalizing: empty segments go, but a
            // trailing slash stays.
            let trailing = output.last?.isEmpty == true
            output.removeAll { $0.isEmpty }
            if trailing { output.append([]) }
        }
        return "/" + output.map { String(decoding: $0, as: UTF8.self) }.joined(separator: "/")
    }

    /// Origin-form with nothing to rewrite: no `%`, no backslash, no dot segment (and, when
    /// merging slashes, no `//`).
    static func isAlreadyNormal(_ uri: String, mergingSlashes: Bool = false) -> Bool {
        var previous: UInt8 = 0
        var first = true
        for byte in uri.utf8 {
            if first {
                guard byte == UInt8(ascii: "/") else { return false }
                first = false
            }
            if byte == UInt8(ascii: "?") { return true }
            if byte == UInt8(ascii: "%") || byte == UInt8(ascii: "\\") { return false }
            if byte == UInt8(ascii: ".") && previous == UInt8(ascii: "/") { return false }
            if mergingSlashes, byte == UInt8(ascii: "/"), previous == UInt8(ascii: "/") { return false }
            previous = byte
        }
        return !first
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    private static func isUnreserved(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
            return true
        default:
            return false
        }
    }
}

