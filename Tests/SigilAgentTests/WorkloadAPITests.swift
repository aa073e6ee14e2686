import Testing
import Foundation
import Crypto
import X509
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import ServiceLifecycle
import SwiftProtobuf
import Synchronization
import SigilCore
import SigilRPC
import SigilTestSupport
@testable import SigilAgent

// MARK: - Fixtures

/// An identity source with one entitlement rule: callers whose selectors include `entitledSelector`
/// get the current SVIDs; everyone else gets none. `push` rotates them on every open stream (an
/// empty push: the entries are gone); `minted: false` starts entitled callers without their SVIDs
/// (an entry whose first SVID is not signed yet) until the first push.
final class FakeIdentitySource: WorkloadIdentitySource {
    private struct Subscriber {
        let continuation: AsyncStream<WorkloadX509Snapshot>.Continuation
        let entitled: Bool
    }

    private struct State {
        var svids: [WorkloadX509SVID]
        var subscribers: [Int: Subscriber] = [:]
        var nextID = 0
        var seenSelectors: [Set<String>] = []
        var minted: Bool

        func snapshot(entitled: Bool, bundle: WorkloadBundle) -> WorkloadX509Snapshot {
            WorkloadX509Snapshot(svids: entitled && minted ? svids : [], bundle: bundle,
                                 entitled: entitled && (!minted || !svids.isEmpty))
        }
    }

    let entitledSelector: String
    let bundle: WorkloadBundle
    private let state: Mutex<State>

    init(entitledSelector: String, svids: [WorkloadX509SVID], bundle: WorkloadBundle, minted: Bool = true) {
        self.entitledSelector = entitledSelector
        self.bundle = bundle
        self.state = Mutex(State(svids: svids, minted: minted))
    }

    /// Every selector set the Workload API asked with, in order.
    var seenSelectors: [Set<String>] { state.withLock { $0.seenSelectors } }

    func push(_ svids: [WorkloadX509SVID]) {
        state.withLock { state in
            state.svids = svids
            state.minted = true
            for subscriber in state.subscribers.values {
                subscriber.continuation.yield(state.snapshot(entitled: subscriber.entitled, bundle: bundle))
            }
        }
    }

    func x509Snapshots(selectors: Set<String>) -> AsyncStream<WorkloadX509Snapshot> {
        let (stream, continuation) = AsyncStream.makeStream(of: WorkloadX509Snapshot.self)
        let entitled = selectors.contains(entitledSelector)
        let bundle = self.bundle
        let id = state.withLock { state in
            state.seenSelectors.append(selectors)
            state.nextID += 1
            state.subscribers[state.nextID] = Subscriber(continuation: continuation, entitled: entitled)
            continuation.yield(state.snapshot(entitled: entitled, bundle: bundle))
            return state.nextID
        }
        continuation.onTermination = { [weak self] _ in
            self?.state.withLock { _ = $0.subscribers.removeValue(forKey: id) }
        }
        return stream
    }

    func bundles() -> AsyncStream<WorkloadBundle> {
        AsyncStream { $0.yield(bundle) }
    }

    func jwtSVIDs(selectors: Set<String>, spiffeID: String?, audience: [String]) async throws(WorkloadAPIError) -> [WorkloadJWTSVID] {
        state.withLock { $0.seenSelectors.append(selectors) }
        guard selectors.contains(entitledSelector) else {
            throw WorkloadAPIError(.permissionDenied, "no identity issued")
        }
        let ids = state.withLock { $0.svids.map(\.spiffeID) }.filter { spiffeID == nil || $0 == spiffeID }
        return ids.map { WorkloadJWTSVID(spiffeID: $0, token: "jwt-for-\(audience.joined(separator: "+"))") }
    }

    func validateJWTSVID(token: String, audience: String) async throws(WorkloadAPIError) -> (spiffeID: String, claimsJSON: [UInt8]) {
        guard token == "good" else {
            throw WorkloadAPIError(.invalidArgument, "token is not a valid JWT-SVID")
        }
        return ("spiffe://example.org/ns/default/sa/web", Array(#"{"sub":"spiffe://example.org/ns/default/sa/web","aud":["\#(audience)"],"exp":1900000000}"#.utf8))
    }
}

struct Fixture {
    let pki: TestPKI
    let bundle: WorkloadBundle

    init() throws {
        pki = try TestPKI()
        bundle = WorkloadBundle(
            trustDomain: "example.org",
            rootsDER: pki.root.certificate.derBytes,
            jwtKeysJSON: Array(#"{"keys":[{"kty":"EC","use":"jwt-svid"}]}"#.utf8)
        )
    }

    func svid(_ path: String, hint: String = "") throws -> WorkloadX509SVID {
        let key = P256.Signing.PrivateKey()
        let id = try SpiffeID("spiffe://example.org\(path)")
        let leaf = try SVIDProfile(spiffeID: id).makeCertificate(
            publicKey: Certificate.PrivateKey(key).publicKey,
            issuer: pki.intermediate,
            now: Date()
        )
        return WorkloadX509SVID(
            spiffeID: id.description,
            chainDER: leaf.derBytes + pki.intermediate.certificate.derBytes,
            keyPKCS8DER: Array(key.derRepresentation),
            hint: hint
        )
    }
}

let realUID = "unix:uid:\(geteuid())"
let securityHeader: Metadata = ["workload.spiffe.io": "true"]

var testLogger: Logger {
    var logger = Logger(label: "sigil.workload-api.test")
    logger.logLevel = .warning
    return logger
}

/// Runs a real server on a fresh Unix socket (in a directory that does not exist yet).
func withServer<R: Sendable>(
    _ source: FakeIdentitySource,
    _ body: (String) async throws -> R
) async throws -> R {
    let directory = try TemporaryDirectory(prefix: "sigil-wl")
    defer { directory.remove() }
    let path = directory.path + "/run/agent.sock"
    let server = WorkloadAPIServer(socketPath: path, source: source, logger: testLogger)
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await server.run() }
        do {
            let listening = try await server.listeningAddress()
            #expect(listening == path)
            let result = try await body(path)
            group.cancelAll()
            return result
        } catch {
            group.cancelAll()
            throw error
        }
    }
}

func withRawClient<R: Sendable>(
    _ socketPath: String,
    _ body: (SPIFFESpiffeWorkloadAPI.Client<HTTP2ClientTransport.Posix>) async throws -> R
) async throws -> R {
    try await withGRPCClient(
        transport: .http2NIOPosix(target: .unixDomainSocket(path: socketPath), transportSecurity: .plaintext)
    ) { client in
        try await body(SPIFFESpiffeWorkloadAPI.Client(wrapping: client))
    }
}

/// The first FetchX509SVID response for `metadata`.
func firstX509Response(_ socketPath: String, metadata: Metadata) async throws -> SPIFFEX509SVIDResponse {
    try await withRawClient(socketPath) { api in
        try await api.fetchX509SVID(SPIFFEX509SVIDRequest(), metadata: metadata) { response in
            for try await message in response.messages { return message }
            throw WorkloadAPIError(.unavailable, "stream ended without a response")
        }
    }
}

// MARK: - End to end over a real socket

@Suite("Workload API", .timeLimit(.minutes(1)))
struct WorkloadAPITests {
    @Test("FetchX509SVID returns the SVID to a caller attested as the running uid")
    func fetchReturnsSVIDForRealUID() async throws {
        let fixture = try Fixture()
        let svid = try fixture.svid("/ns/default/sa/web")
        let source = FakeIdentitySource(entitledSelector: realUID, svids: [svid], bundle: fixture.bundle)

        try await withServer(source) { path in
            // Every local user may connect: attestation decides.
            let mode = try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int
            #expect(mode == 0o777)

            let context = try await WorkloadAPIClient().fetchX509(socketPath: path)
            #expect(context.svids.count == 1)
            let fetched = try #require(context.svids.first)
            #expect(fetched.spiffeID == "spiffe://example.org/ns/default/sa/web")
            #expect(fetched.certificates.count == 2)
            #expect(fetched.certificates.first?.derBytes == Array(svid.chainDER.prefix(fetched.certificates[0].derBytes.count)))
            #expect(fetched.privateKeyPKCS8DER == svid.keyPKCS8DER)
            #expect(fetched.bundle.map(\.derBytes) == [fixture.pki.root.certificate.derBytes])
        }

        // What the attestor produced for this process, as the source saw it.
        let selectors = try #require(source.seenSelectors.first)
        #expect(selectors.contains(realUID))
        #expect(selectors.contains("unix:gid:\(getegid())"))
        let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        #expect(selectors.contains("unix:path:\(exe)"))
        if let user = getpwuid(geteuid()).map({ String(cString: $0.pointee.pw_name) }) {
            #expect(selectors.contains("unix:user:\(user)"))
        }
        #expect(!selectors.contains { $0.hasPrefix("unix:uid:") && $0 != realUID })
    }

    @Test("A call without the workload.spiffe.io header is InvalidArgument")
    func missingSecurityHeader() async throws {
        let fixture = try Fixture()
        let source = FakeIdentitySource(entitledSelector: realUID, svids: [try fixture.svid("/w")], bundle: fixture.bundle)
        try await withServer(source) { path in
            let error = await #expect(throws: RPCError.self) {
                _ = try await firstX509Response(path, metadata: [:])
            }
            #expect(error?.code == .invalidArgument)
            #expect(error?.message == "security header missing from request")

            let wrong = await #expect(throws: RPCError.self) {
                _ = try await firstX509Response(path, metadata: ["workload.spiffe.io": "false"])
            }
            #expect(wrong?.code == .invalidArgument)
        }
        #expect(source.seenSelectors.isEmpty)
    }

    @Test("A caller that matches no entry gets PermissionDenied")
    func noMatchIsPermissionDenied() async throws {
        let fixture = try Fixture()
        let source = FakeIdentitySource(entitledSelector: "unix:uid:4242", svids: [try fixture.svid("/w")], bundle: fixture.bundle)
        try await withServer(source) { path in
            let error = await #expect(throws: RPCError.self) {
                _ = try await firstX509Response(path, metadata: securityHeader)
            }
            #expect(error?.code == .permissionDenied)
            #expect(error?.message == "no identity issued")

            // The bundle streams, too, need an identity (as SPIRE's agent).
            let bundles = await #expect(throws: RPCError.self) {
                try await withRawClient(path) { api in
                    try await api.fetchX509Bundles(SPIFFEX509BundlesRequest(), metadata: securityHeader) { response in
                        for try await _ in response.messages {}
                    }
                }
            }
            #expect(bundles?.code == .permissionDenied)

            // The client names the status.
            let clientError = await #expect(throws: WorkloadAPIError.self) {
                _ = try await WorkloadAPIClient().fetchX509(socketPath: path)
            }
            #expect(clientError?.code == .permissionDenied)
            #expect(clientError?.message.contains("PermissionDenied: no identity issued") == true)
        }
    }

    @Test("An entitled caller whose SVID is not minted yet waits for it (not PermissionDenied) and gets the bundle at once")
    func entitledCallerWaitsForItsFirstSVID() async throws {
        let fixture = try Fixture()
        let svid = try fixture.svid("/ns/default/sa/web")
        let source = FakeIdentitySource(entitledSelector: realUID, svids: [], bundle: fixture.bundle, minted: false)
        try await withServer(source) { path in
            // The bundle is there already: sent at once, before any SVID exists.
            let bundles = try await withRawClient(path) { api in
                try await api.fetchX509Bundles(SPIFFEX509BundlesRequest(), metadata: securityHeader) { response in
                    for try await message in response.messages { return message }
                    throw WorkloadAPIError(.unavailable, "stream ended without a response")
                }
            }
            #expect(bundles.bundles["spiffe://example.org"] == Data(fixture.bundle.rootsDER))

            try await withRawClient(path) { api in
                try await api.fetchX509SVID(SPIFFEX509SVIDRequest(), metadata: securityHeader) { response in
                    var messages = response.messages.makeAsyncIterator()
                    // Nothing is sent (neither an empty response nor an error) until the SVID is
                    // signed; once pushed, it is the stream's first message.
                    try await Task.sleep(for: .milliseconds(200))
                    source.push([svid])
                    let first = try #require(try await messages.next())
                    #expect(first.svids.map { Array($0.x509Svid) } == [svid.chainDER])
                }
            }
        }
    }

    @Test("A rotation arrives on an open FetchX509SVID stream; losing every SVID ends it with PermissionDenied")
    func rotationArrivesOnOpenStream() async throws {
        let fixture = try Fixture()
        let first = try fixture.svid("/ns/default/sa/web")
        let second = try fixture.svid("/ns/default/sa/web")
        let source = FakeIdentitySource(entitledSelector: realUID, svids: [first], bundle: fixture.bundle)

        try await withServer(source) { path in
            let final = await #expect(throws: RPCError.self) {
                try await withRawClient(path) { api in
                    try await api.fetchX509SVID(SPIFFEX509SVIDRequest(), metadata: securityHeader) { response in
                        var messages = response.messages.makeAsyncIterator()
                        let initial = try #require(try await messages.next())
                        #expect(initial.svids.map { Array($0.x509Svid) } == [first.chainDER])
                        #expect(initial.svids.first?.bundle == Data(fixture.bundle.rootsDER))

                        source.push([second])
                        let rotated = try #require(try await messages.next())
                        #expect(rotated.svids.map { Array($0.x509Svid) } == [second.chainDER])
                        #expect(rotated.svids.map { Array($0.x509SvidKey) } == [second.keyPKCS8DER])

                        source.push([])
                        while try await messages.next() != nil {}
                    }
                }
            }
            #expect(final?.code == .permissionDenied)
        }
    }

    @Test("The watch client sees every rotation")
    func watchClientSeesRotation() async throws {
        let fixture = try Fixture()
        let first = try fixture.svid("/a")
        let second = try fixture.svid("/b")
        let source = FakeIdentitySource(entitledSelector: realUID, svids: [first], bundle: fixture.bundle)
        try await withServer(source) { path in
            let seen = Mutex<[String]>([])
            let error = await #expect(throws: WorkloadAPIError.self) {
                try await WorkloadAPIClient().watchX509(socketPath: path) { context in
                    let count = seen.withLock { seen in
                        seen.append(contentsOf: context.svids.map(\.spiffeID))
                        return seen.count
                    }
                    if count == 1 { source.push([second]) }
                    if count == 2 { throw WorkloadAPIError(.unavailable, "stop watching") }
                }
            }
            #expect(error?.message == "stop watching")
            #expect(seen.withLock { $0 } == ["spiffe://example.org/a", "spiffe://example.org/b"])
        }
    }

    @Test("Spoofed x-sigil-caller-* headers never reach the handler: only the kernel's values count")
    func spoofedCallerHeadersAreIgnored() async throws {
        let fixture = try Fixture()
        var spoofed = securityHeader
        spoofed.addString("unix:uid:4242", forKey: "x-sigil-caller-selectors")
        spoofed.addString("unix:uid:4242,unix:gid:4242", forKey: "x-sigil-caller-selectors")
        spoofed.addString("unix:uid:4242", forKey: "X-Sigil-Caller-Selectors")
        spoofed.addBinary(Array("unix:uid:4242".utf8), forKey: "x-sigil-caller-selectors-bin")
        spoofed.addString("1", forKey: "x-sigil-caller-pid")
        spoofed.addString("1", forKey: "x-sigil-caller-pid")
        spoofed.addString("denied by the client", forKey: "x-sigil-caller-error")

        // Entitled only to uid 4242 (which this process is not): the spoof must not help.
        try #require(geteuid() != 4242)
        let victim = FakeIdentitySource(entitledSelector: "unix:uid:4242", svids: [try fixture.svid("/victim")], bundle: fixture.bundle)
        try await withServer(victim) { path in
            let error = await #expect(throws: RPCError.self) {
                _ = try await firstX509Response(path, metadata: spoofed)
            }
            #expect(error?.code == .permissionDenied)
        }
        for selectors in victim.seenSelectors {
            #expect(!selectors.contains("unix:uid:4242"))
            #expect(!selectors.contains("unix:gid:4242"))
            #expect(selectors.contains(realUID))
        }
        #expect(!victim.seenSelectors.isEmpty)

        // Entitled to the real uid: the same spoofed call (even its fake error header) is served the
        // real caller's identity.
        let own = FakeIdentitySource(entitledSelector: realUID, svids: [try fixture.svid("/own")], bundle: fixture.bundle)
        try await withServer(own) { path in
            let response = try await firstX509Response(path, metadata: spoofed)
            #expect(response.svids.map(\.spiffeID) == ["spiffe://example.org/own"])

            // JWT path too.
            var request = SPIFFEJWTSVIDRequest()
            request.audience = ["db"]
            let jwt = try await withRawClient(path) { api in
                try await api.fetchJWTSVID(request, metadata: spoofed) { try $0.message }
            }
            #expect(jwt.svids.map(\.spiffeID) == ["spiffe://example.org/own"])
        }
        let ownSeen = own.seenSelectors
        #expect(ownSeen.count == 2)
        for selectors in ownSeen {
            #expect(selectors.contains(realUID))
            #expect(!selectors.contains("unix:uid:4242"))
        }
    }

    @Test("Bundles are keyed by the trust domain's SPIFFE ID; JWT calls validate their arguments")
    func bundlesAndJWT() async throws {
        let fixture = try Fixture()
        let source = FakeIdentitySource(entitledSelector: realUID, svids: [try fixture.svid("/web")], bundle: fixture.bundle)
        try await withServer(source) { path in
            try await withRawClient(path) { api in
                let x509 = try await api.fetchX509Bundles(SPIFFEX509BundlesRequest(), metadata: securityHeader) { response in
                    for try await message in response.messages { return message }
                    throw WorkloadAPIError(.unavailable, "no bundle")
                }
                #expect(x509.bundles == ["spiffe://example.org": Data(fixture.bundle.rootsDER)])

                let jwks = try await api.fetchJWTBundles(SPIFFEJWTBundlesRequest(), metadata: securityHeader) { response in
                    for try await message in response.messages { return message }
                    throw WorkloadAPIError(.unavailable, "no bundle")
                }
                #expect(jwks.bundles == ["spiffe://example.org": Data(fixture.bundle.jwtKeysJSON)])

                let noAudience = await #expect(throws: RPCError.self) {
                    _ = try await api.fetchJWTSVID(SPIFFEJWTSVIDRequest(), metadata: securityHeader) { try $0.message }
                }
                #expect(noAudience?.code == .invalidArgument)
                #expect(noAudience?.message == "audience must be specified")

                var request = SPIFFEJWTSVIDRequest()
                request.audience = ["db", "cache"]
                let jwt = try await api.fetchJWTSVID(request, metadata: securityHeader) { try $0.message }
                #expect(jwt.svids.map(\.svid) == ["jwt-for-db+cache"])

                var badID = request
                badID.spiffeID = "https://not-spiffe"
                let invalid = await #expect(throws: RPCError.self) {
                    _ = try await api.fetchJWTSVID(badID, metadata: securityHeader) { try $0.message }
                }
                #expect(invalid?.code == .invalidArgument)

                var validate = SPIFFEValidateJWTSVIDRequest()
                validate.audience = "db"
                let noSVID = await #expect(throws: RPCError.self) {
                    _ = try await api.validateJWTSVID(validate, metadata: securityHeader) { try $0.message }
                }
                #expect(noSVID?.message == "svid must be specified")

                validate.svid = "bad"
                let rejected = await #expect(throws: RPCError.self) {
                    _ = try await api.validateJWTSVID(validate, metadata: securityHeader) { try $0.message }
                }
                #expect(rejected?.code == .invalidArgument)

                validate.svid = "good"
                let valid = try await api.validateJWTSVID(validate, metadata: securityHeader) { try $0.message }
                #expect(valid.spiffeID == "spiffe://example.org/ns/default/sa/web")
                #expect(valid.claims.fields["sub"]?.stringValue == "spiffe://example.org/ns/default/sa/web")
                #expect(valid.claims.fields["aud"]?.listValue.values.map(\.stringValue) == ["db"])
            }
        }
    }

    @Test("Graceful shutdown ends open streams with Unavailable and removes the socket")
    func gracefulShutdown() async throws {
        let fixture = try Fixture()
        let source = FakeIdentitySource(entitledSelector: realUID, svids: [try fixture.svid("/w")], bundle: fixture.bundle)
        let directory = try TemporaryDirectory(prefix: "sigil-wl")
        defer { directory.remove() }
        let path = directory.path + "/agent.sock"
        let server = WorkloadAPIServer(socketPath: path, source: source, logger: testLogger)
        let group = ServiceGroup(services: [server], logger: testLogger)

        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            _ = try await server.listeningAddress()
            let error = await #expect(throws: RPCError.self) {
                try await withRawClient(path) { api in
                    try await api.fetchX509SVID(SPIFFEX509SVIDRequest(), metadata: securityHeader) { response in
                        var messages = response.messages.makeAsyncIterator()
                        _ = try await messages.next()
                        await group.triggerGracefulShutdown()
                        while try await messages.next() != nil {}
                    }
                }
            }
            #expect(error?.code == .unavailable)
            try await tasks.waitForAll()
        }
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    @Test("The server refuses to replace a file that is not a socket")
    func refusesNonSocketPath() async throws {
        let fixture = try Fixture()
        let directory = try TemporaryDirectory(prefix: "sigil-wl")
        defer { directory.remove() }
        let path = directory.path + "/agent.sock"
        try Data("not a socket".utf8).write(to: URL(fileURLWithPath: path))
        let source = FakeIdentitySource(entitledSelector: realUID, svids: [try fixture.svid("/w")], bundle: fixture.bundle)
        let server = WorkloadAPIServer(socketPath: path, source: source, logger: testLogger)
        let error = await #expect(throws: WorkloadAPIError.self) { try await server.run() }
        #expect(error?.message.contains("is not a socket") == true)
        await #expect(throws: WorkloadAPIError.self) { _ = try await server.listeningAddress() }
        #expect(FileManager.default.fileExists(atPath: path))
    }

    @Test("The server replaces a stale socket but not one another server still serves")
    func staleAndLiveSockets() async throws {
        let fixture = try Fixture()
        let source = FakeIdentitySource(entitledSelector: realUID, svids: [try fixture.svid("/w")], bundle: fixture.bundle)
        try await withServer(source) { path in
            let second = WorkloadAPIServer(socketPath: path, source: source, logger: testLogger)
            let error = await #expect(throws: WorkloadAPIError.self) { try await second.run() }
            #expect(error?.message.contains("another process already serves") == true)
            // The first server is untouched.
            _ = try await WorkloadAPIClient().fetchX509(socketPath: path)
        }

        // A socket file nobody listens on (left by a crashed agent) is replaced.
        let directory = try TemporaryDirectory(prefix: "sigil-wl")
        defer { directory.remove() }
        let path = directory.path + "/stale.sock"
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(path.utf8))
            raw[path.utf8.count] = 0
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        close(fd)
        try #require(bound == 0)
        let server = WorkloadAPIServer(socketPath: path, source: source, logger: testLogger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await server.run() }
            _ = try await server.listeningAddress()
            let context = try await WorkloadAPIClient().fetchX509(socketPath: path)
            #expect(context.svids.map(\.spiffeID) == ["spiffe://example.org/w"])
            group.cancelAll()
        }
    }

    @Test("The client explains a missing socket")
    func clientMissingSocket() async throws {
        let error = await #expect(throws: WorkloadAPIError.self) {
            _ = try await WorkloadAPIClient().fetchX509(socketPath: "/nonexistent/sigil/agent.sock")
        }
        #expect(error?.code == .unavailable)
        #expect(error?.message.contains("is the Sigil agent running?") == true)
        #expect(try WorkloadAPIClient.socketPath(fromEndpoint: "unix:///run/sigil/agent.sock") == "/run/sigil/agent.sock")
        #expect(try WorkloadAPIClient.socketPath(fromEndpoint: "/run/a.sock") == "/run/a.sock")
        #expect(throws: WorkloadAPIError.self) { try WorkloadAPIClient.socketPath(fromEndpoint: "tcp://127.0.0.1:1") }
    }

    @Test("Endpoint addresses: unix: forms give their path; a host, query, fragment or relative path is refused by name")
    func endpointAddresses() throws {
        #expect(try WorkloadAPIClient.socketPath(fromEndpoint: "unix:/run/a.sock") == "/run/a.sock")
        #expect(try WorkloadAPIClient.socketPath(fromEndpoint: "unix:///run/sigil/agent.sock") == "/run/sigil/agent.sock")
        let refusals: [(String, String)] = [
            ("unix://agent-host/run/a.sock", "names a host"),
            ("unix:run/a.sock", "relative path"),
            ("unix:///run/a.sock?x=1", "query or fragment"),
            ("unix:///run/a.sock#f", "query or fragment"),
            ("tcp://127.0.0.1:8081", "TCP address"),
            ("agent.sock", "neither a unix: address nor an absolute path"),
        ]
        for (endpoint, why) in refusals {
            let error = #expect(throws: WorkloadAPIError.self) { try WorkloadAPIClient.socketPath(fromEndpoint: endpoint) }
            #expect(error?.code == .invalidArgument)
            #expect(error?.message.contains(why) == true, "\(endpoint): \(error?.message ?? "no error")")
        }
    }
}

// MARK: - Units

@Suite("Workload API caller attestation")
struct CallerAttestationTests {
    func headers(_ payload: HTTP2Frame.FramePayload?) -> [(String, String)] {
        guard case .headers(let headers) = payload else { return [] }
        return headers.headers.map { ($0.name, $0.value) }
    }

    @Test("The injector strips every reserved header (any case, -bin, duplicates, trailers) and injects once")
    func injectorStripsAndInjects() throws {
        let channel = EmbeddedChannel(handler: CallerMetadataInjector(injecting: [("x-sigil-caller-selectors", "unix:uid:0"), ("x-sigil-caller-pid", "7")]))
        let request = HPACKHeaders([
            (":method", "POST"),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            ("workload.spiffe.io", "true"),
            ("x-sigil-caller-selectors", "unix:uid:4242"),
            ("x-sigil-caller-selectors", "unix:uid:4243"),
            ("X-SIGIL-CALLER-SELECTORS", "unix:uid:4242"),
            ("X-Sigil-Caller-Pid", "1"),
            ("x-sigil-caller-selectors-bin", "dW5peDp1aWQ6NDI0Mg=="),
            ("x-sigil-caller-error", "nope"),
            ("x-sigil-callerx", "kept: not the reserved prefix"),
        ])
        try channel.writeInbound(HTTP2Frame.FramePayload.headers(.init(headers: request)))
        let first = headers(try channel.readInbound(as: HTTP2Frame.FramePayload.self))
        #expect(first.filter { CallerMetadata.isReserved($0.0) }.map { "\($0.0)=\($0.1)" } == ["x-sigil-caller-selectors=unix:uid:0", "x-sigil-caller-pid=7"])
        #expect(first.contains { $0.0 == "workload.spiffe.io" && $0.1 == "true" })
        #expect(first.contains { $0.0 == "x-sigil-callerx" })
        #expect(first.first?.0 == ":method")

        try channel.writeInbound(HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(ByteBuffer()))))
        guard case .data = try channel.readInbound(as: HTTP2Frame.FramePayload.self) else {
            Issue.record("DATA frames must pass through")
            return
        }

        let trailers = HPACKHeaders([("X-SIGIL-CALLER-SELECTORS", "unix:uid:4242"), ("grpc-status", "0")])
        try channel.writeInbound(HTTP2Frame.FramePayload.headers(.init(headers: trailers, endStream: true)))
        let second = headers(try channel.readInbound(as: HTTP2Frame.FramePayload.self))
        #expect(second.map(\.0) == ["grpc-status"])
        _ = try channel.finish()
    }

    @Test("A strip-only injector adds nothing, so the handler denies")
    func stripOnly() throws {
        let channel = EmbeddedChannel(handler: CallerMetadataInjector(injecting: []))
        try channel.writeInbound(HTTP2Frame.FramePayload.headers(.init(headers: HPACKHeaders([("x-sigil-caller-selectors", "unix:uid:0")]))))
        #expect(headers(try channel.readInbound(as: HTTP2Frame.FramePayload.self)).isEmpty)
        _ = try channel.finish()

        let error = #expect(throws: RPCError.self) {
            _ = try WorkloadAPIService.caller(from: ["workload.spiffe.io": "true"])
        }
        #expect(error?.code == .permissionDenied)
    }

    @Test("Selectors are encoded so that a path with a comma cannot smuggle a selector")
    func selectorEncoding() throws {
        let attestation = WorkloadAttestation(
            credentials: PeerCredentials(pid: 9, uid: 1000, gid: 1000),
            selectors: ["unix:uid:1000", "unix:path:/tmp/x,unix:uid:0", "unix:path:/tmp/sp ace/%41/é"]
        )
        var metadata: Metadata = [:]
        for (name, value) in CallerMetadata.headers(for: attestation) { metadata.addString(value, forKey: name) }
        let caller = try WorkloadAPIService.caller(from: metadata)
        #expect(caller.selectors == Set(attestation.selectors))
        #expect(!caller.selectors.contains("unix:uid:0"))
        #expect(caller.pid == "9")

        let denied = WorkloadAPIService.caller
        let error = #expect(throws: RPCError.self) {
            _ = try denied(["x-sigil-caller-error": .string(CallerMetadata.encode("workload attestation failed: gone"))])
        }
        #expect(error?.message == "workload attestation failed: gone")
    }

    @Test("The Unix attestor reads this process and refuses PID reuse and uid mismatches")
    func unixAttestor() throws {
        let attestor = UnixWorkloadAttestor()
        let me = PeerCredentials(pid: getpid(), uid: geteuid(), gid: getegid())
        let attestation = try attestor.attest(me, acceptedAt: BootTime.now())
        #expect(attestation.selectors.contains(realUID))
        #expect(attestation.selectors.contains("unix:gid:\(getegid())"))
        #expect(attestation.selectors.contains { $0.hasPrefix("unix:path:/") })
        #expect(attestation.selectors == attestation.selectors.sorted())

        // The process started long after "the connection was accepted" (boot time 0): PID reuse.
        let reused = #expect(throws: WorkloadAPIError.self) {
            _ = try attestor.attest(me, acceptedAt: BootTime(nanoseconds: 0))
        }
        #expect(reused?.code == .permissionDenied)
        #expect(reused?.message.contains("PID was reused") == true)

        let mismatch = #expect(throws: WorkloadAPIError.self) {
            _ = try attestor.attest(PeerCredentials(pid: getpid(), uid: geteuid() &+ 4242, gid: getegid()))
        }
        #expect(mismatch?.message.contains("real uid") == true)

        #expect(throws: WorkloadAPIError.self) {
            _ = try attestor.attest(PeerCredentials(pid: 0, uid: 0, gid: 0))
        }
        #expect(throws: WorkloadAPIError.self) {
            _ = try attestor.attest(PeerCredentials(pid: Int32.max, uid: 0, gid: 0))
        }
    }

    @Test("procfs parsers: a command name with spaces and parentheses")
    func procParsers() {
        let stat = "1234 (evil) 1 2 3) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 18446744073709551615"
        #expect(ProcStat.startTime(stat) == 987654)
        let status = ProcStatus("Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 \n")
        #expect(status.realUID == 1000)
        #expect(status.supplementaryGIDs == [4, 24, 27])
    }
}
