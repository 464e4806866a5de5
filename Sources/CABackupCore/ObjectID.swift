/// A 32-byte identifier: the SHA-256 of a blob's plaintext, of a pack's bytes, or of a
/// snapshot record.
///
/// Stored as four big-endian words so that equality and hashing cost four integer
/// operations and `<` orders ids exactly as their bytes (and their hex names) sort.
public struct ObjectID: Hashable, Comparable, Sendable, CustomStringConvertible {
    @usableFromInline package var w0: UInt64
    @usableFromInline package var w1: UInt64
    @usableFromInline package var w2: UInt64
    @usableFromInline var w3: UInt64

    /// The number of bytes in an id.
    public static let byteCount = 32

    /// The all-zero id (never the hash of real content).
    public static let zero = ObjectID(w0: 0, w1: 0, w2: 0, w3: 0)

    @usableFromInline init(w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64) {
        self.w0 = w0
        self.w1 = w1
        self.w2 = w2
        self.w3 = w3
    }

    /// Reads an id from the first 32 bytes of `raw`.
    /// - Precondition: `raw.count >= 32`.
    @inlinable
    public init(_ raw: UnsafeRawBufferPointer) {
        precondition(raw.count >= 32, "an ObjectID needs 32 bytes")
        w0 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        w1 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        w2 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        w3 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
    }

    /// Reads an id from a byte array of exactly 32 bytes; `nil` for any other length.
    public init?(bytes: [UInt8]) {
        guard bytes.count == 32 else { return nil }
        self = bytes.withUnsafeBytes { ObjectID($0) }
    }

    /// Parses 64 lowercase or uppercase hex digits; `nil` for anything else.
    public init?(hex: some StringProtocol) {
        let utf8 = Array(hex.utf8)
        guard utf8.count == 64 else { return nil }
        var bytes = [UInt8](repeating: 0, count: 32)
        for i in 0..<32 {
            guard let hi = hexValue(utf8[2 * i]), let lo = hexValue(utf8[2 * i + 1]) else { return nil }
            bytes[i] = hi << 4 | lo
        }
        self.init(bytes: bytes)
    }

    /// Calls `body` with the 32 bytes of the id.
    ///
    /// The bytes live in a temporary allocation, not in a tuple passed `inout`: Swift 6.3.1
    /// at `-O` miscompiles `withUnsafeBytes(of: &tuple)` here (the closure read zeros), see
    /// `docs/toolchain.md`.
    @inlinable
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try withUnsafeTemporaryAllocation(byteCount: 32, alignment: 8) { raw in
            raw.storeBytes(of: w0.bigEndian, toByteOffset: 0, as: UInt64.self)
            raw.storeBytes(of: w1.bigEndian, toByteOffset: 8, as: UInt64.self)
            raw.storeBytes(of: w2.bigEndian, toByteOffset: 16, as: UInt64.self)
            raw.storeBytes(of: w3.bigEndian, toByteOffset: 24, as: UInt64.self)
            return try body(UnsafeRawBufferPointer(raw))
        }
    }

    /// The 32 bytes of the id.
    public var bytes: [UInt8] { withUnsafeBytes { Array($0) } }

    /// The id as 64 lowercase hex digits.
    public var hex: String {
        withUnsafeBytes { raw in
            String(unsafeUninitializedCapacity: 64) { out in
                for (i, b) in raw.enumerated() {
                    out[2 * i] = hexDigits[Int(b >> 4)]
                    out[2 * i + 1] = hexDigits[Int(b & 0xF)]
                }
                return 64
            }
        }
    }

    /// The first eight hex digits, as `snapshots` prints them.
    public var shortHex: String { String(hex.prefix(8)) }

    public var description: String { hex }

    @inlinable
    public static func < (a: ObjectID, b: ObjectID) -> Bool {
        (a.w0, a.w1, a.w2, a.w3) < (b.w0, b.w1, b.w2, b.w3)
    }
}

/// The id of a blob: SHA-256 of its plaintext.
public typealias BlobID = ObjectID
/// The id of a pack file: SHA-256 of its bytes, also its file name.
public typealias PackID = ObjectID
/// The id of a snapshot: SHA-256 of its stored record, also its file name.
public typealias SnapshotID = ObjectID

private let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)

@inline(__always)
private func hexValue(_ c: UInt8) -> UInt8? {
    switch c {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
    default: return nil
    }
}

/// Hex encoding of arbitrary bytes.
package func hexString(_ bytes: some Sequence<UInt8>) -> String {
    var s = ""
    for b in bytes {
        s.unicodeScalars.append(Unicode.Scalar(hexDigits[Int(b >> 4)]))
        s.unicodeScalars.append(Unicode.Scalar(hexDigits[Int(b & 0xF)]))
    }
    return s
}

/// Decodes hex of any even length; `nil` when malformed.
package func bytesFromHex(_ hex: String) -> [UInt8]? {
    let utf8 = Array(hex.utf8)
    guard utf8.count % 2 == 0 else { return nil }
    var out = [UInt8]()
    out.reserveCapacity(utf8.count / 2)
    var i = 0
    while i < utf8.count {
        guard let hi = hexValue(utf8[i]), let lo = hexValue(utf8[i + 1]) else { return nil }
        out.append(hi << 4 | lo)
        i += 2
    }
    return out
}
