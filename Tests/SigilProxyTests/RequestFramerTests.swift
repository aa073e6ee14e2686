import Testing
import NIOCore
import NIOHTTP1
@testable import SigilProxy

/// The request framer decides where each client request ends: the inbound forwards bodies as the
/// bytes received, so the framer must agree with the message boundaries in every split and refuse
/// whatever two HTTP implementations could frame differently (request smuggling).
struct RequestFramerTests {
    struct Request: Equatable {
        var method: String
        var target: String
        var host: String?
        var keepAlive: Bool
        var raw: [UInt8] = []
        var payload = 0
        var ended = false
        var websocket = false
        /// Bytes after a WebSocket upgrade request, as the framer passed them on unframed.
        var tunnel: [UInt8] = []
    }

    /// Feeds `text` in pieces of `split` bytes (0 = all at once).
    func frame(_ text: String, split: Int = 0) throws(HTTP1RequestFramer.FramingError) -> [Request] {
        var framer = HTTP1RequestFramer()
        var requests: [Request] = []
        let bytes = Array(text.utf8)
        let step = split == 0 ? max(bytes.count, 1) : split
        var offset = 0
        while offset < bytes.count {
            let piece = ByteBuffer(bytes: bytes[offset..<min(offset + step, bytes.count)])
            try framer.feed(piece) { event in
                switch event {
                case .head(let head):
                    requests.append(Request(method: head.method, target: head.target, host: head.host, keepAlive: head.keepAlive,
                                            websocket: head.websocketUpgrade))
                case .body(let body, let payload):
                    requests[requests.count - 1].raw += body.readableBytesView
                    requests[requests.count - 1].payload += payload
                case .end:
                    requests[requests.count - 1].ended = true
                case .tunnel(let bytes):
                    requests[requests.count - 1].tunnel += bytes.readableBytesView
                }
            }
            offset += step
        }
        return requests
    }

    func refusal(_ text: String) -> HTTP1RequestFramer.FramingError? {
        do {
            _ = try frame(text)
            return nil
        } catch {
            return error
        }
    }

    static let pipelined =
        "GET /a HTTP/1.1\r\nHost: api\r\n\r\n"
        + "POST /b HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhello"
        + "POST /c HTTP/1.1\r\nhost: api\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nx-sum: 1\r\n\r\n"
        + "\r\nGET /d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        + "GET /e HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"

    @Test func pipelinedRequestsInEverySplit() throws {
        let whole = try frame(Self.pipelined)
        #expect(whole.map(\.target) == ["/a", "/b", "/c", "/d", "/e"])
        #expect(whole.map(\.ended) == [true, true, true, true, true])
        #expect(whole.map(\.payload) == [0, 5, 19, 0, 0])
        #expect(whole.map(\.keepAlive) == [true, true, true, true, false])
        #expect(whole[3].host == nil)
        // Trailer fields are checked, then dropped (as Envoy's HTTP/1 codec does): the app gets an empty trailer section.
        #expect(String(decoding: whole[2].raw, as: UTF8.self) == "3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n")
        for split in 1...17 {
            #expect(try frame(Self.pipelined, split: split) == whole, "split \(split)")
        }
    }

    @Test func headFieldsAndForwardedHead() throws {
        var framer = HTTP1RequestFramer()
        var heads: [HTTP1RequestHead] = []
        let text = "GET /x?q=1 HTTP/1.1\r\nHost:  api:8080 \r\nX-Forwarded-Client-Cert: forged\r\nX-Tag: a\r\nx-tag: b\r\n\r\n"
        try framer.feed(ByteBuffer(string: text)) { if case .head(let h) = $0 { heads.append(h) } }
        let head = try #require(heads.first)
        #expect(head.method == "GET" && head.target == "/x?q=1" && head.host == "api:8080")
        #expect(head.values("x-tag") == ["a", "b"])
        #expect(head.values("missing") == [])
        var out = ByteBuffer()
        head.write(uri: "/x?q=1", host: nil, xfcc: "By=spiffe://td/a", into: &out)
        #expect(String(buffer: out) == "GET /x?q=1 HTTP/1.1\r\nHost: api:8080\r\nX-Tag: a\r\nx-tag: b\r\nx-forwarded-client-cert: By=spiffe://td/a\r\n\r\n")
        out.clear()
        head.write(uri: "/y", host: "other", xfcc: nil, into: &out)
        #expect(String(buffer: out) == "GET /y HTTP/1.1\r\nhost: other\r\nX-Tag: a\r\nx-tag: b\r\n\r\n")
    }

    /// A server that maps field names to variables (CGI, WSGI) reads `x_forwarded_client_cert` as
    /// `x-forwarded-client-cert`: no spelling of it gets past the proxy.
    @Test func forwardedClientCertIsStrippedInEverySpelling() throws {
        var framer = HTTP1RequestFramer()
        var heads: [HTTP1RequestHead] = []
        let text = "GET / HTTP/1.1\r\nHost: a\r\nx_forwarded_client_cert: forged\r\nX_Forwarded-Client_CERT: forged\r\n"
            + "x-forwarded-client-certs: kept\r\nx.forwarded.client.cert: kept\r\n\r\n"
        try framer.feed(ByteBuffer(string: text)) { if case .head(let h) = $0 { heads.append(h) } }
        var out = ByteBuffer()
        try #require(heads.first).write(uri: "/", host: nil, xfcc: nil, into: &out)
        #expect(String(buffer: out) == "GET / HTTP/1.1\r\nHost: a\r\nx-forwarded-client-certs: kept\r\nx.forwarded.client.cert: kept\r\n\r\n")
        #expect(HTTPBytes.isForwardedClientCert("x_forwarded_client_cert"))
        #expect(!HTTPBytes.isForwardedClientCert("x-forwarded-client-cer"))
    }

    /// Fields that concern only the client's connection stop at the proxy (RFC 9110 7.6.1), so a
    /// client's `Connection: close` does not close the pooled app connection. Fields a
    /// `Connection` header names are not removed (as in Envoy and nginx): the app sees every
    /// header authorization read, and the ones that frame and route the request.
    /// A WebSocket opening handshake (RFC 6455 4.1) is forwarded with `connection: upgrade` and
    /// `upgrade: websocket`, and nothing after it is framed as HTTP, in every split: the bytes are
    /// the new protocol's if the app answers 101. Anything else that asks to upgrade is plain HTTP.
    @Test func websocketUpgradeRequests() throws {
        let handshake = "GET /chat HTTP/1.1\r\nHost: api\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n"
            + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        let after = "\u{81}\u{05}hello" + "GET /not-a-request HTTP/1.1\r\nHost: api\r\n\r\n"
        for split in [0, 1, 7, 64] {
            let requests = try frame(handshake + after, split: split)
            #expect(requests.count == 1, "split \(split)")
            #expect(requests.first?.websocket == true && requests.first?.ended == true)
            #expect(requests.first?.tunnel == Array(after.utf8), "split \(split)")
        }
        var framer = HTTP1RequestFramer()
        var heads: [HTTP1RequestHead] = []
        try framer.feed(ByteBuffer(string: handshake)) { if case .head(let h) = $0 { heads.append(h) } }
        var out = ByteBuffer()
        try #require(heads.first).write(uri: "/chat", host: nil, xfcc: "By=x", into: &out)
        #expect(String(buffer: out) == "GET /chat HTTP/1.1\r\nHost: api\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            + "Sec-WebSocket-Version: 13\r\nconnection: upgrade\r\nupgrade: websocket\r\nx-forwarded-client-cert: By=x\r\n\r\n")
        // Not WebSocket handshakes: framed as HTTP on, Upgrade dropped.
        let notUpgrades = [
            "GET /a HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: api\r\nUpgrade: websocket\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: api\r\nConnection: upgrade\r\nUpgrade: websocket\r\nUpgrade: websocket\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: api\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nhi",
            "GET /a HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        ]
        for text in notUpgrades {
            let requests = try frame(text + "GET /b HTTP/1.1\r\nHost: api\r\n\r\n")
            #expect(requests.map(\.target) == ["/a", "/b"] && requests.allSatisfy { !$0.websocket && $0.tunnel.isEmpty }, "\(text)")
        }
    }

    @Test func connectionSpecificFieldsStayOnTheClientsConnection() throws {
        func forwarded(_ text: String, host: String? = nil, xfcc: String? = nil) throws -> (String, Bool) {
            var framer = HTTP1RequestFramer()
            var heads: [HTTP1RequestHead] = []
            try framer.feed(ByteBuffer(string: text)) { if case .head(let h) = $0 { heads.append(h) } }
            let head = try #require(heads.first)
            var out = ByteBuffer()
            head.write(uri: head.target, host: host, xfcc: xfcc, into: &out)
            return (String(buffer: out), head.keepAlive)
        }
        let (closing, keepAlive) = try forwarded("POST /a HTTP/1.1\r\nHost: api\r\nConnection: close, X-Env\r\n"
            + "connection: Content-Length, HOST, x-forwarded-client-cert\r\nX-Env: staging\r\nKeep-Alive: timeout=5\r\n"
            + "Upgrade: h2c\r\nPROXY-CONNECTION: keep-alive\r\nTE: trailers\r\nX-Forwarded-Client-Cert: forged\r\n"
            + "Content-Length: 2\r\n\r\nhi", xfcc: "By=spiffe://td/api")
        #expect(!keepAlive)
        #expect(closing == "POST /a HTTP/1.1\r\nHost: api\r\nX-Env: staging\r\nTE: trailers\r\nContent-Length: 2\r\n"
            + "x-forwarded-client-cert: By=spiffe://td/api\r\n\r\n")
        // A chunked request naming its framing in Connection keeps it; a Host replacement still applies.
        #expect(try forwarded("POST /t HTTP/1.1\r\nHost: api\r\nConnection: transfer-encoding, host\r\n"
            + "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", host: "app.local").0
            == "POST /t HTTP/1.1\r\nhost: app.local\r\nTransfer-Encoding: chunked\r\n\r\n")
        // Every HTTP/1.0 request asks the app to keep its connection, whatever the client asked.
        let (kept, keptAlive) = try forwarded("GET /b HTTP/1.0\r\nConnection: Keep-Alive\r\nX-A: 1\r\n\r\n")
        #expect(keptAlive && kept == "GET /b HTTP/1.0\r\nX-A: 1\r\nconnection: keep-alive\r\n\r\n")
        let (plain, plainKeptAlive) = try forwarded("GET /c HTTP/1.0\r\nX-A: 1\r\n\r\n")
        #expect(!plainKeptAlive && plain == "GET /c HTTP/1.0\r\nX-A: 1\r\nconnection: keep-alive\r\n\r\n")
        // No connection-specific field: the head goes as it came.
        #expect(try forwarded("GET /d HTTP/1.1\r\nHost: api\r\nX-Connection: close\r\nUpgrade-Insecure-Requests: 1\r\n\r\n").0
            == "GET /d HTTP/1.1\r\nHost: api\r\nX-Connection: close\r\nUpgrade-Insecure-Requests: 1\r\n\r\n")
    }

    @Test func identicalContentLengthsAreOneLength() throws {
        let requests = try frame("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabc")
        #expect(requests.map(\.payload) == [3])
    }

    @Test(arguments: [
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400, "conflicting"),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n", 400, "conflicting"),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n", 400, "Content-Length"),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "Content-Length"),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3,\r\n\r\nabc", 400, "Content-Length"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n", 400, "empty Transfer-Encoding"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\n\r\n", 400, "empty Transfer-Encoding"),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "both"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "final transfer coding"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400, "more than once"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "not implemented"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 400, "final transfer coding"),
        ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "HTTP/1.0"),
        ("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400, "folding"),
        ("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", 400, "header name"),
        ("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\u{1}c\r\n\r\n", 400, "control character"),
        ("GET / HTTP/1.1\r\nHost: a\rX-A: b\r\n\r\n", 400, "bare CR"),
        ("GET / HTTP/1.1\r\n\r\n", 400, "missing Host"),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host"),
        ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "version"),
        ("GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400, "version"),
        ("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "request line"),
        ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "method"),
        ("GET /\u{7f} HTTP/1.1\r\nHost: a\r\n\r\n", 400, "request target"),
        ("GET /\r\n\r\n", 400, "request line"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", 400, "chunk size"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n", 400, "chunk size"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400, "CRLF"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n", 400, "CRLF"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\n", 400, "too large"),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n", 400, "header name"),
    ])
    func ambiguousOrMalformedRequestsAreRefused(text: String, status: Int, words: String) {
        let error = refusal(text)
        #expect(error?.status == status, "\(text.debugDescription)")
        #expect(error?.description.contains(words) == true, "\(error?.description ?? "accepted")")
    }

    @Test func aRefusedRequestStopsTheStream() throws {
        // Nothing after a refused head is framed: the smuggled request never surfaces.
        var framer = HTTP1RequestFramer()
        var targets: [String] = []
        let text = "GET /ok HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        #expect(throws: HTTP1RequestFramer.FramingError.self) {
            try framer.feed(ByteBuffer(string: text)) { if case .head(let h) = $0 { targets.append(h.target) } }
        }
        try framer.feed(ByteBuffer(string: "GET /after HTTP/1.1\r\nHost: a\r\n\r\n")) { if case .head(let h) = $0 { targets.append(h.target) } }
        #expect(targets == ["/ok"])
    }

    @Test func oversizedHeadsAre431() {
        let big = "GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + String(repeating: "a", count: 70_000) + "\r\n\r\n"
        #expect(refusal(big)?.status == 431)
        // also when it trickles in
        var framer = HTTP1RequestFramer()
        var status: Int?
        do {
            for chunk in Array(big.utf8).chunked(1000) { try framer.feed(ByteBuffer(bytes: chunk)) { _ in } }
        } catch {
            status = error.status
        }
        #expect(status == 431)
    }
}

extension Array {
    func chunked(_ size: Int) -> [ArraySlice<Element>] {
        stride(from: 0, to: count, by: size).map { self[$0..<Swift.min($0 + size, count)] }
    }
}

/// The head an HTTP/2 stream (or an HTTP/1.x request) is forwarded to the app with.
struct RequestHeadWriterTests {
    func written(_ version: HTTPVersion, forceChunked: Bool = false) -> String {
        var head = HTTPRequestHead(version: version, method: .POST, uri: "/upload")
        head.headers.add(name: "host", value: "api")
        head.headers.add(name: "x-forwarded-client-cert", value: "By=forged")
        var buffer = ByteBuffer()
        RequestHeadWriter.write(head, xfcc: "By=spiffe://td/ns/a/sa/b", forceChunked: forceChunked, into: &buffer)
        return String(buffer: buffer)
    }

    @Test("an HTTP/2 stream goes to the app as HTTP/1.1 (its version 2.0 has minor 0, like 1.0)")
    func http2IsSentAsHTTP11() {
        let text = written(.http2, forceChunked: true)
        #expect(text.hasPrefix("POST /upload HTTP/1.1\r\n"))
        #expect(text.contains("transfer-encoding: chunked\r\n"))
        #expect(!text.contains("By=forged"))
        #expect(text.hasSuffix("x-forwarded-client-cert: By=spiffe://td/ns/a/sa/b\r\n\r\n"))
    }

    @Test("HTTP/1.0 stays 1.0 and 1.1 stays 1.1")
    func http1Versions() {
        #expect(written(.http1_0).hasPrefix("POST /upload HTTP/1.0\r\n"))
        #expect(written(.http1_1).hasPrefix("POST /upload HTTP/1.1\r\n"))
    }
}
