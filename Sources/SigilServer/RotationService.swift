import Foundation
import Logging
import ServiceLifecycle
import SigilCA
import SigilCore
import SigilStore

/// Rotates the signing intermediate on schedule (``RotationSchedule``: prepare at ½ life, activate
/// at ⅚, remove an old one after its last SVID expired), and picks up rotations made outside the
/// server (`sigil ca rotate` on the same data directory). Checks every 1/200 of the active
/// intermediate's life (between 1 s and 60 s); bundle changes reach every agent at once.
struct RotationService: Service {
    let core: ServerCore
    let schedule: RotationSchedule

    func run() async throws {
        await cancelWhenGracefulShutdown {
            var warned = false
            while !Task.isCancelled {
                do {
                    let switched = try await core.ca.reload()
                    let steps = try await core.ca.rotateIfDue(schedule)
                    for step in steps { core.logger.info("CA rotation", metadata: ["step": "\(step)"]) }
                    if switched || !steps.isEmpty { try await core.refreshBundle() }
                    warned = false
                } catch let error as CAError where error.code == .invalidUpstream {
                    if !warned { core.logger.warning("the signing intermediate is due for rotation: \(error.message)") }
                    warned = true
                } catch {
                    core.logger.error("CA rotation check failed; retrying", metadata: ["error": "\(error)"])
                }
                try? await Task.sleep(for: await interval())
            }
        }
    }

    func interval() async -> Duration {
        guard let status = try? await core.ca.status(),
              let active = status.first(where: { $0.record.kind == .intermediate && $0.record.state == .active })?.record else {
            return .seconds(60)
        }
        let life = active.notAfter.timeIntervalSince(active.notBefore)
        return .milliseconds(Int64(min(60_000, max(1_000, life * 1000 / 200))))
    }
}
