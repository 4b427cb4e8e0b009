"""Safe, lazy access to HDF5 files through h5py (https://docs.h5py.org; the file format:
https://support.hdfgroup.org/documentation/hdf5/latest/_f_m_t3.html).

Every HDF5 object convert looks at passes through here, so that nothing outside the input is
ever opened and nothing is allocated for what a file merely claims:

* links are walked one at a time (``group.get(name, getlink=True)``): soft and external links
  are refused before anything follows them (Keras's own loader refuses them too);
* a dataset is inspected before its data is touched: virtual datasets (VDS, whose data lie in
  other files) and external raw storage (``H5Pset_external``) are refused; a contiguous
  dataset must store exactly ``numel * itemsize`` bytes inside the file; a chunked or
  compressed one may not claim more than :data:`EXPANSION` times the bytes it stores (a "shape
  bomb" stores a fill value and claims terabytes);
* HDF5's own errors (a truncated file, a damaged B-tree) become one-line
  :class:`~convert.errors.CorruptFileError` s naming the file.

Tensors: a contiguous, unfiltered, little-endian dataset is a :class:`~convert.ir.FileRegion`
(h5py gives its file offset, ``dataset.id.get_offset()``), so its bytes are copied raw and
never pass through h5py or NumPy; anything else (chunked, compressed, compact, big-endian,
strings) is read by h5py, one tensor at a time, when a writer asks.

Remote files (:class:`~convert.storage.RemotePath`): h5py reads them through its file-object
driver over a read-ahead file of small blocks (HDF5's metadata is many small reads spread over
the file), and a contiguous dataset is a :class:`~convert.storage.RemoteRegion`.
"""

from __future__ import annotations

import io
import math
import os
import sys
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import dtypes, storage
from ...errors import ConvertError, CorruptFileError, MissingDependencyError, ReadError
from ...ir import CHUNK, ArraySource, Tensor
from ...lazy import np

SIGNATURE = b"\x89HDF\r\n\x1a\n"
EXPANSION = 1024
"""A filtered/chunked dataset may claim at most this many times the bytes it stores..."""
FLOOR = 256 << 20
"""...or this many bytes, whichever is larger (a small all-zero tensor compresses very well)."""
MAX_DEPTH = 64
REMOTE_BLOCK = 256 << 10
"""Read-ahead block of a remote HDF5 file (its metadata: object headers, B-trees, heaps)."""


def _open_raw(path):
    """A file open for reading: local, or a remote object (ranged GETs of :data:`REMOTE_BLOCK`)."""
    if isinstance(path, storage.RemotePath):
        return path.open("rb", block_size=REMOTE_BLOCK)
    return open(path, "rb")


def _size(path, f) -> int:
    return path.stat().st_size if isinstance(path, storage.RemotePath) else os.fstat(f.fileno()).st_size


def h5py_module():
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError("reading and writing Keras HDF5 files", "h5py", "keras") from None
    return h5py


def signature_at(path: Path) -> int | None:
    """Where the HDF5 superblock starts (0, or after a user block of 512 * 2^k bytes), or None."""
    try:
        with _open_raw(path) as f:
            size = _size(path, f)
            offset = 0
            while offset + 8 <= size and offset <= 1 << 16:
                f.seek(offset)
                if f.read(8) == SIGNATURE:
                    return offset
                offset = 512 if offset == 0 else offset * 2
    except (OSError, ReadError):  # ReadError: a remote path's
        return None
    return None


class Window(io.RawIOBase):
    """A read-only file object over ``[start, start + size)`` of a file (a stored zip member),
    for h5py's file-object driver: offsets h5py reports are relative to ``start``."""

    def __init__(self, path: Path, start: int, size: int):
        super().__init__()
        self._remote = isinstance(path, storage.RemotePath)
        self._f = _open_raw(path)
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._size - self._pos))
        if n and self._remote:
            self._f.seek(self._start + self._pos)
            data = self._f.read(n)
        else:
            data = os.pread(self._f.fileno(), n, self._start + self._pos) if n else b""
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


@dataclass(frozen=True)
class Where:
    """How to (re)open one HDF5 file: a file on disk, or a member of a ``.keras`` zip.

    ``base`` is the absolute offset of the HDF5 bytes in ``path`` (a stored zip member's data),
    ``size`` their length; ``member`` names a compressed zip member, read through zipfile.
    """

    path: Path
    base: int = 0
    size: int | None = None
    member: str | None = None
    label: str | None = None  # how errors name it: "m.keras:model.weights.h5"

    @property
    def shown(self) -> str:
        return self.label or str(self.path)

    def error(self, message: str, tensor: str | None = None) -> CorruptFileError:
        return CorruptFileError(self.shown, message, tensor)

    @contextmanager
    def open(self):
        """The h5py.File, HDF5 errors turned into CorruptFileError."""
        h5py = h5py_module()
        handle: Any = None
        archive = None
        try:
            try:
                remote = isinstance(self.path, storage.RemotePath)
                if self.member is not None:
                    archive = zipfile.ZipFile(_open_raw(self.path) if remote else self.path)
                    handle = archive.open(self.member)
                elif self.base or self.size is not None or remote:  # h5py opens local files by name only
                    size = self.size if self.size is not None else (
                        self.path.stat().st_size if remote else os.path.getsize(self.path)) - self.base
                    handle = Window(self.path, self.base, size)
                f = h5py.File(handle if handle is not None else self.path, "r", locking=False)
            except FileNotFoundError:
                raise ReadError(self.shown, "no such file") from None
            except (OSError, ValueError, zipfile.BadZipFile, KeyError, RuntimeError, NotImplementedError, EOFError,
                    zlib.error) as e:
                raise self.error(f"not a readable HDF5 file ({_short(e)})") from None
            try:
                yield f
            except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, zlib.error) as e:
                if isinstance(e, ConvertError):
                    raise
                raise self.error(f"damaged HDF5 file ({_short(e)})") from None
            finally:
                f.close()
        finally:
            if handle is not None:
                handle.close()
            if archive is not None:
                archive.close()


def _short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def children(group, where: Where) -> Iterator[tuple[str, Any]]:
    """(name, object) of each link of ``group``, sorted as HDF5 sorts them; soft and external
    links are refused before anything follows them."""
    h5py = h5py_module()
    for name in group:
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise where.error(f"'{group.name.rstrip('/')}/{name}' is an external link to "
                              f"'{link.filename}:{link.path}'; convert opens nothing outside the input")
        if isinstance(link, h5py.SoftLink):
            raise where.error(f"'{group.name.rstrip('/')}/{name}' is a soft link to '{link.path}'; "
                              "Keras files hold none")
        yield name, group[name]


def walk(root, where: Where) -> Iterator[tuple[str, Any]]:
    """Every (path relative to ``root``, group or dataset) below it, depth first, in HDF5 order;
    an object reached twice (hard links making a cycle) is refused."""
    h5py = h5py_module()
    seen = {hash(root.id)}
    stack: list[tuple[str, Any, int]] = [("", root, 0)]
    while stack:
        prefix, group, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise where.error(f"groups nest deeper than {MAX_DEPTH} levels")
        below = []
        for name, obj in children(group, where):
            path = f"{prefix}{name}"
            key = hash(obj.id)
            if key in seen:
                raise where.error(f"'{path}' is linked twice (a cycle or a shared object)")
            seen.add(key)
            yield path, obj
            if isinstance(obj, h5py.Group):
                below.append((path + "/", obj, depth + 1))
        stack.extend(reversed(below))


def attr_text(obj, key: str, default: str | None = None) -> str | None:
    """A string attribute (h5py returns bytes or str, or a 0-d array of either)."""
    if key not in obj.attrs:
        return default
    value = obj.attrs[key]
    if hasattr(value, "shape") and value.shape == ():
        value = value[()]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def attr_list(obj, key: str) -> list[str] | None:
    """A list-of-strings attribute, also in the chunked form Keras writes when it would exceed
    HDF5's 64 KiB attribute limit (``key0``, ``key1``...); None when absent."""
    if key in obj.attrs:
        values = [obj.attrs[key]]
    elif f"{key}0" in obj.attrs:
        values, i = [], 0
        while f"{key}{i}" in obj.attrs:
            values.append(obj.attrs[f"{key}{i}"])
            i += 1
    else:
        return None
    out = []
    for value in values:
        items = np.asarray(value).reshape(-1)
        for item in items:
            if isinstance(item, bytes):
                out.append(item.decode("utf-8", "replace"))
            elif isinstance(item, str):
                out.append(item)
            else:  # an empty list is stored as a float64 array of shape (0,)
                raise TypeError(f"attribute '{key}' holds a non-string value")
    return out


def tensor_dtype(ds, where: Where, name: str) -> tuple[dtypes.DType, bool]:
    """The dtype of a dataset, and whether its stored bytes are already ours (little-endian raw)."""
    h5py = h5py_module()
    dt = ds.dtype
    if h5py.check_string_dtype(dt) is not None or dt.kind in "SO":
        return dtypes.STRING, False
    if dt.kind == "V" and dt.itemsize == 2 and attr_text(ds, "dtype") == "bfloat16":  # Keras 3 stores bf16 opaque
        return dtypes.by_name("bfloat16"), True
    if dt.kind == "b":  # an HDF5 enum {FALSE: 0, TRUE: 1} of int8
        return dtypes.by_name("bool"), dt.itemsize == 1
    if dt.kind in "fiuc" and dt.fields is None:
        try:
            found = dtypes.from_numpy(dt)
        except ConvertError:
            raise ReadError(where.shown, f"HDF5 type {dt} has no tensor dtype", name) from None
        little = dt.byteorder in "<|" or (dt.byteorder == "=" and sys.byteorder == "little")
        return found, little
    raise ReadError(where.shown, f"HDF5 type {dt} is not a tensor dtype convert knows", name)


def dataset_tensor(name: str, ds, where: Where, attrs: dict[str, str], file_size: int) -> Tensor:
    """A lazy Tensor for one dataset, after refusing what could reach outside the file or claim
    more memory than it stores."""
    h5py = h5py_module()
    path_in_file = ds.name
    if ds.is_virtual:
        raise where.error(f"dataset '{path_in_file}' is virtual (its data lie in other files); refused", name)
    if ds.external:
        files = ", ".join(str(e[0]) for e in ds.external)
        raise where.error(f"dataset '{path_in_file}' keeps its data in external files ({files}); refused", name)
    if ds.shape is None:
        raise where.error(f"dataset '{path_in_file}' has no shape (a null dataspace)", name)
    dtype, raw = tensor_dtype(ds, where, name)
    shape = tuple(int(d) for d in ds.shape)
    numel = math.prod(shape)
    plist = ds.id.get_create_plist()
    layout = plist.get_layout()
    stored = ds.id.get_storage_size()
    if dtype.kind != "string":
        nbytes = numel * dtype.itemsize
        # a byte range of the input only when the HDF5 bytes are the file's (or a stored zip member's)
        if layout == h5py.h5d.CONTIGUOUS and plist.get_nfilters() == 0 and raw and where.member is None:
            offset = ds.id.get_offset()
            if offset is not None and nbytes:
                if stored != nbytes:
                    raise where.error(f"dataset '{path_in_file}' stores {stored} bytes, {dtype} "
                                      f"{list(shape)} needs {nbytes}", name)
                if offset + nbytes > file_size:
                    raise where.error(f"dataset '{path_in_file}' lies past the end of the file (truncated?)", name)
                return Tensor(name, dtype, shape, storage.region(where.path, where.base + offset, nbytes,
                                                                 label=name), attrs)
        if nbytes > max(FLOOR, EXPANSION * stored):
            raise where.error(f"dataset '{path_in_file}' claims {dtype} {list(shape)} ({nbytes} bytes) but "
                              f"stores {stored} bytes; refused", name)
    elif numel > max(FLOOR // 8, EXPANSION * stored):
        raise where.error(f"dataset '{path_in_file}' claims {numel} strings but stores {stored} bytes", name)
    return Tensor(name, dtype, shape, _reader(where, path_in_file, dtype, name), attrs)


def _convert(arr, dtype: dtypes.DType):
    arr = np.asarray(arr)
    if dtype.kind == "string":
        return np.array(arr, dtype=object).reshape(arr.shape)
    if dtype.name == "bfloat16":
        return np.ascontiguousarray(arr).view(np.uint8).view(dtype.numpy).reshape(arr.shape)
    return arr.astype(dtype.numpy, copy=False)


@dataclass(frozen=True, eq=False)
class DatasetSource(ArraySource):
    """A dataset h5py reads (chunked, compressed, big-endian...): the whole array for ``array()``,
    slabs of whole rows along the first axis for ``chunks()`` (a copy needs memory of one piece)."""

    where: Where | None = None
    path_in_file: str = ""
    dtype: dtypes.DType | None = None
    label: str = ""

    def chunks(self, nbytes: int, size: int = CHUNK):
        assert self.where is not None and self.dtype is not None
        with self.where.open() as f:
            ds = f[self.path_in_file]
            if not ds.shape or ds.shape[0] <= 1:
                yield from super().chunks(nbytes, size)
                return
            row = max(1, nbytes // ds.shape[0])
            step = max(1, size // row)
            for start in range(0, ds.shape[0], step):
                try:
                    piece = ds[start:start + step]
                except (OSError, RuntimeError, ValueError) as e:
                    raise self.where.error(f"cannot read dataset '{self.path_in_file}' ({_short(e)})",
                                           self.label) from None
                yield np.ascontiguousarray(_convert(piece, self.dtype)).reshape(-1).view(np.uint8)


def _reader(where: Where, path_in_file: str, dtype: dtypes.DType, name: str) -> DatasetSource:
    def produce():
        with where.open() as f:
            ds = f[path_in_file]
            try:
                arr = ds[()]
            except (OSError, RuntimeError, ValueError) as e:
                raise where.error(f"cannot read dataset '{path_in_file}' ({_short(e)})", name) from None
        return _convert(arr, dtype)
    return DatasetSource(produce, where, path_in_file, dtype, name)
