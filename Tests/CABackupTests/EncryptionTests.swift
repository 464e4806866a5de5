import Foundation
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

func bytes(hex: String) -> [UInt8] {
    var out: [UInt8] = []
    var i = hex.startIndex
    while i < hex.endIndex {
        let j = hex.index(i, offsetBy: 2)
        out.append(UInt8(hex[i..<j], radix: 16)!)
        i = j
    }
    return out
}

/// Every file under `root`, recursively (the repository's files, index included).
func allFiles(_ root: String) -> [String] {
    let e = FileManager.default.enumerator(atPath: root)!
    return e.compactMap { ($0 as? String).map { root + "/" + $0 } }.filter {
        var isDir: ObjCBool = false
        return FileManager.default.fileExists(atPath: $0, isDirectory: &isDir) && !isDir.boolValue
    }
}

/// Whether `needle` occurs in any file under `root`, or in any file name.
func repositoryContains(_ root: String, _ needle: [UInt8]) -> Bool {
    let n = Data(needle)
    for f in allFiles(root) {
        if Data(f.utf8).range(of: n) != nil { return true }
        if (FileManager.default.contents(atPath: f) ?? Data()).range(of: n) != nil { return true }
    }
    return false
}

@Suite("Encryption: primitives as wired, and what the repository's files reveal")
struct EncryptionTests {
    @Test("HMAC-SHA-256: RFC 4231 test cases 1 and 2; plain SHA-256 of 'abc'")
    func hmacVectors() {
        #expect(
            hmacSHA256(key: [UInt8](repeating: 0x0B, count: 20), Array("Hi There".utf8)).hex
                == "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        #expect(
            hmacSHA256(key: Array("Jefe".utf8), Array("what do ya want for nothing?".utf8)).hex
                == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        // The hasher is reused: a second digest must not inherit state from the first.
        let h = SHA256Hasher(hmacKey: Array("Jefe".utf8))
        let msg = Array("what do ya want for nothing?".utf8)
        let first = msg.withUnsafeBytes { h.hash($0) }
        #expect(first == msg.withUnsafeBytes { h.hash($0) })
        #expect(
            sha256(Array("abc".utf8)).hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    @Test("AES-256-GCM: NIST GCM test cases 14 and 16; a changed byte or other AAD fails")
    func gcmVectors() {
        let zero = AESGCM(key: [UInt8](repeating: 0, count: 32))
        let c14 = zero.seal([UInt8](repeating: 0, count: 16), aad: [], nonce: [UInt8](repeating: 0, count: 12))
        #expect(hexString(c14[12...]) == "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919")

        let key = bytes(hex: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
        let plain = bytes(
            hex:
                "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
        )
        let aad = bytes(hex: "feedfacedeadbeeffeedfacedeadbeefabaddad2")
        let g = AESGCM(key: key)
        let sealed = g.seal(plain, aad: aad, nonce: bytes(hex: "cafebabefacedbaddecaf888"))
        #expect(
            hexString(sealed[12...])
                == "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
                + "76fc6ece0f4e1768cddf8853bb2d551b")
        #expect(g.open(sealed, aad: aad) == plain)
        for i in [0, 12, sealed.count - 1] {
            var bad = sealed
            bad[i] ^= 1
            #expect(g.open(bad, aad: aad) == nil)
        }
        #expect(g.open(sealed, aad: []) == nil)
        #expect(AESGCM(key: [UInt8](repeating: 1, count: 32)).open(sealed, aad: aad) == nil)
        // Fresh random nonces: the same plaintext never seals to the same bytes.
        #expect(g.seal(plain, aad: aad) != g.seal(plain, aad: aad))
    }

    @Test("scrypt: RFC 7914 test vectors 1, 2 and 3 (2 and 3 in full and half memory, lanes paired or not)")
    func scryptVectors() throws {
        #expect(
            hexString(try scrypt(password: [], salt: [], n: 16, r: 1, p: 1, length: 64))
                == "77d6576238657b203b19ca42c18a0497f16b4844e3074ae8dfdffa3fede21442"
                + "fcd0069ded0948f8326a753a0fc81f17e8d3e0fb2e0d3628cf35e20c38d18906")
        for half in [false, true] {
            for pairs in Set([false, scryptPairsSupported]) {
                #expect(
                    hexString(
                        try scrypt(
                            password: Array("password".utf8), salt: Array("NaCl".utf8), n: 1024, r: 8, p: 16,
                            length: 64, threads: 2, halfMemory: half, pairs: pairs))
                        == "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"
                        + "2eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640",
                    "half=\(half) pairs=\(pairs)")
            }
            #expect(
                hexString(
                    try scrypt(
                        password: Array("pleaseletmein".utf8), salt: Array("SodiumChloride".utf8), n: 16384, r: 8,
                        p: 1, length: 64, halfMemory: half))
                    == "7023bdcb3afd7348461c06cd81fd38ebfda8fbba904f8e3ea9b543f6545da1f2"
                    + "d5432955613f0fcf62d49705242a9af9e61e85dc0d651e40dfcf017b45575887")
        }
    }

    @Test(
        "scrypt: the same bytes as libcrypto's for many parameters, on one thread or several, in full or half memory, lanes paired or not"
    )
    func scryptMatchesLibcrypto() throws {
        var rng = SplitMix64(seed: 7914)
        for round in 0..<48 {
            let n = UInt64(1) << UInt64(1 + rng.next() % 10)
            let r = 1 + rng.next() % 9
            let p = 1 + rng.next() % 5
            let length = 1 + Int(rng.next() % 100)
            let password = (0..<Int(rng.next() % 40)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            let salt = (0..<Int(rng.next() % 40)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            let expected = try scryptOpenSSL(password: password, salt: salt, n: n, r: r, p: p, length: length)
            let threads = 1 + round % 3
            let half = round % 2 == 1
            let pairs = round % 4 >= 2
            let got = try scrypt(
                password: password, salt: salt, n: n, r: r, p: p, length: length, threads: threads, halfMemory: half,
                pairs: pairs)
            #expect(
                got == expected,
                "N=\(n) r=\(r) p=\(p) length=\(length) threads=\(threads) half=\(half) pairs=\(pairs)")
        }
        #expect(throws: CABackupError.self) { try scrypt(password: [], salt: [], n: 3, r: 8, p: 1, length: 32) }
        #expect(throws: CABackupError.self) { try scrypt(password: [], salt: [], n: 1 << 24, r: 8, p: 1, length: 32) }
    }

    @Test("sealed pack header: round trip; without the key only ids and lengths; tampering fails")
    func sealedHeader() throws {
        let g = AESGCM(key: [UInt8](repeating: 7, count: 32))
        let entries = [
            PackEntry(id: sha256([1]), type: .data, compression: .lz4, offset: 0, length: 100, rawLength: 400),
            PackEntry(id: sha256([2]), type: .tree, compression: .none, offset: 100, length: 60, rawLength: 32),
        ]
        let h = PackFormat.encodeHeader(entries, aead: g)
        let size = Int64(160 + h.count)
        let hlen = try PackFormat.parseTrailer(Array(h.suffix(8)), packSize: size)
        let header = Array(h.prefix(hlen))
        #expect(try PackFormat.parseHeader(header, packSize: size, aead: g) == entries)
        let clear = try PackFormat.parseClearHeader(header, packSize: size)
        #expect(clear.sealed)
        #expect(clear.entries.map(\.id) == entries.map(\.id))
        #expect(clear.entries.map(\.length) == [100, 60])
        #expect(throws: PackError.self) { try PackFormat.parseHeader(header, packSize: size) }
        var bad = header
        bad[header.count - 20] ^= 1
        #expect(throws: PackError.self) { try PackFormat.parseHeader(bad, packSize: size, aead: g) }
        // A changed length in the clear part fails too: it is authenticated.
        bad = header
        bad[6] ^= 1
        #expect(throws: PackError.self) { try PackFormat.parseHeader(bad, packSize: size + 1, aead: g) }
    }

    /// A tree whose file names and contents are distinctive, and not compressible by LZ4.
    func secretTree(_ dir: TemporaryDirectory) -> (path: String, content: [UInt8], name: [UInt8]) {
        let content = Array("SECRET-CONTENT-7f3a9c".utf8) + pseudoRandomBytes(count: 64, seed: 9)
        dir.write("src/SECRETNAME-e41b.txt", content)
        dir.write("src/big.bin", pseudoRandomBytes(count: 200_000, seed: 10))
        return (dir.file("src"), Array("SECRET-CONTENT-7f3a9c".utf8), Array("SECRETNAME-e41b".utf8))
    }

    @Test("no plaintext content, name or plain chunk id in an encrypted repository; a plaintext one shows them")
    func noPlaintext() throws {
        for encrypted in [true, false] {
            let dir = TemporaryDirectory()
            let (src, content, name) = secretTree(dir)
            let repo = try makeTestRepository(dir, password: encrypted ? testPassword : nil)
            _ = try repo.snapshot(paths: [src])
            let plainID = Array(
                sha256(Array(FileManager.default.contents(atPath: src + "/SECRETNAME-e41b.txt")!)).hex.utf8)
            let root = dir.file("repo")
            #expect(repositoryContains(root, content) == !encrypted)
            #expect(repositoryContains(root, name) == !encrypted)
            // Index rows hold raw id bytes, file names hex: look for both forms.
            let rawID = sha256(Array(FileManager.default.contents(atPath: src + "/SECRETNAME-e41b.txt")!))
            let rawIDBytes = rawID.withUnsafeBytes { Array($0) }
            #expect((repositoryContains(root, rawIDBytes) || repositoryContains(root, plainID)) == !encrypted)
            // The config holds the Gear seed in the clear only when not encrypted.
            let config = String(decoding: FileManager.default.contents(atPath: root + "/config")!, as: UTF8.self)
            #expect(config.contains("gear_seed") == !encrypted)
        }
    }

    @Test("a copy of the repository opens only with the password; a wrong one changes nothing")
    func copiedRepository() throws {
        let dir = TemporaryDirectory()
        let (src, _, _) = secretTree(dir)
        let repo = try makeTestRepository(dir)
        let snap = try repo.snapshot(paths: [src]).snapshot
        let copy = dir.file("copy")
        #expect(try run("/bin/cp", ["-a", dir.file("repo"), copy]) == 0)
        try? FileManager.default.removeItem(atPath: copy + "/index")
        func listing() -> [String: Data] {
            Dictionary(uniqueKeysWithValues: allFiles(copy).map { ($0, FileManager.default.contents(atPath: $0)!) })
        }
        let before = listing()
        #expect {
            try Repository.open(path: copy)
        } throws: { e in
            if case .passwordRequired = e as? CABackupError { return true }
            return false
        }
        #expect {
            try Repository.open(path: copy, password: "not the password")
        } throws: { e in
            guard case .wrongPassword = e as? CABackupError else { return false }
            return "\(e)".contains("wrong password")
        }
        #expect(listing() == before)
        let opened = try Repository.open(path: copy, password: testPassword)
        #expect(try opened.snapshots().map(\.id) == [snap.id])
        let r = try opened.restore(snap, to: dir.file("out"))
        #expect(r.failures.isEmpty)
        #expect(
            FileManager.default.contents(atPath: dir.file("out") + src + "/big.bin")
                == Data(pseudoRandomBytes(count: 200_000, seed: 10)))
    }

    @Test("changed ciphertext: check reports the blob and the file; a damaged record is reported")
    func tampering() throws {
        let dir = TemporaryDirectory()
        let (src, _, _) = secretTree(dir)
        let repo = try makeTestRepository(dir)
        let snap = try repo.snapshot(paths: [src]).snapshot
        var node: Node?
        try repo.list(snap) { if $0.displayPath.hasSuffix("big.bin") { node = $0.node } }
        let loc = try #require(try repo.index.lookup(node!.content[1]))
        let packPath = dir.file("repo/data/\(loc.pack.hex.prefix(2))/\(loc.pack.hex)")
        var bytes = [UInt8](FileManager.default.contents(atPath: packPath)!)
        bytes[Int(loc.offset) + loc.length / 2] ^= 0x01
        try Data(bytes).write(to: URL(fileURLWithPath: packPath))
        let report = try repo.check(options: CheckOptions(readDataFraction: 1))
        let damage = report.problems.first { $0.message.contains(node!.content[1].hex) }
        #expect(damage?.message.contains("authentication failed") == true)
        #expect(damage?.paths.contains { $0.hasSuffix("big.bin") } == true)
        let restored = try repo.restore(snap, to: dir.file("out"))
        #expect(restored.failures.map(\.path).contains { $0.hasSuffix("big.bin") })

        // A snapshot record whose sealed bytes changed: stored under a name that matches
        // them, so only authentication can catch it.
        var record = try repo.storage.read(.snapshot, snap.id.hex)
        record[20] ^= 1
        let forged = sha256(record)
        try record.withUnsafeBytes { try repo.storage.put(.snapshot, forged.hex, bytes: $0) }
        let again = try repo.check()
        #expect(again.problems.contains { $0.message.contains(forged.hex) && $0.message.contains("authentication") })
    }

    @Test("key slots: add, open with either, remove the other, change the password")
    func keySlots() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("repo")
        let repo = try Repository.initialize(
            path: path, password: "first password", chunker: smallParameters, kdf: .insecureFastForTesting,
            durable: false)
        let first = try #require(try repo.keySlots().first)
        let second = try repo.addKey(password: "second password", kdf: .insecureFastForTesting)
        #expect(try repo.keySlots().count == 2)
        let viaSecond = try Repository.open(path: path, password: "second password")
        #expect(try viaSecond.keySlots().first { $0.isCurrent }?.id == second)
        #expect(throws: CABackupError.self) { try viaSecond.removeKey(second) }
        try viaSecond.removeKey(String(first.id.prefix(8)))
        #expect(throws: CABackupError.self) { try Repository.open(path: path, password: "first password") }
        let third = try viaSecond.changePassword(to: "third password", kdf: .insecureFastForTesting)
        #expect(try viaSecond.keySlots().map(\.id) == [third])
        #expect(throws: CABackupError.self) { try Repository.open(path: path, password: "second password") }
        #expect(try Repository.open(path: path, password: "third password").config.chunker == smallParameters)
        #expect(throws: CABackupError.self) { try repo.addKey(password: "") }
        #expect {
            try repo.addKey(password: "short")
        } throws: { e in
            "\(e)".contains("shorter than 8 characters")
        }
        #expect(try repo.keySlots().count == 1, "a refused password adds no slot")
    }
}

/// Runs a program, returning its exit status.
func run(_ path: String, _ args: [String]) throws -> Int32 {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args
    try p.run()
    p.waitUntilExit()
    return p.terminationStatus
}
