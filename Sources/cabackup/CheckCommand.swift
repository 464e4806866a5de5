import ArgumentParser
import CABackup

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check the repository for damage.",
        discussion: discussion(
            "Checks that every pack header parses and is indexed, every snapshot record is intact, and every tree of every snapshot loads and names only stored blobs. --read-data also reads every pack: its SHA-256 must match its name and every blob must decompress to its id; --read-data-subset N% reads that share of the packs. Each problem names the snapshots and paths it affects. Exit code 1 when anything is wrong."
        ))

    @OptionGroup var repository: RepositoryOptions

    @Flag(name: .customLong("read-data"), help: "Read and verify every blob.")
    var readData = false

    @Option(name: .customLong("read-data-subset"), help: "Read and verify this share of the packs, e.g. 10%.")
    var subset: String?

    func validate() throws {
        if let subset, parsePercent(subset) == nil {
            throw ValidationError("--read-data-subset '\(subset)' is not a percentage: use e.g. 10%")
        }
    }

    func run() throws {
        let repo = try repository.open()
        let fraction = readData ? 1 : subset.flatMap(parsePercent) ?? 0
        let line = ProgressLine()
        let report = try repo.check(options: CheckOptions(readDataFraction: fraction)) { line.update($0) }
        line.clear()
        for p in report.problems { print("error: \(p)") }
        var summary =
            "checked \(report.packsChecked) packs, \(report.snapshotsChecked) snapshots, \(report.treesChecked) trees"
        if report.packsRead > 0 { summary += "; read \(report.packsRead) packs, \(report.blobsRead) blobs" }
        print(summary)
        if report.isClean {
            print("no errors were found")
        } else {
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
