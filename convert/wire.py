"""The protobuf wire format, generic: varints, field tags, walking a message's fields, encoding them.

Why by hand: several adapters read protobuf messages whose generated classes ship only inside a
framework (TensorFlow's checkpoint messages, :mod:`convert.formats.tf_checkpoint.protowire`) or
must be walked without parsing the whole message (an ONNX model's weights stay in the file,
:mod:`convert.formats.onnx`). The wire format is small and stable
(https://protobuf.dev/programming-guides/encoding/); a message's own fields are each reader's
business, and unknown fields are skipped as a protobuf parser does.

Decoding errors raise :class:`ProtoError`; callers turn it into a
:class:`~convert.errors.CorruptFileError` naming the file and tensor.

Also here: :func:`check_shape`, which every reader applies to a shape read from a header before
anything is allocated for it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from .lazy import np

#: what the decoders take: a message's bytes, or a view into a larger buffer
Bytes = bytes | bytearray | memoryview

__all__ = [
    "varints_size",
    "VARINT", "FIXED64", "BYTES", "FIXED32", "ProtoError", "read_varint", "read_varint_from", "encode_varint",
    "iter_fields", "iter_raw_fields", "signed64", "tag", "field_varint", "field_bytes", "field_fixed32", "encode_varints",
    "decode_varints", "MAX_RANK", "check_shape",
]

VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5


class ProtoError(ValueError):
    """The bytes are not a valid encoding of the expected message."""


# ---------------------------------------------------------------- wire level

def read_varint(buf: Bytes, pos: int) -> tuple[int, int]:
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
    if 0 <= value < 0x80:  # most of them (lengths, dtypes, small dims): 1.7 million for a 50,000-tensor V1 file
        return _ONE_BYTE[value]
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


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def read_varint_from(f: BinaryIO) -> int | None:
    """Decode one varint from a file at its position, a byte at a time (a walker over a large
    file that seeks past what it does not need); None at the end of the file or for a varint of
    more than 10 bytes."""
    result = shift = 0
    while shift < 64:
        b = f.read(1)
        if not b:
            return None
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
    return None


def iter_fields(buf: Bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) for each field of a message.

    ``value`` is an int for varint/fixed fields and a memoryview for
    length-delimited ones (no copy).
    """
    for num, wt, val, _ in iter_raw_fields(buf):
        yield num, wt, val


def iter_raw_fields(buf: Bytes) -> Iterator[tuple[int, int, Any, memoryview]]:
    """As :func:`iter_fields`, plus each field's own bytes (tag included) as a memoryview: a
    message is edited by copying the fields it keeps byte for byte and re-encoding the others."""
    mv = memoryview(buf)
    pos, n = 0, len(mv)
    while pos < n:
        start = pos
        key, pos = read_varint(mv, pos)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ProtoError("field number 0")
        val: int | memoryview
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
        yield num, wt, val, mv[start:pos]


def signed64(v: int) -> int:
    """A varint's value as the signed 64-bit integer (``int64``/``int32`` fields) it encodes."""
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


def decode_varints(buf: Bytes, convert: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Decode packed varints into a uint64 array (vectorised), or into ``convert`` of it, a window
    at a time, so that the 64-bit temporaries never span the whole buffer."""
    b = np.frombuffer(buf, dtype=np.uint8)
    if b.size == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return convert(empty) if convert else empty
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
    out: np.ndarray | None = None
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
    assert out is not None  # b is not empty: there is a window
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


# ------------------------------------------------------------ shapes

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
