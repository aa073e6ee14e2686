/// Istio's AuthorizationPolicy (security.istio.io/v1 and v1beta1), as a value: the fields Sigil
/// enforces, named as Istio names them. Loaded from YAML by SigilPolicy; evaluated by
/// ``PolicyEvaluator``.
public struct AuthorizationPolicy: Sendable, Hashable {
    public enum Action: String, Sendable, Hashable {
        case allow = "ALLOW", deny = "DENY", audit = "AUDIT"
    }

    public var name: String
    public var namespace: String
    /// `selector.matchLabels`; nil for a policy that applies to every workload in its namespace.
    public var matchLabels: [String: String]?
    public var action: Action
    /// Empty for `spec: {}` / no `rules:` (matches nothing); `[Rule()]` for `rules: [{}]` (matches all).
    public var rules: [Rule]
    /// The `istio.io/dry-run: "true"` annotation: evaluated and reported like an AUDIT policy,
    /// never enforced (and an ALLOW in dry run does not make other requests denied).
    public var dryRun: Bool

    public init(name: String, namespace: String, matchLabels: [String: String]? = nil, action: Action = .allow, rules: [Rule] = [],
                dryRun: Bool = false) {
        self.name = name
        self.namespace = namespace
        self.matchLabels = matchLabels
        self.action = action
        self.rules = rules
        self.dryRun = dryRun
    }

    /// `namespace/name`, as decisions name their policy.
    public var qualifiedName: String { namespace + "/" + name }

    /// One rule: a request matches when at least one `from`, one `to` and every `when` match
    /// (an empty list matches anything).
    public struct Rule: Sendable, Hashable {
        public var from: [Source]
        public var to: [Operation]
        public var when: [Condition]

        public init(from: [Source] = [], to: [Operation] = [], when: [Condition] = []) {
            self.from = from
            self.to = to
            self.when = when
        }
    }

    /// `from.source`: every field set must match (values within a field are alternatives).
    public struct Source: Sendable, Hashable {
        public var principals: [String]?
        public var notPrincipals: [String]?
        public var namespaces: [String]?
        public var notNamespaces: [String]?
        public var ipBlocks: [String]?
        public var notIpBlocks: [String]?
        public var remoteIpBlocks: [String]?
        public var notRemoteIpBlocks: [String]?
        public init() {}
    }

    /// `to.operation`.
    public struct Operation: Sendable, Hashable {
        public var hosts: [String]?
        public var notHosts: [String]?
        public var ports: [String]?
        public var notPorts: [String]?
        public var methods: [String]?
        public var notMethods: [String]?
        public var paths: [String]?
        public var notPaths: [String]?
        public init() {}

        var usesHTTPFields: Bool {
            hosts != nil || notHosts != nil || methods != nil || notMethods != nil || paths != nil || notPaths != nil
        }
    }

    /// `when`: `key` with `values` (one must match) and/or `notValues` (none may match).
    public struct Condition: Sendable, Hashable {
        public var key: String
        public var values: [String]?
        public var notValues: [String]?

        public init(key: String, values: [String]? = nil, notValues: [String]? = nil) {
            self.key = key
            self.values = values
            self.notValues = notValues
        }

        /// The keys Sigil evaluates (`request.headers[<name>]` stands for any header).
        public static let supportedKeys: Set<String> = [
            "source.ip", "remote.ip", "source.namespace", "source.principal", "destination.ip", "destination.port",
        ]

        public static func isSupported(_ key: String) -> Bool {
            supportedKeys.contains(key) || headerName(key) != nil
        }

        /// The header name of a `request.headers[<name>]` key.
        public static func headerName(_ key: String) -> String? {
            guard key.hasPrefix("request.headers["), key.hasSuffix("]"), key.count > "request.headers[]".count else { return nil }
            return String(key.dropFirst("request.headers[".count).dropLast())
        }

        var usesHTTPFields: Bool { Condition.headerName(key) != nil }
    }
}

extension AuthorizationPolicy {
    /// The lowercased names of the request headers `policies` read, sorted: what a proxy collects
    /// from each request for ``AuthorizationRequest/headers``. Pseudo-headers and `host` are not
    /// among them (they are the request's own fields: ``AuthorizationRequest/headerValue(_:)``);
    /// `X-Forwarded-For` is when a rule reads the
    /// remote address (``AuthorizationRequest/remoteAddress``).
    public static func headerNamesRead(by policies: [AuthorizationPolicy]) -> [String] {
        var names = Set<String>()
        for rule in policies.lazy.flatMap(\.rules) {
            for condition in rule.when {
                if condition.key == "remote.ip" { names.insert("x-forwarded-for") }
                guard let name = Condition.headerName(condition.key)?.lowercased() else { continue }
                if name.utf8.first != UInt8(ascii: ":"), name != "host" { names.insert(name) }
            }
            if rule.from.contains(where: { $0.remoteIpBlocks != nil || $0.notRemoteIpBlocks != nil }) {
                names.insert("x-forwarded-for")
            }
        }
        return names.sorted()
    }
}

/// Istio's PeerAuthentication: mTLS mode for a workload, optionally per port.
public struct PeerAuthentication: Sendable, Hashable {
    public enum Mode: String, Sendable, Hashable {
        case strict = "STRICT", permissive = "PERMISSIVE", disable = "DISABLE", unset = "UNSET"
    }
    public var name: String
    public var namespace: String
    public var matchLabels: [String: String]?
    public var mode: Mode
    public var portLevelMtls: [Int: Mode]
    /// `metadata.creationTimestamp` in seconds since 1970 (nil: absent, older than any time).
    public var createdAt: Double?

    public init(name: String, namespace: String, matchLabels: [String: String]? = nil, mode: Mode = .unset,
                portLevelMtls: [Int: Mode] = [:], createdAt: Double? = nil) {
        self.name = name
        self.namespace = namespace
        self.matchLabels = matchLabels
        self.mode = mode
        self.portLevelMtls = portLevelMtls
        self.createdAt = createdAt
    }
}

/// Istio's path templates (`{*}`, `{**}` in `paths` / `notPaths`, as Envoy's URI templates): a
/// path with either operator is matched segment by segment instead of as a string. `{*}` is exactly
/// one non-empty path segment; `{**}` is zero or more characters of the path, slashes included,
/// and must be the last operator. No other character may share a segment with an operator, and `*`,
/// `{`, `}` may not appear outside one.
public enum PathTemplate {
    /// Whether `pattern` is a template (contains an operator).
    public static func isTemplate(_ pattern: String) -> Bool {
        // A byte scan first: on the request path most patterns have no brace at all.
        pattern.utf8.contains(UInt8(ascii: "{")) && (pattern.contains("{*}") || pattern.contains("{**}"))
    }

    /// Why `pattern` is not a valid template, or nil (also nil for a pattern that is no template).
    public static func problem(_ pattern: String) -> String? {
        guard isTemplate(pattern) else { return nil }
        guard pattern.hasPrefix("/") else { return "a path template must start with /" }
        var sawTextGlob = false
        for segment in pattern.split(separator: "/", omittingEmptySubsequences: false).dropFirst() {
            switch segment {
            case "{*}", "{**}":
                if sawTextGlob { return "{**} must be the last operator of a path template" }
                sawTextGlob = segment == "{**}"
            default:
                if segment.contains("{*}") || segment.contains("{**}") {
                    return "no other character may share a path segment with {*} or {**}"
                }
                if segment.contains(where: { $0 == "*" || $0 == "{" || $0 == "}" }) {
                    return "a path template may not contain *, { or } outside {*} and {**}"
                }
            }
        }
        return nil
    }

    /// Whether `path` (without its query) matches the valid template `pattern`.
    public static func matches(_ pattern: String, _ path: String) -> Bool {
        var p = Substring(pattern).utf8[...], v = Substring(path).utf8[...]
        let star = "{*}".utf8, textGlob = "{**}".utf8
        while let c = p.first {
            if p.starts(with: textGlob) {
                // The rest of the template (literals only) must end the path, after any characters
                // of the path alphabet (slashes included).
                let tail = p.dropFirst(textGlob.count)
                guard v.count >= tail.count, v.suffix(tail.count).elementsEqual(tail) else { return false }
                return v.dropLast(tail.count).allSatisfy { $0 == UInt8(ascii: "/") || isPathCharacter($0) }
            }
            if p.starts(with: star) {
                let segment = v.prefix { $0 != UInt8(ascii: "/") }
                guard !segment.isEmpty, segment.allSatisfy(isPathCharacter) else { return false }
                p = p.dropFirst(star.count)
                v = v.dropFirst(segment.count)
                continue
            }
            guard v.first == c else { return false }
            p = p.dropFirst()
            v = v.dropFirst()
        }
        return v.isEmpty
    }

    /// RFC 3986 `pchar` without `/`: what `{*}` may consume (Envoy's path glob alphabet).
    static func isPathCharacter(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return "-._~%!$&'()+,;:@=".utf8.contains(byte)
        }
    }
}
