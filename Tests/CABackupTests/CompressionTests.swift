import Foundation
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

@Suite("compression: zstd blobs, the codec in the authenticated config, and LZ4 repositories unchanged")
struct CompressionTests {
    /// Text that compresses well, and bytes that do not compress at all.
    let text = Array(String(repeating: "a line of compressible text, ", count: 20_000).utf8)
    let noise = pseudoRandomBytes(count: 100_000, seed: 7)

    /// A zstd frame by hand: no content size, a 2 MiB window, then one last RLE block that
    /// regenerates `count` copies of one byte. Valid, and far larger than it looks.
    func rleFrame(count: Int) -> [UInt8] {
        let block = UInt32(1 | 1 << 1) | UInt32(count) << 3
        return [0x28, 0xB5, 0x2F, 0xFD, 0x00, 0x58]
            + [UInt8(block & 0xFF), UInt8(block >> 8 & 0xFF), UInt8(block >> 16 & 0xFF), 0x61]
    }

    /// A zstd frame that declares 1 TiB of content in its header but holds a 10-byte raw block.
    let lyingFrame: [UInt8] =
        [0x28, 0xB5, 0x2F, 0xFD, 0xE0] + [0, 0, 0, 0, 0, 1, 0, 0] + [0x51, 0, 0] + Array(repeating: 0x62, count: 10)

    func decompress(
        _ codec: BlobCodec, _ payload: [UInt8], _ compression: BlobCompression, rawLength: Int
    )
        -> [UInt8]?
    {
        // One byte of guard on each side: nothing may be written past rawLength.
        var out = [UInt8](repeating: 0xEE, count: rawLength + 2)
        let ok = payload.withUnsafeBytes { src in
            out.withUnsafeMutableBytes { dst in
                codec.decompress(
                    src, compression, into: UnsafeMutableRawBufferPointer(rebasing: dst[1..<(1 + rawLength)]))
            }
        }
        #expect(out.first == 0xEE && out.last == 0xEE, "wrote outside the raw length")
        return ok ? Array(out[1..<(1 + rawLength)]) : nil
    }

    @Test("zstd blobs round trip through the codec, plaintext and sealed; incompressible ones are stored raw")
    func roundTrip() throws {
        for keys in [nil, RepositoryKeys.random()] {
            let codec = BlobCodec(keys: keys, compression: .zstd)
            let lz4 = BlobCodec(keys: keys, compression: .lz4)
            for (raw, expected) in [(text, BlobCompression.zstd), (noise, .none), ([7], .none)] {
                let (compression, stored) = raw.withUnsafeBytes { codec.encode($0) }
                #expect(compression == expected)
                var payload = Array(stored)
                if let aead = codec.aead {
                    payload = try #require(aead.open(payload, aad: SealedKind.blob))
                }
                if compression == .zstd {
                    #expect(payload.count < raw.count / 10)
                    #expect(Array(payload.prefix(4)) == [0x28, 0xB5, 0x2F, 0xFD], "a standard zstd frame")
                }
                #expect(decompress(codec, payload, compression, rawLength: raw.count) == raw)
                // A client reads every codec it knows, whatever its repository writes.
                #expect(decompress(lz4, payload, compression, rawLength: raw.count) == raw)
            }
            // The contexts are reused: many blobs through one codec, no state carried over.
            for i in 0..<50 {
                let raw = Array(text.prefix(1000 + 997 * i)) + pseudoRandomBytes(count: i * 31, seed: UInt64(i))
                let (compression, stored) = raw.withUnsafeBytes { codec.encode($0) }
                var payload = Array(stored)
                if let aead = codec.aead { payload = try #require(aead.open(payload, aad: SealedKind.blob)) }
                #expect(decompress(codec, payload, compression, rawLength: raw.count) == raw)
            }
        }
        // An LZ4 repository's codec still writes LZ4, as before.
        #expect(text.withUnsafeBytes { BlobCodec(keys: nil).encode($0).0 } == .lz4)
    }

    @Test("a zstd frame is decoded into exactly the raw length: oversized, lying and corrupt frames are refused")
    func boundedDecoding() throws {
        let codec = BlobCodec(keys: nil, compression: .zstd)
        let (_, stored) = text.withUnsafeBytes { codec.encode($0) }
        let frame = Array(stored)
        // Exactly the raw length, not one byte more or less.
        #expect(decompress(codec, frame, .zstd, rawLength: text.count) == text)
        #expect(decompress(codec, frame, .zstd, rawLength: text.count - 1) == nil)
        #expect(decompress(codec, frame, .zstd, rawLength: text.count + 1) == nil)
        // A valid frame that expands far past the header's raw length.
        let bomb = rleFrame(count: 100_000)
        #expect(decompress(codec, bomb, .zstd, rawLength: 100_000) == [UInt8](repeating: 0x61, count: 100_000))
        #expect(decompress(codec, bomb, .zstd, rawLength: 10) == nil)
        // A frame whose header claims 1 TiB: nothing is sized by it.
        #expect(decompress(codec, lyingFrame, .zstd, rawLength: 10) == nil)
        // Damaged frames, truncations and junk: refused, never a crash.
        #expect(decompress(codec, [], .zstd, rawLength: 10) == nil)
        #expect(decompress(codec, Array(frame.prefix(frame.count / 2)), .zstd, rawLength: text.count) == nil)
        for seed in 0..<200 {
            var bad = frame
            var rng = SplitMix64(seed: UInt64(seed))
            for _ in 0...(seed % 4) { bad[Int(rng.next() % UInt64(bad.count))] ^= UInt8(1 + rng.next() % 255) }
            if let out = decompress(codec, bad, .zstd, rawLength: text.count) {
                // A flip zstd cannot see (it has no checksum here) is caught by the blob id.
                #expect(out.count == text.count)
            }
            _ = decompress(codec, pseudoRandomBytes(count: 64, seed: UInt64(seed)), .zstd, rawLength: 1000)
        }
        // The codec is still sound after all that.
        #expect(decompress(codec, frame, .zstd, rawLength: text.count) == text)
    }

    @Test("a stored zstd blob that does not decode to its raw length is reported corrupt by load and check")
    func corruptBlobInPack() throws {
        let dir = TemporaryDirectory()
        let repo = try Repository.initialize(
            path: dir.file("repo"), password: nil, chunker: smallParameters, durable: false, compression: .zstd)
        let plain = [UInt8](repeating: 0x61, count: 100_000)
        let id = plain.withUnsafeBytes { repo.makeCodec().id($0) }
        let good = sha256([1, 2, 3])
        _ = try repo.withBlobWriter { saver in
            let bomb = rleFrame(count: 100_000)
            // Claims 10 bytes, expands to 100,000.
            try bomb.withUnsafeBytes { try saver.add(id, type: .data, compression: .zstd, rawLength: 10, bytes: $0) }
            try lyingFrame.withUnsafeBytes {
                try saver.add(good, type: .data, compression: .zstd, rawLength: 10, bytes: $0)
            }
        }
        for blob in [id, good] {
            #expect {
                try repo.loadBlob(blob)
            } throws: { e in
                guard case .corrupt(_, let reason) = e as? CABackupError else { return false }
                return reason == "zstd data does not decode"
            }
        }
        #expect(!(try repo.check(options: CheckOptions(readDataFraction: 1)).isClean))
    }

    @Test("a zstd repository: format 4 with compression bound to the key; snapshot, restore and check")
    func zstdRepository() throws {
        let dir = TemporaryDirectory()
        dir.write("src/text.txt", text)
        dir.write("src/noise.bin", noise)
        let repo = try Repository.initialize(
            path: dir.file("repo"), password: testPassword, chunker: smallParameters, kdf: .insecureFastForTesting,
            durable: false, compression: .zstd)
        #expect(repo.config.formatVersion == 4 && repo.config.compression == .zstd)
        let snap = try repo.snapshot(paths: [dir.file("src")]).snapshot
        // Data blobs written as zstd (or raw when it does not shrink them), never LZ4.
        let kinds = Set(try repo.indexDump().map { $0.split(separator: " ")[3] })
        #expect(kinds == ["0", "2"], "\(kinds)")
        #expect(try repo.check(options: CheckOptions(readDataFraction: 1)).isClean)
        #expect(try repo.restore(snap, to: dir.file("out")).failures.isEmpty)
        for f in ["text.txt", "noise.bin"] {
            #expect(
                FileManager.default.contents(atPath: dir.file("out") + dir.file("src/" + f))
                    == FileManager.default.contents(atPath: dir.file("src/" + f)))
        }
        let reopened = try Repository.open(path: dir.file("repo"), password: testPassword)
        #expect(reopened.config == repo.config)
        // A local directory gets LZ4 unless told otherwise, and stays format 3 (1 in the clear).
        let local = try Repository.initialize(
            path: dir.file("local"), password: testPassword, kdf: .insecureFastForTesting, durable: false)
        #expect(local.config.compression == .lz4 && local.config.formatVersion == 3)
        #expect(Repository.defaultCompression(for: local.storage) == .lz4)
    }

    @Test("config: zstd is format 4 with compression sealed into the key; LZ4 configs keep their versions and bytes")
    func config() throws {
        let keys = RepositoryKeys.random()
        let zstd = RepositoryConfig.makeNew(chunker: smallParameters, encrypted: true, compression: .zstd)
        #expect(zstd.formatVersion == 4)
        let stored = zstd.encoded(keys: keys)
        #expect(try ConfigFile.decode(stored, path: "c").resolve(keys: keys, path: "c") == zstd)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(stored)) as? [String: Any])
        #expect(object["compression"] as? String == "zstd")
        func edited(_ key: String, _ value: Any?) throws -> [UInt8] {
            var o = object
            o[key] = value
            return Array(try JSONSerialization.data(withJSONObject: o))
        }
        // The codec is bound to the key like every other clear field.
        #expect {
            try ConfigFile.decode(try edited("compression", "lz4"), path: "c").resolve(keys: keys, path: "c")
        } throws: { e in
            guard case .corrupt(_, let reason) = e as? CABackupError else { return false }
            return reason.contains("does not open with the key")
        }
        // Version 4 needs a codec this build knows; older versions have none.
        for (key, value) in [("compression", nil), ("compression", "brotli"), ("format_version", 3)] as [(String, Any?)]
        {
            #expect(throws: CABackupError.self, "\(key) = \(String(describing: value))") {
                try ConfigFile.decode(try edited(key, value), path: "c")
            }
        }
        // A plaintext zstd repository is format 4 too, so older clients refuse it alike.
        let plain = RepositoryConfig.makeNew(chunker: smallParameters, compression: .zstd)
        #expect(plain.formatVersion == 4)
        #expect(try RepositoryConfig.decode(plain.encoded(), path: "c") == plain)

        // LZ4: versions 1 and 3 as before, and no compression key in the file.
        let lz4 = RepositoryConfig.makeNew(chunker: smallParameters, encrypted: true)
        let lz4Plain = RepositoryConfig.makeNew(chunker: smallParameters)
        #expect(lz4.formatVersion == 3 && lz4Plain.formatVersion == 1)
        #expect(!String(decoding: lz4.encoded(keys: keys), as: UTF8.self).contains("compression"))
        #expect(!String(decoding: lz4Plain.encoded(), as: UTF8.self).contains("compression"))
        #expect(try ConfigFile.decode(lz4.encoded(keys: keys), path: "c").resolve(keys: keys, path: "c") == lz4)
        // The exact bytes of a plaintext LZ4 config, as every earlier version wrote them.
        let fixed = RepositoryConfig(
            formatVersion: 1, id: String(repeating: "ab", count: 32), chunker: smallParameters, idScheme: "sha256",
            encryption: "none", packSize: 1 << 24)
        #expect(
            String(decoding: fixed.encoded(), as: UTF8.self) == """
                {
                  "chunker" : {
                    "avg_size" : 8192,
                    "gear_seed" : "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
                    "max_size" : 65536,
                    "min_size" : 2048
                  },
                  "encryption" : "none",
                  "format_version" : 1,
                  "id" : "\(String(repeating: "ab", count: 32))",
                  "id_scheme" : "sha256",
                  "pack_size" : 16777216
                }

                """)
        // A v3 config that claims a codec is refused rather than half understood.
        var v3 = try #require(try JSONSerialization.jsonObject(with: Data(lz4.encoded(keys: keys))) as? [String: Any])
        v3["compression"] = "zstd"
        #expect(throws: CABackupError.self) {
            try ConfigFile.decode(Array(try JSONSerialization.data(withJSONObject: v3)), path: "c")
        }
    }

    @Test("a client that reads only up to format 3 refuses a zstd repository with 'upgrade cabackup'")
    func olderClientRefuses() throws {
        let keys = RepositoryKeys.random()
        let zstd = RepositoryConfig.makeNew(chunker: smallParameters, encrypted: true, compression: .zstd)
        let lz4 = RepositoryConfig.makeNew(chunker: smallParameters, encrypted: true)
        // The version gate as a build that knew formats up to 3 ran it.
        #expect {
            try ConfigFile.decode(zstd.encoded(keys: keys), path: "c", supported: 3)
        } throws: { e in
            guard case .unsupportedVersion(4, 3) = e as? CABackupError else { return false }
            return "\(e)".contains("upgrade cabackup")
        }
        #expect(throws: CABackupError.self) {
            try ConfigFile.decode(RepositoryConfig.makeNew(compression: .zstd).encoded(), path: "c", supported: 3)
        }
        // ...while it still opens the LZ4 repositories this build makes.
        #expect(try ConfigFile.decode(lz4.encoded(keys: keys), path: "c", supported: 3).formatVersion == 3)
        #expect(try ConfigFile.decode(RepositoryConfig.makeNew().encoded(), path: "c", supported: 3).formatVersion == 1)
    }
}
