import ArgumentParser
import CABackup

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check the repository for damage.",
        discussion: discussion(
            "Checks that every pack header parses and is indexed, every snapshot record is intact, and every tree of every snapshot loads and names only stored blobs. --read-data also reads every pack: its SHA-256 must match its name and every blob must decompress to its id; --read-data-subset N% reads that share of the packs. Each problem names the snapshots and paths it affects. Exit code 1 when anything is wrong.",
            "--json prints one JSON object per line: an error message for each problem (message, snapshots, paths), then a summary (num_errors, packs_checked, snapshots_checked, trees_checked, packs_read, blobs_read). -q prints only the problems and the verdict."
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var verbosity: VerbosityOptions

    @Flag(name: .customLong("read-data"), help: "Read and verify every blob.")
    var readData = false

    @Flag(name: .long, help: "Print JSON lines: an error per problem, then a summary.")
    var json = false

    @Option(name: .customLong("read-data-subset"), help: "Read and verify this share of the packs, e.g. 10%.")
    var subset: String?

    func validate() throws {
        if let subset, parsePercent(subset) == nil {
            throw ValidationError("--read-data-subset '\(subset)' is not a percentage: use e.g. 10%")
        }
    }

    struct Problem: Encodable {
        let message: String
        let snapshots: [String]
        let paths: [String]
    }

    struct Summary: Encodable {
        let num_errors: Int
        let packs_checked: Int
        let snapshots_checked: Int
        let trees_checked: Int
        let packs_read: Int
        let blobs_read: Int
    }

    func run() throws {
        let repo = try repository.open()
        let fraction = readData ? 1 : subset.flatMap(parsePercent) ?? 0
        let line = ProgressLine()
        let showProgress = !json && verbosity.level > 0
        let report = try repo.check(options: CheckOptions(readDataFraction: fraction)) { text in
            if showProgress { line.update(text) }
        }
        line.clear()
        if json {
            for p in report.problems {
                JSONMessages.emit("error", Problem(message: p.message, snapshots: p.snapshots, paths: p.paths))
            }
            JSONMessages.emit(
                "summary",
                Summary(
                    num_errors: report.problems.count, packs_checked: report.packsChecked,
                    snapshots_checked: report.snapshotsChecked, trees_checked: report.treesChecked,
                    packs_read: report.packsRead, blobs_read: report.blobsRead))
        } else {
            for p in report.problems { print("error: \(p)") }
            var summary =
                "checked \(report.packsChecked) packs, \(report.snapshotsChecked) snapshots, \(report.treesChecked) trees"
            if report.packsRead > 0 { summary += "; read \(report.packsRead) packs, \(report.blobsRead) blobs" }
            if verbosity.level > 0 { print(summary) }
            if report.isClean { print("no errors were found") }
        }
        if !report.isClean {
            printError("cabackup: \(report.problems.count) problems found")
            throw ExitCode(1)
        }
    }
}

func parsePercent(_ s: String) -> Double? {
    let t = s.hasSuffix("%") ? String(s.dropLast()) : s
    guard let v = Double(t), v > 0, v <= 100 else { return nil }
    return v / 100
}
