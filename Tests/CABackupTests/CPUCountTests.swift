import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

#if canImport(Glibc)
    import Glibc
#endif

/// Worker pools are sized by the CPUs the process may use, not by the CPUs the host has.
@Suite("worker count: the CPUs this process may use")
struct CPUCountTests {
    @Test(
        "cgroup quotas round up to whole CPUs; no quota is no limit",
        arguments: [
            ("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1), ("max 100000\n", nil),
            ("-1 100000", nil), ("", nil), ("garbage", nil), ("100000 0", nil),
        ] as [(String, Int?)])
    func quota(text: String, cpus: Int?) {
        #expect(parseCPUMax(text) == cpus)
    }

    @Test(
        "affinity lists count their CPUs",
        arguments: [("0", 1), ("0-1", 2), ("0-3,8,10-11\n", 7), (" 2 ", 1)] as [(String, Int)])
    func cpuList(text: String, cpus: Int) {
        #expect(parseCPUList(text) == cpus)
    }

    @Test("malformed affinity lists are refused", arguments: ["", "a", "3-1", "1-2-3", "-1"])
    func badCPUList(text: String) {
        #expect(parseCPUList(text) == nil)
    }

    @Test("the worker default is the usable count, never more than the online CPUs")
    func workerDefault() {
        #expect(usableCPUCount() >= 1)
        #expect(usableCPUCount() <= Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        #expect(SnapshotOptions().workers == usableCPUCount())
        #expect(RestoreOptions().workers == usableCPUCount())
    }
}
