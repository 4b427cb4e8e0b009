"""Power cuts, simulated: the disk states a crash may leave, from a recording of real system calls.

In the style of the tools storage people use for this -- ALICE ("All File Systems Are Not
Created Equal", OSDI 2014), CrashMonkey (OSDI 2018) and LazyFS (used by Jepsen): run a real
program once while recording what it asks of the file system, then construct, for every
prefix of that recording, the states a disk may hold if the power is cut at that point, and
put each one on disk for the checks to look at.

Recording: ``strace -f`` (the only tracer on every Linux machine we run on; a FUSE file system
would need libfuse, which is not installed here, and would change timing and locking). Every
call that changes a file or a folder, or makes something durable, is decoded -- open with
O_CREAT/O_TRUNC, write/pwrite/writev, copy_file_range and sendfile (the copied bytes are taken
from the source file), ftruncate, fallocate, mkdir, rename/renameat2 (NOREPLACE, EXCHANGE),
link, unlink, rmdir, symlink, fsync, fdatasync, syncfs/sync -- along with what is needed to
follow file descriptors (dup, fcntl, close, lseek, reads for the file position, clone with or
without CLONE_FILES, execve). A write through a shared writable memory map cannot be seen by
a tracer: it is refused (:class:`Unsupported`), as is any call the model does not know that
would change the traced tree. The model of the tree replayed from the recording must end
byte for byte equal to the real tree (checked by :func:`record`), so a missed call cannot go
unnoticed.

The persistence model (what a power cut may leave), deliberately weaker than ext4's:

* data written to a file is durable once an ``fsync``/``fdatasync`` of that file *started
  after the write had returned* has returned; until then each write may be lost, applied,
  applied out of order, or torn (applied in part);
* a change to a folder's entries (create, mkdir, rename, link, unlink, rmdir) is durable once
  an ``fsync`` of that folder (either folder, for a rename between two) has returned; fsync of
  a file does not make its name durable (POSIX, and the Linux fsync(2) manual);
* a rename (also RENAME_EXCHANGE) is atomic: persisted whole or not at all;
* changes not yet durable may be persisted in any subset, in any order, except where the
  result would be no file system at all: changes to the same name, or moving the same file,
  persist in program order; an entry is persisted in a new folder only with that folder's
  mkdir; a folder's removal only with the removal of what it held. (ext4 with its ordered
  journal persists metadata in program order, a much smaller set of states; every ext4 state
  is one of these.)

The states are enumerated exactly (every subset allowed above) when few changes are pending,
and with ALICE's bounded exploration when more are (every in-order prefix, each change
dropped, each change alone, each prefix plus one later change). Data variants are taken for
the files that matter to the checks (all pending writes lost, all kept, each file torn in its
middle write, its first pending write lost, or lost alone); other files keep what was written.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CALLS = ("open", "openat", "creat", "close", "dup", "dup2", "dup3", "fcntl", "lseek", "read", "readv", "pread64",
         "preadv", "preadv2", "write", "writev", "pwrite64", "pwritev", "pwritev2", "copy_file_range", "sendfile",
         "splice", "ftruncate", "truncate", "fallocate", "fsync", "fdatasync", "sync", "syncfs", "sync_file_range",
         "rename", "renameat", "renameat2", "link", "linkat", "unlink", "unlinkat", "mkdir", "mkdirat", "rmdir",
         "symlink", "symlinkat", "mmap", "clone", "clone3", "fork", "vfork", "execve", "chdir", "fchdir")
STRING_LIMIT = 100_000_000  # bytes of a write shown in full (strace refuses much more); longer is refused
RAW = ("read", "readv", "pread64", "preadv", "preadv2")  # only their return value matters: no buffers printed


class Unsupported(Exception):
    """The recording holds something the model cannot replay faithfully."""


def strace_works() -> str | None:
    """None when strace can trace here, else why not."""
    if shutil.which("strace") is None:
        return "strace is not installed"
    res = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, text=True)
    if res.returncode != 0:
        return f"strace cannot trace here: {res.stderr.strip()[:200]}"
    return None


# --- the model: inodes, folders, files ----------------------------------------------------------

@dataclass
class Image:
    """A tree: ``kind[id]`` is "d", "f" or "l"; folders' entries, files' bytes, links' targets."""
    root: int
    kind: dict[int, str] = field(default_factory=dict)
    entries: dict[int, dict[str, int]] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    target: dict[int, bytes] = field(default_factory=dict)

    def lookup(self, rel: str) -> int | None:
        node = self.root
        for part in [p for p in rel.split("/") if p]:
            if self.kind.get(node) != "d" or part not in self.entries[node]:
                return None
            node = self.entries[node][part]
        return node

    def file_digest(self, node: int) -> str:
        known = getattr(self.data, "digest", None)
        return known(node) if known else hashlib.sha256(self.data[node]).hexdigest()

    def walk(self, node: int | None = None, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(relative path, inode) of everything under ``node``, parents first, names sorted."""
        node = self.root if node is None else node
        for name in sorted(self.entries.get(node, {})):
            child = self.entries[node][name]
            path = f"{prefix}{name}"
            yield path, child
            if self.kind[child] == "d":
                yield from self.walk(child, path + "/")

    def digest(self, node: int | None) -> str | None:
        """sha256 over a file's bytes, or a folder's names, kinds and bytes; None when absent."""
        if node is None:
            return None
        h = hashlib.sha256()
        if self.kind[node] == "f":
            h.update(b"file\n" + self.file_digest(node).encode())
        elif self.kind[node] == "l":
            h.update(b"link\n" + self.target[node])
        else:
            for path, child in self.walk(node):
                k = self.kind[child]
                h.update(f"{k} {path}\n".encode("utf-8", "surrogateescape"))
                if k == "f":
                    h.update(self.file_digest(child).encode())
                elif k == "l":
                    h.update(self.target[child])
        return h.hexdigest()


def snapshot(root: Path, ids: Iterator[int] | None = None) -> tuple[Image, dict[int, tuple[int, int]]]:
    """The real tree under ``root`` as an Image, and each inode's real (st_dev, st_ino)."""
    ids = ids or itertools.count()
    by_real: dict[tuple[int, int], int] = {}

    def node_of(path: str) -> int:
        st = os.lstat(path)
        real = (st.st_dev, st.st_ino)
        if real in by_real:
            return by_real[real]
        n = by_real[real] = next(ids)
        if stat.S_ISDIR(st.st_mode):
            img.kind[n] = "d"
            img.entries[n] = {}
            for name in os.listdir(path):
                img.entries[n][name] = node_of(os.path.join(path, name))
        elif stat.S_ISLNK(st.st_mode):
            img.kind[n], img.target[n] = "l", os.fsencode(os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            img.kind[n] = "f"
            with open(path, "rb") as f:
                img.data[n] = f.read()
        else:
            raise Unsupported(f"{path}: neither file, folder nor symbolic link")
        return n

    img = Image(root=-1)
    img.root = node_of(os.fspath(root))
    return img, {n: real for real, n in by_real.items()}


def same_tree(a: Image, b: Image) -> list[str]:
    """Where two images differ (names, kinds, bytes); [] when they are the same tree."""
    pa, pb = dict(a.walk()), dict(b.walk())
    diffs = [f"only in the model: {p}" for p in sorted(set(pa) - set(pb))]
    diffs += [f"only on disk: {p}" for p in sorted(set(pb) - set(pa))]
    for p in sorted(set(pa) & set(pb)):
        x, y = pa[p], pb[p]
        if a.kind[x] != b.kind[y]:
            diffs.append(f"{p}: {a.kind[x]} in the model, {b.kind[y]} on disk")
        elif a.kind[x] == "f" and a.data[x] != b.data[y]:
            diffs.append(f"{p}: {len(a.data[x])} bytes in the model, {len(b.data[y])} on disk"
                         + (" (same size, other bytes)" if len(a.data[x]) == len(b.data[y]) else ""))
        elif a.kind[x] == "l" and a.target[x] != b.target[y]:
            diffs.append(f"{p}: other link target")
    return diffs


# --- operations ------------------------------------------------------------------------------

@dataclass
class Op:
    """One recorded change. ``entry``/``exit`` are the trace lines where the call began and returned.

    kind "data": ``inode`` gets ``payload`` at ``offset`` (``size`` set: truncated/extended to it).
    kind "ns": ``assigns`` = ((folder, name, new inode or None, old inode or None), ...), atomic.
    kind "sync": ``inode``'s data (a file) or entries (a folder) become durable; inode None: all.
    """
    kind: str
    entry: int
    exit: int
    call: str
    inode: int | None = None
    offset: int = 0
    payload: bytes = b""
    size: int | None = None
    assigns: tuple[tuple[int, str, int | None, int | None], ...] = ()
    index: int = -1

    def __str__(self) -> str:
        if self.kind == "data":
            what = f"truncate to {self.size}" if self.size is not None else f"{len(self.payload)} bytes at {self.offset}"
            return f"#{self.index} {self.call} inode {self.inode}: {what}"
        if self.kind == "sync":
            return f"#{self.index} {self.call} inode {self.inode}"
        return f"#{self.index} {self.call} " + ", ".join(f"{d}/{n}: {o}->{w}" for d, n, w, o in self.assigns)


@dataclass
class Desc:
    """An open file description: shared by dup'ed and inherited descriptors."""
    inode: int | None  # in the traced tree, else None
    path: str          # absolute path when opened (for files outside the tree)
    pos: int = 0
    append: bool = False


@dataclass
class Recording:
    root: Path
    initial: Image
    final: Image
    ops: list[Op]
    initial_ids: dict[tuple[int, int], int]
    """Real (st_dev, st_ino) of each inode before the run -> its id in the model."""
    final_ids: dict[tuple[int, int], int]
    """The same after the run (numbers freed during the run may have been given to new files)."""
    returncode: int
    stderr: str
    kinds: dict[int, str]


# --- strace output ---------------------------------------------------------------------------

_ESC = re.compile(rb"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)")
_SIMPLE = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"v": b"\v", b"f": b"\f", b"\\": b"\\", b'"': b'"'}


def _unescape(s: str) -> bytes:
    def one(m: re.Match) -> bytes:
        e = m.group(1)
        if e[:1] == b"x":
            return bytes([int(e[1:], 16)])
        if e[:1].isdigit():
            return bytes([int(e, 8)])
        return _SIMPLE.get(e, e)
    return _ESC.sub(one, s.encode("latin-1"))


def _split_args(text: str) -> tuple[list[str], str]:
    """Split ``name(args) = ret`` after the name's parenthesis into args and the return text."""
    args, depth, cur, i = [], 0, [], 0
    while i < len(text):
        c = text[i]
        if c == '"':
            j = i + 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            cur.append(text[i:j + 1])
            i = j + 1
            if text.startswith("...", i):
                raise Unsupported("a string was cut short by strace (-s)")
            continue
        if text.startswith("=>", i):  # strace's "value on entry => value on return"
            cur.append("=>")
            i += 2
            continue
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            if depth == 0 and c == ")":
                args.append("".join(cur).strip())
                return [a for a in args if a != ""], text[i + 1:]
            depth -= 1
        elif c == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    raise ValueError(f"unbalanced call: {text[:200]}")


_FD = re.compile(r"^(-?\d+|AT_FDCWD)(?:<(.*?)>)?")
_RET = re.compile(r"^\s*=\s*(-?\d+|0x[0-9a-fA-F]+|\?)(?:<(.*?)>)?")


def _fd(tok: str) -> tuple[int | str, str | None]:
    m = _FD.match(tok)
    if not m:
        raise ValueError(f"not a file descriptor: {tok[:80]}")
    num = m.group(1) if m.group(1) == "AT_FDCWD" else int(m.group(1))
    return num, (os.fsdecode(_unescape(m.group(2))) if m.group(2) is not None else None)


def _str(tok: str) -> bytes:
    if not (tok.startswith('"') and tok.endswith('"')):
        raise ValueError(f"not a string: {tok[:80]}")
    return _unescape(tok[1:-1])


def _int(tok: str) -> int:
    return int(tok.split("<", 1)[0], 0)


def _ptr_value(tok: str) -> int | None:
    if tok == "NULL":
        return None
    m = re.match(r"^\[(-?\d+)", tok)
    if not m:
        raise ValueError(f"not an offset pointer: {tok[:80]}")
    return int(m.group(1))


def _iov(tok: str) -> bytes:
    return b"".join(_unescape(s) for s in re.findall(r'iov_base="((?:[^"\\]|\\.)*)"', tok))


def calls(trace: Path) -> Iterator[tuple[int, int, int, str, list[str], str]]:
    """(entry line, exit line, tid, call, args, return text) for each completed call, in order of return."""
    pending: dict[int, tuple[int, str]] = {}
    with open(trace, encoding="latin-1") as f:
        for lineno, line in enumerate(f):
            line = line.rstrip("\n")
            m = re.match(r"^(\d+)\s+(.*)$", line)
            if not m:
                continue
            tid, body = int(m.group(1)), m.group(2)
            if body.startswith(("+++", "---")):
                continue
            entry = lineno
            if body.startswith("<..."):
                rm = re.match(r"^<\.\.\. (\w+) resumed>(.*)$", body)
                if not rm or tid not in pending:
                    continue
                entry, head = pending.pop(tid)
                body = head + rm.group(2)
            if body.endswith("<unfinished ...>"):
                pending[tid] = (entry, body[: -len("<unfinished ...>")].rstrip() + " ")
                continue
            cm = re.match(r"^(\w+)\((.*)$", body)
            if not cm:
                continue
            try:
                args, rest = _split_args(cm.group(2))
            except (IndexError, ValueError):
                if cm.group(1) in CALLS and cm.group(1) not in RAW + ("mmap", "execve") and not body.endswith("?"):
                    raise Unsupported(f"cannot read line {lineno + 1} of the trace: {body[:200]}") from None
                continue  # a call cut short by the end of its process ("= ?")
            yield entry, lineno, tid, cm.group(1), args, rest


# --- replaying a recording into the model --------------------------------------------------------

class _Replayer:
    def __init__(self, root: Path, initial: Image, first_id: int, cwd: str):
        self.root = os.path.normpath(os.path.abspath(root))
        self.live = Image(root=initial.root, kind=dict(initial.kind),
                          entries={k: dict(v) for k, v in initial.entries.items()},
                          data={k: bytearray(v) for k, v in initial.data.items()}, target=dict(initial.target))
        self.ids = itertools.count(first_id)
        self.ops: list[Op] = []
        self.tables: dict[int, dict[int, list]] = {}  # tid -> {fd: [Desc, cloexec]}
        self.cwd: dict[int, str] = {}
        self.first_cwd = cwd
        self.line = (0, 0)
        self.call = ""

    # paths
    def _table(self, tid: int) -> dict[int, list]:
        if tid not in self.tables:
            self.tables[tid] = {}
        return self.tables[tid]

    def _inside(self, path: str) -> str | None:
        """``path`` relative to the root ('' for the root), or None when outside."""
        if path == self.root:
            return ""
        if path.startswith(self.root + os.sep):
            return path[len(self.root) + 1:]
        return None

    def _base(self, tid: int, dirfd: int | str, dirpath: str | None) -> tuple[int | None, str]:
        """Where a relative path starts: (inode in the tree or None, absolute path)."""
        if dirfd == "AT_FDCWD":
            cwd = dirpath or self.cwd.get(tid, self.first_cwd)
            self.cwd[tid] = cwd
            rel = self._inside(cwd)
            return (self.live.lookup(rel) if rel is not None else None), cwd
        desc = self._table(tid).get(dirfd)
        if desc is None:
            return None, dirpath or "/nonexistent"
        return desc[0].inode, desc[0].path

    def _resolve(self, tid: int, dirfd: int | str, dirpath: str | None, path: bytes):
        """-> ("in", parent inode, last name, inode or None) | ("root",) | ("out", absolute path)."""
        p = os.fsdecode(path)
        if os.path.isabs(p):
            base_inode, start = None, "/"
        else:
            base_inode, start = self._base(tid, dirfd, dirpath)
        if base_inode is None or os.path.isabs(p):
            full = os.path.normpath(os.path.join(start, p))
            rel = self._inside(full)
            if rel is None:
                return ("out", full)
            if rel == "":
                return ("root",)
            base_inode, parts = self.live.root, rel.split(os.sep)
        else:
            parts = [x for x in p.split("/") if x not in ("", ".")]
            if ".." in parts:
                raise Unsupported(f"'..' in a path relative to a folder in the tree: {p}")
            if not parts:
                return ("in", None, None, base_inode)
        node = base_inode
        for part in parts[:-1]:
            if self.live.kind.get(node) != "d" or part not in self.live.entries[node]:
                return ("in", None, None, None)  # a missing parent: the call failed or is outside
            node = self.live.entries[node][part]
        last = parts[-1]
        return ("in", node, last, self.live.entries.get(node, {}).get(last))

    # recording changes
    def _op(self, **kw) -> None:
        op = Op(entry=self.line[0], exit=self.line[1], call=self.call, **kw)
        op.index = len(self.ops)
        self.ops.append(op)
        if op.kind == "ns":
            for d, name, new, _old in op.assigns:
                if new is None:
                    self.live.entries[d].pop(name, None)
                else:
                    self.live.entries[d][name] = new
        elif op.kind == "data":
            buf = self.live.data[op.inode]
            if op.size is not None:
                del buf[op.size:]
                buf.extend(b"\0" * (op.size - len(buf)))
            else:
                end = op.offset + len(op.payload)
                if len(buf) < op.offset:
                    buf.extend(b"\0" * (op.offset - len(buf)))
                buf[op.offset:end] = op.payload

    def _new(self, kind: str) -> int:
        n = next(self.ids)
        self.live.kind[n] = kind
        if kind == "d":
            self.live.entries[n] = {}
        elif kind == "f":
            self.live.data[n] = bytearray()
        return n

    def _put(self, desc: Desc, payload: bytes, offset: int | None) -> None:
        if desc.inode is None or not payload:
            return
        if self.live.kind[desc.inode] != "f":
            raise Unsupported(f"{self.call} on a folder")
        if offset is None:
            offset = len(self.live.data[desc.inode]) if desc.append else desc.pos
            desc.pos = offset + len(payload)
        self._op(kind="data", inode=desc.inode, offset=offset, payload=payload)

    def _source_bytes(self, desc: Desc, offset: int, n: int) -> bytes:
        if desc.inode is not None:
            return bytes(self.live.data[desc.inode][offset:offset + n])
        with open(desc.path, "rb") as f:  # outside the tree: an input, unchanged since
            f.seek(offset)
            return f.read(n)

    def feed(self, entry: int, exit_: int, tid: int, call: str, args: list[str], ret_text: str) -> None:
        self.line, self.call = (entry, exit_), call
        rm = _RET.match(ret_text)
        if not rm or rm.group(1) == "?":
            return
        ret = int(rm.group(1), 0)
        if ret < 0:
            return
        handler = getattr(self, "_" + call, None)
        if handler is not None:
            handler(tid, args, ret, rm.group(2))

    # --- descriptors
    def _open_common(self, tid, dirfd, dirpath, path: bytes, flags: str, ret: int) -> None:
        res = self._resolve(tid, dirfd, dirpath, path)
        fl = set(flags.split("|"))
        if res[0] == "out":
            desc = Desc(None, res[1])
        else:
            if res[0] == "root":
                inode = self.live.root
            else:
                _, parent, name, inode = res
                if parent is None and name is None and inode is None:
                    raise Unsupported(f"open of a path whose folder the model does not have: {path!r}")
                if inode is None:
                    if "O_CREAT" not in fl:
                        raise Unsupported(f"open of a missing file without O_CREAT succeeded: {path!r}")
                    if "O_TMPFILE" in flags:
                        raise Unsupported("O_TMPFILE")
                    inode = self._new("f")
                    self._op(kind="ns", assigns=((parent, name, inode, None),))
                elif ("O_TRUNC" in fl and self.live.kind[inode] == "f" and "O_RDONLY" not in fl
                      and self.live.data[inode]):
                    self._op(kind="data", inode=inode, size=0)
            desc = Desc(inode, "")
        desc.append = "O_APPEND" in fl
        self._table(tid)[ret] = [desc, "O_CLOEXEC" in fl]

    def _openat(self, tid, args, ret, _):
        dirfd, dirpath = _fd(args[0])
        self._open_common(tid, dirfd, dirpath, _str(args[1]), args[2], ret)

    def _open(self, tid, args, ret, _):
        self._open_common(tid, "AT_FDCWD", None, _str(args[0]), args[1], ret)

    def _creat(self, tid, args, ret, _):
        self._open_common(tid, "AT_FDCWD", None, _str(args[0]), "O_WRONLY|O_CREAT|O_TRUNC", ret)

    def _close(self, tid, args, ret, _):
        self._table(tid).pop(_fd(args[0])[0], None)

    def _dup_to(self, tid, old, new, cloexec=False):
        t = self._table(tid)
        if old in t:
            t[new] = [t[old][0], cloexec]

    def _dup(self, tid, args, ret, _):
        self._dup_to(tid, _fd(args[0])[0], ret)

    def _dup2(self, tid, args, ret, _):
        self._dup_to(tid, _fd(args[0])[0], ret)

    def _dup3(self, tid, args, ret, _):
        self._dup_to(tid, _fd(args[0])[0], ret, "O_CLOEXEC" in args[2])

    def _fcntl(self, tid, args, ret, _):
        fd = _fd(args[0])[0]
        if args[1].startswith("F_DUPFD"):
            self._dup_to(tid, fd, ret, args[1] == "F_DUPFD_CLOEXEC")
        elif args[1] == "F_SETFD" and fd in self._table(tid):
            self._table(tid)[fd][1] = "FD_CLOEXEC" in args[2]

    def _lseek(self, tid, args, ret, _):
        d = self._table(tid).get(_fd(args[0])[0])
        if d:
            d[0].pos = ret

    def _read(self, tid, args, ret, _):
        d = self._table(tid).get(int(args[0], 0))
        if d:
            d[0].pos += ret

    _readv = _read

    def _desc(self, tid, tok) -> Desc | None:
        d = self._table(tid).get(_fd(tok)[0])
        return d[0] if d else None

    def _write(self, tid, args, ret, _):
        d = self._desc(tid, args[0])
        if d:
            self._put(d, _str(args[1])[:ret], None)

    def _writev(self, tid, args, ret, _):
        d = self._desc(tid, args[0])
        if d:
            self._put(d, _iov(args[1])[:ret], None)

    def _pwrite64(self, tid, args, ret, _):
        d = self._desc(tid, args[0])
        if d:
            self._put(d, _str(args[1])[:ret], _int(args[3]))

    def _pwritev(self, tid, args, ret, _):
        d = self._desc(tid, args[0])
        if d:
            off = _int(args[3])
            self._put(d, _iov(args[1])[:ret], None if off == -1 else off)

    _pwritev2 = _pwritev

    def _copy(self, tid, src_tok: str, src_off: str, dst_tok: str, dst_off: str | None, n: int) -> None:
        """copy_file_range/sendfile: the bytes come from the source (the model's or the real file)."""
        src, dst = self._desc(tid, src_tok), self._desc(tid, dst_tok)
        if dst is None or dst.inode is None or n == 0:
            return
        if src is None:
            raise Unsupported(f"{self.call} from an unknown descriptor")
        off_in = _ptr_value(src_off)
        payload = self._source_bytes(src, src.pos if off_in is None else off_in, n)
        if off_in is None:
            src.pos += n
        self._put(dst, payload, None if dst_off is None else _ptr_value(dst_off))

    def _copy_file_range(self, tid, args, ret, _):
        self._copy(tid, args[0], args[1], args[2], args[3], ret)

    def _sendfile(self, tid, args, ret, _):
        self._copy(tid, args[1], args[2], args[0], None, ret)

    def _splice(self, tid, args, ret, _):
        for tok in (args[0], args[2]):
            d = self._desc(tid, tok)
            if d is not None and d.inode is not None:
                raise Unsupported("splice into or out of a file in the tree")

    def _ftruncate(self, tid, args, ret, _):
        d = self._desc(tid, args[0])
        if d and d.inode is not None:
            self._op(kind="data", inode=d.inode, size=_int(args[1]))

    def _truncate(self, tid, args, ret, _):
        res = self._resolve(tid, "AT_FDCWD", None, _str(args[0]))
        if res[0] == "in" and res[3] is not None:
            self._op(kind="data", inode=res[3], size=_int(args[1]))

    def _fallocate(self, tid, args, ret, _):
        d = self._desc(tid, args[0])
        if d is None or d.inode is None:
            return
        mode, off, n = args[1], _int(args[2]), _int(args[3])
        if mode in ("0",):
            size = len(self.live.data[d.inode])
            if off + n > size:
                self._op(kind="data", inode=d.inode, size=off + n)
        elif "KEEP_SIZE" not in mode or "PUNCH_HOLE" in mode or "ZERO_RANGE" in mode:
            raise Unsupported(f"fallocate mode {mode}")

    def _fsync(self, tid, args, ret, _):
        d = self._desc(tid, args[0])
        if d and d.inode is not None:
            self._op(kind="sync", inode=d.inode)

    _fdatasync = _fsync

    def _syncfs(self, tid, args, ret, _):
        self._op(kind="sync", inode=None)

    def _sync(self, tid, args, ret, _):
        self._op(kind="sync", inode=None)

    def _mmap(self, tid, args, ret, _):
        if len(args) >= 5 and "PROT_WRITE" in args[2] and "MAP_SHARED" in args[3]:
            d = self._desc(tid, args[4])
            if d is not None and d.inode is not None:
                raise Unsupported("a shared writable memory map of a file in the tree: its writes cannot be seen")

    # --- processes
    def _clone_common(self, tid, flags: str, child: int) -> None:
        parent = self._table(tid)
        early = self.tables.get(child, {})  # lines the child printed before this one
        if "CLONE_FILES" in flags:
            parent.update(early)
            self.tables[child] = parent
        else:
            self.tables[child] = {fd: [d, c] for fd, (d, c) in parent.items()}
            self.tables[child].update(early)
        self.cwd.setdefault(child, self.cwd.get(tid, self.first_cwd))

    def _clone(self, tid, args, ret, _):
        flags = next((a for a in args if a.startswith("flags=")), "")
        self._clone_common(tid, flags, ret)

    def _clone3(self, tid, args, ret, _):
        self._clone_common(tid, args[0], ret)

    def _fork(self, tid, args, ret, _):
        self._clone_common(tid, "", ret)

    _vfork = _fork

    def _execve(self, tid, args, ret, _):
        t = self._table(tid)
        for fd in [fd for fd, (_, c) in t.items() if c]:
            del t[fd]

    def _chdir(self, tid, args, ret, _):
        self.cwd[tid] = os.path.normpath(os.path.join(self.cwd.get(tid, self.first_cwd), os.fsdecode(_str(args[0]))))

    def _fchdir(self, tid, args, ret, _):
        _, path = _fd(args[0])
        if path:
            self.cwd[tid] = path

    # --- names
    def _entry(self, tid, dirtok: str | None, pathtok: str):
        dirfd, dirpath = _fd(dirtok) if dirtok is not None else ("AT_FDCWD", None)
        return self._resolve(tid, dirfd, dirpath, _str(pathtok))

    def _in(self, res, what: str):
        if res[0] == "root":
            raise Unsupported(f"{self.call} of the traced folder itself")
        if res[0] == "in" and res[1] is None:
            raise Unsupported(f"{self.call}: {what} in a folder the model does not have")
        return res[0] == "in"

    def _mkdir_common(self, tid, dirtok, pathtok):
        res = self._entry(tid, dirtok, pathtok)
        if self._in(res, "mkdir"):
            self._op(kind="ns", assigns=((res[1], res[2], self._new("d"), None),))

    def _mkdir(self, tid, args, ret, _):
        self._mkdir_common(tid, None, args[0])

    def _mkdirat(self, tid, args, ret, _):
        self._mkdir_common(tid, args[0], args[1])

    def _symlink_common(self, tid, target: bytes, dirtok, pathtok):
        res = self._entry(tid, dirtok, pathtok)
        if self._in(res, "symlink"):
            n = self._new("l")
            self.live.target[n] = target
            self._op(kind="ns", assigns=((res[1], res[2], n, None),))

    def _symlink(self, tid, args, ret, _):
        self._symlink_common(tid, _str(args[0]), None, args[1])

    def _symlinkat(self, tid, args, ret, _):
        self._symlink_common(tid, _str(args[0]), args[1], args[2])

    def _unlink_common(self, tid, dirtok, pathtok):
        res = self._entry(tid, dirtok, pathtok)
        if self._in(res, "unlink") and res[3] is not None:
            self._op(kind="ns", assigns=((res[1], res[2], None, res[3]),))

    def _unlink(self, tid, args, ret, _):
        self._unlink_common(tid, None, args[0])

    def _rmdir(self, tid, args, ret, _):
        self._unlink_common(tid, None, args[0])

    def _unlinkat(self, tid, args, ret, _):
        self._unlink_common(tid, args[0], args[1])

    def _link_common(self, tid, odir, opath, ndir, npath):
        src, dst = self._entry(tid, odir, opath), self._entry(tid, ndir, npath)
        if not self._in(dst, "link"):
            return
        if not self._in(src, "link") or src[3] is None:
            raise Unsupported("a hard link into the tree of a file from outside it")
        self._op(kind="ns", assigns=((dst[1], dst[2], src[3], None),))

    def _link(self, tid, args, ret, _):
        self._link_common(tid, None, args[0], None, args[1])

    def _linkat(self, tid, args, ret, _):
        self._link_common(tid, args[0], args[1], args[2], args[3])

    def _rename_common(self, tid, odir, opath, ndir, npath, flags: str = "0"):
        src, dst = self._entry(tid, odir, opath), self._entry(tid, ndir, npath)
        src_in, dst_in = self._in(src, "rename"), self._in(dst, "rename")
        if not src_in and not dst_in:
            return
        if not src_in:
            raise Unsupported("a rename into the tree from outside it")
        x, y = src[3], (dst[3] if dst_in else None)
        if x is None:
            raise Unsupported("a rename of a name the model does not have")
        if not dst_in:
            self._op(kind="ns", assigns=((src[1], src[2], None, x),))
            return
        if "RENAME_EXCHANGE" in flags:
            self._op(kind="ns", assigns=((src[1], src[2], y, x), (dst[1], dst[2], x, y)))
        elif x != y:
            self._op(kind="ns", assigns=((src[1], src[2], None, x), (dst[1], dst[2], x, y)))

    def _rename(self, tid, args, ret, _):
        self._rename_common(tid, None, args[0], None, args[1])

    def _renameat(self, tid, args, ret, _):
        self._rename_common(tid, args[0], args[1], args[2], args[3])

    def _renameat2(self, tid, args, ret, _):
        self._rename_common(tid, args[0], args[1], args[2], args[3], args[4])


def record(argv: list[str], root: Path, *, cwd: Path, env: dict | None = None, trace: Path | None = None,
           timeout: float = 600) -> Recording:
    """Run ``argv`` under strace and return what it did to the tree under ``root``.

    The real tree after the run must equal the model's replay of the recording (else
    :class:`Unsupported` names the difference)."""
    root = Path(os.path.abspath(root))
    initial, initial_ids = snapshot(root)
    trace = trace or (Path(cwd) / "strace.out")
    base = ["strace", "-f", "-qq", "-o", str(trace), "-y", "-xx", "-s", str(STRING_LIMIT),
            "-e", "raw=" + ",".join(RAW), "-e", "signal=none", "-e", "trace=" + ",".join(CALLS)]
    proc = None
    for extra in (["--seccomp-bpf"], []):  # seccomp-bpf: untraced calls run at full speed
        proc = subprocess.run(base + extra + ["--", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if not (extra and "seccomp" in proc.stderr and proc.returncode != 0):
            break
    if not trace.exists():
        raise Unsupported(f"strace did not run: {proc.stderr.strip()[:300]}")
    first_id = max(initial.kind) + 1
    rep = _Replayer(root, initial, first_id, os.path.abspath(cwd))
    for c in calls(trace):
        rep.feed(*c)
    final, final_ids = snapshot(root, itertools.count(10**9))
    diffs = same_tree(rep.live, final)
    if diffs:
        raise Unsupported("the replayed recording does not end as the real tree: " + "; ".join(diffs[:8]))
    by_path_final = dict(final.walk())
    after = {final_ids[by_path_final[path]]: n for path, n in rep.live.walk()}  # under their model ids
    after[final_ids[final.root]] = rep.live.root
    live = rep.live
    frozen = Image(root=live.root, kind=dict(live.kind), entries={k: dict(v) for k, v in live.entries.items()},
                   data={k: bytes(v) for k, v in live.data.items()}, target=dict(live.target))
    return Recording(root=root, initial=initial, final=frozen, ops=rep.ops,
                     initial_ids={real: n for n, real in initial_ids.items()}, final_ids=after,
                     returncode=proc.returncode, stderr=proc.stderr, kinds=dict(live.kind))


# --- crash states ----------------------------------------------------------------------------

@dataclass
class CrashState:
    point: int                 # the power is cut after this many recorded operations
    namespace: frozenset[int]  # the pending name changes that were persisted (op indices)
    variant: str               # which pending data was persisted ("kept", "lost", "inode 7 torn ...")
    image: Image

    def __str__(self) -> str:
        return f"after op {self.point}, pending name changes persisted {sorted(self.namespace)}, data {self.variant}"


class Crashes:
    """The crash states of a recording (see the module docstring for the model).

    ``cap``: up to this many pending name changes, every allowed subset; beyond, ALICE's bounded set."""

    def __init__(self, rec: Recording, cap: int = 10):
        self.rec, self.cap = rec, cap
        self.ops = rec.ops
        self.ns = [op for op in self.ops if op.kind == "ns"]
        self._deps = self._dependencies()
        self._digests: dict[tuple, str] = {}
        self.bounded_points = 0  # crash points with more pending changes than ``cap``
        self._by_inode: dict[int, list[Op]] = {}
        for op in self.ops:
            if op.kind == "data":
                self._by_inode.setdefault(op.inode, []).append(op)

    def _dependencies(self) -> dict[int, set[int]]:
        """For each name change, the earlier ones it cannot be persisted without."""
        kinds = self.rec.kinds
        info = []
        seen = set(self.rec.initial.kind)
        for op in self.ns:
            keys, parents, added_to, created, removed = set(), set(), set(), set(), set()
            news = {w for _, _, w, _ in op.assigns if w is not None}
            for d, name, new, old in op.assigns:
                keys.add(("e", d, name))  # the same name: program order
                parents.add(d)
                if new is not None:
                    added_to.add(d)
                    keys.add(("i", new))  # the same file moved again: program order
                    if kinds.get(new) == "d" and new not in seen:
                        created.add(new)
                if old is not None:
                    keys.add(("i", old))
                    if kinds.get(old) == "d" and old not in news:
                        removed.add(old)
            seen |= news
            info.append((op.index, keys, parents, added_to, created, removed))
        deps: dict[int, set[int]] = {}
        for j, (jx, keys_j, _, added_j, _, removed_j) in enumerate(info):
            deps[jx] = {ix for ix, keys_i, parents_i, _, created_i, _ in info[:j]
                        # same name or file; an entry in a folder only with its mkdir; a folder's
                        # removal only with the removal of its entries
                        if keys_i & keys_j or created_i & added_j or parents_i & removed_j}
        return deps

    def _closure(self, ops: Iterable[int]) -> set[int]:
        out, todo = set(), list(ops)
        while todo:
            i = todo.pop()
            if i not in out:
                out.add(i)
                todo.extend(self._deps.get(i, ()))
        return out

    def timeline(self) -> list[tuple[frozenset[int], dict[int, int]]]:
        """For each crash point 0..len(ops): (the name changes durable, for each file the index of
        its last durable data operation)."""
        ns_durable: set[int] = set()
        data_durable: dict[int, int] = {}
        out = [(frozenset(), {})]
        for s in self.ops:
            if s.kind == "sync":
                before = [op for op in self.ops[:s.index] if op.exit < s.entry]
                if s.inode is None or self.rec.kinds.get(s.inode) == "d":
                    ns_durable |= self._closure(
                        op.index for op in before if op.kind == "ns"
                        and (s.inode is None or any(d == s.inode for d, _, _, _ in op.assigns)))
                if s.inode is None or self.rec.kinds.get(s.inode) == "f":
                    for op in before:
                        if op.kind == "data" and (s.inode is None or op.inode == s.inode):
                            data_durable[op.inode] = max(data_durable.get(op.inode, -1), op.index)
            out.append((frozenset(ns_durable), dict(data_durable)))
        return out

    def namespaces(self, point: int, durable: frozenset[int]) -> list[frozenset[int]]:
        """The sets of pending name changes a crash after ``point`` operations may persist."""
        pending = [op.index for op in self.ns if op.index < point and op.index not in durable]
        pset = set(pending)
        deps = {j: self._deps[j] & pset for j in pending}
        if len(pending) <= self.cap:
            ideals: list[frozenset[int]] = [frozenset()]
            for j in pending:
                ideals += [s | {j} for s in ideals if deps[j] <= s]
            return ideals

        self.bounded_points += 1

        def down(ops: Iterable[int]) -> frozenset[int]:
            return frozenset(self._closure(ops) & pset)

        # ALICE's bounded exploration: prefixes, each change dropped (with what needs it), each
        # change alone (with what it needs), each prefix plus one later change
        dependents = {j: {k for k in pending if j in self._closure([k])} for j in pending}
        out = {frozenset(pending[:t]) for t in range(len(pending) + 1)}
        out |= {frozenset(pset - dependents[j]) for j in pending}
        out |= {down([j]) for j in pending}
        out |= {frozenset(pending[:t]) | down([j]) for t in range(len(pending)) for j in pending[t + 1:]}
        return sorted(out, key=lambda s: (len(s), sorted(s)))

    def data_ops(self, inode: int, point: int) -> list[Op]:
        return [op for op in self._by_inode.get(inode, ()) if op.index < point]

    def build(self, point: int, namespace: frozenset[int], durable: frozenset[int],
              choice: dict[int, list[Op]] | None = None) -> Image:
        """The tree after a crash: the durable name changes and ``namespace`` applied in program
        order; each file's bytes from ``choice[inode]`` (default: every write before ``point``)."""
        init = self.rec.initial
        img = Image(root=init.root, kind=self.rec.kinds, entries={k: dict(v) for k, v in init.entries.items()},
                    target={**init.target, **self.rec.final.target})
        for n, k in self.rec.kinds.items():
            if k == "d":
                img.entries.setdefault(n, {})
        for op in self.ns:
            if op.index >= point:
                break
            if op.index in durable or op.index in namespace:
                for d, name, new, _ in op.assigns:
                    if new is None:
                        img.entries[d].pop(name, None)
                    else:
                        img.entries[d][name] = new
        img.data = _LazyData(self, point, choice or {})
        return img

    def content(self, inode: int, ops: list[Op]) -> bytes:
        buf = bytearray(self.rec.initial.data.get(inode, b""))
        for op in ops:
            if op.size is not None:
                del buf[op.size:]
                buf.extend(b"\0" * (op.size - len(buf)))
            else:
                if len(buf) < op.offset:
                    buf.extend(b"\0" * (op.offset - len(buf)))
                buf[op.offset:op.offset + len(op.payload)] = op.payload
        return bytes(buf)

    def digest(self, inode: int, ops: list[Op]) -> str:
        key = (inode, tuple((op.index, op.size, len(op.payload)) for op in ops))
        if key not in self._digests:
            self._digests[key] = hashlib.sha256(self.content(inode, ops)).hexdigest()
        return self._digests[key]

    def variants(self, point: int, inodes: Iterable[int], data_durable: dict[int, int]
                 ) -> list[tuple[str, dict[int, list[Op]]]]:
        """Data variants for the files ``inodes`` (those the checks look at): (label, {inode: the
        data operations persisted}); the other files keep every write."""
        pending: dict[int, tuple[list[Op], list[Op]]] = {}
        for n in sorted(set(inodes)):
            ops = self.data_ops(n, point)
            last = data_durable.get(n, -1)
            done, todo = [op for op in ops if op.index <= last], [op for op in ops if op.index > last]
            if todo:
                pending[n] = (done, todo)
        if not pending:
            return [("kept", {})]
        out = [("kept", {}), ("all pending writes lost", {n: done for n, (done, _) in pending.items()})]
        for n, (done, todo) in pending.items():
            mid = len(todo) // 2
            cut = todo[mid]
            if cut.size is None and len(cut.payload) > 1:
                torn = Op(**{**cut.__dict__, "payload": cut.payload[:len(cut.payload) // 2]})
                out.append((f"inode {n} torn in op {cut.index}", {n: done + todo[:mid] + [torn]}))
            if len(todo) > 1:
                out.append((f"inode {n} without op {todo[0].index}", {n: done + todo[1:]}))
            out.append((f"inode {n} pending writes lost", {n: done}))
        return out

    def states(self, relevant: Callable[[Image], Iterable[int]]) -> Iterator[CrashState]:
        """Every crash state; data variants for the files ``relevant(tree)`` names."""
        for point, (ns_durable, data_durable) in enumerate(self.timeline()):
            for namespace in self.namespaces(point, ns_durable):
                base = self.build(point, namespace, ns_durable)
                for label, choice in self.variants(point, relevant(base), data_durable):
                    img = self.build(point, namespace, ns_durable, choice) if choice else base
                    yield CrashState(point, namespace, label, img)


class _LazyData(dict):
    """A crash state's file bytes, computed when asked for; digests from the recording's cache."""

    def __init__(self, crashes: Crashes, point: int, choice: dict[int, list[Op]]):
        super().__init__()
        self.crashes, self.point, self.choice = crashes, point, choice

    def _ops(self, inode: int) -> list[Op]:
        return self.choice[inode] if inode in self.choice else self.crashes.data_ops(inode, self.point)

    def __missing__(self, inode: int) -> bytes:
        return self.crashes.content(inode, self._ops(inode))

    def digest(self, inode: int) -> str:
        return self.crashes.digest(inode, self._ops(inode))


def materialize(img: Image, dest: Path) -> dict[int, tuple[int, int]]:
    """Write the tree ``img`` holds at ``dest`` (which must not exist); return each inode's new
    real (st_dev, st_ino). Hard links stay hard links."""
    os.mkdir(dest)
    placed: dict[int, str] = {img.root: os.fspath(dest)}
    for rel, n in img.walk():
        p = os.path.join(dest, rel)
        if n in placed and img.kind[n] != "d":
            os.link(placed[n], p)
            continue
        k = img.kind[n]
        if k == "d":
            os.mkdir(p)
        elif k == "l":
            os.symlink(img.target[n], p)
        else:
            with open(p, "wb") as f:
                f.write(img.data[n])
        placed[n] = p
    ids = {}
    for n, p in placed.items():
        st = os.lstat(p)
        ids[n] = (st.st_dev, st.st_ino)
    return ids
