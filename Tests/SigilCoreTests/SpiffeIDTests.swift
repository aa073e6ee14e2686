import Testing
import SigilCore

/// Valid and invalid SPIFFE IDs, rule by rule from the SPIFFE-ID specification (sections 2.1–2.3).
@Suite("SpiffeID")
struct SpiffeIDTests {
    static let valid: [String] = [
        "spiffe://example.org",
        "spiffe://example.org/workload",
        "spiffe://example.org/ns/default/sa/web",
        "spiffe://cluster.local/ns/istio-system/sa/istiod",
        "spiffe://a",
        "spiffe://1.2.3.4/x",
        "spiffe://my_domain-1.example/x",
        "spiffe://example.org/UPPER/Case/Path",
        "spiffe://example.org/a.b/c-d/e_f",
        "spiffe://example.org/...",
        "spiffe://example.org/.a",
        "spiffe://example.org/..a",
        "spiffe://example.org/a/b/c/d/e/f/g/h",
        "spiffe://example.org/0123456789",
        "spiffe://" + String(repeating: "a", count: 255),
        "spiffe://example.org/" + String(repeating: "x", count: 2048 - 21),
        "spiffe://xn--bcher-kva.example/x",
        "spiffe://example.org/sigil/agent/join_token/abc",
    ]

    /// Each invalid ID with a word its error message must contain (the rule it broke).
    static let invalid: [(String, String)] = [
        ("", "empty"),
        ("example.org/workload", "spiffe://"),
        ("spiffe:/example.org/x", "spiffe://"),
        ("spiffe:example.org", "spiffe://"),
        ("SPIFFE://example.org/x", "lowercase"),
        ("Spiffe://example.org/x", "lowercase"),
        ("http://example.org/x", "spiffe://"),
        ("spiffe//example.org", "spiffe://"),
        ("spiffe://", "missing"),
        ("spiffe:///path", "missing"),
        ("spiffe://Example.org/x", "lowercase"),
        ("spiffe://EXAMPLE.ORG", "lowercase"),
        ("spiffe://example.org:8080/x", "port"),
        ("spiffe://user@example.org/x", "userinfo"),
        ("spiffe://user:pass@example.org/x", "port"),
        ("spiffe://exa%41mple.org/x", "percent"),
        ("spiffe://example.org/a%20b", "percent"),
        ("spiffe://exa mple.org/x", "character"),
        ("spiffe://example!.org/x", "character"),
        ("spiffe://exämple.org/x", "character"),
        ("spiffe://example.org/", "trailing slash"),
        ("spiffe://example.org/a/", "trailing slash"),
        ("spiffe://example.org//a", "empty path segment"),
        ("spiffe://example.org/a//b", "empty path segment"),
        ("spiffe://example.org/.", "dot segment"),
        ("spiffe://example.org/..", "dot segment"),
        ("spiffe://example.org/a/./b", "dot segment"),
        ("spiffe://example.org/a/../b", "dot segment"),
        ("spiffe://example.org/x?query=1", "query"),
        ("spiffe://example.org?x", "query"),
        ("spiffe://example.org/x#frag", "fragment"),
        ("spiffe://example.org#frag", "fragment"),
        ("spiffe://example.org/a b", "character"),
        ("spiffe://example.org/a:b", "character"),
        ("spiffe://example.org/a@b", "character"),
        ("spiffe://example.org/a*b", "character"),
        ("spiffe://example.org/ä", "character"),
        ("spiffe://example.org/a\\b", "character"),
        ("spiffe://" + String(repeating: "a", count: 256), "255"),
        ("spiffe://example.org/" + String(repeating: "x", count: 2048 - 20), "2048"),
        (" spiffe://example.org/x", "spiffe://"),
        ("spiffe://example.org/x ", "character"),
        ("spiffe://example.org/x\n", "0x0A"),
    ]

    @Test("accepts valid IDs", arguments: valid)
    func acceptsValid(_ string: String) throws {
        let id = try SpiffeID(string)
        #expect(id.description == string)
        #expect(try SpiffeID(id.description) == id)
    }

    @Test("rejects invalid IDs, naming the rule", arguments: invalid)
    func rejectsInvalid(_ string: String, _ rule: String) {
        do {
            let id = try SpiffeID(string)
            Issue.record("accepted invalid SPIFFE ID '\(string)' as \(id)")
        } catch {
            #expect(error.code == .invalidSpiffeID)
            #expect(error.message.lowercased().contains(rule.lowercased()), "message '\(error.message)' should mention '\(rule)'")
        }
    }

    @Test func casesCoverTheSpec() {
        #expect(Self.valid.count + Self.invalid.count >= 40)
    }

    @Test func parts() throws {
        let id = try SpiffeID("spiffe://cluster.local/ns/prod/sa/api")
        #expect(id.trustDomain.name == "cluster.local")
        #expect(id.path == "/ns/prod/sa/api")
        #expect(id.namespace == "prod")
        #expect(id.serviceAccount == "api")
        #expect(id.istioPrincipal == "cluster.local/ns/prod/sa/api")
        #expect(!id.isTrustDomainID)
        #expect(try SpiffeID(trustDomain: TrustDomain("cluster.local"), namespace: "prod", serviceAccount: "api") == id)
    }

    @Test func istioPrincipalRoundTrip() throws {
        let fromPrincipal = try SpiffeID(istioPrincipal: "cluster.local/ns/default/sa/sleep")
        #expect(fromPrincipal.description == "spiffe://cluster.local/ns/default/sa/sleep")
        #expect(try SpiffeID(istioPrincipal: fromPrincipal.description) == fromPrincipal)
        #expect(fromPrincipal.istioPrincipal == "cluster.local/ns/default/sa/sleep")
        #expect(throws: SigilError.self) { try SpiffeID(istioPrincipal: "cluster.local/ns//sa/x") }
    }

    @Test func nonIstioShapesHaveNoNamespace() throws {
        for s in ["spiffe://td/workload", "spiffe://td/ns/a", "spiffe://td/ns/a/sa", "spiffe://td/ns/a/sa/b/c", "spiffe://td/x/a/sa/b", "spiffe://td"] {
            let id = try SpiffeID(s)
            #expect(id.namespace == nil, "\(s)")
            #expect(id.serviceAccount == nil, "\(s)")
        }
    }

    @Test func trustDomainParsing() throws {
        #expect(try TrustDomain("example.org").name == "example.org")
        #expect(try TrustDomain("spiffe://example.org/ns/a/sa/b").name == "example.org")
        #expect(try TrustDomain("example.org").id.description == "spiffe://example.org")
        #expect(try TrustDomain("example.org").id.isTrustDomainID)
        for bad in ["", "Example.org", "example.org:443", "a/b", "exa%mple", String(repeating: "x", count: 256)] {
            #expect(throws: SigilError.self, "\(bad)") { try TrustDomain(bad) }
        }
    }

    @Test func buildingFromPartsValidatesThePath() throws {
        let td = try TrustDomain("example.org")
        #expect(throws: SigilError.self) { try SpiffeID(trustDomain: td, path: "no-slash") }
        #expect(throws: SigilError.self) { try SpiffeID(trustDomain: td, namespace: "a/b", serviceAccount: "c") }
        #expect(throws: SigilError.self) { try SpiffeID(trustDomain: td, namespace: "..", serviceAccount: "c") }
        #expect(try SpiffeID(trustDomain: td, path: "").isTrustDomainID)
    }
}
