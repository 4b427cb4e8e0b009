"""The neutral IR: :class:`Tensor` and :class:`TensorDict`.

A Tensor knows its name, dtype, shape and where its bytes are; nothing is read
until a writer asks (``numpy()``, ``tobytes()`` or ``chunks()``). Raw bytes are
always little-endian, C order, in the dtype's raw form (:func:`convert.dtypes.decode` /
:func:`~convert.dtypes.encode`: packed 4-bit floats two to a byte, quantized blocks as they
are). String tensors hold ``bytes`` objects in a NumPy object array and have no raw-byte form.

Nothing here mutates: renaming, selecting and transforming return new objects.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import threading
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import BinaryIO

import google_crc32c

from .lazy import np

try:  # CRC-32 at ~10 GB/s; the standard library's runs at ~2.5
    from zlib_ng.zlib_ng import crc32 as zlib_crc32
except ImportError:  # pragma: no cover
    from zlib import crc32 as zlib_crc32

from .dtypes import DType, decode, encode
from .errors import CorruptFileError, ReadError, UnsupportedDTypeError, UsageError, WriteError

CHUNK = 16 << 20  # bytes per streamed chunk: big enough for throughput, small enough for memory


class Source:
    """Where a tensor's bytes come from. Subclasses implement ``chunks`` or ``array``."""

    __slots__ = ()  # so that FileRegion, one per tensor, has no instance dict

    def chunks(self, nbytes: int, size: int = CHUNK) -> Iterator[bytes | np.ndarray]:
        """The raw bytes in pieces of at most ``size`` bytes."""
        raise NotImplementedError

    def copy_into(self, out: BinaryIO, nbytes: int, progress: Callable[[int], None] | None = None,
                  verified_after: bool = False) -> int:
        """Write the raw bytes to the file ``out`` at its position; return their CRC-32C.

        ``verified_after``: the caller reads the output back and compares it with the returned
        CRC, so a source may return a checksum its file stores without computing it (the
        comparison then checks the source too).
        """
        crc = written = 0
        for piece in self.chunks(nbytes):
            out.write(piece)  # type: ignore[arg-type]  # numpy's stubs give ndarray the buffer protocol (PEP 688) on Python >= 3.12 only
            crc = google_crc32c.extend(crc, piece)
            written += len(piece)
            if progress:
                progress(len(piece))
        if written != nbytes:
            raise ReadError(None, f"source produced {written} bytes, expected {nbytes}")
        return crc

    def region(self) -> FileRegion | None:
        """The file region whose bytes this source gives unchanged, if it is one (see :func:`convert.copying.copy_many`)."""
        return None

    def copied(self, crc32c: int) -> None:
        """Told, after :func:`convert.copying.copy_many` copied :meth:`region` for it, the CRC-32C of the bytes."""

    def verified_after(self) -> bool:
        """Whether the output this source is copied into is read back and compared with the CRC-32C
        returned (so a copy may return the one the source file stores without reading the bytes)."""
        return False

    def digest(self, nbytes: int) -> int:
        """CRC-32C of the raw bytes."""
        crc = 0
        for piece in self.chunks(nbytes):
            crc = google_crc32c.extend(crc, piece)
        return crc

    def array(self, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor as a NumPy array (any memory layout)."""
        nbytes = dtype.nbytes(math.prod(shape))
        buf = bytearray(nbytes)
        view = memoryview(buf)
        pos = 0
        for piece in self.chunks(nbytes):
            view[pos:pos + len(piece)] = piece  # type: ignore[assignment]  # numpy's stubs give ndarray the buffer protocol (PEP 688) on Python >= 3.12 only
            pos += len(piece)
        return decode(dtype, buf, shape)


@dataclass(frozen=True, eq=False, slots=True)
class FileRegion(Source):
    """``length`` bytes at ``offset`` of a file; optionally checked against the file's checksums.

    ``crc32c`` is the plain (unmasked) CRC-32C of the region (TF bundles), or, when ``span`` is
    set, of the file bytes ``[span[0], span[1])`` around it (the SSTable block holding a V1
    tensor); ``crc32`` is its CRC-32 (a zip member's). A mismatch raises :class:`CorruptFileError`
    naming ``label`` (the tensor).
    """

    path: str
    offset: int
    length: int
    crc32c: int | None = None
    label: str | None = None
    crc32: int | None = None
    span: tuple[int, int] | None = None

    def chunks(self, nbytes: int, size: int = CHUNK) -> Iterator[bytes | np.ndarray]:
        self._check_length(nbytes)
        with _open(self.path, self.label) as f:
            sums = Checksums(self.crc32c is not None and self.span is None, self.crc32 is not None, self._outer(f))
            f.seek(self.offset)
            left = self.length
            while left:
                piece = f.read(min(size, left))
                if not piece:
                    raise CorruptFileError(self.path, "file is truncated", self.label)
                sums.add(piece)
                left -= len(piece)
                yield piece
            self._checked(sums, f)

    def region(self) -> FileRegion | None:
        return self

    def read(self) -> bytes:
        """All bytes of the region in one read, checked."""
        if self.length < SMALL and self.span is None:
            return self._small()
        with _open(self.path, self.label) as f:
            f.seek(self.offset)
            data = f.read(self.length)
            if len(data) != self.length:
                raise CorruptFileError(self.path, "file is truncated", self.label)
            sums = Checksums(self.crc32c is not None and self.span is None, self.crc32 is not None, self._outer(f))
            sums.add(data)
            self._checked(sums, f)
        return data

    def array(self, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
        try:
            return decode(dtype, self.read(), shape)
        except UnsupportedDTypeError as e:  # the dtype's complaint (cannot dequantize): name file and tensor
            raise ReadError(self.path, str(e), self.label) from None

    def digest(self, nbytes: int) -> int:
        """CRC-32C of the region, read through a memory map (no copy), the file's checksums checked."""
        self._check_length(nbytes)
        if self.length < SMALL and self.span is None:
            return google_crc32c.value(self._small())
        with _open(self.path, self.label) as f:
            self._check_size(f)
            crc = self._checked(mapped_checksums(f.fileno(), self.offset, self.length, self.crc32 is not None,
                                                 outer=self._outer(f)), f)
        assert crc is not None  # taken with crc32c (mapped_checksums' default)
        return crc

    def copy_into(self, out: BinaryIO, nbytes: int, progress: Callable[[int], None] | None = None,
                  verified_after: bool = False) -> int:
        """Copy the region into ``out`` inside the kernel (``copy_file_range``, as ``cp`` does) while
        a second thread takes its checksums from a memory map (unless ``verified_after`` and the
        file stores the region's CRC-32C: the check of the output checks it); on another platform
        or file system, stream it in chunks."""
        self._check_length(nbytes)
        if self.length < SMALL and self.span is None:
            data = self._small()
            out.write(data)
            if progress:
                progress(len(data))
            return google_crc32c.value(data)
        copy = getattr(os, "copy_file_range", None)
        if copy is None or not has_fd(out):  # an upload (convert.storage) has none
            return Source.copy_into(self, out, nbytes, progress)  # no bare super(): a slots dataclass is a new class
        vouched = verified_after and self.crc32c is not None and self.crc32 is None and self.span is None
        with _open(self.path, self.label) as f:
            self._check_size(f)
            out.flush()
            src, dst, start = f.fileno(), out.fileno(), out.tell()
            sums: list = []
            outer = self._outer(f)
            thread = threading.Thread(target=lambda: sums.append(
                _guarded(mapped_checksums, src, self.offset, self.length, self.crc32 is not None, True, outer)))
            if not vouched:
                thread.start()
            try:
                done = 0
                while done < self.length:
                    try:
                        n = copy(src, dst, min(4 * CHUNK, self.length - done), self.offset + done, start + done)
                    except OSError as e:
                        if done or e.errno not in NO_COPY_RANGE:
                            raise
                        n = -1
                    if n <= 0:
                        break
                    done += n
                    if progress:
                        progress(n)
            finally:
                if not vouched:
                    thread.join()
            if sums and isinstance(sums[0], BaseException):
                raise sums[0]
            if n == -1:  # copy_file_range refused (another file system, a pipe): stream instead
                return Source.copy_into(self, out, nbytes, progress)  # no bare super(): a slots dataclass is a new class
            if done != self.length:
                raise CorruptFileError(self.path, "file is truncated", self.label)
            out.seek(start + done)
            crc = self.crc32c if vouched else self._checked(sums[0], f)
            assert crc is not None  # vouched: the file's CRC-32C; else taken with crc32c (True above)
            return crc

    def run_limits(self) -> tuple[int, int]:
        """(regions under this size join runs, bytes per run) for :func:`convert.copying.copy_many`: a run of a
        local file is one ``pread``; a remote region's are larger (a GET costs a round trip)."""
        return SMALL, RUN

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of this region's file, unchecked (a run of regions:
        :func:`convert.copying.copy_many`); fewer at its end. A remote region reads them in one ranged GET."""
        return _pread_region(self.path, offset, length, self.label)

    def _small(self) -> bytes:
        """The bytes of a small region (no ``span``) in one ``pread``, checked."""
        data = _pread_region(self.path, self.offset, self.length, self.label)
        if len(data) != self.length:
            raise CorruptFileError(self.path, "file is truncated", self.label)
        self._check_slice(data)
        return data

    def _check_slice(self, data) -> int:
        """The CRC-32C of ``data`` (this region's bytes), once the file's checksums of it matched."""
        crc = google_crc32c.value(data)
        if self.crc32c is not None and crc != self.crc32c or self.crc32 is not None and zlib_crc32(data) != self.crc32:
            sums = Checksums(self.crc32c is not None, self.crc32 is not None)
            sums.add(data)
            self._checked(sums, None)  # raises, naming the checksum that failed
        return crc

    def _check_length(self, nbytes: int) -> None:
        if nbytes != self.length:
            raise CorruptFileError(self.path, f"holds {self.length} bytes, expected {nbytes}", self.label)

    def _check_size(self, f: BinaryIO) -> None:
        end = max(self.offset + self.length, self.span[1] if self.span else 0)
        if end > os.fstat(f.fileno()).st_size:  # a map past the end would crash
            raise CorruptFileError(self.path, "file is truncated", self.label)

    def _pread(self, f: BinaryIO | None, start: int, end: int) -> bytes:
        assert f is not None  # None only for subclasses that read without a local file (remote objects)
        data = os.pread(f.fileno(), end - start, start)
        if len(data) != end - start:
            raise CorruptFileError(self.path, "file is truncated", self.label)
        return data

    def _outer(self, f: BinaryIO | None) -> int | None:
        """With a ``span``: the CRC-32C of its bytes before the region, to be extended over the region."""
        return None if self.span is None else google_crc32c.value(self._pread(f, self.span[0], self.offset))

    def _checked(self, sums: Checksums, f: BinaryIO | None) -> int | None:
        """``sums.crc32c``, once every checksum the file holds for the region matched."""
        got_c = sums.crc32c
        if self.span is not None:
            assert f is not None
            got_c = google_crc32c.extend(sums.outer, self._pread(f, self.offset + self.length, self.span[1]))
        for kind, want, got in (("crc32c", self.crc32c, got_c), ("crc32", self.crc32, sums.crc32)):
            if want is not None and got != want:
                raise CorruptFileError(self.path, f"checksum mismatch ({kind} {got:#010x}, expected {want:#010x})",
                                       self.label)
        return sums.crc32c


class Checksums:
    """Running CRC-32C and/or CRC-32 (zip's) over consecutive pieces of bytes; ``outer``, when
    given, is a CRC-32C of earlier bytes that is extended over the pieces too."""

    def __init__(self, crc32c: bool = True, crc32: bool = False, outer: int | None = None):
        self.crc32c: int | None = 0 if crc32c else None
        self.crc32: int | None = 0 if crc32 else None
        self.outer = outer

    def add(self, piece) -> None:
        if self.crc32c is not None:
            self.crc32c = google_crc32c.extend(self.crc32c, piece)
        if self.crc32 is not None:
            self.crc32 = zlib_crc32(piece, self.crc32)
        if self.outer is not None:
            self.outer = google_crc32c.extend(self.outer, piece)


NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}


def has_fd(out: BinaryIO) -> bool:
    try:
        out.fileno()
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both
        return False
    return True


def _guarded(fn, *args):
    try:
        return fn(*args)
    except BaseException as e:  # handed to the thread that waits for it
        return e


def mapped_checksums(fd: int, offset: int, length: int, crc32: bool = False, crc32c: bool = True,
                     outer: int | None = None) -> Checksums:
    """Checksums of ``length`` bytes at ``offset`` of an open file whose size was checked, read
    through a memory map: no copy into Python."""
    sums, end = Checksums(crc32c, crc32, outer), offset + length
    if length < SMALL:  # a few KB (one of 50,000 tensors): a map and its unmapping cost more than a read
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise CorruptFileError(None, "file is truncated")
        sums.add(data)
        return sums
    pos = offset - offset % mmap.ALLOCATIONGRANULARITY
    while pos < end:  # one window at a time: mapped pages count in RSS while the map lives
        size = min(CHUNK, end - pos)
        m = mmap.mmap(fd, size, offset=pos, access=mmap.ACCESS_READ)
        try:
            skip = max(0, offset - pos)
            sums.add(np.frombuffer(m, np.uint8, count=size - skip, offset=skip))
        finally:
            m.close()
        pos += size
    return sums


def _open(path: str, label: str | None):
    try:
        return open(path, "rb")
    except OSError as e:
        raise ReadError(path, f"cannot open: {e.strerror}", label) from None


SMALL = 1 << 20
"""Regions under this size are read with one ``pread`` (through an open file of :func:`open_files`)
rather than copied in the kernel or checksummed through a memory map: for a few KB, opening the
file, mapping and starting a thread cost more than the copy itself."""

_cache = threading.local()


@contextmanager
def open_files() -> Iterator[None]:
    """Within this block (one conversion), small regions of the same file share one open file
    descriptor instead of opening the file once per tensor (a checkpoint of 50,000 small tensors
    would otherwise open its data file 100,000 times). The descriptors are closed at the end, so a
    file replaced between two operations is never read through a stale one. Nests; per thread."""
    outer = getattr(_cache, "fds", None)
    if outer is not None:
        yield
        return
    fds: dict[str, int] = {}
    _cache.fds = fds
    try:
        yield
    finally:
        _cache.fds = None
        for fd in fds.values():
            os.close(fd)


@contextmanager
def descriptor(path: str, label: str | None) -> Iterator[int]:
    """A read-only descriptor of ``path``: :func:`open_files`' one when it is open, else a new one closed after."""
    fds = getattr(_cache, "fds", None)
    fd = fds.get(path) if fds is not None else None
    if fd is not None:
        yield fd
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ReadError(path, f"cannot open: {e.strerror}", label) from None
    if fds is not None and len(fds) < 256:
        fds[path] = fd
        yield fd
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _pread_region(path: str, offset: int, length: int, label: str | None) -> bytes:
    """``length`` bytes at ``offset`` of ``path`` (through the descriptor of :func:`open_files` when one is open)."""
    fds = getattr(_cache, "fds", None)
    fd = fds.get(path) if fds is not None else None
    if fd is not None:  # the common case, once per small tensor: no context manager
        return os.pread(fd, length, offset)
    with descriptor(path, label) as fd:
        return os.pread(fd, length, offset)


RUN = 8 << 20  # bytes read at once by convert.copying's copy_many / digest_many


@dataclass(frozen=True, eq=False)
class ArraySource(Source):
    """Bytes produced on demand by a function returning a NumPy array."""

    produce: Callable[[], np.ndarray]

    def array(self, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
        return self.produce()

    def chunks(self, nbytes: int, size: int = CHUNK) -> Iterator[bytes | np.ndarray]:
        flat = encode(self.produce())
        for start in range(0, len(flat), size):
            yield flat[start:start + size]


@dataclass(frozen=True, eq=False)
class BytesSource(Source):
    """Raw bytes held in memory (small tensors made by hand, e.g. quantized blocks in tests)."""

    data: bytes

    def chunks(self, nbytes: int, size: int = CHUNK) -> Iterator[bytes | np.ndarray]:
        if nbytes != len(self.data):
            raise ReadError(None, f"source holds {len(self.data)} bytes, expected {nbytes}")
        for start in range(0, len(self.data), size):
            yield self.data[start:start + size]


_NO_ATTRS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, eq=False, init=False, slots=True)
class Tensor:
    """One named tensor of the IR. Its data is read only when asked for.

    Readers make tensors whose ``source`` is a region of the file (copied byte for byte when
    only renamed) or a function producing the array; :meth:`from_array` wraps an array.

    Example:
        >>> import numpy as np
        >>> t = convert.Tensor.from_array("dense/kernel", np.arange(6, dtype=np.float32).reshape(2, 3))
        >>> t, t.nbytes
        (Tensor('dense/kernel', float32, [2, 3]), 24)
        >>> t.numpy()[1]
        array([3., 4., 5.], dtype=float32)
        >>> t.renamed("dense.weight").with_attrs(role="weight").attrs["role"]
        'weight'
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    source: Source
    attrs: Mapping[str, str] = field(default_factory=lambda: _NO_ATTRS)
    """Namespaced facts about the tensor (``role``: ``weight``/``optimizer``/``step``; ``origin``...)."""
    _nbytes: int = field(default=-1, repr=False)  # :attr:`nbytes`, once known (strings: when first asked)

    def __init__(self, name: str, dtype: DType, shape: Iterable[int], source: Source,
                 attrs: Mapping[str, str] = _NO_ATTRS):
        # 200,000 calls for a 50,000-tensor conversion: slots (no instance dict) and no __post_init__
        if type(attrs) is not MappingProxyType:  # a proxy is already read-only: shared, not copied
            attrs = MappingProxyType(dict(attrs)) if attrs else _NO_ATTRS
        shape = tuple(map(int, shape))
        _set(self, "name", name)
        _set(self, "dtype", dtype)
        _set(self, "shape", shape)
        _set(self, "source", source)
        _set(self, "attrs", attrs)  # asked for several times per tensor by writers and checks: kept
        _set(self, "_nbytes", dtype.nbytes(math.prod(shape)) if dtype.kind != "string" else -1)

    @classmethod
    def from_array(cls, name: str, array, attrs: Mapping[str, str] | None = None) -> Tensor:
        """A tensor holding a copy of ``array`` (so later changes to it do not leak in)."""
        from .dtypes import from_numpy

        arr = np.array(array, copy=True)
        dtype = from_numpy(arr.dtype)
        if dtype.kind != "string" and arr.dtype != dtype.numpy:
            arr = arr.astype(dtype.numpy)
        if dtype.kind == "string":
            arr = _as_bytes_array(arr)
        arr.setflags(write=False)
        return cls(name, dtype, arr.shape, ArraySource(lambda: arr), attrs or {})

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the raw data; for strings, the sum of the element lengths (read lazily, once)."""
        n = self._nbytes
        if n < 0:
            n = sum(len(s) for s in self.numpy().reshape(-1))
            _set(self, "_nbytes", n)
        return n

    def numpy(self) -> np.ndarray:
        """The values as a C-contiguous little-endian array of this tensor's dtype and shape."""
        arr = self.source.array(self.dtype, self.shape)
        if self.dtype.kind == "string":
            arr = _as_bytes_array(arr)
        elif arr.dtype != self.dtype.numpy:
            raise ReadError(None, f"source produced {arr.dtype}, expected {self.dtype}", self.name)
        if tuple(arr.shape) != self.shape:
            if arr.size != self.numel:
                raise ReadError(None, f"source produced shape {arr.shape}, expected {self.shape}", self.name)
            arr = arr.reshape(self.shape)
        return arr if arr.flags.c_contiguous else arr.copy(order="C")  # ascontiguousarray makes 0-d 1-d

    def chunks(self, size: int = CHUNK) -> Iterator[bytes | np.ndarray]:
        """The raw bytes (little-endian, C order) in pieces of at most ``size`` bytes."""
        if self.dtype.kind == "string":
            raise WriteError(None, "string tensors have no raw byte form", self.name)
        return self.source.chunks(self.nbytes, size)

    def copy_into(self, out: BinaryIO, progress: Callable[[int], None] | None = None,
                  verified_after: bool = False) -> int:
        """Write the raw bytes to the file ``out`` at its position, by the fastest means the
        source allows; return their CRC-32C (see :func:`digest` and :meth:`Source.copy_into`)."""
        if self.dtype.kind == "string":
            raise WriteError(None, "string tensors have no raw byte form", self.name)
        try:
            return self.source.copy_into(out, self.nbytes, progress, verified_after)
        except ReadError as e:
            if e.path is None and e.tensor is None:  # a source's own complaint: say which tensor
                raise type(e)(None, e.message, self.name) from None
            raise

    def tobytes(self) -> bytes:
        if isinstance(self.source, FileRegion):
            return self.source.read()
        return b"".join(self.chunks())  # type: ignore[arg-type]  # numpy's stubs give ndarray the buffer protocol (PEP 688) on Python >= 3.12 only

    def renamed(self, name: str) -> Tensor:
        return self._but(name=name)

    def with_attrs(self, **attrs: str) -> Tensor:
        return self._but(attrs=MappingProxyType({**self.attrs, **attrs}))

    def with_source(self, source: Source) -> Tensor:
        """The same tensor with its bytes from ``source`` (of the same dtype and shape)."""
        return self._but(source=source)

    def _but(self, name: str | None = None, source: Source | None = None,
             attrs: Mapping[str, str] | None = None) -> Tensor:
        # the fields here are already in their final form: copied, not re-checked by __init__
        t = object.__new__(type(self))
        _set(t, "name", self.name if name is None else name)
        _set(t, "dtype", self.dtype)
        _set(t, "shape", self.shape)
        _set(t, "source", self.source if source is None else source)
        _set(t, "attrs", self.attrs if attrs is None else attrs)
        _set(t, "_nbytes", self._nbytes)
        return t

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.dtype.name}, {list(self.shape)})"


_set = object.__setattr__  # a frozen dataclass's fields are set past its __setattr__


def derived(tensor: Tensor, fn: Callable[[np.ndarray], np.ndarray], dtype: DType,
            shape: tuple[int, ...], name: str | None = None) -> Tensor:
    """A lazy tensor ``fn(tensor.numpy())`` of known dtype and shape; reads ``tensor`` only when asked."""
    def produce():
        out = np.asarray(fn(tensor.numpy()))
        if out.dtype != dtype.numpy and dtype.kind != "string":
            out = out.astype(dtype.numpy)
        return out
    return Tensor(name or tensor.name, dtype, shape, ArraySource(produce), tensor.attrs)


def _as_bytes_array(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=object)
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    for i, v in enumerate(flat_in):
        flat_out[i] = v.encode("utf-8") if isinstance(v, str) else bytes(v)
    return out


class TensorDict(Mapping[str, Tensor]):
    """An ordered, read-only mapping name -> :class:`Tensor`, plus string metadata.

    Metadata keys are namespaced (``source.format``, ``tf.global_step``...). What
    :func:`convert.read` returns and :func:`convert.write` takes; nothing changes one in place
    (:meth:`replace` makes a new one).

    Example:
        >>> import numpy as np
        >>> td = convert.TensorDict.from_arrays({"w": np.ones((2, 2), np.float16), "step": np.int64(7)},
        ...                                     metadata={"note": "made by hand"})
        >>> td
        TensorDict(2 tensors, metadata={'note': 'made by hand'})
        >>> list(td), td["step"].numpy(), td.nbytes
        (['w', 'step'], array(7), 16)
        >>> td.replace([td["w"]]).to_numpy()
        {'w': array([[1., 1.],
               [1., 1.]], dtype=float16)}
    """

    def __init__(self, tensors: Iterable[Tensor] | Mapping[str, Tensor] = (),
                 metadata: Mapping[str, str] | None = None):
        if isinstance(tensors, Mapping):
            tensors = tensors.values()
        given = list(tensors)
        items = {t.name: t for t in given}
        if len(items) != len(given):
            seen: set[str] = set()
            for t in given:
                if t.name in seen:
                    raise UsageError(f"two tensors are named '{t.name}'")
                seen.add(t.name)
        self._tensors = items
        self.metadata: Mapping[str, str] = MappingProxyType({str(k): str(v) for k, v in (metadata or {}).items()})

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, object], metadata: Mapping[str, str] | None = None) -> TensorDict:
        """A TensorDict holding copies of NumPy arrays (or anything ``np.array`` accepts)."""
        return cls((Tensor.from_array(k, v) for k, v in arrays.items()), metadata)

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    # the dict's own views and lookups, not Mapping's (one __getitem__ call per tensor)
    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def keys(self) -> KeysView[str]:
        return self._tensors.keys()

    def values(self) -> ValuesView[Tensor]:
        return self._tensors.values()

    def items(self) -> ItemsView[str, Tensor]:
        return self._tensors.items()

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"TensorDict({len(self)} tensors, metadata={dict(self.metadata)})"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.values() if t.dtype.kind != "string")

    @property
    def portable_metadata(self) -> dict[str, str]:
        """The metadata a writer stores in its output: all but the ``local.`` keys, which
        describe this machine (paths of the source's companion files) and mean nothing elsewhere."""
        return {k: v for k, v in self.metadata.items() if not k.startswith("local.")}

    def replace(self, tensors: Iterable[Tensor] | None = None, metadata: Mapping[str, str] | None = None) -> TensorDict:
        """A new TensorDict with other tensors and/or metadata."""
        return TensorDict(self.values() if tensors is None else tensors,
                          self.metadata if metadata is None else metadata)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Every tensor materialised (for tests and small checkpoints)."""
        return {k: t.numpy() for k, t in self.items()}


def digest(tensor: Tensor) -> int:
    """CRC-32C of a tensor's values, the same for equal values whatever the source.

    Numeric tensors: over the raw bytes. Strings: see :func:`array_digest`.
    """
    if tensor.dtype.kind == "string":
        return array_digest(tensor.numpy())
    return tensor.source.digest(tensor.nbytes)


def array_digest(arr: np.ndarray) -> int:
    """CRC-32C of an array's values as :func:`digest` computes it for a tensor.

    Numeric: over the raw bytes (C order; packed dtypes packed). Strings (object arrays of bytes): over each
    element's length (8 bytes LE) followed by its bytes, so element boundaries count.
    """
    if arr.dtype.kind == "O":
        crc = 0
        for s in arr.reshape(-1):
            crc = google_crc32c.extend(crc, len(s).to_bytes(8, "little"))
            crc = google_crc32c.extend(crc, s)
        return crc
    return google_crc32c.value(encode(arr))
