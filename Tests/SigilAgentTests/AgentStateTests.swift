import Testing
import Foundation
import SigilCore
@testable import SigilAgent

@Suite("Agent state fan-out", .timeLimit(.minutes(1)))
struct AgentStateTests {
    static func entry(_ id: String, uid: Int) -> AgentEntry {
        AgentEntry(id: id, spiffeID: "spiffe://example.org/ns/default/sa/\(id)", selectors: ["unix:uid:\(uid)"],
                   ttlSeconds: 3600, dnsNames: [], revision: 1)
    }

    static func held(_ entry: AgentEntry, key: UInt8, life: TimeInterval = 3600) -> HeldSVID {
        HeldSVID(entryID: entry.id, spiffeID: entry.spiffeID, chainDER: [[0x30, key]], keyPKCS8DER: [key],
                 serial: "\(key)", notBefore: Date(), notAfter: Date().addingTimeInterval(life),
                 renewAt: Date().addingTimeInterval(life / 2), entryRevision: 1)
    }

    /// The next snapshot on `stream` that holds an SVID keyed `key` (bounded: earlier ones are skipped).
    static func next(_ iterator: inout AsyncStream<WorkloadX509Snapshot>.Iterator, key: UInt8) async -> WorkloadX509Snapshot? {
        for _ in 0..<10 {
            guard let snapshot = await iterator.next() else { return nil }
            if snapshot.svids.contains(where: { $0.keyPKCS8DER == [key] }) { return snapshot }
        }
        return nil
    }

    /// A state holding `entries`, with one open stream per selector set in `streams` (registered).
    static func state(entries: [AgentEntry], streams: [Set<String>]) async throws
        -> (AgentState, [AsyncStream<WorkloadX509Snapshot>.Iterator]) {
        let state = AgentState(trustDomain: try TrustDomain("example.org"))
        await state.apply(entries: entries, bundleRoots: [[0x30, 0x00]], bundleSequence: 1, jwtKeysJSON: Array(#"{"keys":[]}"#.utf8))
        let iterators = streams.map { state.x509Snapshots(selectors: $0).makeAsyncIterator() }
        while await state.openStreams < streams.count { try await Task.sleep(for: .milliseconds(5)) }
        return (state, iterators)
    }

    @Test("Streams of one workload share a snapshot; another workload's streams never see its keys")
    func fanOutKeepsWorkloadsApart() async throws {
        let web = Self.entry("web", uid: 1001), db = Self.entry("db", uid: 1002)
        let (state, streams) = try await Self.state(entries: [web, db], streams: [["unix:uid:1001"], ["unix:uid:1001"], ["unix:uid:1002"]])
        var web1 = streams[0], web2 = streams[1], dbStream = streams[2]

        await state.store(Self.held(web, key: 0xA1))
        await state.store(Self.held(db, key: 0xB1))
        let first1 = try #require(await Self.next(&web1, key: 0xA1))
        let first2 = try #require(await Self.next(&web2, key: 0xA1))
        let firstDB = try #require(await Self.next(&dbStream, key: 0xB1))
        #expect(first1 == first2)
        // Shared, not just equal: the same bytes in memory (what makes the per-stream checks cheap).
        let base1 = first1.svids[0].chainDER.withUnsafeBufferPointer { $0.baseAddress }
        let base2 = first2.svids[0].chainDER.withUnsafeBufferPointer { $0.baseAddress }
        #expect(base1 == base2)
        #expect(first1.svids.map(\.spiffeID) == [web.spiffeID])
        #expect(firstDB.svids.map(\.spiffeID) == [db.spiffeID])
        #expect(firstDB.svids.map(\.keyPKCS8DER) == [[0xB1]])

        // A rotation of web's SVID reaches both web streams; db's next snapshot is its own rotation.
        await state.store(Self.held(web, key: 0xA2))
        await state.store(Self.held(db, key: 0xB2))
        let rotated1 = try #require(await Self.next(&web1, key: 0xA2))
        let rotated2 = try #require(await Self.next(&web2, key: 0xA2))
        let rotatedDB = try #require(await dbStream.next())
        #expect(rotated1 == rotated2)
        #expect(rotated1.svids.map(\.keyPKCS8DER) == [[0xA2]])
        #expect(rotatedDB.svids.map(\.keyPKCS8DER) == [[0xB2]], "db's stream got another workload's snapshot")
    }

    @Test("A caller matching an entry whose SVID is not signed yet is entitled; one matching none is not")
    func entitlementWithoutAnSVID() async throws {
        let web = Self.entry("web", uid: 1001)
        let (state, streams) = try await Self.state(entries: [web], streams: [["unix:uid:1001"], ["unix:uid:1002"]])
        var webStream = streams[0], other = streams[1]
        let pending = try #require(await webStream.next())
        #expect(pending.entitled && pending.svids.isEmpty)
        let nobody = try #require(await other.next())
        #expect(!nobody.entitled && nobody.svids.isEmpty)
        await state.store(Self.held(web, key: 0xE1))
        let minted = try #require(await Self.next(&webStream, key: 0xE1))
        #expect(minted.entitled)
    }

    @Test("An SVID kept for serving is never served after it expires")
    func expiredSVIDLeavesTheSnapshot() async throws {
        let short = Self.entry("short", uid: 1001), long = Self.entry("long", uid: 1001)
        let (state, streams) = try await Self.state(entries: [short, long], streams: [["unix:uid:1001"]])
        var stream = streams[0]
        await state.store(Self.held(short, key: 0xC1, life: 1.5))
        await state.store(Self.held(long, key: 0xD1))
        let both = try #require(await Self.next(&stream, key: 0xD1))
        #expect(Set(both.svids.map(\.keyPKCS8DER)) == [[0xC1], [0xD1]])
        try await Task.sleep(for: .milliseconds(1700))
        await state.store(Self.held(long, key: 0xD2))   // a publish after the short one expired
        let after = try #require(await Self.next(&stream, key: 0xD2))
        #expect(after.svids.map(\.keyPKCS8DER) == [[0xD2]], "an expired SVID was served")
    }
}
