import CABackupCore
import CABackupFormat

/// Where a restore writes: the restorer decides what to create, in which order and with
/// which bytes, and the sink creates it (``LocalFileSink``: files below a directory; a
/// tar or zip writer would be another).
///
/// Entries come from one thread, in the snapshot's pre-order; file bytes come from the
/// workers. `path` is the entry's absolute path inside the snapshot, for messages. A
/// method that throws fails that entry only (reported with the error's text, as
/// ``RestoreEntryError`` words it); the restore goes on.
protocol RestoreSink: Sendable {
    associatedtype Directory: Sendable
    associatedtype File: RestoreFile

    /// The directory the snapshot's root is restored into.
    var root: Directory { get }
    /// Creates a directory; its metadata is applied by ``finish()``.
    func makeDirectory(_ node: Node, path: [UInt8], in dir: Directory) throws -> Directory
    /// Creates an empty regular file for the workers to fill.
    func createFile(_ node: Node, path: [UInt8], in dir: Directory) throws -> File
    /// Creates a symbolic link, metadata included.
    func makeSymlink(_ node: Node, path: [UInt8], in dir: Directory) throws
    /// Creates a FIFO or a device file, metadata included.
    func makeSpecial(_ node: Node, path: [UInt8], in dir: Directory) throws
    /// Makes `path` another name of the file restored at `first`; called after every
    /// file is committed.
    func hardLink(_ path: [UInt8], to first: [UInt8]) throws
    /// Applies directory metadata, deepest first, once everything is written, then the
    /// inode flags of every entry (an immutable file cannot be linked or changed after).
    func finish() throws
    /// Entries restored without some of their metadata (see ``RestoreResult/warnings``).
    var warnings: [RestoreFailure] { get }
    /// `delete`: the names in a directory of the target (restored or already there).
    func names(in dir: Directory) throws -> [[UInt8]]
    /// `delete`: removes an entry of a directory and everything below it, never following
    /// a symlink and never leaving the directory.
    func remove(_ name: [UInt8], in dir: Directory) throws
    /// `verify`: opens the restored regular file at `path` for reading, without following
    /// symlinks on the way; the caller closes the descriptor.
    func openRestored(_ path: [UInt8]) throws -> Int32
}

/// A regular file being restored.
protocol RestoreFile: AnyObject, Sendable {
    /// Writes bytes at an offset; workers may write different ranges at once.
    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int64) throws
    /// Sets the final length (ranges never written are zeros) and the metadata.
    func commit(length: Int64) throws
    /// Removes the file after a failure, so no wrong or partial bytes are left behind.
    func discard()
}

/// Why a sink could not create an entry; the description is the failure's message.
struct RestoreEntryError: Error, CustomStringConvertible {
    let description: String

    init(_ description: String) { self.description = description }
}
