import NIOCore
import NIOHTTP2
import NIOHPACK

/// How the transport hands the kernel-attested caller to the Workload API handlers: request headers
/// under a reserved prefix, added by the server itself after every client-sent header with that prefix
/// has been removed (see ``CallerMetadataInjector``).
enum CallerMetadata {
    /// Every header starting with this (case-insensitively, `-bin` variants included) belongs to the server.
    static let reservedPrefix = "x-sigil-caller-"
    /// The caller's selectors, each percent-encoded (see ``encode(_:)``), joined by `,`.
    static let selectorsKey = "x-sigil-caller-selectors"
    /// The caller's PID (for logs only; selectors decide).
    static let pidKey = "x-sigil-caller-pid"
    /// Why the caller could not be attested, percent-encoded; present instead of the two keys above.
    static let errorKey = "x-sigil-caller-error"

    static func isReserved(_ name: String) -> Bool {
        let prefix = reservedPrefix.utf8
        var bytes = name.utf8.makeIterator()
        for expected in prefix {
            guard var byte = bytes.next() else { return false }
            if byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") { byte += 32 }
            if byte != expected { return false }
        }
        return true
    }

    /// The headers that describe an attested caller.
    static func headers(for attestation: WorkloadAttestation) -> [(String, String)] {
        [
            (selectorsKey, attestation.selectors.map(encode).joined(separator: ",")),
            (pidKey, String(attestation.credentials.pid)),
        ]
    }

    /// The header that says why a caller could not be attested.
    static func headers(forFailure reason: String) -> [(String, String)] {
        [(errorKey, encode(reason))]
    }

    /// Percent-encodes every byte outside printable ASCII, and `%` and `,`, so that a selector (a file
    /// path may hold any byte but NUL) can neither split into two selectors nor break the header.
    static func encode(_ value: String) -> String {
        let hex: [Character] = Array("0123456789ABCDEF")
        var out = ""
        out.reserveCapacity(value.utf8.count)
        for byte in value.utf8 {
            if byte > 0x20 && byte < 0x7F && byte != UInt8(ascii: "%") && byte != UInt8(ascii: ",") {
                out.append(Character(Unicode.Scalar(byte)))
            } else {
                out.append("%")
                out.append(hex[Int(byte >> 4)])
                out.append(hex[Int(byte & 0x0F)])
            }
        }
        return out
    }

    /// The inverse of ``encode(_:)``; nil if malformed.
    static func decode(_ value: Substring) -> String? {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(value.utf8.count)
        var iterator = value.utf8.makeIterator()
        while let byte = iterator.next() {
            if byte == UInt8(ascii: "%") {
                guard let high = iterator.next().flatMap(hexValue), let low = iterator.next().flatMap(hexValue) else {
                    return nil
                }
                bytes.append(high << 4 | low)
            } else {
                bytes.append(byte)
            }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        default: return nil
        }
    }
}

/// Sits first in every HTTP/2 stream pipeline of the Workload API: removes, from every HEADERS frame
/// (request headers and trailers), each header under ``CallerMetadata/reservedPrefix``, and adds the
/// server's own caller headers to the first one. NIOHTTP2 hands a whole header block over at once and
/// holds a stream's frames until its initializer has finished, so no HEADERS frame passes unseen.
final class CallerMetadataInjector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = HTTP2Frame.FramePayload

    private var pending: [(String, String)]

    /// - Parameter injecting: headers to add to the first HEADERS frame (empty: strip only).
    init(injecting: [(String, String)]) {
        self.pending = injecting
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .headers(var headers) = unwrapInboundIn(data) else {
            context.fireChannelRead(data)
            return
        }
        var rebuilt = HPACKHeaders()
        rebuilt.reserveCapacity(headers.headers.count + pending.count)
        for header in headers.headers where !CallerMetadata.isReserved(header.name) {
            rebuilt.add(name: header.name, value: header.value, indexing: header.indexable)
        }
        for (name, value) in pending {
            rebuilt.add(name: name, value: value, indexing: .neverIndexed)
        }
        pending = []
        headers.headers = rebuilt
        context.fireChannelRead(wrapInboundOut(.headers(headers)))
    }
}

/// The outcome of attesting one connection's caller.
enum CallerAttestationOutcome: Sendable {
    case attested(WorkloadAttestation)
    case failed(reason: String, credentials: PeerCredentials?)

    var injectedHeaders: [(String, String)] {
        switch self {
        case .attested(let attestation): CallerMetadata.headers(for: attestation)
        case .failed(let reason, _): CallerMetadata.headers(forFailure: reason)
        }
    }
}

/// Holds, in a connection's pipeline, the attestation of the process at the other end, so that it is
/// computed once per connection and dropped with it. It only passes events on (NIO requires every
/// handler to be inbound or outbound); it sits last, behind the handler that consumes the frames.
final class CallerAttestationHolder: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny

    /// Never fails: a failure is an outcome.
    let outcome: EventLoopFuture<CallerAttestationOutcome>

    init(outcome: EventLoopFuture<CallerAttestationOutcome>) {
        self.outcome = outcome
    }
}
