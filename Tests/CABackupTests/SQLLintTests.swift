import Foundation
import Testing

/// The root of the package, for tests that read its sources.
private let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().path

/// Every place a string reaches SQLite as SQL: `db.prepare(…)`, `db.execute(…)`,
/// `d.execute(…)` and the index's `queryInt(…)`, with the argument's text and the line
/// of the call.
func sqlCallSites(in source: String) -> [(line: Int, argument: String, comment: String)] {
    let text = Array(source.utf8)
    let lines = source.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    var out: [(Int, String, String)] = []
    let pattern = try! NSRegularExpression(pattern: #"\b(?:db|d)\.(?:prepare|execute)\(|\bqueryInt\("#)
    for m in pattern.matches(in: source, range: NSRange(source.startIndex..., in: source)) {
        let start = Range(m.range, in: source)!.upperBound
        let before = source[..<Range(m.range, in: source)!.lowerBound]
        if before.hasSuffix("func ") { continue }
        // The argument: up to the parenthesis that closes the call (strings and nested
        // parentheses counted; good enough for this code base's calls).
        var depth = 1
        var i = source.utf8.distance(from: source.utf8.startIndex, to: start.samePosition(in: source.utf8)!)
        let from = i
        var inString = false
        while i < text.count && depth > 0 {
            let c = text[i]
            if c == UInt8(ascii: "\\") && inString {
                i += 2
                continue
            }
            if c == UInt8(ascii: "\"") { inString.toggle() }
            if !inString {
                if c == UInt8(ascii: "(") { depth += 1 }
                if c == UInt8(ascii: ")") { depth -= 1 }
            }
            i += 1
        }
        let argument = String(decoding: text[from..<max(from, i - 1)], as: UTF8.self)
        let line = before.filter { $0 == "\n" }.count
        let comment = lines[max(0, line - 3)...line].joined(separator: "\n")
        out.append((line + 1, argument, comment))
    }
    return out
}

@Suite("SQL is bound, never built from data")
struct SQLLintTests {
    @Test("no SQL is built by interpolating data: every interpolation or variable says why it is safe")
    func sqlIsBound() throws {
        let sources = try #require(FileManager.default.enumerator(atPath: packageRoot + "/Sources"))
        var sites = 0
        var unsafe: [String] = []
        for case let file as String in sources where file.hasSuffix(".swift") {
            let source = try String(contentsOfFile: packageRoot + "/Sources/" + file, encoding: .utf8)
            for site in sqlCallSites(in: source) {
                sites += 1
                let trimmed = site.argument.trimmingCharacters(in: .whitespacesAndNewlines)
                let isLiteral = trimmed.hasPrefix("\"")
                let interpolates = trimmed.contains("\\(")
                if (!isLiteral || interpolates) && !site.comment.contains("// SQL-safe:") {
                    unsafe.append("\(file):\(site.line): \(trimmed.prefix(80))")
                }
            }
        }
        #expect(sites > 20, "the scan found the SQL call sites")
        #expect(
            unsafe.isEmpty, "SQL built from data without a '// SQL-safe:' reason:\n\(unsafe.joined(separator: "\n"))")
    }

    @Test("the lint catches an interpolation and a variable, and accepts a marked one")
    func sqlLintCatches() {
        let bad = """
            try db.execute("INSERT INTO meta VALUES('\\(id)')")
            let s = try db.prepare(sql)
            """
        #expect(sqlCallSites(in: bad).count == 2)
        #expect(sqlCallSites(in: bad).allSatisfy { !$0.comment.contains("// SQL-safe:") })
        let marked = """
            // SQL-safe: n is an Int.
            try db.execute("UPDATE meta SET value = '\\(n)'")
            """
        #expect(sqlCallSites(in: marked).first?.comment.contains("// SQL-safe:") == true)
    }
}
