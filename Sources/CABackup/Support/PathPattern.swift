import CABackupCore
import CABackupFormat

/// The `--exclude` and `--iexclude` patterns of one backup, compiled once and matched against
/// absolute byte paths with restic's rules.
///
/// The rules, for a path such as `/home/u/docs/a.txt` (split into the components `home`, `u`,
/// `docs`, `a.txt`; empty components from `//` are ignored):
///
/// - A pattern is split at `/` the same way, after `.` components are dropped and `x/..` pairs
///   removed (`/a/../b` is `/b`); a trailing `/` is ignored, so `/tmp/` is the same as `/tmp`.
/// - A pattern that starts with `/` is anchored: its first component must match the path's first
///   component. Any other pattern may start at any component, as if it began with `**/`.
/// - Within a component, `*` matches any run of bytes, `?` one character, `[a-c]` one character
///   in a set of characters and ranges (`[^...]` or `[!...]` for the complement), and `\x` the
///   character `x` itself. Nothing but `**` crosses a `/`.
/// - A component that is exactly `**` matches zero or more whole components.
/// - A pattern matches a path when it matches the path or one of its ancestors: `/a/b` and `b`
///   both match `/a/b/c/d`. So excluding a directory excludes everything below it.
/// - A pattern that starts with `!` is a negation. The patterns are read in order; a path is
///   excluded when a plain pattern matches it and no negation after that pattern matches it.
/// - `--iexclude` patterns are matched with both sides lowercased. They form their own list:
///   a negation among them only cancels earlier `--iexclude` patterns, as in restic.
///
/// Walking a tree: an entry that is not excluded is kept. A directory that is excluded is
/// skipped whole unless ``mayIncludeBelow(directory:)`` says a negation may re-include
/// something below it; restic never descends into an excluded directory, so a walker that wants
/// exactly restic's result can skip excluded directories without asking.
package struct ExcludeRules: Sendable {
    /// The `--exclude` patterns, in order, matched byte for byte.
    private let exact: PatternList
    /// The `--iexclude` patterns, in order, lowercased and matched against the lowercased path.
    private let folded: PatternList

    /// Compiles the patterns.
    ///
    /// - Parameters:
    ///   - excludes: `--exclude` patterns, case-sensitive.
    ///   - caseInsensitiveExcludes: `--iexclude` patterns.
    /// - Throws: ``CABackupError/invalidArgument(_:)`` naming the first malformed pattern: an
    ///   empty pattern, `!` alone, a pattern that names nothing (`.`), an unclosed or empty
    ///   `[...]`, a `-` that does not form a range, or a `\` with nothing after it.
    package init(excludes: [String], caseInsensitiveExcludes: [String] = []) throws {
        exact = try PatternList(excludes, foldCase: false, option: "--exclude")
        folded = try PatternList(caseInsensitiveExcludes, foldCase: true, option: "--iexclude")
    }

    /// No patterns: nothing is excluded.
    package static let none = try! ExcludeRules(excludes: [])

    /// Whether there are no patterns at all, so nothing is ever excluded.
    package var isEmpty: Bool { exact.patterns.isEmpty && folded.patterns.isEmpty }

    /// Whether the entry at `path` (absolute, any bytes) is excluded, either because a pattern
    /// matches it or because one matches an ancestor directory, and no later negation matches.
    package func isExcluded(path: [UInt8]) -> Bool {
        exact.excludes(path) || folded.excludes(path)
    }

    /// Whether some path strictly below `directory` may be kept, so a walker must descend into
    /// the directory even though ``isExcluded(path:)`` is true for it.
    ///
    /// False when a plain pattern matching the directory (and so everything below it) is
    /// followed by no negation that could match anything below it; then the walker can skip the
    /// directory whole. The answer errs towards true: a negation that does not start with `/`
    /// could match a name at any depth, so it keeps every directory it follows open. Always true
    /// for a directory that is not excluded. Without negations it is `!isExcluded(path:)`.
    package func mayIncludeBelow(directory path: [UInt8]) -> Bool {
        !exact.excludesAllBelow(path) && !folded.excludesAllBelow(path)
    }
}

/// The `--include` and `--iinclude` patterns of a restore, with the rules of ``ExcludeRules``
/// read the other way round (restic's restore `--include`): an entry is selected when a pattern
/// matches it or one of its ancestors, so everything below a selected directory is selected; a
/// `!` pattern deselects what earlier ones selected.
package struct IncludeRules: Sendable {
    /// The `--include` patterns, in order, matched byte for byte.
    private let exact: PatternList
    /// The `--iinclude` patterns, in order, lowercased and matched against the lowercased path.
    private let folded: PatternList

    /// Compiles the patterns.
    ///
    /// - Throws: ``CABackupError/invalidArgument(_:)`` naming the first malformed pattern, as
    ///   ``ExcludeRules/init(excludes:caseInsensitiveExcludes:)`` does.
    package init(includes: [String], caseInsensitiveIncludes: [String] = []) throws {
        exact = try PatternList(includes, foldCase: false, option: "--include")
        folded = try PatternList(caseInsensitiveIncludes, foldCase: true, option: "--iinclude")
    }

    /// Whether there are no patterns at all (which selects everything, as no filter does).
    package var isEmpty: Bool { exact.patterns.isEmpty && folded.patterns.isEmpty }

    /// Whether a pattern selects the entry at `path` (absolute) or one of its ancestors.
    package func selects(path: [UInt8]) -> Bool {
        exact.excludes(path) || folded.excludes(path)
    }

    /// Whether a pattern may select some path strictly below `directory`, so a walker must
    /// look into a directory that is not selected itself. Errs towards true: a pattern that
    /// does not start with `/` may match at any depth.
    package func maySelectBelow(directory path: [UInt8]) -> Bool {
        exact.mayMatchBelow(path) || folded.mayMatchBelow(path)
    }
}

/// One ordered list of patterns, all case-sensitive or all case-insensitive.
private struct PatternList: Sendable {
    /// The patterns, in the order given.
    let patterns: [PathPattern]
    /// Whether patterns and paths are lowercased before matching.
    let foldCase: Bool
    /// The index of the last negation, or -1: after it, the first match decides.
    let lastNegation: Int

    /// Compiles `sources`, naming `option` in error messages.
    init(_ sources: [String], foldCase: Bool, option: String) throws {
        patterns = try sources.map { try PathPattern($0, foldCase: foldCase, option: option) }
        self.foldCase = foldCase
        lastNegation = patterns.lastIndex { $0.negated } ?? -1
    }

    /// Whether this list excludes `path`: the last pattern that matches it is not a negation.
    func excludes(_ path: [UInt8]) -> Bool {
        if patterns.isEmpty { return false }
        return withSplitPath(path) { split in
            var excluded = false
            for index in patterns.indices {
                let pattern = patterns[index]
                if pattern.negated {
                    if excluded && pattern.matches(split) { excluded = false }
                } else if !excluded && pattern.matches(split) {
                    if index > lastNegation { return true }
                    excluded = true
                }
            }
            return excluded
        }
    }

    /// Whether this list excludes every path strictly below `directory`: a plain pattern matches
    /// the directory and no later negation could match anything below it.
    func excludesAllBelow(_ directory: [UInt8]) -> Bool {
        if patterns.isEmpty { return false }
        return withSplitPath(directory) { split in
            for index in patterns.indices.reversed() {
                let pattern = patterns[index]
                if pattern.negated {
                    // Every earlier plain pattern may be cancelled below the directory.
                    if pattern.mayMatchBelow(split) { return false }
                } else if pattern.matches(split) {
                    return true
                }
            }
            return false
        }
    }

    /// Whether a plain (not negated) pattern may match some path strictly below `directory`.
    func mayMatchBelow(_ directory: [UInt8]) -> Bool {
        guard patterns.contains(where: { !$0.negated }) else { return false }
        return withSplitPath(directory) { split in patterns.contains { !$0.negated && $0.mayMatchBelow(split) } }
    }

    /// Splits `path` into components for `body`, lowercased first when this list folds case.
    /// Allocates only when folding a path with non-ASCII bytes.
    func withSplitPath<R>(_ path: [UInt8], _ body: (SplitPath) -> R) -> R {
        if foldCase && path.contains(where: { $0 >= 0x80 }) {
            return SplitPath.with(lowercasedUTF8(path), foldASCII: false, body)
        }
        return SplitPath.with(path, foldASCII: foldCase, body)
    }
}

/// A path borrowed for one call, with the byte bounds of each non-empty component.
private struct SplitPath {
    /// The path's bytes.
    let bytes: UnsafeBufferPointer<UInt8>
    /// Start and end offsets of component `k` at `2k` and `2k + 1`.
    let bounds: UnsafeMutableBufferPointer<Int>
    /// How many components the path has; `/` has none.
    let count: Int
    /// Whether the path starts with `/`; anchored patterns match only such paths.
    let isAbsolute: Bool
    /// Whether ASCII capitals are read as lowercase.
    let foldASCII: Bool

    /// Calls `body` with `path` split at `/`, the bounds in stack-allocated scratch space.
    static func with<R>(_ path: [UInt8], foldASCII: Bool, _ body: (SplitPath) -> R) -> R {
        path.withUnsafeBufferPointer { bytes in
            var count = 0
            var previous = slash
            for byte in bytes {
                if byte != slash && previous == slash { count += 1 }
                previous = byte
            }
            return withUnsafeTemporaryAllocation(of: Int.self, capacity: max(2 * count, 1)) { bounds in
                var k = 0
                var i = 0
                while i < bytes.count {
                    if bytes[i] == slash {
                        i += 1
                        continue
                    }
                    bounds[2 * k] = i
                    while i < bytes.count && bytes[i] != slash { i += 1 }
                    bounds[2 * k + 1] = i
                    k += 1
                }
                let isAbsolute = bytes.first == slash
                return body(
                    SplitPath(bytes: bytes, bounds: bounds, count: count, isAbsolute: isAbsolute, foldASCII: foldASCII)
                )
            }
        }
    }

    /// The first byte of component `k`.
    @inline(__always) func start(_ k: Int) -> Int { bounds[2 * k] }

    /// The offset just past component `k`.
    @inline(__always) func end(_ k: Int) -> Int { bounds[2 * k + 1] }

    /// The byte at `offset`, lowercased if it is an ASCII capital and case is folded.
    @inline(__always) func byte(_ offset: Int) -> UInt8 {
        let b = bytes[offset]
        return foldASCII ? asciiLowercase(b) : b
    }

    /// The character at `offset` (before `end`) and its length in bytes.
    @inline(__always) func character(at offset: Int, end: Int) -> (scalar: UInt32, length: Int) {
        let b = byte(offset)
        if b < 0x80 { return (UInt32(b), 1) }
        return decodeUTF8(bytes, at: offset, end: end)
    }
}

/// One `--exclude` or `--iexclude` pattern, split into compiled components.
private struct PathPattern: Sendable {
    /// Whether the pattern started with `!`.
    let negated: Bool
    /// Whether the pattern started with `/` (after any `!`).
    let anchored: Bool
    /// The components; runs of `**` are collapsed into one.
    let segments: [Segment]
    /// The index of the first `**` segment, or `segments.count`.
    let firstAnyDepth: Int
    /// How many segments are not `**`: the fewest path components a match spans.
    let minimumLength: Int

    /// Compiles `source`; `option` names the flag in error messages.
    init(_ source: String, foldCase: Bool, option: String) throws {
        /// The error for this pattern with `problem` described.
        func fail(_ problem: String) -> CABackupError {
            CABackupError.invalidArgument("\(option) pattern '\(source)' \(problem)")
        }
        guard !source.isEmpty else {
            throw CABackupError.invalidArgument(
                "\(option) pattern is empty: remove it or give a pattern such as '*.tmp'")
        }
        var text = Array(source.utf8)
        if foldCase { text = lowercasedUTF8(text) }
        negated = text.first == UInt8(ascii: "!")
        if negated { text.removeFirst() }
        guard !text.isEmpty else {
            throw fail("has nothing after '!': write what to re-include, as in '!*.keep'")
        }
        anchored = text.first == slash
        var components: [[UInt8]] = []
        for part in text.split(separator: slash) {
            if part.elementsEqual([dot]) { continue }
            if part.elementsEqual([dot, dot]) {
                if let last = components.last, last != [dot, dot] {
                    components.removeLast()
                } else if !anchored {
                    components.append([dot, dot])
                }
                continue
            }
            components.append(Array(part))
        }
        guard anchored || !components.isEmpty else {
            throw fail("names nothing once '.' and '..' are resolved: name a file or directory")
        }
        var segments: [Segment] = []
        for component in components {
            let segment = try Segment(component, fail: fail)
            if case .anyDepth = segment, case .anyDepth = segments.last { continue }
            segments.append(segment)
        }
        self.segments = segments
        firstAnyDepth = segments.firstIndex { $0.isAnyDepth } ?? segments.count
        minimumLength = segments.count(where: { !$0.isAnyDepth })
    }

    /// Whether the pattern matches the path or one of its ancestors.
    func matches(_ path: SplitPath) -> Bool {
        if anchored { return path.isAbsolute && matchesPrefix(from: 0, at: 0, path) }
        // A relative pattern may start at any component, and must cover at least one.
        let lastStart = min(path.count - 1, path.count - minimumLength)
        var start = 0
        while start <= lastStart {
            if matchesPrefix(from: 0, at: start, path) { return true }
            start += 1
        }
        return false
    }

    /// Whether segments `from...` match components `at..<k` of `path` for some `k`.
    private func matchesPrefix(from first: Int, at component: Int, _ path: SplitPath) -> Bool {
        var i = first
        var j = component
        while i < segments.count {
            let segment = segments[i]
            if segment.isAnyDepth {
                i += 1
                if i == segments.count { return true }
                // `**` takes components `j..<k`; try the shortest first.
                for k in j..<path.count where matchesPrefix(from: i, at: k, path) { return true }
                return false
            }
            guard j < path.count, segment.matches(path, component: j) else { return false }
            i += 1
            j += 1
        }
        return true
    }

    /// Whether the pattern may match some path strictly below `directory`: true for a relative
    /// pattern; for an anchored one, when the directory's components match the pattern's, one
    /// for one, as far as both go and the first `**`.
    func mayMatchBelow(_ directory: SplitPath) -> Bool {
        if !anchored { return true }
        guard directory.isAbsolute else { return false }
        let common = min(directory.count, firstAnyDepth)
        for k in 0..<common where !segments[k].matches(directory, component: k) { return false }
        return true
    }
}

/// One compiled component of a pattern.
private enum Segment: Sendable {
    /// `**`: zero or more whole components.
    case anyDepth
    /// A component without wildcards (escapes resolved), compared byte for byte.
    case literal([UInt8])
    /// A component with `*`, `?` or `[...]`.
    case glob(Glob)

    /// Compiles one pattern component, reporting problems through `fail`.
    init(_ component: [UInt8], fail: (String) -> CABackupError) throws {
        if component == [star, star] {
            self = .anyDepth
            return
        }
        var tokens: [GlobToken] = []
        var hasWildcard = false
        try component.withUnsafeBufferPointer { text in
            var i = 0
            while i < text.count {
                let b = text[i]
                i += 1
                switch b {
                case star:
                    hasWildcard = true
                    if case .anyRun = tokens.last { continue }
                    tokens.append(.anyRun)
                case UInt8(ascii: "?"):
                    hasWildcard = true
                    tokens.append(.anyCharacter)
                case UInt8(ascii: "["):
                    hasWildcard = true
                    tokens.append(.oneOf(try ScalarSet(text, at: &i, fail: fail)))
                case backslash:
                    guard i < text.count else {
                        throw fail("ends a component with '\\': write '\\\\' for a literal backslash")
                    }
                    tokens.append(.byte(text[i]))
                    i += 1
                default:
                    tokens.append(.byte(b))
                }
            }
        }
        if hasWildcard {
            self = .glob(Glob(tokens))
        } else {
            self = .literal(
                tokens.map {
                    if case .byte(let b) = $0 { return b }
                    return 0
                })
        }
    }

    /// Whether this is `**`.
    var isAnyDepth: Bool {
        if case .anyDepth = self { return true }
        return false
    }

    /// Whether this segment, which is not `**`, matches component `k` of `path`.
    @inline(__always) func matches(_ path: SplitPath, component k: Int) -> Bool {
        let start = path.start(k)
        let end = path.end(k)
        switch self {
        case .anyDepth:
            return true
        case .literal(let literal):
            guard literal.count == end - start else { return false }
            var i = 0
            while i < literal.count {
                if path.byte(start + i) != literal[i] { return false }
                i += 1
            }
            return true
        case .glob(let glob):
            return glob.matches(path, start: start, end: end)
        }
    }
}

/// A component with wildcards, its literal start and end split off for a quick rejection.
private struct Glob: Sendable {
    /// The bytes before the first wildcard, which every match starts with.
    let prefix: [UInt8]
    /// The bytes after the last wildcard, which every match ends with.
    let suffix: [UInt8]
    /// The tokens between `prefix` and `suffix`, starting and ending with a wildcard.
    let middle: [GlobToken]
    /// The fewest bytes a match has.
    let minimumLength: Int

    /// Splits `tokens`, which hold at least one wildcard.
    init(_ tokens: [GlobToken]) {
        /// The byte of a literal token, or nil for a wildcard.
        func literal(_ token: GlobToken) -> UInt8? {
            if case .byte(let b) = token { return b }
            return nil
        }
        let head = tokens.prefix { literal($0) != nil }
        let tail = tokens.reversed().prefix { literal($0) != nil }.reversed()
        prefix = head.compactMap(literal)
        suffix = tail.compactMap(literal)
        middle = Array(tokens[head.count..<(tokens.count - tail.count)])
        minimumLength = tokens.count(where: { if case .anyRun = $0 { false } else { true } })
    }

    /// Whether the bytes `start..<end` of `path` match.
    @inline(__always) func matches(_ path: SplitPath, start: Int, end: Int) -> Bool {
        guard end - start >= minimumLength else { return false }
        var i = 0
        while i < prefix.count {
            if path.byte(start + i) != prefix[i] { return false }
            i += 1
        }
        let suffixStart = end - suffix.count
        i = 0
        while i < suffix.count {
            if path.byte(suffixStart + i) != suffix[i] { return false }
            i += 1
        }
        // The suffix starts with a byte that cannot continue a UTF-8 sequence, so no
        // character of the middle can run into it: matching the middle alone is exact.
        return globMatches(middle, path, start: start + prefix.count, end: suffixStart)
    }
}

/// One element of a component with wildcards.
private enum GlobToken: Sendable {
    /// A byte that must appear as is.
    case byte(UInt8)
    /// `?`: any one character.
    case anyCharacter
    /// `*`: any run of bytes, possibly empty.
    case anyRun
    /// `[...]`: one character in (or, negated, not in) a set.
    case oneOf(ScalarSet)
}

/// The characters a `[...]` accepts, as Unicode scalar value ranges.
private struct ScalarSet: Sendable {
    /// The inclusive ranges; a reversed range such as `z-a` accepts nothing, as in Go.
    let ranges: [ScalarRange]
    /// Whether the set started with `^` or `!` and accepts what the ranges do not.
    let negated: Bool

    /// Parses a set from just after its `[` to just after its `]`, advancing `i`.
    init(_ text: UnsafeBufferPointer<UInt8>, at i: inout Int, fail: (String) -> CABackupError) throws {
        let unclosed = "has an unclosed '[': add the ']' or write '\\[' for a literal '['"
        negated = i < text.count && (text[i] == UInt8(ascii: "^") || text[i] == UInt8(ascii: "!"))
        if negated { i += 1 }
        var ranges: [ScalarRange] = []
        /// Reads one possibly escaped character of the set.
        func member(isRangeEnd: Bool) throws -> UInt32 {
            guard i < text.count else { throw fail(unclosed) }
            if text[i] == UInt8(ascii: "-") || text[i] == UInt8(ascii: "]") {
                if isRangeEnd || text[i] == UInt8(ascii: "-") {
                    throw fail("has a '-' that does not form a range in '[...]': write '\\-' for a literal '-'")
                }
                throw fail("has an empty '[...]': list a character in it, or write '\\]' for a literal ']'")
            }
            if text[i] == backslash {
                i += 1
                guard i < text.count else { throw fail(unclosed) }
            }
            let (scalar, length) = decodeUTF8(text, at: i, end: text.count)
            i += length
            return scalar
        }
        while true {
            guard i < text.count else { throw fail(unclosed) }
            if text[i] == UInt8(ascii: "]") && !ranges.isEmpty {
                i += 1
                break
            }
            let low = try member(isRangeEnd: false)
            var high = low
            if i < text.count && text[i] == UInt8(ascii: "-") {
                i += 1
                high = try member(isRangeEnd: true)
            }
            ranges.append(ScalarRange(low: low, high: high))
        }
        self.ranges = ranges
    }

    /// Whether the set accepts the scalar value `c`.
    @inline(__always) func accepts(_ c: UInt32) -> Bool {
        var inside = false
        for range in ranges where range.low <= c && c <= range.high {
            inside = true
            break
        }
        return inside != negated
    }
}

/// An inclusive range of Unicode scalar values in a `[...]`.
private struct ScalarRange: Sendable {
    /// The first value accepted.
    let low: UInt32
    /// The last value accepted.
    let high: UInt32
}

/// Whether `tokens` match the bytes `start..<end` of `path`, as Go's `filepath.Match` does on
/// one component: `?` and `[...]` take one UTF-8 character (an invalid byte counts as one),
/// `*` any number of bytes. Backtracks only to the last `*`, which suffices because every
/// other token takes a length fixed by where it starts.
private func globMatches(_ tokens: [GlobToken], _ path: SplitPath, start: Int, end: Int) -> Bool {
    var t = 0
    var i = start
    var starToken = -1
    var starOffset = start
    while true {
        if t < tokens.count {
            switch tokens[t] {
            case .anyRun:
                starToken = t
                starOffset = i
                t += 1
                continue
            case .byte(let b):
                if i < end && path.byte(i) == b {
                    i += 1
                    t += 1
                    continue
                }
            case .anyCharacter:
                if i < end {
                    i += path.character(at: i, end: end).length
                    t += 1
                    continue
                }
            case .oneOf(let set):
                if i < end {
                    let (scalar, length) = path.character(at: i, end: end)
                    if set.accepts(scalar) {
                        i += length
                        t += 1
                        continue
                    }
                }
            }
        } else if i == end {
            return true
        }
        // Mismatch: let the last `*` take one more byte, or fail.
        guard starToken >= 0 && starOffset < end else { return false }
        starOffset += 1
        i = starOffset
        t = starToken + 1
    }
}

/// `/`, the component separator.
private let slash = UInt8(ascii: "/")
/// `.`, for the `.` and `..` components of a pattern.
private let dot = UInt8(ascii: ".")
/// `*`, the wildcard.
private let star = UInt8(ascii: "*")
/// `\`, the escape character.
private let backslash = UInt8(ascii: "\\")

/// `b` with ASCII capitals made lowercase.
@inline(__always) private func asciiLowercase(_ b: UInt8) -> UInt8 {
    b &- UInt8(ascii: "A") < 26 ? b | 0x20 : b
}

/// Decodes the UTF-8 character at `offset` (before `end`) as Go does: a byte that does not
/// start a valid, shortest-form sequence decodes to U+FFFD with length 1.
private func decodeUTF8(
    _ bytes: UnsafeBufferPointer<UInt8>, at offset: Int, end: Int
) -> (scalar: UInt32, length: Int) {
    let invalid: (scalar: UInt32, length: Int) = (0xFFFD, 1)
    let b0 = bytes[offset]
    if b0 < 0x80 { return (UInt32(b0), 1) }
    let length: Int
    var low: UInt8 = 0x80
    var high: UInt8 = 0xBF
    switch b0 {
    case 0xC2...0xDF: length = 2
    case 0xE0...0xEF: length = 3
    case 0xF0...0xF4: length = 4
    default: return invalid
    }
    if b0 == 0xE0 { low = 0xA0 }
    if b0 == 0xED { high = 0x9F }
    if b0 == 0xF0 { low = 0x90 }
    if b0 == 0xF4 { high = 0x8F }
    guard offset + length <= end else { return invalid }
    let b1 = bytes[offset + 1]
    guard low <= b1 && b1 <= high else { return invalid }
    var scalar = UInt32(b0) & (0x7F >> length)
    scalar = scalar << 6 | UInt32(b1 & 0x3F)
    for k in 2..<length {
        let b = bytes[offset + k]
        guard b & 0xC0 == 0x80 else { return invalid }
        scalar = scalar << 6 | UInt32(b & 0x3F)
    }
    return (scalar, length)
}

/// `bytes` with every character lowercased (full Unicode lowercase mapping); bytes that are
/// not valid UTF-8 are kept as they are.
private func lowercasedUTF8(_ bytes: [UInt8]) -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(bytes.count + 8)
    bytes.withUnsafeBufferPointer { text in
        var i = 0
        while i < text.count {
            let b = text[i]
            if b < 0x80 {
                out.append(asciiLowercase(b))
                i += 1
                continue
            }
            let (value, length) = decodeUTF8(text, at: i, end: text.count)
            if length == 1 {
                out.append(b)
            } else if let scalar = Unicode.Scalar(value) {
                out.append(contentsOf: scalar.properties.lowercaseMapping.utf8)
            }
            i += length
        }
    }
    return out
}
