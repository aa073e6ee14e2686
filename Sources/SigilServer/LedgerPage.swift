import SigilCore
import SigilStore
import Foundation

/// The filters of the ledger page (`/ui`, `/ui/graph.json`, `/ui/rows.json`), read from the query
/// string: `from`, `to` (SPIFFE IDs), `decision` (allow|deny), `since`, `until` (a duration back
/// from now such as 1h, 24h, 7d, or an RFC 3339 time), `limit` (table rows, 1...5000, default 200).
/// An empty value is no filter (an empty form field submits `from=`).
struct LedgerPageQuery: Sendable, Equatable {
    static let defaultLimit = 200
    static let maxLimit = 5000
    static let names = ["from", "to", "decision", "since", "until", "limit"]

    var from: String?
    var to: String?
    var decision: String?
    /// `since` and `until` as given (the form shows them again) and as microseconds since 1970.
    var since: String?
    var until: String?
    var sinceMicros: Int64?
    var untilMicros: Int64?
    var limit = LedgerPageQuery.defaultLimit

    /// Parses a raw query string (`a=b&c=d`, percent-encoded, `+` for space). A bad value throws a
    /// message naming the parameter; unknown parameters are ignored, a repeated one is refused.
    static func parse(_ rawQuery: some StringProtocol, nowMicros: Int64) throws(ServerError) -> LedgerPageQuery {
        var values: [String: String] = [:]
        for pair in rawQuery.split(separator: "&", omittingEmptySubsequences: true) {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let name = decode(parts[0]) else {
                throw ServerError(message: "a query parameter name is not valid percent-encoding")
            }
            guard let value = decode(parts.count > 1 ? parts[1] : "") else {
                throw ServerError(message: "parameter '\(name)': the value is not valid percent-encoding")
            }
            guard names.contains(name) else { continue }
            guard values[name] == nil else {
                throw ServerError(message: "parameter '\(name)' is given twice; give it once")
            }
            let trimmed = value.trimmingCharacters(in: .whitespaces)
            if !trimmed.isEmpty { values[name] = trimmed }
        }
        var query = LedgerPageQuery()
        for name in ["from", "to"] {
            guard let value = values[name] else { continue }
            do {
                _ = try SpiffeID(value)
            } catch {
                throw ServerError(message: "parameter '\(name)': '\(value)' is not a SPIFFE ID (\(error.message))")
            }
            if name == "from" { query.from = value } else { query.to = value }
        }
        if let decision = values["decision"] {
            guard decision == "allow" || decision == "deny" else {
                throw ServerError(message: "parameter 'decision' must be allow or deny, not '\(decision)'")
            }
            query.decision = decision
        }
        query.since = values["since"]
        query.until = values["until"]
        query.sinceMicros = try time(values["since"], name: "since", nowMicros: nowMicros)
        query.untilMicros = try time(values["until"], name: "until", nowMicros: nowMicros)
        if let limit = values["limit"] {
            guard let n = Int(limit), (1...maxLimit).contains(n) else {
                throw ServerError(message: "parameter 'limit' must be a whole number from 1 to \(maxLimit), not '\(limit)'")
            }
            query.limit = n
        }
        return query
    }

    /// `24h` (that long before now) or an RFC 3339 time, in microseconds since 1970.
    static func time(_ text: String?, name: String, nowMicros: Int64) throws(ServerError) -> Int64? {
        guard let text else { return nil }
        guard let micros = RFC3339.micros(fromTimeOrAgo: text, nowMicros: nowMicros) else {
            throw ServerError(message: "parameter '\(name)': '\(text)' is neither a duration back from now (30m, 24h, 7d) nor an RFC 3339 time (2026-12-01T00:00:00Z)")
        }
        return micros
    }

    static func decode(_ text: some StringProtocol) -> String? {
        String(text).replacingOccurrences(of: "+", with: " ").removingPercentEncoding
    }

    /// The store query for the table.
    var ledgerQuery: LedgerQuery {
        LedgerQuery(source: from, destination: to, sinceMicros: sinceMicros, untilMicros: untilMicros, decision: decision, limit: limit)
    }

    /// Whether an edge of the graph matches the caller, callee and decision filters. Its counts are
    /// always the edge's whole traffic in the time range: `decision=deny` keeps the edges with a
    /// denial, `decision=allow` those with an allowed call.
    func keeps(_ edge: LedgerEdge) -> Bool {
        if let from, edge.source != from { return false }
        if let to, edge.destination != to { return false }
        switch decision {
        case "deny": return edge.denied > 0
        case "allow": return edge.calls > edge.denied
        default: return true
        }
    }
}

/// Escaping for HTML text and attribute values: every value on the page came from the network.
enum HTML {
    static func escape(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for ch in text.unicodeScalars {
            switch ch {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.unicodeScalars.append(ch)
            }
        }
        return out
    }
}

/// The who-called-whom picture: nodes on an ellipse (sorted, so the same edges always give the same
/// picture), edges as straight arrows between their circles. Coordinates are SVG user units in a
/// fixed viewBox drawn at the same pixel size, so they are screen pixels from the SVG's corner.
struct LedgerGraph: Sendable {
    static let width = 960
    static let height = 600
    static let nodeRadius = 26.0
    static let plaintextKey = "(plaintext)"
    static let unknownKey = "(unknown)"

    enum Colour {
        static let mtls = "#2ca02c"
        static let deny = "#d62728"
        static let plaintext = "#ff7f0e"
        static let node = "#dbe9f6"
        static let nodeStroke = "#1f4e79"
        static let plaintextNode = "#eeeeee"
        static let plaintextNodeStroke = "#7f7f7f"
    }

    struct Node: Sendable, Encodable {
        /// The SPIFFE ID, or nil for the plaintext callers' node.
        var id: String?
        var key: String
        var label: String
        var detail: String
        var x: Int
        var y: Int
        var isIdentity: Bool { id != nil }
    }

    struct Edge: Sendable {
        var edge: LedgerEdge
        var from: Node
        var to: Node
        var x1, y1, x2, y2: Double
        /// A self-call is drawn as a loop above its node (`path`), not a line.
        var loop: String?
        var midX, midY: Double
        var lockX, lockY: Double
        /// The label runs along the edge (never upside down), beside it.
        var labelX, labelY, labelAngle: Double
        var dashOffset: Double

        var isMTLS: Bool { edge.calls > 0 && edge.overMTLS == edge.calls }
        var colour: String { edge.denied > 0 ? Colour.deny : isMTLS ? Colour.mtls : Colour.plaintext }
        var classes: String {
            ["edge", edge.denied > 0 ? "deny" : "allow", isMTLS ? "mtls" : "plaintext"].joined(separator: " ")
        }
    }

    var nodes: [Node] = []
    var edges: [Edge] = []

    init(edges ledgerEdges: [LedgerEdge]) {
        var keys = Set<String>()
        for edge in ledgerEdges {
            keys.insert(edge.source ?? Self.plaintextKey)
            keys.insert(edge.destination ?? Self.unknownKey)
        }
        // SPIFFE IDs sorted; the plaintext and unknown nodes last.
        let ordered = keys.filter { $0.hasPrefix("spiffe://") }.sorted() + keys.filter { !$0.hasPrefix("spiffe://") }.sorted()
        let cx = Double(Self.width) / 2, cy = Double(Self.height) / 2 - 10
        // An ellipse that uses the picture's width (labels need room below each node).
        let rx = cx - 150, ry = cy - 90
        var byKey: [String: Node] = [:]
        for (index, key) in ordered.enumerated() {
            // From the left, clockwise on screen; one node sits in the middle.
            let angle = Double.pi + 2 * Double.pi * Double(index) / Double(ordered.count)
            let scale = ordered.count == 1 ? 0.0 : 1.0
            let (label, detail) = Self.labels(key)
            let node = Node(id: key.hasPrefix("spiffe://") ? key : nil, key: key, label: label, detail: detail,
                            x: Int((cx + scale * rx * cos(angle)).rounded()), y: Int((cy + scale * ry * sin(angle)).rounded()))
            nodes.append(node)
            byKey[key] = node
        }
        let pairs = Set(ledgerEdges.map { "\($0.source ?? Self.plaintextKey)\u{0}\($0.destination ?? Self.unknownKey)" })
        let sorted = ledgerEdges.sorted { ($0.source ?? Self.plaintextKey, $0.destination ?? "") < ($1.source ?? Self.plaintextKey, $1.destination ?? "") }
        for edge in sorted {
            guard let from = byKey[edge.source ?? Self.plaintextKey], let to = byKey[edge.destination ?? Self.unknownKey] else { continue }
            let reverse = pairs.contains("\(to.key)\u{0}\(from.key)")
            edges.append(Self.geometry(edge, from: from, to: to, twoWay: reverse))
        }
    }

    /// `ns/sa` for Istio-style IDs (the trust domain below it), else the path.
    static func labels(_ key: String) -> (String, String) {
        guard let id = try? SpiffeID(key) else {
            return key == plaintextKey ? ("plaintext", "no client certificate") : ("unknown", "no destination recorded")
        }
        let parts = id.path.split(separator: "/")
        if parts.count == 4, parts[0] == "ns", parts[2] == "sa" {
            return ("\(parts[1])/\(parts[3])", id.trustDomain.name)
        }
        return (id.path.isEmpty ? "/" : String(id.path.dropFirst()), id.trustDomain.name)
    }

    static func geometry(_ edge: LedgerEdge, from: Node, to: Node, twoWay: Bool) -> Edge {
        let r = nodeRadius
        if from.key == to.key {
            // A loop above the node.
            let x = Double(from.x), y = Double(from.y)
            let path = "M\(n(x - 12)) \(n(y - r + 2)) C\(n(x - 46)) \(n(y - r - 70)) \(n(x + 46)) \(n(y - r - 70)) \(n(x + 12)) \(n(y - r + 2))"
            let midY = y - r - 52  // the cubic at t = 1/2: (P0 + 3·C1 + 3·C2 + P3) / 8
            return Edge(edge: edge, from: from, to: to, x1: x, y1: y, x2: x, y2: y, loop: path, midX: x, midY: midY,
                        lockX: x - 30, lockY: midY - 4, labelX: x, labelY: midY - 14, labelAngle: 0, dashOffset: 0)
        }
        var x1 = Double(from.x), y1 = Double(from.y), x2 = Double(to.x), y2 = Double(to.y)
        let length = max(1, ((x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1)).squareRoot())
        let ux = (x2 - x1) / length, uy = (y2 - y1) / length
        // Both directions present: each arrow moves 7 units to its own right, so they do not overlap.
        let px = -uy, py = ux
        let shift = twoWay ? 7.0 : 0
        x1 += ux * (r + 3) + px * shift
        y1 += uy * (r + 3) + py * shift
        x2 += -ux * (r + 5) + px * shift
        y2 += -uy * (r + 5) + py * shift
        let drawn = max(1, length - 2 * r - 8)
        let midX = (x1 + x2) / 2, midY = (y1 + y2) / 2
        // A dash (9 on, 6 off) centred on the middle, so the middle of a dashed edge is drawn.
        var offset = (4.5 - drawn / 2).truncatingRemainder(dividingBy: 15)
        if offset < 0 { offset += 15 }
        let lock = 0.3
        // The label along the edge, turned so that it reads left to right, above the line; when both
        // directions are drawn, on this arrow's own side (away from the other arrow).
        var angle = atan2(uy, ux) * 180 / Double.pi
        if angle > 90 { angle -= 180 } else if angle < -90 { angle += 180 }
        let upX = sin(angle * Double.pi / 180), upY = -cos(angle * Double.pi / 180)
        let (sx, sy) = twoWay ? (px, py) : (upX, upY)
        // The baseline 11 units from the line on the text's top side, 22 on its bottom side.
        let distance = sx * upX + sy * upY > 0 ? 11.0 : 22.0
        return Edge(edge: edge, from: from, to: to, x1: x1, y1: y1, x2: x2, y2: y2, loop: nil, midX: midX, midY: midY,
                    lockX: x1 + (x2 - x1) * lock, lockY: y1 + (y2 - y1) * lock,
                    labelX: midX + sx * distance, labelY: midY + sy * distance, labelAngle: angle, dashOffset: offset)
    }

    /// A number for an SVG attribute: at most one decimal, no trailing `.0`.
    static func n(_ value: Double) -> String {
        let tenths = (value * 10).rounded()
        if tenths.truncatingRemainder(dividingBy: 10) == 0 { return String(Int(tenths / 10)) }
        return String(format: "%.1f", tenths / 10)
    }
}

/// Renders the ledger page: an inline SVG graph, the filter form and the ledger table. Plain HTML
/// and CSS, no script, nothing fetched from elsewhere.
enum LedgerPage {
    /// Where the SVG's top-left corner lands on the page (the header's height plus the padding):
    /// a screenshot test reads it from the SVG's `data-page-x`/`data-page-y`.
    static let graphLeft = 24
    static let graphTop = 72

    static func render(query: LedgerPageQuery, edges: [LedgerEdge], rows: [LedgerRow],
                       verification: LedgerVerification, nowMicros: Int64, checkedMicros: Int64? = nil) -> String {
        let graph = LedgerGraph(edges: edges)
        var html = """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8">
            <meta name="viewport" content="width=device-width, initial-scale=1">
            <title>Sigil ledger: who called whom</title>
            <style>\(style)</style>
            </head><body>
            <header><span class="brand">Sigil</span><span class="sub">ledger: who called whom</span>
            <span class="now">as of \(HTML.escape(RFC3339.format(micros: nowMicros)))</span></header>
            <main>
            <div class="top">

            """
        html += svg(graph)
        html += side(graph: graph, query: query, verification: verification, checkedMicros: checkedMicros ?? nowMicros)
        html += "</div>\n"
        html += form(query: query, graph: graph)
        html += table(rows: rows, query: query)
        html += "</main></body></html>\n"
        return html
    }

    static func svg(_ graph: LedgerGraph) -> String {
        typealias C = LedgerGraph.Colour
        let n = LedgerGraph.n
        let w = LedgerGraph.width, h = LedgerGraph.height
        var s = """
            <svg id="graph" xmlns="http://www.w3.org/2000/svg" width="\(w)" height="\(h)" viewBox="0 0 \(w) \(h)" \
            data-page-x="\(graphLeft)" data-page-y="\(graphTop)" role="img" aria-label="who called whom">
            <defs>

            """
        for (name, colour) in [("mtls", C.mtls), ("deny", C.deny), ("plaintext", C.plaintext)] {
            s += "<marker id=\"arrow-\(name)\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">"
            s += "<path d=\"M0 0 L10 5 L0 10 z\" fill=\"\(colour)\"/></marker>\n"
        }
        s += "</defs>\n<rect class=\"frame\" x=\"0.5\" y=\"0.5\" width=\"\(w - 1)\" height=\"\(h - 1)\" rx=\"6\" fill=\"#ffffff\" stroke=\"#d0d7de\"/>\n"
        if graph.edges.isEmpty {
            s += "<text x=\"\(w / 2)\" y=\"\(h / 2)\" text-anchor=\"middle\" class=\"empty\">No calls recorded for these filters</text>\n"
        }
        for e in graph.edges {
            let edge = e.edge
            let name = edge.denied > 0 ? "deny" : e.isMTLS ? "mtls" : "plaintext"
            let title = "\(e.from.label) → \(e.to.label): \(edge.calls) call\(edge.calls == 1 ? "" : "s"), \(edge.denied) denied, "
                + "\(edge.overMTLS) over mTLS, p99 \(String(format: "%.2f", Double(edge.p99Micros) / 1000)) ms"
            s += "<g class=\"\(e.classes)\" data-source=\"\(HTML.escape(e.from.key))\" data-destination=\"\(HTML.escape(e.to.key))\" "
            s += "data-calls=\"\(edge.calls)\" data-denied=\"\(edge.denied)\" data-mtls=\"\(e.isMTLS)\" data-over-mtls=\"\(edge.overMTLS)\" "
            s += "data-mid-x=\"\(n(e.midX))\" data-mid-y=\"\(n(e.midY))\" data-colour=\"\(e.colour)\">"
            s += "<title>\(HTML.escape(title))</title>"
            let dash = e.isMTLS ? "" : " stroke-dasharray=\"9 6\" stroke-dashoffset=\"\(n(e.dashOffset))\""
            if let loop = e.loop {
                s += "<path class=\"line\" d=\"\(loop)\" fill=\"none\" stroke=\"\(e.colour)\" stroke-width=\"4\"\(dash) marker-end=\"url(#arrow-\(name))\"/>"
            } else {
                s += "<line class=\"line\" x1=\"\(n(e.x1))\" y1=\"\(n(e.y1))\" x2=\"\(n(e.x2))\" y2=\"\(n(e.y2))\" stroke=\"\(e.colour)\" "
                s += "stroke-width=\"4\" stroke-linecap=\"butt\"\(dash) marker-end=\"url(#arrow-\(name))\"/>"
            }
            if e.isMTLS {
                s += lock(x: e.lockX, y: e.lockY, colour: e.colour, title: "mTLS: \(edge.overMTLS) of \(edge.calls) calls")
            }
            let turn = e.labelAngle == 0 ? "" : " transform=\"rotate(\(n(e.labelAngle)) \(n(e.labelX)) \(n(e.labelY)))\""
            s += "<text class=\"edge-label\" x=\"\(n(e.labelX))\" y=\"\(n(e.labelY))\" text-anchor=\"middle\"\(turn)>"
            s += "<tspan>\(edge.calls) call\(edge.calls == 1 ? "" : "s")</tspan>"
            if edge.denied > 0 { s += "<tspan class=\"denied\" fill=\"\(C.deny)\"> · \(edge.denied) denied</tspan>" }
            if !e.isMTLS { s += "<tspan class=\"plain\" fill=\"#b35900\"> · plaintext</tspan>" }
            s += "</text></g>\n"
        }
        for node in graph.nodes {
            let fill = node.isIdentity ? C.node : C.plaintextNode
            let stroke = node.isIdentity ? C.nodeStroke : C.plaintextNodeStroke
            let dash = node.isIdentity ? "" : " stroke-dasharray=\"5 4\""
            s += "<g class=\"node\(node.isIdentity ? "" : " plaintext")\" data-id=\"\(HTML.escape(node.key))\" data-label=\"\(HTML.escape(node.label))\" "
            s += "data-x=\"\(node.x)\" data-y=\"\(node.y)\" data-fill=\"\(fill)\">"
            s += "<title>\(HTML.escape(node.key))</title>"
            s += "<circle cx=\"\(node.x)\" cy=\"\(node.y)\" r=\"\(n(LedgerGraph.nodeRadius))\" fill=\"\(fill)\" stroke=\"\(stroke)\" stroke-width=\"2.5\"\(dash)/>"
            s += "<text class=\"node-label\" x=\"\(node.x)\" y=\"\(node.y + 46)\" text-anchor=\"middle\">\(HTML.escape(node.label))</text>"
            s += "<text class=\"node-detail\" x=\"\(node.x)\" y=\"\(node.y + 62)\" text-anchor=\"middle\">\(HTML.escape(node.detail))</text>"
            s += "</g>\n"
        }
        s += "</svg>\n"
        return s
    }

    /// A padlock on a white disc: the shackle and the body are paths.
    static func lock(x: Double, y: Double, colour: String, title: String) -> String {
        let n = LedgerGraph.n
        return "<g class=\"lock\" transform=\"translate(\(n(x)) \(n(y)))\"><title>\(HTML.escape(title))</title>"
            + "<circle r=\"12\" fill=\"#ffffff\" stroke=\"\(colour)\" stroke-width=\"2\"/>"
            + "<path d=\"M-4 -1.5 V-4.5 A4 4 0 0 1 4 -4.5 V-1.5\" fill=\"none\" stroke=\"#333333\" stroke-width=\"1.8\"/>"
            + "<path d=\"M-6 -1.5 H6 V6.5 H-6 Z\" fill=\"#333333\"/>"
            + "<path d=\"M0 1.2 V3.8\" stroke=\"#ffffff\" stroke-width=\"1.6\" stroke-linecap=\"round\"/></g>"
    }

    static func side(graph: LedgerGraph, query: LedgerPageQuery, verification: LedgerVerification, checkedMicros: Int64) -> String {
        let calls = graph.edges.reduce(0) { $0 + $1.edge.calls }
        let denied = graph.edges.reduce(0) { $0 + $1.edge.denied }
        let mtls = graph.edges.reduce(0) { $0 + $1.edge.overMTLS }
        var s = "<aside>\n<section class=\"card\"><h2>Ledger</h2>"
        s += integrity(verification, checkedMicros: checkedMicros)
        s += "<p class=\"totals\"><b>\(calls)</b> calls · <b class=\"\(denied > 0 ? "red" : "")\">\(denied)</b> denied · "
        s += "<b>\(calls == 0 ? "–" : String(format: "%.1f%%", Double(mtls) * 100 / Double(calls)))</b> over mTLS</p>"
        s += "<p class=\"muted\">\(graph.nodes.count) workloads, \(graph.edges.count) edges\(query.since == nil && query.until == nil ? ", all time" : "")</p></section>\n"
        s += """
            <section class="card legend"><h2>Legend</h2>
            <div><svg width="64" height="24" viewBox="0 0 64 24"><line x1="4" y1="12" x2="60" y2="12" stroke="\(LedgerGraph.Colour.mtls)" stroke-width="4"/>\(lock(x: 32, y: 12, colour: LedgerGraph.Colour.mtls, title: "mTLS"))</svg> every call over mTLS</div>
            <div><svg width="64" height="24" viewBox="0 0 64 24"><line x1="4" y1="12" x2="60" y2="12" stroke="\(LedgerGraph.Colour.deny)" stroke-width="4"/></svg> calls were denied</div>
            <div><svg width="64" height="24" viewBox="0 0 64 24"><line x1="4" y1="12" x2="60" y2="12" stroke="\(LedgerGraph.Colour.plaintext)" stroke-width="4" stroke-dasharray="9 6"/></svg> plaintext (no mTLS)</div>
            </section>

            """
        if !graph.edges.isEmpty {
            s += "<section class=\"card\"><h2>Edges</h2><table class=\"edges\"><tr><th>caller → callee</th><th>calls</th><th>denied</th><th>mTLS</th><th>p99</th></tr>\n"
            for e in graph.edges {
                let share = String(format: "%.0f%%", e.edge.mtlsShare * 100)
                s += "<tr\(e.edge.denied > 0 ? " class=\"deny\"" : "")><td title=\"\(HTML.escape(e.from.key)) → \(HTML.escape(e.to.key))\">\(HTML.escape(e.from.label)) → \(HTML.escape(e.to.label))</td>"
                s += "<td class=\"num\">\(e.edge.calls)</td><td class=\"num\">\(e.edge.denied)</td><td class=\"num\">\(share)</td>"
                s += "<td class=\"num\">\(String(format: "%.1f", Double(e.edge.p99Micros) / 1000)) ms</td></tr>\n"
            }
            s += "</table></section>\n"
        }
        s += "</aside>\n"
        return s
    }

    static func integrity(_ v: LedgerVerification, checkedMicros: Int64) -> String {
        let checked = " <span class=\"checked\">(checked \(HTML.escape(RFC3339.format(micros: checkedMicros))))</span>"
        if v.intact {
            return "<p class=\"integrity ok\" data-intact=\"true\">✔ ledger intact: \(v.rows) row\(v.rows == 1 ? "" : "s") from \(v.writers) writer\(v.writers == 1 ? "" : "s")\(checked)</p>"
        }
        let first = v.breaks.first.map { HTML.escape($0.description) } ?? ""
        return "<p class=\"integrity broken\" data-intact=\"false\">✘ ledger BROKEN: \(v.breaks.count) of \(v.writers) writers fail; first break: \(first)\(checked)</p>"
    }

    static func form(query: LedgerPageQuery, graph: LedgerGraph) -> String {
        func field(_ name: String, _ label: String, _ value: String?, _ placeholder: String, list: String? = nil) -> String {
            "<label>\(label)<input name=\"\(name)\" value=\"\(HTML.escape(value ?? ""))\" placeholder=\"\(HTML.escape(placeholder))\"\(list.map { " list=\"\($0)\"" } ?? "")></label>"
        }
        func option(_ value: String, _ label: String) -> String {
            "<option value=\"\(value)\"\((query.decision ?? "") == value ? " selected" : "")>\(label)</option>"
        }
        var s = "<form class=\"filters card\" method=\"get\" action=\"/ui\">\n"
        s += field("from", "caller", query.from, "spiffe://td/ns/x/sa/y", list: "ids")
        s += field("to", "callee", query.to, "spiffe://td/ns/x/sa/y", list: "ids")
        s += "<label>decision<select name=\"decision\">\(option("", "any"))\(option("allow", "allow"))\(option("deny", "deny"))</select></label>"
        s += field("since", "since", query.since, "24h or RFC 3339")
        s += field("until", "until", query.until, "1h or RFC 3339")
        s += "<label>rows<input name=\"limit\" value=\"\(query.limit)\" size=\"5\"></label>"
        s += "<button type=\"submit\">Apply</button><a class=\"reset\" href=\"/ui\">Reset</a>\n<datalist id=\"ids\">"
        for node in graph.nodes where node.isIdentity { s += "<option value=\"\(HTML.escape(node.key))\">" }
        s += "</datalist></form>\n"
        return s
    }

    static func table(rows: [LedgerRow], query: LedgerPageQuery) -> String {
        var s = "<section class=\"card rows\"><h2>Ledger rows <span class=\"muted\">(the newest \(rows.count) matching"
        s += rows.count >= query.limit ? ", limit \(query.limit)" : ""
        s += "; newest first)</span></h2>\n<table class=\"ledger\"><thead><tr><th>time</th><th>kind</th><th>source</th><th>destination</th><th>method</th><th>path</th>"
        s += "<th>status</th><th>decision</th><th>policy#rule</th><th>mTLS</th><th>duration</th></tr></thead><tbody>\n"
        for row in rows.reversed() {
            let policy = row.policy.map { $0 + (row.rule.map { "#\($0)" } ?? "") } ?? ""
            s += "<tr class=\"row \(row.decision == "deny" ? "deny" : "")\" data-writer=\"\(HTML.escape(row.writer))\" data-seq=\"\(row.seq)\">"
            let time = RFC3339.format(micros: row.timeMicros)
            // 2026-12-03 06:44:33.933 (the full time in the tooltip)
            let shown = time.count >= 23 ? String(time.prefix(10)) + " " + String(time.dropFirst(11).prefix(12)) : time
            s += "<td class=\"time\" title=\"\(HTML.escape(time))\">\(HTML.escape(shown))</td>"
            s += "<td>\(HTML.escape(row.kind))</td>"
            s += row.source.map { "<td class=\"id\">\(HTML.escape($0))</td>" } ?? "<td class=\"id plain\">plaintext</td>"
            s += "<td class=\"id\">\(HTML.escape(row.destination ?? ""))</td>"
            s += "<td>\(HTML.escape(row.method ?? ""))</td>"
            s += "<td class=\"path\">\(HTML.escape(row.path ?? ""))</td>"
            s += "<td class=\"num\">\(row.status.map(String.init) ?? "")</td>"
            s += "<td class=\"decision\">\(HTML.escape(row.decision ?? ""))</td>"
            s += "<td>\(HTML.escape(policy))</td>"
            s += row.mtls ? "<td class=\"mtls\">\(smallLock)yes</td>" : "<td class=\"plain\">no</td>"
            s += "<td class=\"num\">\(String(format: "%.2f", Double(row.durationMicros) / 1000)) ms</td></tr>\n"
        }
        if rows.isEmpty { s += "<tr><td colspan=\"11\" class=\"muted\">No rows match these filters.</td></tr>\n" }
        s += "</tbody></table></section>\n"
        return s
    }

    /// The table's padlock (the graph's, without its disc).
    static let smallLock = "<svg width=\"12\" height=\"13\" viewBox=\"-7 -8 14 15\" aria-hidden=\"true\">"
        + "<path d=\"M-4 -1.5 V-4.5 A4 4 0 0 1 4 -4.5 V-1.5\" fill=\"none\" stroke=\"#2ca02c\" stroke-width=\"1.8\"/>"
        + "<path d=\"M-6 -1.5 H6 V6.5 H-6 Z\" fill=\"#2ca02c\"/></svg> "

    /// A 400 page that says which parameter is wrong.
    static func badRequest(_ message: String) -> String {
        """
        <!DOCTYPE html>
        <html lang="en"><head><meta charset="utf-8"><title>Sigil ledger: bad request</title><style>\(style)</style></head>
        <body><header><span class="brand">Sigil</span><span class="sub">ledger</span></header>
        <main><section class="card"><h2>Bad request</h2><p class="red">\(HTML.escape(message))</p><p><a href="/ui">Back to the ledger</a></p></section></main></body></html>

        """
    }

    static let style = """
        *{box-sizing:border-box}
        body{margin:0;font:14px/1.45 "DejaVu Sans",system-ui,sans-serif;background:#f3f5f8;color:#1d2733}
        header{height:56px;padding:0 24px;display:flex;align-items:center;gap:14px;background:#1d2733;color:#fff;overflow:hidden}
        header .brand{font-weight:bold;font-size:20px;letter-spacing:.5px}
        header .sub{color:#b8c4d1}
        header .now{margin-left:auto;color:#8a99aa;font-size:12px}
        main{padding:16px 24px 32px}
        .top{display:flex;gap:20px;align-items:flex-start}
        #graph{display:block;flex:none}
        #graph .node-label{font-size:14px;font-weight:bold;fill:#1d2733;paint-order:stroke;stroke:#fff;stroke-width:4px}
        #graph .node-detail{font-size:11px;fill:#6a7785;paint-order:stroke;stroke:#fff;stroke-width:3px}
        #graph .edge-label{font-size:12px;fill:#3d4a57;paint-order:stroke;stroke:#fff;stroke-width:4px}
        #graph .empty{font-size:16px;fill:#6a7785}
        aside{flex:1;min-width:0;display:flex;flex-direction:column;gap:12px}
        .card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:12px 14px}
        .card h2{margin:0 0 8px;font-size:15px}
        .integrity{margin:0 0 6px;font-weight:bold}
        .integrity.ok{color:#1e7b34}.integrity.broken{color:#d62728}
        .totals{margin:0 0 4px}.red{color:#d62728}.muted{color:#6a7785;font-weight:normal}
        .legend div{display:flex;align-items:center;gap:8px;margin:4px 0}
        table{border-collapse:collapse;width:100%}
        th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #eaeef2;vertical-align:top}
        th{font-size:12px;color:#57606a;font-weight:600}
        td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
        table.edges td{font-size:12.5px}
        tr.deny td{background:#fdecec}tr.deny td.decision{color:#d62728;font-weight:bold}
        .filters{margin:16px 0;display:flex;flex-wrap:wrap;gap:10px 14px;align-items:flex-end}
        .filters label{display:flex;flex-direction:column;font-size:12px;color:#57606a;gap:2px}
        .filters input,.filters select{font:13px "DejaVu Sans",sans-serif;padding:4px 6px;border:1px solid #c3ccd5;border-radius:4px;min-width:90px}
        .filters input[name=from],.filters input[name=to]{width:290px}
        .filters input[name=since],.filters input[name=until]{width:140px}.filters input[name=limit]{width:70px;min-width:0}
        .filters button{font:13px "DejaVu Sans",sans-serif;padding:5px 14px;border:0;border-radius:4px;background:#1f4e79;color:#fff}
        .filters .reset{font-size:13px;color:#1f4e79;padding-bottom:5px}
        table.ledger td{font-size:12.5px;white-space:nowrap}
        .rows{overflow-x:auto}
        table.ledger td.path{white-space:normal;overflow-wrap:anywhere;min-width:12ch;font-family:"DejaVu Sans Mono",monospace;font-size:11.5px}
        table.ledger th,table.ledger td{padding:3px 5px}
        td.id{font-family:"DejaVu Sans Mono",monospace;font-size:11.5px}td.plain{color:#b35900;font-style:italic}
        td.time{font-family:"DejaVu Sans Mono",monospace;font-size:11.5px;color:#57606a}
        """
}

extension LedgerGraph {
    /// `{"edges": [...], "nodes": [...]}`: the edges exactly as `sigil audit graph --format json`
    /// prints them, the nodes with the positions the page draws them at.
    func json() throws -> [UInt8] {
        struct Out: Encodable { var edges: [LedgerEdge]; var nodes: [Node] }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array(try encoder.encode(Out(edges: edges.map(\.edge), nodes: nodes)))
    }
}
