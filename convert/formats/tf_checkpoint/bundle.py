"""TensorFlow V2 checkpoints ("tensor bundles"): ``prefix.index`` + ``prefix.data-0000K-of-0000N``.

Format (tensorflow/core/util/tensor_bundle/tensor_bundle.{h,cc}, tensor_bundle.proto):
the ``.index`` file is a table (see :mod:`.sstable`) whose key ``""`` holds a
``BundleHeaderProto`` (number of shards, endianness, version) and whose other keys are
tensor names holding a ``BundleEntryProto`` (dtype, shape, shard, offset, size, masked
crc32c). Tensor bytes sit packed, unaligned, in the data shards. Numeric tensors are raw
little-endian bytes; string tensors are varint64 lengths, a masked crc32c of the lengths
(each taken as uint32 LE), then the bytes, and their entry crc32c covers the uint32
lengths, that checksum and the bytes. A partitioned variable has an entry with ``slices``
and no data under its name, plus one entry per slice under the slice key of
:func:`.slices.slice_key` (which starts with a 0 byte, so sorts before every name).

Numeric tensors are returned as lazy :class:`~convert.ir.FileRegion` s, so converting
copies their bytes in bulk and checks their crc on the way.

Remote checkpoints (:mod:`convert.storage`): a prefix may be a URL string, read by ranged GETs
(:class:`~convert.storage.RemoteRegion` s); a writer's prefix may be a
:class:`~convert.storage.RemotePath` given by ``outputs.atomic_output``, each file an upload.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

from ... import storage, wire
from ...copying import copy_many
from ...dtypes import DType, from_tf
from ...errors import CorruptFileError, ReadError, UnsupportedDTypeError, WriteError
from ...ir import ArraySource, FileRegion, Tensor
from ...lazy import np
from ...wire import ProtoError
from .protowire import BundleEntry, BundleHeader
from .slices import assemble, slice_bounds, slice_key
from .sstable import TableReader, TableWriter, crc32c_extend, mask_crc, unmask_crc

BUNDLE_VERSION = 1  # kTensorBundleVersion


def sibling(prefix, suffix: str):
    """``prefix + suffix``, for a string prefix or a RemotePath one (an output's upload)."""
    return prefix.with_name(prefix.name + suffix) if isinstance(prefix, storage.RemotePath) else prefix + suffix


def data_path(prefix, shard: int, num_shards: int):
    return sibling(prefix, f".data-{shard:05d}-of-{num_shards:05d}")


def _create(path):
    """A file open for writing: a local one, or an upload of a remote output."""
    return path.open("wb") if isinstance(path, storage.RemotePath) else open(path, "wb")


def read_bundle(prefix: str, attrs: Callable[[str], Mapping[str, str]] | None = None
                ) -> tuple[list[Tensor], BundleHeader]:
    """The tensors of the V2 checkpoint at ``prefix`` (in index order) and its header; ``attrs(name)``
    gives each tensor's attrs (made here, not copied onto 50,000 tensors afterwards)."""
    index_path = prefix + ".index"
    rows = TableReader(index_path).entries()  # every block decoded in one pass each
    header = None
    if rows and rows[0][0] == b"":  # keys are sorted: the header's "" comes first
        try:
            header = BundleHeader.decode(rows[0][1])
        except ProtoError as e:
            raise CorruptFileError(index_path, f"bad bundle header: {e}") from None
    entries = {key: value for key, value in rows if key[:1] == b"\x00"}  # slices of partitioned variables
    if header is None:
        raise CorruptFileError(index_path, "no bundle header (key \"\"); not a V2 checkpoint index")
    if header.big_endian:
        raise ReadError(index_path, "big-endian checkpoints are not supported")
    if header.min_consumer > BUNDLE_VERSION or BUNDLE_VERSION in header.bad_consumers:
        raise ReadError(index_path, f"checkpoint needs a reader of bundle version >= {header.min_consumer}")
    if header.num_shards < 1:
        raise CorruptFileError(index_path, f"bad number of shards {header.num_shards}")
    shard_sizes, shard_paths = [], []  # one path string per shard, shared by its tensors' regions
    remote = storage.is_remote(prefix)
    objs: list = []  # remote: each shard's RemotePath
    for k in range(header.num_shards):  # one at a time: a header may claim 2**31 shards
        p = data_path(prefix, k, header.num_shards)
        try:
            if remote:
                obj = storage.as_path(p)
                shard_sizes.append(obj.stat().st_size)
                objs.append(obj)
            else:
                shard_sizes.append(os.path.getsize(p))
        except (OSError, ReadError):
            if remote and storage.as_path(p).exists():
                raise  # there, but unreadable: the storage layer's message (access denied...)
            raise ReadError(p, "data shard of the checkpoint is missing") from None
        shard_paths.append(p)

    def region(shard: int, offset: int, size: int, **checks) -> FileRegion:
        if remote:
            return storage.RemoteRegion(shard_paths[shard], offset, size, remote=objs[shard], **checks)
        return FileRegion(shard_paths[shard], offset, size, **checks)

    def decode_entry(value: bytes, name: str) -> BundleEntry:
        try:
            return BundleEntry.decode(value)
        except ProtoError as e:
            raise CorruptFileError(index_path, f"bad index entry: {e}", name) from None

    def source(entry: BundleEntry, name: str, dtype: DType, shape: tuple[int, ...]):
        if entry.shard_id >= header.num_shards:
            raise CorruptFileError(index_path, f"shard {entry.shard_id} of {header.num_shards}", name)
        path = shard_paths[entry.shard_id]
        if entry.offset + entry.size > shard_sizes[entry.shard_id]:
            raise CorruptFileError(path, f"tensor data [{entry.offset}, {entry.offset + entry.size}) runs past "
                                   f"the end of the file ({shard_sizes[entry.shard_id]} bytes); truncated?", name)
        if dtype.kind == "string":
            raw = region(entry.shard_id, entry.offset, entry.size, label=name)
            return ArraySource(lambda: read_string_tensor(path, entry, shape, name, raw))
        if entry.size != math.prod(shape) * dtype.itemsize:
            raise CorruptFileError(path, f"entry size {entry.size} does not match {dtype}{list(shape)}", name)
        return region(entry.shard_id, entry.offset, entry.size, crc32c=unmask_crc(entry.crc32c), label=name)

    tensors = []
    kinds: dict[int, DType] = {}  # TF dtype number -> row (a checkpoint has a few)
    for key, value in rows:
        if not key or key[0] == 0:
            continue  # the header, or a slice of a partitioned variable: read through its full entry
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFileError(index_path, f"tensor name {key!r} is not UTF-8") from None
        entry = decode_entry(value, name)
        dtype = kinds.get(entry.dtype)  # None until looked up below
        if dtype is None:
            try:
                dtype = kinds[entry.dtype] = from_tf(entry.dtype)
            except UnsupportedDTypeError:
                raise ReadError(index_path, f"unsupported TensorFlow dtype {entry.dtype}", name) from None
        shape = entry.shape
        if not entry.slices:
            shard, end = entry.shard_id, entry.offset + entry.size
            if (not remote and dtype.kind != "string" and shard < header.num_shards and end <= shard_sizes[shard]
                    and entry.size == math.prod(shape) * dtype.itemsize):  # the common case, checked inline
                src: FileRegion | ArraySource = FileRegion(shard_paths[shard], entry.offset, entry.size,
                                                           unmask_crc(entry.crc32c), name)
            else:
                src = source(entry, name, dtype, shape)  # checked there, each failure named
            tensors.append(Tensor(name, dtype, shape, src, attrs(name) if attrs else {}))
            continue
        # A partitioned variable's slices hold all its bytes (a string: at least a byte per element)
        # in the data files: a shape claiming more is refused before anything is allocated for it.
        if math.prod(shape) * (dtype.itemsize if dtype.kind != "string" else 1) > sum(shard_sizes):
            raise CorruptFileError(index_path, f"partitioned {dtype}{list(shape)} is larger than the data "
                                   f"files ({sum(shard_sizes)} bytes)", name)
        parts = []
        for extents in entry.slices:
            skey = slice_key(name, extents)
            if skey not in entries:
                raise CorruptFileError(index_path, "a slice of this partitioned variable is missing", name)
            sentry = decode_entry(entries[skey], name)
            try:
                _, sub = slice_bounds(extents, shape)
            except ValueError as e:
                raise CorruptFileError(index_path, f"bad slice: {e}", name) from None
            parts.append((extents, source(sentry, name, dtype, sub)))
        tensors.append(Tensor(name, dtype, shape, ArraySource(_assembler(index_path, name, dtype, shape, parts)),
                              attrs(name) if attrs else {}))
    return tensors, header


def _assembler(path, name, dtype, shape, parts):
    def produce():
        return assemble(path, name, dtype, shape,
                        [(ext, (lambda sub, src=src: src.array(dtype, sub))) for ext, src in parts])  # type: ignore[misc]  # the default argument binds the loop's value; mypy cannot infer such lambdas
    return produce


def read_string_tensor(path: str, entry: BundleEntry, shape: tuple[int, ...], name: str,
                       raw: FileRegion | None = None) -> np.ndarray:
    """Decode (and checksum) a V2 string tensor (its bytes: ``raw``, by default in the local file ``path``)."""
    n = math.prod(shape)
    data = (raw or FileRegion(path, entry.offset, entry.size, label=name)).read()
    b = np.frombuffer(data, dtype=np.uint8)
    try:
        ends = np.flatnonzero(b[:10 * n] < 0x80)[:n]
        if len(ends) != n:
            raise ProtoError("lengths are truncated")
        lengths_end = int(ends[-1]) + 1 if n else 0
        lengths = wire.decode_varints(data[:lengths_end])
        if len(lengths) != n:
            raise ProtoError("lengths are malformed")
    except ProtoError as e:
        raise CorruptFileError(path, f"bad string tensor: {e}", name) from None
    crc = _lengths_crc(lengths)
    stored = data[lengths_end:lengths_end + 4]
    if len(stored) != 4 or struct.unpack("<I", stored)[0] != mask_crc(crc):
        raise CorruptFileError(path, "checksum mismatch in the string lengths", name)
    body = memoryview(data)[lengths_end + 4:]
    if int(lengths.sum()) != len(body):
        raise CorruptFileError(path, f"strings hold {len(body)} bytes, lengths say {int(lengths.sum())}", name)
    crc = crc32c_extend(crc32c_extend(crc, stored), body)
    if crc != unmask_crc(entry.crc32c):
        raise CorruptFileError(path, f"checksum mismatch (crc32c {crc:#010x}, expected "
                               f"{unmask_crc(entry.crc32c):#010x})", name)
    out = np.empty(n, dtype=object)
    pos = 0
    for i, ln in enumerate(lengths.tolist()):
        out[i] = bytes(body[pos:pos + ln])
        pos += ln
    return out.reshape(shape)


def _lengths_crc(lengths: np.ndarray) -> int:
    # TF checksums each length as uint32 LE (uint64 LE when it does not fit), not the varints.
    if not len(lengths) or int(lengths.max()) <= 0xFFFFFFFF:
        return crc32c_extend(0, lengths.astype("<u4").tobytes())
    crc = 0
    for ln in lengths.tolist():
        crc = crc32c_extend(crc, struct.pack("<I" if ln <= 0xFFFFFFFF else "<Q", ln))
    return crc


def encode_string_tensor(arr: np.ndarray) -> tuple[list[bytes], int]:
    """The on-disk pieces of a string tensor and their (unmasked) entry crc32c."""
    flat = [bytes(s) for s in arr.reshape(-1)]
    lengths = np.array([len(s) for s in flat], dtype=np.uint64)
    crc = _lengths_crc(lengths)
    checksum = struct.pack("<I", mask_crc(crc))
    pieces = [wire.encode_varints(lengths.view(np.int64)), checksum, *flat]
    for p in pieces[1:]:
        crc = crc32c_extend(crc, p)
    return pieces, crc


def write_bundle(tensors: Iterable[Tensor], prefix: str | storage.RemotePath) -> None:
    """Write a one-shard V2 checkpoint at ``prefix`` (``prefix.index``, ``prefix.data-00000-of-00001``).

    Tensors are written in index (bytewise name) order, each streamed chunk by chunk.
    """
    tensors = sorted(tensors, key=lambda t: t.name.encode("utf-8"))
    index = sibling(prefix, ".index")
    entries = write_data_shard(tensors, data_path(prefix, 0, 1), 0, index)
    write_bundle_index(index, [(t, e) for t, e in zip(tensors, entries, strict=True)], 1)


def write_data_shard(tensors: Sequence[Tensor], path: str | storage.RemotePath, shard: int = 0,
                     index_path: str | storage.RemotePath | None = None) -> list:
    """Write the data shard file ``path`` (tensors packed in the order given); returns
    ``[name, offset, size, crc32c]`` of each (the crc unmasked: of what the file stores)."""
    where = index_path or path
    for t in tensors:
        if not t.name or t.name.startswith("\x00"):
            raise WriteError(where, "tensor names must be non-empty and not start with a NUL byte", t.name)
        if t.dtype.tf is None:  # pragma: no cover - every table dtype has a TF number
            raise WriteError(where, f"TensorFlow cannot hold {t.dtype}", t.name)
    entries = []
    with _create(path) as f:
        offset = 0
        numeric: list[Tensor] = []  # copied together (copying.copy_many: runs of small tensors in one read)

        def flush() -> None:
            nonlocal offset
            for t, crc in zip(numeric, copy_many(numeric, f), strict=True):
                entries.append([t.name, offset, t.nbytes, crc])
                offset += t.nbytes
            numeric.clear()

        for t in tensors:
            if t.dtype.kind != "string":
                numeric.append(t)
                continue
            flush()
            pieces, crc = encode_string_tensor(t.numpy())
            size = 0
            for piece in pieces:
                f.write(piece)
                size += len(piece)
            entries.append([t.name, offset, size, crc])
            offset += size
        flush()
    return entries


def write_bundle_index(index_path: str | storage.RemotePath, placed: Sequence[tuple[Tensor, list]], num_shards: int,
                       shard_of: Callable[[str], int] | None = None) -> None:
    """Write the ``.index`` table of a V2 checkpoint: one entry per (tensor, ``[name, offset, size,
    crc32c]``) as :func:`write_data_shard` gave them, in bytewise name order."""
    with _create(index_path) as f:
        f.write(bundle_index_bytes(placed, num_shards, shard_of))


def bundle_index_bytes(placed: Sequence[tuple[Tensor, list]], num_shards: int,
                       shard_of: Callable[[str], int] | None = None) -> bytes:
    """The bytes of a V2 ``.index`` table (see :func:`write_bundle_index`)."""
    import io

    rows = sorted(placed, key=lambda p: p[0].name.encode("utf-8"))
    buf = io.BytesIO()
    table = TableWriter(buf)
    table.add(b"", BundleHeader(num_shards=num_shards, producer=BUNDLE_VERSION).encode())
    for t, (_, offset, size, crc) in rows:
        shard = shard_of(t.name) if shard_of else 0
        assert t.dtype.tf is not None  # the core refused, before writing, what a checkpoint cannot hold
        table.add(t.name.encode("utf-8"), BundleEntry(t.dtype.tf, t.shape, shard, offset, size, mask_crc(crc)).encode())
    table.finish()
    return buf.getvalue()
