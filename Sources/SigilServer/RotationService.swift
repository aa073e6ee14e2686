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
            while !Task.isCancelled {
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
