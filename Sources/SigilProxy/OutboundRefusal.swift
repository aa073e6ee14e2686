import NIOCore
import SigilCore

/// What the outbound tells the app when its upstream never came up (refused the connection, failed
/// the TLS handshake, or was not the expected SPIFFE ID): a `503 Service Unavailable` with the reason
/// in the body, as Envoy answers "upstream connect error or disconnect/reset before headers", in
/// the protocol the app spoke. Without it the app saw only a closed connection.
enum OutboundRefusal {
    static let status = 503

    /// Why, in words an operator can act on: no SVID yet, a failed TLS handshake (the upstream did
    /// not prove the expected ID under the bundle, or refused ours), or no connection at all.
    static func reason(_ error: any Error, tlsFailure: String?, upstream: SocketAddress, expected: SpiffeID) -> String {
        if let error = error as? ProxyError, error.code == .identity {
            return "this proxy has no X509-SVID yet (\(error.message))"
        }
        if let tlsFailure {
            return "TLS with \(upstream) failed: it did not prove \(expected) under the trust bundle, or it refused this proxy's SVID (\(tlsFailure))"
        }
        return "cannot connect to \(upstream): \(error)"
    }

    /// The whole HTTP/2 client connection preface (RFC 9113 3.4).
    static let http2Preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    /// The answer to an app that sent `firstBytes`, in HTTP/2 when it opened with the preface.
    static func response(reason: String, http2: Bool, firstBytes: ByteBuffer?, allocator: ByteBufferAllocator) -> ByteBuffer {
        let body = "upstream connect error: \(reason)\n"
        if http2 {
            return self.http2(body: body, streamID: firstBytes.flatMap(firstRequestStream), allocator: allocator)
        }
        return http1(body: body, allocator: allocator)
    }

    static func http1(body: String, allocator: ByteBufferAllocator) -> ByteBuffer {
        HTTPBytes.closingTextResponse(status: 503, reason: "Service Unavailable", body: body, allocator: allocator)
    }

    /// The server preface (an empty SETTINGS), then on `streamID` a HEADERS block (`:status: 503`,
    /// `content-type: text/plain`) and the body in one DATA frame that ends the stream, then a
    /// GOAWAY naming that stream as the last processed (later ones may be retried elsewhere). With no
    /// request stream seen yet, SETTINGS and a GOAWAY with the reason as its debug data.
    static func http2(body: String, streamID: UInt32?, allocator: ByteBufferAllocator) -> ByteBuffer {
        let reason = Array(body.utf8.prefix(16_000))
        var buffer = allocator.buffer(capacity: 64 + 2 * reason.count)
        writeFrameHeader(&buffer, length: 0, type: 0x4, flags: 0, stream: 0)
        if let streamID {
            // HPACK literals without indexing, names from the static table: :status (8), content-type (31).
            let block: [UInt8] = [0x08, 0x03] + Array("503".utf8) + [0x0F, 0x10, 0x0A] + Array("text/plain".utf8)
            writeFrameHeader(&buffer, length: block.count, type: 0x1, flags: 0x4, stream: streamID)
            buffer.writeBytes(block)
            writeFrameHeader(&buffer, length: reason.count, type: 0x0, flags: 0x1, stream: streamID)
            buffer.writeBytes(reason)
        }
        writeFrameHeader(&buffer, length: 8 + reason.count, type: 0x7, flags: 0, stream: 0)
        buffer.writeInteger(streamID ?? 0)
        buffer.writeInteger(UInt32(0))  // NO_ERROR: the connection is done, not broken
        buffer.writeBytes(reason)
        return buffer
    }

    /// The stream of the first HEADERS frame after the preface in `bytes`, if it is there whole
    /// enough to read its frame header.
    static func firstRequestStream(_ bytes: ByteBuffer) -> UInt32? {
        guard bytes.readableBytesView.starts(with: http2Preface) else { return nil }
        var index = bytes.readerIndex + http2Preface.count
        let end = bytes.writerIndex
        while index + 9 <= end {
            guard let length = bytes.getInteger(at: index, as: UInt32.self).map({ Int($0 >> 8) }),
                  let type = bytes.getInteger(at: index + 3, as: UInt8.self),
                  let stream = bytes.getInteger(at: index + 5, as: UInt32.self).map({ $0 & 0x7FFF_FFFF })
            else { return nil }
            if type == 0x1 { return stream == 0 ? nil : stream }
            index += 9 + length
        }
        return nil
    }

    private static func writeFrameHeader(_ buffer: inout ByteBuffer, length: Int, type: UInt8, flags: UInt8, stream: UInt32) {
        buffer.writeInteger(UInt8(truncatingIfNeeded: length >> 16))
        buffer.writeInteger(UInt16(truncatingIfNeeded: length))
        buffer.writeInteger(type)
        buffer.writeInteger(flags)
        buffer.writeInteger(stream & 0x7FFF_FFFF)
    }
}
