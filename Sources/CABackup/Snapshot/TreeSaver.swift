import CABackupCore
import CABackupFormat

/// A directory as the parent snapshot has it: its entries and the tree blobs holding them.
struct ParentDirectory {
    var entries: [Node]
    var trees: [BlobID]
}

/// A directory whose entries are known but whose files may still be in the pipeline.
final class PendingDirectory {
    enum Entry {
        /// Encoded (or counted as the parent's) and dropped.
        case absorbed
        case done(Node)
        case file(Node, FileJob)
        case directory(PendingDirectory)
    }

    var node: Node
    /// Entries from `absorbed` on are still held; those before it are encoded (or
    /// counted as equal to the parent's) and dropped.
    var entries: [Entry] = []
    var absorbed = 0
    /// Entries before this one are files whose chunks are all hashed (or not files).
    var readyCursor = 0
    /// The same directory in the parent snapshot: while every entry so far equals its
    /// entry at the same position (`matched` of them), nothing is encoded; if all do,
    /// its trees are reused as they are.
    var parent: ParentDirectory?
    var matched = 0
    /// An entry differed from the parent's: entries are encoded from then on.
    var diverged = false
    /// Tree blobs stored so far (all but the last), and the encoder of the next.
    var parts: [BlobID] = []
    var encoder: TreeEncoder
    /// The directory's node with its subtrees, once finalized.
    var result: Node?
    let isRoot: Bool

    init(node: Node, isRoot: Bool = false) {
        self.node = node
        self.isRoot = isRoot
        encoder = TreeEncoder(splitting: !isRoot)
    }

    /// Entries not yet absorbed.
    var held: Int { entries.count - absorbed }
}

/// Turns walked directories into tree blobs, in post-order.
///
/// A directory is handed over when its walk is done (``add(_:)``) and waits in a FIFO
/// until its files are hashed; the FIFO is in post-order, so a child's tree ids exist
/// before its parent is encoded. The walk blocks on the FIFO only when more than 4,096
/// directories wait, and once at the end (``finish(root:)``).
///
/// Width is bounded too: entries are absorbed as they become ready — a file once its
/// chunks are hashed, a subdirectory once its trees are stored — and absorbing encodes
/// them straight into the directory's current tree blob (``TreeEncoder``), storing each
/// blob as soon as it is full. A directory being walked that holds more than
/// ``window`` entries not yet absorbed waits for the oldest one. So a directory of a
/// million entries holds one tree blob of at most 1 MiB and a window of entries, not a
/// million nodes. An unchanged directory encodes nothing: while its entries equal the
/// parent snapshot's one for one they are only counted, and if all are equal the
/// parent's trees are reused.
// Safe: used on the walking thread only; `FileJob`s are read under the file saver's `cond`.
final class TreeSaver {
    private let cond: Condition
    private let writer: BlobSaver
    /// The walk's codec, for the trees it stores (parent trees load through the
    /// repository's pool of codecs and buffers).
    private let codec: BlobCodec
    private var queue: [PendingDirectory] = []
    private var head = 0
    /// Regular files and directories in the snapshot.
    private(set) var filesTotal = 0
    private(set) var directoriesTotal = 0

    /// Entries a directory being walked may hold before the walk waits for the oldest.
    static let window = 4096

    init(files: FileSaver, writer: BlobSaver, codec: BlobCodec) {
        self.cond = files.cond
        self.writer = writer
        self.codec = codec
    }

    /// A directory's walk is done: its trees are stored once its files are hashed.
    func add(_ pd: PendingDirectory) throws {
        queue.append(pd)
        try drain(blocking: queue.count - head > 4096)
    }

    /// An entry was added to `pd` (still being walked): absorbs what is ready, and waits
    /// for the oldest entry when more than ``window`` are held.
    func entryAdded(to pd: PendingDirectory) throws {
        if pd.held <= Self.window { return }
        try absorb(pd, waiting: false)
        while pd.held > Self.window { try absorb(pd, waiting: true, limit: pd.held - Self.window / 2) }
    }

    /// The root's walk is done: stores every tree left; returns the root's node.
    func finish(root: PendingDirectory) throws -> Node {
        queue.append(root)
        try drain(blocking: true)
        guard let result = root.result else {
            throw CABackupError.invalidArgument("internal error: root tree not finalized")
        }
        return result
    }

    /// Finalizes the directories at the head of the FIFO whose files are all hashed.
    /// With `blocking`, waits for all of them.
    private func drain(blocking: Bool) throws {
        while head < queue.count {
            let pd = queue[head]
            if !blocking && !isReady(pd) { break }
            try absorb(pd, waiting: true)
            try finalize(pd)
            head += 1
            if head > 1024 {
                queue.removeFirst(head)
                head = 0
            }
        }
    }

    private func isReady(_ pd: PendingDirectory) -> Bool {
        cond.locked { isReadyLocked(pd) }
    }

    private func isReadyLocked(_ pd: PendingDirectory) -> Bool {
        while pd.readyCursor < pd.entries.count {
            if case .file(_, let job) = pd.entries[pd.readyCursor], !job.isComplete { return false }
            pd.readyCursor += 1
        }
        return true
    }

    /// Absorbs `pd`'s entries from the oldest on while they are ready (at most `limit`).
    /// With `waiting`, waits for each instead: a file until its chunks are hashed, a
    /// subdirectory until the FIFO has finalized it.
    private func absorb(_ pd: PendingDirectory, waiting: Bool, limit: Int = .max) throws {
        var done = 0
        while pd.absorbed < pd.entries.count && done < limit {
            let node: Node?
            switch pd.entries[pd.absorbed] {
            case .absorbed:
                node = nil
            case .done(let n):
                node = n
                if n.type == .file { filesTotal += 1 }
            case .file(var n, let job):
                cond.lock()
                if !job.isComplete && !waiting {
                    cond.unlock()
                    return
                }
                while !job.isComplete { cond.wait() }
                let (ids, size, failed, extras) = (job.ids, job.size, job.failed, job.extras)
                cond.unlock()
                if failed {
                    node = nil
                } else {
                    n.content = ids
                    n.size = UInt64(size)
                    n.xattrs = extras.xattrs
                    n.flags = extras.flags
                    n.dataRanges = extras.dataRanges
                    node = n
                    filesTotal += 1
                }
            case .directory(let sub):
                if sub.result == nil {
                    if !waiting { return }
                    // Its trees come before this directory's in the FIFO (post-order).
                    while sub.result == nil, head < queue.count, queue[head] !== pd {
                        let first = queue[head]
                        try absorb(first, waiting: true)
                        try finalize(first)
                        head += 1
                    }
                }
                guard let r = sub.result else {
                    throw CABackupError.invalidArgument("internal error: a subdirectory's tree was not stored")
                }
                node = r
                directoriesTotal += 1
            }
            // Drop the entry (a subdirectory's pending state, a file's job) at once.
            pd.entries[pd.absorbed] = .absorbed
            pd.absorbed += 1
            done += 1
            if let node { try absorb(node, into: pd) }
            if pd.absorbed > 1024 && pd.absorbed * 2 > pd.entries.count {
                pd.entries.removeFirst(pd.absorbed)
                pd.readyCursor = max(0, pd.readyCursor - pd.absorbed)
                pd.absorbed = 0
            }
        }
    }

    /// Adds one finished entry to the directory's trees.
    private func absorb(_ node: Node, into pd: PendingDirectory) throws {
        if !pd.diverged, let parent = pd.parent {
            if pd.matched < parent.entries.count && node == parent.entries[pd.matched] {
                pd.matched += 1
                return
            }
            try diverge(pd)
        }
        pd.diverged = true
        if let full = pd.encoder.append(node) { pd.parts.append(try store(full)) }
    }

    /// The entries counted as equal to the parent's are encoded after all.
    private func diverge(_ pd: PendingDirectory) throws {
        pd.diverged = true
        guard let parent = pd.parent else { return }
        for n in parent.entries[..<pd.matched] {
            if let full = pd.encoder.append(n) { pd.parts.append(try store(full)) }
        }
        pd.parent = nil
    }

    private func finalize(_ pd: PendingDirectory) throws {
        precondition(pd.absorbed == pd.entries.count, "a directory is finalized with entries held")
        pd.entries = []
        pd.absorbed = 0
        pd.readyCursor = 0
        var node = pd.node
        if !pd.isRoot, !pd.diverged, let parent = pd.parent, pd.matched == parent.entries.count {
            // Nothing in it changed: the parent's trees, which were just loaded from the
            // repository, are this directory's too (equal entries encode to equal bytes).
            node.subtrees = parent.trees
            writer.reuse(parent.trees)
        } else {
            if !pd.diverged { try diverge(pd) }
            pd.parts.append(try store(pd.encoder.finish()))
            node.subtrees = pd.parts
        }
        pd.parent = nil
        pd.parts = []
        pd.result = node
    }

    private func store(_ bytes: [UInt8]) throws -> BlobID {
        try bytes.withUnsafeBytes { (raw) throws in
            let id = codec.id(raw)
            if try writer.claim(id) { try writer.addEncoding(id, type: .tree, raw: raw, codec: codec) }
            return id
        }
    }
}
