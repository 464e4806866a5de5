import CABackup
import Foundation

/// AWS Signature Version 4 for S3 requests signed in the `Authorization` header, the
/// payload sent in a single chunk (no chunked or presigned signing).
///
/// A pure function of its inputs: no clock, no I/O, so the published AWS examples and
/// botocore's vectors pin it exactly (`Tests/CABackupTests/SigV4Tests.swift`).
///
/// The canonical request is, line by line: the method; the path, every byte but
/// `A–Z a–z 0–9 - _ . ~ /` percent-encoded once (S3 neither normalizes nor double-encodes
/// the path, unlike the other AWS services); the query, each name and value encoded
/// the same way but with `/` encoded too, sorted by name then value; one
/// `name:value` line per signed header (names lowercased and sorted, values trimmed, inner
/// runs of spaces collapsed, repeated headers joined with `,`); a blank line; the signed
/// header names joined with `;`; the payload hash, the body's SHA-256 in hex or
/// `UNSIGNED-PAYLOAD`. The signing key is
/// `HMAC(HMAC(HMAC(HMAC("AWS4" + secret, yyyymmdd), region), service), "aws4_request")`.
package struct SigV4Signer: Sendable {
    /// The access key id, which goes into the `Credential` of every request.
    package let accessKey: String
    /// The secret access key, never sent, never printed.
    private let secretKey: String
    /// A temporary credential's session token, sent and signed as `x-amz-security-token`.
    package let sessionToken: String?
    /// The region of the credential scope, `us-east-1` for most S3-compatible stores.
    package let region: String
    /// The service of the credential scope: `s3`.
    package let service: String

    /// The payload hash of a request whose body is not signed (the transport protects it).
    package static let unsignedPayload = "UNSIGNED-PAYLOAD"
    /// The SHA-256 of the empty body, the payload hash of GET, HEAD and DELETE.
    package static let emptyPayloadHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

    /// - Parameters:
    ///   - accessKey: the access key id (`AWS_ACCESS_KEY_ID`).
    ///   - secretKey: the secret access key (`AWS_SECRET_ACCESS_KEY`).
    ///   - sessionToken: the session token of temporary credentials (`AWS_SESSION_TOKEN`).
    ///   - region: the region the request is signed for.
    ///   - service: the service the request is signed for.
    package init(
        accessKey: String, secretKey: String, sessionToken: String? = nil, region: String, service: String = "s3"
    ) {
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.sessionToken = sessionToken
        self.region = region
        self.service = service
    }

    /// The headers that authenticate one request, to add to it as they are.
    ///
    /// Every header in `headers` is signed, as is `host`; the caller must send them
    /// unchanged, with the path as ``encodePath(_:)`` and the query as ``canonicalQuery(_:)``
    /// give them.
    ///
    /// - Parameters:
    ///   - method: the HTTP method, upper case.
    ///   - host: the `Host` header: the host name, with `:port` when not the scheme's default.
    ///   - path: the decoded path, starting with `/` (`/bucket/key with spaces`).
    ///   - query: the decoded query parameters, in any order (`("list-type", "2")`).
    ///   - headers: further headers to sign, such as `Range` or `Content-Type`.
    ///   - payloadHash: the body's SHA-256 in lowercase hex, or ``unsignedPayload``.
    ///   - date: the time of signing; the store refuses a signature more than 15 minutes off.
    /// - Returns: `Authorization`, `x-amz-date`, `x-amz-content-sha256` and, with a session
    ///   token, `x-amz-security-token`.
    package func sign(
        method: String, host: String, path: String, query: [(String, String)] = [], headers: [(String, String)] = [],
        payloadHash: String, date: Date
    ) -> [(String, String)] {
        let timestamp = Self.timestamp(date)
        var added = [("x-amz-date", timestamp), ("x-amz-content-sha256", payloadHash)]
        if let sessionToken { added.append(("x-amz-security-token", sessionToken)) }
        let (canonical, signedHeaders) = canonicalRequest(
            method: method, host: host, path: path, query: query, headers: headers + added,
            payloadHash: payloadHash)
        let day = String(timestamp.prefix(8))
        let scope = "\(day)/\(region)/\(service)/aws4_request"
        let stringToSign = "AWS4-HMAC-SHA256\n\(timestamp)\n\(scope)\n\(sha256(Array(canonical.utf8)).hex)"
        var key = hmacSHA256(key: Array(("AWS4" + secretKey).utf8), day)
        for part in [region, service, "aws4_request"] { key = hmacSHA256(key: key, part) }
        let signature = hexString(hmacSHA256(key: key, stringToSign))
        let authorization =
            "AWS4-HMAC-SHA256 Credential=\(accessKey)/\(scope), SignedHeaders=\(signedHeaders), Signature=\(signature)"
        return [("Authorization", authorization)] + added
    }

    /// The canonical request (see the type's discussion) and the signed header names
    /// joined with `;`. `headers` must already hold `x-amz-date` and the others signed.
    func canonicalRequest(
        method: String, host: String, path: String, query: [(String, String)], headers: [(String, String)],
        payloadHash: String
    ) -> (request: String, signedHeaders: String) {
        var values: [String: [String]] = ["host": [host]]
        for (name, value) in headers {
            let lower = name.lowercased()
            // The caller's Host, if any, is the one given as `host`.
            if lower == "host" { continue }
            values[lower, default: []].append(Self.trimAll(value))
        }
        let names = values.keys.sorted()
        let headerLines = names.map { "\($0):\(values[$0]!.joined(separator: ","))\n" }.joined()
        let signedHeaders = names.joined(separator: ";")
        let request = [
            method, Self.encodePath(path), Self.canonicalQuery(query), headerLines, signedHeaders, payloadHash,
        ].joined(separator: "\n")
        return (request, signedHeaders)
    }

    /// The path as sent and signed: each byte outside `A–Z a–z 0–9 - _ . ~ /` as `%XX`
    /// (upper-case hex), once; an empty path is `/`.
    package static func encodePath(_ path: String) -> String {
        path.isEmpty ? "/" : uriEncode(path, keepSlash: true)
    }

    /// The query as sent and signed: `name=value` pairs, both encoded like the path but
    /// with `/` encoded too, sorted by encoded name then value, joined with `&`. A parameter
    /// without a value (`?lifecycle`) is `name=`.
    package static func canonicalQuery(_ query: [(String, String)]) -> String {
        query.map { (uriEncode($0.0, keepSlash: false), uriEncode($0.1, keepSlash: false)) }
            .sorted { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }
            .map { "\($0.0)=\($0.1)" }
            .joined(separator: "&")
    }

    /// RFC 3986 percent-encoding of the UTF-8 bytes, leaving only the unreserved characters
    /// (and `/` when `keepSlash`). Strings compare by their bytes here, so the sort above
    /// is the byte order the specification asks for: every encoded character is ASCII.
    static func uriEncode(_ s: String, keepSlash: Bool) -> String {
        let digits = Array("0123456789ABCDEF".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(s.utf8.count)
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."),
                UInt8(ascii: "~"):
                out.append(b)
            case UInt8(ascii: "/") where keepSlash:
                out.append(b)
            default:
                out += [UInt8(ascii: "%"), digits[Int(b >> 4)], digits[Int(b & 0xF)]]
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// A header value with leading and trailing whitespace removed and each inner run of
    /// whitespace made one space (the specification's `Trimall`).
    static func trimAll(_ value: String) -> String {
        value.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" })
            .joined(separator: " ")
    }

    /// `yyyymmddThhmmssZ` in UTC, the form of `x-amz-date`.
    static func timestamp(_ date: Date) -> String {
        let seconds = Int64(date.timeIntervalSince1970.rounded(.down))
        let days = seconds >= 0 ? seconds / 86400 : (seconds - 86399) / 86400
        let secondOfDay = seconds - days * 86400
        // Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
        // civil-from-days: eras of 400 years starting on 1 March).
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let mp = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
        func two(_ n: Int64) -> String { n < 10 ? "0\(n)" : "\(n)" }
        return "\(year)\(two(month))\(two(day))T\(two(secondOfDay / 3600))\(two(secondOfDay / 60 % 60))"
            + "\(two(secondOfDay % 60))Z"
    }
}

/// HMAC-SHA-256 of a string's UTF-8 bytes; a key longer than SHA-256's 64-byte block is
/// replaced by its digest first (RFC 2104), which only an absurdly long secret needs.
private func hmacSHA256(key: [UInt8], _ message: String) -> [UInt8] {
    let key = key.count > 64 ? sha256(key).bytes : key
    return Array(message.utf8).withUnsafeBytes { SHA256Hasher(hmacKey: key).hash($0) }.bytes
}
