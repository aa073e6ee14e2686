import Foundation
import Logging
import ServiceLifecycle
import SigilCA
import SigilCore
import SigilStore

/// Rotates the signing intermediate on schedule (``RotationSchedule``: prepare at ½ life, activate
/// at ⅚, remove an old one after its last SVID expired), and picks up rotations made outside the
/// server (`sigil ca rotate|taint|revoke|retire` on the same data directory). Checks every 1/200
/// of the active intermediate's life, between 1 s and 5 s (a few small reads; the issued
/// certificates are scanned only while an old authority waits to go); bundle and taint changes
/// reach every agent at once.
struct RotationService: Service {
    let core: ServerCore
    let schedule: RotationSchedule
    /// Re-issues the server's own SVID (after a switch, so that it chains to the active authorities).
    let renewServerSVID: @Sendable () async -> Void

    func run() async throws {
        await cancelWhenGracefulShutdown {
            var warned = false
            var rootWarnedAt: ContinuousClock.Instant?
            while !Task.isCancelled {
                // The root is not rotated on a schedule (its successor must reach every agent
                // first: `sigil ca rotate --root`): say so, hourly, in its last tenth of life.
                if let warning = await rootExpiryWarning(now: core.clock.now),
                   rootWarnedAt.map({ ContinuousClock.now - $0 >= .seconds(3600) }) ?? true {
                    core.logger.warning("\(warning)")
                    rootWarnedAt = ContinuousClock.now
                }
                do {
                    // Bundle and taint changes may come from `sigil ca` commands on the data directory too.
                    try await core.refreshBundle()
                    try await core.refreshTainted()
                    let switched = try await core.ca.reload()
                    let steps = try await core.ca.rotateIfDue(schedule)
                    for step in steps { core.logger.info("CA rotation", metadata: ["step": "\(step)"]) }
                    try await core.refreshBundle()
                    if switched || steps.contains(where: { if case .activateRoot = $0 { true } else { false } }) {
                        await renewServerSVID()
                    }
                    warned = false
                } catch let error as CAError where error.code == .invalidUpstream {
                    if !warned { core.logger.warning("the signing intermediate is due for rotation: \(error.message)") }
                    warned = true
                } catch {
                    core.logger.error("CA rotation check failed; retrying at the next check (see `sigil ca status`)", metadata: ["error": "\(error)"])
                }
                // Between checks, notice `sigil ca` commands on the data directory within 250 ms.
                let next = ContinuousClock.now + (await interval())
                let seen = try? await core.store.authorityVersion()
                while ContinuousClock.now < next, !Task.isCancelled {
                    try? await Task.sleep(for: .milliseconds(250))
                    if let now = try? await core.store.authorityVersion(), now != seen { break }
                }
            }
        }
    }

    /// A warning when the active root (of a CA that made its own) is in its last 30 days (or its
    /// last tenth of life, if shorter) with no successor prepared; nil otherwise.
    func rootExpiryWarning(now: Date) async -> String? {
        guard let authorities = try? await core.store.authorities(),
              let root = authorities.first(where: { $0.kind == .root && $0.state == .active }),
              !authorities.contains(where: { $0.kind == .root && $0.state == .prepared }) else { return nil }
        let left = root.notAfter.timeIntervalSince(now)
        let life = root.notAfter.timeIntervalSince(root.notBefore)
        guard left < min(life / 10, 30 * 86_400) else { return nil }
        if left <= 0 {
            return "the trust root \(root.id) expired at \(root.notAfter): no SVID verifies any more; see docs/operations.md, \"Root expiry\""
        }
        return "the trust root \(root.id) expires at \(root.notAfter) and no successor is prepared: run `sigil ca rotate --root` now (its new root must reach every agent before the switch)"
    }

    func interval() async -> Duration {
        guard let authorities = try? await core.store.authorities(),
              let active = authorities.first(where: { $0.kind == .intermediate && $0.state == .active }) else {
            return .seconds(60)
        }
        // A root rotation waiting on the readiness gate: check every second, so that the switch
        // follows the last agent's confirmation at once.
        if CertificateAuthority.pendingSwitch(authorities) != nil { return .seconds(1) }
        let life = active.notAfter.timeIntervalSince(active.notBefore)
        return .milliseconds(Int64(min(5_000, max(1_000, life * 1000 / 200))))
    }
}
