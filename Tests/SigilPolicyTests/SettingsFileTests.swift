import Testing
@testable import SigilPolicy

/// `--config` files: values as written, unknown and doubtful settings refused by name.
struct SettingsFileTests {
    let allowed: Set<String> = ["namespace", "labels", "inbound", "log-level", "threads"]

    @Test func valuesAreTheTextWrittenNotYAMLTypes() throws {
        let settings = try SettingsFile.parse("namespace: no\nlabels: app=on\ninbound: 127.0.0.1:08080\nlog-level: \"null\"\nthreads: 0x2\n",
                                              file: "t.yaml", allowed: allowed, example: "inbound: 127.0.0.1:15006")
        #expect(settings == ["namespace": "no", "labels": "app=on", "inbound": "127.0.0.1:08080", "log_level": "null", "threads": "0x2"])
        #expect(try SettingsFile.parse("", file: "t.yaml", allowed: allowed, example: "").isEmpty)
    }

    @Test(arguments: [
        ("namespce: shop\n", "unknown setting 'namespce'"),
        ("namespace: ~\n", "has no value"),
        ("namespace: {a: b}\n", "must be one value"),
        ("- namespace\n", "must be a YAML mapping"),
        ("? [a, b]\n: x\n", "plain word"),
        ("namespace: &n shop\nlabels: *n\n", "anchors"),
    ])
    func refused(text: String, words: String) {
        #expect(throws: SettingsFile.LoadError.self) {
            try SettingsFile.parse(text, file: "t.yaml", allowed: allowed, example: "")
        }
        do {
            _ = try SettingsFile.parse(text, file: "t.yaml", allowed: allowed, example: "")
        } catch {
            #expect(error.description.contains(words), "\(error.description)")
        }
    }
}
