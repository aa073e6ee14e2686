import Testing
import NIOCore
import NIOHPACK
@testable import SigilProxy

/// The 503 the outbound writes when its upstream never came up, read back as a client would.
struct OutboundRefusalTests {
    private func frame(_ type: UInt8, flags: UInt8 = 0, stream: UInt32, _ payload: [UInt8] = []) -> [UInt8] {
        var header: [UInt8] = [UInt8(payload.count >> 16), UInt8((payload.count >> 8) & 0xFF), UInt8(payload.count & 0xFF), type, flags]
        header += [UInt8(stream >> 24), UInt8((stream >> 16) & 0xFF), UInt8((stream >> 8) & 0xFF), UInt8(stream & 0xFF)]
        return header + payload
    }

    @Test("the first request's stream is found after the preface, SETTINGS and WINDOW_UPDATE")
    func firstRequestStream() {
        let settings = frame(0x4, stream: 0, [0, 3, 0, 0, 0, 100])
        let window = frame(0x8, stream: 0, [0, 0x0F, 0, 1])
        let headers = frame(0x1, flags: 0x5, stream: 3, [0x82])
        let whole = ByteBuffer(bytes: OutboundRefusal.http2Preface + settings + window + headers)
        #expect(OutboundRefusal.firstRequestStream(whole) == 3)
        // Cut inside the HEADERS frame header, or no preface at all: unknown.
        let cut = ByteBuffer(bytes: OutboundRefusal.http2Preface + settings + window + headers.prefix(5))
        #expect(OutboundRefusal.firstRequestStream(cut) == nil)
        #expect(OutboundRefusal.firstRequestStream(ByteBuffer(bytes: settings + headers)) == nil)
        // A frame claiming a length past the bytes read ends the walk, it does not trap.
        let huge = ByteBuffer(bytes: OutboundRefusal.http2Preface + frame(0x4, stream: 0, [0, 3, 0, 0, 0, 100]).prefix(3) + [0xFF, 0xFF])
        #expect(OutboundRefusal.firstRequestStream(huge) == nil)
    }

    @Test("HTTP/2: SETTINGS, a :status 503 block that HPACK decodes, the reason, and a GOAWAY naming the stream")
    func http2Answer() throws {
        var buffer = OutboundRefusal.http2(body: "upstream connect error: why\n", streamID: 5, allocator: ByteBufferAllocator())
        var frames: [(type: UInt8, flags: UInt8, stream: UInt32, payload: ByteBuffer)] = []
        while buffer.readableBytes >= 9 {
            let high = buffer.readInteger(as: UInt8.self)!, low = buffer.readInteger(as: UInt16.self)!
            let type = buffer.readInteger(as: UInt8.self)!, flags = buffer.readInteger(as: UInt8.self)!
            let stream = buffer.readInteger(as: UInt32.self)!
            let payload = buffer.readSlice(length: Int(high) << 16 | Int(low))
            frames.append((type, flags, stream, try #require(payload)))
        }
        #expect(buffer.readableBytes == 0)
        #expect(frames.map(\.type) == [0x4, 0x1, 0x0, 0x7])
        #expect(frames[1].stream == 5 && frames[1].flags == 0x4)
        var decoder = HPACKDecoder(allocator: ByteBufferAllocator())
        var block = frames[1].payload
        let fields = try decoder.decodeHeaders(from: &block)
        #expect(fields[":status"] == ["503"])
        #expect(fields["content-type"] == ["text/plain"])
        #expect(frames[2].stream == 5 && frames[2].flags == 0x1)
        #expect(String(buffer: frames[2].payload) == "upstream connect error: why\n")
        var goaway = frames[3].payload
        #expect(goaway.readInteger(as: UInt32.self) == 5)
        #expect(goaway.readInteger(as: UInt32.self) == 0)
    }

    @Test("HTTP/1.1: a 503 that closes, with the body's length")
    func http1Answer() {
        let answer = String(buffer: OutboundRefusal.http1(body: "upstream connect error: why\n", allocator: ByteBufferAllocator()))
        #expect(answer.hasPrefix("HTTP/1.1 503 Service Unavailable\r\n"))
        #expect(answer.contains("\r\ncontent-length: 28\r\n"))
        #expect(answer.contains("\r\nconnection: close\r\n"))
        #expect(answer.hasSuffix("\r\n\r\nupstream connect error: why\n"))
    }
}
