import ArgumentParser
import CABackup

struct SnapshotsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshots", abstract: "List snapshots, oldest first.", discussion: discussion())

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions

    @Flag(name: .long, help: "Print one JSON array.")
    var json = false

    struct Item: Encodable {
        let id: String
        let short_id: String
        let time: String
        let hostname: String
        let username: String
        let paths: [String]
        let tags: [String]
        let parent: String?
        let tree: String
        let summary: SnapshotSummary

        init(_ s: Snapshot) {
            id = s.id.hex
            short_id = s.id.shortHex
            time = s.time
            hostname = s.hostname
            username = s.username
            paths = s.paths
            tags = s.tags
            parent = s.parent?.hex
            tree = s.tree.hex
            summary = s.summary
        }

        func encode(to encoder: any Encoder) throws {
            enum K: String, CodingKey {
                case id, short_id, time, hostname, username, paths, tags, parent, tree, summary
            }
            var c = encoder.container(keyedBy: K.self)
            try c.encode(id, forKey: .id)
            try c.encode(short_id, forKey: .short_id)
            try c.encode(time, forKey: .time)
            try c.encode(hostname, forKey: .hostname)
            try c.encode(username, forKey: .username)
            try c.encode(paths, forKey: .paths)
            try c.encode(tags, forKey: .tags)
            try c.encode(parent, forKey: .parent)  // null when none
            try c.encode(tree, forKey: .tree)
            try c.encode(summary, forKey: .summary)
        }
    }

    func run() throws {
        let repo = try repository.open()
        let snaps = try repo.snapshots(matching: filters.filter)
        if json {
            print(jsonLine(snaps.map(Item.init)))
            return
        }
        let rows = snaps.map { s -> [String] in
            let t = s.time.replacingOccurrences(of: "T", with: " ").prefix(19)
            return [
                s.id.shortHex, String(t), s.hostname, s.tags.joined(separator: ","), s.paths.joined(separator: ", "),
            ]
        }
        let header = ["ID", "Time", "Host", "Tags", "Paths"]
        var widths = header.map(\.count)
        for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
        func line(_ r: [String]) -> String {
            r.enumerated().map { i, c in
                i == r.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0)
            }
            .joined(separator: "  ")
        }
        print(line(header))
        print(String(repeating: "-", count: widths.reduce(0, +) + 2 * (widths.count - 1)))
        for r in rows { print(line(r)) }
        print("\(snaps.count) snapshots")
    }
}
