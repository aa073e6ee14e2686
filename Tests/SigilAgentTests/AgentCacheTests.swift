import Testing
import Foundation
@testable import SigilAgent

@Suite("Agent cache on disk", .timeLimit(.minutes(1)))
struct AgentCacheTests {
    static func directory() throws -> String {
        let path = NSTemporaryDirectory() + "sigil-agent-cache-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    static let identity = AgentCache.AgentIdentity(agentID: "spiffe://example.org/sigil/agent/node-1", chainDER: [[0x30, 0x00]], keyPKCS8DER: [1, 2, 3],
                                                   notAfter: Date().addingTimeInterval(3600), trustDomain: "example.org", receivedAt: Date())

    @Test("A save that fails leaves no temporary file behind, and the error names the file")
    func failedSaveRemovesTemporary() throws {
        let path = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let cache = try AgentCache(directory: path)
        // agent.json taken by a directory: the rename over it fails after the temporary was written.
        try FileManager.default.createDirectory(atPath: cache.identityPath + "/occupied", withIntermediateDirectories: true)
        #expect(throws: AgentError.self) { try cache.saveIdentity(Self.identity) }
        let left = try FileManager.default.contentsOfDirectory(atPath: path).filter { $0.hasSuffix(".tmp") }
        #expect(left.isEmpty, "left behind: \(left)")
        // And a save that works still works.
        try FileManager.default.removeItem(atPath: cache.identityPath)
        try cache.saveIdentity(Self.identity)
        #expect(cache.loadIdentity()?.agentID == Self.identity.agentID)
    }

    @Test("The write probe leaves nothing behind, and a directory it cannot write to is named with the error")
    func probe() throws {
        let path = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: path) }
        let cache = try AgentCache(directory: path)
        try cache.probeWritable()
        #expect(try FileManager.default.contentsOfDirectory(atPath: path).isEmpty)
        // The probe's file name taken by a directory: open(2) fails (EISDIR), as it would on a full disk (ENOSPC).
        try FileManager.default.createDirectory(atPath: path + "/" + AgentCache.probeName, withIntermediateDirectories: false)
        do {
            try cache.probeWritable()
            Issue.record("the probe passed on a directory it cannot write to")
        } catch {
            #expect(error.message.contains("--data-dir '\(path)' cannot be written"), "\(error.message)")
            #expect(error.message.contains("Is a directory"), "\(error.message)")
            #expect(!error.isUsage)
        }
    }

    @Test("An agent SVID whose renewal is not saved is replaced in the last 10 % of its life, at least 30 s before its end")
    func switchTime() {
        let start = Date(timeIntervalSince1970: 1_000_000)
        func margin(_ life: TimeInterval) -> TimeInterval {
            let times = AgentSVIDTimes(start: start, notAfter: start.addingTimeInterval(life))
            return times.notAfter.timeIntervalSince(times.switchAt)
        }
        #expect(margin(3600) == 360)
        #expect(margin(200) == 30)
        #expect(margin(20) == 10)  // never before half its life, when it is renewed
        #expect(margin(0) == 0)
        // No readable leaf: due at once.
        let unreadable = AgentCache.AgentIdentity(agentID: "a", chainDER: [[0x01]], keyPKCS8DER: [], notAfter: start, trustDomain: "example.org", receivedAt: nil)
        #expect(AgentSVIDTimes(unreadable).switchAt < Date())
    }
}
