import Testing
import SigilCore

/// Istio's BASE path normalization: what authorization sees is what the app gets.
struct RequestTargetTests {
    @Test("normalization", arguments: [
        ("/api/orders?x=1", "/api/orders?x=1"),
        ("/%61dmin/x", "/admin/x"),
        ("/ok/../admin", "/admin"),
        ("/ok/%2e%2e/admin", "/admin"),
        ("/ok\\..\\admin", "/admin"),
        ("/a/./b/", "/a/b/"),
        ("/../..", "/"),
        ("/a%2Fb", "/a%2Fb"),
        ("//admin", "//admin"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a/b/..?q=/../", "/a/?q=/../"),
    ])
    func normalize(raw: String, expected: String) {
        #expect(RequestTarget.normalize(raw)?.uri == expected)
    }

    /// Istio's stricter levels (its advice against CVE-2021-31920 when policies match paths).
    @Test("MERGE_SLASHES and DECODE_AND_MERGE_SLASHES", arguments: [
        ("//admin", "/admin", "/admin"),
        ("/public//secret/", "/public/secret/", "/public/secret/"),
        ("/a//../b", "/a/b", "/a/b"),  // dot segments first, then merging, as Envoy
        ("//", "/", "/"),
        ("/public/..%2fadmin", "/public/..%2fadmin", "/admin"),
        ("/a%2F%2Fb%5cc?x=//", "/a%2F%2Fb%5cc?x=//", "/a/b/c?x=//"),
        ("/api/orders?x=1", "/api/orders?x=1", "/api/orders?x=1"),
    ])
    func stricterLevels(raw: String, merged: String, decoded: String) {
        #expect(RequestTarget.normalize(raw, .mergeSlashes)?.uri == merged)
        #expect(RequestTarget.normalize(raw, .decodeAndMergeSlashes)?.uri == decoded)
        #expect(RequestTarget.Normalization(flag: "decode_and_merge_slashes") == .decodeAndMergeSlashes)
        #expect(RequestTarget.Normalization(flag: "NONE") == nil)
    }

    @Test("absolute form yields its path and authority")
    func absolute() {
        let t = RequestTarget.normalize("http://api.shop:8080/admin/../x")
        #expect(t?.uri == "/x")
        #expect(t?.authority == "api.shop:8080")
    }

    @Test("refused targets", arguments: ["/a%00b", "admin", "", "/x#/../admin", "/ok#frag", "/ok?a=1#/../admin", "http://h/x#y"])
    func refused(raw: String) {
        #expect(RequestTarget.normalize(raw) == nil)
    }
}
