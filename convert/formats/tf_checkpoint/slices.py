"""TensorFlow V1 checkpoints (``SavedTensorSlices`` in one or more table files).

Format (tensorflow/core/util/tensor_slice_writer.h, saved_tensor_slice.proto): a table
whose key ``""`` holds ``SavedTensorSlices.meta`` (for each tensor: name, shape, dtype and
the list of saved slices; a full extent is an empty ``Extent``), and one key per slice,
``EncodeTensorNameSlice(name, slice)`` (OrderedCode, see :func:`slice_key`), holding
``SavedTensorSlices.data``: a ``SavedSlice`` whose ``TensorProto`` carries the values in
the typed repeated fields (``float_val``, ``half_val``...), never ``tensor_content``.
A sharded V1 checkpoint is several such files named ``prefix-0000K-of-0000N``.

Partitioned variables are saved as several slices of one tensor; we assemble them.
TensorFlow's own ``get_tensor`` cannot read V1 float16, complex64 or partitioned tensors
(``tf.raw_ops.RestoreV2`` can); we read all of them.

The same slice keys name the slice entries of V2 partitioned variables.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from collections.abc import Callable, Iterator
from typing import cast

from ...dtypes import DType, from_tf
from ...errors import CorruptFileError, ReadError, UnsupportedDTypeError, WriteError
from ...ir import ArraySource, FileRegion, Source, Tensor
from ...lazy import np
from ...wire import (
    BYTES,
    FIXED32,
    FIXED64,
    ProtoError,
    decode_varints,
    encode_varint,
    encode_varints,
    field_bytes,
    read_varint,
    tag,
    varints_size,
)
from . import protowire as pw
from .protowire import Extent
from .sstable import NO_COMPRESSION, TRAILER_SIZE, TableReader, TableWriter, unmask_crc

# ------------------------------------------------------------- slice keys (OrderedCode)
# tensorflow/core/lib/strings/ordered_code.cc and tensorflow/core/util/saved_tensor_slice_util.cc


def _num_increasing(n: int) -> bytes:
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return bytes([len(body)]) + body


_LENGTH_HEADER = [(0, 0), (0x80, 0), (0xC0, 0), (0xE0, 0), (0xF0, 0), (0xF8, 0),
                  (0xFC, 0), (0xFE, 0), (0xFF, 0), (0xFF, 0x80), (0xFF, 0xC0)]


def _signed_num_increasing(v: int) -> bytes:
    x = ~v if v < 0 else v
    if x < 64:
        return bytes([(0x80 ^ v) & 0xFF])
    length = x.bit_length() // 7 + 1
    buf = bytearray(v.to_bytes(10, "big", signed=True))
    begin = 10 - length
    buf[begin] ^= _LENGTH_HEADER[length][0]
    buf[begin + 1] ^= _LENGTH_HEADER[length][1]
    return bytes(buf[begin:])


def _ordered_string(s: bytes) -> bytes:
    return s.replace(b"\xff", b"\xff\x00").replace(b"\x00", b"\x00\xff") + b"\x00\x01"


def slice_key(name: str, extents: list[Extent]) -> bytes:
    """``EncodeTensorNameSlice``: the table key of one saved slice (a whole extent has length -1)."""
    out = bytearray(_num_increasing(0))
    out += _ordered_string(name.encode("utf-8"))
    out += _num_increasing(len(extents))
    for e in extents:
        out += _signed_num_increasing(e.start)
        out += _signed_num_increasing(-1 if e.length is None else e.length)
    return bytes(out)


# ------------------------------------------------------------- slice assembly

def slice_bounds(extents: list[Extent], shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """NumPy index and shape of a slice of a tensor of ``shape``; ValueError if it does not fit."""
    if len(extents) != len(shape):
        raise ValueError(f"slice of rank {len(extents)} for a tensor of rank {len(shape)}")
    index, sub = [], []
    for e, dim in zip(extents, shape, strict=True):
        length = dim - e.start if e.length is None or e.length < 0 else e.length
        if e.start < 0 or e.start + length > dim:
            raise ValueError(f"slice [{e.start}, {e.start + length}) outside dimension {dim}")
        index.append(slice(e.start, e.start + length))
        sub.append(length)
    return tuple(index), tuple(sub)


def assemble(path: str, name: str, dtype: DType, shape: tuple[int, ...],
             parts: list[tuple[list[Extent], Callable[[tuple[int, ...]], np.ndarray]]]) -> np.ndarray:
    """The full tensor from its slices; ``parts`` are (extents, fn(slice shape) -> array).

    The slices' extents are checked before the tensor is allocated: a header claiming a vast
    shape made of empty slices allocates nothing.
    """
    bounds = []
    for extents, produce in parts:
        try:
            bounds.append((*slice_bounds(extents, shape), produce))
        except ValueError as e:
            raise CorruptFileError(path, f"bad slice: {e}", name) from None
    covered = sum(math.prod(sub) for _, sub, _ in bounds)
    if covered != math.prod(shape):
        raise CorruptFileError(path, f"slices cover {covered} of {math.prod(shape)} elements", name)
    out = np.empty(shape, dtype=object if dtype.kind == "string" else dtype.numpy)
    for index, sub, produce in bounds:
        out[index] = np.asarray(produce(sub)).reshape(sub)
    return out


# ------------------------------------------------------------- TensorProto values

_FIXED_FIELDS = {  # dtype name -> (field, element numpy dtype, element size)
    "float32": (pw.TP_FLOAT, "<f4"), "float64": (pw.TP_DOUBLE, "<f8"),
    "complex64": (pw.TP_SCOMPLEX, "<c8"), "complex128": (pw.TP_DCOMPLEX, "<c16"),
}
_VARINT_FIELDS = {
    "float16": pw.TP_HALF, "bfloat16": pw.TP_HALF,
    "int8": pw.TP_INT, "int16": pw.TP_INT, "int32": pw.TP_INT, "uint8": pw.TP_INT, "uint16": pw.TP_INT,
    "int64": pw.TP_INT64, "uint32": pw.TP_UINT32, "uint64": pw.TP_UINT64, "bool": pw.TP_BOOL,
}


def tensor_proto_values(buf: bytes | bytearray | memoryview, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    """The values of a TensorProto (typed fields or ``tensor_content``) as an array of ``shape``.

    Raises ProtoError when the proto does not hold exactly the expected element count.
    """
    n = math.prod(shape)
    fields = pw.decode_tensor_proto(buf)
    if dtype.kind == "string":
        vals = [bytes(v) for wt, v in fields.get(pw.TP_STRING, []) if wt == BYTES]
        if len(vals) != n:
            raise ProtoError(f"{len(vals)} strings, expected {n}")
        arr = np.empty(n, dtype=object)
        arr[:] = vals
        return arr.reshape(shape)
    content = fields.get(pw.TP_CONTENT)
    if content:
        raw = b"".join(bytes(v) for _, v in content)
        if len(raw) != n * dtype.itemsize:
            raise ProtoError(f"tensor_content holds {len(raw)} bytes, expected {n * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype.numpy).reshape(shape)
    if dtype.name in _FIXED_FIELDS:
        num, elem = _FIXED_FIELDS[dtype.name]
        width = 4 if elem in ("<f4", "<c8") else 8
        wire = FIXED32 if width == 4 else FIXED64
        if any(wt not in (BYTES, wire) for wt, _ in fields.get(num, [])):
            raise ProtoError(f"field {num} has the wrong wire type")
        pieces = [bytes(v) if wt == BYTES else v.to_bytes(width, "little") for wt, v in fields.get(num, [])]
        arr = np.frombuffer(b"".join(pieces), dtype=dtype.numpy)
    elif dtype.name in _VARINT_FIELDS:
        num = _VARINT_FIELDS[dtype.name]
        pieces = [v if wt == BYTES else encode_varint(v) for wt, v in fields.get(num, [])]
        packed = pieces[0] if len(pieces) == 1 else b"".join(bytes(v) for v in pieces)
        if dtype.name in ("float16", "bfloat16"):
            arr = decode_varints(packed, lambda raw: raw.astype(np.uint16)).view(dtype.numpy)
        elif dtype.name == "bool":
            arr = decode_varints(packed, lambda raw: raw != 0)
        else:  # int_val holds sign-extended int32 values: truncate like C++ does
            arr = decode_varints(packed, lambda raw: raw.astype(dtype.numpy))
    elif dtype.name.startswith("float8"):
        raw = b"".join(bytes(v) for _, v in fields.get(pw.TP_FLOAT8, []))
        arr = np.frombuffer(raw, dtype=dtype.numpy)
    else:  # pragma: no cover - every table dtype is handled above
        raise ProtoError(f"no TensorProto field for {dtype}")
    if arr.size != n:
        raise ProtoError(f"{arr.size} values, expected {n}")
    return arr.reshape(shape)


def encode_tensor_proto(arr: np.ndarray, dtype: DType) -> bytes:
    """A TensorProto holding only the typed value field, as TF's ``TensorSliceWriter`` writes it."""
    flat = arr.reshape(-1)
    if dtype.kind == "string":
        return b"".join(field_bytes(pw.TP_STRING, s) for s in flat)
    if flat.size == 0:
        return b""  # an empty packed field is not written
    if dtype.name in _FIXED_FIELDS:
        num, elem = _FIXED_FIELDS[dtype.name]
        return field_bytes(num, np.ascontiguousarray(flat, dtype=elem).tobytes())
    return field_bytes(_VARINT_FIELDS[dtype.name], encode_varints(_stored_ints(flat, dtype)))


_PIECE = 1 << 20  # elements per piece of a streamed V1 value: a few MB of temporaries, not the tensor's


def _element_pieces(t: Tensor) -> Iterator[np.ndarray]:
    """The tensor's values in pieces of at most ``_PIECE`` elements, as they come from its source."""
    size, carry = t.dtype.itemsize, b""
    for chunk in t.chunks(_PIECE * size):
        raw = carry + bytes(chunk) if carry else memoryview(chunk).cast("B")  # type: ignore[arg-type]  # numpy's stubs give ndarray the buffer protocol (PEP 688) on Python >= 3.12 only
        whole = len(raw) - len(raw) % size
        carry = bytes(raw[whole:])
        if whole:
            yield np.frombuffer(raw[:whole], dtype=t.dtype.numpy)
    if carry:
        raise ReadError(None, "source ended inside an element", t.name)


def _stored_ints(values: np.ndarray, dtype: DType) -> np.ndarray:
    """What a varint field of the TensorProto stores for ``values`` (see :func:`encode_tensor_proto`)."""
    if dtype.name in ("float16", "bfloat16"):
        return values.view(np.uint16)
    return values.view(np.int64) if dtype.name == "uint64" else values.astype(np.int64)


def tensor_proto_stream(t: Tensor) -> tuple[int, Callable[[], Iterator[bytes]]]:
    """The bytes :func:`encode_tensor_proto` gives for ``t``, as (length, a function yielding them
    in pieces): numeric values are encoded a piece at a time (a varint field's length is counted in
    a first pass), so memory does not grow with the tensor."""
    if t.dtype.kind == "string" or t.numel == 0:
        data = encode_tensor_proto(t.numpy(), t.dtype)
        return len(data), lambda: iter([data])
    if t.dtype.name in _FIXED_FIELDS:  # the little-endian bytes themselves
        head = tag(_FIXED_FIELDS[t.dtype.name][0], BYTES) + encode_varint(t.nbytes)
        return len(head) + t.nbytes, lambda: itertools.chain([head], (bytes(c) for c in t.chunks()))
    num = _VARINT_FIELDS[t.dtype.name]
    packed = sum(varints_size(_stored_ints(v, t.dtype)) for v in _element_pieces(t))
    head = tag(num, BYTES) + encode_varint(packed)

    def pieces() -> Iterator[bytes]:
        yield head
        for v in _element_pieces(t):
            yield encode_varints(_stored_ints(v, t.dtype))
    return len(head) + packed, pieces


# ------------------------------------------------------------- reading

def read_v1(files: list[str]) -> tuple[list[Tensor], int]:
    """The tensors of a V1 checkpoint made of ``files`` (one per shard) and its producer version."""
    tables = [TableReader(f) for f in files]
    merged: dict[str, tuple[DType, tuple[int, ...], list, str]] = {}
    producer = 0
    for table in tables:
        raw = table.get(b"")
        if raw is None:
            raise CorruptFileError(table.path, "no SavedTensorSlices meta entry (key \"\"); not a V1 checkpoint")
        try:
            meta, _ = pw.split_saved_tensor_slices(raw)
            if meta is None:
                raise ProtoError("the \"\" entry has no meta")
            metas, producer = pw.decode_saved_meta(meta)
        except ProtoError as e:
            raise CorruptFileError(table.path, f"bad checkpoint meta: {e}") from None
        for m in metas:
            try:
                dtype = from_tf(m.dtype)
            except UnsupportedDTypeError:
                raise ReadError(table.path, f"unsupported TensorFlow dtype {m.dtype}", m.name) from None
            if m.name in merged:
                prev = merged[m.name]
                if prev[0] != dtype or prev[1] != m.shape:
                    raise CorruptFileError(table.path, "shards disagree on dtype or shape", m.name)
            else:
                merged[m.name] = (dtype, m.shape, [], table.path)  # the file that declares it
            merged[m.name][2].extend((ext, table) for ext in m.slices)
    # Every element takes at least one byte of a file (a packed varint, a fixed-width value, a
    # string's tag): a shape claiming more is refused before anything is allocated for it.
    total = sum(table.file_size for table in tables)
    tensors = []
    for name in sorted(merged, key=lambda s: s.encode("utf-8")):
        dtype, shape, slices, where = merged[name]
        if math.prod(shape) > total:
            raise CorruptFileError(tables[0].path, f"shape {list(shape)} has more elements than the "
                                   f"checkpoint has bytes ({total})", name)
        source: Source | None = None
        if len(slices) == 1 and all(e.length is None for e in slices[0][0]):  # the whole tensor in one slice
            source = _raw_region(slices[0][1], slice_key(name, slices[0][0]), name, dtype, shape)
        tensors.append(Tensor(name, dtype, shape, source or ArraySource(_v1_producer(name, dtype, shape, slices, where))))
    return tensors, producer


_RAW_FROM = 1 << 20  # bytes of values from which a V1 tensor is located in its file, to be copied as is


def _raw_region(table: TableReader, key: bytes, name: str, dtype: DType, shape: tuple[int, ...]) -> FileRegion | None:
    """Where a big float or complex tensor's values sit, raw little-endian bytes in an uncompressed
    block (the packed ``float_val``... field, as TF writes it), as a file region checked by its
    block's crc; None for any other layout, which the general reader parses instead.

    Only entry headers and the value's first bytes are read, never the values.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if dtype.name not in _FIXED_FIELDS or nbytes < _RAW_FROM:
        return None
    handle = table.block_for(key)
    if handle is None:
        return None
    off, size = handle
    if off + size + TRAILER_SIZE > table.file_size or size < 4:
        return None
    try:
        with open(table.path, "rb") as f:
            fd = f.fileno()
            trailer = os.pread(fd, TRAILER_SIZE, off + size)
            restarts = struct.unpack("<I", os.pread(fd, 4, off + size - 4))[0]
            limit = size - 4 * (restarts + 1)
            if len(trailer) != TRAILER_SIZE or trailer[0] != NO_COMPRESSION:
                return None
            pos, k = 0, b""
            while True:  # the block's entries: shared, unshared, value lengths, key suffix, value
                if pos >= limit:
                    return None
                head = os.pread(fd, 15 + len(key), off + pos)
                shared, p = read_varint(head, 0)
                unshared, p = read_varint(head, p)
                vlen, p = read_varint(head, p)
                if p + unshared > len(head):
                    head = os.pread(fd, p + unshared, off + pos)
                if shared > len(k) or p + unshared > len(head) or pos + p + unshared + vlen > limit:
                    return None
                k = k[:shared] + head[p:p + unshared]
                value = off + pos + p + unshared
                if k == key:
                    break
                if k > key:
                    return None
                pos += p + unshared + vlen
            found = _packed_field(os.pread(fd, min(vlen, 4096), value), vlen, _FIXED_FIELDS[dtype.name][0])
    except (OSError, ProtoError, struct.error):
        return None  # the general reader says what is wrong
    if found is None or found[1] != nbytes:
        return None
    return FileRegion(table.path, value + found[0], nbytes, crc32c=unmask_crc(struct.unpack("<I", trailer[1:])[0]),
                      label=name, span=(off, off + size + 1))


def _packed_field(head: bytes, total: int, field: int) -> tuple[int, int] | None:
    """(offset, length) of the values in a ``SavedTensorSlices`` value of ``total`` bytes whose first
    bytes are ``head``: data (2) -> SavedSlice.data (3) -> TensorProto.``field``, which must be the
    last bytes of all three messages (as TF writes them). None for anything else."""
    pos, end = 0, total
    for want in (2, 3, field):
        while True:
            if pos >= len(head):
                return None
            key, pos = read_varint(head, pos)
            num, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = read_varint(head, pos)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                length, pos = read_varint(head, pos)
                if num == want:
                    if pos + length != end:  # not the last field: another layout
                        return None
                    break
                pos += length
            else:
                return None
            if pos >= end:
                return None
    return pos, end - pos


def _v1_producer(name: str, dtype: DType, shape: tuple[int, ...], slices: list,
                 where: str) -> Callable[[], np.ndarray]:
    def read_slice(table: TableReader, extents: list[Extent]) -> Callable[[tuple[int, ...]], np.ndarray]:
        def produce(sub: tuple[int, ...]) -> np.ndarray:
            raw = table.get(slice_key(name, extents), label=name)
            if raw is None:
                raise CorruptFileError(table.path, "the data of a saved slice is missing", name)
            try:
                _, data = pw.split_saved_tensor_slices(raw)
                if data is None:
                    raise ProtoError("slice entry has no data")
                _, _, proto = pw.decode_saved_slice(data)
                return tensor_proto_values(proto if proto is not None else b"", dtype, sub)
            except (ProtoError, ValueError) as e:  # ValueError: a byte count that is not whole values
                raise CorruptFileError(table.path, f"bad slice data: {e}", name) from None
        return produce

    def produce_all() -> np.ndarray:
        path = slices[0][1].path if slices else where  # a tensor declared with no slices at all
        if len(slices) == 1:
            extents, table = slices[0]
            try:
                index, sub = slice_bounds(extents, shape)
            except ValueError as e:
                raise CorruptFileError(table.path, f"bad slice: {e}", name) from None
            if sub == shape:
                return read_slice(table, extents)(shape)
        return assemble(path, name, dtype, shape, [(ext, read_slice(t, ext)) for ext, t in slices])
    return produce_all


# ------------------------------------------------------------- writing

_MAX_MESSAGE = (1 << 31) - 1  # protobuf cannot parse a larger message
#: TF 2.21's V1 reading through the checkpoint reader (``get_tensor``, TensorSliceReader::CopySliceData)
#: has no case for these dtypes, although its restore ops read them: writers say so.
GET_TENSOR_REFUSES_V1 = ("float16", "uint16", "complex64", "complex128")


def check_v1_dtypes(tensors: list[Tensor], path: object) -> None:
    """Raise one WriteError listing every tensor whose dtype V1 cannot hold."""
    bad = [f"{t.name} ({t.dtype})" for t in tensors if not t.dtype.tf_v1]  # TF's V1 reader restores the others
    if bad:
        raise WriteError(path, "TensorFlow V1 checkpoints cannot hold these dtypes: " + ", ".join(bad)
                         + "; write a V2 checkpoint (tf-ckpt) instead")


def write_v1_file(tensors: list[Tensor], path: str) -> None:
    """Write ``tensors`` as one V1 table file at ``path`` (each tensor one full slice)."""
    check_v1_dtypes(tensors, path)
    for t in tensors:
        if not t.name or "\x00" in t.name:
            raise WriteError(path, "tensor names must be non-empty and without NUL bytes", t.name)
    ordered = sorted(tensors, key=lambda t: t.name.encode("utf-8"))
    # check_v1_dtypes refused every dtype without a TF number
    metas = [pw.SliceMeta(t.name, t.shape, cast(int, t.dtype.tf), [[Extent() for _ in t.shape]]) for t in ordered]
    keyed = sorted(((slice_key(t.name, [Extent() for _ in t.shape]), t) for t in ordered), key=lambda kt: kt[0])
    with open(path, "wb") as f:
        table = TableWriter(f)
        table.add(b"", field_bytes(1, pw.encode_saved_meta(metas)))
        for key, t in keyed:
            length, values = tensor_proto_stream(t)
            head = (field_bytes(1, t.name.encode("utf-8"))
                    + field_bytes(2, pw.encode_slice([Extent() for _ in t.shape]))
                    + tag(3, BYTES) + encode_varint(length))
            saved_slice = len(head) + length
            if saved_slice + 8 > _MAX_MESSAGE:
                raise WriteError(path, f"a V1 checkpoint cannot hold a tensor of {t.nbytes} bytes "
                                 "(protobuf's 2 GB message limit); write a V2 checkpoint instead", t.name)
            head = tag(2, BYTES) + encode_varint(saved_slice) + head
            table.add_streamed(key, len(head) + length, itertools.chain([head], values()))
        table.finish()

