import Foundation
import Testing

@Suite("--json of check, forget, prune and key list")
struct JSONOutputTests {
    @Test("check, forget, prune and key list --json; -q drops informational lines")
    func otherCommandsJSON() throws {
        let s = Scratch()
        let src = s.file("src")
        let repo = s.file("repo")
        try makeFiles(src, ["docs/a.txt", "docs/b.md"])
        #expect(try cabackup("init", "--repo", repo).status == 0)
        #expect(try cabackup("snapshot", "--repo", repo, src).status == 0)
        try makeFiles(src, ["later.txt"])
        let second = try cabackup("snapshot", "--repo", repo, src)
        #expect(second.status == 0, "\(second.stderr)")
        let snaps = try #require(
            try JSONSerialization.jsonObject(
                with: Data(try cabackup("snapshots", "--repo", repo, "--json").stdout.utf8))
                as? [[String: Any]])
        // forget: one JSON array of groups, restic's fields.
        let dry = try cabackup("forget", "--repo", repo, "--keep-last", "1", "--dry-run", "--json")
        #expect(dry.status == 0, "\(dry.stderr)")
        let groups = try #require(try JSONSerialization.jsonObject(with: Data(dry.stdout.utf8)) as? [[String: Any]])
        #expect(groups.count == 1 && dry.stdout.split(separator: "\n").count == 1, "\(dry.stdout)")
        let keep = try #require(groups.first?["keep"] as? [[String: Any]])
        let remove = try #require(groups.first?["remove"] as? [[String: Any]])
        #expect(keep.map { $0["id"] as? String } == [snaps[1]["id"] as? String])
        #expect(remove.map { $0["id"] as? String } == [snaps[0]["id"] as? String])
        // With --prune, prune's object follows the array on a line of its own.
        let both = try cabackup("forget", "--repo", repo, "--keep-last", "1", "--dry-run", "--json", "--prune")
        let bothLines = both.stdout.split(separator: "\n").map(String.init)
        #expect(bothLines.count == 2 && bothLines.first?.hasPrefix("[{") == true, "\(both.stdout)")
        #expect(jsonObject(bothLines.last ?? "")?["message_type"] as? String == "summary")
        let reasons = try #require(groups.first?["reasons"] as? [[String: Any]])
        #expect((reasons.first?["matches"] as? [String])?.isEmpty == false)
        #expect(groups.first?["host"] is String && groups.first?["tags"] is NSNull)
        // -q: only the result.
        let forget = try cabackup("forget", "--repo", repo, "--keep-last", "1", "-q")
        #expect(forget.status == 0 && forget.stdout == "1 snapshots removed\n", "\(forget.stdout)")
        // prune: one object with message_type.
        let prune = try cabackup("prune", "--repo", repo, "--json")
        #expect(prune.status == 0, "\(prune.stderr)")
        let pruned = jsonLines(prune.stdout)
        #expect(pruned.count == 1 && pruned.first?["message_type"] as? String == "summary", "\(prune.stdout)")
        #expect(pruned.first?["packs_deleted"] is Int && pruned.first?["dry_run"] as? Bool == false)
        // key list: one array, restic's fields.
        let keys = try cabackup("key", "list", "--repo", repo, "--json")
        let slots = try #require(try JSONSerialization.jsonObject(with: Data(keys.stdout.utf8)) as? [[String: Any]])
        #expect(slots.count == 1 && slots.first?["current"] as? Bool == true && slots.first?["id"] is String)
        // check: a summary line; -q keeps only the verdict; damage gives error lines first.
        let check = jsonLines(try cabackup("check", "--repo", repo, "--json").stdout)
        #expect(check.count == 1 && check.first?["message_type"] as? String == "summary", "\(check)")
        #expect(check.first?["num_errors"] as? Int == 0 && check.first?["snapshots_checked"] as? Int == 1)
        #expect(try cabackup("check", "--repo", repo, "-q").stdout == "no errors were found\n")
        let dataDir = repo + "/data"
        let pack = try #require(entries(dataDir).sorted().first { $0.count == 67 })  // XY/<64 hex digits>
        try FileManager.default.removeItem(atPath: dataDir + "/" + pack)
        let damaged = try cabackup("check", "--repo", repo, "--json")
        #expect(damaged.status == 1)
        let lines = jsonLines(damaged.stdout)
        #expect(lines.count >= 2 && lines.dropLast().allSatisfy { $0["message_type"] as? String == "error" })
        #expect(lines.first?["message"] is String)
        #expect(lines.last?["message_type"] as? String == "summary" && (lines.last?["num_errors"] as? Int ?? 0) > 0)
    }
}
