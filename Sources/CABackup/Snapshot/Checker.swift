import CABackupCore
import CABackupFormat

/// Options for ``Repository/check(options:progress:)``.
public struct CheckOptions: Sendable {
    /// The fraction of packs (0…1) whose every byte is read and verified: 0 checks
    /// structure only, 1 is `--read-data`.
    public var readDataFraction: Double

    public init(readDataFraction: Double = 0) {
        self.readDataFraction = min(1, max(0, readDataFraction))
    }
}

/// One problem `check` found.
public struct CheckProblem: Sendable, CustomStringConvertible {
    /// What is wrong, in one line.
    public var message: String
    /// The snapshots affected (short ids), when known.
    public var snapshots: [String]
    /// Paths inside those snapshots affected, when known.
    public var paths: [String]

    public var description: String {
        var s = message
        if !snapshots.isEmpty { s += " (snapshots \(snapshots.joined(separator: ", ")))" }
        if !paths.isEmpty { s += ": " + paths.prefix(10).joined(separator: ", ") + (paths.count > 10 ? ", …" : "") }
        return s
    }
}

/// What `check` found.
public struct CheckReport: Sendable {
    public var problems: [CheckProblem] = []
    public var packsChecked = 0
    public var packsRead = 0
    public var blobsRead = 0
    public var snapshotsChecked = 0
    public var treesChecked = 0
    public var isClean: Bool { problems.isEmpty }
}

extension Repository {
    /// Checks the repository: every pack header parses, every snapshot record is intact,
    /// every tree of every snapshot loads (verified) and every blob it names is indexed.
    /// With `readDataFraction` > 0, that fraction of packs is read in full: the pack's
    /// SHA-256 must match its name and every blob must decompress to its id. Each problem
    /// names the snapshots and paths it affects.
    public func check(options: CheckOptions = CheckOptions(), progress: ((String) -> Void)? = nil) throws -> CheckReport
    {
        var report = CheckReport()
        var badBlobs: [BlobID: String] = [:]

        // Packs: headers, and with read-data their bytes.
        let packs = try storage.list(.pack).compactMap { ObjectID(hex: $0) }.sorted()
        let indexed = try index.packIDs()
        let hasher = SHA256Hasher()
        let codec = makeCodec()
        let buffers = BlobBuffers()
        for (n, pack) in packs.enumerated() {
            report.packsChecked += 1
            let entries: [PackEntry]
            do {
                entries = try readPackHeader(pack)
            } catch {
                report.problems.append(CheckProblem(message: "\(error)", snapshots: [], paths: []))
                // Whatever the index places in this pack cannot be read back.
                for id in try index.blobIDs(inPack: pack) {
                    badBlobs[id] = "is in pack \(pack.hex.prefix(8)), whose header is damaged"
                }
                continue
            }
            if !indexed.contains(pack) {
                report.problems.append(
                    CheckProblem(
                        message: "pack \(pack.hex) is not in the index: run 'cabackup repair index'", snapshots: [],
                        paths: []))
            }
            // Deterministic selection: packs whose first id byte falls under the fraction.
            let selected = pack.withUnsafeBytes { Double($0[0]) / 256 } < options.readDataFraction
            guard selected else { continue }
            progress?("reading pack \(n + 1) of \(packs.count)")
            report.packsRead += 1
            if let damage = verifyPack(
                pack, entries: entries, hasher: hasher, codec: codec, buffers: buffers, report: &report)
            {
                for (id, why) in damage { badBlobs[id] = why }
            }
        }

        // Snapshots and their trees.
        var trees = TreeChecker(index: index, bad: badBlobs, report: report)
        let walker = SnapshotTreeWalker(self)
        let snapshotNames = try storage.list(.snapshot).compactMap { ObjectID(hex: $0) }
        let forgets = try index.forgetIDs()
        for id in snapshotNames where !forgets.contains(id) {
            trees.report.snapshotsChecked += 1
            let snap: Snapshot
            do {
                let stored = try storage.read(.snapshot, id.hex)
                do {
                    snap = try decodeRecord(id: id, stored: stored)
                } catch {
                    // A forget record lives among the snapshot records: intact, it is no problem.
                    if decodeForget(id: id, stored: stored) != nil {
                        trees.report.snapshotsChecked -= 1
                        continue
                    }
                    throw error
                }
            } catch {
                trees.report.problems.append(
                    CheckProblem(message: "snapshot \(id.hex): \(error)", snapshots: [], paths: []))
                continue
            }
            progress?("checking snapshot \(snap.id.shortHex)")
            trees.snapshot = snap.id.shortHex
            try walker.walk(trees: [snap.tree], path: [], &trees)
        }
        report = trees.report
        let affected = trees.affected
        for (blob, a) in affected.sorted(by: { $0.key < $1.key }) {
            let why = badBlobs[blob] ?? "is missing from the repository"
            report.problems.append(
                CheckProblem(message: "blob \(blob.hex) \(why)", snapshots: a.snapshots.sorted(), paths: a.paths))
        }
        // Damaged blobs no snapshot uses are still worth knowing about.
        for (blob, why) in badBlobs where affected[blob] == nil {
            report.problems.append(CheckProblem(message: "blob \(blob.hex) \(why) (unused)", snapshots: [], paths: []))
        }
        return report
    }

    /// Reads a whole pack: its hash must match its name, each blob must verify. Returns
    /// the damaged blobs with the reason.
    private func verifyPack(
        _ pack: PackID, entries: [PackEntry], hasher: SHA256Hasher, codec: BlobCodec, buffers: BlobBuffers,
        report: inout CheckReport
    ) -> [(BlobID, String)]? {
        var damaged: [(BlobID, String)] = []
        do {
            let size = try storage.size(.pack, pack.hex)
            // Hash the file in 4 MiB pieces.
            var offset: Int64 = 0
            let piece = 4 << 20
            let buf = UnsafeMutableRawPointer.allocate(byteCount: piece, alignment: 64)
            defer { buf.deallocate() }
            hasher.reset()
            while offset < size {
                let n = Int(min(Int64(piece), size - offset))
                try storage.read(.pack, pack.hex, offset: offset, length: n, into: buf)
                hasher.update(UnsafeRawBufferPointer(start: buf, count: n))
                offset += Int64(n)
            }
            if hasher.finish() != pack {
                report.problems.append(
                    CheckProblem(message: "pack \(pack.hex): content does not match its name", snapshots: [], paths: [])
                )
            }
        } catch {
            report.problems.append(CheckProblem(message: "pack \(pack.hex): \(error)", snapshots: [], paths: []))
        }
        for e in entries {
            report.blobsRead += 1
            let loc = BlobLocation(pack: pack, entry: e)
            do {
                _ = try loadBlob(e.id, at: loc, into: buffers, codec: codec)
            } catch let error as CABackupError {
                if case .corrupt(_, let reason) = error {
                    damaged.append((e.id, "in pack \(pack.hex.prefix(8)) is damaged (\(reason))"))
                } else {
                    damaged.append((e.id, "in pack \(pack.hex.prefix(8)) cannot be read (\(error))"))
                }
            } catch {
                damaged.append((e.id, "in pack \(pack.hex.prefix(8)) cannot be read (\(error))"))
            }
        }
        return damaged
    }
}

/// `check`'s walk of snapshot trees: every tree must load and every blob it names must
/// be indexed and sound. Problems are attributed to the snapshot being walked and the
/// path inside it.
///
/// `clean` holds trees already found sound, which are not walked again (unchanged
/// directories and shared snapshots cost nothing); a tree with a problem is walked again
/// for each snapshot, so every affected snapshot is named.
private struct TreeChecker: TreeVisitor {
    let index: RepositoryIndex
    /// Blobs found damaged while reading packs, with the reason.
    let bad: [BlobID: String]
    var report: CheckReport
    /// The snapshot being walked (short id).
    var snapshot = ""
    var clean = Set<BlobID>()
    /// For each missing or damaged blob: the snapshots and paths that need it.
    var affected: [BlobID: (snapshots: Set<String>, paths: [String])] = [:]
    /// One flag per tree being walked, innermost last: whether a problem was found below
    /// it. The first stands for the snapshot, outside any tree.
    private var found = [false]

    init(index: RepositoryIndex, bad: [BlobID: String], report: CheckReport) {
        self.index = index
        self.bad = bad
        self.report = report
    }

    private func isMissingOrBad(_ id: BlobID) throws -> Bool {
        if bad[id] != nil { return true }
        return try index.lookup(id) == nil
    }

    private mutating func note(_ blob: BlobID, _ path: [UInt8]) {
        found[found.count - 1] = true
        var a = affected[blob] ?? ([], [])
        a.snapshots.insert(snapshot)
        let shown = displayPath(path.isEmpty ? [0x2F] : path)
        if a.paths.count < 100 && !a.paths.contains(shown) { a.paths.append(shown) }
        affected[blob] = a
    }

    mutating func enterTree(_ id: BlobID, path: [UInt8]) throws -> Bool {
        if try isMissingOrBad(id) {
            note(id, path)
            return false
        }
        // A tree already checked (shared by snapshots or unchanged directories) is not
        // walked again; its problems were reported with the first snapshot.
        if clean.contains(id) { return false }
        report.treesChecked += 1
        found.append(false)
        return true
    }

    mutating func unreadable(_ id: BlobID, path: [UInt8], error: any Error) throws {
        report.problems.append(
            CheckProblem(
                message: "tree \(id.hex): \(error)", snapshots: [snapshot],
                paths: [displayPath(path.isEmpty ? [0x2F] : path)]))
        found[found.count - 1] = true
    }

    mutating func visit(_ node: Node, path: [UInt8]) throws -> TreeDecision {
        if node.type == .directory { return .descend }
        for blob in node.content where try isMissingOrBad(blob) { note(blob, path) }
        return .skip
    }

    mutating func leaveTree(_ id: BlobID, path: [UInt8]) throws {
        if found.removeLast() {
            found[found.count - 1] = true
        } else {
            clean.insert(id)
        }
    }
}
