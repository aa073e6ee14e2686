/// Text from outside (a recorded request path, an ID a caller sent) as one safe line for a
/// terminal or a log: control characters (C0, DEL, C1: escape sequences that clear the screen or
/// retitle the window, line breaks that would print a fake row or log line; Unicode line
/// separators and bidirectional overrides) are shown as
/// `\u{1b}`-style escapes. Text without any is returned as is (no copy).
public func terminalSafe(_ text: String) -> String {
    guard text.unicodeScalars.contains(where: isControl) else { return text }
    var out = ""
    for scalar in text.unicodeScalars {
        if isControl(scalar) {
            out += "\\u{" + String(scalar.value, radix: 16) + "}"
        } else {
            out.unicodeScalars.append(scalar)
        }
    }
    return out
}

private func isControl(_ scalar: Unicode.Scalar) -> Bool {
    // C0, DEL, C1; the line and paragraph separators (U+2028, U+2029); the bidirectional
    // overrides and isolates, which reorder what a terminal shows (U+202A-U+202E, U+2066-U+2069).
    scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value) || (0x2028...0x202E).contains(scalar.value)
        || (0x2066...0x2069).contains(scalar.value)
}
