import Testing
import SigilCore

/// The times the ledger and the audit commands read: RFC 3339 with `Z` or an offset; impossible
/// calendar days refused rather than rolled into the next month.
struct RFC3339Tests {
    @Test func zuluOffsetsAndFractions() {
        let zulu = RFC3339.micros(from: "2026-12-07T23:11:31Z")
        #expect(zulu != nil)
        #expect(RFC3339.micros(from: "2026-12-07T23:11:31+00:00") == zulu)
        #expect(RFC3339.micros(from: "2026-12-08T00:41:31+01:30") == zulu)
        #expect(RFC3339.micros(from: "2026-12-07T18:11:31-05:00") == zulu)
        #expect(RFC3339.micros(from: "2026-12-07T23:11:31.250000Z") == zulu.map { $0 + 250_000 })
        #expect(RFC3339.format(micros: zulu!) == "2026-12-07T23:11:31.000000Z")
    }

    @Test func impossibleOrMalformedTimesAreRefused() {
        for text in ["2026-02-31T00:00:00Z", "2026-02-29T00:00:00Z", "2026-04-31T00:00:00Z", "2026-12-07T23:11:31",
                     "2026-12-07T23:11:31+0100", "2026-12-07T23:11:31+24:00", "2026-13-01T00:00:00Z"] {
            #expect(RFC3339.micros(from: text) == nil, "\(text)")
        }
        #expect(RFC3339.micros(from: "2028-02-29T00:00:00Z") != nil)  // a leap year
    }
}
