public import Foundation
public import SigilStore

/// When the server rotates its signing intermediate, as a pure function of the authorities, how
/// their SVIDs stand and the time: prepare the next intermediate at ½ of the active one's life,
/// activate it at ⅚, and remove an old one only once the last SVID it signed has expired (until
/// then its SVIDs still chain through it to the root).
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
        case remove(String)
    }

    public func steps(_ authorities: [AuthorityRecord], usage: [String: AuthorityUsage], now: Date) -> [Step] {
        let intermediates = authorities.filter { $0.kind == .intermediate }
        var steps: [Step] = []
        if let active = intermediates.first(where: { $0.state == .active }) {
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
        return steps
    }
}
