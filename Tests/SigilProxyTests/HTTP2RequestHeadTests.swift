import Testing
import NIOHPACK
import NIOHTTP1
import NIOCore
import NIOEmbedded
@testable import SigilProxy

/// An HTTP/2 header block becomes the HTTP/1.1 request head the app receives.
struct HTTP2RequestHeadTests {
    @Test(":authority becomes Host (replacing a host field), pseudo-fields are not forwarded, order kept")
    func authorityAndPseudoFields() throws {
        let block = HPACKHeaders([(":method", "POST"), (":scheme", "https"), (":path", "/a?b=c"), (":authority", "api.shop"),
                                  ("host", "elsewhere"), ("x-one", "1"), ("x-two", "2")])
        let head = try #require(HTTP2InboundStream.requestHead(block))
        #expect(head.method == .POST)
        #expect(head.uri == "/a?b=c")
        #expect(head.version == .http2)
        #expect(head.headers["host"] == ["api.shop"])
        #expect(head.headers.map(\.name) == ["host", "x-one", "x-two"])
        #expect(!head.headers.contains { $0.name.hasPrefix(":") })
    }

    @Test("cookie fields split by HTTP/2 are joined with '; ' into one (RFC 9113, 8.2.3)")
    func cookiesJoined() throws {
        let block = HPACKHeaders([(":method", "GET"), (":path", "/"), (":authority", "api"), ("cookie", "a=1"), ("accept", "*/*"),
                                  ("cookie", "b=2")])
        let head = try #require(HTTP2InboundStream.requestHead(block))
        #expect(head.headers["cookie"] == ["a=1; b=2"])
        #expect(head.headers["accept"] == ["*/*"])
    }

    @Test("a block without :method or :path is no request")
    func missingPseudoFields() {
        #expect(HTTP2InboundStream.requestHead(HPACKHeaders([(":method", "GET"), (":authority", "api")])) == nil)
        #expect(HTTP2InboundStream.requestHead(HPACKHeaders([(":path", "/"), (":authority", "api")])) == nil)
    }
}

extension HTTP2RequestHeadTests {
    @Test("a block with neither :authority nor host is no request (400, as on HTTP/1.1); host alone is kept")
    func hostRequired() throws {
        #expect(HTTP2InboundStream.requestHead(HPACKHeaders([(":method", "GET"), (":path", "/")])) == nil)
        let head = try #require(HTTP2InboundStream.requestHead(HPACKHeaders([(":method", "GET"), (":path", "/"), ("host", "api")])))
        #expect(head.headers["host"] == ["api"])
    }

    @Test("two host fields, or a content-length that is not one field of plain digits, are no request (400, as on HTTP/1.1)")
    func ambiguousFields() throws {
        func head(_ fields: [(String, String)]) -> HTTPRequestHead? {
            HTTP2InboundStream.requestHead(HPACKHeaders([(":method", "POST"), (":path", "/")] + fields))
        }
        #expect(head([("host", "a"), ("host", "blocked.example")]) == nil)
        #expect(head([(":authority", "a"), ("host", "b"), ("host", "c")]) == nil)
        for value in ["+3", "3, 3", "", " 3", "0x3", "-1"] {
            #expect(head([("host", "a"), ("content-length", value)]) == nil, "\(value)")
        }
        #expect(head([("host", "a"), ("content-length", "3"), ("content-length", "3")]) == nil)
        let ok = try #require(head([("host", "a"), ("content-length", "3")]))
        #expect(ok.headers["content-length"] == ["3"])
    }

    @Test("connection-specific response fields are recognised by name")
    func hopByHop() {
        for name in ["connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection"] {
            #expect(HTTP2InboundStream.isHopByHop(name), "\(name)")
        }
        for name in ["content-length", "content-type", "x-upgrade", "connectionx", "te"] {
            #expect(!HTTP2InboundStream.isHopByHop(name), "\(name)")
        }
    }

    @Test("a response head loses its hop-by-hop fields and those its Connection field names, any case")
    func responseHopByHop() {
        let block = HTTP2InboundStream.responseHeaders(status: 200, [
            ("content-type", "text/plain"), ("connection", "keep-alive, X-Private"), ("keep-alive", "timeout=5"),
            ("x-private", "secret"), ("transfer-encoding", "chunked"), ("connection", "\tX-Other "), ("x-other", "1"),
            ("x-kept", "2"), ("upgrade", "h2c"), ("proxy-connection", "close"),
        ])
        #expect(block.map(\.name) == [":status", "content-type", "x-kept"])
        #expect(block.first(name: ":status") == "200")
        // Without a Connection field only the fixed hop-by-hop names go.
        let plain = HTTP2InboundStream.responseHeaders(status: 404, [("x-private", "kept"), ("keep-alive", "timeout=5")])
        #expect(plain.map(\.name) == [":status", "x-private"])
    }
}

extension HTTP2RequestHeadTests {
    @Test("a field value with leading or trailing SP/HTAB is malformed (RFC 9113, 8.2.1): no request; inner spaces are fine")
    func surroundingWhitespaceRefused() throws {
        for value in [" 1", "1 ", "\t1", "1\t"] {
            #expect(HTTP2InboundStream.requestHead(HPACKHeaders([(":method", "GET"), (":path", "/"), (":authority", "api"), ("x-evil", value)])) == nil)
        }
        #expect(HTTP2InboundStream.requestHead(HPACKHeaders([(":method", "GET"), (":path", "/"), ("host", " forbidden.example")])) == nil)
        #expect(HTTP2InboundStream.requestHead(HPACKHeaders([(":method", "GET"), (":path", "/"), (":authority", "api"), ("x-ok", "a b")])) != nil)
    }
}

/// The GOAWAY watcher between the socket and NIOHTTP2: a connection error's GOAWAY closes the
/// connection once written; other frames, and a GOAWAY with NO_ERROR (a graceful end), do not.
struct GoAwayCloserTests {
    func frame(type: UInt8, payload: [UInt8]) -> [UInt8] {
        let n = payload.count
        return [UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff), type, 0, 0, 0, 0, 0] + payload
    }

    func run(_ chunks: [[UInt8]]) throws -> Bool {
        let channel = EmbeddedChannel(handler: GoAwayCloser())
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        defer { _ = try? channel.finish() }
        for chunk in chunks {
            var buffer = channel.allocator.buffer(capacity: chunk.count)
            buffer.writeBytes(chunk)
            try channel.writeAndFlush(IOData.byteBuffer(buffer)).wait()
        }
        return !channel.isActive
    }

    @Test func closesAfterAGoAwayWithAnError() throws {
        let settings = frame(type: 0x4, payload: [0, 3, 0, 0, 0, 100])
        let ping = frame(type: 0x6, payload: Array(repeating: 7, count: 8))
        let goAway = frame(type: 0x7, payload: [0, 0, 0, 0, 0, 0, 0, 1] + Array("debug".utf8))  // PROTOCOL_ERROR
        let graceful = frame(type: 0x7, payload: [0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0])
        #expect(try !run([settings, ping]))
        #expect(try !run([settings, graceful, ping]))
        #expect(try run([settings + ping + goAway]))
        // split anywhere: inside a header, inside the GOAWAY's error code
        let bytes = settings + ping + goAway
        for cut in [3, 12, 20, 29, 35, 38] {
            #expect(try run([Array(bytes[..<cut]), Array(bytes[cut...])]), "cut at \(cut)")
        }
    }
}
