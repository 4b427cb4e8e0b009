"""ONNX models at the protobuf wire level: recognising a ``ModelProto`` and taking the main graph's
initializer bytes out of it, without parsing the model (see :mod:`convert.formats.onnx`).

Field numbers: onnx/onnx.proto (``ModelProto``, ``GraphProto``, ``TensorProto``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ... import storage
from ...errors import ReadError
from ...wire import encode_varint, read_varint_from

# ModelProto top-level fields -> wire type (0 varint, 2 length-delimited), onnx.proto.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
# First tag byte of a GraphProto: one of its length-delimited fields 1, 2, 5, 10..16.
_GRAPH_FIRST_TAGS = {(f << 3) | 2 for f in (1, 2, 5, 10, 11, 12, 13, 14, 15)} | {0x82}
_MAX_TOP_FIELDS = 1_000_000
_REMOTE_BLOCK = 256 << 10


def detect(path: os.PathLike | str) -> bool:
    """True for an ONNX ``ModelProto`` file.

    Walks the top-level protobuf fields (seeking over length-delimited ones, so a
    large model costs a few reads): the file must start with ``ir_version`` (field 1,
    as every serializer writes fields in order), hold only known ModelProto fields
    with their wire types, contain a ``graph`` (field 7) that starts like a
    GraphProto, and end exactly at a field boundary. TF GraphDef/MetaGraphDef start
    with a length-delimited field 1; a SavedModel has no field 7; SSTables start
    with 0; safetensors, zips and raw data fail the field walk.
    """
    try:
        p = storage.as_path(path)
        if not p.is_file():
            return False
        size = p.stat().st_size
        if size < 4:
            return False
        with p.open("rb") as f:
            if f.read(1) != b"\x08":
                return False
            f.seek(0)
            seen = set()
            pos = 0
            for _ in range(_MAX_TOP_FIELDS):
                if pos == size:
                    break
                key = read_varint_from(f)
                if key is None:
                    return False
                field, wire = key >> 3, key & 7
                if _MODEL_FIELDS.get(field) != wire:
                    return False
                if wire == 0:
                    value = read_varint_from(f)
                    if value is None or (field == 1 and not 1 <= value <= 100):
                        return False
                    pos = f.tell()
                else:
                    n = read_varint_from(f)
                    if n is None:
                        return False
                    start = f.tell()
                    pos = start + n
                    if pos > size:
                        return False
                    if field == 7:
                        if n == 0:
                            return False
                        first = f.read(1)
                        if not first or first[0] not in _GRAPH_FIRST_TAGS:
                            return False
                    f.seek(pos)
                seen.add(field)
            return pos == size and 1 in seen and 7 in seen
    except (OSError, ReadError):  # ReadError: a remote path's
        return False


class _Malformed(Exception):
    """Private: the protobuf stream is inconsistent (turned into CorruptFileError)."""


def _strip_initializer_raw_data(p: Path) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The file's bytes minus field 9 (raw_data) of each main-graph initializer.

    Returns the rewritten ModelProto bytes and, per main-graph initializer in order,
    the (offset, length) of its raw_data in the file (None when it has none).
    Other fields are copied unchanged; lengths of the rewritten messages are recomputed.
    """
    size = p.stat().st_size
    regions: list[tuple[int, int] | None] = []
    # remote: a read-ahead file of blocks small enough that skipping each raw_data costs little
    with (p.open("rb", block_size=_REMOTE_BLOCK) if isinstance(p, storage.RemotePath)
          else open(p, "rb", buffering=1 << 16)) as f:

        def varint() -> int:
            v = read_varint_from(f)
            if v is None:
                raise _Malformed(f"truncated or bad varint at byte {f.tell()}")
            return v

        def length_end() -> int:
            n = varint()
            end = f.tell() + n
            if end > size:
                raise _Malformed(f"field of {n} bytes at byte {f.tell()} runs past the end of the file (truncated?)")
            return end

        def copy_value(wire: int) -> bytes:
            if wire == 0:
                return encode_varint(varint())
            if wire == 1 or wire == 5:
                n = 8 if wire == 1 else 4
                data = f.read(n)
                if len(data) != n:
                    raise _Malformed("truncated fixed-size field")
                return data
            if wire == 2:
                end = length_end()
                data = f.read(end - f.tell())
                return encode_varint(len(data)) + data
            raise _Malformed(f"unexpected wire type {wire} at byte {f.tell()}")

        def fields_until(end: int):
            while f.tell() < end:
                key = varint()
                if key >> 3 == 0:
                    raise _Malformed(f"field number 0 at byte {f.tell()}")
                yield key
            if f.tell() != end:
                raise _Malformed(f"a field overruns its message at byte {f.tell()}")

        out = bytearray()
        for key in fields_until(size):
            if key != (7 << 3 | 2):  # ModelProto.graph
                out += encode_varint(key) + copy_value(key & 7)
                continue
            graph = bytearray()
            for gkey in fields_until(length_end()):
                if gkey != (5 << 3 | 2):  # GraphProto.initializer
                    graph += encode_varint(gkey) + copy_value(gkey & 7)
                    continue
                tensor = bytearray()
                region = None
                for tkey in fields_until(length_end()):
                    if tkey == (9 << 3 | 2):  # TensorProto.raw_data
                        end = length_end()
                        region = (f.tell(), end - f.tell())
                        f.seek(end)
                    else:
                        tensor += encode_varint(tkey) + copy_value(tkey & 7)
                regions.append(region)
                graph += encode_varint(gkey) + encode_varint(len(tensor)) + tensor
            out += encode_varint(key) + encode_varint(len(graph)) + graph
    return bytes(out), regions
