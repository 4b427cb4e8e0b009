"""The one dtype table of the package.

Each row names a dtype once and gives what every format calls it: the NumPy dtype
(little-endian, bfloat16 and float8 from ``ml_dtypes``), TensorFlow's ``DataType``
number (tensorflow/core/framework/types.proto), ONNX's ``TensorProto.DataType``
number (onnx/onnx.proto), the safetensors header string, the torch dtype name and
GGML's type number (ggml.h ``ggml_type``, what GGUF files store).
``None`` means the format cannot hold that dtype.

Raw bytes and values. For most dtypes an element is ``itemsize`` bytes and the raw form is
the NumPy buffer. Two kinds are not: *packed* dtypes (``float4_e2m1fn``: two elements per
byte, the first in the low nibble, as safetensors ``F4``, torch ``float4_e2m1fn_x2`` and ONNX
``FLOAT4E2M1`` store them; NumPy/ml_dtypes hold one per byte) and GGML's *block-quantized*
types (kind ``quant``: ``q8_0`` is blocks of 32 elements in 34 bytes, an f16 scale and 32
int8). Their rows carry ``block`` = (elements, bytes) of one block; :meth:`DType.nbytes`
counts raw bytes, :func:`decode` turns raw bytes into values and :func:`encode` values
into raw bytes. A quantized tensor's values are its dequantized float32 numbers, computed by
the ``gguf`` package's own routines (``gguf.quants.dequantize``, imported on first use);
there is no way back (no quantizer is offered), so quantized tensors travel as raw bytes and
only GGUF holds them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedDTypeError, UsageError
from .lazy import np

_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
              "float8_e8m0fnu", "float4_e2m1fn")  # NumPy has them from ml_dtypes


@dataclass(frozen=True)
class DType:
    name: str
    numpy_spec: str  # a NumPy dtype string, or an ml_dtypes name
    tf: int | None
    onnx: int | None
    safetensors: str | None
    torch: str | None
    itemsize: int  # bytes per element; 0 for variable-size (string) and for block types (see ``block``)
    kind: str  # "float", "int", "uint", "bool", "complex", "string", "quant" (GGML block-quantized)
    tf_v1: bool  # TF 2.21's V1 reader (TensorSliceReader) restores it
    gguf: int | None = None  # GGML type number
    block: tuple[int, int] | None = None
    """(elements, bytes) of one block, for dtypes whose elements are not whole bytes (packed
    4-bit floats: (2, 1); GGML quantized types: q8_0 (32, 34)); None: one element is ``itemsize`` bytes."""

    def nbytes(self, numel: int) -> int:
        """Raw bytes of ``numel`` elements (a partial last block counts whole; for strings: 0)."""
        if self.block is None:
            return numel * self.itemsize
        elements, size = self.block
        return -(-numel // elements) * size

    @property
    def is_quantized(self) -> bool:
        """A GGML block-quantized type: raw bytes only GGUF holds; values are dequantized float32."""
        return self.kind == "quant"

    @property
    def numpy(self) -> np.dtype:
        """The NumPy dtype (little-endian), made on first use: NumPy is imported only when needed."""
        return _numpy_dtype(self.numpy_spec)

    @property
    def is_floating(self) -> bool:
        """Values are floating-point numbers (quantized types too: their values are dequantized floats)."""
        return self.kind in ("float", "quant")

    def __repr__(self) -> str:
        return f"dtype({self.name})"

    def __str__(self) -> str:
        return self.name


@functools.cache
def _numpy_dtype(spec: str) -> np.dtype:
    if spec in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, spec))
    return np.dtype(spec)


#          name            numpy    bytes  TF  ONNX safetensors torch   kind    TF V1  GGML
TABLE: tuple[DType, ...] = tuple(DType(name, spec, tf, onnx, st, torch, size, kind, v1 == "V1", ggml)
                                 for name, spec, size, tf, onnx, st, torch, kind, v1, ggml in (
    ("float64", "<f8", 8, 2, 11, "F64", "float64", "float", "V1", 28),
    ("float32", "<f4", 4, 1, 1, "F32", "float32", "float", "V1", 0),
    ("float16", "<f2", 2, 19, 10, "F16", "float16", "float", "V1", 1),
    ("bfloat16", "bfloat16", 2, 14, 16, "BF16", "bfloat16", "float", "", 30),
    ("float8_e4m3fn", "float8_e4m3fn", 1, 25, 17, "F8_E4M3", "float8_e4m3fn", "float", "", None),
    ("float8_e5m2", "float8_e5m2", 1, 24, 19, "F8_E5M2", "float8_e5m2", "float", "", None),
    ("int8", "<i1", 1, 6, 3, "I8", "int8", "int", "V1", 24),
    ("int16", "<i2", 2, 5, 5, "I16", "int16", "int", "V1", 25),
    ("int32", "<i4", 4, 3, 6, "I32", "int32", "int", "V1", 26),
    ("int64", "<i8", 8, 9, 7, "I64", "int64", "int", "V1", 27),
    ("uint8", "<u1", 1, 4, 2, "U8", "uint8", "uint", "V1", None),
    ("uint16", "<u2", 2, 17, 4, "U16", "uint16", "uint", "V1", None),
    ("uint32", "<u4", 4, 22, 12, "U32", "uint32", "uint", "", None),
    ("uint64", "<u8", 8, 23, 13, "U64", "uint64", "uint", "", None),
    ("bool", "?", 1, 10, 9, "BOOL", "bool", "bool", "V1", None),
    ("complex64", "<c8", 8, 8, 14, "C64", "complex64", "complex", "V1", None),
    ("complex128", "<c16", 16, 18, 15, None, "complex128", "complex", "V1", None),
    ("string", "O", 0, 7, 8, None, None, "string", "V1", None),
    # safetensors 0.8's newer floats (MX scales, AMD's fnuz float8s). Only safetensors is given
    # here: the other writers' codes for them are not yet checked against their frameworks.
    ("float8_e8m0fnu", "float8_e8m0fnu", 1, None, None, "F8_E8M0", None, "float", "", None),
    ("float8_e4m3fnuz", "float8_e4m3fnuz", 1, None, None, "F8_E4M3FNUZ", None, "float", "", None),
    ("float8_e5m2fnuz", "float8_e5m2fnuz", 1, None, None, "F8_E5M2FNUZ", None, "float", "", None),
)) + (
    # packed: two elements per byte, the first in the low nibble
    DType("float4_e2m1fn", "float4_e2m1fn", None, None, "F4", None, 0, "float", False, block=(2, 1)),
) + tuple(
    # GGML's block-quantized types (ggml.h; sizes as gguf.constants.GGML_QUANT_SIZES): values are
    # the dequantized float32 numbers, raw bytes are the blocks; only GGUF holds them.
    DType(name, "<f4", None, None, None, None, 0, "quant", False, ggml, block=(elements, size))
    for name, ggml, elements, size in (
        ("q4_0", 2, 32, 18), ("q4_1", 3, 32, 20), ("q5_0", 6, 32, 22), ("q5_1", 7, 32, 24),
        ("q8_0", 8, 32, 34), ("q8_1", 9, 32, 40), ("q2_k", 10, 256, 84), ("q3_k", 11, 256, 110),
        ("q4_k", 12, 256, 144), ("q5_k", 13, 256, 176), ("q6_k", 14, 256, 210), ("q8_k", 15, 256, 292),
        ("iq2_xxs", 16, 256, 66), ("iq2_xs", 17, 256, 74), ("iq3_xxs", 18, 256, 98), ("iq1_s", 19, 256, 50),
        ("iq4_nl", 20, 32, 18), ("iq3_s", 21, 256, 110), ("iq2_s", 22, 256, 82), ("iq4_xs", 23, 256, 136),
        ("iq1_m", 29, 256, 56), ("tq1_0", 34, 256, 54), ("tq2_0", 35, 256, 66), ("mxfp4", 39, 32, 17),
        ("nvfp4", 40, 64, 36), ("q1_0", 41, 128, 18),
    )
)

_BY_NAME = {d.name: d for d in TABLE}
_ALIASES = {
    "float": "float32", "double": "float64", "half": "float16", "bf16": "bfloat16",
    "f64": "float64", "f32": "float32", "f16": "float16", "fp32": "float32", "fp16": "float16",
    "long": "int64", "int": "int32", "str": "string", "bytes": "string",
}
_BY_TF = {d.tf: d for d in TABLE if d.tf is not None}
_BY_ONNX = {d.onnx: d for d in TABLE if d.onnx is not None}
_BY_ST = {d.safetensors: d for d in TABLE if d.safetensors is not None}
_BY_TORCH = {d.torch: d for d in TABLE if d.torch is not None}
_BY_GGML = {d.gguf: d for d in TABLE if d.gguf is not None}

FLOAT32 = _BY_NAME["float32"]
STRING = _BY_NAME["string"]


def held_by(column: str) -> Callable[[DType], bool]:
    """A writer's ``holds`` predicate: the dtypes whose ``column`` of the table is set
    (a format's code, or True)."""
    if column not in DType.__dataclass_fields__:
        raise ValueError(f"the dtype table has no column {column!r}")

    def holds(d: DType) -> bool:
        value = getattr(d, column)
        return value is not None and value is not False  # GGML's float32 is number 0
    holds.__qualname__ = f"held_by({column!r})"
    return holds


def by_name(name: str) -> DType:
    """The row for a canonical name or a common alias (``float``, ``half``, ``bf16``...)."""
    key = _ALIASES.get(name.lower(), name.lower())
    try:
        return _BY_NAME[key]
    except KeyError:
        raise UsageError(f"unknown dtype '{name}'; known: {', '.join(_BY_NAME)}") from None


def _lookup(table: dict, key: object, what: str) -> DType:
    try:
        return table[key]
    except KeyError:
        raise UnsupportedDTypeError(f"unsupported {what} dtype {key!r}") from None


def from_tf(enum: int) -> DType:
    """Row for a TensorFlow ``DataType`` number (reference types, +100, are folded)."""
    return _lookup(_BY_TF, enum - 100 if enum > 100 else enum, "TensorFlow")


def from_onnx(enum: int) -> DType:
    return _lookup(_BY_ONNX, enum, "ONNX")


def from_safetensors(code: str) -> DType:
    return _lookup(_BY_ST, code, "safetensors")


def from_torch(name: str) -> DType:
    """Row for a torch dtype or its name (``torch.float32`` or ``"float32"``)."""
    return _lookup(_BY_TORCH, str(name).removeprefix("torch."), "torch")


def from_ggml(number: int) -> DType:
    """Row for a GGML type number (a GGUF tensor's type)."""
    return _lookup(_BY_GGML, number, "GGML")


def from_numpy(dtype: Any) -> DType:
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return STRING
    return _lookup(_by_numpy(), dt.newbyteorder("<") if dt.byteorder == ">" else dt, "NumPy")


@functools.cache
def _by_numpy() -> dict:
    return {d.numpy: d for d in TABLE if d.kind not in ("string", "quant")}


@functools.cache
def _packed_by_numpy() -> dict:
    return {d.numpy: d for d in TABLE if d.block is not None and not d.is_quantized}


def decode(dtype: DType, raw: bytes | bytearray | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """The values held by ``raw`` (bytes-like, little-endian, C order) as an array of ``shape``."""
    numel = math.prod(shape)
    if dtype.block is None:
        return np.frombuffer(raw, dtype=dtype.numpy, count=numel).reshape(shape)
    data = np.frombuffer(raw, dtype=np.uint8, count=dtype.nbytes(numel))
    if dtype.is_quantized:
        return _dequantize(dtype, data, shape)
    # packed 4-bit: element 2i in the low nibble of byte i, element 2i+1 in its high nibble
    nibbles = np.empty(data.size * 2, np.uint8)
    nibbles[0::2] = data & 0x0F
    nibbles[1::2] = data >> 4
    return nibbles[:numel].view(dtype.numpy).reshape(shape)


def encode(arr: np.ndarray) -> np.ndarray:
    """The raw bytes (a flat uint8 array, little-endian, C order) of a numeric array."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.dtype not in _packed_by_numpy():
        return flat.view(np.uint8)
    bits = flat.view(np.uint8) & 0x0F
    if bits.size % 2:
        bits = np.append(bits, np.uint8(0))
    return bits[0::2] | (bits[1::2] << 4)


def _dequantize(dtype: DType, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    assert dtype.block is not None and dtype.gguf is not None  # a GGML block-quantized row has both
    if not shape or shape[-1] % dtype.block[0]:
        raise UnsupportedDTypeError(f"a {dtype} tensor's last dimension must be a multiple of {dtype.block[0]}, "
                           f"not shape {list(shape)}")
    try:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError(f"dequantizing {dtype} tensors", "gguf", "gguf") from None
    rows = data.reshape(*shape[:-1], shape[-1] // dtype.block[0] * dtype.block[1])
    try:
        values = dequantize(rows, GGMLQuantizationType(dtype.gguf))
    except NotImplementedError:
        raise UnsupportedDTypeError(f"the gguf package cannot dequantize {dtype} tensors; leave them out with "
                           "--exclude, or keep them in GGUF") from None
    except (ValueError, IndexError, TypeError) as e:  # gguf's own failure on these blocks
        raise UnsupportedDTypeError(f"the gguf package could not dequantize these {dtype} blocks ({e})") from None
    return np.asarray(values, dtype=np.float32).reshape(shape)
