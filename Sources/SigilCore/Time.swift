#if canImport(FoundationEssentials)
public import FoundationEssentials
#else
public import Foundation
#endif

/// Where Sigil reads the time from. Rotation and expiry logic take a clock value so that tests can
/// move time forward without sleeping.
public protocol SigilClock: Sendable {
    var now: Date { get }
}

/// The system's wall clock.
public struct SystemClock: SigilClock {
    public init() {}
    public var now: Date { Date() }
}

/// A clock that reads a fixed instant; tests advance it by making a new one.
public struct FixedClock: SigilClock {
    public var now: Date
    public init(_ now: Date) { self.now = now }
}

/// Parsing and printing of durations in the form operators know from SPIRE and Go: `90s`, `10m`,
/// `1h`, `1h30m`, `7d`. A bare number is refused (its unit would be a guess).
public enum DurationText {
    /// Parses `text` into seconds.
    public static func parse(_ text: String) throws(SigilError) -> Duration {
        let trimmed = text.trimmingSpaces
        guard !trimmed.isEmpty else {
            throw SigilError(.invalidArgument, "empty duration; write it like 90s, 10m, 1h or 7d")
        }
        var total: Int64 = 0
        var digits = ""
        var sawUnit = false
        for ch in trimmed {
            if let d = ch.wholeNumberValue, ch.isASCII {
                _ = d
                digits.append(ch)
                continue
            }
            let unit: Int64
            switch ch {
            case "s": unit = 1
            case "m": unit = 60
            case "h": unit = 3600
            case "d": unit = 86_400
            default:
                throw SigilError(.invalidArgument, "duration '\(text)' has the unexpected character '\(ch)'; write it like 90s, 10m, 1h or 7d")
            }
            guard let value = Int64(digits) else {
                throw SigilError(.invalidArgument, "duration '\(text)' has a unit without a number before it; write it like 90s, 10m, 1h or 7d")
            }
            let (product, o1) = value.multipliedReportingOverflow(by: unit)
            let (sum, o2) = total.addingReportingOverflow(product)
            if o1 || o2 || sum > 100 * 365 * 86_400 {
                throw SigilError(.invalidArgument, "duration '\(text)' is longer than 100 years")
            }
            total = sum
            digits = ""
            sawUnit = true
        }
        if !digits.isEmpty {
            throw SigilError(.invalidArgument, "duration '\(text)' ends in a number without a unit; add s, m, h or d (for example \(digits)s)")
        }
        guard sawUnit else {
            throw SigilError(.invalidArgument, "duration '\(text)' has no unit; write it like 90s, 10m, 1h or 7d")
        }
        return .seconds(total)
    }

    /// Formats a duration the way ``parse(_:)`` reads it, largest units first (`1h30m`, `10s`).
    public static func format(_ duration: Duration) -> String {
        var seconds = duration.components.seconds
        if seconds == 0 { return "0s" }
        var out = seconds < 0 ? "-" : ""
        seconds = abs(seconds)
        for (unit, name) in [(Int64(86_400), "d"), (3600, "h"), (60, "m"), (1, "s")] where seconds >= unit {
            out += "\(seconds / unit)\(name)"
            seconds %= unit
        }
        return out
    }
}

extension Duration {
    /// The duration in (fractional) seconds, as Foundation's `TimeInterval`.
    public var timeInterval: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}

extension String {
    var trimmingSpaces: String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }
}
