import Foundation
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

/// Snapshots at chosen times (UTC), planned with ``ForgetPlan`` directly: no repository.
@Suite("forget policy: restic's keep rules on fabricated snapshots")
struct ForgetPolicyTests {
    init() {
        // Calendar buckets use local time; every test here (and RepositoryTests) wants UTC.
        setenv("TZ", "UTC", 1)
        tzset()
    }

    /// A snapshot at `time` (`YYYY-MM-DDTHH:MM`, UTC); its id is derived from all fields.
    static func snapshot(
        _ time: String, host: String = "h", paths: [String] = ["/src"], tags: [String] = []
    ) -> Snapshot {
        let seed = Array("\(time) \(host) \(paths) \(tags)".utf8)
        return Snapshot(
            id: sha256(seed), time: time + ":00Z", timeNs: parseRFC3339(time + ":00Z")!, hostname: host,
            username: "u", paths: paths, tags: tags, parent: nil, tree: sha256([]), summary: SnapshotSummary())
    }

    /// Far after every fabricated snapshot: none is in the future.
    static let now = parseRFC3339("2100-01-01T00:00:00Z")!

    /// Each kept snapshot's time and reasons, as `2026-01-01T00:00 (last, daily)`, oldest first.
    static func kept(
        _ snapshots: [Snapshot], _ policy: ForgetPolicy, groupBy: SnapshotGrouping = .default, now: Int64 = now
    ) -> [String] {
        ForgetPlan(snapshots, policy: policy, groupBy: groupBy, now: now).groups.flatMap(\.kept).map {
            "\($0.snapshot.time.prefix(16)) (\($0.reasons.map(\.description).joined(separator: ", ")))"
        }
    }

    static let calendar = [
        "2024-06-01T10:00", "2024-12-31T23:30", "2025-03-01T08:10", "2025-03-01T08:50", "2025-03-01T09:05",
        "2026-01-01T00:00",
    ].map { snapshot($0) }

    @Test(
        "hourly and yearly keep the newest of each of the last N buckets; spare buckets keep the oldest too",
        arguments: [
            (ForgetPolicy(hourly: 2), ["2025-03-01T09:05 (hourly)", "2026-01-01T00:00 (hourly)"]),
            (
                ForgetPolicy(hourly: 3),
                ["2025-03-01T08:50 (hourly)", "2025-03-01T09:05 (hourly)", "2026-01-01T00:00 (hourly)"]
            ),
            (ForgetPolicy(yearly: 2), ["2025-03-01T09:05 (yearly)", "2026-01-01T00:00 (yearly)"]),
            (
                ForgetPolicy(yearly: 4),
                [
                    "2024-06-01T10:00 (oldest yearly)", "2024-12-31T23:30 (yearly)", "2025-03-01T09:05 (yearly)",
                    "2026-01-01T00:00 (yearly)",
                ]
            ),
            (
                ForgetPolicy(daily: ForgetPolicy.unlimited),
                [
                    "2024-06-01T10:00 (daily)", "2024-12-31T23:30 (daily)", "2025-03-01T09:05 (daily)",
                    "2026-01-01T00:00 (daily)",
                ]
            ),
            (
                ForgetPolicy(last: 2, hourly: 1, monthly: 2, yearly: 1),
                ["2025-03-01T09:05 (last, monthly)", "2026-01-01T00:00 (last, hourly, monthly, yearly)"]
            ),
            (ForgetPolicy(last: 0, hourly: 0), []),
        ])
    func calendarBuckets(policy: ForgetPolicy, expected: [String]) {
        #expect(Self.kept(Self.calendar, policy) == expected)
    }

    static let spaced = [
        "2025-01-01T12:00", "2025-06-15T12:00", "2025-12-01T12:00", "2026-01-30T11:30", "2026-01-30T12:00",
        "2026-03-01T12:00",
    ].map { snapshot($0) }

    @Test(
        "keep-within counts back from the newest snapshot: years, months, days, then hours; the boundary is out",
        arguments: [
            ("1m", ["2026-03-01T12:00"]),
            ("1m2d", ["2026-03-01T12:00"]),
            ("1m2d1h", ["2026-01-30T11:30", "2026-01-30T12:00", "2026-03-01T12:00"]),
            (
                "1y",
                ["2025-06-15T12:00", "2025-12-01T12:00", "2026-01-30T11:30", "2026-01-30T12:00", "2026-03-01T12:00"]
            ),
            (
                "2y",
                [
                    "2025-01-01T12:00", "2025-06-15T12:00", "2025-12-01T12:00", "2026-01-30T11:30", "2026-01-30T12:00",
                    "2026-03-01T12:00",
                ]
            ),
        ])
    func within(duration: String, expected: [String]) throws {
        let d = try #require(KeepDuration(duration))
        #expect(Self.kept(Self.spaced, ForgetPolicy(within: d)) == expected.map { "\($0) (within \(duration))" })
    }

    @Test("keep-within: a month back from March 31 is March 3, as on restic's (Go's) calendar")
    func withinMonthEnd() throws {
        let s = ["2026-03-02T12:00", "2026-03-04T12:00", "2026-03-31T12:00"].map { Self.snapshot($0) }
        let d = try #require(KeepDuration("1m"))
        #expect(
            Self.kept(s, ForgetPolicy(within: d)) == ["2026-03-04T12:00 (within 1m)", "2026-03-31T12:00 (within 1m)"])
    }

    @Test("keep-within ignores snapshots dated in the future as the newest, and keeps them")
    func withinFuture() throws {
        let now = parseRFC3339("2026-02-15T00:00:00Z")!
        let d = try #require(KeepDuration("2m"))
        #expect(
            Self.kept(Self.spaced, ForgetPolicy(within: d), now: now)
                == ["2025-12-01T12:00", "2026-01-30T11:30", "2026-01-30T12:00", "2026-03-01T12:00"].map {
                    "\($0) (within 2m)"
                })
        let allFuture = parseRFC3339("2020-01-01T00:00:00Z")!
        #expect(Self.kept(Self.spaced, ForgetPolicy(within: d), now: allFuture).count == Self.spaced.count)
    }

    @Test(
        "keep-within durations: units y, m, d, h once each, in any order; anything else is rejected",
        arguments: [
            ("1y5m7d2h", KeepDuration(years: 1, months: 5, days: 7, hours: 2)),
            ("2h3d", KeepDuration(days: 3, hours: 2)), ("12m", KeepDuration(months: 12)),
            ("", nil), ("5", nil), ("1w", nil), ("-1d", nil), ("1d1d", nil), ("1.5d", nil), (" 1d", nil), ("d", nil),
            ("1000001h", nil),
        ] as [(String, KeepDuration?)])
    func durations(text: String, expected: KeepDuration?) {
        #expect(KeepDuration(text) == expected)
    }

    @Test("a duration prints the way it is written, parts that are 0 left out")
    func durationText() {
        #expect(KeepDuration(years: 1, months: 5, days: 7, hours: 2).description == "1y5m7d2h")
        #expect(KeepDuration(days: 3, hours: 2).description == "3d2h")
    }

    static let tagged = [
        snapshot("2026-01-01T00:00", tags: ["a"]), snapshot("2026-01-02T00:00", tags: ["a", "b"]),
        snapshot("2026-01-03T00:00", tags: ["b"]), snapshot("2026-01-04T00:00"),
        snapshot("2026-01-05T00:00", tags: ["c", "b", "a"]),
    ]

    @Test(
        "keep-tag keeps snapshots with every tag of any one list; an empty list keeps untagged ones",
        arguments: [
            ([["a", "b"]], ["2026-01-02T00:00 (tags a,b)", "2026-01-05T00:00 (tags a,b)"]),
            (
                [["a"], ["b"]],
                [
                    "2026-01-01T00:00 (tags a)", "2026-01-02T00:00 (tags a, tags b)", "2026-01-03T00:00 (tags b)",
                    "2026-01-05T00:00 (tags a, tags b)",
                ]
            ),
            ([[]], ["2026-01-04T00:00 (untagged)"]),
            ([["d"]], []),
        ])
    func keepTag(lists: [[String]], expected: [String]) {
        #expect(Self.kept(Self.tagged, ForgetPolicy(tags: lists)) == expected)
    }

    @Test("reasons list every rule that keeps a snapshot: tags, within, then last to yearly")
    func reasons() throws {
        let policy = ForgetPolicy(last: 1, daily: 1, within: KeepDuration(days: 1), tags: [["a"]])
        let plan = ForgetPlan(Self.tagged, policy: policy, now: Self.now)
        let newest = try #require(Self.tagged.last)
        #expect(plan.reasons[newest.id] == [.tags(["a"]), .within(KeepDuration(days: 1)), .rule(.last), .rule(.daily)])
        #expect(plan.keep.map { String($0.time.prefix(10)) } == ["2026-01-01", "2026-01-02", "2026-01-05"])
        #expect(plan.remove.map { String($0.time.prefix(10)) } == ["2026-01-03", "2026-01-04"])
    }

    static let mixed = [
        snapshot("2026-01-01T00:00", host: "h1", paths: ["/src"], tags: ["x"]),
        snapshot("2026-01-02T00:00", host: "h1", paths: ["/src"], tags: ["y"]),
        snapshot("2026-01-03T00:00", host: "h2", paths: ["/src"], tags: ["x"]),
        snapshot("2026-01-04T00:00", host: "h1", paths: ["/b", "/a"], tags: ["x"]),
        snapshot("2026-01-05T00:00", host: "h1", paths: ["/a", "/b"], tags: ["x"]),
    ]

    @Test(
        "group-by: the policy applies per group of host, paths and tags (paths and tags as sets)",
        arguments: [
            ("host,paths", ["host h1, paths [/a, /b]", "host h1, paths [/src]", "host h2, paths [/src]"]),
            ("", ["all snapshots"]),
            ("host", ["host h1", "host h2"]),
            ("paths", ["paths [/a, /b]", "paths [/src]"]),
            ("tags", ["tags [x]", "tags [y]"]),
            ("host,tags", ["host h1, tags [x]", "host h1, tags [y]", "host h2, tags [x]"]),
        ])
    func groupBy(fields: String, expected: [String]) throws {
        let grouping = try #require(SnapshotGrouping(parsing: fields))
        let plan = ForgetPlan(Self.mixed, policy: ForgetPolicy(last: 1), groupBy: grouping, now: Self.now)
        #expect(plan.groups.map(\.description) == expected)
        #expect(plan.groups.allSatisfy { $0.kept.count == 1 })
        #expect(plan.keep.count + plan.remove.count == Self.mixed.count)
        #expect(grouping.description == fields)
    }

    @Test("group-by words: hosts/path/tag are accepted, anything else is not")
    func groupingWords() {
        #expect(SnapshotGrouping(parsing: "hosts,path,tag") == [.host, .paths, .tags])
        #expect(SnapshotGrouping(parsing: "host,,paths") == .default)
        #expect(SnapshotGrouping(parsing: "hostname") == nil)
        #expect(SnapshotGrouping(parsing: "host paths") == nil)
    }
}
