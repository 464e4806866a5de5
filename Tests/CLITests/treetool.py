#!/usr/bin/env python3
"""Independent reader for the end-to-end tests: builds fixture trees and compares a
restored tree with its source using only Python's os.lstat and file bytes, never
cabackup's own metadata code.

  treetool.py make DIR          create a tree with every kind of entry cabackup keeps
  treetool.py compare SRC DST   exit 0 when DST reproduces SRC (names, types, bytes,
                                modes, mtimes in ns, symlink targets, hard links,
                                extended attributes (ACLs and capabilities among them),
                                inode flags, and holes: every hole of a source file
                                is a hole in its restore); otherwise print every
                                difference and exit 1
  treetool.py compare-view SRC DST
                                the same for a view that shows each name as its own
                                inode (a FUSE mount): link counts instead of shared
                                inodes, and no holes or inode flags
  treetool.py holes FILE        print FILE's data extents as JSON [[offset, length], ...]
  treetool.py describe DIR      print what compare compares of DIR (and DIR's own mode
                                and mtime), one entry a line: equal output, equal trees
"""
import errno
import fcntl
import hashlib
import json
import os
import random
import stat
import sys


def make(root):
    root = os.fsencode(root)
    os.makedirs(root, exist_ok=True)
    rnd = random.Random(1234)

    def p(*parts):
        return os.path.join(root, *[x if isinstance(x, bytes) else os.fsencode(x) for x in parts])

    os.makedirs(p("docs", "nested", "deeper"))
    os.makedirs(p("empty-dir"))
    with open(p("docs", "hello.txt"), "wb") as f:
        f.write(b"hello, world\n")
    with open(p("docs", "nested", "random.bin"), "wb") as f:
        f.write(rnd.randbytes(3 * 1024 * 1024 + 17))
    with open(p("docs", "nested", "deeper", "text.log"), "wb") as f:
        f.write(b"".join(b"line %d of a compressible log file\n" % i for i in range(50000)))
    open(p("empty-file"), "wb").close()
    # Names that are bytes, not text: invalid UTF-8, a newline, a backslash, spaces.
    with open(p(b"latin1-\xe9t\xe9.txt"), "wb") as f:
        f.write(b"not utf-8 name\n")
    with open(p(b"new\nline"), "wb") as f:
        f.write(b"newline in name\n")
    with open(p(b"back\\slash and space"), "wb") as f:
        f.write(b"x")
    os.makedirs(p(b"dir-\xff\xfe"))
    with open(p(b"dir-\xff\xfe", "inside"), "wb") as f:
        f.write(rnd.randbytes(1000))
    # Symlinks: relative, absolute, dangling, to a directory.
    os.symlink("docs/hello.txt", p("link-rel"))
    os.symlink("/etc/hostname", p("link-abs"))
    os.symlink("does/not/exist", p("link-dangling"))
    os.symlink("docs", p("link-dir"))
    # Hard links: three names for one inode, in different directories.
    with open(p("hard-a"), "wb") as f:
        f.write(rnd.randbytes(70000))
    os.link(p("hard-a"), p("docs", "hard-b"))
    os.link(p("hard-a"), p("empty-dir-sibling-hard-c"))
    os.mkfifo(p("fifo"))
    # Permissions, including odd ones.
    with open(p("secret"), "wb") as f:
        f.write(b"s3cret")
    os.chmod(p("secret"), 0o600)
    with open(p("script.sh"), "wb") as f:
        f.write(b"#!/bin/sh\necho hi\n")
    os.chmod(p("script.sh"), 0o755)
    os.chmod(p("docs", "nested", "deeper"), 0o750)
    with open(p("readonly"), "wb") as f:
        f.write(b"ro")
    os.chmod(p("readonly"), 0o444)
    # Nanosecond mtimes (set last, deepest first, so later writes do not move them).
    ns = 1_600_000_000_123_456_789
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            entries.append(os.path.join(dirpath, n))
    entries.sort(key=lambda e: -e.count(b"/"))
    for i, e in enumerate(entries):
        os.utime(e, ns=(ns + i * 1001, ns + i * 1_000_003), follow_symlinks=False)


FS_IOC_GETFLAGS = 0x80086601
KEPT_FLAGS = 0x10 | 0x20 | 0x40  # immutable, append-only, nodump


def xattrs(path):
    """Every extended attribute this process can read, not following a symlink."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False).hex() for n in sorted(names)}


def inode_flags(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8)
        return int.from_bytes(buf[:4], "little") & KEPT_FLAGS
    except OSError:
        return 0
    finally:
        os.close(fd)


def data_extents(path):
    """The file's data extents [(offset, length)], from SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out, offset = [], 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            out.append((data, hole - data))
            offset = hole
        return out
    finally:
        os.close(fd)


def holes(path):
    """The file's holes [(offset, length)] (the complement of its data extents)."""
    size = os.lstat(path).st_size
    out, pos = [], 0
    for off, length in data_extents(path):
        if off > pos:
            out.append((pos, off - pos))
        pos = off + length
    if pos < size:
        out.append((pos, size - pos))
    return out


def covered(hole, restored_holes):
    """Whether the hole (offset, length) lies inside the restore's holes."""
    off, length = hole
    for roff, rlength in restored_holes:
        if roff <= off and off + length <= roff + rlength:
            return True
    return False


def describe(root, view=False):
    """Maps relative path bytes to a tuple describing the entry."""
    out = {}
    inode_names = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            d = {"type": kind, "mode": stat.S_IMODE(st.st_mode)}
            if stat.S_ISLNK(st.st_mode):
                d["target"] = os.readlink(full)
                d.pop("mode")  # Linux symlink modes are always 0777.
            else:
                d["mtime_ns"] = st.st_mtime_ns
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                d["size"] = st.st_size
                d["sha256"] = h.hexdigest()
                if view:
                    d["nlink"] = st.st_nlink
                elif st.st_nlink > 1:
                    inode_names.setdefault((st.st_dev, st.st_ino), []).append(rel)
            if os.geteuid() == 0:
                d["uid"], d["gid"] = st.st_uid, st.st_gid
            d["xattrs"] = xattrs(full)
            if (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) and not view:
                d["flags"] = inode_flags(full)
            out[rel] = d
    # Hard-link groups: each name records the sorted names sharing its inode.
    for names in inode_names.values():
        for n in names:
            out[n]["links"] = sorted(names)
    return out


def compare(src, dst, view=False):
    a, b = describe(os.fsencode(src), view), describe(os.fsencode(dst), view)
    problems = []
    for k in sorted(set(a) | set(b)):
        if k not in b:
            problems.append("missing in restore: %r" % k)
        elif k not in a:
            problems.append("extra in restore: %r" % k)
        elif a[k] != b[k]:
            problems.append("differs: %r\n  source:  %r\n  restore: %r" % (k, a[k], b[k]))
        elif a[k].get("size") and not view:
            # Holes: each of the source's is a hole in the restore (the restore may leave
            # more, all-zero data unwritten); block-aligned on both sides.
            src_holes = holes(os.path.join(os.fsencode(src), k))
            dst_holes = holes(os.path.join(os.fsencode(dst), k))
            missing = [h for h in src_holes if not covered(h, dst_holes)]
            if missing:
                problems.append("holes not restored: %r %r (restore has %r)" % (k, missing, dst_holes))
    for p in problems:
        print(p)
    print("%d entries compared, %d differences" % (len(a), len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "holes":
        print(json.dumps(data_extents(sys.argv[2])))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare-view":
        sys.exit(compare(sys.argv[2], sys.argv[3], view=True))
    elif len(sys.argv) == 3 and sys.argv[1] == "describe":
        root = os.fsencode(sys.argv[2])
        st = os.lstat(root)
        print("%r" % ((b".", {"mode": st.st_mode, "mtime_ns": st.st_mtime_ns}),))
        for entry in sorted(describe(root).items()):
            print("%r" % (entry,))
    else:
        print(__doc__)
        sys.exit(2)
