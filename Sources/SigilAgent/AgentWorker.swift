import Logging
import SigilCore
import SigilRPC
import SigilTLS
import GRPCCore
import GRPCNIOTransportHTTP2
import ServiceLifecycle
import X509
import SwiftASN1
import Crypto
import Synchronization
import Foundation

/// The agent's three loops, run together: entry sync (pushed by the server), SVID reconciliation
/// (sign what is missing or due, in batches), and the agent's own SVID renewal.
final class AgentWorker: Service, Sendable {
    let client: SigilAgentAPI.Client<HTTP2ClientTransport.Posix>
    let state: AgentState
    let cache: AgentCache
    let reloader: SVIDCertificateReloader
    let bundleBox: LockedBox<TrustBundle>
    let identity: LockedBox<AgentCache.AgentIdentity>
    let trustDomain: TrustDomain
    let renewFraction: Double
    let logger: Logger
    let wakeup = Wakeup()
    private let failureBox = LockedBox<AgentError?>(nil)
    /// Set when the server taints an authority this agent's own SVID chains to.
    private let renewOwnSVIDNow = LockedBox(false)
    /// Why the renewed agent SVID cannot be saved, while it cannot.
    private let identitySaveFailure = LockedBox<String?>(nil)
    /// Entries the server refused: not retried for a minute (or until the entry changes), so a
    /// refusal neither hot-loops nor, if it was transient, blocks renewal for good.
    private let refused = LockedBox<[String: (revision: Int64, until: Date)]>([:])

    static let batchSize = 100
    /// The agent's own SVID renewal: first retry after a failure (doubling to 5 s).
    static let firstRenewalRetry: Duration = .milliseconds(500)

    init(client: SigilAgentAPI.Client<HTTP2ClientTransport.Posix>, state: AgentState, cache: AgentCache, reloader: SVIDCertificateReloader,
         bundleBox: LockedBox<TrustBundle>, identity: LockedBox<AgentCache.AgentIdentity>, trustDomain: TrustDomain, renewFraction: Double, logger: Logger) {
        self.client = client
        self.state = state
        self.cache = cache
        self.reloader = reloader
        self.bundleBox = bundleBox
        self.identity = identity
        self.trustDomain = trustDomain
        self.renewFraction = renewFraction
        self.logger = logger
    }

    var failure: AgentError? { failureBox.withLock { $0 } }

    func run() async throws {
        try await cancelWhenGracefulShutdown {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await self.syncLoop() }
                group.addTask { await self.reconcileLoop() }
                group.addTask { await self.agentRenewalLoop() }
                // The first loop to end (eviction) ends the agent.
                try await group.next()
                group.cancelAll()
            }
        }
    }

    // MARK: sync

    func syncLoop() async throws {
        var backoff: Duration = .milliseconds(250)
        while !Task.isCancelled {
            do {
                try await client.sync(SigilSyncRequest()) { response in
                    for try await update in response.messages {
                        await self.apply(update)
                    }
                }
                backoff = .milliseconds(250)
            } catch let error as RPCError where error.code == .permissionDenied {
                // Evicted or unknown: final.
                let message = "the server refused this agent: \(error.message)"
                logger.error("\(message)")
                failureBox.withLock { $0 = AgentError(message) }
                return
            } catch {
                if Task.isCancelled { return }
                if identity.value.notAfter <= Date() {
                    let message = identitySaveFailure.withLock { $0 }.map {
                        "this agent's own SVID expired at \(identity.value.notAfter): \($0) (a full disk?); free space there and restart the agent with a new --join-token (sigil token create --agent-id <name>)"
                    } ?? "this agent's own SVID expired at \(identity.value.notAfter) while the server was unreachable; restart it with a new --join-token (sigil token create --agent-id <name>)"
                    logger.error("\(message)")
                    failureBox.withLock { $0 = AgentError(message) }
                    return
                }
                if let rpc = error as? RPCError, rpc.code == .unauthenticated {
                    // The connection presented an SVID the server no longer accepts (a stale one
                    // from before a renewal); the next connection carries the current one.
                    logger.warning("the server did not accept the certificate this connection presented; retrying", metadata: ["error": "\(rpc.message)"])
                } else {
                    logger.warning("server unreachable; serving workloads from cache", metadata: ["error": "\(error)"])
                }
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(5))
            }
        }
    }

    func apply(_ update: SigilSyncUpdate) async {
        let entries = update.entries.map {
            AgentEntry(id: $0.id, spiffeID: $0.spiffeID, selectors: $0.selectors, ttlSeconds: $0.ttlSeconds, dnsNames: $0.dnsNames, revision: $0.revision)
        }
        let roots = update.bundle.map { Array($0) }
        let parsed = roots.compactMap { try? Certificate(derEncoded: $0) }
        var bundleApplied = false
        if parsed.count == roots.count, let bundle = try? TrustBundle(trustDomain: trustDomain, authorities: parsed), !bundle.authorities.isEmpty {
            bundleBox.withLock { $0 = bundle }
            bundleApplied = true
        } else {
            logger.error("the server sent a trust bundle this agent cannot use; keeping the one it has and not confirming it",
                         metadata: ["bundle_sequence": "\(update.bundleSequence)"])
        }
        await state.apply(entries: entries, bundleRoots: roots, bundleSequence: update.bundleSequence, jwtKeysJSON: Array(update.jwtBundle))
        logger.debug("synced", metadata: ["entries": "\(entries.count)", "bundle_sequence": "\(update.bundleSequence)"])
        let tainted = Set(update.taintedAuthorities)
        if await state.taint(tainted, now: Date()) > 0 {
            logger.info("re-issuing SVIDs that chain to a tainted authority", metadata: ["tainted": "\(tainted.sorted())"])
        }
        if AgentState.chains(identity.value.chainDER, toAny: tainted) { renewOwnSVIDNow.withLock { $0 = true } }
        await persist()
        wakeup.fire()
        // The bundle is held and served: tell the server (the readiness gate of a root rotation).
        guard bundleApplied else { return }
        var confirm = SigilConfirmBundleRequest()
        confirm.bundleSequence = update.bundleSequence
        var options = CallOptions.defaults
        options.timeout = .seconds(10)
        do {
            _ = try await client.confirmBundle(confirm, options: options)
        } catch {
            logger.warning("cannot confirm the bundle to the server (a root rotation waits for it); sent again with the next update", metadata: ["error": "\(error)"])
        }
    }

    // MARK: workload SVIDs

    func reconcileLoop() async {
        var backoff: Duration = .milliseconds(250)
        while !Task.isCancelled {
            let now = Date()
            let refusedNow = refused.withLock { $0 }
            let due = await state.due(at: now).filter { entry in
                guard let mark = refusedNow[entry.id] else { return true }
                return mark.revision != entry.revision || mark.until <= now
            }
            if !due.isEmpty {
                do {
                    for start in stride(from: 0, to: due.count, by: Self.batchSize) {
                        try await sign(Array(due[start..<min(start + Self.batchSize, due.count)]))
                    }
                    backoff = .milliseconds(250)
                    await persist()
                } catch {
                    logger.warning("cannot get SVIDs signed; retrying", metadata: ["error": "\(error)", "pending": "\(due.count)"])
                    await wakeup.wait(upTo: backoff)
                    backoff = min(backoff * 2, .seconds(5))
                    continue
                }
            }
            let next = await state.nextRenewal() ?? now.addingTimeInterval(3600)
            let wait = max(0.05, next.timeIntervalSinceNow)
            await wakeup.wait(upTo: .milliseconds(Int64(min(wait, 3600) * 1000)))
        }
    }

    /// Makes a key per entry here, sends the CSRs in one batch, and stores what comes back.
    func sign(_ entries: [AgentEntry]) async throws {
        var keys: [String: P256.Signing.PrivateKey] = [:]
        var request = SigilSignX509SVIDsRequest()
        for entry in entries {
            let key = P256.Signing.PrivateKey()
            keys[entry.id] = key
            var item = SigilSVIDRequest()
            item.entryID = entry.id
            item.csr = Data(try KeyMaterial.csr(key: key))
            request.requests.append(item)
        }
        var options = CallOptions.defaults
        options.timeout = .seconds(30)
        let response = try await client.signX509SVIDs(request, options: options)
        // Lifetimes count from receipt: notBefore is backdated for clock skew, and counting from it
        // would make short-lived SVIDs look half-spent on arrival.
        let receivedAt = Date()
        let byID = Dictionary(uniqueKeysWithValues: entries.map { ($0.id, $0) })
        for result in response.results {
            guard let entry = byID[result.entryID], let key = keys[result.entryID] else { continue }
            if !result.error.isEmpty {
                logger.error("server refused an SVID", metadata: ["spiffe_id": "\(entry.spiffeID)", "error": "\(result.error)"])
                refused.withLock { $0[entry.id] = (entry.revision, Date().addingTimeInterval(60)) }
                continue
            }
            let chain = result.svidChain.map { Array($0) }
            guard let first = chain.first, let leaf = try? Certificate(derEncoded: first) else { continue }
            let held = HeldSVID(entryID: entry.id, spiffeID: entry.spiffeID, chainDER: chain, keyPKCS8DER: Array(key.derRepresentation),
                                serial: leaf.serialHex, notBefore: leaf.notValidBefore, notAfter: leaf.notValidAfter,
                                renewAt: renewalTime(notBefore: max(leaf.notValidBefore, receivedAt), notAfter: leaf.notValidAfter), entryRevision: entry.revision)
            await state.store(held)
            logger.info("SVID issued", metadata: ["spiffe_id": "\(entry.spiffeID)", "serial": "\(held.serial)"])
        }
    }

    /// ½ of the life (renewFraction), ± 5 % jitter so a fleet does not renew in lockstep.
    func renewalTime(notBefore: Date, notAfter: Date) -> Date {
        let life = notAfter.timeIntervalSince(notBefore)
        let jitter = Double.random(in: -0.05...0.05) * life
        return notBefore.addingTimeInterval(life * renewFraction + jitter)
    }

    // MARK: the agent's own SVID

    /// Renews the agent's own SVID at ½ its life (or at once after a taint).
    ///
    /// A renewed SVID goes to disk before it is used: the server makes it the agent's only one once
    /// it is used, so an agent that used one it could not keep would need a new join token after a
    /// restart. When the save fails (a full disk) the renewed SVID is held in memory and only the
    /// save is retried (the server is not asked to sign again); the current SVID stays in use until
    /// the last stretch of its life (``AgentSVIDTimes/switchAt``), then the renewed one takes over
    /// rather than the agent dying with an expired SVID.
    func agentRenewalLoop() async {
        var retry = Self.firstRenewalRetry
        var unsaved: UnsavedAgentSVID?
        // A taint asked for a new SVID: one that cannot be saved is used at once, not near the end
        // of the tainted one's life.
        var urgent = false
        while !Task.isCancelled {
            if var held = unsaved {
                let current = identity.withLock { $0 }
                if saveUnsaved(&held, current: current, urgent: urgent) {
                    unsaved = nil
                    urgent = false
                    retry = Self.firstRenewalRetry
                    continue
                }
                unsaved = held
                if !held.inUse {
                    // The current SVID is still in use: nothing to renew, only the save to retry,
                    // unless a taint asks for a new SVID now.
                    if renewOwnSVIDNow.withLock({ $0 }) {
                        unsaved = nil
                        identitySaveFailure.withLock { $0 = nil }  // a later failure is the renewal's own
                    } else {
                        let untilSwitch = AgentSVIDTimes(current).switchAt.timeIntervalSinceNow
                        try? await Task.sleep(for: .milliseconds(Int64(max(0.05, min(untilSwitch, Self.saveRetry)) * 1000)))
                        continue
                    }
                }
            }
            // Read again: the save above may have switched to the renewed SVID.
            let current = identity.withLock { $0 }
            let times = AgentSVIDTimes(current)
            let wait = renewalTime(notBefore: times.start, notAfter: times.notAfter).timeIntervalSinceNow
            if wait > 0, !renewOwnSVIDNow.withLock({ $0 }) {
                // Short naps: a taint of the authority behind this SVID renews it at once (and an
                // unsaved SVID in use gets its save retried).
                try? await Task.sleep(for: .milliseconds(Int64(min(wait, 1) * 1000)))
                continue
            }
            if renewOwnSVIDNow.withLock({ tainted in defer { tainted = false }; return tainted }) { urgent = true }
            do {
                let key = P256.Signing.PrivateKey()
                var request = SigilRenewAgentRequest()
                request.csr = Data(try KeyMaterial.csr(key: key))
                // A deadline: a call stuck on a dying connection must not outlast the SVID it renews.
                var options = CallOptions.defaults
                options.timeout = .seconds(5)
                let response = try await client.renewAgent(request, options: options)
                let chain = response.svidChain.map { Array($0) }
                guard let first = chain.first, let leaf = try? Certificate(derEncoded: first) else {
                    logger.warning("the server's renewal answer holds no agent SVID; retrying")
                    try? await Task.sleep(for: .seconds(2))
                    continue
                }
                let renewed = AgentCache.AgentIdentity(agentID: current.agentID, chainDER: chain, keyPKCS8DER: Array(key.derRepresentation),
                                                       notAfter: leaf.notValidAfter, trustDomain: current.trustDomain, receivedAt: Date())
                // On disk first (see above); if that fails, held in memory and the save retried.
                var held = UnsavedAgentSVID(identity: renewed, serial: leaf.serialHex)
                if !saveUnsaved(&held, current: current, urgent: urgent) { unsaved = held; continue }
                unsaved = nil
                urgent = false
                retry = Self.firstRenewalRetry
            } catch {
                // Soon at first (a short-lived agent SVID leaves little time between half its life
                // and its end), then backing off with jitter so a fleet does not retry in step.
                let wait = retry * Double.random(in: 0.8...1.2)
                logger.warning("agent SVID renewal failed; retrying", metadata: ["error": "\(error)", "retry_in": "\(wait)"])
                try? await Task.sleep(for: wait)
                retry = min(retry * 2, .seconds(5))
            }
        }
    }

    /// How often a renewed agent SVID that could not be saved is saved again.
    static let saveRetry: TimeInterval = 2
    /// How often the failing save is logged again (its start and its end are always logged).
    static let saveFailureLogInterval: TimeInterval = 60

    /// A renewed agent SVID the server signed that is not on disk yet.
    struct UnsavedAgentSVID {
        var identity: AgentCache.AgentIdentity
        var serial: String
        /// Whether it is in use (the SVID before it came close to its end first).
        var inUse = false
        var lastLogged: Date?
        var lastUseFailureLogged: Date?
    }

    /// Saves `held`; on success makes it the agent's SVID (if it is not already) and returns true.
    /// On failure logs (at most once a minute), switches to it once `current` is close to its end,
    /// and returns false.
    private func saveUnsaved(_ held: inout UnsavedAgentSVID, current: AgentCache.AgentIdentity, urgent: Bool = false) -> Bool {
        let now = Date()
        do {
            try cache.saveIdentity(held.identity)
        } catch {
            let failure = "cannot save the renewed agent SVID to --data-dir '\(cache.directory)': \(error.message)"
            identitySaveFailure.withLock { $0 = failure }
            if held.lastLogged.map({ now.timeIntervalSince($0) >= Self.saveFailureLogInterval }) ?? true {
                held.lastLogged = now
                logger.error(held.inUse
                    ? "\(failure); running on that SVID, held in memory only, and retrying the save: restarting this agent before the directory has space would need a new --join-token"
                    : "\(failure); keeping the current one in use (until \(AgentSVIDTimes(current).switchAt)), holding the renewed one in memory and retrying the save",
                    metadata: ["serial": "\(held.serial)"])
            }
            if !held.inUse, urgent || now >= AgentSVIDTimes(current).switchAt {
                do {
                    try use(held.identity)
                    held.inUse = true
                    held.lastLogged = now
                    logger.error("this agent's SVID expires at \(current.notAfter) and its renewal is still not saved (\(error.message)): now using the renewed SVID, which is held in memory only; restarting this agent before --data-dir '\(cache.directory)' has space would need a new --join-token",
                                 metadata: ["serial": "\(held.serial)", "not_after": "\(held.identity.notAfter)"])
                } catch {
                    if held.lastUseFailureLogged.map({ now.timeIntervalSince($0) >= Self.saveFailureLogInterval }) ?? true {
                        held.lastUseFailureLogged = now
                        logger.error("cannot use the renewed agent SVID: \(error)")
                    }
                }
            }
            return false
        }
        let wasFailing = identitySaveFailure.withLock { failing in
            defer { failing = nil }
            return failing != nil
        }
        if held.inUse {
            logger.notice("the agent SVID in use is saved now: a restart needs no join token", metadata: ["serial": "\(held.serial)"])
            return true
        }
        do {
            try use(held.identity)
        } catch {
            // Cannot happen with a chain and key the server just accepted; the saved one is used at
            // the next start.
            logger.error("cannot use the renewed agent SVID: \(error)")
            return true
        }
        if wasFailing { logger.notice("the renewed agent SVID is saved now", metadata: ["serial": "\(held.serial)"]) }
        logger.info("agent SVID renewed", metadata: ["agent_id": "\(held.identity.agentID)", "serial": "\(held.serial)"])
        return true
    }

    /// Serves `renewed` to the next handshakes and makes it the agent's SVID.
    private func use(_ renewed: AgentCache.AgentIdentity) throws {
        try reloader.update(chainDER: renewed.chainDER, keyPKCS8DER: renewed.keyPKCS8DER)
        identity.withLock { $0 = renewed }
    }

    func persist() async {
        let snapshot = await state.snapshotForCache(agentID: identity.withLock { $0.agentID })
        do {
            try cache.saveSnapshot(snapshot)
        } catch {
            logger.error("cannot write the agent cache: \(error.message)")
        }
    }
}

/// The times of the agent's own SVID that its renewal loop keeps to.
struct AgentSVIDTimes: Sendable, Equatable {
    /// Where its life is counted from: its receipt (notBefore is backdated for clock skew).
    var start: Date
    var notAfter: Date

    init(start: Date, notAfter: Date) {
        self.start = start
        self.notAfter = notAfter
    }

    init(_ identity: AgentCache.AgentIdentity) {
        // No readable leaf: due at once, as if its life were spent.
        guard let leaf = identity.chainDER.first.flatMap({ try? Certificate(derEncoded: $0) }) else {
            self.init(start: .distantPast, notAfter: identity.notAfter)
            return
        }
        self.init(start: max(leaf.notValidBefore, identity.receivedAt ?? leaf.notValidBefore), notAfter: leaf.notValidAfter)
    }

    /// The latest moment to keep using this SVID while a renewed one waits to be saved: the last
    /// 10 % of its life, at least 30 s before its end (at most its second half), so the renewed
    /// one is in use, and every new connection carries it, before this one expires.
    var switchAt: Date {
        let life = max(0, notAfter.timeIntervalSince(start))
        let margin = min(max(life * 0.1, 30), life / 2)
        return notAfter.addingTimeInterval(-margin)
    }
}
