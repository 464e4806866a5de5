import CABackupCore
import CABackupFormat

/// The narrow view of a repository that walks of snapshot trees need: decoded tree blobs.
protocol TreeSource {
    /// The entries of one tree blob, in name order.
    func loadTree(_ id: BlobID) throws -> [Node]
}

extension TreeSource {
    /// The entries of several tree blobs, one after the other: all parts of a directory.
    func loadTrees(_ ids: [BlobID]) throws -> [Node] {
        var out: [Node] = []
        for id in ids { out += try loadTree(id) }
        return out
    }
}

extension Repository: TreeSource {}

/// What a visitor wants done below an entry.
enum TreeDecision {
    /// Walk a directory's trees (nothing for other entries).
    case descend
    /// Go on with the next entry.
    case skip
}

/// The hooks of a walk over one snapshot tree (``SnapshotTreeWalker/walk(trees:path:_:)``).
///
/// For each tree id of a directory: `enterTree`; unless it declines, the tree is loaded
/// and each of its entries visited in name order (a directory the visitor descends into
/// is walked at its position, then `leaveDirectory`), or `unreadable` when it cannot be
/// loaded; then `leaveTree`. Paths are absolute paths inside the snapshot; a tree's path
/// is its directory's (empty for the root).
protocol TreeVisitor {
    /// Before a tree is loaded: `false` skips it (already seen, missing). Default `true`.
    mutating func enterTree(_ id: BlobID, path: [UInt8]) throws -> Bool
    /// One entry; `path` ends with its name.
    mutating func visit(_ node: Node, path: [UInt8]) throws -> TreeDecision
    /// After a tree entered, whether it loaded or not: post-order per tree id.
    mutating func leaveTree(_ id: BlobID, path: [UInt8]) throws
    /// After everything below a directory the visitor descended into.
    mutating func leaveDirectory(_ node: Node, path: [UInt8]) throws
    /// A tree that cannot be loaded. The default rethrows, which ends the walk; a visitor
    /// that records the problem and returns lets the walk go on.
    mutating func unreadable(_ id: BlobID, path: [UInt8], error: any Error) throws
}

extension TreeVisitor {
    mutating func enterTree(_ id: BlobID, path: [UInt8]) throws -> Bool { true }
    mutating func leaveTree(_ id: BlobID, path: [UInt8]) throws {}
    mutating func leaveDirectory(_ node: Node, path: [UInt8]) throws {}
    mutating func unreadable(_ id: BlobID, path: [UInt8], error: any Error) throws { throw error }
}

/// The hooks of a comparison of two snapshot trees merged by name
/// (``SnapshotTreeWalker/compare(_:_:path:_:)``).
protocol TreePairVisitor {
    associatedtype Side: TreeVisitor
    /// Visits entries only in the older tree, and everything below them it descends into.
    var old: Side { get set }
    /// Visits entries only in the newer tree, and everything below them it descends into.
    var new: Side { get set }
    /// An entry of the same name and type in both trees. `.descend` compares two
    /// directories below, unless their trees are identical.
    mutating func visit(old: Node, new: Node, path: [UInt8]) throws -> TreeDecision
}

/// The one walk over snapshot trees: `ls`, restore, check, prune and diff are visitors.
///
/// Pre-order by name, one tree blob loaded at a time, sequential. Generic over the source
/// and the visitor, so each use is specialized and calls no existentials.
struct SnapshotTreeWalker<Source: TreeSource> {
    let source: Source

    init(_ source: Source) { self.source = source }

    /// Walks the trees of one directory (the root's: `[snapshot.tree]`) at `path` and
    /// everything below them the visitor descends into.
    func walk<V: TreeVisitor>(trees: [BlobID], path: [UInt8], _ v: inout V) throws {
        for id in trees {
            guard try v.enterTree(id, path: path) else { continue }
            let nodes: [Node]
            do {
                nodes = try source.loadTree(id)
            } catch {
                try v.unreadable(id, path: path, error: error)
                try v.leaveTree(id, path: path)
                continue
            }
            for n in nodes { try walk(n, path: path + [0x2F] + n.name, &v) }
            try v.leaveTree(id, path: path)
        }
    }

    /// Visits one entry at `path` and, if the visitor descends, everything below it.
    func walk<V: TreeVisitor>(_ node: Node, path: [UInt8], _ v: inout V) throws {
        guard try v.visit(node, path: path) == .descend, node.type == .directory else { return }
        try walk(trees: node.subtrees, path: path, &v)
        try v.leaveDirectory(node, path: path)
    }

    /// Compares two directories given by their trees, merged by name (bytewise). An
    /// entry in one only, or whose type changed (a removal and an addition), goes to the
    /// visitor's `old` or `new` side; directories whose trees are identical are skipped.
    /// An unreadable tree throws.
    func compare<V: TreePairVisitor>(_ a: [BlobID], _ b: [BlobID], path: [UInt8], _ v: inout V) throws {
        let a = try source.loadTrees(a)
        let b = try source.loadTrees(b)
        var i = 0
        var j = 0
        while i < a.count || j < b.count {
            let order: Int
            if i == a.count {
                order = 1
            } else if j == b.count {
                order = -1
            } else if a[i].name == b[j].name {
                order = 0
            } else {
                order = a[i].name.lexicographicallyPrecedes(b[j].name) ? -1 : 1
            }
            if order < 0 {
                try walk(a[i], path: path + [0x2F] + a[i].name, &v.old)
                i += 1
            } else if order > 0 {
                try walk(b[j], path: path + [0x2F] + b[j].name, &v.new)
                j += 1
            } else {
                let p = path + [0x2F] + a[i].name
                if a[i].type != b[j].type {
                    try walk(a[i], path: p, &v.old)
                    try walk(b[j], path: p, &v.new)
                } else if try v.visit(old: a[i], new: b[j], path: p) == .descend, a[i].type == .directory,
                    a[i].subtrees != b[j].subtrees
                {
                    try compare(a[i].subtrees, b[j].subtrees, path: p, &v)
                }
                i += 1
                j += 1
            }
        }
    }
}
