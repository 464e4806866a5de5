/// The few S3 answers read here (ListObjectsV2 results, error documents) as a tree of
/// elements, parsed by a small parser of our own rather than an XML library.
///
/// It knows elements, text, the five predefined entities and character references, and
/// skips the declaration, comments, processing instructions and CDATA markers; no DTDs,
/// no external entities, nothing that expands. Its input is an answer body already
/// capped in size, and nesting deeper than ``maxDepth`` is refused, so a hostile store
/// costs at most a bounded amount of memory and time.
struct S3XMLElement: Sendable, Equatable {
    /// The element's name, any namespace prefix dropped (`ListBucketResult`).
    var name: String
    /// The concatenated text directly inside the element, entities decoded.
    var text: String = ""
    var children: [S3XMLElement] = []

    /// S3 answers nest four levels deep; anything far deeper is not an S3 answer.
    static let maxDepth = 32

    /// The first child named `name`.
    func child(_ name: String) -> S3XMLElement? { children.first { $0.name == name } }

    /// Every child named `name`, in document order.
    func children(_ name: String) -> [S3XMLElement] { children.filter { $0.name == name } }

    /// The text of the first child named `name`.
    func text(of name: String) -> String? { child(name)?.text }

    /// The root element of a document, or nil when the bytes are not well-formed enough
    /// to read (unbalanced tags, no root, too deep).
    static func parse(_ bytes: [UInt8]) -> S3XMLElement? {
        var stack: [S3XMLElement] = []
        var root: S3XMLElement?
        var i = 0
        let n = bytes.count
        /// The index of the first occurrence of `pattern` at or after `from`.
        func find(_ pattern: String, from: Int) -> Int? {
            let p = Array(pattern.utf8)
            var j = from
            while j + p.count <= n {
                if bytes[j..<j + p.count].elementsEqual(p) { return j }
                j += 1
            }
            return nil
        }
        while i < n {
            if bytes[i] != UInt8(ascii: "<") {
                let end = bytes[i...].firstIndex(of: UInt8(ascii: "<")) ?? n
                if !stack.isEmpty { stack[stack.count - 1].text += decodeEntities(bytes[i..<end]) }
                i = end
                continue
            }
            if bytes[i...].starts(with: "<![CDATA[".utf8) {
                guard let end = find("]]>", from: i + 9) else { return nil }
                if !stack.isEmpty {
                    stack[stack.count - 1].text += String(decoding: bytes[(i + 9)..<end], as: UTF8.self)
                }
                i = end + 3
            } else if bytes[i...].starts(with: "<!--".utf8) {
                guard let end = find("-->", from: i + 4) else { return nil }
                i = end + 3
            } else if i + 1 < n && (bytes[i + 1] == UInt8(ascii: "?") || bytes[i + 1] == UInt8(ascii: "!")) {
                // The XML declaration or a DOCTYPE: skipped, never interpreted.
                guard let end = bytes[i...].firstIndex(of: UInt8(ascii: ">")) else { return nil }
                i = end + 1
            } else {
                guard let end = bytes[i...].firstIndex(of: UInt8(ascii: ">")) else { return nil }
                let isEnd = i + 1 < end && bytes[i + 1] == UInt8(ascii: "/")
                let selfClosing = end > i + 1 && bytes[end - 1] == UInt8(ascii: "/")
                let inner = bytes[(i + (isEnd ? 2 : 1))..<(selfClosing ? end - 1 : end)]
                let rawName = inner.prefix { !($0 == 0x20 || $0 == 0x09 || $0 == 0x0A || $0 == 0x0D) }
                var name = String(decoding: rawName, as: UTF8.self)
                if let colon = name.lastIndex(of: ":") { name = String(name[name.index(after: colon)...]) }
                guard !name.isEmpty else { return nil }
                if isEnd {
                    guard let open = stack.popLast(), open.name == name else { return nil }
                    if stack.isEmpty {
                        guard root == nil else { return nil }
                        root = open
                    } else {
                        stack[stack.count - 1].children.append(open)
                    }
                } else if selfClosing {
                    let element = S3XMLElement(name: name)
                    if stack.isEmpty {
                        guard root == nil else { return nil }
                        root = element
                    } else {
                        stack[stack.count - 1].children.append(element)
                    }
                } else {
                    guard stack.count < maxDepth, root == nil else { return nil }
                    stack.append(S3XMLElement(name: name))
                }
                i = end + 1
            }
        }
        return stack.isEmpty ? root : nil
    }

    /// Text with `&amp; &lt; &gt; &quot; &apos; &#N; &#xN;` decoded; an unknown or
    /// malformed reference is kept as it is.
    static func decodeEntities(_ bytes: ArraySlice<UInt8>) -> String {
        let s = String(decoding: bytes, as: UTF8.self)
        guard s.contains("&") else { return s }
        var out = ""
        var rest = Substring(s)
        while let amp = rest.firstIndex(of: "&") {
            out += rest[..<amp]
            rest = rest[amp...]
            guard let semi = rest.prefix(12).firstIndex(of: ";") else {
                out += "&"
                rest = rest.dropFirst()
                continue
            }
            let entity = rest[rest.index(after: rest.startIndex)..<semi]
            var decoded: String?
            switch entity {
            case "amp": decoded = "&"
            case "lt": decoded = "<"
            case "gt": decoded = ">"
            case "quot": decoded = "\""
            case "apos": decoded = "'"
            default:
                if entity.hasPrefix("#x") || entity.hasPrefix("#X") {
                    decoded = UInt32(entity.dropFirst(2), radix: 16).flatMap(Unicode.Scalar.init).map { String($0) }
                } else if entity.hasPrefix("#") {
                    decoded = UInt32(entity.dropFirst(1)).flatMap(Unicode.Scalar.init).map { String($0) }
                }
            }
            if let decoded {
                out += decoded
                rest = rest[rest.index(after: semi)...]
            } else {
                out += "&"
                rest = rest.dropFirst()
            }
        }
        return out + rest
    }
}
