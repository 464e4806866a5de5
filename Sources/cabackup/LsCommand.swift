import ArgumentParser
import CABackup

struct LsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ls",
        abstract: "List the entries of a snapshot.",
        discussion: discussion(
            "SNAPSHOT is a full id, a unique prefix of at least 8 hex digits, or `latest`. Names that are not UTF-8 are printed with \\xNN escapes; --json adds path_b64."
        ))

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var filters: FilterOptions

    @Flag(name: [.short, .long], help: "Show type, mode, owner, size and mtime.")
    var long = false

    @Flag(name: .long, help: "Print one JSON object per line.")
    var json = false

    @Argument(help: "Snapshot id, prefix or 'latest'.")
    var snapshot: String

    @Argument(help: "Only list this path (and below) inside the snapshot.")
    var path: String?

    struct Item: Encodable {
        let path: String
        let path_b64: String?
        let type: String
        let mode: UInt32
        let uid: UInt32
        let gid: UInt32
        let size: UInt64
        let mtime: String
        let link_target: String?
        /// Names of the extended attributes (values stay in the snapshot).
        let xattrs: [String]?
        /// Kept inode flags: immutable, append-only, nodump.
        let flags: [String]?
        /// The file has holes (restored as holes).
        let sparse: Bool?
    }

    func run() throws {
        let repo = try repository.open()
        let snap = try repo.findSnapshot(snapshot, matching: filters.filter)
        try repo.list(snap, path: path) { e in
            let n = e.node
            if json {
                let jp = JSONPath(e.path)
                print(
                    jsonLine(
                        Item(
                            path: jp.path, path_b64: jp.pathB64, type: n.type.description, mode: n.mode, uid: n.uid,
                            gid: n.gid, size: n.size, mtime: formatRFC3339(ns: n.mtimeNs),
                            link_target: n.type == .symlink ? String(decoding: n.linkTarget, as: UTF8.self) : nil,
                            xattrs: n.xattrs.isEmpty ? nil : n.xattrs.map(\.displayName),
                            flags: n.flags == 0 ? nil : flagNames(n.flags), sparse: n.dataRanges.isEmpty ? nil : true)))
            } else if long {
                let target = n.type == .symlink ? " -> " + displayPath(n.linkTarget) : ""
                let time = formatRFC3339(ns: n.mtimeNs).replacingOccurrences(of: "T", with: " ").prefix(19)
                // 11 columns hold uid/gid up to 5 digits each (65534/65534 is nobody), so the
                // columns after it line up.
                let owner = "\(n.uid)/\(n.gid)".rightPad(11)
                print("\(modeString(n)) \(owner) \(String(n.size).leftPad(12)) \(time) \(e.displayPath)\(target)")
            } else {
                print(e.displayPath)
            }
        }
    }
}

/// The names of kept inode flags, as `chattr` calls them in words.
func flagNames(_ flags: UInt32) -> [String] {
    [(InodeFlags.immutable, "immutable"), (InodeFlags.appendOnly, "append-only"), (InodeFlags.nodump, "nodump")]
        .filter { flags & $0.0 != 0 }.map(\.1)
}

/// `drwxr-xr-x`-style mode text.
func modeString(_ n: Node) -> String {
    let t: Character
    switch n.type {
    case .directory: t = "d"
    case .symlink: t = "l"
    case .fifo: t = "p"
    case .characterDevice: t = "c"
    case .blockDevice: t = "b"
    case .socket: t = "s"
    case .file: t = "-"
    }
    var s = String(t)
    let chars: [Character] = ["r", "w", "x"]
    for i in 0..<9 {
        s.append(n.mode & (1 << (8 - UInt32(i))) != 0 ? chars[i % 3] : "-")
    }
    return s
}

extension String {
    func leftPad(_ width: Int) -> String {
        count >= width ? self : String(repeating: " ", count: width - count) + self
    }

    func rightPad(_ width: Int) -> String {
        count >= width ? self : self + String(repeating: " ", count: width - count)
    }
}
