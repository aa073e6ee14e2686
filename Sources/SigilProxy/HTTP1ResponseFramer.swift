public import NIOCore

/// Finds the boundaries of HTTP/1.1 responses in a byte stream without re-encoding them, so the
/// proxy can forward an app's response as the bytes it received (the cheap path; a reader may
/// edit a head at the offsets ``finalHeadStart`` and ``incompleteHeadStart`` give) and still know
/// its status, its size, and where it ends (for pooling the app connection and for the ledger).
///
/// Framing follows RFC 9112 §6.3: no body for 1xx/204/304 and for responses to HEAD; chunked
/// when `Transfer-Encoding` ends in `chunked`; else `Content-Length`; else until the app closes.
/// 1xx interim responses (100 Continue) are passed through and the real response follows.
public struct HTTP1ResponseFramer: Sendable {
    public enum Event: Sendable {
        /// A final response head. `headers` is filled only when the framer was asked to keep them,
        /// with names in lowercase (as HTTP/2 sends them) and values as received.
        case head(status: Int, keepAlive: Bool, headers: [(String, String)])
        /// Body bytes (de-chunked) of the current response; emitted only when keeping headers.
        case body(ByteBuffer)
        /// The current response is complete.
        case end
    }

    public struct FramingError: Error, CustomStringConvertible, Sendable {
        public let description: String
    }

    enum State: Sendable {
        case head
        case fixed(remaining: Int)
        case chunkSize
        case chunkData(remaining: Int)
        case chunkDataEnd
        case trailers
        case untilClose
        case idle
    }

    /// Where a head begins, for a reader that edits the head bytes it relays
    /// (``AppResponseHandler`` marking a last response `connection: close`).
    public enum HeadStart: Sendable, Equatable {
        /// At this offset from the reader index of the buffer last fed.
        case inRead(Int)
        /// In an earlier read: the head was split across reads.
        case earlier
    }

    /// After ``feed(_:emit:)``: where the final head (any status but an interim 1xx; 101 is final) that completed in that read
    /// begins; nil if none did.
    public private(set) var finalHeadStart: HeadStart?
    /// After ``feed(_:emit:)``: where the head still incomplete at the end of that read begins;
    /// nil if the read did not end inside a head.
    public private(set) var incompleteHeadStart: HeadStart?

    /// Head bytes are collected here until the blank line (heads split across reads).
    private var headBuffer: [UInt8] = []
    private var state: State = .idle
    private var lineBuffer: [UInt8] = []
    private var requestWasHEAD = false
    /// Keep parsed headers and de-chunked body slices (the HTTP/2 path needs them).
    public var decodes: Bool
    public static let maxHeadBytes = 64 * 1024

    public init(decodes: Bool = false) {
        self.decodes = decodes
    }

    /// True while a response is expected or in progress.
    public var isBusy: Bool {
        if case .idle = state { return false }
        return true
    }

    /// True when the current response is delimited by the app closing the connection.
    public var endsAtClose: Bool {
        if case .untilClose = state { return true }
        return false
    }

    /// Call before forwarding a request: the next bytes are its response.
    public mutating func expectResponse(toHEAD: Bool) {
        requestWasHEAD = toHEAD
        state = .head
        headBuffer.removeAll(keepingCapacity: true)
    }

    /// Consumes `buffer`; calls `emit` for each event. Returns the number of bytes that belong to
    /// responses (bytes after the end of the current response are not consumed).
    @discardableResult
    public mutating func feed(_ buffer: ByteBuffer, emit: (Event) -> Void) throws(FramingError) -> Int {
        var index = buffer.readerIndex
        let end = buffer.writerIndex
        finalHeadStart = nil
        incompleteHeadStart = nil
        while index < end {
            switch state {
            case .idle:
                return index - buffer.readerIndex
            case .head:
                let start: HeadStart = headBuffer.isEmpty ? .inRead(index - buffer.readerIndex) : .earlier
                // A head that arrives in one read is parsed where it lies; only one split across
                // reads is collected in `headBuffer` first.
                let scan: HeadScan = buffer.withUnsafeReadableBytes { raw in
                    let base = index - buffer.readerIndex
                    guard let endAt = Self.headEnd(raw, from: base, collected: headBuffer) else {
                        headBuffer.append(contentsOf: UnsafeRawBufferPointer(rebasing: raw[base...]))
                        return .partial
                    }
                    guard headBuffer.count + (endAt - base) <= Self.maxHeadBytes else {
                        return .failed(FramingError(description: "response head larger than 64 KiB"))
                    }
                    do throws(FramingError) {
                        if headBuffer.isEmpty {
                            try finishHead(UnsafeRawBufferPointer(rebasing: raw[base..<endAt]), emit: emit)
                        } else {
                            headBuffer.append(contentsOf: UnsafeRawBufferPointer(rebasing: raw[base..<endAt]))
                            // Parsed out of `self` (finishHead mutates it), then put back emptied
                            // with its capacity: no allocation either way.
                            var collected: [UInt8] = []
                            swap(&collected, &headBuffer)
                            defer {
                                collected.removeAll(keepingCapacity: true)
                                swap(&collected, &headBuffer)
                            }
                            let parsed = collected.withUnsafeBytes { head in
                                Result { () throws(FramingError) in try finishHead(head, emit: emit) }
                            }
                            try parsed.get()
                        }
                    } catch {
                        return .failed(error)
                    }
                    return .complete(used: endAt - base)
                }
                switch scan {
                case .partial:
                    if headBuffer.count > Self.maxHeadBytes { throw FramingError(description: "response head larger than 64 KiB") }
                    incompleteHeadStart = start
                    return end - buffer.readerIndex
                case .failed(let error):
                    throw error
                case .complete(let used):
                    index += used
                    if case .head = state {} else { finalHeadStart = start }  // not a 1xx interim head
                }
            case .fixed(let remaining):
                let n = min(remaining, end - index)
                if decodes, n > 0, let slice = buffer.getSlice(at: index, length: n) { emit(.body(slice)) }
                index += n
                if remaining - n == 0 {
                    state = .idle
                    emit(.end)
                } else {
                    state = .fixed(remaining: remaining - n)
                }
            case .untilClose:
                let n = end - index
                if decodes, let slice = buffer.getSlice(at: index, length: n) { emit(.body(slice)) }
                index = end
            case .chunkSize, .chunkDataEnd, .trailers:
                guard let byte = buffer.getInteger(at: index, as: UInt8.self) else { return index - buffer.readerIndex }
                index += 1
                if byte != 0x0A {
                    lineBuffer.append(byte)
                    if lineBuffer.count > 4096 { throw FramingError(description: "chunk line longer than 4 KiB") }
                    continue
                }
                if lineBuffer.last == 0x0D { lineBuffer.removeLast() }
                let line = lineBuffer
                lineBuffer.removeAll(keepingCapacity: true)
                try finishLine(line, emit: emit)
            case .chunkData(let remaining):
                let n = min(remaining, end - index)
                if decodes, n > 0, let slice = buffer.getSlice(at: index, length: n) { emit(.body(slice)) }
                index += n
                state = remaining - n == 0 ? .chunkDataEnd : .chunkData(remaining: remaining - n)
            }
        }
        if case .fixed(0) = state {
            state = .idle
            emit(.end)
        }
        return index - buffer.readerIndex
    }

    /// The app closed the connection: completes an until-close body; anything else is truncation.
    public mutating func connectionClosed(emit: (Event) -> Void) -> Bool {
        switch state {
        case .untilClose:
            state = .idle
            emit(.end)
            return true
        case .idle:
            return true
        default:
            return false
        }
    }

    private mutating func finishLine(_ line: [UInt8], emit: (Event) -> Void) throws(FramingError) {
        switch state {
        case .chunkSize:
            var size = 0
            var digits = 0
            for byte in line {
                guard let v = HTTPBytes.hexValue(byte) else {
                    if byte == 0x3B || byte == 0x20 || byte == 0x09 { break }  // chunk extension
                    throw FramingError(description: "malformed chunk size")
                }
                digits += 1
                guard digits <= 15 else { throw FramingError(description: "chunk size too large") }
                size = size << 4 | v
            }
            guard digits > 0 else { throw FramingError(description: "malformed chunk size") }
            state = size == 0 ? .trailers : .chunkData(remaining: size)
        case .chunkDataEnd:
            guard line.isEmpty else { throw FramingError(description: "chunk data not followed by CRLF") }
            state = .chunkSize
        case .trailers:
            if line.isEmpty {
                state = .idle
                emit(.end)
            }
        default:
            break
        }
    }

    private enum HeadScan {
        case partial
        case complete(used: Int)
        case failed(FramingError)
    }

    /// The index just past the blank line that ends a head (CRLF CRLF, or a bare LF LF) in
    /// `raw[from...]`, where `collected` holds the head's bytes that came before `raw[from]`; nil
    /// if the head goes on past the end of `raw`.
    static func headEnd(_ raw: UnsafeRawBufferPointer, from: Int, collected: [UInt8]) -> Int? {
        func byte(_ i: Int) -> UInt8? {
            if i >= from { return raw[i] }
            let j = collected.count - (from - i)
            return j >= 0 ? collected[j] : nil
        }
        var i = from
        while i < raw.count {
            if raw[i] == 0x0A {
                let previous = byte(i - 1)
                if previous == 0x0A { return i + 1 }
                if previous == 0x0D, byte(i - 2) == 0x0A, byte(i - 3) == 0x0D { return i + 1 }
            }
            i += 1
        }
        return nil
    }

    /// Parses a whole head (status line, fields, the blank line) and emits it.
    private mutating func finishHead(_ head: UnsafeRawBufferPointer, emit: (Event) -> Void) throws(FramingError) {
        // Status line: HTTP/1.x SP 3DIGIT SP reason
        guard head.count >= 12, head.starts(with: Self.httpSlash),
              let minor = head[7] == 0x31 ? 1 : (head[7] == 0x30 ? 0 : nil), head[8] == 0x20 else {
            throw FramingError(description: "not an HTTP/1.x response")
        }
        var status = 0
        for i in 9..<12 {
            guard head[i] >= 0x30, head[i] <= 0x39 else { throw FramingError(description: "malformed status code") }
            status = status * 10 + Int(head[i] - 0x30)
        }
        var contentLength: Int?
        var chunked = false
        var close = minor == 0
        var headers: [(String, String)] = []
        var lineStart = 0
        while lineStart < head.count, head[lineStart] != 0x0A { lineStart += 1 }
        lineStart += 1
        while lineStart < head.count {
            var lineEnd = lineStart
            while lineEnd < head.count, head[lineEnd] != 0x0A { lineEnd += 1 }
            var contentEnd = lineEnd
            if contentEnd > lineStart, head[contentEnd - 1] == 0x0D { contentEnd -= 1 }
            defer { lineStart = lineEnd + 1 }
            if contentEnd == lineStart { break }
            var colon = lineStart
            while colon < contentEnd, head[colon] != 0x3A { colon += 1 }
            guard colon < contentEnd else { throw FramingError(description: "malformed response header line") }
            var vs = colon + 1
            var ve = contentEnd
            while vs < ve, head[vs] == 0x20 || head[vs] == 0x09 { vs += 1 }
            while ve > vs, head[ve - 1] == 0x20 || head[ve - 1] == 0x09 { ve -= 1 }
            if HTTPBytes.equalsIgnoringCase(head, lineStart, colon, "content-length") {
                var n = 0
                guard ve > vs, ve - vs <= 18 else { throw FramingError(description: "invalid Content-Length") }
                for i in vs..<ve {
                    let b = head[i]
                    guard b >= 0x30, b <= 0x39 else { throw FramingError(description: "invalid Content-Length") }
                    n = n * 10 + Int(b - 0x30)
                }
                if let existing = contentLength, existing != n { throw FramingError(description: "conflicting Content-Length headers") }
                contentLength = n
            } else if HTTPBytes.equalsIgnoringCase(head, lineStart, colon, "transfer-encoding") {
                chunked = Self.endsWithChunked(UnsafeRawBufferPointer(rebasing: head[vs..<ve]))
                if !chunked { close = true }  // a non-chunked transfer coding: the body ends at close
            } else if HTTPBytes.equalsIgnoringCase(head, lineStart, colon, "connection") {
                let value = UnsafeRawBufferPointer(rebasing: head[vs..<ve])
                if HTTPBytes.containsToken(value, "close") { close = true }
                if HTTPBytes.containsToken(value, "keep-alive") { close = false }
            }
            if decodes {
                headers.append((HTTPBytes.lowercasedString(UnsafeRawBufferPointer(rebasing: head[lineStart..<colon])),
                                String(decoding: UnsafeRawBufferPointer(rebasing: head[vs..<ve]), as: UTF8.self)))
            }
        }
        if (100..<200).contains(status) && status != 101 {
            state = .head  // interim response; the final one follows
            return
        }
        let next: State
        if requestWasHEAD || status == 204 || status == 304 || status == 101 {
            next = .idle
        } else if chunked {
            next = .chunkSize
        } else if let contentLength {
            next = contentLength == 0 ? .idle : .fixed(remaining: contentLength)
        } else {
            next = .untilClose
            close = true
        }
        if status == 101 { close = true }  // an upgraded connection is never pooled
        emit(.head(status: status, keepAlive: !close, headers: headers))
        state = next
        if case .idle = next { emit(.end) }
    }

    static let httpSlash: [UInt8] = Array("HTTP/1.".utf8)

    /// Whether the last coding of a Transfer-Encoding value is `chunked` (empty list elements are
    /// ignored, RFC 9110 5.6.1).
    static func endsWithChunked(_ value: UnsafeRawBufferPointer) -> Bool {
        var end = value.count
        while end > 0 {
            var start = end
            while start > 0, value[start - 1] != 0x2C { start -= 1 }
            let element = HTTPBytes.trimmed(value[start..<end])
            if !element.isEmpty { return HTTPBytes.equalsIgnoringCase(value, element.startIndex, element.endIndex, "chunked") }
            end = start - 1  // an empty element: the one before the comma
        }
        return false
    }
}
