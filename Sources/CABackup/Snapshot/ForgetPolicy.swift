import CABackupCore
import CABackupFormat

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Which snapshots `forget` keeps: restic's keep policy.
///
/// Snapshots are first split into groups (``SnapshotGrouping``); every rule then applies to
/// each group on its own, and a snapshot that any rule keeps is kept. The calendar rules
/// (hourly to yearly) use local time and count only buckets that have snapshots: of each
/// bucket they keep the newest snapshot. When a calendar rule still has buckets left after
/// the group's oldest snapshot, it keeps that oldest snapshot too (restic ≥ 0.17).
public struct ForgetPolicy: Sendable, Equatable {
    /// A count with no limit: `daily: ForgetPolicy.unlimited` keeps the newest snapshot of
    /// every day (restic's `unlimited`).
    public static let unlimited = Int.max

    /// Keep the newest N snapshots.
    public var last: Int?
    /// Keep the newest snapshot of each of the last N hours that have snapshots.
    public var hourly: Int?
    /// … of each of the last N days that have snapshots.
    public var daily: Int?
    /// … of each of the last N ISO weeks (Monday to Sunday) that have snapshots.
    public var weekly: Int?
    /// … of each of the last N months that have snapshots.
    public var monthly: Int?
    /// … of each of the last N years that have snapshots.
    public var yearly: Int?
    /// Keep every snapshot made less than this before the newest snapshot of its group
    /// (snapshots dated in the future do not count as the newest).
    public var within: KeepDuration?
    /// Keep every snapshot that has all the tags of any one list; an empty list matches
    /// snapshots without tags.
    public var tags: [[String]]

    public init(
        last: Int? = nil, hourly: Int? = nil, daily: Int? = nil, weekly: Int? = nil, monthly: Int? = nil,
        yearly: Int? = nil, within: KeepDuration? = nil, tags: [[String]] = []
    ) {
        self.last = last
        self.hourly = hourly
        self.daily = daily
        self.weekly = weekly
        self.monthly = monthly
        self.yearly = yearly
        self.within = within
        self.tags = tags
    }

    /// Whether no rule can keep anything: every count unset or 0, no duration, no tags
    /// (restic's test, so `--keep-last 0` alone is no policy).
    public var isEmpty: Bool {
        counts.allSatisfy { ($0.count ?? 0) <= 0 } && (within?.isZero ?? true) && tags.isEmpty
    }

    /// The calendar and count rules with their counts, in restic's order.
    var counts: [(rule: ForgetPlan.Rule, count: Int?)] {
        [(.last, last), (.hourly, hourly), (.daily, daily), (.weekly, weekly), (.monthly, monthly), (.yearly, yearly)]
    }
}

/// A calendar duration for ``ForgetPolicy/within``: years, months, days and hours, written
/// like `1y5m7d2h`. Years, months and days are subtracted on the local calendar (so
/// `1m` before March 31 is March 3 or 2, as the month before has fewer days), then hours as
/// elapsed time.
public struct KeepDuration: Sendable, Hashable, CustomStringConvertible {
    public var years: Int
    public var months: Int
    public var days: Int
    public var hours: Int

    public init(years: Int = 0, months: Int = 0, days: Int = 0, hours: Int = 0) {
        self.years = years
        self.months = months
        self.days = days
        self.hours = hours
    }

    /// Parses `1y5m7d2h`: one or more numbers, each followed by its unit (`y`, `m`, `d` or
    /// `h`), in any order, each unit at most once; nil for anything else. A number is at
    /// most 1000000, which keeps the date arithmetic far from overflow.
    public init?(_ text: String) {
        self.init()
        var seen = Set<Character>()
        var digits = ""
        for c in text {
            if c.isASCII && c.isNumber {
                digits.append(c)
                continue
            }
            guard let n = Int(digits), n <= 1_000_000, seen.insert(c).inserted else { return nil }
            switch c {
            case "y": years = n
            case "m": months = n
            case "d": days = n
            case "h": hours = n
            default: return nil
            }
            digits = ""
        }
        if !digits.isEmpty || seen.isEmpty { return nil }
    }

    /// Whether every part is 0 (such a duration keeps nothing; restic treats it as unset).
    public var isZero: Bool { years == 0 && months == 0 && days == 0 && hours == 0 }

    /// `1y5m7d2h`, leaving out parts that are 0.
    public var description: String {
        let parts = [(years, "y"), (months, "m"), (days, "d"), (hours, "h")].filter { $0.0 != 0 }
        return parts.isEmpty ? "0h" : parts.map { "\($0.0)\($0.1)" }.joined()
    }

    /// The time this duration before `ns` (nanoseconds since 1970).
    func before(_ ns: Int64) -> Int64 {
        var t = time_t(ns.floorDiv(1_000_000_000))
        var tm = tm()
        localtime_r(&t, &tm)
        // Safe: each part is at most 1000000 (see init), far inside Int32 and time_t.
        tm.tm_year -= Int32(years)
        tm.tm_mon -= Int32(months)
        tm.tm_mday -= Int32(days)
        tm.tm_isdst = -1
        let seconds = Int64(mktime(&tm)) - Int64(hours) * 3600
        return seconds * 1_000_000_000 + (ns - ns.floorDiv(1_000_000_000) * 1_000_000_000)
    }
}

extension Int64 {
    fileprivate func floorDiv(_ d: Int64) -> Int64 {
        let q = self / d
        return (self % d < 0) ? q - 1 : q
    }
}

/// What `forget` groups snapshots by before it applies a policy (restic's `--group-by`).
public struct SnapshotGrouping: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }

    public static let host = SnapshotGrouping(rawValue: 1)
    /// The set of paths (order does not matter).
    public static let paths = SnapshotGrouping(rawValue: 2)
    /// The set of tags (order does not matter; no tags is a group of its own).
    public static let tags = SnapshotGrouping(rawValue: 4)
    /// Host and paths, restic's default: one backup job's snapshots form one group.
    public static let `default`: SnapshotGrouping = [.host, .paths]

    /// Parses a comma-separated list of `host`, `paths` and `tags` (or `hosts`, `path`,
    /// `tag`); an empty string is no grouping (all snapshots form one group). Nil when a
    /// word is none of those.
    public init?(parsing text: String) {
        self = []
        for word in text.split(separator: ",", omittingEmptySubsequences: false) {
            switch word {
            case "host", "hosts": insert(.host)
            case "path", "paths": insert(.paths)
            case "tag", "tags": insert(.tags)
            case "": continue
            default: return nil
            }
        }
    }

    /// `host,paths`, the form ``init(parsing:)`` reads.
    public var description: String {
        [(SnapshotGrouping.host, "host"), (.paths, "paths"), (.tags, "tags")].filter { contains($0.0) }.map(\.1)
            .joined(separator: ",")
    }
}

/// What a ``ForgetPolicy`` keeps and removes, group by group, and why each kept snapshot is
/// kept. Built by ``Repository/forgetPlan(_:matching:groupBy:)`` or, for any list of
/// snapshots, by ``init(_:policy:groupBy:now:)``.
public struct ForgetPlan: Sendable {
    /// A count rule of ``ForgetPolicy``.
    public enum Rule: String, Sendable, Hashable {
        case last, hourly, daily, weekly, monthly, yearly
    }

    /// Why a snapshot is kept.
    public enum Reason: Sendable, Hashable, CustomStringConvertible {
        /// One of the newest N (`last`), or the newest of one of the N newest calendar
        /// buckets.
        case rule(Rule)
        /// The group's oldest snapshot, kept because the rule had buckets left over.
        case oldest(Rule)
        /// Made within this duration before the group's newest snapshot.
        case within(KeepDuration)
        /// Has all these tags (no tags: has none).
        case tags([String])

        /// `daily`, `oldest daily`, `within 1y2m`, `tags a,b`, `untagged`.
        public var description: String {
            switch self {
            case .rule(let r): return r.rawValue
            case .oldest(let r): return "oldest \(r.rawValue)"
            case .within(let d): return "within \(d)"
            case .tags(let t): return t.isEmpty ? "untagged" : "tags \(t.joined(separator: ","))"
            }
        }
    }

    /// A kept snapshot and every rule that keeps it, in restic's order (tags, within, then
    /// last to yearly).
    public struct Kept: Sendable {
        public var snapshot: Snapshot
        public var reasons: [Reason]
    }

    /// Snapshots that share what they are grouped by.
    public struct Group: Sendable, CustomStringConvertible {
        /// The shared host, sorted paths and sorted tags; nil for what the snapshots were
        /// not grouped by.
        public var hostname: String?
        public var paths: [String]?
        public var tags: [String]?
        /// Oldest first.
        public var kept: [Kept] = []
        /// Oldest first.
        public var remove: [Snapshot] = []

        /// `host h, paths [/a, /b], tags [x]`, or `all snapshots` when not grouped.
        public var description: String {
            var parts: [String] = []
            if let hostname { parts.append("host \(hostname)") }
            if let paths { parts.append("paths [\(paths.joined(separator: ", "))]") }
            if let tags { parts.append("tags [\(tags.joined(separator: ", "))]") }
            return parts.isEmpty ? "all snapshots" : parts.joined(separator: ", ")
        }
    }

    /// Sorted by host, then paths, then tags.
    public var groups: [Group]

    /// Every kept snapshot, oldest first.
    public var keep: [Snapshot] { groups.flatMap { $0.kept.map(\.snapshot) }.sorted(by: ForgetPlan.olderFirst) }
    /// Every snapshot to remove, oldest first.
    public var remove: [Snapshot] { groups.flatMap(\.remove).sorted(by: ForgetPlan.olderFirst) }
    /// Why each kept snapshot is kept.
    public var reasons: [SnapshotID: [Reason]] {
        Dictionary(groups.flatMap { $0.kept.map { ($0.snapshot.id, $0.reasons) } }, uniquingKeysWith: { a, _ in a })
    }

    /// Applies `policy` to each group of `snapshots`.
    ///
    /// - Parameters:
    ///   - snapshots: the snapshots to plan for, in any order.
    ///   - policy: the keep rules.
    ///   - groupBy: what snapshots must share to be in one group.
    ///   - now: the current time in nanoseconds since 1970: a snapshot dated after it is
    ///     never the newest that ``ForgetPolicy/within`` counts back from.
    public init(_ snapshots: [Snapshot], policy: ForgetPolicy, groupBy: SnapshotGrouping = .default, now: Int64) {
        var byKey: [GroupKey: [Snapshot]] = [:]
        for s in snapshots { byKey[GroupKey(s, groupBy), default: []].append(s) }
        groups = byKey.sorted { $0.key < $1.key }.map { key, members in
            ForgetPlan.apply(policy, to: members, now: now, into: key.group)
        }
    }

    /// Time, then id: a total order, so equal times still give one answer.
    static func olderFirst(_ a: Snapshot, _ b: Snapshot) -> Bool {
        a.timeNs != b.timeNs ? a.timeNs < b.timeNs : a.id.hex < b.id.hex
    }

    /// restic's `ApplyPolicy` for one group: walks the snapshots newest first; each count
    /// rule keeps a snapshot whose bucket differs from the last one it kept, until its
    /// count is spent.
    static func apply(_ policy: ForgetPolicy, to members: [Snapshot], now: Int64, into group: Group) -> Group {
        var group = group
        let newestFirst = members.sorted { olderFirst($1, $0) }
        var threshold: Int64?
        if let within = policy.within, !within.isZero {
            // restic counts back from the newest snapshot not in the future; when all are,
            // every snapshot is within.
            threshold = newestFirst.first { $0.timeNs < now }.map { within.before($0.timeNs) } ?? .min
        }
        var remaining = policy.counts.map { max(0, $0.count ?? 0) }
        var lastBucket = [String?](repeating: nil, count: remaining.count)
        for (n, s) in newestFirst.enumerated() {
            var reasons: [Reason] = []
            for list in policy.tags where list.isEmpty ? s.tags.isEmpty : list.allSatisfy(s.tags.contains) {
                reasons.append(.tags(list))
            }
            if let threshold, let within = policy.within, s.timeNs > threshold { reasons.append(.within(within)) }
            let isOldest = n == newestFirst.count - 1
            for (i, (rule, _)) in policy.counts.enumerated() where remaining[i] > 0 {
                let bucket = rule == .last ? String(n) : calendarKey(s.timeNs, rule.calendarFormat)
                if bucket != lastBucket[i] {
                    reasons.append(.rule(rule))
                } else if isOldest {
                    reasons.append(.oldest(rule))
                } else {
                    continue
                }
                lastBucket[i] = bucket
                remaining[i] -= 1
            }
            if reasons.isEmpty {
                group.remove.append(s)
            } else {
                group.kept.append(Kept(snapshot: s, reasons: reasons))
            }
        }
        group.kept.reverse()
        group.remove.reverse()
        return group
    }

    /// What a snapshot's group is named by; fields not grouped by are nil.
    struct GroupKey: Hashable, Comparable {
        var hostname: String?
        var paths: [String]?
        var tags: [String]?

        init(_ s: Snapshot, _ groupBy: SnapshotGrouping) {
            hostname = groupBy.contains(.host) ? s.hostname : nil
            paths = groupBy.contains(.paths) ? s.paths.sorted() : nil
            tags = groupBy.contains(.tags) ? s.tags.sorted() : nil
        }

        var group: Group { Group(hostname: hostname, paths: paths, tags: tags) }

        static func < (a: GroupKey, b: GroupKey) -> Bool {
            func fields(_ k: GroupKey) -> [String] {
                [
                    k.hostname ?? "", (k.paths ?? []).joined(separator: "\u{0}"),
                    (k.tags ?? []).joined(separator: "\u{0}"),
                ]
            }
            return fields(a).lexicographicallyPrecedes(fields(b))
        }
    }
}

extension ForgetPlan.Rule {
    /// The strftime format naming a snapshot's bucket (local time); unused for `last`.
    var calendarFormat: String {
        switch self {
        case .last: return ""
        case .hourly: return "%Y-%m-%d %H"
        case .daily: return "%Y-%m-%d"
        case .weekly: return "%G-%V"
        case .monthly: return "%Y-%m"
        case .yearly: return "%Y"
        }
    }
}

/// A local-time calendar key (strftime format) for a time in nanoseconds.
func calendarKey(_ ns: Int64, _ format: String) -> String {
    var t = time_t(ns.floorDiv(1_000_000_000))
    var tm = tm()
    localtime_r(&t, &tm)
    var buf = [CChar](repeating: 0, count: 32)
    let n = strftime(&buf, buf.count, format, &tm)
    return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
