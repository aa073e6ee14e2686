public import NIOCore

/// One HTTP/1.x request head as the inbound proxy needs it: the fields authorization and the
/// ledger read, parsed once, and the head's own bytes so it can be forwarded without being
/// rebuilt from Strings.
public struct HTTP1RequestHead: Sendable {
    /// Byte ranges of one header field inside ``bytes`` (offsets from its reader index).
    public struct Field: Sendable {
        var nameStart: Int32
        var nameEnd: Int32
        var valueStart: Int32
        var valueEnd: Int32
    }

    /// The head as received, request line through the blank line.
    public let bytes: ByteBuffer
    public let method: String
    public let target: String
    public let minorVersion: Int
    public let fields: [Field]
    public let host: String?
    public let contentLength: Int?
    public let chunked: Bool
    public let keepAlive: Bool
    /// The head has fields that belong to the client's connection only (`Connection`,
    /// `Keep-Alive`, `Proxy-Connection`, `Upgrade`): ``write(uri:host:xfcc:into:)`` leaves them
    /// out (a head without them is written with no per-field check).
    public let connectionSpecific: Bool
    /// A WebSocket opening handshake (RFC 6455 4.1: an HTTP/1.1 GET without a body, one
    /// `Upgrade: websocket`, `upgrade` among the `Connection` tokens). Istio lets these through by
    /// default: the head goes to the app with `connection: upgrade` and its `Upgrade` field, and a
    /// `101` answer turns the connection into a byte tunnel. Any other `Upgrade` (h2c, …) is dropped
    /// as a connection-specific field and the request is served as plain HTTP.
    public let websocketUpgrade: Bool

    public var hasBody: Bool { chunked || (contentLength ?? 0) > 0 }

    /// Every value of the header `lowercasedName`, in order.
    public func values(_ lowercasedName: String) -> [String] {
        var name = lowercasedName
        return name.withUTF8 { wanted in
            bytes.withUnsafeReadableBytes { raw in
                var found: [String] = []
                for field in fields where HTTPBytes.equalsIgnoringCase(raw, Int(field.nameStart), Int(field.nameEnd), wanted) {
                    found.append(String(decoding: UnsafeRawBufferPointer(rebasing: raw[Int(field.valueStart)..<Int(field.valueEnd)]), as: UTF8.self))
                }
                return found
            }
        }
    }

    /// Writes the head for the app: the request line with `uri`, every field except a
    /// client-supplied `x-forwarded-client-cert` (and `host` when `host` replaces it) and the
    /// fields that concern only the client's connection, each line ended by CRLF, then our
    /// `x-forwarded-client-cert` when the peer is an mTLS workload.
    ///
    /// Connection-specific fields stop here (RFC 9110 §7.6.1): `Connection`, `Keep-Alive`,
    /// `Proxy-Connection` and `Upgrade` (see ``isConnectionSpecific(_:_:_:)`` for why fields a
    /// `Connection` header names still go on). The app connection is the proxy's own and stays in
    /// its pool: a client's `Connection: close` closes the client's connection after the response,
    /// not the app's. Every HTTP/1.0 request is sent with `connection: keep-alive` for the same
    /// reason (its client's response is marked `connection: close` unless it asked to keep alive).
    public func write(uri: String, host replacement: String?, xfcc: String?, into buffer: inout ByteBuffer) {
        buffer.reserveCapacity(minimumWritableBytes: bytes.readableBytes + uri.utf8.count + (xfcc?.utf8.count ?? 0) + 64)
        buffer.writeString(method)
        buffer.writeStaticString(" ")
        buffer.writeString(uri)
        buffer.writeStaticString(minorVersion == 0 ? " HTTP/1.0\r\n" : " HTTP/1.1\r\n")
        if let replacement {
            buffer.writeStaticString("host: ")
            buffer.writeString(replacement)
            buffer.writeStaticString("\r\n")
        }
        bytes.withUnsafeReadableBytes { raw in
            for field in fields {
                let start = Int(field.nameStart), nameEnd = Int(field.nameEnd)
                if HTTPBytes.isForwardedClientCert(raw, start, nameEnd) { continue }
                if replacement != nil, HTTPBytes.equalsIgnoringCase(raw, start, nameEnd, "host") { continue }
                if connectionSpecific, Self.isConnectionSpecific(raw, start, nameEnd) { continue }
                buffer.writeBytes(UnsafeRawBufferPointer(rebasing: raw[start..<nameEnd]))
                buffer.writeStaticString(": ")
                buffer.writeBytes(UnsafeRawBufferPointer(rebasing: raw[Int(field.valueStart)..<Int(field.valueEnd)]))
                buffer.writeStaticString("\r\n")
            }
        }
        if minorVersion == 0 { buffer.writeStaticString("connection: keep-alive\r\n") }
        if websocketUpgrade { buffer.writeStaticString("connection: upgrade\r\nupgrade: websocket\r\n") }
        if let xfcc {
            buffer.writeStaticString("x-forwarded-client-cert: ")
            buffer.writeString(xfcc)
            buffer.writeStaticString("\r\n")
        }
        buffer.writeStaticString("\r\n")
    }

    /// Whether the field named `raw[start..<end]` is one of the connection-specific fields
    /// ``write(uri:host:xfcc:into:)`` drops: a fixed set of names, as Envoy and nginx drop them.
    /// Fields a `Connection` header names are not removed: a client could otherwise strip a header
    /// that authorization read (a policy's `when`) or one a front proxy added, and the app would
    /// frame, route or trust the request differently from what was decided here.
    static func isConnectionSpecific(_ raw: UnsafeRawBufferPointer, _ start: Int, _ end: Int) -> Bool {
        switch end - start {
        case 7: return HTTPBytes.equalsIgnoringCase(raw, start, end, "upgrade")
        case 10: return HTTPBytes.equalsIgnoringCase(raw, start, end, "connection") || HTTPBytes.equalsIgnoringCase(raw, start, end, "keep-alive")
        case 16: return HTTPBytes.equalsIgnoringCase(raw, start, end, "proxy-connection")
        default: return false
        }
    }
}

/// Finds the requests in an inbound HTTP/1.1 byte stream without decoding them into Strings:
/// heads are parsed for what authorization needs, bodies are passed on as the bytes received
/// (chunked framing included) once their framing has been checked.
///
/// It is strict where proxies and apps could disagree about where a request ends (RFC 9112
/// §6.3 and §11.2, request smuggling): `Transfer-Encoding` together with `Content-Length`,
/// conflicting lengths, a final coding other than `chunked`, obsolete line folding, whitespace
/// before a colon, control characters, a bare CR, and chunk lines not ended by CRLF are all
/// refused with 400 and the connection is closed. An HTTP/1.1 request needs exactly one `Host`.
public struct HTTP1RequestFramer: Sendable {
    public enum Event: Sendable {
        case head(HTTP1RequestHead)
        /// Body bytes as received; `payload` counts the body octets in them (chunk framing excluded).
        case body(ByteBuffer, payload: Int)
        /// The current request is complete.
        case end
        /// Bytes after a WebSocket upgrade request (``HTTP1RequestHead/websocketUpgrade``): not
        /// framed, since they are the new protocol's if the app answers `101`. Everything after
        /// such a request comes as this event.
        case tunnel(ByteBuffer)
    }

    public struct FramingError: Error, CustomStringConvertible, Sendable {
        /// The status to answer with: 400, 431 (head too large), 501 (coding) or 505 (version).
        public let status: Int
        public let description: String
        init(_ status: Int, _ description: String) {
            self.status = status
            self.description = description
        }
    }

    enum State: Sendable {
        case head
        case fixed(remaining: Int)
        case chunkSize
        case chunkData(remaining: Int)
        case chunkDataCR
        case chunkDataLF
        case trailers
        case failed
        /// After a WebSocket upgrade request: every byte is ``Event/tunnel(_:)``.
        case upgraded
    }

    public static let maxHeadBytes = 64 * 1024
    static let maxChunkLine = 4096
    /// The end of a chunked body after its last chunk (its trailer section, emptied).
    static let crlf = ByteBuffer(string: "\r\n")

    private var state: State = .head
    /// Bytes of a head that did not arrive in one read.
    private var partialHead: ByteBuffer?
    /// One chunk-size or trailer line in progress.
    private var line: [UInt8] = []
    private var trailerBytes = 0

    public init() {}

    /// Consumes all of `buffer`, calling `emit` for each event in order.
    public mutating func feed(_ buffer: ByteBuffer, emit: (Event) -> Void) throws(FramingError) {
        var index = buffer.readerIndex
        let end = buffer.writerIndex
        var bodyStart = -1
        var payload = 0
        switch state {
        case .head, .failed, .trailers: break  // trailer lines are not forwarded (see below)
        case .upgraded:
            if buffer.readableBytes > 0 { emit(.tunnel(buffer)) }
            return
        default: bodyStart = index  // a body continues from the previous read
        }
        func flushBody() {
            if bodyStart >= 0, index > bodyStart, let slice = buffer.getSlice(at: bodyStart, length: index - bodyStart) {
                emit(.body(slice, payload: payload))
            }
            bodyStart = -1
            payload = 0
        }
        func complete() {
            flushBody()
            state = .head
            emit(.end)
        }
        do throws(FramingError) {
            while index < end {
                switch state {
                case .failed:
                    return
                case .upgraded:
                    if let rest = buffer.getSlice(at: index, length: end - index) { emit(.tunnel(rest)) }
                    return
                case .head:
                    guard let head = try takeHead(buffer, &index) else { return }
                    let parsed = try Self.parse(head)
                    emit(.head(parsed))
                    if parsed.chunked {
                        state = .chunkSize
                        trailerBytes = 0
                    } else if let length = parsed.contentLength, length > 0 {
                        state = .fixed(remaining: length)
                    } else {
                        emit(.end)
                        if parsed.websocketUpgrade { state = .upgraded }
                        continue
                    }
                    bodyStart = index
                case .fixed(let remaining):
                    let n = min(remaining, end - index)
                    index += n
                    payload += n
                    if n == remaining { complete() } else { state = .fixed(remaining: remaining - n) }
                case .chunkData(let remaining):
                    let n = min(remaining, end - index)
                    index += n
                    payload += n
                    state = n == remaining ? .chunkDataCR : .chunkData(remaining: remaining - n)
                case .chunkDataCR, .chunkDataLF:
                    let byte = buffer.getInteger(at: index, as: UInt8.self)!
                    index += 1
                    if case .chunkDataCR = state {
                        guard byte == 0x0D else { throw FramingError(400, "chunk data not followed by CRLF") }
                        state = .chunkDataLF
                    } else {
                        guard byte == 0x0A else { throw FramingError(400, "chunk data not followed by CRLF") }
                        state = .chunkSize
                    }
                case .chunkSize, .trailers:
                    let byte = buffer.getInteger(at: index, as: UInt8.self)!
                    index += 1
                    guard byte == 0x0A else {
                        line.append(byte)
                        if line.count > Self.maxChunkLine { throw FramingError(400, "chunk line longer than 4 KiB") }
                        continue
                    }
                    guard line.last == 0x0D else { throw FramingError(400, "chunk line not ended by CRLF") }
                    line.removeLast()
                    defer { line.removeAll(keepingCapacity: true) }
                    if case .chunkSize = state {
                        let size = try Self.chunkSize(line)
                        state = size == 0 ? .trailers : .chunkData(remaining: size)
                        if size == 0 {
                            // The body goes on to the app through the last chunk's line; trailer
                            // fields are checked and dropped, as Envoy's HTTP/1 codec drops them:
                            // no policy saw them, and an app that merges trailers into the
                            // headers would read a forged `x-forwarded-client-cert` or `Host`.
                            flushBody()
                        }
                    } else if line.isEmpty {
                        emit(.body(Self.crlf, payload: 0))
                        state = .head
                        emit(.end)
                    } else {
                        trailerBytes += line.count + 2
                        guard trailerBytes <= Self.maxHeadBytes else { throw FramingError(431, "trailers larger than 64 KiB") }
                        let refused = line.withUnsafeBytes { raw -> FramingError? in
                            do throws(FramingError) { _ = try Self.field(raw, 0, raw.count) } catch { return error }
                            return nil
                        }
                        if let refused { throw refused }
                    }
                }
            }
            flushBody()
        } catch {
            state = .failed
            flushBody()
            throw error
        }
    }

    /// Collects head bytes up to the blank line; nil when the head is not complete yet.
    private mutating func takeHead(_ buffer: ByteBuffer, _ index: inout Int) throws(FramingError) -> ByteBuffer? {
        let end = buffer.writerIndex
        if partialHead == nil {
            // Empty lines before a request line are ignored (RFC 9112 §2.2).
            while index < end, let b = buffer.getInteger(at: index, as: UInt8.self), b == 0x0D || b == 0x0A { index += 1 }
            if index == end { return nil }
            if let length = buffer.withUnsafeReadableBytes({ Self.headLength($0, from: index - buffer.readerIndex, scanFrom: index - buffer.readerIndex) }) {
                guard length <= Self.maxHeadBytes else { throw FramingError(431, "request head larger than 64 KiB") }
                defer { index += length }
                return buffer.getSlice(at: index, length: length)
            }
            guard end - index <= Self.maxHeadBytes else { throw FramingError(431, "request head larger than 64 KiB") }
            partialHead = buffer.getSlice(at: index, length: end - index)
            index = end
            return nil
        }
        var pending = partialHead!
        let before = pending.readableBytes
        var more = buffer.getSlice(at: index, length: min(end - index, Self.maxHeadBytes + 1 - before))!
        pending.writeBuffer(&more)
        if let length = pending.withUnsafeReadableBytes({ Self.headLength($0, from: 0, scanFrom: max(0, before - 3)) }),
           length <= Self.maxHeadBytes {
            partialHead = nil
            index += length - before
            return pending.getSlice(at: pending.readerIndex, length: length)
        }
        guard pending.readableBytes <= Self.maxHeadBytes else { throw FramingError(431, "request head larger than 64 KiB") }
        partialHead = pending
        index = end
        return nil
    }

    /// The length of the head starting at `from` (through its blank line), scanning for the
    /// terminator from `scanFrom`; nil when it is not all there.
    static func headLength(_ raw: UnsafeRawBufferPointer, from: Int, scanFrom: Int) -> Int? {
        var i = max(scanFrom, from)
        while i < raw.count {
            if raw[i] == 0x0A {
                if i - 1 >= from, raw[i - 1] == 0x0A { return i + 1 - from }
                if i - 2 >= from, raw[i - 1] == 0x0D, raw[i - 2] == 0x0A { return i + 1 - from }
            }
            i += 1
        }
        return nil
    }

    static func chunkSize(_ line: [UInt8]) throws(FramingError) -> Int {
        var size = 0
        var digits = 0
        var i = 0
        while i < line.count, let v = HTTPBytes.hexValue(line[i]) {
            digits += 1
            guard digits <= 15 else { throw FramingError(400, "chunk size too large") }
            size = size << 4 | v
            i += 1
        }
        guard digits > 0 else { throw FramingError(400, "malformed chunk size") }
        // Optional chunk extensions: BWS ";" name [= value] ...; no control characters.
        while i < line.count, line[i] == 0x20 || line[i] == 0x09 { i += 1 }
        if i < line.count {
            guard line[i] == 0x3B else { throw FramingError(400, "malformed chunk size") }
            for b in line[i...] where (b < 0x20 && b != 0x09) || b == 0x7F {
                throw FramingError(400, "control character in a chunk extension")
            }
        }
        return size
    }

    /// Parses one header line `raw[start..<end]` (no line ending): a token, a colon, the value
    /// with surrounding whitespace trimmed.
    static func field(_ raw: UnsafeRawBufferPointer, _ start: Int, _ end: Int) throws(FramingError) -> HTTP1RequestHead.Field {
        guard start < end else { throw FramingError(400, "empty header line") }
        if raw[start] == 0x20 || raw[start] == 0x09 { throw FramingError(400, "obsolete line folding in a header") }
        var colon = start
        while colon < end, raw[colon] != 0x3A {
            guard HTTPBytes.isTokenByte(raw[colon]) else { throw FramingError(400, "invalid character in a header name") }
            colon += 1
        }
        guard colon < end, colon > start else { throw FramingError(400, "header line without a name and a colon") }
        var vs = colon + 1
        var ve = end
        while vs < ve, raw[vs] == 0x20 || raw[vs] == 0x09 { vs += 1 }
        while ve > vs, raw[ve - 1] == 0x20 || raw[ve - 1] == 0x09 { ve -= 1 }
        for i in vs..<ve {
            let b = raw[i]
            if (b < 0x20 && b != 0x09) || b == 0x7F { throw FramingError(400, "control character in a header value") }
        }
        return .init(nameStart: Int32(start), nameEnd: Int32(colon), valueStart: Int32(vs), valueEnd: Int32(ve))
    }

    static func parse(_ head: ByteBuffer) throws(FramingError) -> HTTP1RequestHead {
        // withUnsafeReadableBytes is rethrows (untyped): the outcome comes back as a Result.
        try head.withUnsafeReadableBytes { raw in Result { () throws(FramingError) in try parse(raw, head) } }.get()
    }

    private static func parse(_ raw: UnsafeRawBufferPointer, _ head: ByteBuffer) throws(FramingError) -> HTTP1RequestHead {
        // Lines: each ends at LF, an optional CR before it is dropped; a CR anywhere else is refused.
        func lineEnd(from start: Int) throws(FramingError) -> (content: Int, next: Int) {
            var i = start
            while i < raw.count, raw[i] != 0x0A {
                if raw[i] == 0x0D, i + 1 < raw.count, raw[i + 1] != 0x0A { throw FramingError(400, "bare CR in the request head") }
                i += 1
            }
            return (i > start && raw[i - 1] == 0x0D ? i - 1 : i, i + 1)
        }
        // Request line: method SP request-target SP HTTP-version.
        let (lineContent, afterLine) = try lineEnd(from: 0)
        var i = 0
        while i < lineContent, raw[i] != 0x20 {
            guard HTTPBytes.isTokenByte(raw[i]) else { throw FramingError(400, "invalid request method") }
            // As Istio's sidecar: a method not in upper case is refused, since policies match
            // methods case-sensitively and many apps upper-case the method they are given.
            guard raw[i] < UInt8(ascii: "a") || raw[i] > UInt8(ascii: "z") else {
                throw FramingError(400, "request method not in upper case")
            }
            i += 1
        }
        guard i > 0, i < lineContent else { throw FramingError(400, "malformed request line") }
        let method = String(decoding: UnsafeRawBufferPointer(rebasing: raw[0..<i]), as: UTF8.self)
        let targetStart = i + 1
        i = targetStart
        while i < lineContent, raw[i] != 0x20 {
            guard raw[i] > 0x20, raw[i] < 0x7F else { throw FramingError(400, "invalid character in the request target") }
            i += 1
        }
        guard i > targetStart, i < lineContent else { throw FramingError(400, "malformed request line") }
        let target = String(decoding: UnsafeRawBufferPointer(rebasing: raw[targetStart..<i]), as: UTF8.self)
        let version = UnsafeRawBufferPointer(rebasing: raw[(i + 1)..<lineContent])
        guard version.count == 8, version.starts(with: "HTTP/".utf8), version[6] == 0x2E,
              (0x30...0x39).contains(version[5]), (0x30...0x39).contains(version[7]) else {
            throw FramingError(400, "malformed HTTP version")
        }
        guard version[5] == 0x31, version[7] == 0x30 || version[7] == 0x31 else {
            throw FramingError(505, "HTTP version not supported")
        }
        let minor = Int(version[7] - 0x30)

        var fields: [HTTP1RequestHead.Field] = []
        fields.reserveCapacity(12)
        var contentLength: Int?
        var host: String?
        var hosts = 0
        var codings: [ArraySlice<UInt8>] = []
        var sawTransferEncoding = false
        var closeToken = false
        var keepAliveToken = false
        var connectionSpecific = false
        var upgradeToken = false
        var websocketFields = 0
        var start = afterLine
        while start < raw.count {
            let (content, next) = try lineEnd(from: start)
            if content == start { break }  // the blank line
            let field = try Self.field(raw, start, content)
            fields.append(field)
            start = next
            let ns = Int(field.nameStart), ne = Int(field.nameEnd)
            let value = UnsafeRawBufferPointer(rebasing: raw[Int(field.valueStart)..<Int(field.valueEnd)])
            switch ne - ns {
            case 4 where HTTPBytes.equalsIgnoringCase(raw, ns, ne, "host"):
                hosts += 1
                host = String(decoding: value, as: UTF8.self)
            case 14 where HTTPBytes.equalsIgnoringCase(raw, ns, ne, "content-length"):
                // A list of identical values is one length (RFC 9110 §8.6); anything else, an empty
                // field or element included, is refused: the head goes to the app as sent, and an
                // app that read an empty length differently would frame the body differently.
                for part in value.split(separator: 0x2C, omittingEmptySubsequences: false) {
                    let digits = HTTPBytes.trimmed(part[...])
                    guard !digits.isEmpty, digits.count <= 18, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else {
                        throw FramingError(400, "invalid Content-Length")
                    }
                    let n = digits.reduce(0) { $0 * 10 + Int($1 - 0x30) }
                    if let contentLength, contentLength != n { throw FramingError(400, "conflicting Content-Length values") }
                    contentLength = n
                }
            case 17 where HTTPBytes.equalsIgnoringCase(raw, ns, ne, "transfer-encoding"):
                sawTransferEncoding = true
                // An empty field or element is refused rather than skipped (RFC 9110 §5.6.1 lets a
                // recipient skip it): the fields go to the app as sent, and an app that took an
                // empty `Transfer-Encoding` as the last word would not read the body as chunked.
                for part in value.split(separator: 0x2C, omittingEmptySubsequences: false) {
                    let coding = HTTPBytes.trimmed(part[...])
                    guard !coding.isEmpty else { throw FramingError(400, "an empty Transfer-Encoding element") }
                    codings.append(ArraySlice(coding))
                }
            case 10 where HTTPBytes.equalsIgnoringCase(raw, ns, ne, "connection"):
                connectionSpecific = true
                if HTTPBytes.containsToken(value, "close") { closeToken = true }
                if HTTPBytes.containsToken(value, "keep-alive") { keepAliveToken = true }
                if HTTPBytes.containsToken(value, "upgrade") { upgradeToken = true }
            case 7 where HTTPBytes.equalsIgnoringCase(raw, ns, ne, "upgrade"):
                connectionSpecific = true
                let token = HTTPBytes.trimmed(value[...])
                websocketFields += HTTPBytes.equalsIgnoringCase(value, token.startIndex, token.endIndex, "websocket") ? 1 : 2
            case 10 where HTTPBytes.equalsIgnoringCase(raw, ns, ne, "keep-alive"),
                 16 where HTTPBytes.equalsIgnoringCase(raw, ns, ne, "proxy-connection"):
                connectionSpecific = true
            default:
                break
            }
        }
        var chunked = false
        if sawTransferEncoding {
            guard minor == 1 else { throw FramingError(400, "Transfer-Encoding in an HTTP/1.0 request") }
            guard contentLength == nil else { throw FramingError(400, "both Transfer-Encoding and Content-Length") }
            let isChunked = { (c: ArraySlice<UInt8>) in HTTPBytes.equalsIgnoringCase(c, "chunked") }
            guard let last = codings.last, isChunked(last) else { throw FramingError(400, "the final transfer coding is not chunked") }
            guard codings.count == 1 else {
                if codings.dropLast().contains(where: isChunked) { throw FramingError(400, "chunked applied more than once") }
                throw FramingError(501, "transfer coding not implemented")
            }
            chunked = true
        }
        if minor == 1 {
            guard hosts == 1 else { throw FramingError(400, hosts == 0 ? "missing Host header" : "more than one Host header") }
        } else if hosts > 1 {
            throw FramingError(400, "more than one Host header")
        }
        // HTTP/1.0 closes unless it asks to keep the connection; HTTP/1.1 keeps it unless it asks to close.
        let keepAlive = !closeToken && (minor == 1 || keepAliveToken)
        let websocket = upgradeToken && websocketFields == 1 && minor == 1 && method == "GET" && !chunked && (contentLength ?? 0) == 0
        return HTTP1RequestHead(bytes: head, method: method, target: target, minorVersion: minor, fields: fields, host: host,
                                contentLength: contentLength, chunked: chunked, keepAlive: keepAlive,
                                connectionSpecific: connectionSpecific, websocketUpgrade: websocket)
    }
}

/// Byte-level helpers shared by the request and response framers.
enum HTTPBytes {
    /// An HTTP/1.1 answer of the proxy's own that ends the connection: `status` and `reason`, a
    /// plain-text `body` with its length, `connection: close`.
    static func closingTextResponse(status: Int, reason: String, body: String, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 128 + reason.utf8.count + body.utf8.count)
        buffer.writeString("HTTP/1.1 \(status) \(reason)\r\ncontent-type: text/plain\r\ncontent-length: \(body.utf8.count)\r\n"
                           + "connection: close\r\n\r\n")
        buffer.writeString(body)
        return buffer
    }

    static func hexValue(_ b: UInt8) -> Int? {
        switch b {
        case 0x30...0x39: return Int(b - 0x30)
        case 0x41...0x46: return Int(b - 0x41 + 10)
        case 0x61...0x66: return Int(b - 0x61 + 10)
        default: return nil
        }
    }

    /// RFC 9110 tchar.
    static func isTokenByte(_ b: UInt8) -> Bool {
        switch b {
        case 0x30...0x39, 0x41...0x5A, 0x61...0x7A: return true
        case 0x21, 0x23, 0x24, 0x25, 0x26, 0x27, 0x2A, 0x2B, 0x2D, 0x2E, 0x5E, 0x5F, 0x60, 0x7C, 0x7E: return true
        default: return false
        }
    }

    /// An ASCII letter in lowercase; any other byte as it is.
    static func asciiLowercased(_ b: UInt8) -> UInt8 {
        (b >= 0x41 && b <= 0x5A) ? b | 0x20 : b
    }

    /// A field name in lowercase, built once from its bytes (ASCII letters folded, the rest read
    /// as UTF-8 like every field).
    static func lowercasedString(_ bytes: UnsafeRawBufferPointer) -> String {
        String(unsafeUninitializedCapacity: bytes.count) { out in
            for (i, b) in bytes.enumerated() { out[i] = asciiLowercased(b) }
            return bytes.count
        }
    }

    static func equalsIgnoringCase(_ raw: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ lower: StaticString) -> Bool {
        lower.withUTF8Buffer { equalsIgnoringCase(raw, start, end, $0) }
    }

    static func equalsIgnoringCase(_ raw: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ lower: UnsafeBufferPointer<UInt8>) -> Bool {
        guard end - start == lower.count else { return false }
        var i = 0
        while i < lower.count {
            let b = raw[start + i]
            if asciiLowercased(b) != lower[i] { return false }
            i += 1
        }
        return true
    }

    /// Whether a field name is `x-forwarded-client-cert` in any case, with `_` for any `-`: a
    /// server that maps names to variables (CGI, WSGI: `HTTP_X_FORWARDED_CLIENT_CERT`) reads
    /// `x_forwarded_client_cert` as the same field, so a client must not get that spelling past
    /// the proxy either.
    static func isForwardedClientCert(_ raw: UnsafeRawBufferPointer, _ start: Int, _ end: Int) -> Bool {
        guard end - start == 23 else { return false }
        let name: StaticString = "x-forwarded-client-cert"
        return name.withUTF8Buffer { lower in
            var i = 0
            while i < 23 {
                let b = asciiLowercased(raw[start + i])
                if b != lower[i], !(b == 0x5F && lower[i] == 0x2D) { return false }
                i += 1
            }
            return true
        }
    }

    /// ``isForwardedClientCert(_:_:_:)`` for a name held as a String (HTTP/2 fields).
    static func isForwardedClientCert(_ name: String) -> Bool {
        guard name.utf8.count == 23 else { return false }
        var name = name
        return name.withUTF8 { isForwardedClientCert(UnsafeRawBufferPointer($0), 0, 23) }
    }

    static func trimmed(_ bytes: Slice<UnsafeRawBufferPointer>) -> Slice<UnsafeRawBufferPointer> {
        var p = bytes
        while let f = p.first, f == 0x20 || f == 0x09 { p = p.dropFirst() }
        while let l = p.last, l == 0x20 || l == 0x09 { p = p.dropLast() }
        return p
    }

    static func equalsIgnoringCase(_ bytes: ArraySlice<UInt8>, _ lower: StaticString) -> Bool {
        bytes.withUnsafeBytes { equalsIgnoringCase($0, 0, $0.count, lower) }
    }

    /// Whether a comma-separated list (`Connection: keep-alive, Upgrade`) holds `token`, any case.
    /// Walks the bytes in place (no array of parts).
    static func containsToken(_ value: UnsafeRawBufferPointer, _ token: StaticString) -> Bool {
        token.withUTF8Buffer { containsToken(value, $0) }
    }

    /// ``containsToken(_:_:)`` for a token known only at run time (`lower`: lowercase bytes).
    static func containsToken(_ value: String, _ lower: String) -> Bool {
        var value = value, lower = lower
        return value.withUTF8 { v in lower.withUTF8 { containsToken(UnsafeRawBufferPointer(v), $0) } }
    }

    static func containsToken(_ value: UnsafeRawBufferPointer, _ token: UnsafeBufferPointer<UInt8>) -> Bool {
        var start = 0
        while start < value.count {
            var end = start
            while end < value.count, value[end] != 0x2C { end += 1 }
            let element = trimmed(value[start..<end])
            if equalsIgnoringCase(value, element.startIndex, element.endIndex, token) { return true }
            start = end + 1
        }
        return false
    }
}
