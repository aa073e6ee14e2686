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
        /// Make a prepared root (already in every agent's bundle) and its prepared intermediate
        /// the active pair.
        case activateRoot(String, intermediate: String)
        case remove(String)
    }

    /// What is due at `now`. `unconfirmedAgents` counts the live agents that have not confirmed
    /// the current bundle: a prepared root is activated only when it is zero (the readiness gate).
    public func steps(_ authorities: [AuthorityRecord], usage: [String: AuthorityUsage], now: Date, unconfirmedAgents: Int = 0) -> [Step] {
        let intermediates = authorities.filter { $0.kind == .intermediate }
        let activeRoot = authorities.first { $0.kind == .root && $0.state == .active }
        var steps: [Step] = []
        if let root = authorities.first(where: { $0.kind == .root && $0.state == .prepared }) {
            if unconfirmedAgents == 0, let next = intermediates.first(where: { $0.parentID == root.id && $0.state == .prepared }) {
                steps.append(.activateRoot(root.id, intermediate: next.id))
            }
        } else if let active = intermediates.first(where: { $0.state == .active }), active.parentID == activeRoot?.id || activeRoot == nil {
            // Its life as made (notBefore is backdated for clock skew; the schedule is not).
            let born = max(active.notBefore, min(active.createdAt, active.notAfter))
            let life = active.notAfter.timeIntervalSince(born)
            let prepared = intermediates.filter { $0.state == .prepared }
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
        // An old root leaves the bundle once nothing it signed is left: every intermediate under
        // it removed (each only after its last SVID expired).
        for old in authorities where old.kind == .root && old.state == .old {
            let children = intermediates.filter { $0.parentID == old.id }
            if children.allSatisfy({ $0.state == .removed || steps.contains(.remove($0.id)) }) { steps.append(.remove(old.id)) }
        }
        return steps
    }
}
