#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A heap buffer shared, read-only once filled, by the chunks that point into it.
/// Its memory is returned to the ``MemoryBudget`` when the last chunk is done.
final class SharedBuffer: @unchecked Sendable {
    // Safe: written only by the reader before it is shared; read-only afterwards.
    let base: UnsafeMutableRawPointer
    let capacity: Int
    var count = 0
    private let budget: CountingSemaphore?

    init(capacity: Int, budget: CountingSemaphore?) {
        self.capacity = capacity
        self.budget = budget
        budget?.acquire(capacity)
        base = UnsafeMutableRawPointer.allocate(byteCount: max(capacity, 1), alignment: 64)
    }

    deinit {
        base.deallocate()
        budget?.release(capacity)
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
    private let budget: CountingSemaphore?
    private var carry: (buffer: SharedBuffer, offset: Int, length: Int)?
    private var eof = false
    private var firstCapacity: Int
    /// Bytes read so far.
    private(set) var bytesRead: Int64 = 0

    /// - Parameters:
    ///   - sizeHint: the size `stat` reported; small files get a window of just that size.
    ///   - readSize: bytes per `read` call.
    ///   - windowSize: the usual window size; raised to twice the maximum chunk.
    init(
        chunker: Chunker, fd: Int32, path: [UInt8], sizeHint: Int64, readSize: Int = 4 << 20,
        windowSize: Int = 16 << 20, budget: CountingSemaphore? = nil
    ) {
        self.chunker = chunker
        self.fd = fd
        self.path = path
        self.readSize = max(1, readSize)
        self.windowSize = max(windowSize, 2 * chunker.parameters.maxSize)
        self.budget = budget
        // One byte past the expected size, so the end of file is seen without a second window.
        self.firstCapacity = Int(min(Int64(self.windowSize), max(0, sizeHint) + 1))
    }

    /// The next window with its chunks, or `nil` once the file is fully chunked.
    func nextWindow() throws -> ChunkWindow? {
        if eof && carry == nil { return nil }
        let carried = carry?.length ?? 0
        var capacity = firstCapacity > 0 ? firstCapacity : windowSize
        firstCapacity = 0
        if capacity - carried < min(readSize, windowSize / 2) { capacity = max(windowSize, carried + readSize) }
        let buf = SharedBuffer(capacity: capacity, budget: budget)
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
