import Testing
import NIOCore
import NIOEmbedded
@testable import SigilProxy

/// The response framer decides where each app response ends (pooling, pipelining, the ledger's
/// status and size): fed in every split, it must agree with the message boundaries.
struct ResponseFramerTests {
    struct Outcome: Equatable {
        var statuses: [Int] = []
        var ends = 0
        var body: [UInt8] = []
        var consumed = 0
        var keepAlive: [Bool] = []
    }

    /// Feeds `text` in pieces of `split` bytes (0 = all at once) for one response.
    func frame(_ text: String, toHEAD: Bool = false, split: Int = 0, decodes: Bool = true) throws -> Outcome {
        var framer = HTTP1ResponseFramer(decodes: decodes)
        framer.expectResponse(toHEAD: toHEAD)
        var outcome = Outcome()
        let bytes = Array(text.utf8)
        let step = split == 0 ? bytes.count : split
        var offset = 0
        while offset < bytes.count {
            let piece = ByteBuffer(bytes: bytes[offset..<min(offset + step, bytes.count)])
            let used = try framer.feed(piece) { event in
                switch event {
                case .head(let status, let keepAlive, _):
                    outcome.statuses.append(status)
                    outcome.keepAlive.append(keepAlive)
                case .body(let slice): outcome.body += slice.readableBytesView
                case .end: outcome.ends += 1
                }
            }
            outcome.consumed += used
            if used < piece.readableBytes { break }
            offset += step
        }
        return outcome
    }

    static let splits = [0, 1, 2, 3, 7, 64]

    @Test("Content-Length body, any split", arguments: splits)
    func contentLength(split: Int) throws {
        let o = try frame("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", split: split)
        #expect(o.statuses == [200])
        #expect(o.ends == 1)
        #expect(o.body == Array("hello".utf8))
        #expect(o.keepAlive == [true])
    }

    @Test("chunked body with extensions and trailers, any split", arguments: splits)
    func chunked(split: Int) throws {
        let text = "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
        let o = try frame(text, split: split)
        #expect(o.statuses == [201])
        #expect(o.ends == 1)
        #expect(o.body == Array("hello0123456789".utf8))
        #expect(o.consumed == text.utf8.count)
    }

    @Test("bytes after the end of the response are not consumed")
    func stopsAtEnd() throws {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
        let o = try frame(text)
        #expect(o.ends == 1)
        #expect(o.consumed == text.utf8.count - "HTTP/1.1 200 OK\r\n".utf8.count)
    }

    @Test("no body: HEAD, 204, 304")
    func noBody() throws {
        #expect(try frame("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", toHEAD: true).ends == 1)
        #expect(try frame("HTTP/1.1 204 No Content\r\n\r\n").ends == 1)
        #expect(try frame("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n").ends == 1)
    }

    @Test("100 Continue is passed through and the final response follows")
    func interim() throws {
        let o = try frame("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", split: 5)
        #expect(o.statuses == [200])
        #expect(o.ends == 1)
    }

    @Test("Connection: close and HTTP/1.0 responses are not reusable")
    func closing() throws {
        #expect(try frame("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keepAlive == [false])
        #expect(try frame("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keepAlive == [false])
        #expect(try frame("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n").keepAlive == [true])
    }

    @Test("a body without length ends when the app closes")
    func untilClose() throws {
        var framer = HTTP1ResponseFramer(decodes: true)
        framer.expectResponse(toHEAD: false)
        var ends = 0
        var keepAlive: [Bool] = []
        try framer.feed(ByteBuffer(string: "HTTP/1.1 200 OK\r\n\r\nstream")) { event in
            if case .head(_, let k, _) = event { keepAlive.append(k) }
            if case .end = event { ends += 1 }
        }
        #expect(ends == 0)
        #expect(keepAlive == [false])
        #expect(framer.connectionClosed { if case .end = $0 { ends += 1 } })
        #expect(ends == 1)
    }

    @Test("a truncated response is reported at close")
    func truncated() throws {
        var framer = HTTP1ResponseFramer()
        framer.expectResponse(toHEAD: false)
        try framer.feed(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")) { _ in }
        #expect(framer.connectionClosed { _ in } == false)
    }

    @Test("malformed responses are errors, not guesses", arguments: [
        "HTTP/2 200 OK\r\n\r\n",
        "HTTP/1.1 2x0 OK\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ])
    func malformed(text: String) {
        #expect(throws: HTTP1ResponseFramer.FramingError.self) { try frame(text) }
    }

    /// Every head split at every byte (including inside the blank line) gives the same fields as
    /// the head in one read, which is parsed where it lies: CRLF and bare-LF heads.
    @Test("fields are the same whatever the split", arguments: [
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Long-Header-Name: a value\t \r\nContent-Length: 2\r\n\r\nok",
        "HTTP/1.1 404 Not Found\nServer: x\nContent-Length: 0\n\n",
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: b\r\n\r\n",
    ])
    func fieldsInEverySplit(text: String) throws {
        func fields(_ pieces: [[UInt8]]) throws -> (status: Int, headers: [String], ends: Int) {
            var framer = HTTP1ResponseFramer(decodes: true)
            framer.expectResponse(toHEAD: false)
            var result = (status: 0, headers: [String](), ends: 0)
            for piece in pieces {
                try framer.feed(ByteBuffer(bytes: piece)) { event in
                    switch event {
                    case .head(let status, _, let headers):
                        result.status = status
                        result.headers = headers.map { "\($0.0)=\($0.1)" }
                    case .end: result.ends += 1
                    case .body: break
                    }
                }
            }
            return result
        }
        let bytes = Array(text.utf8)
        let whole = try fields([bytes])
        #expect(whole.ends == 1)
        #expect(whole.headers.count == 3 || whole.headers.count == 2)
        // Names in lowercase (what HTTP/2 sends), values as received (trimmed).
        #expect(whole.headers.contains("content-length=2") || whole.headers.contains("content-length=0"))
        if whole.headers.count == 3 { #expect(whole.headers[1] == "x-long-header-name=a value") }
        for cut in 1..<bytes.count {
            let split = try fields([Array(bytes[..<cut]), Array(bytes[cut...])])
            #expect(split.status == whole.status && split.headers == whole.headers && split.ends == 1, "cut at \(cut)")
        }
    }

    @Test("Connection and Transfer-Encoding lists are read token by token")
    func lists() throws {
        func token(_ value: String, _ wanted: StaticString) -> Bool {
            Array(value.utf8).withUnsafeBytes { HTTPBytes.containsToken($0, wanted) }
        }
        #expect(token("keep-alive, Upgrade", "upgrade"))
        #expect(token("\tClose ", "close"))
        #expect(token("x,,close", "close"))
        #expect(!token("closed", "close"))
        #expect(!token("", "close"))
        #expect(!token(",", "close"))
        func chunked(_ value: String) -> Bool {
            Array(value.utf8).withUnsafeBytes { HTTP1ResponseFramer.endsWithChunked($0) }
        }
        #expect(chunked("gzip, chunked"))
        #expect(chunked("chunked, "))
        #expect(chunked("CHUNKED"))
        #expect(!chunked("chunked, gzip"))
        #expect(!chunked(""))
        #expect(!chunked(" , "))
        // A response whose last coding is not chunked is read until the app closes.
        #expect(try frame("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc").keepAlive == [false])
    }

    @Test("a head larger than 64 KiB is refused, split or in one read")
    func hugeHead() {
        let text = "HTTP/1.1 200 OK\r\nX-Big: " + String(repeating: "a", count: 70_000)
        #expect(throws: HTTP1ResponseFramer.FramingError.self) { try frame(text, split: 4096) }
        #expect(throws: HTTP1ResponseFramer.FramingError.self) { try frame(text + "\r\n\r\n") }
        #expect(throws: HTTP1ResponseFramer.FramingError.self) { try frame(text + "\r\n\r\n", split: 60_000) }
    }

    /// The last response on a client's connection (the client asked to close) is relayed with
    /// `connection: close` after its final status line, whatever the reads: a head split across
    /// reads is held back until it is whole, an interim head before it is relayed once complete.
    /// Each response is fed split at every byte, and one byte at a time; the same handler then
    /// carries a second response (pooled reuse) that is not marked.
    @Test("a last response is marked connection: close in every split", arguments: [
        "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello",
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\nServer: x\n\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ])
    func marksLastResponseClose(text: String) throws {
        let bytes = Array(text.utf8)
        let interim = text.hasPrefix("HTTP/1.1 100") ? Array("HTTP/1.1 100 Continue\r\n\r\n".utf8) : []
        let finalLine = bytes[interim.count...].firstIndex(of: 0x0A)! + 1
        let marked = Array(bytes[..<finalLine]) + Array("connection: close\r\n".utf8) + Array(bytes[finalLine...])
        let next = Array("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".utf8)
        let cuts = (1..<bytes.count).map { [0, $0, bytes.count] } + [Array(0...bytes.count)]
        for marks in [true, false] {
            for cut in cuts {
                let (handler, channel, sink) = Self.appConnection()
                handler.begin(sink: sink, toHEAD: false, decodes: false, holdReads: false, marksClose: marks)
                for (from, to) in zip(cut, cut.dropFirst()) {
                    let before = sink.relayed
                    try channel.writeInbound(ByteBuffer(bytes: bytes[from..<to]))
                    #expect(sink.relayed.starts(with: before))
                    if to >= interim.count { #expect(sink.relayed.count >= interim.count, "the interim head was held back") }
                }
                #expect(sink.relayed == (marks ? marked : bytes), "cuts \(cut)")
                #expect(sink.ends == 1)
                // The connection goes back to the pool: the next response is not marked.
                sink.relayed = []
                handler.begin(sink: sink, toHEAD: false, decodes: false, holdReads: false)
                try channel.writeInbound(ByteBuffer(bytes: next))
                #expect(sink.relayed == next && sink.ends == 2)
                _ = try channel.finish(acceptAlreadyClosed: true)
            }
        }
    }

    /// Marking: bytes after the response are not relayed (the connection is not reused), a HEAD
    /// response is marked, and a head the app abandons while it is held back reaches nobody (the
    /// sink hears a failure, so the client can get a clean 502).
    /// A 101 to a WebSocket upgrade hands the connection over with every byte of that read (the
    /// app may speak first); a 101 nobody asked for ends the response and the connection.
    @Test("101: an asked-for upgrade relays what follows and hands over; an unasked one closes")
    func switchingProtocols() throws {
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        do {
            let (handler, channel, sink) = Self.appConnection()
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).wait()
            handler.begin(sink: sink, toHEAD: false, decodes: false, holdReads: false, upgrade: true)
            try channel.writeInbound(ByteBuffer(string: head + "\u{81}\u{02}hi"))
            #expect(String(decoding: sink.relayed, as: UTF8.self) == head + "\u{81}\u{02}hi")
            #expect(sink.upgrades == 1 && sink.ends == 0 && !handler.reusable && channel.isActive)
            _ = try channel.finish(acceptAlreadyClosed: true)
        }
        // A client that asked to close yet upgraded: the head's first part, held back for marking,
        // goes out first and unmarked when the 101 completes in a later read.
        for cut in [1, 20, head.utf8.count - 1] {
            let (handler, channel, sink) = Self.appConnection()
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).wait()
            handler.begin(sink: sink, toHEAD: false, decodes: false, holdReads: false, marksClose: true, upgrade: true)
            let bytes = Array((head + "\u{81}\u{02}hi").utf8)
            try channel.writeInbound(ByteBuffer(bytes: bytes[..<cut]))
            try channel.writeInbound(ByteBuffer(bytes: bytes[cut...]))
            #expect(sink.relayed == bytes && sink.upgrades == 1, "cut \(cut)")
            _ = try channel.finish(acceptAlreadyClosed: true)
        }
        do {
            let (handler, channel, sink) = Self.appConnection()
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).wait()
            handler.begin(sink: sink, toHEAD: false, decodes: false, holdReads: false)
            try channel.writeInbound(ByteBuffer(string: head + "\u{81}\u{02}hi"))
            #expect(String(decoding: sink.relayed, as: UTF8.self) == head)
            #expect(sink.upgrades == 0 && sink.ends == 1 && !handler.reusable && !channel.isActive)
            _ = try channel.finish(acceptAlreadyClosed: true)
        }
    }

    @Test("marking: bytes after the end, HEAD, and an app that fails mid-head")
    func markingEdges() throws {
        do {
            let (handler, channel, sink) = Self.appConnection()
            handler.begin(sink: sink, toHEAD: true, decodes: false, holdReads: false, marksClose: true)
            try channel.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nEXTRA"))
            #expect(String(decoding: sink.relayed, as: UTF8.self) == "HTTP/1.1 200 OK\r\nconnection: close\r\nContent-Length: 9\r\n\r\n")
            #expect(sink.ends == 1 && !handler.reusable)
            _ = try channel.finish(acceptAlreadyClosed: true)
        }
        do {
            let (handler, channel, sink) = Self.appConnection()
            handler.begin(sink: sink, toHEAD: false, decodes: false, holdReads: false, marksClose: true)
            try channel.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-"))
            #expect(sink.relayed.isEmpty)
            channel.pipeline.fireChannelInactive()
            #expect(sink.relayed.isEmpty && sink.failures == [true] && sink.ends == 0)
            _ = try channel.finish(acceptAlreadyClosed: true)
        }
    }

    final class RecordingSink: AppResponseSink {
        var relayed: [UInt8] = []
        var ends = 0
        var failures: [Bool] = []
        var upgrades = 0
        func appUpgraded() { upgrades += 1 }
        func appBytes(_ buffer: ByteBuffer) { relayed += buffer.readableBytesView }
        func appHead(status: Int, keepAlive: Bool, headers: [(String, String)]) {}
        func appBody(_ buffer: ByteBuffer) {}
        func appEnd() { ends += 1 }
        func appReadComplete() {}
        func appFailed(receivedAnything: Bool) { failures.append(receivedAnything) }
        func appWritabilityChanged(_ writable: Bool) {}
    }

    static func appConnection() -> (AppResponseHandler, EmbeddedChannel, RecordingSink) {
        let handler = AppResponseHandler()
        return (handler, EmbeddedChannel(handler: handler), RecordingSink())
    }
}
