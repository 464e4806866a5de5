extension Node {
    /// The one rule for "has this file changed since an earlier snapshot", used by
    /// `snapshot` (to reuse the earlier content unread) and by `status` (to report a file
    /// unchanged without reading it): both are regular files and their size, mtime, ctime
    /// and inode are equal. ctime catches a same-size rewrite whose mtime was put back;
    /// the device number is not compared, as it can change across reboots for some file
    /// systems.
    func hasUnchangedContent(since earlier: Node) -> Bool {
        type == .file && earlier.type == .file && size == earlier.size && mtimeNs == earlier.mtimeNs
            && ctimeNs == earlier.ctimeNs && inode == earlier.inode
    }

    /// Whether an entry's extended attributes and inode flags can be taken from an
    /// earlier snapshot's unread: the same type, inode and ctime (setting an attribute or
    /// a flag moves the ctime).
    func hasUnchangedMetadata(since earlier: Node) -> Bool {
        type == earlier.type && ctimeNs == earlier.ctimeNs && inode == earlier.inode
    }
}
