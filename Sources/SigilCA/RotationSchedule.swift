public import Foundation
public import SigilStore

/// When the server rotates its authorities, as a pure function of the authorities, how their
/// SVIDs stand, the readiness gate and the time: prepare the next intermediate at ½ of the active
/// one's life, activate it at ⅚, remove an old one only once the last SVID it signed has expired
/// (until then its SVIDs still chain through it to the root); activate a prepared root only when
/// every live agent has confirmed the bundle that publishes it, and take an old root out of the
/// bundle only when every intermediate under it is gone.
public struct RotationSchedule: Sendable, Hashable {
    public var prepareAt: Double
    public var activateAt: Double

    public init(prepareAt: Double = 1.0 / 2.0, activateAt: Double = 5.0 / 6.0) {
        self.prepareAt = prepareAt
        self.activateAt = activateAt
    }

    public enum Step: Sendable, Hashable {
        /// Make the next intermediate, signed by the active one's parent.
        case prepare(replacing: String)
        case activate(String)
        /// Switch trust: make a prepared intermediate under a new parent (a new root, or a new
        /// upstream CA, already in every agent's bundle) and its prepared ancestors active.
        case activateRoot(String, intermediate: String)
        case remove(String)
    }

    /// What is due at `now`. `unconfirmedAgents` counts the live agents that have not confirmed
    /// the current bundle: a prepared root is activated only when it is zero (the readiness gate).
    public func steps(_ authorities: [AuthorityRecord], usage: [String: AuthorityUsage], now: Date, unconfirmedAgents: Int = 0) -> [Step] {
        let intermediates = authorities.filter { $0.kind == .intermediate }
        let current = intermediates.first { $0.state == .active }
        var steps: [Step] = []
        // A switch of trust (a new root, or a new upstream CA): an intermediate prepared under
        // another parent than the signing one's. It waits for the readiness gate.
        if let pending = intermediates.first(where: { $0.state == .prepared && $0.parentID != current?.parentID }), unconfirmedAgents == 0 {
            steps.append(.activateRoot(pending.parentID ?? pending.id, intermediate: pending.id))
        } else if let active = current {
            // While a switch waits for the gate, the signing intermediate keeps its own schedule
            // (an agent that never confirms must not let it expire).
            // Its life as made (notBefore is backdated for clock skew; the schedule is not).
            let born = max(active.notBefore, min(active.createdAt, active.notAfter))
            let life = active.notAfter.timeIntervalSince(born)
            let prepared = intermediates.filter { $0.state == .prepared && $0.parentID == active.parentID }
            if prepared.isEmpty, now >= born.addingTimeInterval(life * prepareAt) {
                steps.append(.prepare(replacing: active.id))
            } else if let next = prepared.max(by: { $0.createdAt < $1.createdAt }), now >= born.addingTimeInterval(life * activateAt) {
                steps.append(.activate(next.id))
            }
        }
        for old in intermediates where old.state == .old {
            let lastExpiry = usage[old.id]?.lastExpiry ?? .distantPast
            if lastExpiry <= now || old.notAfter <= now { steps.append(.remove(old.id)) }
        }
        // An old root (or upstream certificate) goes once nothing it signed is left: every
        // authority under it removed (an intermediate only after its last SVID expired).
        for old in authorities where old.kind != .intermediate && old.state == .old {
            let children = authorities.filter { $0.parentID == old.id }
            if children.allSatisfy({ $0.state == .removed || steps.contains(.remove($0.id)) }) { steps.append(.remove(old.id)) }
        }
        return steps
    }
}
