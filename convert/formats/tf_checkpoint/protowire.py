"""The few TensorFlow protobuf messages checkpoints use, on the generic wire codec of :mod:`convert.wire`.

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

from dataclasses import dataclass, field

from ...wire import (
    BYTES,
    FIXED32,
    FIXED64,
    VARINT,
    ProtoError,
    check_shape,
    decode_varints,
    field_bytes,
    field_fixed32,
    field_varint,
    iter_fields,
    signed64,
)

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
                    e.start = signed64(v2)
                elif n2 == 2 and w2 == VARINT:
                    e.length = signed64(v2)
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


def decode_shape(buf) -> tuple[int, ...]:
    """TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}; bool unknown_rank = 3."""
    dims = []
    for num, wt, val in iter_fields(buf):
        if num == 2 and wt == BYTES:
            size = 0
            for n2, w2, v2 in iter_fields(val):
                if n2 == 1 and w2 == VARINT:
                    size = signed64(v2)
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
                h.num_shards = signed64(val)
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
            producer = signed64(val)
        elif num == 2 and wt == VARINT:
            min_consumer = signed64(val)
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
        fast = _decode_entry_fast(bytes(buf))
        return fast if fast is not None else cls.decode_fields(buf)

    @classmethod
    def decode_fields(cls, buf) -> BundleEntry:
        """The general decoder (any field order, slices, unknown fields, every malformation named)."""
        e = cls()
        for num, wt, val in iter_fields(buf):
            if num == 1 and wt == VARINT:
                e.dtype = val
            elif num == 2 and wt == BYTES:
                e.shape = decode_shape(val)
            elif num == 3 and wt == VARINT:
                e.shard_id = signed64(val)
            elif num == 4 and wt == VARINT:
                e.offset = signed64(val)
            elif num == 5 and wt == VARINT:
                e.size = signed64(val)
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


_SHAPES: dict[bytes, tuple[int, ...]] = {}  # encoded TensorShapeProto -> shape: checkpoints repeat a few shapes


def _decode_entry_fast(b: bytes) -> BundleEntry | None:
    """A BundleEntryProto as TF writes it (fields 1-6, no slices), decoded in one pass over the
    bytes: about 2 µs instead of 25 for the general field iterator, which matters at 50,000
    entries. None for anything else (slices, other fields, negative or malformed values), which
    :meth:`BundleEntry.decode_fields` then decodes or refuses with its own message."""
    dtype = shard = offset = size = crc = 0
    shape: tuple[int, ...] = ()
    pos, n = 0, len(b)
    try:
        while pos < n:
            key = b[pos]
            pos += 1
            if key == 0x12:  # shape: length-delimited, length < 128
                ln = b[pos]
                if ln & 0x80 or pos + 1 + ln > n:
                    return None
                raw = b[pos + 1:pos + 1 + ln]
                pos += 1 + ln
                got = _SHAPES.get(raw)
                if got is None:
                    got = decode_shape(raw)
                    if len(_SHAPES) < 4096:
                        _SHAPES[raw] = got
                shape = got
            elif key == 0x35:  # crc32c: fixed32
                if pos + 4 > n:
                    return None
                crc = int.from_bytes(b[pos:pos + 4], "little")
                pos += 4
            elif key in (0x08, 0x18, 0x20, 0x28):  # dtype, shard_id, offset, size: varints
                v = b[pos]
                pos += 1
                if v & 0x80:
                    v &= 0x7F
                    shift = 7
                    while True:
                        c = b[pos]
                        pos += 1
                        v |= (c & 0x7F) << shift
                        if not c & 0x80:
                            break
                        shift += 7
                        if shift > 56:  # 9 bytes and more: negative or overlong, for the general decoder
                            return None
                if key == 0x08:
                    dtype = v
                elif key == 0x18:
                    shard = v
                elif key == 0x20:
                    offset = v
                else:
                    size = v
            else:
                return None
    except IndexError:  # truncated: the general decoder says how
        return None
    return BundleEntry(dtype, shape, shard, offset, size, crc)


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
            shape: tuple[int, ...]
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
