import CABackup
import Foundation

// Back up a folder into a new local repository, list it, and restore it elsewhere.
let work = NSTemporaryDirectory() + "cabackup-example-\(getpid())"
let documents = work + "/documents"
try FileManager.default.createDirectory(atPath: documents, withIntermediateDirectories: true)
try "Hello from cabackup\n".write(toFile: documents + "/hello.txt", atomically: true, encoding: .utf8)

let password = "correct horse battery staple"  // in a real program: ask the user
let repository = try Repository.initialize(path: work + "/repository", password: password)
let result = try repository.snapshot(paths: [documents]) { progress in
    print("\(progress.filesDone) files, \(progress.bytesRead) bytes read")
}
let summary = result.snapshot.summary
print("snapshot \(result.snapshot.id.shortHex): \(summary.filesTotal) files, \(summary.bytesAdded) bytes added")

for snapshot in try Repository.open(path: work + "/repository", password: password).snapshots() {
    print(snapshot.id.shortHex, snapshot.time, snapshot.paths)
}
try repository.list(result.snapshot, path: documents) { entry in
    print(entry.node.type, entry.node.size, entry.displayPath)
}

let restored = try repository.restore(result.snapshot, to: work + "/restored")
let text = try String(contentsOfFile: work + "/restored" + documents + "/hello.txt", encoding: .utf8)
print("restored \(restored.filesRestored) files; hello.txt says: \(text)", terminator: "")
try FileManager.default.removeItem(atPath: work)
