import CABackupCore
import CABackupFormat
import CABackupStorage
import Foundation

extension Repository {
    /// Writes a key slot and returns its name.
    static func writeKeySlot(_ slot: KeySlot, to storage: any Storage) throws -> String {
        let bytes = slot.encoded()
        let name = sha256(bytes).hex
        try bytes.withUnsafeBytes { (raw) throws in try storage.put(.key, name, bytes: raw) }
        return name
    }

    /// The most key slots one open tries (each costs a scrypt derivation): enough for
    /// every password a household shares one repository with, few enough that a storage
    /// that adds slots cannot make an open take minutes.
    public static let maxKeySlotTries = 10

    /// Tries `password` on the key slots: `preferred` (the slot that opened this
    /// repository last time) first, then the others in name order, at most
    /// ``maxKeySlotTries`` of them. Slots that do not parse or whose scrypt parameters are
    /// outside ``KDFParameters/validate()`` are skipped and named in `skipped`.
    ///
    /// - Throws: ``CABackupError/wrongPassword(_:)`` when no slot opens.
    static func unlock(
        _ storage: any Storage, password: String, preferred: String? = nil
    ) throws -> (
        keys: RepositoryKeys, slot: String, skipped: [String]
    ) {
        // The slot this device opened last time first, without listing: one round trip
        // less on every open over a network.
        var triedFirst: String?
        if let preferred, isObjectName(preferred), let bytes = try? storage.read(.key, preferred),
            let slot = KeySlot.decode(bytes), slot.kdf == "scrypt", (try? slot.parameters.validate()) != nil
        {
            if let keys = try slot.unwrap(password: password) { return (keys, preferred, []) }
            triedFirst = preferred  // the wrong password for it: not tried again below
        }
        var names = try storage.list(.key).filter(isObjectName).sorted()
        guard !names.isEmpty else {
            throw CABackupError.corrupt(what: "repository \(storage.location)", reason: "it has no key slots in keys/")
        }
        if let preferred, let i = names.firstIndex(of: preferred) { names.insert(names.remove(at: i), at: 0) }
        var skipped: [String] = []
        var tried = triedFirst == nil ? 0 : 1
        for name in names where name != triedFirst {
            guard tried < maxKeySlotTries else { break }
            guard let bytes = try? storage.read(.key, name), let slot = KeySlot.decode(bytes), slot.kdf == "scrypt",
                (try? slot.parameters.validate()) != nil
            else {
                skipped.append(name)
                continue
            }
            tried += 1
            if let keys = try slot.unwrap(password: password) { return (keys, name, skipped) }
        }
        if tried == maxKeySlotTries && names.count - skipped.count > tried {
            throw CABackupError.wrongPassword(
                "\(storage.location) (tried \(tried) of its \(names.count - skipped.count) key slots, the most one open tries)"
            )
        }
        throw CABackupError.wrongPassword(storage.location)
    }

    /// The key slots of an encrypted repository.
    public func keySlots() throws -> [KeyInfo] {
        guard config.isEncrypted else { throw CABackupError.notEncrypted(storage.location) }
        var out: [KeyInfo] = []
        for name in try storage.list(.key).sorted() {
            guard let slot = KeySlot.decode(try storage.read(.key, name)) else { continue }
            out.append(
                KeyInfo(
                    id: name, created: slot.created, hostname: slot.hostname, username: slot.username,
                    isCurrent: name == currentKeyID))
        }
        return out
    }

    /// Adds a key slot that opens the repository with `password`; returns its id.
    @discardableResult
    public func addKey(password: String, kdf: KDFParameters = .default) throws -> String {
        guard let keys else { throw CABackupError.notEncrypted(storage.location) }
        try checkNewPassword(password)
        return try Self.writeKeySlot(try KeySlot.make(keys: keys, password: password, kdf: kdf), to: storage)
    }

    /// Removes the key slot whose id starts with `prefix` (8+ hex digits). The slot this
    /// repository was opened with cannot be removed, so at least one slot always remains.
    ///
    /// - Throws: ``CABackupError/keyNotFound(_:)``, or ``CABackupError/invalidArgument(_:)``
    ///   for the current slot.
    public func removeKey(_ prefix: String) throws {
        guard config.isEncrypted else { throw CABackupError.notEncrypted(storage.location) }
        try checkCanDelete()
        let p = prefix.lowercased()
        let matches = try storage.list(.key).filter { p.count >= 8 && $0.hasPrefix(p) }
        guard matches.count == 1, let name = matches.first else { throw CABackupError.keyNotFound(prefix) }
        guard name != currentKeyID else {
            throw CABackupError.invalidArgument(
                "key \(name.prefix(8)) is the one in use: open the repository with another password to remove it, or use 'cabackup key passwd'"
            )
        }
        try storage.remove(.key, name)
    }

    /// Replaces the slot this repository was opened with by one for `newPassword`;
    /// returns the new slot's id. The new slot is written before the old one is removed.
    @discardableResult
    public func changePassword(to newPassword: String, kdf: KDFParameters = .default) throws -> String {
        guard keys != nil, let old = currentKeyID else { throw CABackupError.notEncrypted(storage.location) }
        try checkCanDelete()
        let name = try addKey(password: newPassword, kdf: kdf)
        try storage.remove(.key, old)
        setCurrentKeyID(name)
        return name
    }
}

/// The shortest password a new key slot or account accepts (existing ones still open).
public let minimumPasswordLength = 8

/// Refuses passwords no one should use for a backup.
public func checkNewPassword(_ password: String) throws {
    guard !password.isEmpty else { throw CABackupError.invalidArgument("the password is empty: choose a password") }
    guard password.count >= minimumPasswordLength else {
        throw CABackupError.invalidArgument(
            "the password is shorter than \(minimumPasswordLength) characters: choose a longer one (nothing was changed)"
        )
    }
    guard password.utf8.count <= 4096 else {
        throw CABackupError.invalidArgument("the password is longer than 4096 bytes: choose a shorter one")
    }
}
