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
    /// nil for `spec: {}` / no `rules:` (matches nothing); `[Rule()]` for `rules: [{}]` (matches all).
    public var rules: [Rule]

    public init(name: String, namespace: String, matchLabels: [String: String]? = nil, action: Action = .allow, rules: [Rule] = []) {
        self.name = name
        self.namespace = namespace
        self.matchLabels = matchLabels
        self.action = action
        self.rules = rules
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
            "source.ip", "remote.ip", "source.namespace", "source.principal", "destination.ip", "destination.port", "connection.sni",
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

    public init(name: String, namespace: String, matchLabels: [String: String]? = nil, mode: Mode = .unset, portLevelMtls: [Int: Mode] = [:]) {
        self.name = name
        self.namespace = namespace
        self.matchLabels = matchLabels
        self.mode = mode
        self.portLevelMtls = portLevelMtls
    }
}
