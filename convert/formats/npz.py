"""NumPy ``.npz`` archives: what ``np.savez`` and ``np.savez_compressed`` write.

Spec: an npz is a zip archive with one ``.npy`` file per array, member ``KEY.npy`` for the key
``KEY`` (``numpy.load`` strips the ending; ``a/b.npy`` is the key ``a/b``); a ``.npy`` file is
the format of ``numpy.lib.format`` (NEP 1): the magic ``\\x93NUMPY``, a version (1.0: u16 header
length; 2.0: u32; 3.0: u32 and a UTF-8 header), a Python literal dict ``{'descr', 'fortran_order',
'shape'}`` padded with spaces to 64 bytes, then the array's bytes in C (or Fortran) order.

Reading: :mod:`zipfile` reads the central directory (zip64 included) and decompresses the members
of ``np.savez_compressed`` stream-wise, one piece at a time, when a writer asks for the data;
``numpy.lib.format`` parses each ``.npy`` header (``read_array_header_1_0``/``2_0``, and for 3.0
the function ``numpy.load`` itself calls: the same checks, the same 10000-byte header limit). By hand, in 30 lines: where a
stored member's data begins (the local file header's name and extra lengths; :mod:`zipfile`
parses them only inside ``ZipFile.open`` and does not say), so that the array of a stored member
(``np.savez``) is a :class:`~convert.ir.FileRegion` read lazily and copied in the kernel; and zlib's
``crc32_combine`` arithmetic (which Python does not expose): the member's CRC-32 covers the ``.npy``
header as well as the array bytes, so the region's own CRC-32 (checked whenever it is read) is the
member's with the header's, carried over the array's length, taken out. Object arrays (pickled data) are refused, as
``numpy.load(allow_pickle=False)`` refuses them; so are members that are not ``.npy`` arrays,
structured/void/datetime dtypes and compression methods NumPy does not write. Fortran-order arrays
are read and transposed into C order; big-endian ones byte-swapped; ``S``/``U`` arrays become
string tensors (UTF-8 bytes).

Writing: :mod:`zipfile` writes the archive as ``np.savez`` does (stored members, zip64 fields in
every member as NumPy forces them, zipfile's fixed 1980-01-01 timestamps: the same bytes as
``np.savez`` of the same C-ordered arrays, on every run); ``numpy.lib.format`` writes the ``.npy``
headers (version 1.0, or 2.0 when the header is longer than 65535 bytes); the data is streamed
from each tensor's source (:meth:`~convert.ir.Tensor.copy_into`), one chunk at a time. What an
npz holds: the dtypes whose NumPy ``descr`` ``numpy.load`` reads back as themselves (bool, ints,
uints, float16/32/64, complex); not bfloat16 or float8 (NumPy saves ml_dtypes types as raw
``V2``/``V1`` bytes), not strings (they would need pickling or fixed-width ``S`` arrays, which
drop trailing NUL bytes). An npz has no place for metadata: it is left out, with a note.

Remote paths (``Format.remote``, :mod:`convert.storage`): the zip directory is read through a
read-ahead file, every member's local header and ``.npy`` header in one batch of concurrent
ranged GETs, a stored member's array as a :class:`~convert.storage.RemoteRegion`; a compressed
member is decompressed from a read-ahead file of large blocks. A remote output is one upload
written in one pass: zipfile then puts each member's CRC-32 and sizes in a data descriptor after
its bytes (the only difference from ``np.savez``'s bytes; ``numpy.load`` reads both).
"""

from __future__ import annotations

import io
import math
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from .. import dtypes, storage
from ..crc import shift as crc32_shift
from ..errors import ConvertError, CorruptFileError, ReadError, WriteError
from ..ir import CHUNK, ArraySource, FileRegion, Source, Tensor, TensorDict, zlib_crc32
from ..lazy import np
from .base import Format, Writer, WriteReport

NAME = "npz"
NPY = ".npy"
MAGIC = b"\x93NUMPY"
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # a zip local file header (APPNOTE 4.3.7)
_LOCAL_SIG = 0x04034B50
_MAX_HEADER = 10000  # numpy.load's max_header_size
_PEEK = 4096  # bytes first read of each stored member: its .npy header (64-128 bytes but for many dimensions)
_DEFLATE_RATIO = 1032  # deflate expands at most ~1032:1 (zlib's technical details)
_MAX_NOTED = 5
_MAX_DIMS = 64  # NumPy 2's NPY_MAXDIMS


def detect(path: Path) -> bool:
    """A zip whose first member is a ``.npy`` file (an empty one has no member: ``.npz`` hints it)."""
    try:
        p = storage.as_path(path)
        with (p.open("rb", block_size=4096) if isinstance(p, storage.RemotePath) else p.open("rb")) as f:
            head = f.read(_LOCAL.size)
            if len(head) < _LOCAL.size or not head.startswith(b"PK\x03\x04"):
                return False
            name_len = _LOCAL.unpack(head)[9]
            return f.read(name_len).endswith(NPY.encode())
    except (OSError, ReadError):  # ReadError: a remote path's
        return False


# ------------------------------------------------------------------------------------------ reading

class _Bad(Exception):
    """A problem of one member; turned into a CorruptFileError naming the file and the key."""


def read(path: Path) -> TensorDict:
    """Read an ``.npz`` lazily: the zip directory and every ``.npy`` header now, data when asked."""
    path = storage.as_path(path)  # type: ignore[assignment]  # a RemotePath for a URL
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            try:
                zf = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, UnicodeDecodeError,
                    ValueError, EOFError) as e:
                raise CorruptFileError(path, f"is not a readable zip archive ({e})") from None
            with zf:
                seen: set[str] = set()
                members = []
                for info in zf.infolist():
                    key = info.filename[:-len(NPY)] if info.filename.endswith(NPY) else None
                    if key is None:
                        raise ReadError(path, f"member {info.filename!r} is not a .npy array "
                                              "(numpy.load would hand it out as bytes); convert reads only arrays")
                    if key in seen:
                        raise CorruptFileError(path, "appears twice in the archive", key)
                    seen.add(key)
                    members.append((key, info))
                # the local headers, then the .npy headers of the stored members: remote, each batch one round trip
                heads = storage.read_ranges(f, path, [(i.header_offset, i.header_offset + _LOCAL.size) for _, i in members])
                starts = []
                for (key, info), local in zip(members, heads, strict=True):
                    try:
                        starts.append(_data_start(info, local, size))
                    except _Bad as e:
                        raise CorruptFileError(path, str(e), key) from None
                stored = [(s, i) for s, (_, i) in zip(starts, members, strict=True)
                          if i.compress_type == zipfile.ZIP_STORED]
                prefixes = iter(storage.read_ranges(f, path, [(s, s + min(i.file_size, _PEEK)) for s, i in stored]))
                tensors = []
                for (key, info), start in zip(members, starts, strict=True):
                    try:
                        prefix = None
                        if info.compress_type == zipfile.ZIP_STORED:
                            prefix = next(prefixes)
                            if len(prefix) < min(info.file_size, _npy_header_length(prefix)):  # a long header
                                prefix, = storage.read_ranges(f, path, [(start, start + min(info.file_size, _MAX_HEADER + 12))])
                        tensors.append(_member(path, zf, info, key, start, prefix))
                    except _Bad as e:
                        raise CorruptFileError(path, str(e), key) from None
    except OSError as e:
        raise ReadError(path, f"cannot read: {e.strerror or e}") from None
    return TensorDict(tensors, {"source.format": NAME})


def _npy_header_length(prefix: bytes) -> int:
    """How many bytes the ``.npy`` header at the start of ``prefix`` says it takes (0 if unreadable)."""
    if len(prefix) >= 10 and prefix[6] == 1:
        return 10 + struct.unpack_from("<H", prefix, 8)[0]
    if len(prefix) >= 12 and prefix[6] in (2, 3):
        return 12 + struct.unpack_from("<I", prefix, 8)[0]
    return 0


def _data_start(info: zipfile.ZipInfo, local: bytes, size: int) -> int:
    """Where a member's data begins (after its local header), its sizes and method checked."""
    if info.flag_bits & 1:
        raise _Bad("is encrypted")
    stored = info.compress_type == zipfile.ZIP_STORED
    if not stored and info.compress_type != zipfile.ZIP_DEFLATED:
        raise _Bad(f"is compressed with zip method {info.compress_type}; NumPy writes stored or deflated members")
    if not stored and info.file_size > info.compress_size * _DEFLATE_RATIO + (1 << 16):
        raise _Bad(f"claims {info.file_size} bytes from {info.compress_size} compressed, more than deflate can expand")
    if len(local) < _LOCAL.size or _LOCAL.unpack(local)[0] != _LOCAL_SIG:
        raise _Bad("has no local file header where the zip directory says (file truncated?)")
    name_len, extra_len = _LOCAL.unpack(local)[9:]
    start = info.header_offset + _LOCAL.size + name_len + extra_len
    if start + info.compress_size > size:
        raise _Bad(f"needs {info.compress_size} bytes at offset {start} of a {size}-byte file (file truncated?)")
    if stored and info.compress_size != info.file_size:
        raise _Bad(f"is stored but its sizes differ ({info.compress_size} and {info.file_size})")
    return start


def _member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, start: int,
            prefix: bytes | None) -> Tensor:
    """The tensor of one member; ``prefix``: a stored member's first bytes (None: compressed)."""
    stored = prefix is not None
    if prefix is None:
        prefix = _guard(path, key, lambda: _stream_prefix(zf, info))
    shape, fortran, dt, header_len = _npy_header(prefix, info.file_size)
    numel = math.prod(shape)
    nbytes = numel * dt.itemsize
    if nbytes != info.file_size - header_len:
        raise _Bad(f"holds {info.file_size - header_len} bytes after its .npy header but {dt.str} "
                   f"{list(shape)} needs {nbytes}")
    if stored:
        # the member's CRC-32 covers the .npy header too: the region's own is what remains of it
        data_crc = info.CRC ^ crc32_shift(zlib_crc32(prefix[:header_len], 0), nbytes)
        raw: Source = storage.region(path, start + header_len, nbytes, label=key, crc32=data_crc)
    else:
        raw = _Streamed(path if isinstance(path, storage.RemotePath) else str(path), info.filename, header_len, key)
    if dt.kind in "SU":
        return Tensor(key, dtypes.STRING, shape, ArraySource(lambda: _strings(raw, dt, shape, fortran, nbytes)))
    try:
        dtype = dtypes.from_numpy(dt.newbyteorder("<"))
    except ConvertError:
        dtype = None
    if dtype is None or dtype.kind in ("string", "quant") or dt.kind not in "biufc":
        raise _Bad(f"has dtype {dt.str!r}, which convert does not read (.npy arrays of bool, ints, floats, complex "
                   "and S/U strings)")
    if fortran or dt.byteorder == ">":
        return Tensor(key, dtype, shape, ArraySource(lambda: _reordered(raw, dt, shape, fortran, nbytes)))
    return Tensor(key, dtype, shape, raw)


def _stream_prefix(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    with zf.open(info) as member:
        return member.read(min(info.file_size, _MAX_HEADER + 12))


def _npy_header(prefix: bytes, member_size: int) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header length) from the start of a member, as numpy.load reads it."""
    from numpy.lib import format as npy

    buf = io.BytesIO(prefix)
    try:
        version = npy.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dt = npy.read_array_header_1_0(buf, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dt = npy.read_array_header_2_0(buf, max_header_size=_MAX_HEADER)
        elif version == (3, 0):  # no public reader of a 3.0 header: numpy.load's own (moved in NumPy 2)
            try:
                from numpy.lib._format_impl import _read_array_header  # type: ignore[attr-defined]
            except ImportError:  # pragma: no cover - NumPy 1.x
                _read_array_header = npy._read_array_header  # type: ignore[attr-defined]
            shape, fortran, dt = _read_array_header(buf, version, max_header_size=_MAX_HEADER)
        else:
            raise ValueError(f"unknown .npy version {version[0]}.{version[1]}")
    except (ValueError, TypeError, SyntaxError, RecursionError, OverflowError, KeyError, tokenize.TokenError) as e:
        # numpy's parser of a damaged header: literal_eval, and its Python 2 fallback through tokenize
        if len(prefix) < member_size and "EOF" in str(e):
            raise _Bad(f"has a .npy header longer than numpy.load's limit of {_MAX_HEADER} bytes") from None
        raise _Bad(f"is not a readable .npy array ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    if dt.hasobject:
        raise _Bad("is an object array (pickled data), which convert does not unpickle (nor does "
                   "numpy.load(allow_pickle=False))")
    if dt.names is not None or dt.subdtype is not None:
        raise _Bad(f"has a structured dtype {dt.descr!r}, which convert does not read")
    if any(d < 0 for d in shape):
        raise _Bad(f"has a negative dimension in shape {list(shape)}")
    return tuple(shape), bool(fortran), dt, buf.tell()


def _guard(path: Path, key: str, fn):
    try:
        return fn()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as e:
        raise CorruptFileError(path, f"cannot be decompressed ({e})", key) from None
    except OSError as e:
        raise ReadError(path, f"cannot read: {e.strerror or e}", key) from None


def _raw_array(raw: Source, dt: np.dtype, shape: tuple[int, ...], fortran: bool, nbytes: int) -> np.ndarray:
    data = raw.read() if isinstance(raw, FileRegion) else b"".join(bytes(p) for p in raw.chunks(nbytes))
    arr = np.frombuffer(data, dtype=dt)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def _reordered(raw: Source, dt: np.dtype, shape, fortran: bool, nbytes: int) -> np.ndarray:
    return np.ascontiguousarray(_raw_array(raw, dt, shape, fortran, nbytes), dtype=dt.newbyteorder("<"))


def _strings(raw: Source, dt: np.dtype, shape, fortran: bool, nbytes: int) -> np.ndarray:
    arr = np.ascontiguousarray(_raw_array(raw, dt, shape, fortran, nbytes))
    out = np.empty(shape, dtype=object)
    flat = out.reshape(-1)
    for i, v in enumerate(arr.reshape(-1).tolist()):  # S: bytes (trailing NULs dropped, as NumPy does); U: str
        flat[i] = v.encode("utf-8") if isinstance(v, str) else v
    return out


@dataclass(frozen=True, eq=False)
class _Streamed(Source):
    """The array bytes of a compressed member, decompressed by zipfile one piece at a time (which
    checks the member's CRC-32 at its end)."""

    path: str | storage.RemotePath
    member: str
    skip: int
    label: str

    def chunks(self, nbytes: int, size: int = CHUNK) -> Iterator[bytes | np.ndarray]:
        path = self.path if isinstance(self.path, storage.RemotePath) else Path(self.path)
        try:
            with (path.open("rb", block_size=storage.REMOTE_RANGE) if isinstance(path, storage.RemotePath)
                  else open(path, "rb")) as raw, \
                    zipfile.ZipFile(raw) as zf, zf.open(self.member) as stream:
                stream.read(self.skip)
                left = nbytes
                while left:
                    piece = stream.read(min(size, left))
                    if not piece:
                        raise CorruptFileError(path, "is shorter than its .npy header says", self.label)
                    left -= len(piece)
                    yield piece
                if stream.read(1):
                    raise CorruptFileError(path, "is longer than its .npy header says", self.label)
        except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError) as e:
            raise CorruptFileError(path, f"cannot be decompressed ({e})", self.label) from None
        except OSError as e:
            raise ReadError(path, f"cannot read: {e.strerror or e}", self.label) from None


# ------------------------------------------------------------------------------------------ writing

def holds(d: dtypes.DType) -> bool:
    """The dtypes of the table whose NumPy ``descr`` numpy.load reads back as the same dtype."""
    if d.kind in ("string", "quant") or d.block is not None:
        return False
    from numpy.lib import format as npy

    try:
        return npy.descr_to_dtype(npy.dtype_to_descr(d.numpy)) == d.numpy
    except TypeError:  # a descr NumPy cannot read at all ('<f1' for float8_e8m0fnu)
        return False


def write(td: TensorDict, path: Path) -> WriteReport | None:
    """Write ``td`` as ``np.savez`` would (memory: one chunk of one tensor at a time)."""
    from numpy.lib import format as npy

    path = storage.as_path(path)  # type: ignore[assignment]  # remote: the RemotePath of an atomic output
    for t in td.values():
        try:
            t.name.encode("utf-8")
        except UnicodeEncodeError:
            raise WriteError(path, "a zip member name must be UTF-8; this name cannot be encoded", t.name) from None
        if "\0" in t.name:
            raise WriteError(path, "names with a NUL character cannot be zip member names", t.name)
        if len(t.shape) > _MAX_DIMS:
            raise WriteError(path, f"NumPy arrays have at most {_MAX_DIMS} dimensions, not {len(t.shape)}", t.name)
    # remote: an upload, which zipfile cannot seek in (it writes data descriptors then)
    with (path.open("wb") if isinstance(path, storage.RemotePath) else open(path, "xb")) as f, \
            zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for t in td.values():
            header = io.BytesIO()
            d = {"descr": npy.dtype_to_descr(t.dtype.numpy), "fortran_order": False, "shape": t.shape}
            try:
                npy.write_array_header_1_0(header, d)
            except ValueError:  # longer than a 1.0 header's 65535 bytes (many dimensions)
                header = io.BytesIO()
                npy.write_array_header_2_0(header, d)
            with zf.open(t.name + NPY, "w", force_zip64=True) as member:  # as np.savez opens them (gh-10776)
                member.write(header.getvalue())
                t.copy_into(cast(BinaryIO, member))
    dropped = [k for k in td.portable_metadata if k != "source.format"]
    if not dropped:
        return None
    more = f" and {len(dropped) - _MAX_NOTED} more" if len(dropped) > _MAX_NOTED else ""
    return {"notes": [f"npz holds no metadata; left out: {', '.join(dropped[:_MAX_NOTED])}{more}"]}


FORMAT = Format(
    name=NAME,
    description="NumPy .npz archive (np.savez / np.savez_compressed): one .npy array per key",
    detect=detect,
    read=read,
    writers=(Writer("", write, holds, suffix=".npz"),),
    suffixes=(".npz",),
    checksums="CRC-32 of every zip member (the .npy header and the array bytes)",
    remote=True,
)
