public import SigilCore
public import SigilCA
public import SigilStore
public import Logging
import X509
import Crypto
import NIOConcurrencyHelpers
import Foundation

/// What the server's services share: the CA, the store, the change hub, the clock.
public final class ServerCore: Sendable {
    public let ca: CertificateAuthority
    public let store: any Datastore
    public let trustDomain: TrustDomain
    public let clock: any SigilClock
    public let logger: Logger
    public let agentSVIDTTL: Duration
    let hub = ChangeHub()
    /// Whether the datastore takes writes (logged once as it starts failing and once as it recovers).
    let storeHealth: StoreHealth
    private let bundleBox: NIOLockedValueBox<TrustBundle>
    private let jwtKeyBox: NIOLockedValueBox<JWTSigningKey?> = NIOLockedValueBox(nil)
    /// Lifetime of JWT-SVIDs (SPIRE's default): short, as bearer tokens should be.
    public static let jwtSVIDTTL: Duration = .seconds(300)
    private let jwtKeysBox: NIOLockedValueBox<[UInt8]>

    public init(ca: CertificateAuthority, store: any Datastore, bundle: TrustBundle, clock: any SigilClock, logger: Logger, agentSVIDTTL: Duration) {
        self.ca = ca
        self.store = store
        self.trustDomain = ca.trustDomain
        self.clock = clock
        self.logger = logger
        self.agentSVIDTTL = agentSVIDTTL
        self.storeHealth = StoreHealth(logger: logger)
        self.bundleBox = NIOLockedValueBox(bundle)
        self.jwtKeysBox = NIOLockedValueBox(Array(#"{"keys":[]}"#.utf8))
    }

    /// The trust bundle as of now.
    public var bundle: TrustBundle { bundleBox.withLockedValue { $0 } }

    /// Tainted authorities (`sigil ca taint`): every agent re-issues what chains to them.
    private let taintedBox = NIOLockedValueBox<[String]>([])
    public var tainted: [String] { taintedBox.withLockedValue { $0 } }

    /// Re-reads the tainted authorities and, if they changed, tells every Sync stream.
    func refreshTainted() async throws {
        let fresh = try await store.taintedAuthorities()
        let changed = taintedBox.withLockedValue { current -> Bool in
            defer { current = fresh }
            return current != fresh
        }
        if changed { await hub.notifyAll() }
    }

    /// The JWT signing keys (JWK Set JSON) as of now.
    public var jwtKeysJSON: [UInt8] { jwtKeysBox.withLockedValue { $0 } }

    /// The key JWT-SVIDs are signed with, published in the JWT bundle.
    var jwtKey: JWTSigningKey? { jwtKeyBox.withLockedValue { $0 } }

    func setJWTKey(_ key: JWTSigningKey) throws {
        var bundle = JWTBundle(trustDomain: trustDomain)
        try bundle.add(key)
        let json = bundle.jwksJSON()
        jwtKeyBox.withLockedValue { $0 = key }
        jwtKeysBox.withLockedValue { $0 = json }
    }

    /// Re-reads the bundle from the CA and, if it changed, tells every Sync stream.
    public func refreshBundle() async throws {
        let fresh = try await ca.bundle()
        let changed = bundleBox.withLockedValue { current -> Bool in
            defer { current = fresh }
            return current != fresh
        }
        if changed { await hub.notifyAll() }
    }

    /// The ID agents are named with: `spiffe://<td>/sigil/agent/<name>`. Accepts a full ID or a name.
    public func agentID(from text: String) throws(SigilError) -> SpiffeID {
        let id = text.hasPrefix(SpiffeID.scheme) ? try SpiffeID(text) : try SpiffeID(trustDomain: trustDomain, path: "/sigil/agent/" + text)
        guard id.trustDomain == trustDomain else {
            throw SigilError(.invalidSpiffeID, "agent ID '\(id)' is not in trust domain '\(trustDomain)'")
        }
        guard id.path.hasPrefix("/sigil/agent/") else {
            throw SigilError(.invalidSpiffeID, "agent ID '\(id)' must be under spiffe://\(trustDomain)/sigil/agent/ (or give just a name)")
        }
        return id
    }

    /// SHA-256 of a join token, the only form the store keeps.
    static func tokenHash(_ token: String) -> String {
        hex(SHA256.hash(data: Array(token.utf8)))
    }

    /// A new random join token: 32 bytes, hex.
    static func newToken() -> String {
        randomHex(byteCount: 32)
    }
}
