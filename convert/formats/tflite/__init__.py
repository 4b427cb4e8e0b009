"""TensorFlow Lite / LiteRT models (``.tflite``), read: their constant tensors.

Spec: the FlatBuffers schema ``tflite/converter/schema/schema.fbs`` (google-ai-edge/LiteRT; also
tensorflow/compiler/mlir/lite/schema/schema.fbs), file identifier ``TFL3``. A ``Model`` holds
``subgraphs`` of ``tensors``; each tensor names a ``buffer`` of the model (0: the empty sentinel).
A constant tensor's bytes are its buffer's ``data`` vector, or, in models over 2 GB (and whenever
the converter is told to), lie past the flatbuffer's end at ``Buffer.offset`` from the start of the
file (valid when > 1) for ``Buffer.size`` bytes. Quantized tensors carry ``QuantizationParameters``:
``scale`` and ``zero_point`` (one each, or one per slice along ``quantized_dimension``); the float
value is ``scale * (q - zero_point)``.

The flatbuffer is read with the ``flatbuffers`` runtime and code flatc generated from that schema
(:mod:`.schema_generated`; provenance in ``GENERATED.md`` beside it), over a memory map of the
file: only the tables are touched, and every constant tensor becomes a
:class:`~convert.ir.FileRegion` (copied as bytes). The runtime does not verify a buffer, so every
offset, length and count taken from the file is checked against the file's size before it is used.

What is read: the constant tensors (those whose buffer holds data) of every subgraph, named by
their tensor names (the main subgraph's as they are, others' prefixed ``<subgraph>/``; a name used
twice gets ``#<tensor index>``). Quantized tensors keep their integer dtype (int8, uint8, int16,
int32 biases); their parameters are in ``attrs["tflite.quantization"]`` and, for all of them, in
the metadata key ``tflite.quantization`` (JSON), which writers carry. ``--dequantize`` turns them
into float32 with their scales and zero points, per tensor or per axis (then only the attrs keep
the parameters, with ``tflite.dequantized_from``). Not read (listed in ``tflite.skipped``):
sparse tensors, packed 4/2-bit tensors, tensors whose data lies in external files, and string tensors.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

from ... import dtypes
from ...errors import ConvertError, CorruptFileError, ReadError, printable
from ...ir import ArraySource, FileRegion, Tensor, TensorDict
from ...lazy import np
from ..base import Format, Option

NAME = "tflite"
IDENTIFIER = b"TFL3"
MAX_RANK = 64

# TensorType (schema.fbs) -> IR dtype; the others are not data (RESOURCE, VARIANT) or packed below
# a byte (INT4, INT2, UINT4), or strings.
_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "INT32": "int32", "UINT8": "uint8", "INT64": "int64",
           "BOOL": "bool", "INT16": "int16", "COMPLEX64": "complex64", "INT8": "int8", "FLOAT64": "float64",
           "COMPLEX128": "complex128", "UINT64": "uint64", "UINT32": "uint32", "UINT16": "uint16",
           "BFLOAT16": "bfloat16", "FLOAT8_E4M3FN": "float8_e4m3fn", "FLOAT8_E5M2": "float8_e5m2"}


def detect(path: Path) -> bool:
    """A file whose flatbuffer identifier (bytes 4-8) is ``TFL3`` and whose root offset lies inside it."""
    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 8 and head[4:8] == IDENTIFIER and 8 <= int.from_bytes(head[:4], "little") < size


def read(path: os.PathLike | str, dequantize: bool = False, **_opts) -> TensorDict:
    """Read the constant tensors of a ``.tflite`` model, lazily.

    Args:
        path: the model file.
        dequantize: give quantized integer tensors as float32 (``scale * (q - zero_point)``).

    Returns:
        A TensorDict of the constant tensors; nothing but the flatbuffer's tables is read.

    Example:
        >>> td = read("model_int8.tflite", dequantize=True)  # doctest: +SKIP
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8 or f.read(8)[4:8] != IDENTIFIER:
                raise CorruptFileError(path, "not a TFLite flatbuffer (no TFL3 identifier)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ReadError(path, f"cannot read: {e.strerror}") from None
    try:
        return _Reader(path, mm, size, dequantize).read()
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged flatbuffer makes the runtime raise anything
        raise CorruptFileError(path, f"damaged flatbuffer ({type(e).__name__}: {e})") from None
    finally:
        mm.close()


class _Reader:
    def __init__(self, path: str, mm: mmap.mmap, size: int, dequantize: bool):
        from . import schema_generated as fb  # imports the flatbuffers runtime

        self.fb, self.path, self.mm, self.size, self.dequantize = fb, path, mm, size, dequantize
        self.types = {getattr(fb.TensorType, k): dtypes.by_name(v) for k, v in _DTYPES.items()}
        self.type_names = {v: k for k, v in vars(fb.TensorType).items() if k.isupper()}
        self.skipped: dict[str, str] = {}
        self.quantization: dict[str, dict] = {}

    def count(self, n: int, what: str, itemsize: int = 4) -> int:
        """A vector's length, refused when the file cannot hold that many items."""
        if n < 0 or n * itemsize > self.size:
            raise CorruptFileError(self.path, f"{what}: {n} entries, more than the file of {self.size} bytes holds")
        return n

    def text(self, raw: bytes | None, what: str) -> str:
        if raw is None:
            return ""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFileError(self.path, f"{what} is not UTF-8: {printable(repr(raw[:60]))}") from None

    def read(self) -> TensorDict:
        model = self.fb.Model.GetRootAs(self.mm, 0)
        buffers = [model.Buffers(i) for i in range(self.count(model.BuffersLength(), "buffers"))]
        regions = [self.region(b, i) for i, b in enumerate(buffers)]
        entries: list[tuple[str, int, object]] = []  # (name, tensor index, Tensor table)
        for g in range(self.count(model.SubgraphsLength(), "subgraphs")):
            graph = model.Subgraphs(g)
            prefix = "" if g == 0 else (self.text(graph.Name(), "a subgraph name") or f"subgraph{g}") + "/"
            for i in range(self.count(graph.TensorsLength(), "tensors")):
                t = graph.Tensors(i)
                name = self.text(t.Name(), "a tensor name")
                b = t.Buffer()
                if b >= len(regions):
                    raise CorruptFileError(self.path, f"names buffer {b} of {len(regions)}", prefix + name)
                if regions[b] is not None or t.ExternalBuffer():
                    entries.append((prefix + name, i, t))
        seen: dict[str, int] = {}
        for name, _, _ in entries:
            seen[name] = seen.get(name, 0) + 1
        tensors = []
        for name, i, t in entries:
            if seen[name] > 1 or not name:
                name = f"{name or 'tensor'}#{i}"
            tensor = self.tensor(name, i, t, regions)
            if tensor is not None:
                tensors.append(tensor)
        return TensorDict(tensors, self.metadata(model, buffers, regions))

    def region(self, buf, index: int) -> tuple[int, int] | None:
        """(file offset, length) of a buffer's bytes, or None when it holds none."""
        tab = buf._tab
        o = tab.Offset(4)  # vtable slot of field 0, Buffer.data (as the generated Buffer.Data reads it)
        if o:
            start, n = tab.Vector(o), tab.VectorLen(o)
            if not 0 <= start <= start + n <= self.size:
                raise CorruptFileError(self.path, f"buffer {index}: data [{start}, {start + n}) lies outside the file")
            if n:
                return start, n
        offset, n = buf.Offset(), buf.Size()
        if offset > 1 and n:
            if offset + n > self.size:
                raise CorruptFileError(self.path, f"buffer {index}: data at [{offset}, {offset + n}) lies past the "
                                       f"end of the file ({self.size} bytes; truncated?)")
            return offset, n
        return None

    def tensor(self, name: str, index: int, t, regions) -> Tensor | None:
        type_code = t.Type()
        rank = self.count(t.ShapeLength(), f"shape of '{name}'")
        if rank > MAX_RANK:
            raise CorruptFileError(self.path, f"shape of rank {rank} (at most {MAX_RANK})", name)
        shape = tuple(t.Shape(j) for j in range(rank))
        if any(d < 0 for d in shape):
            raise CorruptFileError(self.path, f"negative dimension in shape {list(shape)}", name)
        if t.ExternalBuffer():
            self.skipped[name] = "data in an external file (ExternalBuffer), not read"
            return None
        if t.Sparsity() is not None:
            self.skipped[name] = "sparse tensor, not read"
            return None
        dtype = self.types.get(type_code)
        if dtype is None:
            self.skipped[name] = f"{self.type_names.get(type_code, f'type {type_code}')} tensor, not read"
            return None
        offset, length = regions[t.Buffer()]
        if length != math.prod(shape) * dtype.itemsize:
            raise CorruptFileError(self.path, f"buffer holds {length} bytes but {dtype}{list(shape)} needs "
                                   f"{math.prod(shape) * dtype.itemsize}", name)
        attrs = {"role": "weight", "tflite.tensor_index": str(index), "tflite.buffer": str(t.Buffer())}
        source = FileRegion(self.path, offset, length, label=name)
        quant = self.quant(name, t, shape)
        if quant is None:
            return Tensor(name, dtype, shape, source, attrs)
        attrs["tflite.quantization"] = json.dumps(quant)
        if not self.dequantize or dtype.kind not in ("int", "uint"):
            self.quantization[name] = quant  # for the values as they are: not for dequantized ones
            return Tensor(name, dtype, shape, source, attrs)
        attrs["tflite.dequantized_from"] = dtype.name
        return Tensor(name, dtypes.FLOAT32, shape, ArraySource(_dequantizer(source, dtype, shape, quant)), attrs)

    def quant(self, name: str, t, shape: tuple[int, ...]) -> dict | None:
        q = t.Quantization()
        if q is None:
            return None
        n = self.count(q.ScaleLength(), f"scales of '{name}'")
        if not n:
            return None
        scale = [float(q.Scale(j)) for j in range(n)]
        nz = self.count(q.ZeroPointLength(), f"zero points of '{name}'", 8)
        zero = [int(q.ZeroPoint(j)) for j in range(nz)] or [0] * n
        axis = int(q.QuantizedDimension())
        if len(zero) != n:
            raise CorruptFileError(self.path, f"{n} scales but {len(zero)} zero points", name)
        if n > 1 and not (0 <= axis < len(shape) and shape[axis] == n):
            raise CorruptFileError(self.path, f"{n} scales along dimension {axis} of {list(shape)}", name)
        out = {"scale": scale, "zero_point": zero, "quantized_dimension": axis}
        if q.DetailsType():
            out["details"] = {v: k for k, v in vars(self.fb.QuantizationDetails).items()
                              if not k.startswith("_")}.get(q.DetailsType(), str(q.DetailsType()))
        return out

    def metadata(self, model, buffers, regions) -> dict[str, str]:
        meta = {"source.format": NAME, "tflite.schema_version": str(model.Version())}
        description = self.text(model.Description(), "the model's description")
        if description:
            meta["tflite.description"] = description
        for i in range(self.count(model.MetadataLength(), "metadata")):
            entry = model.Metadata(i)
            key, b = self.text(entry.Name(), "a metadata name"), entry.Buffer()
            region = regions[b] if b < len(regions) else None
            if region is None or region[1] > 4096:
                continue
            raw = bytes(self.mm[region[0]:region[0] + region[1]]).rstrip(b"\0")
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue  # binary (CONVERSION_METADATA is a flatbuffer of its own)
            if value.isprintable():
                meta[f"tflite.metadata.{key}"] = value
        if self.quantization:
            meta["tflite.quantization"] = json.dumps(self.quantization)
        if self.skipped:
            meta["tflite.skipped"] = json.dumps(self.skipped, sort_keys=True)
        return meta


def _dequantizer(source: FileRegion, dtype: dtypes.DType, shape: tuple[int, ...], quant: dict):
    """``float32(scale * (q - zero_point))``, in float64 as TFLite's reference Dequantize computes
    it (tensorflow/lite/kernels/internal/reference/dequantize.h), per axis when there are several."""
    def produce():
        q = source.array(dtype, shape).astype(np.int64)
        scale = np.asarray(quant["scale"], np.float64)
        zero = np.asarray(quant["zero_point"], np.int64)
        if len(scale) > 1:
            axis = quant["quantized_dimension"]
            bshape = [1] * len(shape)
            bshape[axis] = len(scale)
            scale, zero = scale.reshape(bshape), zero.reshape(bshape)
        return (scale * (q - zero)).astype(np.float32)
    return produce


FORMAT = Format(
    name=NAME,
    description="TensorFlow Lite / LiteRT model (.tflite): its constant tensors, read",
    detect=detect,
    read=read,
    options=(Option("--dequantize", "read", bool,
                    "tflite: give quantized integer tensors as float32 (scale * (q - zero_point), per axis too)"),),
    suffixes=(".tflite",),
)
