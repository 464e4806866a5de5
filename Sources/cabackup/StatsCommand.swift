import ArgumentParser
import CABackup
import Foundation

struct StatsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stats",
        abstract: "Count what snapshots hold: restore size, or the unique data they reference.",
        discussion: discussion(
            "restore-size (the default): the files and directories a restore of the snapshots writes and their bytes (a hard-linked file's bytes once per snapshot). raw-data: the unique blobs the snapshots reference, their bytes before compression and as stored, and how much deduplication and compression save against the restore size. Without SNAPSHOT, every snapshot (matching --host, --tag, --path) counts. --json prints one object with restic's keys: snapshots_count, total_file_count, total_size, and for raw-data total_blob_count, total_uncompressed_size, compression_ratio, plus restore_size and space_saving."
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions

    @Option(name: .long, help: "restore-size or raw-data.")
    var mode: String = StatsMode.restoreSize.rawValue

    @Flag(name: .long, help: "Print one JSON object.")
    var json = false

    @Argument(help: "Snapshots to count (ids, prefixes or 'latest'; default: all).")
    var snapshots: [String] = []

    func validate() throws {
        if StatsMode(rawValue: mode) == nil {
            throw ValidationError("--mode takes restore-size or raw-data, not '\(mode)'")
        }
    }

    struct Output: Encodable {
        let snapshots_count: Int
        let total_file_count: Int
        let total_dir_count: Int
        /// restic: the restore size in restore-size mode, the stored size in raw-data mode.
        let total_size: Int64
        let restore_size: Int64
        let total_blob_count: Int?
        let total_uncompressed_size: Int64?
        let compression_ratio: Double?
        let space_saving: Double?
    }

    func run() throws {
        let mode = StatsMode(rawValue: mode)!
        let repo = try repository.open()
        let selected = try filters.select(snapshots, in: repo)
        let s = try repo.stats(selected, mode: mode)
        let raw = mode == .rawData
        let ratio = s.storedBytes > 0 ? Double(s.rawBytes) / Double(s.storedBytes) : 0
        if json {
            print(
                jsonLine(
                    Output(
                        snapshots_count: s.snapshots, total_file_count: s.files, total_dir_count: s.directories,
                        total_size: raw ? s.storedBytes : s.restoreBytes, restore_size: s.restoreBytes,
                        total_blob_count: raw ? s.blobs : nil, total_uncompressed_size: raw ? s.rawBytes : nil,
                        compression_ratio: raw ? ratio : nil, space_saving: raw ? s.spaceSaving : nil)))
            return
        }
        var rows: [(String, String)] = [
            ("Snapshots processed", "\(s.snapshots)"), ("Total File Count", "\(s.files)"),
            ("Total Directory Count", "\(s.directories)"), ("Restore Size", formatBytes(s.restoreBytes)),
        ]
        if raw {
            rows += [
                ("Total Blob Count", "\(s.blobs)"), ("Total Uncompressed Size", formatBytes(s.rawBytes)),
                ("Total Size (stored)", formatBytes(s.storedBytes)),
                ("Compression Ratio", String(format: "%.2fx", ratio)),
                ("Space Saving", String(format: "%.2f%% (deduplication and compression)", s.spaceSaving * 100)),
            ]
        }
        print("Stats in \(mode.rawValue) mode:")
        let width = rows.map(\.0.count).max() ?? 0
        for (k, v) in rows { print(String(repeating: " ", count: width - k.count) + k + ":  " + v) }
    }
}
