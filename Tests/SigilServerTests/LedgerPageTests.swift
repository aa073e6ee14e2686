import Testing
import Foundation
import Logging
import SigilCore
import SigilStore
@testable import SigilServer

/// The ledger page: query parsing, escaping, the SVG graph's shapes and attributes, and the routes
/// answered over a real (in-memory SQLite) ledger store.
@Suite("LedgerPage")
struct LedgerPageTests {
    static let web = "spiffe://example.org/ns/shop/sa/web"
    static let api = "spiffe://example.org/ns/shop/sa/api"
    static let db = "spiffe://example.org/ns/shop/sa/db"
    static let now: Int64 = 1_764_000_100_000_000
    static let uploader = "spiffe://example.org/ns/shop/sa/api"

    struct Call {
        var source: String?
        var destination: String
        var path = "/orders"
        var decision = "allow"
        var mtls = true
        var time: Int64 = LedgerPageTests.now - 60_000_000
    }

    /// One writer's chained rows, exactly as a proxy spool chains them.
    static func rows(_ writer: String, _ calls: [Call]) throws -> [LedgerRow] {
        var previous = LedgerChain.genesis
        var out: [LedgerRow] = []
        for (i, call) in calls.enumerated() {
            let seq = UInt64(i + 1)
            let record = LedgerRecord(kind: .request, timeMicros: call.time + Int64(i), source: call.source, destination: call.destination,
                                      proto: "http/1.1", method: "GET", path: call.path, status: call.decision == "deny" ? 403 : 200,
                                      decision: call.decision, policy: "shop/api-from-web", rule: 0, mtls: call.mtls, durationMicros: 250)
            let body = Array(record.json(writer: writer, seq: seq, prev: previous).utf8)
            let hash = try LedgerChain.hashes(of: body + Array(",\"hash\":\"\(LedgerChain.genesis)\"}".utf8)).computed
            out.append(try LedgerRow.parse(line: body + Array(",\"hash\":\"\(hash)\"}".utf8)))
            previous = hash
        }
        return out
    }

    /// A store holding web→api (mTLS, 3 allowed, 2 denied), plaintext→api (1 denied) and api→db (mTLS, 2 allowed).
    static func store() async throws -> SQLiteDatastore {
        let store = try SQLiteDatastore(inMemory: ())
        var calls: [Call] = (0..<3).map { _ in Call(source: web, destination: api) }
        calls += [Call(source: web, destination: api, path: "/admin", decision: "deny"), Call(source: web, destination: api, path: "/admin/<script>", decision: "deny")]
        calls.append(Call(source: nil, destination: api, path: "/", decision: "deny", mtls: false))
        calls += [Call(source: api, destination: db, path: "/q"), Call(source: api, destination: db, path: "/q", time: now - 3 * 86_400_000_000)]
        _ = try await store.ingestLedger(writer: "proxy:api", uploader: uploader, rows: try rows("proxy:api", calls), at: Date())
        return store
    }

    static func ui(_ store: SQLiteDatastore) -> LedgerUI {
        LedgerUI(store: store, clock: FixedClock(Date(timeIntervalSince1970: Double(now) / 1e6)), logger: Logger(label: "test"))
    }

    // MARK: query parsing

    @Test func parsesFiltersAndTreatsEmptyValuesAsNone() throws {
        let q = try LedgerPageQuery.parse("from=spiffe%3A%2F%2Fexample.org%2Fns%2Fshop%2Fsa%2Fweb&to=&decision=deny&since=2h&until=2026-01-01T00:00:00Z&limit=50&other=x",
                                          nowMicros: Self.now)
        #expect(q.from == Self.web && q.to == nil && q.decision == "deny" && q.limit == 50)
        #expect(q.sinceMicros == Self.now - 7_200_000_000)
        #expect(q.untilMicros == RFC3339.micros(from: "2026-01-01T00:00:00Z"))
        let d = try LedgerPageQuery.parse("", nowMicros: Self.now)
        #expect(d == LedgerPageQuery() && d.limit == 200)
        #expect(try LedgerPageQuery.parse("limit=5000&since=+7d+", nowMicros: Self.now).sinceMicros == Self.now - 7 * 86_400_000_000)
    }

    @Test(arguments: [
        ("decision=maybe", "'decision'"), ("since=yesterday", "'since'"), ("until=3x", "'until'"), ("limit=0", "'limit'"),
        ("limit=5001", "'limit'"), ("limit=ten", "'limit'"), ("from=web", "'from'"), ("to=http://x", "'to'"),
        ("decision=allow&decision=deny", "'decision'"), ("from=%zz", "'from'"),
    ])
    func refusesBadValuesNamingTheParameter(query: String, name: String) {
        do {
            _ = try LedgerPageQuery.parse(query, nowMicros: Self.now)
            Issue.record("\(query) was accepted")
        } catch {
            #expect(error.message.contains("parameter \(name)"), "\(error.message)")
        }
    }

    // MARK: rendering

    @Test func escapesEverythingFromTheNetwork() throws {
        #expect(HTML.escape(#"/<script>"a'&"#) == "/&lt;script&gt;&quot;a&#39;&amp;")
        let row = try Self.rows("w", [Call(source: Self.web, destination: Self.api, path: "/<script>alert('x')</script>&\"")])[0]
        let html = LedgerPage.render(query: LedgerPageQuery(), edges: [], rows: [row], verification: LedgerVerification(), nowMicros: Self.now)
        #expect(!html.contains("<script"))
        #expect(html.contains("/&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"))
    }

    @Test func drawsNodesEdgesLocksAndDenials() async throws {
        let store = try await Self.store()
        let edges = try await store.ledgerEdges(sinceMicros: nil, untilMicros: nil)
        let graph = LedgerGraph(edges: edges)
        // SPIFFE IDs sorted, the plaintext node last; the same edges give the same picture
        #expect(graph.nodes.map(\.key) == [Self.api, Self.db, Self.web, LedgerGraph.plaintextKey])
        #expect(graph.nodes.map(\.label) == ["shop/api", "shop/db", "shop/web", "plaintext"])
        let svg = LedgerPage.svg(graph)
        #expect(svg == LedgerPage.svg(LedgerGraph(edges: edges.reversed())))
        #expect(svg.contains(#"viewBox="0 0 960 600""#) && svg.contains(#"width="960" height="600""#))
        #expect(svg.components(separatedBy: "<g class=\"node").count - 1 == 4)
        #expect(svg.contains(#"<g class="node plaintext" data-id="(plaintext)""#))

        let webAPI = try #require(graph.edges.first { $0.edge.source == Self.web })
        #expect(webAPI.edge.calls == 5 && webAPI.edge.denied == 2 && webAPI.isMTLS && webAPI.colour == "#d62728")
        #expect(svg.contains(#"<g class="edge deny mtls" data-source="\#(Self.web)" data-destination="\#(Self.api)" data-calls="5" data-denied="2" data-mtls="true""#))
        let apiDB = try #require(graph.edges.first { $0.edge.source == Self.api })
        #expect(apiDB.colour == "#2ca02c")
        #expect(svg.contains(#"<g class="edge allow mtls" data-source="\#(Self.api)" data-destination="\#(Self.db)" data-calls="2" data-denied="0""#))
        let plain = try #require(graph.edges.first { $0.edge.source == nil })
        #expect(!plain.isMTLS && plain.colour == "#d62728")
        #expect(svg.contains(#"<g class="edge deny plaintext" data-source="(plaintext)""#))
        // a padlock (with its title) on each of the two mTLS edges, none on the plaintext one
        #expect(svg.components(separatedBy: "<g class=\"lock\"").count - 1 == 2)
        #expect(svg.contains("<title>mTLS: 5 of 5 calls</title>"))
        #expect(svg.contains("stroke-dasharray=\"9 6\""))
        // the dash pattern puts a dash on the middle of the dashed edge
        let length = ((plain.x2 - plain.x1) * (plain.x2 - plain.x1) + (plain.y2 - plain.y1) * (plain.y2 - plain.y1)).squareRoot()
        var phase = (length / 2 + plain.dashOffset).truncatingRemainder(dividingBy: 15)
        if phase < 0 { phase += 15 }
        #expect(abs(phase - 4.5) < 0.01)
    }

    /// An edge as `sigil audit graph --format json` prints it.
    static func edge(_ source: String, _ destination: String) throws -> LedgerEdge {
        let json = #"{"source":"\#(source)","destination":"\#(destination)","calls":1,"denied":0,"overMTLS":1,"p99Micros":1}"#
        return try JSONDecoder().decode(LedgerEdge.self, from: Data(json.utf8))
    }

    @Test func twoWayEdgesAndSelfCallsDoNotOverlap() throws {
        let graph = LedgerGraph(edges: [try Self.edge(Self.web, Self.api), try Self.edge(Self.api, Self.web), try Self.edge(Self.api, Self.api)])
        let ab = try #require(graph.edges.first { $0.edge.source == Self.web })
        let ba = try #require(graph.edges.first { $0.edge.source == Self.api && $0.edge.destination == Self.web })
        #expect(abs(ab.midX - ba.midX) + abs(ab.midY - ba.midY) > 10)
        #expect(graph.edges.first { $0.edge.source == $0.edge.destination }?.loop != nil)
        #expect(LedgerPage.svg(graph).contains("<path class=\"line\" d=\"M"))
    }

    // MARK: routes over a real store

    @Test func servesThePageAndTheData() async throws {
        let ui = Self.ui(try await Self.store())
        let page = await ui.respond(method: "GET", uri: "/ui", host: "127.0.0.1:8088")
        let html = String(decoding: page.body, as: UTF8.self)
        #expect(page.status == 200 && page.contentType.hasPrefix("text/html"))
        #expect(html.contains("ledger intact: 8 rows from 1 writer"))
        #expect(html.contains("/admin/&lt;script&gt;") && !html.contains("<script"))
        #expect(html.components(separatedBy: "<tr class=\"row").count - 1 == 8)

        let graph = await ui.respond(method: "GET", uri: "/ui/graph.json", host: nil)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(graph.body)) as? [String: Any])
        let edges = try #require(object["edges"] as? [[String: Any]])
        #expect(edges.count == 3 && (object["nodes"] as? [Any])?.count == 4)
        #expect(edges.map { $0["calls"] as? Int } == [1, 2, 5])  // as `sigil audit graph`: plaintext (no source) first

        let rows = await ui.respond(method: "GET", uri: "/ui/rows.json?decision=deny&limit=2", host: "localhost")
        let rowsObject = try #require(try JSONSerialization.jsonObject(with: Data(rows.body)) as? [String: Any])
        #expect(rowsObject["count"] as? Int == 2)
        #expect((rowsObject["rows"] as? [[String: Any]])?.allSatisfy { $0["decision"] as? String == "deny" } == true)

        // the time filter: api→db's call 3 days ago is outside `since=1d`
        let recent = await ui.respond(method: "GET", uri: "/ui/graph.json?since=1d&to=\(Self.db)", host: nil)
        let recentEdges = try #require((try JSONSerialization.jsonObject(with: Data(recent.body)) as? [String: Any])?["edges"] as? [[String: Any]])
        #expect(recentEdges.count == 1 && recentEdges[0]["calls"] as? Int == 1)
        let denied = await ui.respond(method: "HEAD", uri: "/ui/graph.json?decision=deny", host: nil)
        #expect(denied.status == 200)
    }

    @Test func answersBadRequestsWithoutCrashing() async throws {
        let ui = Self.ui(try await Self.store())
        let bad = await ui.respond(method: "GET", uri: "/ui/rows.json?since=soon", host: nil)
        #expect(bad.status == 400 && String(decoding: bad.body, as: UTF8.self).contains("parameter 'since'"))
        let badPage = await ui.respond(method: "GET", uri: "/ui?limit=9999", host: nil)
        #expect(badPage.status == 400 && String(decoding: badPage.body, as: UTF8.self).contains("parameter &#39;limit&#39;"))
        let post = await ui.respond(method: "POST", uri: "/ui", host: nil)
        #expect(post.status == 405 && post.allow == "GET, HEAD")
        #expect(await ui.respond(method: "GET", uri: "/", host: nil).status == 404)
        #expect(await ui.respond(method: "GET", uri: "/ui/../etc/passwd", host: nil).status == 404)
        #expect(await ui.respond(method: "GET", uri: "/ui", host: "evil.example:8088").status == 403)
        #expect(await ui.respond(method: "GET", uri: "/ui", host: "[::1]:8088").status == 200)
    }

    @Test func listensOnlyOnLoopback() throws {
        for good in ["127.0.0.1:8088", "127.8.9.10:1", "[::1]:8088", "localhost:0"] {
            #expect(throws: Never.self) { _ = try LedgerUIAddress(parsing: good) }
        }
        for bad in ["0.0.0.0:8088", "10.0.0.1:8088", "[::]:8088", ":8088", "example.org:80", "127.0.0.1", "127.0.0.1:99999", "[::ffff:10.0.0.1]:1"] {
            do {
                _ = try LedgerUIAddress(parsing: bad)
                Issue.record("\(bad) was accepted")
            } catch {
                #expect(error.message.contains("--ui"))
            }
        }
        #expect(try LedgerUIAddress(parsing: "[::1]:9").description == "[::1]:9")
    }

    @Test func theWholeLedgerCheckIsSharedByLoadsAndReusedForHalfAMinute() async throws {
        let cache = LedgerVerificationCache()
        let runs = Counter()
        let compute: @Sendable () async throws -> LedgerVerification = {
            await runs.increment()
            try await Task.sleep(for: .milliseconds(50))
            return LedgerVerification()
        }
        let start = Date(timeIntervalSince1970: 1_800_000_000)
        // Loads that arrive while a check runs wait for it.
        async let a = cache.verification(now: start, compute: compute)
        async let b = cache.verification(now: start, compute: compute)
        let (first, second) = try await (a, b)
        #expect(first.1 == start && second.1 == start)
        #expect(await runs.value == 1)
        _ = try await cache.verification(now: start.addingTimeInterval(29), compute: compute)
        #expect(await runs.value == 1)
        let later = try await cache.verification(now: start.addingTimeInterval(31), compute: compute)
        #expect(await runs.value == 2 && later.1 == start.addingTimeInterval(31))
        let html = LedgerPage.render(query: LedgerPageQuery(), edges: [], rows: [], verification: LedgerVerification(), nowMicros: Self.now,
                                     checkedMicros: Self.now - 5_000_000)
        #expect(html.contains("(checked \(RFC3339.format(micros: Self.now - 5_000_000)))"))
    }

    actor Counter {
        var value = 0
        func increment() { value += 1 }
    }
}
