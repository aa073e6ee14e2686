public import Logging
import SigilCore

/// swift-log's stderr handler, with every message and metadata value made one safe line
/// (``terminalSafe(_:)``): what a caller sends (an entry ID, a path) and a log line quotes
/// cannot start a second, genuine-looking line ("one line per event"). Used by `sigil` and
/// `sigil-proxy` alike.
public struct OneLineLogHandler: LogHandler {
    private var inner: StreamLogHandler

    public init(label: String, level: Logger.Level) {
        inner = StreamLogHandler.standardError(label: label)
        inner.logLevel = level
    }

    public var logLevel: Logger.Level {
        get { inner.logLevel }
        set { inner.logLevel = newValue }
    }

    public var metadataProvider: Logger.MetadataProvider? {
        get { inner.metadataProvider }
        set { inner.metadataProvider = newValue }
    }

    public var metadata: Logger.Metadata {
        get { inner.metadata }
        set { inner.metadata = newValue.mapValues(Self.safe) }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { inner[metadataKey: key] }
        set { inner[metadataKey: key] = newValue.map(Self.safe) }
    }

    public func log(event: LogEvent) {
        var event = event
        event.message = "\(terminalSafe(event.message.description))"
        event.metadata = event.metadata?.mapValues(Self.safe)
        inner.log(event: event)
    }

    static func safe(_ value: Logger.Metadata.Value) -> Logger.Metadata.Value {
        switch value {
        case .string(let s): return .string(terminalSafe(s))
        case .stringConvertible(let c): return .string(terminalSafe(c.description))
        case .array(let items): return .array(items.map(safe))
        case .dictionary(let d): return .dictionary(d.mapValues(safe))
        }
    }
}
