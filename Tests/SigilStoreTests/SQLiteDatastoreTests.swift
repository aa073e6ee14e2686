import Testing
import Foundation
import SigilStore
import SigilTestSupport

@Suite("SQLiteDatastore")
struct SQLiteDatastoreTests {
    func authority(_ id: String, kind: AuthorityKind = .intermediate, parent: String? = nil) -> AuthorityRecord {
        AuthorityRecord(id: id, kind: kind, state: .active, parentID: parent, notBefore: Date(), notAfter: Date().addingTimeInterval(3600),
                        fingerprint: "fp-" + id, certificatePEM: "pem", inBundle: kind == .root, createdAt: Date())
    }

    func issued(_ serial: String, authority: String = "int") -> IssuedCertificate {
        IssuedCertificate(serial: serial, spiffeID: "spiffe://example.org/x", authorityID: authority, notBefore: Date(),
                          notAfter: Date().addingTimeInterval(3600), issuedAt: Date(), requester: "test")
    }

    func fileStore() throws -> (SQLiteDatastore, TemporaryDirectory) {
        let dir = try TemporaryDirectory()
        return (try SQLiteDatastore(path: dir.path + "/sigil.db"), dir)
    }

    @Test func initializeOnceThenRefuse() async throws {
        let (store, dir) = try fileStore()
        defer { dir.remove() }
        #expect(try await store.trustDomain() == nil)
        try await store.initialize(trustDomain: "example.org", authorities: [authority("root", kind: .root), authority("int", parent: "root")], at: Date())
        #expect(try await store.trustDomain() == "example.org")
        #expect(try await store.authorities().map(\.id) == ["root", "int"])
        await #expect(throws: StoreError.self) {
            try await store.initialize(trustDomain: "other.org", authorities: [], at: Date())
        }
        #expect(try await store.trustDomain() == "example.org")
        #expect(try await store.bundleSequence() == 1)
    }

    @Test func databaseFileIsPrivateAndWAL() async throws {
        let (store, dir) = try fileStore()
        defer { dir.remove() }
        try await store.initialize(trustDomain: "example.org", authorities: [authority("root", kind: .root)], at: Date())
        let attributes = try FileManager.default.attributesOfItem(atPath: store.path)
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
        #expect(FileManager.default.fileExists(atPath: store.path + "-wal"))
    }

    @Test("A new root and its intermediate are added together or not at all")
    func addAuthoritiesIsOneTransaction() async throws {
        let (store, dir) = try fileStore()
        defer { dir.remove() }
        try await store.initialize(trustDomain: "example.org", authorities: [authority("root", kind: .root), authority("int", parent: "root")], at: Date())
        var root2 = authority("root2", kind: .root)
        root2.state = .prepared
        var int2 = authority("int2", parent: "root2")
        int2.state = .prepared
        let sequence = try await store.bundleSequence()
        let events = try await store.issuanceLog(after: 0, limit: 100).count
        // The intermediate's row fails (its ID is taken): the root before it must not stay.
        var clash = int2
        clash.id = "int"
        await #expect(throws: StoreError.self) {
            try await store.addAuthorities([root2, clash], at: Date(), requester: "test")
        }
        #expect(try await store.authorities().map(\.id) == ["root", "int"])
        #expect(try await store.bundleSequence() == sequence)
        #expect(try await store.issuanceLog(after: 0, limit: 100).count == events)
        try await store.addAuthorities([root2, int2], at: Date(), requester: "test")
        #expect(try await store.authorities().map(\.id).sorted() == ["int", "int2", "root", "root2"])
        #expect(try await store.bundleSequence() == sequence + 1)
    }

    @Test func serialsAreUniqueAndABadBatchStoresNothing() async throws {
        let (store, dir) = try fileStore()
        defer { dir.remove() }
        try await store.initialize(trustDomain: "example.org", authorities: [authority("root", kind: .root), authority("int", parent: "root")], at: Date())
        try await store.recordIssued([issued("01"), issued("02")])
        do {
            try await store.recordIssued([issued("03"), issued("01")])
            Issue.record("duplicate serial accepted")
        } catch {
            #expect(error.code == .duplicateSerial)
        }
        #expect(try await store.issuedCertificates(limit: 10).map(\.serial).sorted() == ["01", "02"])
        #expect(try await store.issuedCounts() == ["int": 2])
        let log = try await store.issuanceLog(after: 0, limit: 100)
        #expect(log.map(\.kind) == [.caInitialized, .issued, .issued])
        await #expect(throws: StoreError.self) { try await store.recordIssued([issued("04", authority: "nope")]) }
    }

    @Test func issuanceLogIsAppendOnly() async throws {
        let (store, dir) = try fileStore()
        defer { dir.remove() }
        try await store.initialize(trustDomain: "example.org", authorities: [authority("root", kind: .root), authority("int", parent: "root")], at: Date())
        try await store.recordIssued([issued("0a")])
        // Tamper through SQLite itself: the schema's triggers refuse.
        for sql in ["UPDATE issuance_log SET detail = 'x'", "DELETE FROM issuance_log", "UPDATE issued_certificates SET spiffe_id = 'spiffe://evil/x'"] {
            let result = try runSQLite(store.path, sql)
            #expect(result.status != 0, "\(sql) should be refused")
            #expect(result.output.contains("append-only") || result.output.contains("immutable"), "\(result.output)")
        }
        #expect(try await store.issuanceLog(after: 0, limit: 10).count == 2)
    }

    @Test func entriesAreCreatedOnceAndReadInBatches() async throws {
        let (store, dir) = try fileStore()
        defer { dir.remove() }
        try await store.initialize(trustDomain: "example.org", authorities: [authority("root", kind: .root)], at: Date())
        let a = try await store.createEntry(EntryRecord(id: "a", spiffeID: "spiffe://example.org/x", parentID: "spiffe://example.org/sigil/agent/n",
                                                        selectors: ["unix:uid:2", "unix:gid:1"], ttlSeconds: 60, dnsNames: [], createdAt: Date()))
        #expect(a.selectors == ["unix:gid:1", "unix:uid:2"])
        #expect(a.revision == 1)
        await #expect(throws: StoreError.self) {
            // The same workload under the same agent, selectors in another order: a duplicate.
            _ = try await store.createEntry(EntryRecord(id: "b", spiffeID: "spiffe://example.org/x", parentID: "spiffe://example.org/sigil/agent/n",
                                                        selectors: ["unix:gid:1", "unix:uid:2"], ttlSeconds: 60, dnsNames: [], createdAt: Date()))
        }
        let found = try await store.entries(ids: ["a", "missing", "a"])
        #expect(Array(found.keys) == ["a"])
        #expect(try await store.deleteEntry(id: "a", at: Date())?.id == "a")
        #expect(try await store.entries(ids: ["a"]).isEmpty)
    }

    @Test func migrationsAreIdempotentOnReopen() async throws {
        let (store, dir) = try fileStore()
        defer { dir.remove() }
        try await store.initialize(trustDomain: "example.org", authorities: [authority("root", kind: .root)], at: Date())
        let reopened = try SQLiteDatastore(path: store.path)
        #expect(try await reopened.trustDomain() == "example.org")
    }

    @Test func unopenablePathsGiveAClearError() throws {
        let dir = try TemporaryDirectory()
        defer { dir.remove() }
        #expect(FileManager.default.createFile(atPath: dir.path + "/file", contents: Data("x".utf8)))
        for path in [dir.path + "/file/sigil.db", dir.path + "/missing/sigil.db"] {
            do {
                _ = try SQLiteDatastore(path: path)
                Issue.record("opened \(path)")
            } catch {
                #expect(error.code == .cannotOpen)
                #expect(error.message.contains("directory"))
            }
        }
    }

    /// Runs a statement with Python's sqlite3 module (an independent SQLite client).
    func runSQLite(_ path: String, _ sql: String) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", "import sqlite3,sys\ntry:\n c=sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()\nexcept Exception as e:\n print(e); sys.exit(1)", path, sql]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
    }
}
