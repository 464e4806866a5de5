#!/usr/bin/env python3
"""Independent reader of cabackup repositories, written from docs/format.md (not from
the Swift code), so the tests can check what the Swift writer stores. Standard library
only; plaintext repositories (format versions 1 and 4), LZ4 (a pure-Python block decoder)
and zstd when the `zstandard` module is importable.

  repotool.py entries REPO [SNAPSHOT]    one JSON object per entry of the snapshot (an id,
                                         an id prefix or `latest`; default the newest), in
                                         walk order, every tree field decoded
  repotool.py compare REPO SNAPSHOT SRC  compare the snapshot's copy of SRC (found by SRC's
                                         absolute path) with SRC on disk: names, types,
                                         modes, owners, sizes, mtimes, link targets,
                                         contents (SHA-256), xattrs, data ranges, inode
                                         flags and hard links; print every difference
  repotool.py selftest                   encode entries (tags 16-18, unknown tags) by hand,
                                         decode them, refuse malformed ones, and compare a
                                         hand-written repository with the disk

Blobs are found by reading every pack's header, never through the SQLite index; every
pack's and blob's id and every snapshot record's id is verified. Exit status: 0 fine,
1 differences (compare), 2 malformed or unsupported input, or usage.
"""
import base64
import calendar
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import stat
import struct
import sys
import tempfile

HEX64 = re.compile(r"[0-9a-f]{64}\Z")
TYPES = {1: "file", 2: "dir", 3: "symlink", 4: "fifo", 5: "chardev", 6: "blockdev", 7: "socket"}
S_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFLNK: 3, stat.S_IFIFO: 4, stat.S_IFCHR: 5,
           stat.S_IFBLK: 6, stat.S_IFSOCK: 7}
INT_TAGS = {2: "type", 3: "mode", 4: "uid", 5: "gid", 6: "size", 9: "inode", 10: "device", 11: "links",
            12: "rdev", 18: "flags"}
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, KEPT_FLAGS = 0x80086601, 0x40086602, 0x70
GiB, MiB = 1 << 30, 1 << 20


class Malformed(Exception):
    pass


class Unsupported(Malformed):
    pass


def fail(msg):
    raise Malformed(msg)


def show(path):
    return path.decode("utf-8", "backslashreplace")


def read_bounded(path, limit):
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            fail("%s: %d bytes, more than the %d a reader accepts" % (show(path), size, limit))
        data = f.read(size + 1)
    if len(data) != size:
        fail("%s changed while being read" % show(path))
    return data


# ---- Tree blobs (docs/format.md "Tree blobs") ------------------------------------------

def varint(b, i, end):
    """Decodes the unsigned LEB128 at b[i:end]; returns (value, index after it)."""
    v = shift = 0
    while True:
        if i >= end:
            fail("truncated varint")
        if shift > 63:
            fail("varint longer than 10 bytes")
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        if not c & 0x80:
            if v >> 64:
                fail("varint past 64 bits")
            return v, i
        shift += 7


def value_varint(v):
    return varint(v, 0, len(v))[0]  # bytes after the varint are ignored (format.md)


def decode_pairs(v, what):
    """Repeated varint ‖ varint (data ranges) or varint length ‖ bytes pairs (xattrs)."""
    i, out = 0, []
    while i < len(v):
        if what == "ranges":
            a, i = varint(v, i, len(v))
            b, i = varint(v, i, len(v))
        else:
            pair = []
            for _ in range(2):
                n, i = varint(v, i, len(v))
                if n > len(v) - i:
                    fail("xattr length %d past the end of the field" % n)
                pair.append(bytes(v[i:i + n]))
                i += n
            a, b = pair
        out.append((a, b))
    return out


def decode_entry(b, i, end):
    e = {"name": None, "type": None, "mode": 0, "uid": 0, "gid": 0, "size": 0, "mtime_ns": 0, "ctime_ns": 0,
         "inode": 0, "device": 0, "links": 1, "rdev": 0, "link_target": b"", "content": [], "subtrees": [],
         "xattrs": [], "data_ranges": None, "flags": 0, "unknown_tags": []}
    seen = set()
    while i < end:
        tag, i = varint(b, i, end)
        n, i = varint(b, i, end)
        if n > end - i:
            fail("truncated field: tag %d claims %d bytes, %d left in its entry" % (tag, n, end - i))
        v, i = b[i:i + n], i + n
        if 1 <= tag <= 18:
            if tag in seen:
                fail("tag %d repeated in one entry" % tag)
            seen.add(tag)
        if tag == 1:
            e["name"] = bytes(v)
        elif tag in INT_TAGS:
            e[INT_TAGS[tag]] = value_varint(v)
        elif tag in (7, 8):
            u = value_varint(v)
            e["mtime_ns" if tag == 7 else "ctime_ns"] = (u >> 1) ^ -(u & 1)
        elif tag == 13:
            e["link_target"] = bytes(v)
        elif tag in (14, 15):
            if len(v) % 32:
                fail("tag %d: id list of %d bytes, not a multiple of 32" % (tag, len(v)))
            e["content" if tag == 14 else "subtrees"] = [bytes(v[k:k + 32]) for k in range(0, len(v), 32)]
        elif tag == 16:
            e["xattrs"] = decode_pairs(v, "xattrs")
        elif tag == 17:
            e["data_ranges"] = decode_pairs(v, "ranges")
        else:
            e["unknown_tags"].append(tag)  # skipped by its length, as the spec says
    check_entry(e)
    return e


def check_entry(e):
    name, t = e["name"], e["type"]
    if name is None or t is None:
        fail("entry without name or type")
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
        fail("bad entry name %r" % name)
    if t not in TYPES:
        fail("unknown entry type %d" % t)
    for k in ("mode", "uid", "gid"):
        if e[k] >> 32:
            fail("%s %d is past 32 bits" % (k, e[k]))
    names = [x[0] for x in e["xattrs"]]
    if any(not x for x in names) or any(a >= b for a, b in zip(names, names[1:])):
        fail("xattrs of %r not sorted by name bytewise, empty or repeated" % name)
    if e["data_ranges"] is not None:
        if t != 1:
            fail("data ranges on %r, which is not a file" % name)
        end = 0
        for off, n in e["data_ranges"]:
            if n == 0 or off < end or off + n > e["size"]:
                fail("data ranges of %r out of order, empty, overlapping or past its size" % name)
            end = off + n
    e["flags"] &= KEPT_FLAGS  # bits a newer writer may keep are ignored, as the spec says
    if e["flags"] and t not in (1, 2):
        fail("flags %#x on %r, which is neither a file nor a directory" % (e["flags"], name))


def decode_tree(blob):
    if not blob or blob[0] != 1:
        fail("unknown tree version")
    i, out = 1, []
    while i < len(blob):
        n, i = varint(blob, i, len(blob))
        if n > len(blob) - i:
            fail("tree entry of %d bytes runs past the end of the blob" % n)
        out.append(decode_entry(blob, i, i + n))
        i += n
    return out


# ---- Blob codecs (docs/format.md "Compression") -----------------------------------------

def lz4_block(src, raw_len):
    """Decodes one LZ4 block (no frame) that must expand to exactly raw_len bytes."""
    out, i, n = bytearray(), 0, len(src)

    def length(base, i):
        if base == 15:
            while True:
                if i >= n:
                    fail("LZ4: truncated length")
                base += src[i]
                i += 1
                if src[i - 1] != 255:
                    break
        return base, i

    while True:
        if i >= n:
            fail("LZ4: block ends without a final literal run")
        token = src[i]
        lit, i = length(token >> 4, i + 1)
        if lit > n - i or len(out) + lit > raw_len:
            fail("LZ4: literals past the input or the raw length")
        out += src[i:i + lit]
        i += lit
        if i == n:
            break
        if i + 2 > n:
            fail("LZ4: truncated offset")
        off = src[i] | src[i + 1] << 8
        match, i = length(token & 15, i + 2)
        match += 4
        if off == 0 or off > len(out) or len(out) + match > raw_len:
            fail("LZ4: bad match offset %d or length %d" % (off, match))
        start = len(out) - off
        if off >= match:
            out += out[start:start + match]
        else:
            out += (out[start:] * (match // off + 1))[:match]
    if len(out) != raw_len:
        fail("LZ4: %d bytes decoded, %d expected" % (len(out), raw_len))
    return bytes(out)


def zstd_frame(src, raw_len):
    try:
        import zstandard
    except ImportError:
        raise Unsupported("zstd not supported: the zstandard module is not installed")
    out = b""
    try:  # read at most one byte more than expected: a frame cannot make this allocate more
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(src))
        while len(out) <= raw_len:
            block = reader.read(raw_len + 1 - len(out))
            if not block:
                break
            out += block
    except zstandard.ZstdError as x:
        fail("zstd: %s" % x)
    if len(out) != raw_len:
        fail("zstd: %d bytes decoded, %d expected" % (len(out), raw_len))
    return out


# ---- The repository ----------------------------------------------------------------------

class Repo:
    def __init__(self, root):
        self.root = os.fsencode(root)
        self.check_config()
        self.blobs = {}  # id -> (pack path, pack name, type, compression, offset, length, raw length)
        data = os.path.join(self.root, b"data")
        for xy in sorted(os.listdir(data)):
            if not re.fullmatch(rb"[0-9a-f]{2}", xy):
                continue
            for name in sorted(os.listdir(os.path.join(data, xy))):
                if HEX64.match(name.decode("latin-1")):  # other names (temp files) are no objects
                    if name[:2] != xy:
                        fail("pack %s is in data/%s" % (name.decode(), xy.decode()))
                    self.read_pack(os.path.join(data, xy, name), name.decode())

    def check_config(self):
        try:
            c = json.loads(read_bounded(os.path.join(self.root, b"config"), MiB))
            version = c["format_version"]
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            fail("%s: not a cabackup config" % show(self.root))
        if type(version) is not int or version > 4:
            fail("config format_version %r: not one this reader knows (upgrade)" % version)
        if c.get("encryption") == "aes-256-gcm":
            raise Unsupported("encrypted repositories are not supported by this reader")
        if c.get("encryption") != "none" or c.get("id_scheme") != "sha256" or version not in (1, 4):
            fail("config: encryption %r, id_scheme %r, version %r: not a plaintext repository"
                 % (c.get("encryption"), c.get("id_scheme"), version))
        if (version == 4) != ("compression" in c) or c.get("compression", "lz4") not in ("lz4", "zstd"):
            fail("config: compression %r in format version %d" % (c.get("compression"), version))
        ch = c.get("chunker") if isinstance(c.get("chunker"), dict) else {}
        ok = all(type(ch.get(k)) is int for k in ("min_size", "avg_size", "max_size"))
        if not ok or not 64 <= ch["min_size"] < ch["avg_size"] < ch["max_size"] <= 64 * MiB \
                or ch["avg_size"] & (ch["avg_size"] - 1) or not HEX64.match(str(ch.get("gear_seed")).lower()) \
                or not HEX64.match(str(c.get("id"))) or type(c.get("pack_size")) is not int \
                or not 65536 <= c["pack_size"] <= 128 * MiB:
            fail("config: bad id, chunker parameters or pack size")

    def read_pack(self, path, name):
        where = "pack %s" % name
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 14:
                fail("%s: %d bytes, shorter than a trailer and header" % (where, size))
            f.seek(size - 8)
            h, magic = struct.unpack("<I4s", f.read(8))
            if magic != b"CApk" or not 6 <= h <= size - 8 or h > 16 * MiB:
                fail("%s: bad trailer (magic %r, header length %d)" % (where, magic, h))
            f.seek(size - 8 - h)
            header = f.read(h)
            version, flags, count = struct.unpack_from("<BBI", header)
            if version != 1 or flags != 0:
                fail("%s: header version %d flags %d (flags 1, a sealed header, is for encrypted "
                     "repositories)" % (where, version, flags))
            if count * 42 != h - 6:
                fail("%s: %d entries do not fill a %d-byte header" % (where, count, h))
            offset, entries = 0, []
            for k in range(count):
                t, comp, length, raw = struct.unpack_from("<BBII", header, 6 + 42 * k)
                bid = header[16 + 42 * k:48 + 42 * k]
                if t > 1 or comp > 2 or (comp == 0 and length != raw):
                    fail("%s: entry %d has type %d, compression %d, lengths %d/%d" % (where, k, t, comp, length, raw))
                entries.append((bid, (path, name, t, comp, offset, length, raw)))
                offset += length
            if offset + h + 8 != size:
                fail("%s: blobs of %d bytes do not fill the %d before the header" % (where, offset, size - h - 8))
            f.seek(0)
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(MiB), b""):
                digest.update(block)
        if digest.hexdigest() != name:
            fail("%s: the SHA-256 of the file is %s (damaged pack)" % (where, digest.hexdigest()))
        for bid, loc in entries:
            self.blobs.setdefault(bid, loc)

    def blob(self, bid):
        loc = self.blobs.get(bid)
        if loc is None:
            fail("blob %s is in no pack" % bid.hex())
        path, name, _, comp, offset, length, raw = loc
        where = "blob %s in pack %s" % (bid.hex(), name)
        if length > GiB or raw > GiB:
            fail("%s: longer than 1 GiB" % where)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            fail("%s: pack shorter than its header says" % where)
        try:
            plain = data if comp == 0 else lz4_block(data, raw) if comp == 1 else zstd_frame(data, raw)
        except Unsupported as x:
            fail("%s: %s" % (where, x))
        except Malformed as x:
            fail("%s: %s (damaged blob)" % (where, x))
        if hashlib.sha256(plain).digest() != bid:
            fail("%s: SHA-256 of its plaintext is %s (damaged blob)" % (where, hashlib.sha256(plain).hexdigest()))
        return plain

    def children(self, subtrees):
        """The entries of a directory: its tree blobs' entries, in strictly increasing name order."""
        last = None
        for tid in subtrees:
            try:
                entries = decode_tree(self.blob(tid))
            except Malformed as x:
                fail("tree %s: %s" % (tid.hex(), x))
            for e in entries:
                if last is not None and e["name"] <= last:
                    fail("tree %s: %r does not sort after %r" % (tid.hex(), e["name"], last))
                last = e["name"]
                yield e

    def snapshot(self, want=None):
        """The record (a dict) of the snapshot with this id or id prefix, else the newest."""
        records = []
        sdir = os.path.join(self.root, b"snapshots")
        for name in sorted(os.listdir(sdir)):
            name = name.decode("latin-1")
            if not HEX64.match(name):
                continue
            data = read_bounded(os.path.join(sdir, name.encode()), 16 * MiB)
            if hashlib.sha256(data).hexdigest() != name:
                fail("snapshot %s: the SHA-256 of the record is %s" % (name, hashlib.sha256(data).hexdigest()))
            try:
                r = json.loads(data)
            except ValueError:
                fail("snapshot %s: not JSON" % name)
            if isinstance(r, dict) and "forgotten" in r and "tree" not in r:
                continue  # a forget record
            if not isinstance(r, dict) or r.get("version") != 1 or not HEX64.match(str(r.get("tree"))):
                fail("snapshot %s: not a version 1 record with a tree" % name)
            records.append((rfc3339_ns(r.get("time"), name), name, r))
        records.sort()
        if want in (None, "latest"):
            found = records[-1:]
        else:
            found = [x for x in records if x[1].startswith(want.lower())]
        if len(found) != 1:
            fail("%d snapshots match %r" % (len(found), want))
        return found[0][2]

    def walk(self, tree):
        """(path bytes, entry) for every entry below the root tree, depth first, in name order."""
        stack = [(b"", self.children([bytes.fromhex(tree)]))]
        while stack:
            prefix, it = stack[-1]
            e = next(it, None)
            if e is None:
                stack.pop()
                continue
            path = prefix + b"/" + e["name"]
            yield path, e
            if e["type"] == 2:
                stack.append((path, self.children(e["subtrees"])))


def rfc3339_ns(text, name):
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|([+-])(\d\d):(\d\d))", str(text))
    if not m:
        fail("snapshot %s: time %r is not RFC 3339" % (name, text))
    g = m.groups()
    secs = calendar.timegm(tuple(int(x) for x in g[:6]))
    if g[7] != "Z":
        secs -= (1 if g[8] == "+" else -1) * (int(g[9]) * 3600 + int(g[10]) * 60)
    return secs * 10**9 + int((g[6] or "0")[:9].ljust(9, "0"))


def text_fields(d, key, raw):
    d[key] = raw.decode("utf-8", "replace")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        d[key + "_b64"] = base64.b64encode(raw).decode()


def entry_json(path, e):
    d = {}
    text_fields(d, "path", path)
    text_fields(d, "name", e["name"])
    d["type"] = TYPES[e["type"]]
    for k in ("mode", "uid", "gid", "size", "mtime_ns", "ctime_ns", "inode", "device", "links", "rdev", "flags"):
        d[k] = e[k]
    text_fields(d, "link_target", e["link_target"])
    d["content"] = [x.hex() for x in e["content"]]
    d["subtrees"] = [x.hex() for x in e["subtrees"]]
    d["xattrs"] = [{"name": n.decode("utf-8", "backslashreplace"), "value_hex": v.hex()} for n, v in e["xattrs"]]
    d["data_ranges"] = None if e["data_ranges"] is None else [list(r) for r in e["data_ranges"]]
    d["unknown_tags"] = e["unknown_tags"]
    return d


def entries(repo, want, out):
    for path, e in repo.walk(repo.snapshot(want)["tree"]):
        if e["type"] == 1 and sum(raw_length(repo, c) for c in e["content"]) != e["size"]:
            fail("%s: its content blobs hold other than its size, %d bytes" % (show(path), e["size"]))
        out.write(json.dumps(entry_json(path, e)) + "\n")


def raw_length(repo, bid):
    if bid not in repo.blobs:
        fail("blob %s is in no pack" % bid.hex())
    return repo.blobs[bid][6]


# ---- The source on disk ------------------------------------------------------------------

def disk_xattrs(path):
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as x:
        if x.errno == errno.ENOTSUP:
            return []
        raise
    return sorted((os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)) for n in names)


def disk_ranges(path, size):
    """The data extents (SEEK_DATA/SEEK_HOLE), or None when the file has no hole."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        out, pos = [], 0
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as x:
                if x.errno == errno.ENXIO:
                    break
                if x.errno in (errno.EINVAL, errno.ENOTSUP):
                    return None  # the file system cannot tell
                raise
            if d >= size:
                break
            pos = min(os.lseek(fd, d, os.SEEK_HOLE), size)
            out.append((d, pos - d))
    finally:
        os.close(fd)
    # No hint for a file without holes, nor for one that is all hole (the writer leaves
    # it out: all-zero content is restored unwritten anyway).
    return None if size == 0 or out in ([(0, size)], []) else out


def disk_flags(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return struct.unpack_from("<I", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8)))[0] & KEPT_FLAGS
    except OSError as x:
        if x.errno in (errno.ENOTSUP, errno.ENOTTY):
            return 0
        raise
    finally:
        os.close(fd)


def sha256_file(path):
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


def sha256_content(repo, ids):
    h, n = hashlib.sha256(), 0
    for bid in ids:  # one blob in memory at a time
        block = repo.blob(bid)
        h.update(block)
        n += len(block)
    return n, h.hexdigest()


def compare_entry(repo, path, e, st, diff):
    t = S_TYPES.get(stat.S_IFMT(st.st_mode))
    if e["type"] != t:
        return diff(path, "type", TYPES[e["type"]], TYPES.get(t, "unknown"))
    disk = {"uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}
    if t != 3:  # Linux symlink modes are always 0777
        disk["mode"] = stat.S_IMODE(st.st_mode)
    if t != 2:
        disk["links"] = st.st_nlink
    if t == 3:
        disk["link_target"] = os.readlink(path)
    if t in (5, 6):
        disk["rdev"] = st.st_rdev
    if t == 1:
        disk["size"] = st.st_size
        disk["data_ranges"] = disk_ranges(path, st.st_size)
    if t in (1, 2):
        disk["flags"] = disk_flags(path)
    disk["xattrs"] = disk_xattrs(path)
    for k, v in disk.items():
        if e[k] != v:
            diff(path, k, e[k], v)
    if t == 1:
        snap, here = sha256_content(repo, e["content"]), sha256_file(path)
        if snap != here:
            diff(path, "content (length, SHA-256)", snap, here)


def compare(repo, want, src, out):
    tree = repo.snapshot(want)["tree"]
    src = os.path.abspath(os.fsencode(src))
    node = {"type": 2, "subtrees": [bytes.fromhex(tree)]}  # the root tree: "/" has no node
    for c in [c for c in src.split(b"/") if c]:
        node = next((e for e in repo.children(node["subtrees"]) if e["name"] == c), None) \
            if node["type"] == 2 else None
        if node is None:
            fail("%s is not in the snapshot" % show(src))
    diffs, groups, count = [], {}, 0

    def diff(path, what, snap, disk):
        diffs.append("%s: %s differs: snapshot %r, disk %r" % (show(path), what, snap, disk))

    stack = [(src, node)]
    while stack:
        path, e = stack.pop()
        count += 1
        st = os.lstat(path)
        if "name" in e:
            compare_entry(repo, path, e, st, diff)
            if e["links"] > 1 and e["type"] != 2:
                groups.setdefault((e["device"], e["inode"]), []).append((path, (st.st_dev, st.st_ino)))
        if e["type"] == 2 and stat.S_ISDIR(st.st_mode):
            snap = {c["name"]: c for c in repo.children(e["subtrees"])}
            here, below = set(os.listdir(path)), []
            for n in sorted(set(snap) | here):
                p = os.path.join(path, n)
                if n in here and n in snap:
                    below.append((p, snap[n]))
                else:
                    count += 1
                    diffs.append("%s: %s" % (show(p), "on disk, not in the snapshot" if n in here
                                             else "in the snapshot, not on disk"))
            stack += reversed(below)
    by_inode = {}
    for key, names in groups.items():
        if len({ino for _, ino in names}) > 1:
            diffs.append("hard links %s: one file in the snapshot, several on disk" % [show(p) for p, _ in names])
        for p, ino in names:
            by_inode.setdefault(ino, set()).add(key)
    for ino, keys in by_inode.items():
        if len(keys) > 1:
            diffs.append("inode %r: one file on disk, %d in the snapshot" % (ino, len(keys)))
    for d in diffs:
        out.write(d + "\n")
    out.write("%d entries compared, %d differences\n" % (count, len(diffs)))
    return len(diffs)


# ---- Self-test: a hand-made encoder and repository ----------------------------------------

def enc_varint(v):
    out = bytearray()
    while True:
        out.append(v & 0x7F | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def enc_entry(e, extra=()):
    """Encodes an entry dict (decode_entry's keys) plus raw (tag, bytes) fields."""
    f = [(1, e["name"]), (2, enc_varint(e["type"]))]
    f += [(k, enc_varint(e[n])) for k, n in INT_TAGS.items() if k != 2 and n in e]
    f += [(k, enc_varint((e[n] << 1) ^ (e[n] >> 63))) for k, n in ((7, "mtime_ns"), (8, "ctime_ns")) if n in e]
    f += [(13, e["link_target"])] if "link_target" in e else []
    f += [(14, b"".join(e["content"]))] if "content" in e else []
    f += [(15, b"".join(e["subtrees"]))] if "subtrees" in e else []
    if e.get("xattrs"):
        f.append((16, b"".join(enc_varint(len(n)) + n + enc_varint(len(v)) + v for n, v in e["xattrs"])))
    if e.get("data_ranges") is not None:
        f.append((17, b"".join(enc_varint(a) + enc_varint(b) for a, b in e["data_ranges"])))
    body = b"".join(enc_varint(t) + enc_varint(len(v)) + v for t, v in f + list(extra))
    return enc_varint(len(body)) + body


def lz4_literals(data):
    """A valid LZ4 block holding data as one literal run."""
    n = len(data)
    ext = b"" if n < 15 else b"\xff" * ((n - 15) // 255) + bytes([(n - 15) % 255])
    return bytes([min(n, 15) << 4]) + ext + data


def write_repo(repo, src):
    """A minimal writer: snapshot src (files in 64 KiB chunks) into a new plaintext repository."""
    blobs = {}

    def put(blob):
        bid = hashlib.sha256(blob).digest()
        blobs[bid] = blob
        return bid

    def node(path, name):
        st = os.lstat(path)
        t = S_TYPES[stat.S_IFMT(st.st_mode)]
        e = {"name": name, "type": t, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
             "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "device": st.st_dev,
             "xattrs": disk_xattrs(path)}
        if t != 2 and st.st_nlink != 1:
            e["links"] = st.st_nlink
        if t == 1:
            e["size"], e["data_ranges"], e["flags"] = st.st_size, disk_ranges(path, st.st_size), disk_flags(path)
            with open(path, "rb") as f:
                e["content"] = [put(c) for c in iter(lambda: f.read(65536), b"")]
        elif t == 2:
            e["flags"] = disk_flags(path)
            kids = [node(os.path.join(path, n), n) for n in sorted(os.listdir(path))]
            e["subtrees"] = [put(b"\x01" + b"".join(kids))]
        elif t == 3:
            e["link_target"] = os.readlink(path)
        return enc_entry({k: v for k, v in e.items() if v is not None and (v or k != "flags")})

    src = os.path.abspath(os.fsencode(src))
    parts = [c for c in src.split(b"/") if c]
    entry = node(src, parts[-1])
    for k in range(len(parts) - 1, 0, -1):  # ancestors: stat, listing only the path
        st = os.stat(b"/" + b"/".join(parts[:k]))
        entry = enc_entry({"name": parts[k - 1], "type": 2, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                           "gid": st.st_gid, "mtime_ns": st.st_mtime_ns, "subtrees": [put(b"\x01" + entry)]})
    tree = put(b"\x01" + entry)
    pack, header = b"", b""
    for k, (bid, blob) in enumerate(sorted(blobs.items())):
        stored = lz4_literals(blob) if k % 2 else blob  # half of them LZ4-framed
        header += struct.pack("<BBII", 0, k % 2, len(stored), len(blob)) + bid
        pack += stored
    header = struct.pack("<BBI", 1, 0, len(blobs)) + header
    pack += header + struct.pack("<I", len(header)) + b"CApk"
    name = hashlib.sha256(pack).hexdigest()
    for d in ["data/" + name[:2], "snapshots"]:
        os.makedirs(os.path.join(repo, d))
    with open(os.path.join(repo, "data", name[:2], name), "wb") as f:
        f.write(pack)
    with open(os.path.join(repo, "config"), "w") as f:
        json.dump({"chunker": {"avg_size": 1 << 20, "gear_seed": "00" * 32, "max_size": 8 << 20,
                               "min_size": 512 << 10}, "encryption": "none", "format_version": 1,
                   "id": "11" * 32, "id_scheme": "sha256", "pack_size": 16 << 20}, f)
    record = json.dumps({"version": 1, "time": "2026-01-02T03:04:05.5+01:00", "tree": tree.hex(),
                         "paths": [src.decode()]}).encode()
    with open(os.path.join(repo, "snapshots", hashlib.sha256(record).hexdigest()), "wb") as f:
        f.write(record)


def selftest():
    ids = [hashlib.sha256(b"%d" % k).digest() for k in range(3)]
    full = {"name": b"f\xe9", "type": 1, "mode": 0o4755, "uid": 1000, "gid": 2**32 - 1, "size": 10 << 20,
            "mtime_ns": -1_500_000_000_123, "ctime_ns": 2**62, "inode": 2**64 - 1, "device": 0xFE00, "links": 3,
            "content": ids, "xattrs": [(b"security.capability", b"\x01\x00"), (b"user.a", b""),
                                       (b"user.b", b"\0" * 300)],
            "data_ranges": [(0, 4096), (1 << 20, 5000), ((10 << 20) - 1, 1)], "flags": 0x50}
    blob = b"\x01" + enc_entry(full, [(99, b"future"), (0, b""), (300, b"\x80" * 20)])
    got = decode_tree(blob)[0]
    assert got["unknown_tags"] == [99, 0, 300], got["unknown_tags"]
    assert all(got[k] == v for k, v in full.items()), got
    dev = decode_tree(b"\x01" + enc_entry({"name": b"d", "type": 6, "rdev": 0x803}))[0]
    assert (dev["links"], dev["rdev"], dev["xattrs"], dev["data_ranges"], dev["flags"]) == (1, 0x803, [], None, 0)
    assert varint(b"\xff" * 9 + b"\x01", 0, 10) == (2**64 - 1, 10)
    bad = {
        "truncated field": b"\x01\x06\x01\x01a\x02\x05\x01",
        "entry past the blob": b"\x01\x20\x01\x01a",
        "11-byte varint": b"\x01" + enc_entry({"name": b"a", "type": 1}, [(3, b"\xff" * 10 + b"\x01")]),
        "varint past 64 bits": b"\x01" + enc_entry({"name": b"a", "type": 1}, [(9, b"\xff" * 9 + b"\x02")]),
        "no type": b"\x01\x03\x01\x01a",
        "tree version 2": b"\x02",
        "repeated tag": b"\x01" + enc_entry({"name": b"a", "type": 1, "mode": 1}, [(3, b"\x02")]),
        "unsorted xattrs": b"\x01" + enc_entry({"name": b"a", "type": 1, "xattrs": [(b"user.b", b""), (b"user.a", b"")]}),
        "xattr past its field": b"\x01" + enc_entry({"name": b"a", "type": 1}, [(16, b"\x06user.a\x05ab")]),
        "ranges past size": b"\x01" + enc_entry({"name": b"a", "type": 1, "size": 10, "data_ranges": [(5, 6)]}),
        "overlapping ranges": b"\x01" + enc_entry({"name": b"a", "type": 1, "size": 99,
                                                   "data_ranges": [(0, 10), (9, 1)]}),
        "ranges on a directory": b"\x01" + enc_entry({"name": b"a", "type": 2, "data_ranges": []}),
        "flags on a symlink": b"\x01" + enc_entry({"name": b"a", "type": 3, "flags": 0x10}),
        "content not 32-byte ids": b"\x01" + enc_entry({"name": b"a", "type": 1, "content": [b"x" * 31]}),
        "name with a slash": b"\x01" + enc_entry({"name": b"a/b", "type": 1}),
        "name ..": b"\x01" + enc_entry({"name": b"..", "type": 1}),
    }
    for what, blob in bad.items():
        try:
            decode_tree(blob)
            raise AssertionError("%s was accepted" % what)
        except Malformed:
            pass
    assert lz4_block(b"\x35abc\x03\x00\x10!", 13) == b"abcabcabcabc!"
    assert lz4_block(lz4_literals(b"y" * 300), 300) == b"y" * 300
    for src, n in ((b"\x35abc\x00\x00\x10!", 13), (b"\x35abc\x04\x00\x10!", 13), (b"\x35abc\x03\x00\x10!", 12),
                   (b"\x35abc\x03", 13), (b"\x40ab", 4)):
        try:
            lz4_block(src, n)
            raise AssertionError("LZ4 %r accepted" % src)
        except Malformed:
            pass
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        os.makedirs(os.path.join(src, "dir"))
        with open(os.path.join(src, "sparse"), "wb") as f:
            f.seek(1 << 20)
            f.write(b"data after a hole")
        with open(os.path.join(src, "dir", "plain"), "wb") as f:
            f.write(os.urandom(200000))
        os.link(os.path.join(src, "dir", "plain"), os.path.join(src, "hard"))
        os.symlink("dir/plain", os.path.join(src, "link"))
        os.mkfifo(os.path.join(src, "fifo"))
        try:  # user xattrs and nodump need a file system that has them
            os.setxattr(os.path.join(src, "dir", "plain"), "user.note", b"kept")
            xattrs = 1
        except OSError:
            xattrs = 0
        try:
            fd = os.open(os.path.join(src, "dir"), os.O_RDONLY)
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("<I", 0x40))
            os.close(fd)
        except OSError:
            pass
        write_repo(os.path.join(tmp, "repo"), src)
        repo = Repo(os.path.join(tmp, "repo"))
        listed = {p.rsplit(b"/", 1)[1]: e for p, e in repo.walk(repo.snapshot()["tree"])}
        holes = listed[b"sparse"]["data_ranges"]
        assert holes == disk_ranges(os.path.join(src, "sparse"), (1 << 20) + 17)
        assert listed[b"plain"]["xattrs"] == [(b"user.note", b"kept")] * xattrs and listed[b"plain"]["links"] == 2
        assert listed[b"dir"]["flags"] == disk_flags(os.path.join(src, "dir"))
        out = io.StringIO()
        assert compare(repo, None, src, out) == 0, "a hand-made snapshot differs from its source:\n" + out.getvalue()
        if xattrs:
            os.setxattr(os.path.join(src, "dir", "plain"), "user.note", b"changed")
        st = os.stat(os.path.join(src, "sparse"))
        with open(os.path.join(src, "sparse"), "r+b") as f:
            f.write(b"!")  # fills the first hole's block: data ranges and content change
        os.utime(os.path.join(src, "sparse"), ns=(st.st_atime_ns, st.st_mtime_ns))
        want = ["/sparse: content"] + ["/sparse: data_ranges"] * (holes is not None) \
            + ["/dir/plain: xattrs", "/hard: xattrs"] * xattrs
        out = io.StringIO()
        compare(repo, None, src, out)
        assert all(w in out.getvalue() for w in want), out.getvalue()
        assert out.getvalue().endswith(" %d differences\n" % len(want)), out.getvalue()
        for name in os.listdir(os.path.join(tmp, "repo", "data")):  # a damaged pack is refused
            path = os.path.join(tmp, "repo", "data", name, os.listdir(os.path.join(tmp, "repo", "data", name))[0])
            with open(path, "r+b") as f:
                first = f.read(1)
                f.seek(0)
                f.write(bytes([first[0] ^ 0xFF]))
        try:
            Repo(os.path.join(tmp, "repo"))
            raise AssertionError("a damaged pack was accepted")
        except Malformed as x:
            assert "damaged pack" in str(x), x
    print("selftest passed")


def main(argv):
    try:
        if len(argv) in (2, 3) and argv[0] == "entries":
            entries(Repo(argv[1]), argv[2] if len(argv) == 3 else None, sys.stdout)
        elif len(argv) == 4 and argv[0] == "compare":
            return 1 if compare(Repo(argv[1]), argv[2], argv[3], sys.stdout) else 0
        elif argv == ["selftest"]:
            selftest()
        else:
            sys.stderr.write(__doc__)
            return 2
    except (Malformed, OSError) as x:
        sys.stderr.write("repotool: %s\n" % x)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
