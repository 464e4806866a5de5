import Foundation
import Testing

@testable import CABackup
@testable import CABackupRemote

/// The credentials and time of AWS's published S3 examples ("Signature Calculations for the
/// Authorization Header: Transferring Payload in a Single Chunk", Amazon S3 API Reference).
private let example = SigV4Signer(
    accessKey: "AKIAIOSFODNN7EXAMPLE", secretKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", region: "us-east-1")
private let exampleHost = "examplebucket.s3.amazonaws.com"
/// 2013-05-24T00:00:00Z.
private let exampleDate = Date(timeIntervalSince1970: 1_369_353_600)
private let emptyHash = SigV4Signer.emptyPayloadHash

/// The `Authorization` header the examples print, in our (and botocore's) `, ` form.
private func exampleAuthorization(signedHeaders: String, signature: String) -> String {
    "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        + "SignedHeaders=\(signedHeaders), Signature=\(signature)"
}

private func header(_ name: String, _ headers: [(String, String)]) -> String? {
    headers.first { $0.0.lowercased() == name.lowercased() }?.1
}

/// One request signed by botocore (`scripts/sigv4-vectors`).
private struct BotocoreVector: Decodable {
    let name: String
    let accessKey: String
    let secretKey: String
    let sessionToken: String?
    let region: String
    let date: Int
    let method: String
    let host: String
    let path: String
    let query: [[String]]
    let headers: [[String]]
    let payloadHash: String
    let authorization: String
    let canonicalRequest: String
}

private struct BotocoreVectors: Decodable {
    let vectors: [BotocoreVector]
}

@Suite("AWS Signature Version 4 for S3")
struct SigV4Tests {
    @Test("AWS example: GET Object with Range")
    func getObject() {
        let headers = example.sign(
            method: "GET", host: exampleHost, path: "/test.txt", headers: [("Range", "bytes=0-9")],
            payloadHash: emptyHash, date: exampleDate)
        #expect(
            header("Authorization", headers)
                == exampleAuthorization(
                    signedHeaders: "host;range;x-amz-content-sha256;x-amz-date",
                    signature: "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"))
        #expect(header("x-amz-date", headers) == "20130524T000000Z")
        #expect(header("x-amz-content-sha256", headers) == emptyHash)
        #expect(header("x-amz-security-token", headers) == nil)
        // The example's StringToSign carries the canonical request's hash.
        let canonical = example.canonicalRequest(
            method: "GET", host: exampleHost, path: "/test.txt", query: [],
            headers: [
                ("Range", "bytes=0-9"), ("x-amz-content-sha256", emptyHash), ("x-amz-date", "20130524T000000Z"),
            ],
            payloadHash: emptyHash)
        #expect(
            sha256(Array(canonical.request.utf8)).hex
                == "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972")
    }

    @Test("AWS example: PUT Object, a key with $ and a signed payload")
    func putObject() {
        let payloadHash = sha256(Array("Welcome to Amazon S3.".utf8)).hex
        #expect(payloadHash == "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072")
        let extra = [("Date", "Fri, 24 May 2013 00:00:00 GMT"), ("x-amz-storage-class", "REDUCED_REDUNDANCY")]
        let headers = example.sign(
            method: "PUT", host: exampleHost, path: "/test$file.text", headers: extra, payloadHash: payloadHash,
            date: exampleDate)
        #expect(
            header("Authorization", headers)
                == exampleAuthorization(
                    signedHeaders: "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
                    signature: "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"))
        let canonical = example.canonicalRequest(
            method: "PUT", host: exampleHost, path: "/test$file.text", query: [],
            headers: extra + [("x-amz-content-sha256", payloadHash), ("x-amz-date", "20130524T000000Z")],
            payloadHash: payloadHash)
        #expect(canonical.request.hasPrefix("PUT\n/test%24file.text\n\n"))
        #expect(
            sha256(Array(canonical.request.utf8)).hex
                == "9e0e90d9c76de8fa5b200d8c849cd5b8dc7a3be3951ddb7f6a76b4158342019d")
    }

    @Test("AWS example: GET Bucket Lifecycle, a parameter without a value")
    func getBucketLifecycle() {
        let headers = example.sign(
            method: "GET", host: exampleHost, path: "/", query: [("lifecycle", "")], payloadHash: emptyHash,
            date: exampleDate)
        #expect(
            header("Authorization", headers)
                == exampleAuthorization(
                    signedHeaders: "host;x-amz-content-sha256;x-amz-date",
                    signature: "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"))
    }

    @Test("AWS example: Get Bucket (List Objects), parameters given unsorted")
    func listObjects() {
        let headers = example.sign(
            method: "GET", host: exampleHost, path: "/", query: [("prefix", "J"), ("max-keys", "2")],
            payloadHash: emptyHash, date: exampleDate)
        #expect(
            header("Authorization", headers)
                == exampleAuthorization(
                    signedHeaders: "host;x-amz-content-sha256;x-amz-date",
                    signature: "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"))
    }

    @Test("botocore's vectors: every Authorization header byte for byte")
    func botocore() throws {
        let all = try JSONDecoder().decode(BotocoreVectors.self, from: Data(sigV4BotocoreVectors.utf8)).vectors
        #expect(all.count >= 12)
        for v in all {
            let signer = SigV4Signer(
                accessKey: v.accessKey, secretKey: v.secretKey, sessionToken: v.sessionToken, region: v.region)
            let date = Date(timeIntervalSince1970: TimeInterval(v.date))
            let query = v.query.map { ($0[0], $0[1]) }
            let extra = v.headers.map { ($0[0], $0[1]) }
            let headers = signer.sign(
                method: v.method, host: v.host, path: v.path, query: query, headers: extra,
                payloadHash: v.payloadHash, date: date)
            #expect(header("Authorization", headers) == v.authorization, "\(v.name)")
            #expect(header("x-amz-security-token", headers) == v.sessionToken, "\(v.name)")
            // On a mismatch, the canonical requests show where the two part.
            let added = headers.filter { $0.0 != "Authorization" }
            let canonical = signer.canonicalRequest(
                method: v.method, host: v.host, path: v.path, query: query, headers: extra + added,
                payloadHash: v.payloadHash)
            #expect(canonical.request == v.canonicalRequest, "\(v.name)")
        }
    }

    @Test("a wrong secret, region, time, payload or token gives another signature")
    func negative() {
        func authorization(
            _ signer: SigV4Signer, payloadHash: String = emptyHash, date: Date = exampleDate
        )
            -> String?
        {
            header(
                "Authorization",
                signer.sign(
                    method: "GET", host: exampleHost, path: "/test.txt", headers: [("Range", "bytes=0-9")],
                    payloadHash: payloadHash, date: date))
        }
        let good = authorization(example)
        #expect(good?.hasSuffix("f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41") == true)
        let wrongSecret = SigV4Signer(
            accessKey: "AKIAIOSFODNN7EXAMPLE", secretKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEz",
            region: "us-east-1")
        let otherRegion = SigV4Signer(
            accessKey: "AKIAIOSFODNN7EXAMPLE", secretKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            region: "us-east-2")
        let withToken = SigV4Signer(
            accessKey: "AKIAIOSFODNN7EXAMPLE", secretKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            sessionToken: "token", region: "us-east-1")
        let others = [
            authorization(wrongSecret), authorization(otherRegion), authorization(withToken),
            authorization(example, payloadHash: SigV4Signer.unsignedPayload),
            authorization(example, date: exampleDate.addingTimeInterval(1)),
        ]
        #expect(Set(others + [good]).count == others.count + 1)
    }

    @Test("UNSIGNED-PAYLOAD is signed and sent as the payload hash")
    func unsignedPayload() {
        let headers = example.sign(
            method: "PUT", host: "127.0.0.1:8333", path: "/b/k", payloadHash: SigV4Signer.unsignedPayload,
            date: exampleDate)
        #expect(header("x-amz-content-sha256", headers) == "UNSIGNED-PAYLOAD")
    }

    @Test("URI encoding keeps only unreserved bytes, and / in paths alone")
    func encoding() {
        #expect(SigV4Signer.encodePath("/b/a b/ü~*$+=.txt") == "/b/a%20b/%C3%BC~%2A%24%2B%3D.txt")
        #expect(SigV4Signer.encodePath("") == "/")
        #expect(SigV4Signer.uriEncode("a/b", keepSlash: false) == "a%2Fb")
        #expect(SigV4Signer.uriEncode("A-z_0.9~", keepSlash: false) == "A-z_0.9~")
        #expect(
            SigV4Signer.canonicalQuery([("prefix", "a/b c"), ("list-type", "2"), ("b", "2"), ("b", "1")])
                == "b=1&b=2&list-type=2&prefix=a%2Fb%20c")
        #expect(SigV4Signer.trimAll("  a   b\t c ") == "a b c")
    }

    @Test("timestamps in UTC, across leap days and centuries")
    func timestamps() {
        #expect(SigV4Signer.timestamp(Date(timeIntervalSince1970: 0)) == "19700101T000000Z")
        #expect(SigV4Signer.timestamp(Date(timeIntervalSince1970: 951_868_799)) == "20000229T235959Z")
        #expect(SigV4Signer.timestamp(Date(timeIntervalSince1970: 4_107_542_399.9)) == "21000228T235959Z")
        #expect(SigV4Signer.timestamp(Date(timeIntervalSince1970: 4_107_542_400)) == "21000301T000000Z")
    }
}

@Suite("S3 locations and options")
struct S3LocationTests {
    @Test("s3: locations in restic's forms; malformed ones name what is wrong")
    func parsing() throws {
        let a = try S3Location(parsing: "s3:http://127.0.0.1:8333/backups/laptop/home")
        #expect(a.endpoint == "http://127.0.0.1:8333" && a.bucket == "backups" && a.prefix == "laptop/home")
        #expect(a.description == "s3:http://127.0.0.1:8333/backups/laptop/home")
        let b = try S3Location(parsing: "s3:s3.eu-central-1.amazonaws.com/my-backups")
        #expect(b.endpoint == "https://s3.eu-central-1.amazonaws.com" && b.bucket == "my-backups" && b.prefix == "")
        let c = try S3Location(parsing: "s3:https://store.example.org/b-1/")
        #expect(c.bucket == "b-1" && c.prefix == "")
        for bad in [
            "s3:", "s3:http://host", "s3:http://host/", "s3:http://host/Upper", "s3:http://host/ab", "s3:http:///b1",
        ] {
            #expect(throws: CABackupError.self, "\(bad)") { _ = try S3Location(parsing: bad) }
        }
    }

    @Test("storage options: only declared keys and values are taken")
    func options() throws {
        CABackupRemote.register()
        try StorageRegistry.setOption("s3.bucket-lookup", "path")
        #expect(StorageRegistry.option("s3.bucket-lookup") == "path")
        #expect(throws: CABackupError.self) { try StorageRegistry.setOption("s3.bucket-lookup", "sideways") }
        #expect(throws: CABackupError.self) { try StorageRegistry.setOption("nosuch.option", "1") }
        try StorageRegistry.setOption("s3.bucket-lookup", "auto")
        // Missing credentials are named before anything is sent.
        #expect(throws: CABackupError.self) {
            _ = try S3Storage(try S3Location(parsing: "s3:http://127.0.0.1:1/bucket"), environment: [:])
        }
    }
}
