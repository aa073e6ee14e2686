/// One request (or TCP connection) as authorization sees it.
public struct AuthorizationRequest: Sendable, Hashable {
    /// The peer's principal in Istio's form (`td/ns/x/sa/y`), nil for a plaintext peer.
    public var principal: String?
    public var sourceIP: String?
    /// The original client, when known otherwise than from the request (see ``remoteAddress``).
    public var remoteIP: String?
    public var destinationIP: String?
    public var destinationPort: Int?
    public var host: String?
    public var method: String?
    public var path: String?
    /// Header names lowercased.
    public var headers: [String: [String]]
    public var sni: String?
    /// Raw TCP (no HTTP fields to match).
    public var isTCP: Bool

    public init(principal: String? = nil, sourceIP: String? = nil, remoteIP: String? = nil, destinationIP: String? = nil,
                destinationPort: Int? = nil, host: String? = nil, method: String? = nil, path: String? = nil,
                headers: [String: [String]] = [:], sni: String? = nil, isTCP: Bool = false) {
        self.principal = principal
        self.sourceIP = sourceIP
        self.remoteIP = remoteIP
        self.destinationIP = destinationIP
        self.destinationPort = destinationPort
        self.host = host
        self.method = method
        self.path = path
        self.headers = Dictionary(headers.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: +)
        self.sni = sni
        self.isTCP = isTCP
    }

    /// A header's value as Envoy's RBAC filter reads it, by lowercased name: its values joined
    /// with ","; nil when absent. Envoy holds requests in HTTP/2 form, so the pseudo-headers
    /// `:method`, `:path`, `:authority` and `:scheme` are the request's method, target, host and
    /// scheme; a lookup of `host` is answered with `:authority` (Envoy's legacy-host mapping), so
    /// it is the request's host too.
    public func headerValue(_ name: String) -> String? {
        if name.utf8.first == UInt8(ascii: ":") {
            switch name {
            case ":method": return method
            case ":path": return path
            case ":authority": return host
            case ":scheme": return isTCP ? nil : (principal != nil ? "https" : "http")
            default: return nil
            }
        }
        if name == "host" { return host }
        guard let values = headers[name], !values.isEmpty else { return nil }
        return values.count == 1 ? values[0] : values.joined(separator: ",")
    }

    /// `remote.ip` / `remoteIpBlocks`: the original client as Istio's sidecar determines it (Envoy
    /// with `use_remote_address: false` and no trusted hops): the last address of
    /// `X-Forwarded-For` when that is an IP address, else the peer. ``remoteIP`` overrides both.
    /// The header is whatever the caller sent: as in Istio, these fields are only as trustworthy
    /// as the hop that set it (use `ipBlocks` / `source.ip` for the connection's own peer).
    public var remoteAddress: String? {
        if let remoteIP { return remoteIP }
        if !isTCP, let xff = headerValue("x-forwarded-for"),
           let last = xff.split(separator: ",", omittingEmptySubsequences: false).last {
            let trimmed = String(last.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
            if IPBlock.parse(trimmed) != nil { return trimmed }
        }
        return sourceIP
    }
}

/// The workload a proxy protects: the policies that apply are chosen by its namespace and labels.
public struct WorkloadSelector: Sendable, Hashable {
    public var namespace: String
    public var labels: [String: String]
    public init(namespace: String, labels: [String: String]) {
        self.namespace = namespace
        self.labels = labels
    }
}

/// An authorization decision and what made it.
public struct AuthorizationDecision: Sendable, Hashable {
    public var allowed: Bool
    /// `namespace/name` of the deciding policy; nil when no policy decided (no ALLOW policy applies,
    /// or none of the applicable ALLOW policies matched).
    public var policy: String?
    /// Index of the deciding rule within that policy.
    public var rule: Int?
    /// AUDIT policies whose rules matched (they never change the decision), and policies in dry
    /// run that matched, named `ns/name [dry-run DENY]` (or ALLOW): what they would have done.
    public var audited: [String]

    public init(allowed: Bool, policy: String? = nil, rule: Int? = nil, audited: [String] = []) {
        self.allowed = allowed
        self.policy = policy
        self.rule = rule
        self.audited = audited
    }

    /// A ledger row's `detail`: `detail`, then the AUDIT and dry-run policies that matched
    /// (`audit: ns/a, ns/b [dry-run DENY]`). Builds nothing when none matched.
    public func ledgerDetail(_ detail: String?) -> String? {
        guard !audited.isEmpty else { return detail }
        let audit = "audit: " + audited.joined(separator: ", ")
        return detail.map { $0 + "; " + audit } ?? audit
    }
}

/// Istio's authorization semantics over a set of policies: DENY first (any match denies); then,
/// if no ALLOW policy applies to the workload, allow; if any ALLOW rule matches, allow; else deny.
/// AUDIT policies are evaluated and reported but never decide.
public struct PolicyEvaluator: Sendable {
    public let policies: [AuthorizationPolicy]
    public let rootNamespace: String

    public static let defaultRootNamespace = "istio-system"

    public init(policies: [AuthorizationPolicy], rootNamespace: String = PolicyEvaluator.defaultRootNamespace) {
        self.policies = policies
        self.rootNamespace = rootNamespace
    }

    /// The policies that apply to `workload`, in a stable order (namespace, then name).
    public func applicable(to workload: WorkloadSelector) -> [AuthorizationPolicy] {
        policies.filter { policy in
            guard policy.namespace == workload.namespace || policy.namespace == rootNamespace else { return false }
            guard let labels = policy.matchLabels else { return true }
            return labels.allSatisfy { workload.labels[$0.key] == $0.value }
        }.sorted { ($0.namespace, $0.name) < ($1.namespace, $1.name) }
    }

    public func evaluate(_ request: AuthorizationRequest, for workload: WorkloadSelector) -> AuthorizationDecision {
        evaluate(request, applicable: applicable(to: workload))
    }

    /// Evaluates against policies already chosen for the workload by ``applicable(to:)``. It splits
    /// them on every call: a caller that evaluates many requests keeps a ``PreparedPolicies``.
    public func evaluate(_ request: AuthorizationRequest, applicable policies: [AuthorizationPolicy]) -> AuthorizationDecision {
        evaluate(request, prepared: PreparedPolicies(policies))
    }

    /// Evaluates against policies already chosen and split by action (a proxy does that once per
    /// policy load, not once per request): no array is filtered and no name is built per request.
    public func evaluate(_ request: AuthorizationRequest, prepared: PreparedPolicies) -> AuthorizationDecision {
        var audited: [String] = []
        for entry in prepared.audit where firstMatchingRule(entry.policy, request) != nil {
            audited.append(entry.name)
        }
        for entry in prepared.deny {
            if let rule = firstMatchingRule(entry.policy, request) {
                return AuthorizationDecision(allowed: false, policy: entry.name, rule: rule, audited: audited)
            }
        }
        if prepared.allow.isEmpty { return AuthorizationDecision(allowed: true, audited: audited) }
        for entry in prepared.allow {
            if let rule = firstMatchingRule(entry.policy, request) {
                return AuthorizationDecision(allowed: true, policy: entry.name, rule: rule, audited: audited)
            }
        }
        return AuthorizationDecision(allowed: false, audited: audited)
    }

    func firstMatchingRule(_ policy: AuthorizationPolicy, _ request: AuthorizationRequest) -> Int? {
        // Istio on TCP: an ALLOW rule that needs HTTP fields can never match; in DENY and AUDIT
        // rules the HTTP-only fields are ignored, so the rule matches on what TCP can tell.
        let ignoreHTTP = request.isTCP && policy.action != .allow
        for (index, rule) in policy.rules.enumerated() {
            if request.isTCP && policy.action == .allow && Self.usesHTTPFields(rule) { continue }
            if matches(rule, request, ignoreHTTP: ignoreHTTP) { return index }
        }
        return nil
    }

    static func usesHTTPFields(_ rule: AuthorizationPolicy.Rule) -> Bool {
        rule.to.contains { $0.usesHTTPFields } || rule.when.contains { $0.usesHTTPFields }
    }

    func matches(_ rule: AuthorizationPolicy.Rule, _ r: AuthorizationRequest, ignoreHTTP: Bool) -> Bool {
        if !rule.from.isEmpty, !rule.from.contains(where: { matches($0, r) }) { return false }
        if !rule.to.isEmpty, !rule.to.contains(where: { matches($0, r, ignoreHTTP: ignoreHTTP) }) { return false }
        return rule.when.allSatisfy { matches($0, r, ignoreHTTP: ignoreHTTP) }
    }

    func matches(_ s: AuthorizationPolicy.Source, _ r: AuthorizationRequest) -> Bool {
        // Per request, so derived values (the namespace) are computed only when a field needs them.
        let principal = r.principal ?? ""
        return Self.field(s.principals, s.notPrincipals) { Self.principalMatches($0, principal) }
            && (s.namespaces == nil && s.notNamespaces == nil
                || Self.namespaceField(s.namespaces, s.notNamespaces, r.principal))
            && Self.field(s.ipBlocks, s.notIpBlocks) { IPBlock.contains($0, r.sourceIP) }
            && (s.remoteIpBlocks == nil && s.notRemoteIpBlocks == nil
                || Self.field(s.remoteIpBlocks, s.notRemoteIpBlocks) { [remote = r.remoteAddress] in IPBlock.contains($0, remote) })
    }

    func matches(_ o: AuthorizationPolicy.Operation, _ r: AuthorizationRequest, ignoreHTTP: Bool) -> Bool {
        if o.ports != nil || o.notPorts != nil {
            let port = r.destinationPort.map(String.init) ?? ""
            guard Self.field(o.ports, o.notPorts, { $0 == port }) else { return false }
        }
        if ignoreHTTP { return true }
        if o.hosts != nil || o.notHosts != nil {  // lowercased only for a rule that reads it
            // Istio matches the Host / :authority as sent, port included, ignoring case: `hosts:
            // [example.com]` does not match `example.com:8080` (write `example.com:*` for that).
            let host = (r.host ?? "").lowercased()
            guard Self.field(o.hosts, o.notHosts, { StringMatch.matches($0.lowercased(), host) }) else { return false }
        }
        return Self.field(o.methods, o.notMethods) { StringMatch.matches($0, r.method ?? "") }
            && Self.field(o.paths, o.notPaths) { Self.pathMatches($0, Self.pathWithoutQuery(r.path ?? "")) }
    }

    func matches(_ c: AuthorizationPolicy.Condition, _ r: AuthorizationRequest, ignoreHTTP: Bool) -> Bool {
        if let header = AuthorizationPolicy.Condition.headerName(c.key) {
            if ignoreHTTP { return true }
            // As Envoy: a repeated header is matched as its values joined with ","; `*` means the
            // header is present (even empty).
            guard let joined = r.headerValue(header.lowercased()) else {
                return Self.field(c.values, c.notValues) { _ in false }
            }
            return Self.field(c.values, c.notValues) { $0 == "*" || StringMatch.matches($0, joined) }
        }
        switch c.key {
        case "source.ip": return Self.field(c.values, c.notValues) { IPBlock.contains($0, r.sourceIP) }
        case "remote.ip": return Self.field(c.values, c.notValues) { [remote = r.remoteAddress] in IPBlock.contains($0, remote) }
        case "destination.ip": return Self.field(c.values, c.notValues) { IPBlock.contains($0, r.destinationIP) }
        case "destination.port": return Self.field(c.values, c.notValues) { $0 == (r.destinationPort.map(String.init) ?? "") }
        case "source.namespace": return Self.namespaceField(c.values, c.notValues, r.principal)
        case "source.principal": return Self.field(c.values, c.notValues) { Self.principalMatches($0, r.principal ?? "") }
        default: return false  // unknown keys (and connection.sni) are refused at load time; fail closed here too
        }
    }

    /// A namespace field against the request's principal (see ``NamespacePattern``).
    static func namespaceField(_ values: [String]?, _ notValues: [String]?, _ principal: String?) -> Bool {
        field(values, notValues) { NamespacePattern.matches($0, principal: principal) }
    }

    /// A field and its not-field: some value must match (if set); no not-value may match (if set).
    static func field(_ values: [String]?, _ notValues: [String]?, _ match: (String) -> Bool) -> Bool {
        if let values, !values.contains(where: match) { return false }
        if let notValues, notValues.contains(where: match) { return false }
        return true
    }

    /// A principal pattern against a peer's principal. Istio reads `cluster.local` in a principal
    /// of the full form `cluster.local/ns/<ns>/sa/<sa>` (five segments; the last may end in `*`) as
    /// "the local trust domain": it matches `example.org/ns/a/sa/b` in a mesh whose trust domain is
    /// example.org. Shorter patterns (`cluster.local/ns/a/*`) are not rewritten, as in Istio. A peer
    /// that passed Sigil's mTLS holds an SVID of the local trust domain (bundles are not
    /// federated), so its own trust domain stands in for it. No allocation.
    static func principalMatches(_ pattern: String, _ principal: String) -> Bool {
        if StringMatch.matches(pattern, principal) { return true }
        guard pattern.hasPrefix("cluster.local/"), let slash = principal.firstIndex(of: "/") else { return false }
        let rest = pattern.utf8.dropFirst("cluster.local".count)  // "/ns/<ns>/sa/<sa>"
        guard rest.starts(with: "/ns/".utf8), rest.lazy.filter({ $0 == UInt8(ascii: "/") }).count == 4 else { return false }
        let peerRest = principal.utf8[slash...]
        if rest.last == UInt8(ascii: "*") { return peerRest.starts(with: rest.dropLast()) }
        return peerRest.elementsEqual(rest)
    }

    /// A `paths` entry: a path template (`{*}`, `{**}`) or Istio's string match.
    static func pathMatches(_ pattern: String, _ path: String) -> Bool {
        PathTemplate.isTemplate(pattern) ? PathTemplate.matches(pattern, path) : StringMatch.matches(pattern, path)
    }

    static func pathWithoutQuery(_ path: String) -> String {
        if let q = path.firstIndex(where: { $0 == "?" || $0 == "#" }) { return String(path[..<q]) }
        return path
    }

}

/// Policies split by action in their given order, each with its `namespace/name` built once:
/// what ``PolicyEvaluator/evaluate(_:prepared:)`` walks per request.
public struct PreparedPolicies: Sendable {
    /// One policy and its name (a class: walking the lists retains one reference per entry, not
    /// every field of the policy).
    final class Entry: Sendable {
        let policy: AuthorizationPolicy
        let name: String
        init(_ policy: AuthorizationPolicy) {
            self.policy = policy
            // A dry-run policy is reported (never decides) with what it would have done.
            self.name = policy.dryRun ? "\(policy.qualifiedName) [dry-run \(policy.action.rawValue)]" : policy.qualifiedName
        }
    }

    let audit: [Entry]
    let deny: [Entry]
    let allow: [Entry]

    /// A policy in dry run (`istio.io/dry-run`) joins the AUDIT list, whatever its action: it is
    /// reported when it matches and never decides.
    public init(_ policies: [AuthorizationPolicy]) {
        audit = policies.filter { $0.action == .audit || $0.dryRun }.map(Entry.init)
        deny = policies.filter { $0.action == .deny && !$0.dryRun }.map(Entry.init)
        allow = policies.filter { $0.action == .allow && !$0.dryRun }.map(Entry.init)
    }
}

/// Istio's namespace match (`namespaces`, `notNamespaces`, `source.namespace`), exactly as
/// Istio builds it: the value becomes the regular expression `.*/ns/<value, each * as .*>/.*`,
/// matched against the peer's whole principal. So a `*` stands for any run of characters,
/// wherever it is (`team-*-dev`), even across `/` (`*a` matches `td/ns/prod/sa/x` through
/// `/sa/`), and any `/ns/<ns>/` in the principal counts. A plaintext peer (no principal) matches
/// no pattern. No allocation.
public enum NamespacePattern {
    public static func matches(_ pattern: String, principal: String?) -> Bool {
        guard let principal else { return false }
        let p = principal.utf8, g = pattern.utf8
        let slash = UInt8(ascii: "/")
        var from = p.startIndex
        while let at = firstRange(of: "/ns/".utf8, in: p[from...]) {
            let rest = p[p.index(at, offsetBy: 4)...]
            // <value> must match up to some later "/" (the `/.*` after it takes the rest).
            var end = rest.startIndex
            while end < rest.endIndex {
                if rest[end] == slash, glob(g, rest[rest.startIndex..<end]) { return true }
                end = rest.index(after: end)
            }
            from = p.index(after: at)
        }
        return false
    }

    /// `text` against `pattern` where each `*` matches any run of bytes and the rest is literal.
    static func glob(_ pattern: String.UTF8View, _ text: Substring.UTF8View) -> Bool {
        let star = UInt8(ascii: "*")
        guard pattern.contains(star) else { return pattern.elementsEqual(text) }
        var parts = pattern.split(separator: star, omittingEmptySubsequences: false)[...]
        var rest = text
        // The first literal is a prefix, the last a suffix, the ones between found in order.
        let first = parts.removeFirst(), last = parts.removeLast()
        guard rest.starts(with: first) else { return false }
        rest = rest.dropFirst(first.count)
        guard rest.count >= last.count, rest.suffix(last.count).elementsEqual(last) else { return false }
        rest = rest.dropLast(last.count)
        for part in parts where !part.isEmpty {
            guard let at = firstRange(of: part, in: rest) else { return false }
            rest = rest[at...].dropFirst(part.count)
        }
        return true
    }

    static func firstRange<Needle: Collection<UInt8>>(of needle: Needle, in haystack: Substring.UTF8View) -> Substring.UTF8View.Index? {
        var start = haystack.startIndex
        while haystack.distance(from: start, to: haystack.endIndex) >= needle.count {
            if haystack[start...].starts(with: needle) { return start }
            start = haystack.index(after: start)
        }
        return nil
    }
}

/// Istio's string match: exact, `*suffix`, `prefix*`, or `*` (any non-empty value). A leading `*`
/// is read first, as Istio does: `*abc*` is "ends with `abc*`".
public enum StringMatch {
    public static func matches(_ pattern: String, _ value: String) -> Bool {
        if pattern == "*" { return !value.isEmpty }
        if pattern.hasPrefix("*") { return value.hasSuffix(pattern.dropFirst()) }
        if pattern.hasSuffix("*") { return value.hasPrefix(pattern.dropLast()) }
        return pattern == value
    }
}

/// IPv4/IPv6 addresses and CIDR blocks (`10.0.0.0/8`, `::1`, `2001:db8::/32`).
public enum IPBlock {
    /// Whether `ip` is inside `block`. A missing or unparsable address is outside every block.
    public static func contains(_ block: String, _ ip: String?) -> Bool {
        guard let ip, var address = parse(ip), let (network, prefix) = parseBlock(block) else { return false }
        // An IPv4 peer seen on a dual-stack listener (::ffff:a.b.c.d) is that IPv4 address.
        if address.count == 16, network.count == 4, address.prefix(12).elementsEqual(mappedPrefix) {
            address = Array(address.suffix(4))
        }
        guard network.count == address.count else { return false }
        var remaining = prefix
        for (a, n) in zip(address, network) {
            if remaining <= 0 { return true }
            let bits = min(8, remaining)
            let mask: UInt8 = bits == 8 ? 0xff : ~(0xff >> UInt8(bits))
            if a & mask != n & mask { return false }
            remaining -= bits
        }
        return true
    }

    static let mappedPrefix: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]

    /// Validates a block (for load-time errors).
    public static func isValid(_ block: String) -> Bool { parseBlock(block) != nil }

    static func parseBlock(_ block: String) -> ([UInt8], Int)? {
        let parts = block.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let address = parse(String(parts[0])) else { return nil }
        let maxPrefix = address.count * 8
        if parts.count == 1 { return (address, maxPrefix) }
        guard let prefix = Int(parts[1]), (0...maxPrefix).contains(prefix) else { return nil }
        return (address, prefix)
    }

    public static func parse(_ text: String) -> [UInt8]? {
        if text.contains(":") { return parseIPv6(text) }
        let octets = text.split(separator: ".", omittingEmptySubsequences: false)
        guard octets.count == 4 else { return nil }
        var out: [UInt8] = []
        for o in octets {
            guard !o.isEmpty, o.count <= 3, o.allSatisfy(\.isNumber), let v = UInt8(o) else { return nil }
            out.append(v)
        }
        return out
    }

    static func parseIPv6(_ text: String) -> [UInt8]? {
        var text = Substring(text)
        if text.hasPrefix("[") && text.hasSuffix("]") { text = text.dropFirst().dropLast() }
        // A dotted IPv4 tail (::ffff:192.0.2.1) stands for the last two groups.
        if let colon = text.lastIndex(of: ":"), text[text.index(after: colon)...].contains("."),
           let v4 = parse(String(text[text.index(after: colon)...])), v4.count == 4 {
            let groups = String(UInt16(v4[0]) << 8 | UInt16(v4[1]), radix: 16) + ":" + String(UInt16(v4[2]) << 8 | UInt16(v4[3]), radix: 16)
            text = text[...colon] + groups
        }
        var halves: [String] = []
        if let range = text.firstRange(of: "::") {
            halves = [String(text[..<range.lowerBound]), String(text[range.upperBound...])]
            guard !halves[1].contains("::") else { return nil }
        } else {
            halves = [String(text)]
        }
        func groups(_ s: String) -> [UInt16]? {
            if s.isEmpty { return [] }
            var out: [UInt16] = []
            for g in s.split(separator: ":", omittingEmptySubsequences: false) {
                guard !g.isEmpty, g.count <= 4, let v = UInt16(g, radix: 16) else { return nil }
                out.append(v)
            }
            return out
        }
        guard let head = groups(halves[0]) else { return nil }
        var all = head
        if halves.count == 2 {
            guard let tail = groups(halves[1]), head.count + tail.count < 8 else { return nil }
            all += [UInt16](repeating: 0, count: 8 - head.count - tail.count) + tail
        }
        guard all.count == 8 else { return nil }
        return all.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xff)] }
    }
}

/// Istio's PeerAuthentication resolution for one workload and port: the workload-specific policy
/// (a selector matching its labels, in its namespace) over the namespace-wide one (no selector)
/// over the mesh-wide one (root namespace, no selector); `UNSET` inherits from the level above;
/// `portLevelMtls` (honoured only on a policy with a selector, as in Istio) overrides its policy
/// for that port. Nothing set anywhere means PERMISSIVE. Of several policies at one level, the
/// oldest (`metadata.creationTimestamp`) applies, as in Istio.
public struct PeerAuthenticationResolver: Sendable {
    public let policies: [PeerAuthentication]
    public let rootNamespace: String

    public init(policies: [PeerAuthentication], rootNamespace: String = PolicyEvaluator.defaultRootNamespace) {
        // Of several policies at one level the oldest applies, then the first by name (Istio's
        // order: creation time, name, namespace); a policy without a time counts as oldest.
        self.policies = policies.sorted {
            ($0.createdAt ?? -.infinity, $0.name, $0.namespace) < ($1.createdAt ?? -.infinity, $1.name, $1.namespace)
        }
        self.rootNamespace = rootNamespace
    }

    public func mode(for workload: WorkloadSelector, port: Int?) -> PeerAuthentication.Mode {
        let mesh = policies.first { $0.namespace == rootNamespace && $0.matchLabels == nil }
        let namespace = policies.first { $0.namespace == workload.namespace && $0.matchLabels == nil && workload.namespace != rootNamespace }
        // A policy with a selector in the root namespace is ignored, as in Istio.
        let specific = policies.first { policy in
            guard policy.namespace == workload.namespace, policy.namespace != rootNamespace, let labels = policy.matchLabels else { return false }
            return labels.allSatisfy { workload.labels[$0.key] == $0.value }
        }
        var mode = PeerAuthentication.Mode.permissive
        for level in [mesh, namespace, specific] {
            guard let level else { continue }
            var levelMode = level.mode
            if level.matchLabels != nil, let port, let portMode = level.portLevelMtls[port], portMode != .unset {
                levelMode = portMode
            }
            if levelMode != .unset { mode = levelMode }
        }
        return mode
    }
}
