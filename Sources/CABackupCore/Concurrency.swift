import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A mutex and condition variable over POSIX primitives, for the pipeline's worker
/// threads (which block, so they are plain threads rather than Swift tasks).
package final class Condition: @unchecked Sendable {
    // Safe: the pthread objects are heap-allocated once, never moved, freed in deinit.
    @usableFromInline let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    package init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        cond.deallocate()
    }

    @inlinable package func lock() { pthread_mutex_lock(mutex) }
    @inlinable package func unlock() { pthread_mutex_unlock(mutex) }
    package func wait() { pthread_cond_wait(cond, mutex) }
    package func broadcast() { pthread_cond_broadcast(cond) }
    package func signal() { pthread_cond_signal(cond) }

    @inlinable @inline(__always)
    package func locked<R>(_ body: () throws -> R) rethrows -> R {
        lock()
        defer { unlock() }
        return try body()
    }
}

/// A bounded FIFO shared by producer and consumer threads. `push` blocks while full,
/// `pop` blocks while empty; `close` wakes everyone and makes `pop` return `nil` once drained.
///
/// Producers and consumers wait on separate condition variables: a push wakes one
/// consumer, and a producer waiting on a full queue is woken once it is half empty. With
/// a job pushed per small file, waking every worker per push, or the walk per pop, cost
/// more than the job.
package final class BlockingQueue<Element>: @unchecked Sendable {
    // Safe: every access to `items`, `head` and `closed` holds `mutex`; the pthread
    // objects are heap-allocated once, never moved, freed in deinit.
    @usableFromInline let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let notEmpty = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private let notFull = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var items: [Element?] = []
    private var head = 0
    private var closed = false
    private let capacity: Int

    package init(capacity: Int) {
        self.capacity = max(1, capacity)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(notEmpty, nil)
        pthread_cond_init(notFull, nil)
    }

    deinit {
        pthread_cond_destroy(notFull)
        pthread_cond_destroy(notEmpty)
        pthread_mutex_destroy(mutex)
        notFull.deallocate()
        notEmpty.deallocate()
        mutex.deallocate()
    }

    /// Adds an element; returns `false` (dropping it) when the queue is closed.
    @discardableResult
    package func push(_ e: Element) -> Bool {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while items.count - head >= capacity && !closed { pthread_cond_wait(notFull, mutex) }
        if closed { return false }
        items.append(e)
        pthread_cond_signal(notEmpty)
        return true
    }

    package func pop() -> Element? {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while items.count == head && !closed { pthread_cond_wait(notEmpty, mutex) }
        if items.count == head { return nil }
        // Taken out, not copied: the queue keeps no reference (so large buffers stay unique).
        let e = items[head].take()
        head += 1
        if head > 64 && head * 2 > items.count {
            items.removeFirst(head)
            head = 0
        }
        // A producer blocked on a full queue is woken once half of it has drained, not
        // after every pop: it then refills in one go instead of waking (a futex call and
        // a context switch, several µs on a VM) once per element.
        if items.count - head <= capacity / 2 { pthread_cond_signal(notFull) }
        return e!
    }

    /// How many elements wait in the queue now.
    package var count: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return items.count - head
    }

    /// Takes up to `limit` elements without waiting (none when the queue is empty).
    package func popAvailable(limit: Int) -> [Element] {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        var out: [Element] = []
        while out.count < limit && items.count > head {
            out.append(items[head].take()!)
            head += 1
        }
        if head > 64 && head * 2 > items.count {
            items.removeFirst(head)
            head = 0
        }
        if !out.isEmpty { pthread_cond_broadcast(notFull) }
        return out
    }

    package func close() {
        pthread_mutex_lock(mutex)
        closed = true
        pthread_cond_broadcast(notEmpty)
        pthread_cond_broadcast(notFull)
        pthread_mutex_unlock(mutex)
    }
}

/// Counts outstanding work and lets one thread wait for it to reach zero.
final class WaitGroup: @unchecked Sendable {
    // Safe: `count` is only touched with `cond`'s mutex held.
    private let cond = Condition()
    private var count = 0

    func enter(_ n: Int = 1) { cond.locked { count += n } }

    func leave() {
        cond.locked {
            count -= 1
            if count == 0 { cond.broadcast() }
        }
    }

    func wait() {
        cond.lock()
        while count > 0 { cond.wait() }
        cond.unlock()
    }
}

/// Starts a POSIX thread running `body` (join it with ``joinThread(_:)``), with an
/// 8 MiB stack.
package func startThread(_ body: @escaping @Sendable () -> Void) -> pthread_t {
    final class Box: @unchecked Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    var attr = pthread_attr_t()
    pthread_attr_init(&attr)
    pthread_attr_setstacksize(&attr, 8 << 20)
    #if canImport(Glibc)
        var tid = pthread_t()
    #else
        var tid: pthread_t?
    #endif
    let rc = pthread_create(
        &tid, &attr,
        { arg in
            let box = Unmanaged<AnyObject>.fromOpaque(arg!).takeRetainedValue() as! Box
            box.body()
            return nil
        }, box)
    pthread_attr_destroy(&attr)
    precondition(rc == 0, "pthread_create failed: \(rc)")
    #if canImport(Glibc)
        return tid
    #else
        return tid!
    #endif
}

package func joinThread(_ t: pthread_t) {
    pthread_join(t, nil)
}

/// `body` applied to every element on up to `threads` threads (the calling thread waits),
/// results in the order of `items`: for calls that mostly wait on a network.
package func concurrentMap<T: Sendable, R: Sendable>(
    _ items: [T], threads: Int, _ body: @escaping @Sendable (T) -> R
) -> [R] {
    if items.count <= 1 || threads <= 1 { return items.map(body) }
    let results = ConcurrentResults<R>(items.count)
    let next = Atomic<Int>(0)
    var started: [pthread_t] = []
    for _ in 0..<min(threads, items.count) {
        started.append(
            startThread {
                while true {
                    let i = next.add(1, ordering: .relaxed).oldValue
                    if i >= items.count { return }
                    let r = body(items[i])
                    results.slots[i] = r
                }
            })
    }
    for t in started { joinThread(t) }
    return (0..<items.count).map { results.slots[$0]! }
}

/// The result slots of ``concurrentMap(_:threads:_:)``.
private final class ConcurrentResults<R>: @unchecked Sendable {
    // Safe: each slot is written by exactly one thread, read after all are joined.
    let slots: UnsafeMutablePointer<R?>
    let count: Int
    init(_ n: Int) {
        count = n
        slots = .allocate(capacity: n)
        slots.initialize(repeating: nil, count: n)
    }
    deinit {
        slots.deinitialize(count: count)
        slots.deallocate()
    }
}
