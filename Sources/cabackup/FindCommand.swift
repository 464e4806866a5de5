import ArgumentParser
import CABackup
import Foundation

struct FindCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "find",
        abstract: "Find which snapshots hold a path matching a pattern, or every version of one file.",
        discussion: discussion(
            "PATTERN follows the --exclude rules (docs/excludes.md): '*.jpg' matches a name anywhere, '/home/*/notes.txt' a full path; below a matching directory nothing more is listed. With --history, PATH is one absolute path and every snapshot holding it is listed, oldest first, with its size and mtime; a '*' marks each snapshot whose content differs from the one before. Answered from a path index in this user's cache directory (never in the repository), brought up to date from the trees of snapshots it lacks; a query reads no pack. --json prints one object per line, message_type \"match\"."
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions

    @Option(name: [.customShort("s"), .long], help: "Only this snapshot (repeatable; id, prefix or 'latest').")
    var snapshot: [String] = []

    @Flag(name: .long, help: "List every version of one path across the snapshots.")
    var history = false

    @Flag(name: .long, help: "Print one JSON object per match.")
    var json = false

    @Argument(help: "A pattern, or with --history an absolute path.")
    var pattern: String

    struct Match: Encodable {
        let snapshot: String
        let time: String
        let path: String
        let path_b64: String?
        let type: String
        let size: UInt64
        let mtime: String
        let content: String?
    }

    func run() throws {
        let repo = try repository.open()
        let selected = try filters.select(snapshot, in: repo)
        let byID = Dictionary(selected.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        let found = history ? try repo.history(of: pattern, in: selected) : try repo.find(pattern, in: selected)
        var lastSnapshot: SnapshotID?
        var lastDigest: [UInt8]?
        for f in found {
            guard let snap = byID[f.snapshot] else { continue }
            let digest = f.contentDigest.isEmpty ? nil : f.contentDigest.map { String(format: "%02x", $0) }.joined()
            if json {
                let jp = JSONPath(f.path)
                JSONMessages.emit(
                    "match",
                    Match(
                        snapshot: snap.id.hex, time: snap.time, path: jp.path, path_b64: jp.pathB64,
                        type: f.type.description, size: f.size, mtime: formatRFC3339(ns: f.mtimeNs), content: digest))
                continue
            }
            let time = snap.time.replacingOccurrences(of: "T", with: " ").prefix(19)
            let mtime = formatRFC3339(ns: f.mtimeNs).replacingOccurrences(of: "T", with: " ").prefix(19)
            if history {
                let changed = lastDigest != nil && f.contentDigest != lastDigest ? "*" : " "
                print(
                    "\(snap.id.shortHex)  \(time)  \(changed) \(String(f.size).leftPad(12))  \(mtime)  \(f.displayPath)"
                )
                lastDigest = f.contentDigest
            } else {
                if lastSnapshot != f.snapshot {
                    if lastSnapshot != nil { print("") }
                    print("Found matching entries in snapshot \(snap.id.shortHex) from \(time)")
                    lastSnapshot = f.snapshot
                }
                print(
                    "\(f.type.description.padding(toLength: 7, withPad: " ", startingAt: 0)) \(String(f.size).leftPad(12))  \(mtime)  \(f.displayPath)"
                )
            }
        }
        if !json && found.isEmpty {
            print(history ? "no snapshot holds \(pattern)" : "no entry matches \(pattern)")
        }
    }
}
