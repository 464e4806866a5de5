import CABackupCore
import CABackupFormat
#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Fixed-size read windows, allocated once and reused.
///
/// Reuse is what keeps memory flat: freeing and reallocating 16 MiB buffers from
/// several threads makes glibc keep the freed memory in its heaps (a 1.5 GB backup
/// peaked at 800 MB RSS that way; with the pool it stays flat).
final class BufferPool: @unchecked Sendable {
    // Safe: `free` and `allocated` are only touched with `cond`'s mutex held.
    let bufferSize: Int
    private let maxCount: Int
    private let cond = Condition()
    private var free: [UnsafeMutableRawPointer] = []
    private var allocated = 0

    init(bufferSize: Int, maxCount: Int) {
        self.bufferSize = bufferSize
        self.maxCount = max(2, maxCount)
    }

    deinit {
        for p in free { p.deallocate() }
    }

    /// A buffer of `bufferSize` bytes; blocks while all are in use.
    func take() -> UnsafeMutableRawPointer {
        cond.lock()
        defer { cond.unlock() }
        while free.isEmpty && allocated >= maxCount { cond.wait() }
        if let p = free.popLast() { return p }
        allocated += 1
        return UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 64)
    }

    func give(_ p: UnsafeMutableRawPointer) {
        cond.locked {
            free.append(p)
            cond.signal()
        }
    }
}

/// A buffer shared, read-only once filled, by the chunks that point into it: a pooled
/// window, or for a small file a buffer of just its size. A pooled one goes back to the
/// pool when the last chunk is done.
final class SharedBuffer: @unchecked Sendable {
    // Safe: written only by the reader before it is shared; read-only afterwards.
    let base: UnsafeMutableRawPointer
    let capacity: Int
    var count = 0
    private let pool: BufferPool?

    /// A buffer from `pool` when `capacity` is the pool's size, else a fresh one.
    init(capacity: Int, pool: BufferPool?) {
        if let pool, capacity == pool.bufferSize {
            self.pool = pool
            base = pool.take()
        } else {
            self.pool = nil
            base = UnsafeMutableRawPointer.allocate(byteCount: max(capacity, 1), alignment: 64)
        }
        self.capacity = capacity
    }

    deinit {
        if let pool {
            pool.give(base)
        } else {
            base.deallocate()
        }
    }

    func bytes(_ offset: Int, _ length: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: base + offset, count: length)
    }
}

/// One read window of a file and the chunks cut in it.
struct ChunkWindow {
    let buffer: SharedBuffer
    /// (offset, length) of each complete chunk in `buffer`, in order.
    var cuts: [(offset: Int, length: Int)]
}

/// Reads a file into windows and cuts each into chunks with a ``Chunker``.
///
/// Boundaries never depend on `readSize` or the window size: a cut is only searched
/// when at least `maxSize` bytes are buffered or the file has ended, and the bytes after
/// the last cut (fewer than `maxSize`) are carried into the next window.
final class ChunkingReader {
    private let chunker: Chunker
    private let fd: Int32
    private let path: [UInt8]
    private let readSize: Int
    private let windowSize: Int
    private let pool: BufferPool?
    private var carry: (buffer: SharedBuffer, offset: Int, length: Int)?
    private var eof = false
    private var firstCapacity: Int
    /// Bytes read so far.
    private(set) var bytesRead: Int64 = 0

    static let defaultReadSize = 4 << 20

    /// The smallest window that always makes progress: the bytes carried over after the
    /// last cut are fewer than `maxChunk`, so one more read fills past the maximum and
    /// forces a cut.
    static func minimumWindow(maxChunk: Int, readSize: Int = defaultReadSize) -> Int {
        maxChunk + max(1, readSize)
    }

    /// - Parameters:
    ///   - sizeHint: the size `stat` reported; small files get a window of just that size.
    ///   - readSize: bytes per `read` call.
    ///   - windowSize: the usual window size; raised to ``minimumWindow(maxChunk:readSize:)``.
    ///   - pool: where full-size windows come from (their size must be the window size).
    init(
        chunker: Chunker, fd: Int32, path: [UInt8], sizeHint: Int64, readSize: Int = defaultReadSize,
        windowSize: Int = 16 << 20, pool: BufferPool? = nil
    ) {
        self.chunker = chunker
        self.fd = fd
        self.path = path
        self.readSize = max(1, readSize)
        self.windowSize = max(
            windowSize, Self.minimumWindow(maxChunk: chunker.parameters.maxSize, readSize: self.readSize))
        self.pool = pool
        // One byte past the expected size, so the end of file is seen without a second
        // window; files of more than 1 MiB use pooled full windows.
        let wanted = max(0, sizeHint) + 1
        self.firstCapacity = wanted > 1 << 20 ? self.windowSize : Int(min(Int64(self.windowSize), wanted))
    }

    /// The next window with its chunks, or `nil` once the file is fully chunked.
    func nextWindow() throws -> ChunkWindow? {
        if eof && carry == nil { return nil }
        let carried = carry?.length ?? 0
        var capacity = firstCapacity > 0 ? firstCapacity : windowSize
        firstCapacity = 0
        if carried > 0 && capacity - carried < min(readSize, windowSize / 2) { capacity = windowSize }
        let buf = SharedBuffer(capacity: capacity, pool: pool)
        if let c = carry {
            buf.base.copyMemory(from: c.buffer.base + c.offset, byteCount: c.length)
            buf.count = c.length
            carry = nil
        }
        while !eof && buf.count < buf.capacity {
            let want = min(readSize, buf.capacity - buf.count)
            let n = try readFully(fd, into: buf.base + buf.count, count: want, path: path)
            buf.count += n
            bytesRead += Int64(n)
            if n < want { eof = true }
        }
        var window = ChunkWindow(buffer: buf, cuts: [])
        var offset = 0
        while offset < buf.count {
            guard let len = chunker.nextCut(in: buf.bytes(offset, buf.count - offset), isFinal: eof) else { break }
            window.cuts.append((offset, len))
            offset += len
        }
        if offset < buf.count { carry = (buf, offset, buf.count - offset) }
        return window
    }
}
