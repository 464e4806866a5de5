import CABackup
import Foundation
import Testing

@testable import CABackupServer

extension RecordsStore {
    /// The records of `space`: in SQLite, the space's own index file (with its usage and
    /// leases in this instance's memory); in PostgreSQL, another server instance's, on a
    /// connection of its own.
    /// Leases last 2 hours here, so a loaded machine's pauses never expire one in the
    /// middle of a test.
    func space(
        _ name: String = "alice", reservationLifetime: Duration = .seconds(7200),
        configClaimLifetime: Duration = .seconds(120)
    ) async throws
        -> any SpaceRecords
    {
        guard postgres != nil else {
            return try SQLiteSpaceRecords(indexPath: file("\(name).sqlite"), leaseLifetime: .seconds(7200))
        }
        return PostgresSpaceRecords(
            try await database(), space: name, reservationLifetime: reservationLifetime,
            configClaimLifetime: configClaimLifetime, leaseLifetime: .seconds(7200))
    }
}

private let mb: Int64 = 1 << 20

private func blob(_ n: UInt8) -> BlobID { ObjectID(bytes: [UInt8](repeating: n, count: 32))! }

private func pack(_ n: UInt8) -> String { hexString([UInt8](repeating: n, count: 31) + [0xEE]) }

/// Records a file stored, with a reservation of its size.
private func record(
    _ r: any SpaceRecords, _ kind: FileKind, _ name: String, size: Int64, blobs: [BlobID] = []
) async throws {
    let reservation = try await r.reserve(size, quota: nil)
    try await r.stored(kind, name, size: size, blobs: blobs, reservation: reservation)
    await r.release(reservation)  // a no-op once stored
}

/// The status `body` was refused with, or nil when it was not.
private func refusal(_ body: () async throws -> Reservation) async -> Int? {
    await #expect(throws: APIError.self) { _ = try await body() }?.status
}

@Suite("space records: the same behaviour in SQLite and in PostgreSQL")
struct SpaceRecordsTests {
    @Test("a pack's blob ids are indexed when stored and dropped when removed", arguments: RecordsKind.allCases)
    func blobIndex(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let r = try await store.space()
            let ids = (1...5).map(blob)
            #expect(try await r.missing(ids) == ids)
            #expect(try await r.missing([]).isEmpty)
            try await record(r, .pack, pack(1), size: 100, blobs: [blob(1), blob(2)])
            try await record(r, .pack, pack(2), size: 200, blobs: [blob(2), blob(3)])
            try await record(r, .snapshot, pack(3), size: 10)
            #expect(try await r.missing(ids) == [blob(4), blob(5)])
            #expect(try await r.missing([blob(5), blob(1), blob(4), blob(5)]) == [blob(5), blob(4), blob(5)])
            #expect(try await r.indexedPacks() == [pack(1), pack(2)])

            try await r.removed(.pack, pack(1), size: 100)
            #expect(try await r.missing(ids) == [blob(1), blob(4), blob(5)])
            #expect(try await r.indexedPacks() == [pack(2)])
        }
    }

    @Test(
        "uploads reserve up to the quota; a release frees, a store moves the bytes to those stored",
        arguments: RecordsKind.allCases)
    func quota(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let r = try await store.space()
            let quota = 10 * mb
            var held: [Reservation] = []
            for _ in 0..<10 { held.append(try await r.reserve(mb, quota: quota)) }
            let full = await #expect(throws: APIError.self) { try await r.reserve(1, quota: quota) }
            #expect(full?.status == 413)
            #expect(
                full?.message
                    == "quota exceeded: the space holds 0 of \(quota) bytes (\(quota) more promised to uploads in progress) and this upload needs 1 more"
            )

            // A release frees its bytes once, however often it is called.
            await r.release(held[0])
            await r.release(held[0])
            #expect(await refusal { try await r.reserve(2 * mb, quota: quota) } == 413)
            let upload = try await r.reserve(mb, quota: quota)

            // Stored, its bytes still count (as stored), and its release is a no-op.
            try await r.stored(.snapshot, "s1", size: mb, blobs: [], reservation: upload)
            await r.release(upload)
            let stillFull = await #expect(throws: APIError.self) { try await r.reserve(1, quota: quota) }
            #expect(stillFull?.message.hasPrefix("quota exceeded: the space holds \(mb) of \(quota) bytes") == true)
            try await r.removed(.snapshot, "s1", size: mb)
            let after = try await r.reserve(mb, quota: quota)
            #expect(await refusal { try await r.reserve(1, quota: quota) } == 413)
            for h in held + [after] { await r.release(h) }
            _ = try await r.reserve(quota, quota: quota)
        }
    }

    @Test("a pack removed twice (two deletes at once) frees its bytes once", arguments: RecordsKind.allCases)
    func removedTwice(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let r = try await store.space()
            try await record(r, .pack, pack(1), size: 6 * mb, blobs: [blob(1)])
            try await r.removed(.pack, pack(1), size: 6 * mb)
            try await r.removed(.pack, pack(1), size: 6 * mb)
            // At -6 MiB stored, 11 MiB would fit under 10.
            #expect(await refusal { try await r.reserve(11 * mb, quota: 10 * mb) } == 413)
            _ = try await r.reserve(10 * mb, quota: 10 * mb)
        }
    }

    @Test("the config is claimed once, again after an unclaim or its removal", arguments: RecordsKind.allCases)
    func configClaim(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let r = try await store.space()
            #expect(try await r.claimConfig())
            #expect(try await !r.claimConfig())
            try await r.unclaimConfig()
            #expect(try await r.claimConfig())
            try await record(r, .config, "config", size: 10)
            #expect(try await !r.claimConfig())
            try await r.removed(.config, "config", size: 10)
            #expect(try await r.claimConfig())
        }
    }

    @Test(
        "shared leases go together, an exclusive one alone; a key gets its lease again",
        arguments: RecordsKind.allCases)
    func leases(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let r = try await store.space()
            let a = try #require(try await r.acquire(exclusive: false, key: nil))
            let b = try #require(try await r.acquire(exclusive: false, key: nil))
            #expect(a != b)
            #expect(try await r.acquire(exclusive: true, key: nil) == nil)
            #expect(try await r.releaseLease(a))
            #expect(try await !r.releaseLease(a))
            #expect(try await r.acquire(exclusive: true, key: nil) == nil)
            #expect(try await r.releaseLease(b))

            let x = try #require(try await r.acquire(exclusive: true, key: "k1"))
            #expect(try await r.acquire(exclusive: true, key: "k1") == x)
            #expect(try await r.acquire(exclusive: false, key: "k1") == nil)
            #expect(try await r.acquire(exclusive: true, key: "k2") == nil)
            #expect(try await r.acquire(exclusive: false, key: nil) == nil)
            #expect(try await r.renew(x))
            #expect(try await !r.renew("nosuch"))
            #expect(try await !r.releaseLease("nosuch"))
            #expect(try await r.releaseLease(x))
            #expect(try await !r.renew(x))
            #expect(try await r.acquire(exclusive: false, key: "k1") != nil)
        }
    }

    @Test("reconcile sets the index, the bytes stored and the config", arguments: RecordsKind.allCases)
    func reconcile(kind: RecordsKind) async throws {
        try await RecordsStore.with(kind) { store in
            let r = try await store.space()
            try await record(r, .pack, pack(1), size: 100, blobs: [blob(1), blob(2)])
            try await record(r, .pack, pack(2), size: 100, blobs: [blob(3)])
            try await r.reconcile(
                add: [(pack(3), 50, [blob(4), blob(5)])], drop: [pack(1)], usedBytes: 9 * mb, hasConfig: true)
            #expect(try await r.indexedPacks() == [pack(2), pack(3)])
            #expect(try await r.missing((1...6).map(blob)) == [blob(1), blob(2), blob(6)])
            #expect(try await !r.claimConfig())
            let last = try await r.reserve(mb, quota: 10 * mb)
            #expect(await refusal { try await r.reserve(1, quota: 10 * mb) } == 413)
            await r.release(last)

            try await r.reconcile(add: [], drop: [pack(2), pack(3)], usedBytes: 0, hasConfig: false)
            #expect(try await r.indexedPacks().isEmpty)
            #expect(try await r.claimConfig())
            _ = try await r.reserve(10 * mb, quota: 10 * mb)
        }
    }
}

@Suite("space records in PostgreSQL shared by several server instances")
struct PostgresSpaceRecordsTests {
    /// How many of `count` calls of `body`, half from each of `a` and `b` at once, are true.
    private func concurrently(
        _ count: Int, _ a: any SpaceRecords, _ b: any SpaceRecords,
        _ body: @escaping @Sendable (any SpaceRecords) async throws -> Bool
    ) async throws -> Int {
        try await withThrowingTaskGroup(of: Bool.self) { group in
            for n in 0..<count {
                let r = n % 2 == 0 ? a : b
                group.addTask { try await body(r) }
            }
            return try await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
    }

    @Test("concurrent reservations from two instances admit exactly the quota")
    func concurrentReservations() async throws {
        try await RecordsStore.with(.postgres) { store in
            let (a, b) = (try await store.space(), try await store.space())
            // The space's rows exist already, as they do but on its first requests.
            await a.release(try await a.reserve(1, quota: nil))
            let admitted = try await concurrently(30, a, b) { r in
                do {
                    _ = try await r.reserve(mb, quota: 10 * mb)
                    return true
                } catch let e as APIError where e.status == 413 {
                    return false
                }
            }
            #expect(admitted == 10)
            #expect(await refusal { try await a.reserve(1, quota: 10 * mb) } == 413)
        }
    }

    @Test("concurrent exclusive leases and config claims from two instances: one of each is granted")
    func concurrentLeasesAndClaims() async throws {
        try await RecordsStore.with(.postgres) { store in
            let (a, b) = (try await store.space(), try await store.space())
            // The space's rows exist already, as they do but on its first requests.
            #expect(try await a.releaseLease(try #require(try await a.acquire(exclusive: false, key: nil))))
            #expect(try await concurrently(20, a, b) { try await $0.acquire(exclusive: true, key: nil) != nil } == 1)
            #expect(try await concurrently(2, a, b) { try await $0.claimConfig() } == 1)
        }
    }

    @Test("a pack an instance's open indexes, then recorded by the upload's retry, counts once")
    func addOnlyThenStored() async throws {
        try await RecordsStore.with(.postgres) { store in
            let (a, b) = (try await store.space(), try await store.space())
            try await a.reconcile(add: [(pack(1), 4 * mb, [blob(1)])], drop: [], usedBytes: nil, hasConfig: nil)
            #expect(try await a.missing([blob(1)]).isEmpty)
            try await record(b, .pack, pack(1), size: 4 * mb, blobs: [blob(1)])
            #expect(await refusal { try await b.reserve(7 * mb, quota: 10 * mb) } == 413)
            _ = try await b.reserve(6 * mb, quota: 10 * mb)
        }
    }

    @Test("a full pass holds the space: a pack recorded meanwhile waits, then counts on top of what the pass set")
    func heldReconcile() async throws {
        try await RecordsStore.with(.postgres) { store in
            let (a, b) = (try await store.space(), try await store.space())
            try await record(a, .pack, pack(1), size: 4 * mb, blobs: [blob(1)])
            try await record(a, .pack, pack(3), size: 1 * mb, blobs: [blob(3)])
            final class Later: @unchecked Sendable { var task: Task<Void, any Error>? }
            let later = Later()
            let before = try await a.reconcile(holding: { indexed in
                #expect(indexed == [pack(1), pack(3)])
                // Another instance records a pack the pass's listing did not see.
                later.task = Task { try await record(b, .pack, pack(2), size: 2 * mb, blobs: [blob(2)]) }
                try await Task.sleep(for: .milliseconds(500))
                // The listing found pack 1 alone (pack 3 is gone) and a config.
                return ReconcileFound(drop: [pack(3)], usedBytes: 4 * mb + 100, hasConfig: true)
            })
            #expect(before == 5 * mb)
            try await later.task?.value
            #expect(try await a.usage().used == 6 * mb + 100)
            #expect(try await a.indexedPacks() == [pack(1), pack(2)])
            #expect(try await !a.claimConfig())
        }
    }

    @Test("a config claim left by a dead instance is taken over after its lifetime, not before")
    func staleConfigClaim() async throws {
        try await RecordsStore.with(.postgres) { store in
            let dead = try await store.space(configClaimLifetime: .seconds(2))
            let other = try await store.space(configClaimLifetime: .seconds(2))
            #expect(try await dead.claimConfig())  // and never stores the config
            #expect(try await !other.claimConfig())
            try await Task.sleep(for: .milliseconds(2500))
            #expect(try await other.claimConfig())
            #expect(try await !dead.claimConfig())
        }
    }

    @Test("an extended reservation outlives its first lifetime; one never extended lapses")
    func extendedReservation() async throws {
        try await RecordsStore.with(.postgres) { store in
            // Extended by an instance whose lifetime is an hour, so no delay of a loaded
            // machine (a full run starves sleeps for seconds) lets it lapse.
            let short = try await store.space(reservationLifetime: .seconds(3))
            let long = try await store.space()
            let kept = try await short.reserve(5 * mb, quota: 10 * mb)
            _ = try await short.reserve(5 * mb, quota: 10 * mb)  // an upload on an instance that died
            await long.extend(kept)
            try await Task.sleep(for: .seconds(4))
            // The other lapsed, the extended one still counts.
            #expect(await refusal { try await short.reserve(6 * mb, quota: 10 * mb) } == 413)
            _ = try await short.reserve(5 * mb, quota: 10 * mb)
        }
    }

    @Test("a reservation past its lifetime no longer counts against the quota")
    func expiredReservation() async throws {
        try await RecordsStore.with(.postgres) { store in
            // Long enough that a loaded machine does not let it lapse between the next two
            // calls (it did at 300 ms in a full run).
            let crashing = try await store.space(reservationLifetime: .seconds(10))
            let other = try await store.space()
            _ = try await crashing.reserve(10 * mb, quota: 10 * mb)  // never released
            #expect(await refusal { try await other.reserve(1, quota: 10 * mb) } == 413)
            try await Task.sleep(for: .milliseconds(10_500))
            _ = try await other.reserve(10 * mb, quota: 10 * mb)
        }
    }

    @Test("two spaces see neither each other's blobs, usage, config nor leases")
    func spacesApart() async throws {
        try await RecordsStore.with(.postgres) { store in
            let (alice, bob) = (try await store.space("alice"), try await store.space("bob"))
            try await record(alice, .pack, pack(1), size: 6 * mb, blobs: [blob(1)])
            #expect(try await alice.missing([blob(1)]).isEmpty)
            #expect(try await bob.missing([blob(1)]) == [blob(1)])
            #expect(try await bob.indexedPacks().isEmpty)
            #expect(await refusal { try await alice.reserve(5 * mb, quota: 10 * mb) } == 413)
            _ = try await bob.reserve(10 * mb, quota: 10 * mb)
            #expect(try await alice.claimConfig())
            #expect(try await bob.claimConfig())
            let lease = try #require(try await alice.acquire(exclusive: true, key: "k"))
            let bobLease = try #require(try await bob.acquire(exclusive: true, key: "k"))
            #expect(bobLease != lease)
            #expect(try await !bob.renew(lease))
            #expect(try await !bob.releaseLease(lease))
            try await bob.reconcile(add: [], drop: [pack(1)], usedBytes: 0, hasConfig: false)
            #expect(try await alice.indexedPacks() == [pack(1)])

            // A deleted account's space is forgotten: a new account of that name starts empty.
            try await PostgresSpaceRecords.forget(space: "alice", in: try await store.database())
            #expect(try await alice.missing([blob(1)]) == [blob(1)])
            #expect(try await alice.indexedPacks().isEmpty)
            _ = try await alice.reserve(10 * mb, quota: 10 * mb)
            #expect(try await alice.acquire(exclusive: true, key: nil) != nil)
            // Bob's records are untouched: his lease is still held.
            #expect(try await bob.acquire(exclusive: true, key: "k") == bobLease)
        }
    }
}
