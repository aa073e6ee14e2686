import Foundation
import Yams

/// A `--config` file of `sigil server run`, `agent run` or `proxy run`: a YAML mapping of the long
/// flag names (`data_dir: /var/lib/sigil`, `listen: 127.0.0.1:8081`), each to one value.
///
/// Values are read as the text written, never as YAML 1.1 types: `namespace: no` is the namespace
/// "no" (not `false`), `port: 08080` stays as written for the flag's own check. Refused, with the
/// setting named: a key that is not a setting of that command (a typo would otherwise leave the
/// default in force silently), a setting given twice, a list or mapping or empty value, anchors
/// and aliases (a small file could expand exponentially while it is parsed), and files over 1 MiB.
public enum SettingsFile {
    public struct LoadError: Error, Sendable, CustomStringConvertible {
        public let description: String
    }

    public static let maximumBytes = 1 << 20

    /// The settings of the file at `path`, keyed by flag name with `_` for `-`; `allowed`: the
    /// flag names (either spelling) the command takes.
    public static func load(path: String, allowed: Set<String>, example: String) throws(LoadError) -> [String: String] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw LoadError(description: "cannot read config file '\(path)'")
        }
        return try parse(String(decoding: data, as: UTF8.self), file: path, allowed: allowed, example: example)
    }

    public static func parse(_ text: String, file: String, allowed: Set<String>, example: String) throws(LoadError) -> [String: String] {
        func fail(_ problem: String) -> LoadError { LoadError(description: "config file '\(file)': \(problem)") }
        guard text.utf8.count <= maximumBytes else { throw fail("larger than \(maximumBytes >> 20) MiB") }
        if let position = PolicyLoader.anchorPosition(text) {
            throw fail("YAML anchors and aliases (&name, *name) are not supported (\(position)); write the values out")
        }
        let node: Node?
        do { node = try Yams.compose(yaml: text) } catch {
            throw fail("not valid YAML: \(error)")
        }
        guard let node else { return [:] }  // an empty file: no settings
        guard case .mapping(let mapping) = node else {
            throw fail("must be a YAML mapping of settings (e.g. \(example))")
        }
        let known = Set(allowed.map { $0.replacingOccurrences(of: "-", with: "_") })
        var out: [String: String] = [:]
        for (keyNode, valueNode) in mapping {
            guard case .scalar(let key) = keyNode else { throw fail("a setting's name must be a plain word") }
            let name = key.string.replacingOccurrences(of: "-", with: "_")
            guard known.contains(name) else {
                throw fail("unknown setting '\(key.string)' (settings: \(known.sorted().joined(separator: ", ")))")
            }
            guard out[name] == nil else { throw fail("setting '\(key.string)' is given twice") }
            guard case .scalar(let value) = valueNode else { throw fail("setting '\(key.string)' must be one value, not a list or mapping") }
            let isNull = value.style == .plain && ["~", "null", "Null", "NULL"].contains(value.string)
            guard !value.string.isEmpty, !isNull else {
                throw fail("setting '\(key.string)' has no value")
            }
            out[name] = value.string
        }
        return out
    }
}
