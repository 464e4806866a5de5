import Foundation
import Testing

@testable import CABackup
@testable import CABackupCore
@testable import CABackupFormat

@Suite("security: the config is authenticated, ids are validated, SQL is bound, key slots are bounded")
struct SecurityTests {
    @Test("v3 binds every clear config field to the key; a v2 config still opens with its one valid set of values")
    func configBinding() throws {
        let keys = RepositoryKeys.random()
        let config = RepositoryConfig.makeNew(chunker: smallParameters, encrypted: true)
        #expect(config.formatVersion == 3)
        let stored = config.encoded(keys: keys)
        #expect(try ConfigFile.decode(stored, path: "c").resolve(keys: keys, path: "c") == config)
        func edited(_ key: String, _ value: Any) throws -> [UInt8] {
            var object = try #require(try JSONSerialization.jsonObject(with: Data(stored)) as? [String: Any])
            object[key] = value
            return Array(try JSONSerialization.data(withJSONObject: object))
        }
        for (key, value) in [
            ("pack_size", 8 << 20 as Any), ("id", String(repeating: "ab", count: 32)), ("format_version", 2),
        ] {
            #expect(throws: CABackupError.self, "changed \(key)") {
                try ConfigFile.decode(try edited(key, value), path: "c").resolve(keys: keys, path: "c")
            }
        }
        // A v2 config (sealed chunker only) opens; with a pack size out of bounds, an id
        // that is not 64 hex digits, or another cipher it is refused before any key is used.
        var v2 = config
        v2.formatVersion = 2
        let v2Bytes = v2.encoded(keys: keys)
        #expect(try ConfigFile.decode(v2Bytes, path: "c").resolve(keys: keys, path: "c") == v2)
        var big = v2
        big.packSize = 1 << 30
        #expect(throws: CABackupError.self) { try ConfigFile.decode(big.encoded(keys: keys), path: "c") }
        for id in ["../../x", "x'); DROP TABLE meta; --", String(repeating: "AB", count: 32), ""] {
            var crafted = v2
            crafted.id = id
            #expect(throws: CABackupError.self, "id \(id)") {
                try ConfigFile.decode(crafted.encoded(keys: keys), path: "c")
            }
        }
        var object = try #require(try JSONSerialization.jsonObject(with: Data(v2Bytes)) as? [String: Any])
        object["encryption"] = "none"
        #expect(throws: CABackupError.self) {
            try ConfigFile.decode(Array(try JSONSerialization.data(withJSONObject: object)), path: "c")
        }
    }

    @Test("a local config replaced by a plaintext one is refused by the device that opened it")
    func localDowngrade() throws {
        let dir = TemporaryDirectory()
        let repo = try makeTestRepository(dir)
        let path = dir.file("repo")
        let plain = RepositoryConfig(
            formatVersion: 1, id: repo.config.id, chunker: smallParameters, idScheme: "sha256", encryption: "none",
            packSize: repo.config.packSize)
        try writeFileAtomically(path + "/config", plain.encoded(), durable: false)
        #expect {
            try Repository.open(path: path, password: testPassword)
        } throws: { e in
            guard case .untrusted(let m) = e as? CABackupError else { return false }
            return m.contains("changed since this device first opened it") && m.contains("cabackup trust")
        }
        #expect(throws: CABackupError.self) { try Repository.open(path: path) }
        // Accepted on purpose (what `cabackup trust` does), it opens as what it now is.
        let trusted = try Repository.trustNewConfig(path: path, passwordProvider: { testPassword })
        #expect(!trusted.config.isEncrypted)
        #expect(try Repository.open(path: path).config.isEncrypted == false)
    }

    @Test("key slots: parameters are bounded; an unopenable slot is skipped and named; the last slot is tried first")
    func keySlotBounds() throws {
        #expect((try? KDFParameters.default.validate()) != nil)
        #expect((try? KDFParameters.insecureFastForTesting.validate()) != nil)
        for bad in [
            KDFParameters(n: 1 << 22, r: 8, p: 1), KDFParameters(n: 1 << 16, r: 16, p: 1),
            KDFParameters(n: 1 << 15, r: 8, p: 16), KDFParameters(n: 3 << 10, r: 8, p: 1),
            KDFParameters(n: 2, r: 8, p: 1),
        ] {
            #expect(throws: CABackupError.self, "\(bad)") { try bad.validate() }
        }
        let dir = TemporaryDirectory()
        let repo = try makeTestRepository(dir)
        let keys = try #require(repo.keys)
        // A slot with costly parameters, named to sort first.
        var costly = try KeySlot.make(keys: keys, password: "another password", kdf: .insecureFastForTesting)
        costly.n = 1 << 22
        let costlyName = String(repeating: "0", count: 64)
        try costly.encoded().withUnsafeBytes { try repo.storage.put(.key, costlyName, bytes: $0) }
        // Without a slot remembered, the costly one comes first: skipped and named.
        let fresh = try Repository.unlock(repo.storage, password: testPassword, preferred: nil)
        #expect(fresh.slot == repo.currentKeyID)
        #expect(fresh.skipped == [costlyName])
        // The slot that opened last time is tried first: the costly one is never looked at.
        let again = try Repository.unlock(repo.storage, password: testPassword, preferred: repo.currentKeyID)
        #expect(again.slot == repo.currentKeyID)
        #expect(again.skipped.isEmpty)
        #expect(try Repository.open(path: dir.file("repo"), password: testPassword).warnings.isEmpty)
    }
}
