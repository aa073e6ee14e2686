public import SigilCore
import Yams
import Foundation

/// A policy file that cannot be used: names the file, the document (1-based) and the field.
public struct PolicyLoadError: Error, Sendable, CustomStringConvertible {
    public let file: String
    public let document: Int
    public let field: String
    public let problem: String

    public var description: String {
        "\(file), document \(document)\(field.isEmpty ? "" : ", field \(field)"): \(problem)"
    }
}

/// The policies of a directory (or one file): every `*.yaml` / `*.yml`, every `---` document.
public struct PolicySet: Sendable {
    public var authorizationPolicies: [AuthorizationPolicy]
    public var peerAuthentications: [PeerAuthentication]

    public init(authorizationPolicies: [AuthorizationPolicy] = [], peerAuthentications: [PeerAuthentication] = []) {
        self.authorizationPolicies = authorizationPolicies
        self.peerAuthentications = peerAuthentications
    }

    /// What loads but may not mean what its author thinks: an ALLOW policy that admits by
    /// `remoteIpBlocks` or `remote.ip`, which (as in Istio) read the last X-Forwarded-For address,
    /// something any caller can send.
    public var warnings: [String] {
        authorizationPolicies.filter { policy in
            policy.action == .allow && policy.rules.contains { rule in
                rule.from.contains { $0.remoteIpBlocks != nil } || rule.when.contains { $0.key == "remote.ip" && $0.values != nil }
            }
        }.map {
            "ALLOW policy \($0.qualifiedName) admits by remoteIpBlocks/remote.ip: as in Istio, that is the last X-Forwarded-For address, which any caller can set; use ipBlocks/source.ip for the connection's own peer"
        }
    }
}

/// Reads Istio YAML (security.istio.io/v1 and v1beta1: AuthorizationPolicy, PeerAuthentication)
/// strictly: an unknown field, a wrong type, an unsupported feature (CUSTOM, targetRef) is a load
/// error naming file, document and field, never a silently weaker policy.
public enum PolicyLoader {
    static let apiVersions: Set<String> = ["security.istio.io/v1", "security.istio.io/v1beta1"]

    public static func load(path: String) throws(PolicyLoadError) -> PolicySet {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw PolicyLoadError(file: path, document: 0, field: "", problem: "no such file or directory")
        }
        var files: [String] = []
        if isDirectory.boolValue {
            // The same listing the proxy's watcher stamps: what it watches is what is loaded.
            files = (FileStamp.policyFileNames(inDirectory: path) ?? []).map { path + "/" + $0 }
        } else {
            files = [path]
        }
        var set = PolicySet()
        for file in files {
            guard let data = FileManager.default.contents(atPath: file) else {
                throw PolicyLoadError(file: file, document: 0, field: "", problem: "cannot read the file")
            }
            // Refused rather than read with U+FFFD in place of the bad bytes: a namespace or path
            // so changed would load and silently never match.
            guard let text = String(validating: data, as: UTF8.self) else {
                throw PolicyLoadError(file: file, document: 0, field: "", problem: "the file is not valid UTF-8")
            }
            let more = try parse(text, file: file)
            set.authorizationPolicies += more.authorizationPolicies
            set.peerAuthentications += more.peerAuthentications
        }
        var seen = Set<String>()
        for p in set.authorizationPolicies where !seen.insert("ap:" + p.qualifiedName).inserted {
            throw PolicyLoadError(file: path, document: 0, field: "metadata.name", problem: "AuthorizationPolicy \(p.qualifiedName) is defined twice")
        }
        for p in set.peerAuthentications where !seen.insert("pa:" + p.namespace + "/" + p.name).inserted {
            throw PolicyLoadError(file: path, document: 0, field: "metadata.name", problem: "PeerAuthentication \(p.namespace)/\(p.name) is defined twice")
        }
        return set
    }

    /// The largest policy file read (far above any real set of policies).
    static let maximumFileBytes = 4 << 20

    /// Where `text` has a YAML anchor (`&name`), as "line L, column C", or nil. Without anchors no
    /// alias can resolve, and aliases are what let a small file expand (and be hashed by the YAML
    /// parser) exponentially: a "billion laughs" file would hold up the reload loop. The scan is
    /// lexical and errs on the safe side: an `&` followed by a name character at the start of a
    /// node (at the start of a line, after `:`, `-`, `?`, `[`, `{`, `,`, or after a `!tag`) counts,
    /// even inside a quoted string or a comment, where an operator can simply reword it.
    static func anchorPosition(_ text: String) -> String? {
        var line = 1
        for raw in text.utf8.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            defer { line += 1 }
            let bytes = Array(raw)
            var column = 0
            while let at = bytes[column...].firstIndex(of: UInt8(ascii: "&")) {
                column = at + 1
                guard at + 1 < bytes.count, !Self.isYAMLSpaceOrFlow(bytes[at + 1]) else { continue }
                var before = at - 1
                while before >= 0, bytes[before] == UInt8(ascii: " ") || bytes[before] == UInt8(ascii: "\t") { before -= 1 }
                if before < 0 || ":-?[{,".utf8.contains(bytes[before]) { return "line \(line), column \(at + 1)" }
                // After a tag (`!!map &a`): the token before the spaces starts with `!`.
                guard before < at - 1 else { continue }
                var start = before
                while start > 0, !Self.isYAMLSpaceOrFlow(bytes[start - 1]) { start -= 1 }
                if bytes[start] == UInt8(ascii: "!") { return "line \(line), column \(at + 1)" }
            }
        }
        return nil
    }

    static func isYAMLSpaceOrFlow(_ byte: UInt8) -> Bool {
        " \t\r,[]{}".utf8.contains(byte)
    }

    public static func parse(_ text: String, file: String) throws(PolicyLoadError) -> PolicySet {
        var set = PolicySet()
        var documents: [Node] = []
        guard text.utf8.count <= maximumFileBytes else {
            throw PolicyLoadError(file: file, document: 0, field: "", problem: "the file is larger than \(maximumFileBytes >> 20) MiB")
        }
        if let position = anchorPosition(text) {
            throw PolicyLoadError(file: file, document: 0, field: "",
                                  problem: "YAML anchors and aliases (&name, *name) are not supported in policy files (\(position)); write the values out")
        }
        do {
            // Parse eagerly: a syntax error anywhere fails the whole file (load_all's lazy sequence
            // would stop quietly at the first bad document).
            let parser = try Parser(yaml: text)
            while let node = try parser.nextRoot() { documents.append(node) }
        } catch {
            throw PolicyLoadError(file: file, document: 0, field: "", problem: "malformed YAML: \(error)")
        }
        var budget = Reader.maximumNodes  // for the whole file
        for (index, node) in documents.enumerated() {
            let reader = Reader(file: file, document: index + 1)
            let document = try reader.plain(node, "", budget: &budget)
            if document is NSNull { continue }
            guard let root = document as? [String: Any] else {
                throw reader.error("", "a document must be a mapping with apiVersion, kind, metadata and spec")
            }
            try reader.allow(root, ["apiVersion", "kind", "metadata", "spec"], at: "")
            let apiVersion = try reader.string(root["apiVersion"], "apiVersion")
            guard apiVersions.contains(apiVersion) else {
                throw reader.error("apiVersion", "'\(apiVersion)' is not security.istio.io/v1 or v1beta1")
            }
            let kind = try reader.string(root["kind"], "kind")
            let metadata = try reader.map(root["metadata"], "metadata")
            let name = try reader.string(metadata["name"], "metadata.name")
            let namespace = try reader.optionalString(metadata["namespace"], "metadata.namespace") ?? "default"
            let spec = try reader.optionalMap(root["spec"], "spec") ?? [:]
            switch kind {
            case "AuthorizationPolicy":
                var policy = try reader.authorizationPolicy(name: name, namespace: namespace, spec: spec)
                policy.dryRun = try reader.dryRun(metadata, action: policy.action)
                set.authorizationPolicies.append(policy)
            case "PeerAuthentication":
                var policy = try reader.peerAuthentication(name: name, namespace: namespace, spec: spec)
                policy.createdAt = try reader.creationTimestamp(metadata)
                set.peerAuthentications.append(policy)
            default:
                throw reader.error("kind", "'\(kind)' is not supported (AuthorizationPolicy or PeerAuthentication)")
            }
        }
        return set
    }

    struct Reader {
        let file: String
        let document: Int

        func error(_ field: String, _ problem: String) -> PolicyLoadError {
            PolicyLoadError(file: file, document: document, field: field, problem: problem)
        }

        /// The most YAML nodes one file may hold: far above any real set of policies (a second
        /// guard beside the refusal of anchors).
        static let maximumNodes = 100_000

        /// A YAML node as plain values (scalars as YAML resolves them, `[Any]`, `[String: Any]`,
        /// `NSNull`). A mapping key must be a scalar and appear once (YAML parsers disagree on
        /// which duplicate wins, so a policy that repeats a key is refused); merge keys (`<<`) are
        /// refused rather than half-applied; a document that expands (through aliases) past
        /// ``maximumNodes`` (counted over the file through `budget`) is refused. An integer written
        /// other than in plain decimal (`0x1F90`, `010`, `8_080`) stays text, so a port spelled so
        /// is refused instead of reinterpreted; so does a YAML 1.1-only boolean (`yes`, `off`).
        func plain(_ node: Node, _ field: String, budget: inout Int) throws(PolicyLoadError) -> Any {
            budget -= 1
            guard budget >= 0 else {
                throw error(field, "the file holds more than \(Self.maximumNodes) YAML nodes")
            }
            switch node {
            case .scalar(let scalar):
                let value = node.any
                if let number = value as? Int, String(number) != scalar.string { return scalar.string }
                // YAML 1.1's other booleans (yes, no, on, off, y, n) stay text, as YAML 1.2 reads
                // them: `istio.io/dry-run: yes` is then refused instead of read as true.
                if value is Bool, !["true", "false", "True", "False", "TRUE", "FALSE"].contains(scalar.string) { return scalar.string }
                return value
            case .sequence(let items):
                var out: [Any] = []
                for (i, item) in items.enumerated() { out.append(try plain(item, "\(field)[\(i)]", budget: &budget)) }
                return out
            case .mapping(let pairs):
                var out: [String: Any] = [:]
                for (key, value) in pairs {
                    guard case .scalar(let scalar) = key else {
                        throw error(field, "a mapping key must be a plain value, not a list or mapping")
                    }
                    let name = scalar.string
                    let path = field.isEmpty ? name : field + "." + name
                    guard name != "<<" else { throw error(path, "YAML merge keys are not supported in policies") }
                    guard out[name] == nil else { throw error(path, "is given twice") }
                    out[name] = try plain(value, path, budget: &budget)
                }
                return out
            case .alias:
                throw error(field, "an unresolved YAML alias")
            }
        }

        /// `metadata.annotations["istio.io/dry-run"]`: true loads the policy without enforcing it.
        /// Read as Istio's validation reads it (Go's `strconv.ParseBool`: 1, t, T, TRUE, true,
        /// True and their false forms; anything else is refused), and only on ALLOW and DENY
        /// policies, as Istio allows.
        func dryRun(_ metadata: [String: Any], action: AuthorizationPolicy.Action) throws(PolicyLoadError) -> Bool {
            let field = "metadata.annotations.istio.io/dry-run"
            guard let annotations = try optionalMap(metadata["annotations"], "metadata.annotations") else { return false }
            guard let value = annotations["istio.io/dry-run"] else { return false }
            guard action == .allow || action == .deny else {
                throw error(field, "dry-run is supported only on ALLOW and DENY policies, not \(action.rawValue)")
            }
            if let flag = value as? Bool { return flag }
            let text = try string(value, field)
            switch text {
            case "1", "t", "T", "TRUE", "true", "True": return true
            case "0", "f", "F", "FALSE", "false", "False": return false
            default: throw error(field, "'\(text)' is not a boolean (write \"true\" or \"false\")")
            }
        }

        /// `metadata.creationTimestamp` (RFC 3339) in seconds since 1970, nil when absent: of two
        /// PeerAuthentications at one level, Istio applies the older.
        func creationTimestamp(_ metadata: [String: Any]) throws(PolicyLoadError) -> Double? {
            let field = "metadata.creationTimestamp"
            guard let value = metadata["creationTimestamp"], !(value is NSNull) else { return nil }
            if let date = value as? Date { return date.timeIntervalSince1970 }
            let text = try string(value, field)
            guard let micros = RFC3339.micros(from: text) else {
                throw error(field, "'\(text)' is not an RFC 3339 time such as 2026-01-31T12:00:00Z")
            }
            return Double(micros) / 1_000_000
        }

        func allow(_ map: [String: Any], _ keys: Set<String>, at path: String) throws(PolicyLoadError) {
            for key in map.keys.sorted() where !keys.contains(key) {
                throw error(path.isEmpty ? key : path + "." + key, "unknown field (expected one of: \(keys.sorted().joined(separator: ", ")))")
            }
        }

        func string(_ value: Any?, _ field: String) throws(PolicyLoadError) -> String {
            guard let value else { throw error(field, "is required") }
            if let s = value as? String { return s }
            if let i = value as? Int { return String(i) }
            throw error(field, "must be a string")
        }

        func optionalString(_ value: Any?, _ field: String) throws(PolicyLoadError) -> String? {
            value == nil ? nil : try string(value, field)
        }

        func map(_ value: Any?, _ field: String) throws(PolicyLoadError) -> [String: Any] {
            guard let value else { throw error(field, "is required") }
            guard let m = value as? [String: Any] else { throw error(field, "must be a mapping") }
            return m
        }

        /// nil when absent or null (`annotations: ~`).
        func optionalMap(_ value: Any?, _ field: String) throws(PolicyLoadError) -> [String: Any]? {
            value == nil || value is NSNull ? nil : try map(value, field)
        }

        func list(_ value: Any?, _ field: String) throws(PolicyLoadError) -> [Any]? {
            guard let value else { return nil }
            guard let l = value as? [Any] else { throw error(field, "must be a list") }
            return l
        }

        /// A list of strings; an empty list is the same as none (Istio's fields are proto3 repeated
        /// fields: `principals: []` means "not set", not "matches nothing"). An empty string is
        /// refused, as Istio's validation does.
        func strings(_ value: Any?, _ field: String) throws(PolicyLoadError) -> [String]? {
            guard let items = try list(value, field), !items.isEmpty else { return nil }
            var out: [String] = []
            for (i, item) in items.enumerated() {
                let text = try string(item, "\(field)[\(i)]")
                guard !text.isEmpty else { throw error("\(field)[\(i)]", "must not be empty") }
                out.append(text)
            }
            return out
        }

        func labels(_ spec: [String: Any], _ field: String) throws(PolicyLoadError) -> [String: String]? {
            guard let selector = try optionalMap(spec["selector"], field) else { return nil }
            try allow(selector, ["matchLabels"], at: field)
            guard let labels = try optionalMap(selector["matchLabels"], field + ".matchLabels") else { return nil }
            var out: [String: String] = [:]
            for (k, v) in labels { out[k] = try string(v, "\(field).matchLabels.\(k)") }
            // An empty selector selects nothing in particular: the policy is namespace-wide (Istio).
            return out.isEmpty ? nil : out
        }

        func authorizationPolicy(name: String, namespace: String, spec: [String: Any]) throws(PolicyLoadError) -> AuthorizationPolicy {
            if spec["targetRef"] != nil || spec["targetRefs"] != nil {
                throw error("spec.targetRef", "targetRef is not supported; select workloads with spec.selector.matchLabels")
            }
            if spec["provider"] != nil {
                throw error("spec.provider", "CUSTOM authorization (external providers) is not supported")
            }
            try allow(spec, ["selector", "action", "rules"], at: "spec")
            let actionText = try optionalString(spec["action"], "spec.action") ?? "ALLOW"
            guard let action = AuthorizationPolicy.Action(rawValue: actionText) else {
                if actionText == "CUSTOM" { throw error("spec.action", "CUSTOM authorization (external providers) is not supported") }
                throw error("spec.action", "'\(actionText)' is not ALLOW, DENY or AUDIT")
            }
            var rules: [AuthorizationPolicy.Rule] = []
            for (i, item) in (try list(spec["rules"], "spec.rules") ?? []).enumerated() {
                rules.append(try rule(item, "spec.rules[\(i)]"))
            }
            if action == .deny, rules.isEmpty {
                // As Istio's validation: it would never match, though it reads as "deny everything".
                throw error("spec.rules", "a DENY policy without rules never matches; add an empty rule `rules: [{}]` to deny every request")
            }
            return AuthorizationPolicy(name: name, namespace: namespace, matchLabels: try labels(spec, "spec.selector"), action: action, rules: rules)
        }

        func rule(_ value: Any, _ path: String) throws(PolicyLoadError) -> AuthorizationPolicy.Rule {
            if value is NSNull { throw error(path, "a rule must not be null (write {} for a rule that matches every request)") }
            guard let m = value as? [String: Any] else { throw error(path, "a rule must be a mapping") }
            try allow(m, ["from", "to", "when"], at: path)
            var rule = AuthorizationPolicy.Rule()
            for (i, item) in (try list(m["from"], path + ".from") ?? []).enumerated() {
                let p = "\(path).from[\(i)]"
                let entry = try map(item, p)
                try allow(entry, ["source"], at: p)
                let s = try map(entry["source"], p + ".source")
                let sp = p + ".source"
                try allow(s, ["principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks",
                              "remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals", "notRequestPrincipals"], at: sp)
                if s["requestPrincipals"] != nil || s["notRequestPrincipals"] != nil {
                    throw error(sp + ".requestPrincipals", "JWT request principals are not supported")
                }
                var source = AuthorizationPolicy.Source()
                for (name, field) in [("principals", \AuthorizationPolicy.Source.principals), ("notPrincipals", \.notPrincipals),
                                      ("namespaces", \.namespaces), ("notNamespaces", \.notNamespaces)] {
                    source[keyPath: field] = try strings(s[name], sp + "." + name)
                }
                for (name, field) in [("ipBlocks", \AuthorizationPolicy.Source.ipBlocks), ("notIpBlocks", \.notIpBlocks),
                                      ("remoteIpBlocks", \.remoteIpBlocks), ("notRemoteIpBlocks", \.notRemoteIpBlocks)] {
                    source[keyPath: field] = try cidrs(s[name], sp + "." + name)
                }
                guard source != AuthorizationPolicy.Source() else {
                    throw error(sp, "must not be empty (set principals, namespaces or ipBlocks, or leave out `from`)")
                }
                rule.from.append(source)
            }
            for (i, item) in (try list(m["to"], path + ".to") ?? []).enumerated() {
                let p = "\(path).to[\(i)]"
                let entry = try map(item, p)
                try allow(entry, ["operation"], at: p)
                let o = try map(entry["operation"], p + ".operation")
                let op = p + ".operation"
                try allow(o, ["hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"], at: op)
                var operation = AuthorizationPolicy.Operation()
                for (name, field) in [("hosts", \AuthorizationPolicy.Operation.hosts), ("notHosts", \.notHosts), ("methods", \.methods),
                                      ("notMethods", \.notMethods), ("paths", \.paths), ("notPaths", \.notPaths)] {
                    operation[keyPath: field] = try strings(o[name], op + "." + name)
                }
                operation.ports = try ports(o["ports"], op + ".ports")
                operation.notPorts = try ports(o["notPorts"], op + ".notPorts")
                guard operation != AuthorizationPolicy.Operation() else {
                    throw error(op, "must not be empty (set hosts, ports, methods or paths, or leave out `to`)")
                }
                for (name, values) in [("paths", operation.paths), ("notPaths", operation.notPaths)] {
                    for value in values ?? [] {
                        if let problem = PathTemplate.problem(value) { throw error("\(op).\(name)", "'\(value)': \(problem)") }
                    }
                }
                rule.to.append(operation)
            }
            for (i, item) in (try list(m["when"], path + ".when") ?? []).enumerated() {
                let p = "\(path).when[\(i)]"
                let c = try map(item, p)
                try allow(c, ["key", "values", "notValues"], at: p)
                let key = try string(c["key"], p + ".key")
                if key == "connection.sni" {
                    throw error(p + ".key", "'connection.sni' is not supported: Sigil's mesh connections carry no TLS server name to match, so the condition could never be evaluated")
                }
                guard AuthorizationPolicy.Condition.isSupported(key) else {
                    throw error(p + ".key", "'\(key)' is not supported (request.headers[...], source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port)")
                }
                let values = try strings(c["values"], p + ".values")
                let notValues = try strings(c["notValues"], p + ".notValues")
                guard values != nil || notValues != nil else { throw error(p, "needs values or notValues") }
                if ["source.ip", "remote.ip", "destination.ip"].contains(key) {
                    for v in (values ?? []) + (notValues ?? []) where !IPBlock.isValid(v) {
                        throw error(p, "'\(v)' is not an IP address or CIDR block")
                    }
                }
                if key == "destination.port" {
                    for v in (values ?? []) + (notValues ?? []) where !Self.isPort(v) {
                        throw error(p, "'\(v)' is not a port number (1-65535)")
                    }
                }
                rule.when.append(AuthorizationPolicy.Condition(key: key, values: values, notValues: notValues))
            }
            return rule
        }

        /// A port as Istio writes it: decimal 1-65535, no sign or leading zero (compared as text).
        static func isPort(_ text: String) -> Bool {
            guard let n = Int(text), (1...65535).contains(n) else { return false }
            return String(n) == text
        }

        func cidrs(_ value: Any?, _ field: String) throws(PolicyLoadError) -> [String]? {
            guard let blocks = try strings(value, field) else { return nil }
            for b in blocks where !IPBlock.isValid(b) { throw error(field, "'\(b)' is not an IP address or CIDR block") }
            return blocks
        }

        func ports(_ value: Any?, _ field: String) throws(PolicyLoadError) -> [String]? {
            guard let ports = try strings(value, field) else { return nil }
            for p in ports where !Self.isPort(p) {
                throw error(field, "'\(p)' is not a port number (1-65535)")
            }
            return ports
        }

        func peerAuthentication(name: String, namespace: String, spec: [String: Any]) throws(PolicyLoadError) -> PeerAuthentication {
            try allow(spec, ["selector", "mtls", "portLevelMtls"], at: "spec")
            func mode(_ value: Any?, _ field: String) throws(PolicyLoadError) -> PeerAuthentication.Mode {
                guard let m = try optionalMap(value, field) else { return .unset }
                try allow(m, ["mode"], at: field)
                let text = try optionalString(m["mode"], field + ".mode") ?? "UNSET"
                guard let mode = PeerAuthentication.Mode(rawValue: text) else {
                    throw error(field + ".mode", "'\(text)' is not STRICT, PERMISSIVE, DISABLE or UNSET")
                }
                return mode
            }
            var ports: [Int: PeerAuthentication.Mode] = [:]
            let matchLabels = try labels(spec, "spec.selector")
            if let levels = try optionalMap(spec["portLevelMtls"], "spec.portLevelMtls") {
                guard matchLabels != nil else {
                    throw error("spec.portLevelMtls", "requires spec.selector.matchLabels (Istio applies port-level mTLS only to selected workloads)")
                }
                guard !levels.isEmpty else { throw error("spec.portLevelMtls", "must not be empty") }
                for (key, value) in levels {
                    guard Self.isPort(key), let port = Int(key) else {
                        throw error("spec.portLevelMtls.\(key)", "is not a port number (1-65535)")
                    }
                    ports[port] = try mode(value, "spec.portLevelMtls.\(key)")
                }
            }
            return PeerAuthentication(name: name, namespace: namespace, matchLabels: matchLabels,
                                      mode: try mode(spec["mtls"], "spec.mtls"), portLevelMtls: ports)
        }
    }
}
