"""The storage layer: local paths and fsspec URLs (``s3://``, ``gs://``, ``hf://``, ``memory://``).

Only this module, :mod:`convert.outputs` and :mod:`convert.fileio` know whether a path is local. Remote paths go
through fsspec (the file-system layer that s3fs, gcsfs, adlfs and ``huggingface_hub``
implement; ``pip install 'ckpt-convert[remote]'``); a local path, or a ``file://`` URL, never
imports it.

Why a small path class of our own (:class:`RemotePath`) and not ``universal_pathlib``: an
output must know every object its writer opened, so that a failure aborts their uploads and
removes what was completed, and it must hold the commit object back until the data objects
are complete; errors must name the object with no credential in them. That is a few dozen
lines over fsspec's own file objects and their transaction protocol (``autocommit=False``,
``commit()``, ``discard()``), which s3fs, gcsfs, adlfs and fsspec's local and memory
file systems implement.

Credentials come the usual way: the backend's own chain (for S3: ``AWS_*`` environment
variables, ``~/.aws`` profiles, instance roles; ``AWS_ENDPOINT_URL`` for an S3-compatible
server), and storage options, from ``--storage-options JSON`` (:func:`configure`) or the
``CONVERT_STORAGE_OPTIONS`` environment variable: either one object given to every file
system (``{"profile": "exports"}``) or one object per protocol (``{"s3": {...}, "gs": {...}}``).
They are never printed: every message of this layer goes through :func:`redact`, which
removes the values of secret-looking options and environment variables, the user and
password of URLs and signed-URL query parameters; the CLI passes every error line through it.

Design: how remote paths flow through the adapters with the least change
-------------------------------------------------------------------------
Adapters take a ``Path`` today. They will take what :func:`as_path` returns: a
``pathlib.Path`` for a local path, a :class:`RemotePath` for a URL. Both have the pathlib
methods adapters use (``/``, ``name``, ``parent``, ``open``, ``read_bytes``, ``read_text``,
``write_bytes``, ``write_text``, ``exists``, ``is_file``, ``is_dir``, ``iterdir``, ``glob``,
``stat().st_size``, ``mkdir``), so phase 2 is mostly mechanical in each adapter:

* ``open(p, "rb")``/``os.path.isfile(s)``/``glob.glob``/``os.path.getsize`` become the
  path's own methods (``p.open("rb")``, ``p.is_file()``, ``p.parent.glob(...)``,
  ``p.stat().st_size``); string paths (``prefix + ".index"``) become ``p.with_name(...)``;
* ``FileRegion(str(path), ...)`` becomes ``storage.region(path, ...)``: a
  :class:`~convert.ir.FileRegion` for a local file, a :class:`RemoteRegion` for an object.
  A RemoteRegion reads its bytes by ranged GETs of :data:`REMOTE_RANGE` bytes, up to
  :data:`REMOTE_PARALLEL` in flight, in order: memory stays bounded (never the whole model
  on local disk or in memory first), and every checksum the file stores is checked on the
  way as for a local region. A tensor that is only renamed is copied in those large ranges
  straight into the output's upload (no NumPy).
* Header reads (a safetensors header, an SSTable footer and index) use ``p.open("rb")``,
  whose fsspec file fetches read-ahead blocks, so seeking around a header costs a few GETs.
* Writers write through ``path.open("wb")`` as they do through a local path. On a
  :class:`RemotePath` given by :func:`atomic_output` each opened file is an upload
  (a multipart upload on S3) that is *not completed* when the writer closes it.

Atomic outputs on object storage (no rename there) are :mod:`convert.outputs`' part: a RemotePath
writes only inside one (its ``_output``, an :class:`Output`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat as stat_module
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol, cast

import google_crc32c

from .errors import ConvertError, CorruptFileError, MissingDependencyError, ReadError, UsageError, WriteError
from .ir import CHUNK, Checksums, FileRegion

REMOTE_RANGE = 16 << 20
"""Bytes per ranged GET of a tensor's data."""
REMOTE_PARALLEL = 4
"""Ranged GETs in flight per region (memory: REMOTE_PARALLEL x REMOTE_RANGE at most)."""
PART_SIZE = 64 << 20
"""Bytes per part of a multipart upload (S3 wants at least 5 MiB but for the last)."""
HEADER_BLOCK = 1 << 20
"""Read-ahead block of a remote file opened for reading (headers, indexes)."""
RANGE_GAP = 64 << 10
"""Ranges of :meth:`RemotePath.read_ranges` closer than this are fetched in one GET."""
ENV_OPTIONS = "CONVERT_STORAGE_OPTIONS"

_URL = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.\-]*)://")
_configured: dict[str, Any] = {}


# ------------------------------------------------------------------ what is remote

def protocol(path: os.PathLike | str | RemotePath) -> str | None:
    """The URL scheme of ``path`` (``"s3"``), or None for a local path (``file://`` included)."""
    if isinstance(path, RemotePath):
        return path.protocol
    if not isinstance(path, str):
        return None
    m = _URL.match(path)
    if m is None or m["protocol"].lower() in ("file", "local"):
        return None
    return m["protocol"].lower()


def is_remote(path: os.PathLike | str | RemotePath) -> bool:
    return protocol(path) is not None


def local(path: os.PathLike | str) -> Path:
    """A local path (a ``file://`` URL stripped)."""
    s = os.fspath(path)
    m = _URL.match(s)
    return Path(s[m.end():] if m else s)


def as_path(path: os.PathLike | str | RemotePath) -> Path | RemotePath:
    """``pathlib.Path`` for a local path, :class:`RemotePath` for a URL."""
    if isinstance(path, RemotePath):
        return path
    return RemotePath(os.fspath(path)) if is_remote(path) else local(path)


def join(base: os.PathLike | str, *parts: str) -> str:
    """``base/part/...`` for a URL or a local path, as a string."""
    if is_remote(base):
        return str(as_path(base).joinpath(*parts))
    return str(Path(base).joinpath(*parts))


# ------------------------------------------------------------------ options and secrets

def configure(options: Mapping[str, Any] | str | None) -> None:
    """Set the storage options of this process (``--storage-options``): a mapping or its JSON."""
    global _configured
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError as e:
            raise UsageError(f"--storage-options is not valid JSON ({e.msg})") from None
    if options is not None and not isinstance(options, Mapping):
        raise UsageError("--storage-options must be a JSON object")
    _configured = dict(options or {})


def configured() -> dict[str, Any]:
    """The options :func:`configure` set (for handing to worker processes)."""
    return dict(_configured)


def _env_options() -> dict[str, Any]:
    text = os.environ.get(ENV_OPTIONS)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{ENV_OPTIONS} is not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{ENV_OPTIONS} must be a JSON object")
    return value


_PROTOCOL_KEYS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "adl", "hf", "memory", "http", "https", "ftp", "sftp"}


def options_for(proto: str) -> dict[str, Any]:
    """The storage options for ``proto``: the environment's, then ``--storage-options``, each
    either one object for every protocol or one per protocol."""
    out: dict[str, Any] = {}
    for source in (_env_options(), _configured):
        if source and all(k in _PROTOCOL_KEYS and isinstance(v, dict) for k, v in source.items()):
            aliases = {"s3a": "s3", "gcs": "gs", "abfs": "az"}
            source = {k: v for k, v in source.items() if aliases.get(k, k) == aliases.get(proto, proto)}
            for v in source.values():
                out.update(v)
        else:
            out.update(source)
    return out


_SECRET_KEY = re.compile(r"(secret|token|passw|credential|key|sas|signature|auth)", re.I)
_SECRET_ENV = re.compile(r"(SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY|ACCOUNT_KEY|SAS|_KEY_ID|API_KEY)")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"]+@")
_SIGNED_QUERY = re.compile(r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|"
                           r"token|access_token|awsaccesskeyid|key|se|sp|sv)=)[^&\s'\"]+")


def _secret_values(options: Any, key: str = "") -> Iterator[str]:
    if isinstance(options, Mapping):
        for k, v in options.items():
            yield from _secret_values(v, str(k))
    elif isinstance(options, (list, tuple)):
        for v in options:
            yield from _secret_values(v, key)
    elif isinstance(options, str) and _SECRET_KEY.search(key) and len(options) >= 4:
        yield options


def secrets() -> list[str]:
    """Every secret-looking value this process knows (options and environment), longest first."""
    values = set(_secret_values(_configured))
    with contextlib.suppress(UsageError):
        values.update(_secret_values(_env_options()))
    values.update(v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 4)
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` without credentials: secret values, URL passwords, signed-URL parameters."""
    for value in secrets():
        if value in text:
            text = text.replace(value, "***")
    text = _USERINFO.sub(lambda m: m["scheme"] + "***@", text)
    return _SIGNED_QUERY.sub(lambda m: m.group(1) + "***", text)


def _message(e: BaseException) -> str:
    """One redacted line for a backend's exception."""
    if isinstance(e, FileNotFoundError):
        return "no such file or object"
    if isinstance(e, PermissionError):
        return "access denied (check the credentials: environment, profile or --storage-options)"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return redact(" ".join(str(text).split()))


# ------------------------------------------------------------------ file systems

_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "adl": "adlfs", "hf": "huggingface_hub"}


def filesystem(url: str):
    """``(fsspec file system, path inside it)`` for ``url``; the extra to install when missing."""
    proto = protocol(url)
    if proto is None:
        raise ValueError(f"not a URL: {url}")
    try:
        import fsspec
    except ImportError:
        raise MissingDependencyError(f"{proto}:// paths", "fsspec", "remote") from None
    try:
        cls = fsspec.get_filesystem_class(proto)
    except ImportError:
        raise MissingDependencyError(f"{proto}:// paths", _BACKENDS.get(proto, proto), "remote") from None
    except ValueError:
        raise UsageError(f"{redact(url)}: unknown storage protocol '{proto}'") from None
    try:
        fs = cls(**options_for(proto))
    except Exception as e:  # a bad option: the backend's own message, redacted
        raise UsageError(f"{proto}:// storage options: {_message(e)}") from None
    return fs, cls._strip_protocol(url)


@dataclass(frozen=True)
class Stat:
    """What :meth:`RemotePath.stat` tells (the fields adapters use)."""

    st_size: int
    st_mode: int
    st_mtime: float = 0.0
    etag: str | None = None


class Output(Protocol):
    """What a RemotePath writes through: the output being made (:class:`convert.outputs.RemoteOutput`)."""

    def open(self, target: RemotePath, mode: str) -> Any: ...  # a file-like upload


class RemotePath:
    """A file or folder in an fsspec file system, with the pathlib methods adapters use.

    Deliberately not ``os.PathLike``: a local call (``os.open``, ``open``) on it fails loudly
    instead of creating a local file named ``s3:/...``.
    """

    __slots__ = ("fs", "path", "protocol", "_output")

    def __init__(self, url: str, *, fs=None, path: str | None = None, output: Output | None = None):
        self.protocol = protocol(url) or "file"
        if fs is None:
            fs, path = filesystem(url)
        self.fs, self.path = fs, (path if path is not None else url).rstrip("/") or "/"
        self._output = output

    # --- names
    def _child(self, path: str) -> RemotePath:
        return RemotePath(self.protocol + "://", fs=self.fs, path=path, output=self._output)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name: str) -> RemotePath:
        return self.joinpath(name)

    def joinpath(self, *parts: str) -> RemotePath:
        return self._child("/".join([self.path, *(p.strip("/") for p in parts)]))

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def parent(self) -> RemotePath:
        return self._child(str(PurePosixPath(self.path).parent))

    @property
    def parents(self) -> list[RemotePath]:
        return [self._child(str(p)) for p in PurePosixPath(self.path).parents]

    def with_name(self, name: str) -> RemotePath:
        return self._child(str(PurePosixPath(self.path).with_name(name)))

    def relative_to(self, other: RemotePath) -> str:
        return str(PurePosixPath(self.path).relative_to(other.path))

    # --- queries
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConvertError:
            raise
        except Exception as e:  # backends raise OSError, botocore and aiohttp errors...
            cls = WriteError if what == "write" else ReadError
            raise cls(redact(str(self)), _message(e)) from None

    def info(self) -> dict:
        return self._call("read", self.fs.info, self.path)

    def exists(self) -> bool:
        return bool(self._call("read", self.fs.exists, self.path))

    def is_file(self) -> bool:
        return bool(self._call("read", self.fs.isfile, self.path))

    def is_dir(self) -> bool:
        return bool(self._call("read", self.fs.isdir, self.path))

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> Stat:
        info = self.info()
        mode = stat_module.S_IFDIR if info.get("type") == "directory" else stat_module.S_IFREG
        mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or 0
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        return Stat(int(info.get("size") or 0), mode, float(mtime or 0), etag)

    def iterdir(self) -> Iterator[RemotePath]:
        entries = self._call("read", self.fs.ls, self.path, detail=False)
        for p in sorted(entries):
            p = p.rstrip("/")
            if p != self.path:
                yield self._child(p)

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        for p in sorted(self._call("read", self.fs.glob, self.path + "/" + pattern)):
            yield self._child(p.rstrip("/"))

    def files(self) -> list[tuple[RemotePath, Stat]]:
        """Every file under this folder (recursively) with its :class:`Stat`."""
        found = self._call("read", self.fs.find, self.path, detail=True)
        out = []
        for p, info in sorted(found.items()):
            child = self._child(p)
            mtime = info.get("LastModified") or info.get("mtime") or 0
            out.append((child, Stat(int(info.get("size") or 0), stat_module.S_IFREG,
                                    mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime or 0),
                                    info.get("ETag") or info.get("etag") or info.get("md5Hash"))))
        return out

    # --- reading
    def open(self, mode: str = "rb", **kwargs) -> BinaryIO:
        if "r" in mode:
            if "b" not in mode:
                raise ValueError("remote files open in binary mode")
            return self._call("read", self.fs.open, self.path, "rb", block_size=kwargs.pop("block_size", HEADER_BLOCK),
                              cache_type="readahead", **kwargs)
        if self._output is None:
            raise WriteError(redact(str(self)), "remote outputs are written through outputs.atomic_output only")
        # the upload is written as a file (write, tell, flush, close), not a whole BinaryIO
        return cast(BinaryIO, self._output.open(self, mode))

    def read_bytes(self) -> bytes:
        return self._call("read", self.fs.cat_file, self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        data = self.read_bytes()
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as e:
            raise CorruptFileError(redact(str(self)), f"not {encoding} text ({e.reason})") from None

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` in one GET (fewer when the object is shorter)."""
        if end <= start:
            return b""
        return self._call("read", self.fs.cat_file, self.path, start=start, end=end)

    def read_ranges(self, ranges: Iterable[tuple[int, int]]) -> list[bytes]:
        """Bytes ``[start, end)`` of each range, the GETs concurrent (``fs.cat_ranges``) and ranges
        less than :data:`RANGE_GAP` apart fetched in one: the small headers a zip archive keeps
        before each member cost one round trip together, not one each."""
        ranges = list(ranges)
        groups: list[list] = []  # [start, end, indices]
        for i in sorted(range(len(ranges)), key=lambda i: ranges[i][0]):
            a, b = ranges[i]
            if groups and a - groups[-1][1] <= RANGE_GAP and max(b, groups[-1][1]) - groups[-1][0] <= REMOTE_RANGE:
                groups[-1][1] = max(groups[-1][1], b)
                groups[-1][2].append(i)
            else:
                groups.append([a, b, [i]])
        if not groups:
            return []
        got = self._call("read", self.fs.cat_ranges, [self.path] * len(groups), [g[0] for g in groups],
                         [g[1] for g in groups], on_error="raise")
        out = [b""] * len(ranges)
        for (start, _, indices), data in zip(groups, got, strict=True):
            for i in indices:
                out[i] = data[ranges[i][0] - start:ranges[i][1] - start]
        return out

    # --- writing (inside an atomic_output only)
    def write_bytes(self, data: bytes) -> int:
        with self.open("wb") as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a folder exists once an object is in it (an output's
        old objects, with ``force``, are the output's business: :class:`RemoteOutput`)."""
        if self._output is None:
            raise WriteError(redact(str(self)), "remote outputs are written through outputs.atomic_output only")

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise


# ------------------------------------------------------------------ ranged reads

@dataclass(frozen=True, eq=False)
class RemoteRegion(FileRegion):
    """``length`` bytes at ``offset`` of an object (``path`` is its URL), read by ranged GETs
    of :data:`REMOTE_RANGE` bytes, :data:`REMOTE_PARALLEL` in flight; checksums as a
    :class:`~convert.ir.FileRegion`'s, checked on the way."""

    remote: RemotePath | None = field(default=None, compare=False)

    def _obj(self) -> RemotePath:
        return self.remote if self.remote is not None else RemotePath(self.path)

    def _ranges(self, start: int, end: int, size: int) -> Iterator[bytes]:
        obj = self._obj()
        bounds = [(p, min(p + size, end)) for p in range(start, end, size)]
        if len(bounds) <= 1:
            for a, b in bounds:
                yield self._get(obj, a, b)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(REMOTE_PARALLEL, thread_name_prefix="convert-get") as pool:
            pending: deque = deque()
            it = iter(bounds)
            for a, b in it:
                pending.append(pool.submit(self._get, obj, a, b))
                if len(pending) >= REMOTE_PARALLEL:
                    break
            while pending:
                piece = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(self._get, obj, *nxt))
                yield piece

    def _get(self, obj: RemotePath, a: int, b: int) -> bytes:
        data = obj.read_range(a, b)
        if len(data) != b - a:
            raise CorruptFileError(redact(self.path), "object is truncated", self.label)
        return data

    def _pread(self, f, start: int, end: int) -> bytes:
        return self._get(self._obj(), start, end)

    def run_limits(self) -> tuple[int, int]:
        """Neighbouring tensors under :data:`REMOTE_RANGE` bytes are fetched together, up to
        ``REMOTE_RANGE x REMOTE_PARALLEL`` at once: a GET per tensor would cost a round trip each."""
        return REMOTE_RANGE, REMOTE_RANGE * REMOTE_PARALLEL

    def read_at(self, offset: int, length: int) -> bytes:
        """The bytes of a run of tensors (:func:`convert.copying.copy_many`), by parallel ranged GETs."""
        return b"".join(self._ranges(offset, offset + length, REMOTE_RANGE))

    def chunks(self, nbytes: int, size: int = CHUNK) -> Iterator[bytes]:
        self._check_length(nbytes)
        sums = Checksums(self.crc32c is not None and self.span is None, self.crc32 is not None, self._outer(None))
        for piece in self._ranges(self.offset, self.offset + self.length, max(size, REMOTE_RANGE)):
            sums.add(piece)
            for i in range(0, len(piece), size):  # callers asked for pieces of at most `size`
                yield piece[i:i + size]
        self._checked(sums, None)

    def read(self) -> bytes:
        return b"".join(self.chunks(self.length, REMOTE_RANGE))

    def digest(self, nbytes: int) -> int:
        crc = 0
        for piece in self.chunks(nbytes, REMOTE_RANGE):
            crc = google_crc32c.extend(crc, piece)
        return crc

    def copy_into(self, out: BinaryIO, nbytes: int, progress=None, verified_after: bool = False) -> int:
        """Stream the region into ``out`` (a local file or an upload) in large ranges."""
        crc = written = 0
        for piece in self.chunks(nbytes, REMOTE_RANGE):
            out.write(piece)
            crc = google_crc32c.extend(crc, piece)
            written += len(piece)
            if progress:
                progress(len(piece))
        return crc


def region(path: os.PathLike | str | RemotePath, offset: int, length: int, **checks) -> FileRegion:
    """A tensor's bytes in a file: a local :class:`~convert.ir.FileRegion` or a :class:`RemoteRegion`."""
    if isinstance(path, RemotePath):
        return RemoteRegion(str(path), offset, length, remote=path, **checks)
    if is_remote(path):
        return RemoteRegion(os.fspath(path), offset, length, **checks)
    return FileRegion(os.fspath(local(path)), offset, length, **checks)


def read_at(path: os.PathLike | str | RemotePath, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a local file or of an object (one ranged GET, not a read-ahead block)."""
    if isinstance(path, RemotePath):
        return path.read_range(start, end)
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def read_ranges(f: BinaryIO, path: object, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Bytes ``[a, b)`` at each range of ``f``, the open file of ``path``: for an object, all the
    GETs at once (:meth:`RemotePath.read_ranges`), where its read-ahead file would fetch a whole
    block for each of a zip's 30-byte local headers."""
    if isinstance(path, RemotePath):
        return path.read_ranges(ranges)
    out = []
    for a, b in ranges:
        f.seek(a)
        out.append(f.read(b - a))
    return out


def open_input(path: os.PathLike | str) -> BinaryIO:
    """A file open for reading, local or remote (remote: read-ahead blocks of :data:`HEADER_BLOCK`)."""
    p = as_path(path)
    try:
        return p.open("rb")
    except OSError as e:
        raise ReadError(redact(str(p)) if isinstance(p, RemotePath) else p, f"cannot open: {e.strerror or e}") from None


# ------------------------------------------------------------------ fingerprints

def fingerprint(paths: Iterable[os.PathLike | str]) -> list[list]:
    """``[name, size, version]`` of every file at or under ``paths`` (folders recursively), sorted:
    what changes when a file's content changes (local: size and mtime in ns; objects: their
    ETag or generation), without reading any data. Staging folders and journals are left out."""
    rows: dict[str, list] = {}
    for path in paths:
        p = as_path(path)
        if isinstance(p, RemotePath):
            if not p.exists():
                continue
            found = p.files() if p.is_dir() else [(p, p.stat())]
            for rf, rst in found:
                rows[str(rf)] = [str(rf), rst.st_size, rst.etag or rst.st_mtime]
            continue
        if p.is_dir():
            files = [Path(root, n) for root, _, names in os.walk(p) for n in names]
        elif p.exists():
            files = [p]
        else:
            continue
        for f in files:
            if ".convert-tmp-" in str(f) or f.name.endswith(".convert-journal.json"):
                continue
            try:
                st = f.stat()
            except OSError:
                continue
            rows[os.path.abspath(f)] = [os.path.abspath(f), st.st_size, st.st_mtime_ns]
    return [rows[k] for k in sorted(rows)]


AnyPath = Path | RemotePath
"""What code that takes remote paths too is given: :func:`as_path`'s result."""
