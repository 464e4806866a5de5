import CABackup
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The read-only tree a mounted repository shows: every snapshot by date, id, host and
/// tag, each holding the paths it backed up.
///
/// ```
/// snapshots/2026-12-05T18:13:00+01:00/home/a/…   by time (local, as restic names them)
/// snapshots/latest -> 2026-12-05T18:13:00+01:00
/// ids/1a2b3c4d/home/a/…                           by short id
/// hosts/laptop/2026-12-05T18:13:00+01:00/…        by host, with its own latest
/// tags/daily/2026-12-05T18:13:00+01:00/…          by tag, with its own latest
/// ```
///
/// Two snapshots of the same second get `-1`, `-2` … after the later ones' names. The
/// list of snapshots is read again when a listing of these directories is asked for and
/// the last reading is older than ``refreshInterval``, so snapshots taken while mounted
/// appear. Paths are byte strings, as the kernel hands them over.
///
/// Memory is bounded: directory listings are kept up to a budget of entries and content
/// ids, file contents up to a few blobs; nothing depends on the repository's size.
/// Every blob is verified as it is read. Safe to call from several threads.
public final class SnapshotNamespace: Sendable {
    /// What a path names.
    public enum Item: Sendable {
        /// One of the directories that group snapshots (`/`, `snapshots`, `hosts/laptop` …).
        case directory(mtimeNs: Int64)
        /// A `latest` link, with its target (a sibling's name).
        case symlink(target: [UInt8], mtimeNs: Int64)
        /// An entry inside a snapshot (the snapshot's root is a directory node).
        case node(Node)
    }

    /// Why a path names nothing, or could not be read.
    public enum Failure: Error, Sendable {
        case notFound
        case notDirectory
        case isDirectory
        case readFailed(String)
    }

    public let repository: Repository
    public let filter: SnapshotFilter
    /// The least time between two readings of the snapshot list, in nanoseconds.
    public let refreshInterval: Int64

    private struct Layout {
        var loadedNs: Int64 = .min
        var newestNs: Int64 = 0
        /// Snapshot names by time, oldest first.
        var byTime: [(name: [UInt8], snapshot: Snapshot)] = []
        var byID: [[UInt8]: Snapshot] = [:]
        var hosts: [[UInt8]: [(name: [UInt8], snapshot: Snapshot)]] = [:]
        var tags: [[UInt8]: [(name: [UInt8], snapshot: Snapshot)]] = [:]
    }

    private let layout = Mutex(Layout())
    /// A directory's entries, with their positions by name (a lookup costs no scan).
    private struct Listing: Sendable {
        let nodes: [Node]
        let byName: [[UInt8]: Int]
    }

    private let directories: Mutex<BoundedCache<[BlobID], Listing>>
    private let blobs: Mutex<BoundedCache<BlobID, [UInt8]>>

    /// - Parameters:
    ///   - repository: the open repository to show.
    ///   - filter: which snapshots to show (by host, tag, path).
    ///   - refreshIntervalSeconds: the least time between two readings of the snapshot list.
    ///   - directoryBudget: how many entries and content ids the kept listings may hold.
    ///   - blobBudget: how many bytes of file content are kept for reads nearby.
    public init(
        repository: Repository, filter: SnapshotFilter = SnapshotFilter(), refreshIntervalSeconds: Int = 5,
        directoryBudget: Int = 1 << 21, blobBudget: Int = 64 << 20
    ) {
        self.repository = repository
        self.filter = filter
        self.refreshInterval = Int64(refreshIntervalSeconds) * 1_000_000_000
        directories = Mutex(BoundedCache(budget: directoryBudget))
        blobs = Mutex(BoundedCache(budget: blobBudget))
    }

    // MARK: Paths

    /// The item at `path` (absolute, `/` separated).
    public func item(at path: [UInt8]) throws -> Item {
        let parts = components(path)
        guard let first = parts.first else { return .directory(mtimeNs: try current().newestNs) }
        switch first {
        case Array("snapshots".utf8):
            return try inGroup(Array(parts.dropFirst()), { $0.byTime })
        case Array("ids".utf8):
            let l = try current()
            guard parts.count > 1 else { return .directory(mtimeNs: l.newestNs) }
            guard let s = try find({ $0.byID[parts[1]] }) else { throw Failure.notFound }
            return try inSnapshot(s, Array(parts.dropFirst(2)))
        case Array("hosts".utf8), Array("tags".utf8):
            let byHost = first == Array("hosts".utf8)
            guard parts.count > 1 else { return .directory(mtimeNs: try current().newestNs) }
            let key = parts[1]
            guard try find({ (byHost ? $0.hosts : $0.tags)[key] }) != nil else { throw Failure.notFound }
            return try inGroup(Array(parts.dropFirst(2)), { (byHost ? $0.hosts : $0.tags)[key] ?? [] })
        default:
            throw Failure.notFound
        }
    }

    /// The names in the directory at `path`, with what each names.
    public func list(_ path: [UInt8]) throws -> [(name: [UInt8], item: Item)] {
        let parts = components(path)
        guard let first = parts.first else {
            let t = try current(refresh: true).newestNs
            return ["snapshots", "ids", "hosts", "tags"].map { (Array($0.utf8), .directory(mtimeNs: t)) }
        }
        func group(_ entries: [(name: [UInt8], snapshot: Snapshot)]) -> [(name: [UInt8], item: Item)] {
            guard let last = entries.last else { return [] }
            var out = entries.map { (name: $0.name, item: Item.node(root($0.snapshot))) }
            out.append((Array("latest".utf8), .symlink(target: last.name, mtimeNs: last.snapshot.timeNs)))
            return out
        }
        if parts.count == 1 || (parts.count == 2 && first != Array("snapshots".utf8) && first != Array("ids".utf8)) {
            let l = try current(refresh: true)
            switch first {
            case Array("snapshots".utf8): return group(l.byTime)
            case Array("ids".utf8):
                return l.byID.sorted { $0.value.timeNs < $1.value.timeNs }.map { ($0.key, .node(root($0.value))) }
            case Array("hosts".utf8), Array("tags".utf8):
                let map = first == Array("hosts".utf8) ? l.hosts : l.tags
                if parts.count == 1 {
                    return map.keys.sorted { $0.lexicographicallyPrecedes($1) }.map {
                        ($0, .directory(mtimeNs: map[$0]?.last?.snapshot.timeNs ?? 0))
                    }
                }
                guard let entries = map[parts[1]] else { throw Failure.notFound }
                return group(entries)
            default:
                throw Failure.notFound
            }
        }
        guard case .node(let node) = try item(at: path) else { throw Failure.notDirectory }
        guard node.type == .directory else { throw Failure.notDirectory }
        return try listing(of: node).nodes.map { ($0.name, .node($0)) }
    }

    // MARK: Reading files

    /// An open file: its blobs' offsets, found once.
    public struct OpenFile: Sendable {
        public let node: Node
        /// The offset of each blob of `node.content`, and the file's end.
        let starts: [Int64]
    }

    /// Looks up the lengths of a file's blobs (from the index; nothing is read).
    public func open(_ node: Node) throws -> OpenFile {
        guard node.type == .file else { throw node.type == .directory ? Failure.isDirectory : Failure.notFound }
        var starts: [Int64] = []
        starts.reserveCapacity(node.content.count + 1)
        var at: Int64 = 0
        do {
            for id in node.content {
                starts.append(at)
                at += Int64(try repository.blobSize(id))
            }
        } catch {
            throw Failure.readFailed("\(error)")
        }
        starts.append(at)
        return OpenFile(node: node, starts: starts)
    }

    /// Up to `count` bytes of `file` from `offset` (fewer at its end), into `buffer`;
    /// returns how many.
    public func read(_ file: OpenFile, offset: Int64, count: Int, into buffer: UnsafeMutableRawPointer) throws -> Int {
        guard offset >= 0, let end = file.starts.last, offset < end, count > 0 else { return 0 }
        // The blob holding `offset`: the last start at or before it.
        var lo = 0
        var hi = file.starts.count - 2
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if file.starts[mid] <= offset { lo = mid } else { hi = mid - 1 }
        }
        var done = 0
        var index = lo
        var at = offset
        while done < count, index < file.node.content.count {
            let id = file.node.content[index]
            let bytes = try blob(id)
            let start = file.starts[index]
            guard Int64(bytes.count) == file.starts[index + 1] - start else {
                throw Failure.readFailed("blob \(id.hex) is not the length the index gives")
            }
            let from = Int(at - start)
            let n = min(bytes.count - from, count - done)
            if n > 0 {
                bytes.withUnsafeBytes { b in (buffer + done).copyMemory(from: b.baseAddress! + from, byteCount: n) }
                done += n
                at += Int64(n)
            }
            index += 1
        }
        return done
    }

    // MARK: Inside

    private func blob(_ id: BlobID) throws -> [UInt8] {
        if let b = blobs.withLock({ $0.get(id) }) { return b }
        let bytes: [UInt8]
        do { bytes = try repository.loadBlob(id) } catch { throw Failure.readFailed("\(error)") }
        blobs.withLock { $0.put(id, bytes, cost: max(bytes.count, 1)) }
        return bytes
    }

    private func listing(of directory: Node) throws -> Listing {
        if let listing = directories.withLock({ $0.get(directory.subtrees) }) { return listing }
        let nodes: [Node]
        do { nodes = try repository.loadDirectory(directory) } catch { throw Failure.readFailed("\(error)") }
        var byName: [[UInt8]: Int] = [:]
        byName.reserveCapacity(nodes.count)
        // A repeated name (only in a damaged or forged tree) resolves to its first entry.
        for (i, n) in nodes.enumerated() where byName[n.name] == nil { byName[n.name] = i }
        let listing = Listing(nodes: nodes, byName: byName)
        let cost = nodes.reduce(1) { $0 + 2 + $1.content.count + $1.subtrees.count }
        directories.withLock { $0.put(directory.subtrees, listing, cost: cost) }
        return listing
    }

    private func root(_ s: Snapshot) -> Node {
        var n = Node(name: [], type: .directory)
        n.subtrees = [s.tree]
        n.mode = 0o755
        n.mtimeNs = s.timeNs
        n.ctimeNs = s.timeNs
        return n
    }

    /// A path below a group of snapshot names (`snapshots/…`, `hosts/laptop/…`).
    private func inGroup(
        _ parts: [[UInt8]], _ entries: (Layout) -> [(name: [UInt8], snapshot: Snapshot)]
    ) throws -> Item {
        guard let name = parts.first else {
            return .directory(mtimeNs: entries(try current()).last?.snapshot.timeNs ?? 0)
        }
        if name == Array("latest".utf8), parts.count == 1 {
            guard let last = entries(try current()).last else { throw Failure.notFound }
            return .symlink(target: last.name, mtimeNs: last.snapshot.timeNs)
        }
        guard let s = try find({ l in entries(l).first(where: { $0.name == name })?.snapshot }) else {
            throw Failure.notFound
        }
        return try inSnapshot(s, Array(parts.dropFirst()))
    }

    private func inSnapshot(_ s: Snapshot, _ parts: [[UInt8]]) throws -> Item {
        var node = root(s)
        for part in parts {
            guard node.type == .directory else { throw Failure.notDirectory }
            let listing = try listing(of: node)
            guard let i = listing.byName[part] else { throw Failure.notFound }
            node = listing.nodes[i]
        }
        return .node(node)
    }

    /// Looks a name up in the current layout; a miss reads the snapshot list again
    /// (when the interval allows), since a snapshot may have been taken meanwhile.
    private func find<T>(_ lookup: (Layout) -> T?) throws -> T? {
        if let hit = lookup(try current()) { return hit }
        return lookup(try current(refresh: true))
    }

    private func current(refresh: Bool = false) throws -> Layout {
        let now = monotonicNs()
        let l = layout.withLock { $0 }
        if l.loadedNs != .min && (!refresh || now - l.loadedNs < refreshInterval) { return l }
        let fresh: Layout
        do {
            if l.loadedNs != .min { try repository.synchronizeIndex() }
            fresh = Self.layout(try repository.snapshots(matching: filter), at: now)
        } catch {
            throw Failure.readFailed("\(error)")
        }
        layout.withLock { $0 = fresh }
        return fresh
    }

    private static func layout(_ snapshots: [Snapshot], at now: Int64) -> Layout {
        let sorted = snapshots.sorted { ($0.timeNs, $0.id.hex) < ($1.timeNs, $1.id.hex) }
        var l = Layout()
        l.loadedNs = now
        l.newestNs = sorted.last?.timeNs ?? 0
        l.byTime = named(sorted)
        for s in sorted { l.byID[Array(s.id.hex.prefix(8).utf8)] = s }
        var hosts: [[UInt8]: [Snapshot]] = [:]
        var tags: [[UInt8]: [Snapshot]] = [:]
        for s in sorted {
            hosts[safeName(s.hostname), default: []].append(s)
            for t in Set(s.tags) { tags[safeName(t), default: []].append(s) }
        }
        l.hosts = hosts.mapValues(named)
        l.tags = tags.mapValues(named)
        return l
    }

    /// Names by local time; the second and later of one second get `-1`, `-2` ….
    private static func named(_ snapshots: [Snapshot]) -> [(name: [UInt8], snapshot: Snapshot)] {
        var seen: [String: Int] = [:]
        return snapshots.map { s in
            let base = timeName(s.timeNs)
            let n = seen[base, default: 0]
            seen[base] = n + 1
            return (Array((n == 0 ? base : "\(base)-\(n)").utf8), s)
        }
    }

    /// A host or tag as one path component: `/` and NUL become `_`; `.` and `..` get a `_`.
    static func safeName(_ text: String) -> [UInt8] {
        var b = Array(text.utf8).map { $0 == 0x2F || $0 == 0 ? UInt8(ascii: "_") : $0 }
        if b.isEmpty || b == [0x2E] || b == [0x2E, 0x2E] { b.append(UInt8(ascii: "_")) }
        return b
    }

    /// `2026-12-05T18:13:00+01:00`: the local time of `ns` to the second (what
    /// ``formatRFC3339(ns:)`` writes, without its nanoseconds).
    static func timeName(_ ns: Int64) -> String {
        let full = formatRFC3339(ns: ns)
        return String(full.prefix(19) + full.dropFirst(29))
    }

    private func components(_ path: [UInt8]) -> [[UInt8]] {
        path.split(separator: 0x2F).map(Array.init)
    }

    private func monotonicNs() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }
}

/// A map that forgets its least recently used entries once their costs pass a budget.
struct BoundedCache<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    let budget: Int
    private var entries: [Key: (value: Value, cost: Int, used: UInt64)] = [:]
    private var total = 0
    private var clock: UInt64 = 0

    init(budget: Int) { self.budget = budget }

    mutating func get(_ key: Key) -> Value? {
        guard var e = entries[key] else { return nil }
        clock += 1
        e.used = clock
        entries[key] = e
        return e.value
    }

    mutating func put(_ key: Key, _ value: Value, cost: Int) {
        guard cost <= budget else { return }
        clock += 1
        if let old = entries.updateValue((value, cost, clock), forKey: key) { total -= old.cost }
        total += cost
        guard total > budget else { return }
        // Evict the older half of the budget at once: sorting is paid once per many puts.
        for (k, e) in entries.sorted(by: { $0.value.used < $1.value.used }) where total > budget / 2 {
            if k == key { continue }
            entries[k] = nil
            total -= e.cost
        }
    }
}
