import Foundation
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

@Suite("dump's zip writer: CRC-32 as zlib computes it; more than 65535 entries, the central directory spilled to disk")
struct ZipWriterTests {
    /// Runs `python3 -c script args…`, returning its standard output; fails the test on a
    /// non-zero exit.
    private func python(_ script: String, _ args: String...) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", "-c", script] + args
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        return String(decoding: data, as: UTF8.self)
    }

    @Test("CRC-32 equals Python's zlib.crc32: odd lengths, runs of zeros long and short, fed whole or in pieces")
    func crc() throws {
        let noise = pseudoRandomBytes(count: 100_003, seed: 11)
        var inputs: [[UInt8]] = [[], Array("123456789".utf8)]
        for n in [1, 7, 8, 9, 4095, 4096, 4097, 100_003] { inputs.append(Array(noise.prefix(n))) }
        for n in [1, 4096, 12_293, 1 << 20] { inputs.append([UInt8](repeating: 0, count: n)) }
        inputs.append([UInt8](repeating: 0, count: 8192) + noise.prefix(10) + [UInt8](repeating: 0, count: 4100))
        inputs.append(Array(noise.prefix(3)) + [UInt8](repeating: 0, count: 70_000) + noise.suffix(5000))
        let dir = NSTemporaryDirectory() + "/cabackup-crc-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var ours: [UInt32] = []
        for (i, input) in inputs.enumerated() {
            try Data(input).write(to: URL(fileURLWithPath: "\(dir)/\(i)"))
            var whole = CRC32()
            input.withUnsafeBytes { whole.update($0) }
            // The same bytes in pieces that cut through words and zero blocks.
            var pieces = CRC32()
            var at = 0
            var step = 1
            while at < input.count {
                let end = min(input.count, at + step)
                input[at..<end].withUnsafeBytes { pieces.update($0) }
                at = end
                step = step * 3 + 1
            }
            #expect(whole.value == pieces.value, "input \(i)")
            ours.append(whole.value)
        }
        #expect(ours[1] == 0xCBF4_3926)  // the check value of CRC-32/ISO-HDLC
        let zlib = try python(
            "import sys, zlib\nfor i in range(int(sys.argv[2])): print(zlib.crc32(open(f'{sys.argv[1]}/{i}', 'rb').read()))",
            dir, String(inputs.count))
        #expect(zlib.split(separator: "\n").compactMap { UInt32($0) } == ours)
    }

    @Test("70000 entries: ZIP64 end records, the central directory through a temporary file; zipfile reads it all")
    func manyEntries() throws {
        let path = NSTemporaryDirectory() + "/cabackup-zip-\(UUID().uuidString).zip"
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        try #require(fd >= 0)
        defer { unlink(path) }
        // 64 KiB of central directory in memory, the rest (about 6 MiB) in the file.
        var writer = ZipWriter(out: DumpOutput(fd: fd), centralMemoryLimit: 64 << 10)
        var dir = Node(name: Array("d".utf8), type: .directory)
        dir.mode = 0o755
        _ = try writer.begin(dir, name: dir.name, hardLinkTo: nil)
        for i in 0..<70_000 {
            let content = Array("file \(i)\n".utf8)
            var file = Node(name: Array("f\(i)".utf8), type: .file)
            file.mode = 0o644
            file.size = UInt64(content.count)
            file.mtimeNs = 1_700_000_000_000_000_000
            guard case .content = try writer.begin(file, name: Array("d/f\(i)".utf8), hardLinkTo: nil) else {
                Issue.record("a file without content")
                return
            }
            try writer.content(content)
            try writer.endContent()
        }
        try writer.finish()
        close(fd)
        let out = try python(
            """
            import sys, zipfile
            z = zipfile.ZipFile(sys.argv[1])
            infos = z.infolist()
            assert z.testzip() is None
            assert infos[0].filename == "d/" and infos[0].external_attr >> 16 == 0o40755
            assert all(i.filename == f"d/f{n}" and z.read(i) == f"file {n}\\n".encode() for n, i in enumerate(infos[1:]))
            with open(sys.argv[1], "rb") as f:
                f.seek(-22, 2)
                end = f.read(22)
                f.seek(-22 - 20 - 56, 2)
                assert f.read(4) == b"PK\\x06\\x06"
            print(len(infos), end[8:10].hex())
            """, path)
        #expect(out == "70001 ffff\n")
    }
}
