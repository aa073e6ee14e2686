import Foundation
import Testing
import SigilCore

/// What the proxy's policy watcher compares: a ConfigMap-style `..data` swap, a rewrite and a
/// removal are each a change; an untouched file is not.
struct FileStampTests {
    @Test func configMapSwapRewriteAndRemovalAreChanges() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("filestamp-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fm = FileManager.default
        for version in ["v1", "v2"] {
            try fm.createDirectory(atPath: "\(dir)/\(version)", withIntermediateDirectories: true)
            // The same size in both versions: only the file the link resolves to tells them apart.
            try "action: ALLOW \(version)\n".write(toFile: "\(dir)/\(version)/a.yaml", atomically: false, encoding: .utf8)
        }
        try fm.createSymbolicLink(atPath: "\(dir)/..data", withDestinationPath: "v1")
        try fm.createSymbolicLink(atPath: "\(dir)/a.yaml", withDestinationPath: "..data/a.yaml")
        try "x".write(toFile: "\(dir)/notes.txt", atomically: false, encoding: .utf8)
        try "{}".write(toFile: "\(dir)/b.json", atomically: false, encoding: .utf8)
        #expect(FileStamp.policyFileNames(inDirectory: dir) == ["a.yaml", "b.json"])
        #expect(FileStamp.policyFileNames(inDirectory: "\(dir)/notes.txt") == nil)

        let first = FileStamp(path: "\(dir)/a.yaml")
        #expect(FileStamp(path: "\(dir)/a.yaml") == first)
        // Kubernetes' atomic update: a new link renamed over `..data`.
        try fm.createSymbolicLink(atPath: "\(dir)/..data_tmp", withDestinationPath: "v2")
        #expect(rename("\(dir)/..data_tmp", "\(dir)/..data") == 0)
        let swapped = FileStamp(path: "\(dir)/a.yaml")
        #expect(swapped != first)

        // Rewritten in place with the same size.
        try "action: ALLOW v3\n".write(toFile: "\(dir)/v2/a.yaml", atomically: false, encoding: .utf8)
        #expect(FileStamp(path: "\(dir)/a.yaml") != swapped)

        let missing = FileStamp(path: "\(dir)/kill-switch")
        #expect(FileStamp(path: "\(dir)/kill-switch") == missing)
        try "on".write(toFile: "\(dir)/kill-switch", atomically: false, encoding: .utf8)
        #expect(FileStamp(path: "\(dir)/kill-switch") != missing)
    }
}
