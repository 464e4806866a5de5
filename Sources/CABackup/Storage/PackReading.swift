import CABackupCore
import CABackupFormat
import CABackupStorage

extension PackFormat {
    /// Reads and parses the header of a stored pack.
    static func readHeader(
        from storage: any Storage, name: String, size known: Int64? = nil, aead: AESGCM? = nil
    ) throws -> [PackEntry] {
        let what = "pack \(name)"
        do {
            let size = try known ?? storage.size(.pack, name)
            let header = try readHeaderBytes(size: size) {
                try storage.read(.pack, name, offset: $0, length: $1, into: $2)
            }
            return try parseHeader(header, packSize: size, aead: aead)
        } catch let e as PackError {
            throw CABackupError.corrupt(what: what, reason: e.description)
        } catch let e as CABackupError {
            throw e
        } catch {
            throw CABackupError.corrupt(what: what, reason: "\(error)")
        }
    }
}
