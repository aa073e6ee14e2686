import NIOCore

/// Closes an HTTP/2 connection once NIOHTTP2 has written a GOAWAY for a connection error (any code
/// but NO_ERROR). NIOHTTP2 writes the GOAWAY and reports the error but leaves the connection open,
/// and RFC 9113, 5.4.1 says the endpoint MUST close it then: a peer that keeps sending (PING or
/// SETTINGS floods, junk after a bad frame) would otherwise be read on, and its frames held, without
/// end. Sits between the TLS (or socket) layer and `NIOHTTP2Handler` and reads only the 9-byte frame
/// headers of what goes out (and a GOAWAY's first 8 payload bytes); every byte passes unchanged.
final class GoAwayCloser: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData

    /// Bytes of the current frame's header or GOAWAY prefix gathered so far (at most 9 or 8).
    private var gathered: [UInt8] = []
    /// Payload bytes of the current frame still to pass.
    private var remaining = 0
    /// Reading a GOAWAY's payload: its first 8 bytes hold the error code (bytes 4-7).
    private var inGoAway = false
    private var goAwayRemaining = 0

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard case .byteBuffer(let buffer) = unwrapOutboundIn(data), scan(buffer) else {
            context.write(data, promise: promise)
            return
        }
        // A GOAWAY with an error: close once it is written (flushed by NIOHTTP2 at once).
        let written = promise ?? context.eventLoop.makePromise()
        let channel = context.channel
        written.futureResult.whenComplete { _ in channel.close(promise: nil) }
        context.write(data, promise: written)
    }

    /// Walks the frame headers in `buffer`; true when a GOAWAY with a non-zero error code ends in it.
    private func scan(_ buffer: ByteBuffer) -> Bool {
        var found = false
        buffer.withUnsafeReadableBytes { bytes in
            var i = 0
            while i < bytes.count {
                if inGoAway {
                    let take = min(8 - gathered.count, bytes.count - i)
                    gathered.append(contentsOf: bytes[i..<(i + take)])
                    i += take
                    goAwayRemaining -= take
                    if gathered.count == 8 {
                        let code = UInt32(gathered[4]) << 24 | UInt32(gathered[5]) << 16 | UInt32(gathered[6]) << 8 | UInt32(gathered[7])
                        if code != 0 { found = true }
                        inGoAway = false
                        gathered.removeAll(keepingCapacity: true)
                        remaining = goAwayRemaining
                    }
                } else if remaining > 0 {
                    let skip = min(remaining, bytes.count - i)
                    remaining -= skip
                    i += skip
                } else {
                    let take = min(9 - gathered.count, bytes.count - i)
                    gathered.append(contentsOf: bytes[i..<(i + take)])
                    i += take
                    guard gathered.count == 9 else { continue }
                    let length = Int(gathered[0]) << 16 | Int(gathered[1]) << 8 | Int(gathered[2])
                    let type = gathered[3]
                    gathered.removeAll(keepingCapacity: true)
                    if type == 0x7, length >= 8 {
                        inGoAway = true
                        goAwayRemaining = length
                    } else {
                        remaining = length
                    }
                }
            }
        }
        return found
    }
}
