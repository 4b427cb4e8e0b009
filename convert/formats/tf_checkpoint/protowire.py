"""A tiny protobuf wire-format codec and the few TensorFlow messages checkpoints use.

Why by hand: the messages below (``BundleHeaderProto``, ``BundleEntryProto``,
``TensorSliceProto``, ``SavedTensorSlices``, a subset of ``TensorProto``,
``TensorShapeProto``, ``VersionDef``) are defined in TensorFlow's ``.proto`` files
and their generated Python classes ship only inside the ``tensorflow`` package.
Importing TensorFlow costs seconds and hundreds of MB, and the point of this
adapter is to work without it. The wire format is small and stable
(https://protobuf.dev/programming-guides/encoding/), so we decode exactly the
fields we need and skip the rest, as a protobuf parser does with unknown fields.

Field numbers come from
tensorflow/core/protobuf/tensor_bundle.proto, tensorflow/core/framework/tensor.proto,
tensor_shape.proto, tensor_slice.proto, versions.proto and
tensorflow/core/util/saved_tensor_slice.proto.

Decoding errors raise :class:`ProtoError`; callers turn it into a
:class:`~convert.errors.CorruptFileError` naming the file and tensor.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ...lazy import np

VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5


class ProtoError(ValueError):
    """The bytes are not a valid encoding of the expected message."""


# ---------------------------------------------------------------- wire level

def read_varint(buf, pos: int) -> tuple[int, int]:
    """Decode one base-128 varint at ``pos``; returns (value, new position)."""
    result = shift = 0
    n = len(buf)
    while True:
        if pos >= n:
            raise ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtoError("varint too long")


def encode_varint(value: int) -> bytes:
    """Encode a non-negative int (or a negative one as its 64-bit two's complement)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def iter_fields(buf):
    """Yield (field number, wire type, value) for each field of a message.

    ``value`` is an int for varint/fixed fields and a memoryview for
    length-delimited ones (no copy).
    """
    mv = memoryview(buf)
    pos, n = 0, len(mv)
    while pos < n:
        key, pos = read_varint(mv, pos)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ProtoError("field number 0")
        if wt == VARINT:
            val, pos = read_varint(mv, pos)
        elif wt == FIXED64:
            if pos + 8 > n:
                raise ProtoError("truncated fixed64")
            val = int.from_bytes(mv[pos:pos + 8], "little")
            pos += 8
        elif wt == FIXED32:
            if pos + 4 > n:
                raise ProtoError("truncated fixed32")
            val = int.from_bytes(mv[pos:pos + 4], "little")
            pos += 4
        elif wt == BYTES:
            length, pos = read_varint(mv, pos)
            if pos + length > n:
                raise ProtoError("truncated length-delimited field")
            val = mv[pos:pos + length]
            pos += length
        else:
            raise ProtoError(f"unsupported wire type {wt}")
        yield num, wt, val


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def tag(num: int, wt: int) -> bytes:
    return encode_varint(num << 3 | wt)


def field_varint(num: int, value: int, *, keep_zero: bool = False) -> bytes:
    """A varint field; proto3 omits zero values unless ``keep_zero``."""
    if value == 0 and not keep_zero:
        return b""
    return tag(num, VARINT) + encode_varint(value)


def field_bytes(num: int, value: bytes) -> bytes:
    return tag(num, BYTES) + encode_varint(len(value)) + bytes(value)


def field_fixed32(num: int, value: int) -> bytes:
    if value == 0:
        return b""
    return tag(num, FIXED32) + struct.pack("<I", value)


# ------------------------------------------------------- vectorised varints

def _varint_sizes(v: np.ndarray) -> np.ndarray:
    nbytes = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 10):
        nbytes += (v >> np.uint64(7 * k)) > 0
    return nbytes


def varints_size(values: np.ndarray) -> int:
    """The length of :func:`encode_varints` of ``values``, without encoding them."""
    v = np.ascontiguousarray(values).reshape(-1).astype(np.int64).view(np.uint64)
    return int(_varint_sizes(v).sum())


def encode_varints(values: np.ndarray) -> bytes:
    """Packed varint encoding of an integer array (negatives as 64-bit two's complement)."""
    v = np.ascontiguousarray(values).reshape(-1).astype(np.int64).view(np.uint64)
    if v.size == 0:
        return b""
    nbytes = _varint_sizes(v)
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.zeros(int(ends[-1]), dtype=np.uint8)
    for k in range(10):
        sel = nbytes > k
        if not sel.any():
            break
        byte = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= np.where(nbytes[sel] > k + 1, 0x80, 0).astype(np.uint8)
        out[starts[sel] + k] = byte
    return out.tobytes()


_WINDOW = 1 << 20  # bytes of packed varints decoded at a time: temporaries ~20x this, not the whole field's


def decode_varints(buf, convert: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Decode packed varints into a uint64 array (vectorised), or into ``convert`` of it, a window
    at a time, so that the 64-bit temporaries never span the whole buffer."""
    b = np.frombuffer(buf, dtype=np.uint8)
    if b.size == 0:
        out = np.zeros(0, dtype=np.uint64)
        return convert(out) if convert else out
    if b[-1] & 0x80:
        raise ProtoError("truncated packed varints")
    windows, start = [], 0
    while start < b.size:
        stop = min(start + _WINDOW, b.size)
        if stop < b.size:  # end the window after the last complete varint in it
            ends = np.flatnonzero(b[stop - 16:stop] < 0x80)
            if ends.size == 0:
                raise ProtoError("varint too long")
            stop = stop - 16 + int(ends[-1]) + 1
        windows.append((start, stop))
        start = stop
    out = None
    pos = 0
    for start, stop in windows:  # into one array of the final dtype: no list of parts to concatenate
        raw = _decode_window(b[start:stop])
        part = convert(raw) if convert else raw
        if out is None:
            out = part if len(windows) == 1 else np.empty(
                sum(int(np.count_nonzero(b[a:z] < 0x80)) for a, z in windows), dtype=part.dtype)
        if out is not part:
            out[pos:pos + part.size] = part
        pos += part.size
    return out


def _decode_window(b: np.ndarray) -> np.ndarray:
    ends = np.flatnonzero(b < 0x80)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise ProtoError("varint too long")
    out = np.zeros(ends.size, dtype=np.uint64)
    for k in range(int(lengths.max())):
        sel = lengths > k
        out[sel] |= (b[starts[sel] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return out


# ------------------------------------------------------------ messages

@dataclass
class Extent:
    start: int = 0
    length: int | None = None  # None: the whole dimension


def decode_slice(buf) -> list[Extent]:
    """TensorSliceProto: repeated Extent extent = 1 {int64 start = 1; int64 length = 2 (oneof)}."""
    extents = []
    for num, wt, val in iter_fields(buf):
        if num == 1 and wt == BYTES:
            e = Extent()
            for n2, w2, v2 in iter_fields(val):
                if n2 == 1 and w2 == VARINT:
                    e.start = _signed64(v2)
                elif n2 == 2 and w2 == VARINT:
                    e.length = _signed64(v2)
            extents.append(e)
    return extents


def encode_slice(extents: list[Extent]) -> bytes:
    out = bytearray()
    for e in extents:
        body = field_varint(1, e.start)
        if e.length is not None:
            body += field_varint(2, e.length, keep_zero=True)
        out += field_bytes(1, body)
    return bytes(out)


MAX_RANK = 64  # NumPy's limit (NPY_MAXDIMS)


def check_shape(shape: tuple[int, ...]) -> None:
    """ProtoError unless NumPy can make an array of ``shape`` in any dtype: at most :data:`MAX_RANK`
    dimensions, and the product of the non-zero ones, times 16 bytes (the widest dtype), below 2**63,
    which NumPy checks even for an empty array. Larger shapes are never real; a header claiming
    one is refused here rather than failing in NumPy later."""
    if len(shape) > MAX_RANK:
        raise ProtoError(f"shape of rank {len(shape)} (at most {MAX_RANK})")
    n = 1
    for d in shape:
        n *= d or 1
    if n * 16 >= 1 << 63:
        raise ProtoError(f"shape {list(shape)} is too large for any array")


def decode_shape(buf) -> tuple[int, ...]:
    """TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}; bool unknown_rank = 3."""
    dims = []
    for num, wt, val in iter_fields(buf):
        if num == 2 and wt == BYTES:
            size = 0
            for n2, w2, v2 in iter_fields(val):
                if n2 == 1 and w2 == VARINT:
                    size = _signed64(v2)
            if size < 0:
                raise ProtoError(f"dimension of unknown size ({size})")
            dims.append(size)
        elif num == 3 and wt == VARINT and val:
            raise ProtoError("shape of unknown rank")
    check_shape(tuple(dims))
    return tuple(dims)


def encode_shape(shape: tuple[int, ...]) -> bytes:
    return b"".join(field_bytes(2, field_varint(1, d)) for d in shape)


@dataclass
class BundleHeader:
    """BundleHeaderProto: int32 num_shards = 1; Endianness endianness = 2; VersionDef version = 3."""

    num_shards: int = 1
    big_endian: bool = False
    producer: int = 1
    min_consumer: int = 0
    bad_consumers: list[int] = field(default_factory=list)

    @classmethod
    def decode(cls, buf) -> BundleHeader:
        h = cls(num_shards=0)
        for num, wt, val in iter_fields(buf):
            if num == 1 and wt == VARINT:
                h.num_shards = _signed64(val)
            elif num == 2 and wt == VARINT:
                h.big_endian = val == 1
            elif num == 3 and wt == BYTES:
                h.producer, h.min_consumer, h.bad_consumers = decode_version(val)
        return h

    def encode(self) -> bytes:
        return (field_varint(1, self.num_shards) + field_varint(2, int(self.big_endian))
                + field_bytes(3, encode_version(self.producer, self.min_consumer)))


def decode_version(buf) -> tuple[int, int, list[int]]:
    """VersionDef: int32 producer = 1; int32 min_consumer = 2; repeated int32 bad_consumers = 3."""
    producer = min_consumer = 0
    bad: list[int] = []
    for num, wt, val in iter_fields(buf):
        if num == 1 and wt == VARINT:
            producer = _signed64(val)
        elif num == 2 and wt == VARINT:
            min_consumer = _signed64(val)
        elif num == 3:
            bad.extend(int(x) for x in (decode_varints(val) if wt == BYTES else [val]))
    return producer, min_consumer, bad


def encode_version(producer: int, min_consumer: int = 0) -> bytes:
    return field_varint(1, producer) + field_varint(2, min_consumer)


@dataclass
class BundleEntry:
    """BundleEntryProto: dtype = 1, shape = 2, shard_id = 3, offset = 4, size = 5,
    fixed32 crc32c = 6 (masked), repeated TensorSliceProto slices = 7."""

    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    slices: list[list[Extent]] = field(default_factory=list)

    @classmethod
    def decode(cls, buf) -> BundleEntry:
        e = cls()
        for num, wt, val in iter_fields(buf):
            if num == 1 and wt == VARINT:
                e.dtype = val
            elif num == 2 and wt == BYTES:
                e.shape = decode_shape(val)
            elif num == 3 and wt == VARINT:
                e.shard_id = _signed64(val)
            elif num == 4 and wt == VARINT:
                e.offset = _signed64(val)
            elif num == 5 and wt == VARINT:
                e.size = _signed64(val)
            elif num == 6 and wt == FIXED32:
                e.crc32c = val
            elif num == 7 and wt == BYTES:
                e.slices.append(decode_slice(val))
        if e.offset < 0 or e.size < 0 or e.shard_id < 0:
            raise ProtoError("negative offset, size or shard id")
        return e

    def encode(self) -> bytes:
        # Field order and presence as TF's C++ serializer writes them (shape always present).
        return (field_varint(1, self.dtype) + field_bytes(2, encode_shape(self.shape))
                + field_varint(3, self.shard_id) + field_varint(4, self.offset)
                + field_varint(5, self.size) + field_fixed32(6, self.crc32c)
                + b"".join(field_bytes(7, encode_slice(s)) for s in self.slices))


@dataclass
class SliceMeta:
    """SavedSliceMeta: string name = 1; TensorShapeProto shape = 2; DataType type = 3;
    repeated TensorSliceProto slice = 4."""

    name: str
    shape: tuple[int, ...]
    dtype: int
    slices: list[list[Extent]]


def decode_saved_meta(buf) -> tuple[list[SliceMeta], int]:
    """SavedTensorSliceMeta: repeated SavedSliceMeta tensor = 1; VersionDef versions = 2.

    Returns the tensors and the producer version.
    """
    tensors, producer = [], 0
    for num, wt, val in iter_fields(buf):
        if num == 1 and wt == BYTES:
            name, shape, dtype, slices = "", (), 0, []
            for n2, w2, v2 in iter_fields(val):
                if n2 == 1 and w2 == BYTES:
                    name = _utf8(v2)
                elif n2 == 2 and w2 == BYTES:
                    shape = decode_shape(v2)
                elif n2 == 3 and w2 == VARINT:
                    dtype = v2
                elif n2 == 4 and w2 == BYTES:
                    slices.append(decode_slice(v2))
            tensors.append(SliceMeta(name, shape, dtype, slices))
        elif num == 2 and wt == BYTES:
            producer = decode_version(val)[0]
    return tensors, producer


def encode_saved_meta(tensors: list[SliceMeta], producer: int = 1) -> bytes:
    out = bytearray()
    for t in tensors:
        body = (field_bytes(1, t.name.encode()) + field_bytes(2, encode_shape(t.shape))
                + field_varint(3, t.dtype) + b"".join(field_bytes(4, encode_slice(s)) for s in t.slices))
        out += field_bytes(1, body)
    out += field_bytes(2, encode_version(producer))
    return bytes(out)


def _utf8(buf) -> str:
    try:
        return bytes(buf).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtoError("a name is not valid UTF-8") from None


def split_saved_tensor_slices(buf) -> tuple[memoryview | None, memoryview | None]:
    """SavedTensorSlices: SavedTensorSliceMeta meta = 1; SavedSlice data = 2."""
    meta = data = None
    for num, wt, val in iter_fields(buf):
        if num == 1 and wt == BYTES:
            meta = val
        elif num == 2 and wt == BYTES:
            data = val
    return meta, data


def decode_saved_slice(buf) -> tuple[str, list[Extent], memoryview | None]:
    """SavedSlice: string name = 1; TensorSliceProto slice = 2; TensorProto data = 3."""
    name, extents, data = "", [], None
    for num, wt, val in iter_fields(buf):
        if num == 1 and wt == BYTES:
            name = _utf8(val)
        elif num == 2 and wt == BYTES:
            extents = decode_slice(val)
        elif num == 3 and wt == BYTES:
            data = val
    return name, extents, data


# TensorProto field numbers (tensorflow/core/framework/tensor.proto)
TP_DTYPE, TP_SHAPE, TP_CONTENT = 1, 2, 4
TP_FLOAT, TP_DOUBLE, TP_INT, TP_STRING, TP_SCOMPLEX = 5, 6, 7, 8, 9
TP_INT64, TP_BOOL, TP_DCOMPLEX, TP_HALF, TP_UINT32, TP_UINT64, TP_FLOAT8 = 10, 11, 12, 13, 16, 17, 18

#: For each typed value field: the wire type of one element (packed fields hold many).
TP_ELEMENT_WIRE = {
    TP_FLOAT: FIXED32, TP_DOUBLE: FIXED64, TP_SCOMPLEX: FIXED32, TP_DCOMPLEX: FIXED64,
    TP_INT: VARINT, TP_INT64: VARINT, TP_BOOL: VARINT, TP_HALF: VARINT,
    TP_UINT32: VARINT, TP_UINT64: VARINT,
}


def decode_tensor_proto(buf) -> dict[int, list]:
    """The fields of a TensorProto as {field number: [raw pieces]}.

    Packed repeated fields give memoryviews; unpacked elements give ints (the
    fixed-width ones as their bit patterns); ``string_val``/``tensor_content``/
    ``float8_val`` give memoryviews. Callers turn pieces into arrays.
    """
    out: dict[int, list] = {}
    for num, wt, val in iter_fields(buf):
        out.setdefault(num, []).append((wt, val))
    return out
