import CABackupCore
import Foundation

/// Totals recorded with each snapshot.
public struct SnapshotSummary: Codable, Sendable, Equatable {
    /// Regular files in the snapshot.
    public var filesTotal: Int = 0
    /// Directories in the snapshot.
    public var directoriesTotal: Int = 0
    /// Bytes read from files (files unchanged since the parent snapshot are not read).
    public var bytesTotal: Int64 = 0
    /// Data blobs stored by this snapshot (new chunks).
    public var chunksAdded: Int = 0
    /// Bytes the repository grew by: packs (with headers) and the snapshot record.
    public var bytesAdded: Int64 = 0
    /// Entries that could not be read and were skipped.
    public var errors: Int = 0
    /// Files not read because the parent snapshot has them unchanged.
    public var filesUnchanged: Int = 0
    /// Bytes of those files.
    public var bytesUnchanged: Int64 = 0
    public var durationSeconds: Double = 0

    enum CodingKeys: String, CodingKey {
        case filesTotal = "files_total"
        case directoriesTotal = "dirs_total"
        case bytesTotal = "bytes_total"
        case chunksAdded = "chunks_added"
        case bytesAdded = "bytes_added"
        case errors
        case filesUnchanged = "files_unchanged"
        case bytesUnchanged = "bytes_unchanged"
        case durationSeconds = "duration_s"
    }

    public init() {}

    /// Lenient: a field missing from an older record reads as zero.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        filesTotal = try c.decodeIfPresent(Int.self, forKey: .filesTotal) ?? 0
        directoriesTotal = try c.decodeIfPresent(Int.self, forKey: .directoriesTotal) ?? 0
        bytesTotal = try c.decodeIfPresent(Int64.self, forKey: .bytesTotal) ?? 0
        chunksAdded = try c.decodeIfPresent(Int.self, forKey: .chunksAdded) ?? 0
        bytesAdded = try c.decodeIfPresent(Int64.self, forKey: .bytesAdded) ?? 0
        errors = try c.decodeIfPresent(Int.self, forKey: .errors) ?? 0
        filesUnchanged = try c.decodeIfPresent(Int.self, forKey: .filesUnchanged) ?? 0
        bytesUnchanged = try c.decodeIfPresent(Int64.self, forKey: .bytesUnchanged) ?? 0
        durationSeconds = try c.decodeIfPresent(Double.self, forKey: .durationSeconds) ?? 0
    }
}

/// A snapshot: the record of one backup run, naming the root tree.
///
/// Stored as JSON in `snapshots/<id>`, where the id is the SHA-256 of those bytes.
/// Writing this file is the commit point of a backup: until it exists, nothing that
/// was written is referenced by anything.
public struct Snapshot: Sendable, Equatable {
    /// SHA-256 of the stored record.
    public var id: SnapshotID
    /// When the backup started, RFC 3339 with nanoseconds and the local offset.
    public var time: String
    /// Nanoseconds since 1970 of ``time``.
    public var timeNs: Int64
    public var hostname: String
    public var username: String
    /// The absolute paths that were backed up.
    public var paths: [String]
    public var tags: [String]
    /// The snapshot this one was based on, if any.
    public var parent: SnapshotID?
    /// The root tree.
    public var tree: BlobID
    public var summary: SnapshotSummary
    /// What its trees record beyond the base fields (``Snapshot/extendedMetadata``);
    /// empty for snapshots made before extended attributes were kept.
    public var metadata: [String] = []
    /// For a record rewritten by `tag`: the id of the snapshot as first written.
    public var original: SnapshotID?

    /// A snapshot whose trees record extended attributes, inode flags and holes: a
    /// missing attribute there means the entry had none (in an older snapshot it means
    /// nothing).
    public var recordsExtendedMetadata: Bool { Self.extendedMetadata.allSatisfy(metadata.contains) }

    /// The `metadata` of snapshots whose trees record extended attributes, inode flags
    /// and data ranges.
    public static let extendedMetadata = ["xattrs", "flags", "holes"]
}

struct SnapshotRecord: Codable {
    var version: Int
    var time: String
    var hostname: String
    var username: String
    var paths: [String]
    var tags: [String]
    var parent: String?
    var tree: String
    var summary: SnapshotSummary
    var program: String
    var metadata: [String]?
    var original: String?
}

extension Snapshot {
    /// The stored bytes of a snapshot record.
    package static func encodeRecord(
        time: String, hostname: String, username: String, paths: [String], tags: [String], parent: SnapshotID?,
        tree: BlobID, summary: SnapshotSummary
    ) -> [UInt8] {
        let rec = SnapshotRecord(
            version: 1, time: time, hostname: hostname, username: username, paths: paths, tags: tags,
            parent: parent?.hex, tree: tree.hex, summary: summary, program: "cabackup \(cabackupVersion)",
            metadata: Snapshot.extendedMetadata, original: nil)
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        return Array(try! enc.encode(rec))
    }

    /// The record of `snapshot` with other tags (and, rewritten, another root tree):
    /// everything else as it was, and `original` naming the snapshot as first written.
    package static func encodeRecord(retagging snapshot: Snapshot, tags: [String], tree: BlobID? = nil) -> [UInt8] {
        let rec = SnapshotRecord(
            version: 1, time: snapshot.time, hostname: snapshot.hostname, username: snapshot.username,
            paths: snapshot.paths, tags: tags, parent: snapshot.parent?.hex, tree: (tree ?? snapshot.tree).hex,
            summary: snapshot.summary, program: "cabackup \(cabackupVersion)",
            metadata: snapshot.metadata.isEmpty ? nil : snapshot.metadata,
            original: (snapshot.original ?? snapshot.id).hex)
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        return Array(try! enc.encode(rec))
    }

    /// Parses a record's JSON; `id` is the name it was stored under (already verified
    /// against the stored bytes by ``Repository/decodeRecord(id:stored:)``).
    package static func decode(id: SnapshotID, json bytes: [UInt8]) throws -> Snapshot {
        let what = "snapshot \(id.hex)"
        guard let rec = try? JSONDecoder().decode(SnapshotRecord.self, from: Data(bytes)) else {
            throw CABackupError.corrupt(what: what, reason: "not a snapshot record")
        }
        guard rec.version == 1 else { throw CABackupError.unsupportedVersion(found: rec.version, supported: 1) }
        guard let tree = ObjectID(hex: rec.tree), let ns = parseRFC3339(rec.time) else {
            throw CABackupError.corrupt(what: what, reason: "bad tree id or time")
        }
        var parent: SnapshotID?
        if let p = rec.parent {
            guard let pid = ObjectID(hex: p) else { throw CABackupError.corrupt(what: what, reason: "bad parent id") }
            parent = pid
        }
        var original: SnapshotID?
        if let o = rec.original {
            guard let oid = ObjectID(hex: o) else { throw CABackupError.corrupt(what: what, reason: "bad original id") }
            original = oid
        }
        return Snapshot(
            id: id, time: rec.time, timeNs: ns, hostname: rec.hostname, username: rec.username, paths: rec.paths,
            tags: rec.tags, parent: parent, tree: tree, summary: rec.summary, metadata: rec.metadata ?? [],
            original: original)
    }
}

/// The version of this build.
public let cabackupVersion = "0.1.0"

/// Formats nanoseconds since 1970 as RFC 3339 with nanoseconds and the local offset,
/// e.g. `2026-11-25T04:32:34.123456789+01:00`.
public func formatRFC3339(ns: Int64) -> String {
    var secs = time_t(ns / 1_000_000_000)
    var frac = ns % 1_000_000_000
    if frac < 0 {
        frac += 1_000_000_000
        secs -= 1
    }
    var tm = tm()
    localtime_r(&secs, &tm)
    let off = tm.tm_gmtoff
    let sign = off < 0 ? "-" : "+"
    let a = abs(off)
    func pad(_ v: Int, _ w: Int) -> String {
        let s = String(v)
        return String(repeating: "0", count: max(0, w - s.count)) + s
    }
    return "\(pad(Int(tm.tm_year) + 1900, 4))-\(pad(Int(tm.tm_mon) + 1, 2))-\(pad(Int(tm.tm_mday), 2))T"
        + "\(pad(Int(tm.tm_hour), 2)):\(pad(Int(tm.tm_min), 2)):\(pad(Int(tm.tm_sec), 2)).\(pad(Int(frac), 9))"
        + "\(sign)\(pad(a / 3600, 2)):\(pad((a % 3600) / 60, 2))"
}

/// Parses what ``formatRFC3339(ns:)`` writes (any fraction length, `Z` or `±hh:mm`).
public func parseRFC3339(_ s: String) -> Int64? {
    let u = Array(s.utf8)
    func num(_ from: Int, _ len: Int) -> Int? {
        guard from + len <= u.count else { return nil }
        var v = 0
        for c in u[from..<from + len] {
            guard c >= 48 && c <= 57 else { return nil }
            v = v * 10 + Int(c - 48)
        }
        return v
    }
    guard u.count >= 20, let y = num(0, 4), let mo = num(5, 2), let d = num(8, 2), let h = num(11, 2),
        let mi = num(14, 2), let se = num(17, 2), (1...12).contains(mo), (1...31).contains(d), h < 24, mi < 60,
        se < 61
    else { return nil }
    var i = 19
    var frac: Int64 = 0
    if i < u.count && u[i] == UInt8(ascii: ".") {
        i += 1
        var digits = 0
        while i < u.count, u[i] >= 48, u[i] <= 57 {
            if digits < 9 {
                frac = frac * 10 + Int64(u[i] - 48)
                digits += 1
            }
            i += 1
        }
        while digits < 9 {
            frac *= 10
            digits += 1
        }
    }
    var offset = 0
    guard i < u.count else { return nil }
    if u[i] == UInt8(ascii: "Z") {
        offset = 0
    } else if u[i] == UInt8(ascii: "+") || u[i] == UInt8(ascii: "-") {
        guard let oh = num(i + 1, 2), let om = num(i + 4, 2) else { return nil }
        offset = (oh * 3600 + om * 60) * (u[i] == UInt8(ascii: "-") ? -1 : 1)
    } else {
        return nil
    }
    // Days from civil (proleptic Gregorian), Howard Hinnant's algorithm.
    let yy = mo <= 2 ? y - 1 : y
    let era = (yy >= 0 ? yy : yy - 399) / 400
    let yoe = yy - era * 400
    let doy = (153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
    let days = era * 146097 + doe - 719468
    let secs = Int64(days) * 86400 + Int64(h * 3600 + mi * 60 + se) - Int64(offset)
    // Years past ~2262 do not fit in Int64 nanoseconds: refuse rather than overflow.
    let (ns, overflow) = secs.multipliedReportingOverflow(by: 1_000_000_000)
    guard !overflow, ns <= Int64.max - frac else { return nil }
    return ns + frac
}

/// A forget record: written (sealed, like a snapshot record, under its own AAD) by
/// `forget` before it removes snapshot records, among the snapshot records and named the
/// same way (the SHA-256 of its stored bytes). It says, authenticated by the key, which
/// snapshots were removed on purpose, so a device that finds a snapshot it saw gone can
/// tell a forget from a storage that deleted or rolled back records behind its owner's back.
///
/// Layout (JSON): `{"version": 1, "forgotten": ["64 hex", …], "time": RFC 3339, "hostname"}`.
package struct ForgetRecord: Codable {
    var version: Int
    var forgotten: [String]
    var time: String
    var hostname: String

    /// The plaintext of a forget record naming `ids`, made now on this host.
    package static func encode(_ ids: [SnapshotID]) -> [UInt8] {
        let record = ForgetRecord(
            version: 1, forgotten: ids.map(\.hex), time: formatRFC3339(ns: wallClockNs()), hostname: currentHostname())
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        return Array(try! enc.encode(record))
    }

    package static func decode(_ plain: [UInt8]) -> [SnapshotID]? {
        guard let r = try? JSONDecoder().decode(ForgetRecord.self, from: Data(plain)), r.version == 1 else {
            return nil
        }
        let ids = r.forgotten.compactMap { isObjectName($0) ? ObjectID(hex: $0) : nil }
        return ids.count == r.forgotten.count ? ids : nil
    }
}
