import Foundation
import Testing
import SigilCore
import SigilPolicy

/// Istio's documented authorization behaviour, case by case: each case loads real Istio YAML,
/// evaluates one request for the workload `app=web` in namespace `prod`, and checks the decision
/// and what decided it.
struct PolicyCase: CustomTestStringConvertible, Sendable {
    let name: String
    let yaml: String
    let request: AuthorizationRequest
    let allowed: Bool
    let policy: String?
    let rule: Int?
    var testDescription: String { name }
}

let web = WorkloadSelector(namespace: "prod", labels: ["app": "web", "version": "v1"])
let sleep = "cluster.local/ns/prod/sa/sleep"
let other = "cluster.local/ns/dev/sa/tool"

func ap(_ name: String = "p", ns: String = "prod", action: String? = nil, selector: String? = nil, rules: String?) -> String {
    var out = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: \(name)
      namespace: \(ns)
    spec:
    """
    if let selector { out += "\n  selector:\n    matchLabels:\n      \(selector)" }
    if let action { out += "\n  action: \(action)" }
    if let rules { out += "\n  rules:\n" + rules.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n") }
    if selector == nil && action == nil && rules == nil { out += " {}" }
    return out + "\n"
}

func http(_ principal: String? = sleep, method: String = "GET", path: String = "/", host: String = "web.prod.svc", port: Int = 8080,
          ip: String = "10.1.2.3", headers: [String: [String]] = [:]) -> AuthorizationRequest {
    AuthorizationRequest(principal: principal, sourceIP: ip, destinationIP: "10.9.9.9", destinationPort: port, host: host, method: method,
                         path: path, headers: headers, sni: "web.prod.svc")
}

func tcp(_ principal: String? = sleep, port: Int = 5432, ip: String = "10.1.2.3") -> AuthorizationRequest {
    AuthorizationRequest(principal: principal, sourceIP: ip, destinationIP: "10.9.9.9", destinationPort: port, isTCP: true)
}

let allowGETFromSleep = ap(rules: """
- from:
  - source:
      principals: ["cluster.local/ns/prod/sa/sleep"]
  to:
  - operation:
      methods: ["GET"]
""")

let cases: [PolicyCase] = [
    // No policies, empty policies
    PolicyCase(name: "no policy allows", yaml: "", request: http(), allowed: true, policy: nil, rule: nil),
    PolicyCase(name: "spec {} ALLOW denies all", yaml: ap(rules: nil), request: http(), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "rules [{}] allows all", yaml: ap(rules: "- {}"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "rules [{}] allows plaintext too", yaml: ap(rules: "- {}"), request: http(nil), allowed: true, policy: "prod/p", rule: 0),
    // namespaces: Istio's regex `.*/ns/<value, * as .*>/.*`, so `*` anywhere
    PolicyCase(name: "namespace * in the middle", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      namespaces: [\"team-*-dev\"]"), request: http("td/ns/team-a-dev/sa/x"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "namespace * in the middle, no match", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      namespaces: [\"team-*-dev\"]"), request: http("td/ns/team-a-prod/sa/x"), allowed: true, policy: nil, rule: nil),
    PolicyCase(name: "namespace *dev* contains", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      namespaces: [\"*dev*\"]"), request: http("td/ns/a-dev-b/sa/x"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "notNamespaces * in the middle", yaml: ap(rules: "- from:\n  - source:\n      principals: [\"*\"]\n      notNamespaces: [\"team-*-dev\"]"), request: http("td/ns/team-a-dev/sa/x"), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "source.namespace * in the middle", yaml: ap(rules: "- when:\n  - key: source.namespace\n    values: [\"t*m\"]"), request: http("td/ns/team/sa/x"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "namespace * crosses / as Istio's regex does", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      namespaces: [\"*a\"]"), request: http("td/ns/prod/sa/x"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "namespace: any /ns/<ns>/ of the principal", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      namespaces: [\"b\"]"), request: http("td/ns/a/x/ns/b/y"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "namespace * needs a peer namespace", yaml: ap(rules: "- from:\n  - source:\n      namespaces: [\"*\"]"), request: http(nil), allowed: false, policy: nil, rule: nil),
    // pseudo-headers are the request's own fields (Envoy holds requests in HTTP/2 form); `host` is `:authority`
    PolicyCase(name: "when :method", yaml: ap(action: "DENY", rules: "- when:\n  - key: request.headers[:method]\n    values: [\"DELETE\"]"), request: http(method: "DELETE"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "when :authority", yaml: ap(action: "DENY", rules: "- when:\n  - key: request.headers[:authority]\n    values: [\"admin.*\"]"), request: http(host: "admin.local"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "when :path", yaml: ap(action: "DENY", rules: "- when:\n  - key: request.headers[:path]\n    values: [\"/a?*\"]"), request: http(path: "/a?x=1"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "when :scheme over mTLS", yaml: ap(rules: "- when:\n  - key: request.headers[:scheme]\n    values: [\"https\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "when [host] is the request's host (Envoy maps host to :authority)", yaml: ap(action: "DENY", rules: "- when:\n  - key: request.headers[host]\n    values: [\"admin.*\"]"), request: http(host: "admin.example.com"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "when [Host] matches as [host]", yaml: ap(rules: "- when:\n  - key: request.headers[Host]\n    values: [\"web.prod.svc\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    // remote.ip / remoteIpBlocks: the last X-Forwarded-For address (Envoy, use_remote_address false)
    PolicyCase(name: "remoteIpBlocks from X-Forwarded-For", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      remoteIpBlocks: [\"203.0.113.0/24\"]"), request: http(headers: ["x-forwarded-for": ["203.0.113.7"]]), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "remote.ip is the last X-Forwarded-For address", yaml: ap(action: "DENY", rules: "- when:\n  - key: remote.ip\n    values: [\"198.51.100.9\"]"), request: http(headers: ["x-forwarded-for": ["10.0.0.1, 198.51.100.9"]]), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "remote.ip: an earlier X-Forwarded-For address is not it", yaml: ap(action: "DENY", rules: "- when:\n  - key: remote.ip\n    values: [\"10.0.0.1\"]"), request: http(headers: ["x-forwarded-for": ["10.0.0.1, 198.51.100.9"]]), allowed: true, policy: nil, rule: nil),
    PolicyCase(name: "remote.ip without X-Forwarded-For is the peer", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      remoteIpBlocks: [\"10.1.2.0/24\"]"), request: http(), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "remote.ip: a last entry that is no address falls back to the peer", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      remoteIpBlocks: [\"10.1.2.0/24\"]"), request: http(headers: ["x-forwarded-for": ["203.0.113.7, unknown"]]), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "DENY rules [{}] denies all", yaml: ap(action: "DENY", rules: "- {}"), request: http(), allowed: false, policy: "prod/p", rule: 0),
    // principals
    PolicyCase(name: "principal match", yaml: allowGETFromSleep, request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "principal mismatch", yaml: allowGETFromSleep, request: http(other), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "plaintext has no principal", yaml: allowGETFromSleep, request: http(nil), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "method mismatch", yaml: allowGETFromSleep, request: http(method: "POST"), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "principal prefix", yaml: ap(rules: "- from:\n  - source:\n      principals: [\"cluster.local/ns/prod/*\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "principal suffix", yaml: ap(rules: "- from:\n  - source:\n      principals: [\"*/sa/sleep\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "principal * requires mTLS", yaml: ap(rules: "- from:\n  - source:\n      principals: [\"*\"]"), request: http(nil), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "principal * any authenticated", yaml: ap(rules: "- from:\n  - source:\n      principals: [\"*\"]"), request: http(other), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "notPrincipals * denies plaintext", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      notPrincipals: [\"*\"]"), request: http(nil), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "notPrincipals * lets mTLS through", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      notPrincipals: [\"*\"]"), request: http(), allowed: true, policy: nil, rule: nil),
    PolicyCase(name: "notPrincipals excludes", yaml: ap(rules: "- from:\n  - source:\n      notPrincipals: [\"cluster.local/ns/prod/sa/sleep\"]"), request: http(), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "notPrincipals others pass", yaml: ap(rules: "- from:\n  - source:\n      notPrincipals: [\"cluster.local/ns/prod/sa/sleep\"]"), request: http(other), allowed: true, policy: "prod/p", rule: 0),
    // namespaces
    PolicyCase(name: "namespace match", yaml: ap(rules: "- from:\n  - source:\n      namespaces: [\"prod\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "namespace mismatch", yaml: ap(rules: "- from:\n  - source:\n      namespaces: [\"prod\"]"), request: http(other), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "notNamespaces", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      notNamespaces: [\"prod\"]"), request: http(other), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "notNamespaces same ns", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      notNamespaces: [\"prod\"]"), request: http(), allowed: true, policy: nil, rule: nil),
    PolicyCase(name: "namespace prefix", yaml: ap(rules: "- from:\n  - source:\n      namespaces: [\"pr*\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    // ipBlocks
    PolicyCase(name: "ipBlocks CIDR", yaml: ap(rules: "- from:\n  - source:\n      ipBlocks: [\"10.1.0.0/16\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "ipBlocks outside", yaml: ap(rules: "- from:\n  - source:\n      ipBlocks: [\"10.2.0.0/16\"]"), request: http(), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "ipBlocks single address", yaml: ap(rules: "- from:\n  - source:\n      ipBlocks: [\"10.1.2.3\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "notIpBlocks", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      notIpBlocks: [\"10.0.0.0/8\"]"), request: http(ip: "192.168.1.1"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "notIpBlocks inside", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      notIpBlocks: [\"10.0.0.0/8\"]"), request: http(), allowed: true, policy: nil, rule: nil),
    PolicyCase(name: "ipBlocks IPv6", yaml: ap(rules: "- from:\n  - source:\n      ipBlocks: [\"2001:db8::/32\"]"), request: http(ip: "2001:db8:1::5"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "remoteIpBlocks default to peer", yaml: ap(rules: "- from:\n  - source:\n      remoteIpBlocks: [\"10.1.2.0/24\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "notRemoteIpBlocks", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      notRemoteIpBlocks: [\"10.1.2.0/24\"]"), request: http(), allowed: true, policy: nil, rule: nil),
    // operation
    PolicyCase(name: "paths exact", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/health\"]"), request: http(path: "/health"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "paths ignore query", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/health\"]"), request: http(path: "/health?x=1"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "paths prefix", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/api/*\"]"), request: http(path: "/api/v1/users"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "paths suffix", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"*.png\"]"), request: http(path: "/img/a.png"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "paths mismatch", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/api/*\"]"), request: http(path: "/admin"), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "notPaths", yaml: ap(action: "DENY", rules: "- to:\n  - operation:\n      notPaths: [\"/public/*\"]"), request: http(path: "/private"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "notPaths public", yaml: ap(action: "DENY", rules: "- to:\n  - operation:\n      notPaths: [\"/public/*\"]"), request: http(path: "/public/x"), allowed: true, policy: nil, rule: nil),
    PolicyCase(name: "methods list", yaml: ap(rules: "- to:\n  - operation:\n      methods: [\"GET\", \"HEAD\"]"), request: http(method: "HEAD"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "notMethods", yaml: ap(action: "DENY", rules: "- to:\n  - operation:\n      notMethods: [\"GET\"]"), request: http(method: "DELETE"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "hosts exact", yaml: ap(rules: "- to:\n  - operation:\n      hosts: [\"web.prod.svc\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "hosts case-insensitive", yaml: ap(rules: "- to:\n  - operation:\n      hosts: [\"WEB.prod.svc\"]"), request: http(host: "web.prod.SVC"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "hosts exact does not match with a port", yaml: ap(rules: "- to:\n  - operation:\n      hosts: [\"web.prod.svc\"]"), request: http(host: "web.prod.svc:8080"), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "hosts host:* matches any port", yaml: ap(rules: "- to:\n  - operation:\n      hosts: [\"web.prod.svc:*\"]"), request: http(host: "web.prod.svc:8080"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "hosts suffix", yaml: ap(rules: "- to:\n  - operation:\n      hosts: [\"*.svc\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "notHosts", yaml: ap(action: "DENY", rules: "- to:\n  - operation:\n      notHosts: [\"web.prod.svc\"]"), request: http(host: "evil.example"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "ports", yaml: ap(rules: "- to:\n  - operation:\n      ports: [\"8080\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "ports mismatch", yaml: ap(rules: "- to:\n  - operation:\n      ports: [\"9090\"]"), request: http(), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "notPorts", yaml: ap(action: "DENY", rules: "- to:\n  - operation:\n      notPorts: [\"8080\"]"), request: http(port: 9000), allowed: false, policy: "prod/p", rule: 0),
    // when
    PolicyCase(name: "when header", yaml: ap(rules: "- when:\n  - key: request.headers[x-env]\n    values: [\"prod\"]"), request: http(headers: ["X-Env": ["prod"]]), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "when header missing", yaml: ap(rules: "- when:\n  - key: request.headers[x-env]\n    values: [\"prod\"]"), request: http(), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "when header notValues", yaml: ap(action: "DENY", rules: "- when:\n  - key: request.headers[x-debug]\n    notValues: [\"off\"]"), request: http(headers: ["x-debug": ["on"]]), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "when source.ip", yaml: ap(rules: "- when:\n  - key: source.ip\n    values: [\"10.1.0.0/16\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "when source.namespace", yaml: ap(rules: "- when:\n  - key: source.namespace\n    values: [\"dev\"]"), request: http(other), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "when source.principal", yaml: ap(rules: "- when:\n  - key: source.principal\n    values: [\"cluster.local/ns/prod/sa/sleep\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "when destination.port", yaml: ap(rules: "- when:\n  - key: destination.port\n    values: [\"8080\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "when destination.ip", yaml: ap(rules: "- when:\n  - key: destination.ip\n    values: [\"10.9.9.0/24\"]"), request: http(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "when repeated header is joined with commas", yaml: ap(rules: "- when:\n  - key: request.headers[x-env]\n    values: [\"prod\"]"), request: http(headers: ["x-env": ["prod", "dev"]]), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "when repeated header joined value", yaml: ap(rules: "- when:\n  - key: request.headers[x-env]\n    values: [\"prod,dev\"]"), request: http(headers: ["x-env": ["prod", "dev"]]), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "when header * means present, even empty", yaml: ap(rules: "- when:\n  - key: request.headers[x-env]\n    values: [\"*\"]"), request: http(headers: ["x-env": [""]]), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "when header * absent", yaml: ap(rules: "- when:\n  - key: request.headers[x-env]\n    values: [\"*\"]"), request: http(), allowed: false, policy: nil, rule: nil),
    // empty lists are "not set" (proto3)
    PolicyCase(name: "principals [] is not set: DENY on namespaces still fires", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      namespaces: [\"prod\"]\n      principals: []"), request: http(), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "from [] is not set", yaml: ap(action: "DENY", rules: "- from: []\n  to:\n  - operation:\n      paths: [\"/admin\"]"), request: http(path: "/admin"), allowed: false, policy: "prod/p", rule: 0),
    // cluster.local is the local trust domain
    PolicyCase(name: "cluster.local principal matches the local trust domain", yaml: allowGETFromSleep, request: http("example.org/ns/prod/sa/sleep"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "cluster.local full-form prefix matches the local trust domain", yaml: ap(rules: "- from:\n  - source:\n      principals: [\"cluster.local/ns/prod/sa/*\"]"), request: http("example.org/ns/prod/sa/x"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "cluster.local short prefix is not rewritten (Istio)", yaml: ap(rules: "- from:\n  - source:\n      principals: [\"cluster.local/ns/prod/*\"]"), request: http("example.org/ns/prod/sa/x"), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "cluster.local notPrincipals of the local trust domain", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      notPrincipals: [\"cluster.local/ns/prod/sa/sleep\"]"), request: http("example.org/ns/prod/sa/sleep"), allowed: true, policy: nil, rule: nil),
    PolicyCase(name: "cluster.local DENY is not bypassed by the real trust domain", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      principals: [\"cluster.local/ns/dev/sa/tool\"]"), request: http("example.org/ns/dev/sa/tool"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "cluster.local source.principal", yaml: ap(rules: "- when:\n  - key: source.principal\n    values: [\"cluster.local/ns/prod/sa/sleep\"]"), request: http("example.org/ns/prod/sa/sleep"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "another trust domain is not an alias", yaml: ap(rules: "- from:\n  - source:\n      principals: [\"other.org/ns/prod/sa/sleep\"]"), request: http("example.org/ns/prod/sa/sleep"), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "cluster.local alias keeps the rest exact", yaml: allowGETFromSleep, request: http("example.org/ns/prod/sa/sleepy"), allowed: false, policy: nil, rule: nil),
    // path templates
    PolicyCase(name: "path template {*} one segment", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/api/{*}\"]"), request: http(path: "/api/users"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "path template {*} not two segments", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/api/{*}\"]"), request: http(path: "/api/users/1"), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "path template {*} not empty", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/api/{*}\"]"), request: http(path: "/api/"), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "path template {*} in the middle", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/foo/{*}/bar/{**}\"]"), request: http(path: "/foo/buzz/bar/baz"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "path template DENY {**} fires", yaml: ap("allow-all", rules: "- {}") + "---\n" + ap("deny-admin", action: "DENY", rules: "- to:\n  - operation:\n      paths: [\"/admin/{**}\"]"), request: http(path: "/admin/a/b"), allowed: false, policy: "prod/deny-admin", rule: 0),
    PolicyCase(name: "path template {**} zero segments", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/admin/{**}\"]"), request: http(path: "/admin/"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "path template ignores the query", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/api/{*}\"]"), request: http(path: "/api/users?x=/y"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "path template notPaths", yaml: ap(action: "DENY", rules: "- to:\n  - operation:\n      notPaths: [\"/public/{**}\"]"), request: http(path: "/private/x"), allowed: false, policy: "prod/p", rule: 0),
    // a leading * is read first
    PolicyCase(name: "*abc* is a suffix match", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"*/v1*\"]"), request: http(path: "/api/v1*"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "*abc* is not a substring match", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"*/v1*\"]"), request: http(path: "/api/v1/users"), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "namespace after a longer path prefix", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      namespaces: [\"prod\"]"), request: http("td/k8s/ns/prod/sa/x"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "path template doc: {**}/ matches a double slash", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/foo/{**}/\"]"), request: http(path: "/foo//"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "path template doc: {**}/ needs the trailing slash", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/foo/{**}/\"]"), request: http(path: "/foo/bar"), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "path template {**} then a literal suffix", yaml: ap(rules: "- to:\n  - operation:\n      paths: [\"/v/{**}/end\"]"), request: http(path: "/v/a/b/end"), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "namespace needs a segment after it (Istio: .*/ns/<ns>/.*)", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      namespaces: [\"prod\"]"), request: http("td/ns/prod"), allowed: true, policy: nil, rule: nil),
    PolicyCase(name: "namespace of a trust domain named ns", yaml: ap(rules: "- from:\n  - source:\n      namespaces: [\"prod\"]"), request: http("ns/ns/prod/sa/x"), allowed: true, policy: "prod/p", rule: 0),
    // dual-stack listeners
    PolicyCase(name: "IPv4-mapped peer is its IPv4 address", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      ipBlocks: [\"10.1.0.0/16\"]"), request: http(ip: "::ffff:10.1.2.3"), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "when all conditions must hold", yaml: ap(rules: "- when:\n  - key: source.namespace\n    values: [\"prod\"]\n  - key: destination.port\n    values: [\"1\"]"), request: http(), allowed: false, policy: nil, rule: nil),
    // rule structure and order
    PolicyCase(name: "any from entry", yaml: ap(rules: "- from:\n  - source:\n      namespaces: [\"x\"]\n  - source:\n      namespaces: [\"dev\"]"), request: http(other), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "second rule decides", yaml: ap(rules: "- to:\n  - operation:\n      methods: [\"PUT\"]\n- to:\n  - operation:\n      methods: [\"GET\"]"), request: http(), allowed: true, policy: "prod/p", rule: 1),
    PolicyCase(name: "DENY wins over ALLOW", yaml: ap("allow-all", rules: "- {}") + "---\n" + ap("deny-admin", action: "DENY", rules: "- to:\n  - operation:\n      paths: [\"/admin*\"]"), request: http(path: "/admin/x"), allowed: false, policy: "prod/deny-admin", rule: 0),
    PolicyCase(name: "ALLOW after DENY miss", yaml: ap("allow-all", rules: "- {}") + "---\n" + ap("deny-admin", action: "DENY", rules: "- to:\n  - operation:\n      paths: [\"/admin*\"]"), request: http(path: "/x"), allowed: true, policy: "prod/allow-all", rule: 0),
    PolicyCase(name: "AUDIT never decides", yaml: ap("audit", action: "AUDIT", rules: "- {}"), request: http(), allowed: true, policy: nil, rule: nil),
    // scope
    PolicyCase(name: "other namespace does not apply", yaml: ap(ns: "dev", rules: nil), request: http(), allowed: true, policy: nil, rule: nil),
    PolicyCase(name: "root namespace applies mesh-wide", yaml: ap("mesh", ns: "istio-system", action: "DENY", rules: "- from:\n  - source:\n      notPrincipals: [\"*\"]"), request: http(nil), allowed: false, policy: "istio-system/mesh", rule: 0),
    PolicyCase(name: "selector matches labels", yaml: ap(selector: "app: web", rules: nil), request: http(), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "selector other labels does not apply", yaml: ap(selector: "app: db", rules: nil), request: http(), allowed: true, policy: nil, rule: nil),
    // TCP
    PolicyCase(name: "TCP ALLOW with HTTP fields never matches", yaml: ap(rules: "- to:\n  - operation:\n      methods: [\"GET\"]"), request: tcp(), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "TCP ALLOW on ports matches", yaml: ap(rules: "- to:\n  - operation:\n      ports: [\"5432\"]"), request: tcp(), allowed: true, policy: "prod/p", rule: 0),
    PolicyCase(name: "TCP DENY with HTTP fields matches", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      principals: [\"cluster.local/ns/prod/sa/sleep\"]\n  to:\n  - operation:\n      methods: [\"DELETE\"]"), request: tcp(), allowed: false, policy: "prod/p", rule: 0),
    PolicyCase(name: "TCP DENY still needs its TCP fields", yaml: ap(action: "DENY", rules: "- from:\n  - source:\n      principals: [\"cluster.local/ns/prod/sa/sleep\"]\n  to:\n  - operation:\n      methods: [\"DELETE\"]"), request: tcp(other), allowed: true, policy: nil, rule: nil),
    PolicyCase(name: "TCP header condition in ALLOW", yaml: ap(rules: "- when:\n  - key: request.headers[x]\n    values: [\"y\"]"), request: tcp(), allowed: false, policy: nil, rule: nil),
    PolicyCase(name: "TCP principals", yaml: ap(rules: "- from:\n  - source:\n      principals: [\"cluster.local/ns/prod/sa/sleep\"]"), request: tcp(), allowed: true, policy: "prod/p", rule: 0),
]

@Suite("Istio AuthorizationPolicy semantics")
struct PolicyEvaluationTests {
    @Test(arguments: cases)
    func decides(_ c: PolicyCase) throws {
        let set = try PolicyLoader.parse(c.yaml, file: "case.yaml")
        let decision = PolicyEvaluator(policies: set.authorizationPolicies).evaluate(c.request, for: web)
        #expect(decision.allowed == c.allowed)
        #expect(decision.policy == c.policy)
        #expect(decision.rule == c.rule)
    }

    @Test func atLeastSixtyCases() {
        #expect(cases.count >= 60)
    }

    @Test func dryRunIsReportedNotEnforced() throws {
        func dryRun(_ name: String, action: String, rules: String) -> String {
            ap(name, action: action, rules: rules).replacingOccurrences(
                of: "  namespace: prod\n", with: "  namespace: prod\n  annotations:\n    istio.io/dry-run: \"true\"\n")
        }
        let yaml = dryRun("deny-all", action: "DENY", rules: "- {}") + "---\n" + dryRun("allow-nothing", action: "ALLOW", rules: "- to:\n  - operation:\n      paths: [\"/x\"]")
        let set = try PolicyLoader.parse(yaml, file: "dry.yaml")
        #expect(set.authorizationPolicies.map(\.dryRun) == [true, true])
        let decision = PolicyEvaluator(policies: set.authorizationPolicies).evaluate(http(), for: web)
        #expect(decision.allowed && decision.policy == nil)
        #expect(decision.audited == ["prod/deny-all [dry-run DENY]"])
        #expect(decision.ledgerDetail(nil) == "audit: prod/deny-all [dry-run DENY]")
        #expect(decision.ledgerDetail("app unreachable") == "app unreachable; audit: prod/deny-all [dry-run DENY]")
        #expect(AuthorizationDecision(allowed: true).ledgerDetail(nil) == nil)
        let off = try PolicyLoader.parse(ap(action: "DENY", rules: "- {}").replacingOccurrences(
            of: "  namespace: prod\n", with: "  namespace: prod\n  annotations:\n    istio.io/dry-run: \"false\"\n"), file: "on.yaml")
        #expect(!PolicyEvaluator(policies: off.authorizationPolicies).evaluate(http(), for: web).allowed)
    }

    @Test func auditIsReported() throws {
        let set = try PolicyLoader.parse(ap("audit", action: "AUDIT", rules: "- {}"), file: "a.yaml")
        #expect(PolicyEvaluator(policies: set.authorizationPolicies).evaluate(http(), for: web).audited == ["prod/audit"])
    }

    /// The proxy's path: policies split by action once, then many requests. Every matching AUDIT
    /// policy is reported in the workload's order whatever decides; DENY wins over ALLOW; ALLOW
    /// policies are tried in order; with ALLOW policies present and none matching, deny.
    @Test func preparedPoliciesKeepIstioOrder() throws {
        let yaml = [ap("z-audit", action: "AUDIT", rules: "- {}"),
                    ap("allow-get", action: "ALLOW", rules: "- to:\n  - operation:\n      methods: [\"GET\"]"),
                    ap("a-audit", action: "AUDIT", rules: "- to:\n  - operation:\n      paths: [\"/admin*\"]"),
                    ap("deny-admin", action: "DENY", rules: "- to:\n  - operation:\n      paths: [\"/admin*\"]"),
                    ap("allow-post", action: "ALLOW", rules: "- to:\n  - operation:\n      methods: [\"POST\"]")]
            .joined(separator: "---\n")
        let evaluator = PolicyEvaluator(policies: try PolicyLoader.parse(yaml, file: "set.yaml").authorizationPolicies)
        let prepared = PreparedPolicies(evaluator.applicable(to: web))
        let admin = evaluator.evaluate(http(path: "/admin/x"), prepared: prepared)
        #expect(!admin.allowed && admin.policy == "prod/deny-admin" && admin.rule == 0)
        #expect(admin.audited == ["prod/a-audit", "prod/z-audit"])
        let post = evaluator.evaluate(http(method: "POST"), prepared: prepared)
        #expect(post.allowed && post.policy == "prod/allow-post" && post.audited == ["prod/z-audit"])
        let put = evaluator.evaluate(http(method: "PUT"), prepared: prepared)
        #expect(!put.allowed && put.policy == nil && put.audited == ["prod/z-audit"])
        for request in [http(path: "/admin/x"), http(method: "POST"), http(method: "PUT"), http()] {
            #expect(evaluator.evaluate(request, prepared: prepared) == evaluator.evaluate(request, for: web))
        }
    }
}

@Suite("Policy loading errors")
struct PolicyLoadingTests {
    func failure(_ yaml: String) -> PolicyLoadError? {
        do {
            _ = try PolicyLoader.parse(yaml, file: "bad.yaml")
            return nil
        } catch {
            return error
        }
    }

    @Test func unknownFieldIsNamed() throws {
        let e = try #require(failure(ap(rules: "- from:\n  - source:\n      principal: [\"x\"]")))
        #expect(e.field == "spec.rules[0].from[0].source.principal")
        #expect(e.document == 1)
        #expect(e.description.contains("bad.yaml"))
    }

    @Test func customIsUnsupported() throws {
        let e = try #require(failure(ap(action: "CUSTOM", rules: "- {}")))
        #expect(e.problem.contains("not supported"))
    }

    @Test func secondDocumentIsNamed() throws {
        let e = try #require(failure(ap(rules: "- {}") + "---\n" + ap("two", action: "MAYBE", rules: nil)))
        #expect(e.document == 2)
        #expect(e.field == "spec.action")
    }

    @Test func malformedYAMLAndBadValues() {
        #expect(failure("apiVersion: [unclosed") != nil)
        #expect(failure(ap(rules: "- from:\n  - source:\n      ipBlocks: [\"10.0.0.0/33\"]")) != nil)
        #expect(failure(ap(rules: "- to:\n  - operation:\n      ports: [\"http\"]")) != nil)
        #expect(failure(ap(rules: "- when:\n  - key: request.auth.claims[iss]\n    values: [\"x\"]")) != nil)
        #expect(failure(ap(rules: "- when:\n  - key: source.ip")) != nil)
        #expect(failure("apiVersion: security.istio.io/v1\nkind: Gateway\nmetadata:\n  name: g\n") != nil)
        #expect(failure("apiVersion: networking.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: g\n") != nil)
    }

    /// What Istio's validation refuses (or what would silently weaken a policy) is a load error
    /// naming the field, never a crash or a rule that matches more than written.
    @Test func refusedLikeIstio() throws {
        let refusals: [(String, String, String)] = [
            (ap(rules: "- ~"), "spec.rules[0]", "must not be null"),
            (ap(action: "DENY", rules: nil), "spec.rules", "never matches"),
            (ap(rules: "- {}").replacingOccurrences(of: "metadata:\n", with: "metadata:\n  annotations: {istio.io/dry-run: \"tRuE\"}\n"), "metadata.annotations.istio.io/dry-run", "not a boolean"),
            (ap(rules: "- {}").replacingOccurrences(of: "metadata:\n", with: "metadata:\n  annotations: {istio.io/dry-run: yes}\n"), "metadata.annotations.istio.io/dry-run", "not a boolean"),
            (ap(action: "AUDIT", rules: "- {}").replacingOccurrences(of: "metadata:\n", with: "metadata:\n  annotations: {istio.io/dry-run: \"true\"}\n"), "metadata.annotations.istio.io/dry-run", "only on ALLOW and DENY"),
            (ap(rules: "-"), "spec.rules[0]", "must not be null"),
            (ap(rules: "- from:\n  - source: {}"), "spec.rules[0].from[0].source", "must not be empty"),
            (ap(rules: "- from:\n  - source:\n      principals: []"), "spec.rules[0].from[0].source", "must not be empty"),
            (ap(rules: "- to:\n  - operation: {}"), "spec.rules[0].to[0].operation", "must not be empty"),
            (ap(rules: "- from:\n  - source:\n      principals: [\"\"]"), "spec.rules[0].from[0].source.principals[0]", "must not be empty"),
            (ap(rules: "- when:\n  - key: destination.port\n    values: [\"08080\"]"), "spec.rules[0].when[0]", "not a port number"),
            (ap(rules: "- to:\n  - operation:\n      ports: [\"0\"]"), "spec.rules[0].to[0].operation.ports", "not a port number"),
            (ap(rules: "- when:\n  - key: connection.sni\n    values: [\"a\"]"), "spec.rules[0].when[0].key", "not supported"),
            (ap(rules: "- when:\n  - key: source.ip\n    values: []"), "spec.rules[0].when[0]", "needs values or notValues"),
            (ap(rules: "- to:\n  - operation:\n      paths: [\"/foo/{*}.txt\"]"), "spec.rules[0].to[0].operation.paths", "share a path segment"),
            (ap(rules: "- to:\n  - operation:\n      paths: [\"/{**}/foo/{*}\"]"), "spec.rules[0].to[0].operation.paths", "last operator"),
            (ap(rules: "- to:\n  - operation:\n      notPaths: [\"/*/baz/{*}\"]"), "spec.rules[0].to[0].operation.notPaths", "outside {*}"),
            (ap(rules: "- {}").replacingOccurrences(of: "spec:\n", with: "spec:\n  action: ALLOW\n  action: DENY\n"), "", "duplicated key"),
            (ap(rules: "- {}") + "  ? [a, b]\n  : x\n", "spec", "plain value"),
            (ap(rules: "- to:\n  - operation:\n      ports: [0x1F90]"), "spec.rules[0].to[0].operation.ports", "not a port number"),
            (ap(rules: "- to:\n  - operation:\n      ports: [010]"), "spec.rules[0].to[0].operation.ports", "not a port number"),
            (ap(rules: "- {}").replacingOccurrences(of: "metadata:\n", with: "metadata:\n  <<: {namespace: dev}\n"), "metadata.<<", "merge keys"),
            (billionLaughs, "", "anchors and aliases"),
            ("k: &a [x]\n? *a\n: y\n" + ap(rules: "- {}"), "", "anchors and aliases"),
            (ap(rules: "- {}").replacingOccurrences(of: "spec:\n", with: "spec: !!map &s\n"), "", "anchors and aliases"),
        ]
        for (yaml, field, problem) in refusals {
            let e = try #require(failure(yaml), "loaded: \(yaml)")
            #expect(field == "*" || e.field == field, "\(yaml)")
            #expect(e.problem.contains(problem), "\(e.problem)")
        }
    }

    /// Nested aliases that expand exponentially (each level doubles ten times over).
    var billionLaughs: String {
        var out = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
        for i in 1...6 { out += "a\(i): &a\(i) [" + Array(repeating: "*a\(i - 1)", count: 10).joined(separator: ", ") + "]\n" }
        return out + "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: prod}\nspec: {rules: [{}]}\nboom: *a6\n"
    }

    /// A directory's `.json` files load with its YAML (as `kubectl apply -f DIR` reads them); a
    /// file that is not UTF-8 is refused, not read with its bad bytes replaced.
    @Test func directoryReadsJSONAndRefusesBadUTF8() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("policies-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try ap("allow", rules: "- {}").write(toFile: "\(dir)/a.yaml", atomically: false, encoding: .utf8)
        let json = #"{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "deny-json", "namespace": "prod"}, "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/json"]}}]}]}}"#
        try json.write(toFile: "\(dir)/b.json", atomically: false, encoding: .utf8)
        let set = try PolicyLoader.load(path: dir)
        #expect(set.authorizationPolicies.map(\.qualifiedName) == ["prod/allow", "prod/deny-json"])
        #expect(!PolicyEvaluator(policies: set.authorizationPolicies).evaluate(http(path: "/json"), for: web).allowed)

        var bad = Data(ap("ev", action: "DENY", rules: "- from:\n  - source:\n      namespaces: [\"evXil\"]").utf8)
        bad[bad.firstIndex(of: UInt8(ascii: "X"))!] = 0xFF
        try bad.write(to: URL(fileURLWithPath: "\(dir)/c.yaml"))
        #expect { try PolicyLoader.load(path: dir) } throws: { ($0 as? PolicyLoadError)?.problem.contains("not valid UTF-8") == true }
    }

    /// What a proxy collects from each request: headers that rules read, X-Forwarded-For when a
    /// rule reads the remote address, never pseudo-headers or `host` (the request's own fields).
    @Test func headerNamesAProxyCollects() throws {
        let set = try PolicyLoader.parse(ap(rules: "- when:\n  - key: request.headers[X-Env]\n    values: [\"a\"]\n  - key: request.headers[:method]\n    values: [\"GET\"]\n  - key: request.headers[Host]\n    values: [\"a\"]")
            + "---\n" + ap("r", rules: "- from:\n  - source:\n      notRemoteIpBlocks: [\"10.0.0.0/8\"]"), file: "h.yaml")
        #expect(AuthorizationPolicy.headerNamesRead(by: set.authorizationPolicies) == ["x-env", "x-forwarded-for"])
        #expect(AuthorizationPolicy.headerNamesRead(by: [set.authorizationPolicies[0]]) == ["x-env"])
    }

    @Test func ampersandsInValuesStillLoad() throws {
        let yaml = ap(rules: "- to:\n  - operation:\n      paths: [\"/q&x\", /a&b]\n  when:\n  - key: request.headers[x-q]\n    values: [\"a & b\", c&d]")
        let set = try PolicyLoader.parse(yaml, file: "amp.yaml")
        #expect(set.authorizationPolicies.first?.rules.first?.to.first?.paths == ["/q&x", "/a&b"])
        #expect(set.authorizationPolicies.first?.rules.first?.when.first?.values == ["a & b", "c&d"])
    }

    @Test func nullAnnotationsAndDryRunAllow() throws {
        let yaml = ap(rules: "- to:\n  - operation:\n      paths: [\"/x\"]").replacingOccurrences(
            of: "  namespace: prod\n", with: "  namespace: prod\n  annotations:\n    istio.io/dry-run: \"true\"\n")
        let set = try PolicyLoader.parse(yaml + "---\n" + ap("q", rules: "- {}").replacingOccurrences(of: "  namespace: prod\n", with: "  namespace: prod\n  annotations: ~\n"), file: "a.yaml")
        let evaluator = PolicyEvaluator(policies: set.authorizationPolicies)
        let matched = evaluator.evaluate(http(path: "/x"), for: web)
        #expect(matched.allowed && matched.policy == "prod/q" && matched.audited == ["prod/p [dry-run ALLOW]"])
        #expect(evaluator.evaluate(http(path: "/y"), for: web).audited.isEmpty)
    }

    @Test func peerAuthenticationRefusals() throws {
        let portsWithoutSelector = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: n\n  namespace: prod\nspec:\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    9090:\n      mode: DISABLE\n"
        let e = try #require(failure(portsWithoutSelector))
        #expect(e.field == "spec.portLevelMtls" && e.problem.contains("requires spec.selector"))
        let padded = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: w\n  namespace: prod\nspec:\n  selector:\n    matchLabels:\n      app: web\n  portLevelMtls:\n    08080:\n      mode: DISABLE\n"
        let zero = try #require(failure(padded))
        #expect(zero.field == "spec.portLevelMtls.08080" && zero.problem.contains("not a port number"))
        let directory = FileManager.default.temporaryDirectory.path + "/sigil-pa-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let document = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: n\n  namespace: prod\nspec: {}\n"
        for name in ["a.yaml", "b.yaml"] {
            try document.write(toFile: directory + "/" + name, atomically: true, encoding: .utf8)
        }
        let twice = #expect(throws: PolicyLoadError.self) { try PolicyLoader.load(path: directory) }
        #expect(twice?.problem.contains("PeerAuthentication prod/n is defined twice") == true)
    }

    @Test func peerAuthenticationLoads() throws {
        let yaml = """
        apiVersion: security.istio.io/v1beta1
        kind: PeerAuthentication
        metadata:
          name: strict
          namespace: prod
        spec:
          selector:
            matchLabels:
              app: web
          mtls:
            mode: STRICT
          portLevelMtls:
            9090:
              mode: DISABLE
        """
        let set = try PolicyLoader.parse(yaml, file: "pa.yaml")
        #expect(set.peerAuthentications.first?.mode == .strict)
        #expect(set.peerAuthentications.first?.portLevelMtls[9090] == .disable)
    }
}

@Suite("Istio PeerAuthentication resolution")
struct PeerAuthenticationTests {
    func pa(_ name: String, ns: String, selector: String? = nil, mode: String?, ports: [Int: String] = [:]) -> String {
        var out = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: \(name)\n  namespace: \(ns)\nspec:\n"
        if let selector { out += "  selector:\n    matchLabels:\n      \(selector)\n" }
        if let mode { out += "  mtls:\n    mode: \(mode)\n" }
        if !ports.isEmpty {
            out += "  portLevelMtls:\n" + ports.map { "    \($0.key):\n      mode: \($0.value)\n" }.joined()
        }
        return out
    }

    func mode(_ docs: [String], port: Int? = 8080) throws -> PeerAuthentication.Mode {
        let set = try PolicyLoader.parse(docs.joined(separator: "---\n"), file: "pa.yaml")
        return PeerAuthenticationResolver(policies: set.peerAuthentications).mode(for: web, port: port)
    }

    @Test func defaultsToPermissive() throws { #expect(try mode([]) == .permissive) }
    @Test func meshWideStrict() throws { #expect(try mode([pa("m", ns: "istio-system", mode: "STRICT")]) == .strict) }
    @Test func namespaceOverridesMesh() throws {
        #expect(try mode([pa("m", ns: "istio-system", mode: "STRICT"), pa("n", ns: "prod", mode: "PERMISSIVE")]) == .permissive)
    }
    @Test func workloadOverridesNamespace() throws {
        #expect(try mode([pa("n", ns: "prod", mode: "PERMISSIVE"), pa("w", ns: "prod", selector: "app: web", mode: "STRICT")]) == .strict)
    }
    @Test func unsetInherits() throws {
        #expect(try mode([pa("n", ns: "prod", mode: "STRICT"), pa("w", ns: "prod", selector: "app: web", mode: "UNSET")]) == .strict)
    }
    @Test func otherNamespaceIgnored() throws { #expect(try mode([pa("n", ns: "dev", mode: "STRICT")]) == .permissive) }
    @Test func otherLabelsIgnored() throws { #expect(try mode([pa("w", ns: "prod", selector: "app: db", mode: "STRICT")]) == .permissive) }
    @Test func portLevelOverride() throws {
        let docs = [pa("w", ns: "prod", selector: "app: web", mode: "STRICT", ports: [9090: "DISABLE"])]
        #expect(try mode(docs, port: 9090) == .disable)
        #expect(try mode(docs, port: 8080) == .strict)
    }
    @Test func emptySelectorIsNamespaceWide() throws {
        let empty = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: e\n  namespace: prod\nspec:\n  selector:\n    matchLabels: {}\n  mtls:\n    mode: PERMISSIVE\n"
        let set = try PolicyLoader.parse(empty, file: "pa.yaml")
        #expect(set.peerAuthentications.first?.matchLabels == nil)
        // Namespace-wide, so a workload policy still overrides it.
        #expect(try mode([empty, pa("w", ns: "prod", selector: "app: web", mode: "STRICT")]) == .strict)
    }
    /// Two policies at one level: the older applies (Istio's `creationTimestamp` order; name only
    /// breaks a tie), so a newer PERMISSIVE cannot undo an older STRICT.
    @Test func oldestAtOneLevelWins() throws {
        func stamped(_ name: String, _ time: String, _ mode: String) -> String {
            pa(name, ns: "prod", mode: mode).replacingOccurrences(of: "  namespace: prod\n", with: "  namespace: prod\n  creationTimestamp: \"\(time)\"\n")
        }
        #expect(try mode([stamped("a-permissive", "2025-06-01T00:00:00Z", "PERMISSIVE"), stamped("b-strict", "2024-01-01T00:00:00Z", "STRICT")]) == .strict)
        #expect(try mode([stamped("a-permissive", "2023-06-01T00:00:00.5Z", "PERMISSIVE"), stamped("b-strict", "2024-01-01T00:00:00Z", "STRICT")]) == .permissive)
        // unquoted (YAML reads a timestamp), and no time at all counts as oldest
        let unquoted = pa("z", ns: "prod", mode: "DISABLE").replacingOccurrences(of: "  namespace: prod\n", with: "  namespace: prod\n  creationTimestamp: 2020-01-01T00:00:00Z\n")
        #expect(try mode([stamped("a", "2021-01-01T00:00:00Z", "STRICT"), unquoted]) == .disable)
        #expect(try mode([stamped("a", "2021-01-01T00:00:00Z", "STRICT"), pa("b", ns: "prod", mode: "PERMISSIVE")]) == .permissive)
        #expect(try mode([pa("b", ns: "prod", mode: "STRICT"), pa("a", ns: "prod", mode: "PERMISSIVE")]) == .permissive)
        let bad = stamped("a", "yesterday", "STRICT")
        #expect(throws: PolicyLoadError.self) { try PolicyLoader.parse(bad, file: "pa.yaml") }
    }
    @Test func rootNamespaceSelectorIsIgnored() throws {
        let root = WorkloadSelector(namespace: "istio-system", labels: ["app": "web"])
        let set = try PolicyLoader.parse(pa("w", ns: "istio-system", selector: "app: web", mode: "STRICT"), file: "pa.yaml")
        #expect(PeerAuthenticationResolver(policies: set.peerAuthentications).mode(for: root, port: 8080) == .permissive)
    }
}
