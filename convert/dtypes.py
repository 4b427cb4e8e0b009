"""The one dtype table of the package.

Each row names a dtype once and gives what every format calls it: the NumPy dtype
(little-endian, bfloat16 and float8 from ``ml_dtypes``), TensorFlow's ``DataType``
number (tensorflow/core/framework/types.proto), ONNX's ``TensorProto.DataType``
number (onnx/onnx.proto), the safetensors header string and the torch dtype name.
``None`` means the format cannot hold that dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UnsupportedDTypeError, UsageError
from .lazy import np

_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")  # NumPy has them from ml_dtypes


@dataclass(frozen=True)
class DType:
    name: str
    numpy_spec: str  # a NumPy dtype string, or an ml_dtypes name
    tf: int | None
    onnx: int | None
    safetensors: str | None
    torch: str | None
    itemsize: int  # 0 for variable-size (string)
    kind: str  # "float", "int", "uint", "bool", "complex", "string"
    tf_v1: bool  # TF 2.21's V1 reader (TensorSliceReader) restores it

    @property
    def numpy(self) -> np.dtype:
        """The NumPy dtype (little-endian), made on first use: NumPy is imported only when needed."""
        return _numpy_dtype(self.numpy_spec)

    @property
    def is_floating(self) -> bool:
        return self.kind == "float"

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


#          name            numpy    bytes  TF  ONNX safetensors torch   kind    TF V1
TABLE: tuple[DType, ...] = tuple(DType(name, spec, tf, onnx, st, torch, size, kind, v1 == "V1")
                                 for name, spec, size, tf, onnx, st, torch, kind, v1 in (
    ("float64", "<f8", 8, 2, 11, "F64", "float64", "float", "V1"),
    ("float32", "<f4", 4, 1, 1, "F32", "float32", "float", "V1"),
    ("float16", "<f2", 2, 19, 10, "F16", "float16", "float", "V1"),
    ("bfloat16", "bfloat16", 2, 14, 16, "BF16", "bfloat16", "float", ""),
    ("float8_e4m3fn", "float8_e4m3fn", 1, 25, 17, "F8_E4M3", "float8_e4m3fn", "float", ""),
    ("float8_e5m2", "float8_e5m2", 1, 24, 19, "F8_E5M2", "float8_e5m2", "float", ""),
    ("int8", "<i1", 1, 6, 3, "I8", "int8", "int", "V1"),
    ("int16", "<i2", 2, 5, 5, "I16", "int16", "int", "V1"),
    ("int32", "<i4", 4, 3, 6, "I32", "int32", "int", "V1"),
    ("int64", "<i8", 8, 9, 7, "I64", "int64", "int", "V1"),
    ("uint8", "<u1", 1, 4, 2, "U8", "uint8", "uint", "V1"),
    ("uint16", "<u2", 2, 17, 4, "U16", "uint16", "uint", "V1"),
    ("uint32", "<u4", 4, 22, 12, "U32", "uint32", "uint", ""),
    ("uint64", "<u8", 8, 23, 13, "U64", "uint64", "uint", ""),
    ("bool", "?", 1, 10, 9, "BOOL", "bool", "bool", "V1"),
    ("complex64", "<c8", 8, 8, 14, "C64", "complex64", "complex", "V1"),
    ("complex128", "<c16", 16, 18, 15, None, "complex128", "complex", "V1"),
    ("string", "O", 0, 7, 8, None, None, "string", "V1"),
))

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

FLOAT32 = _BY_NAME["float32"]
STRING = _BY_NAME["string"]


def held_by(column: str) -> Callable[[DType], bool]:
    """A writer's ``holds`` predicate: the dtypes whose ``column`` of the table is set
    (a format's code, or True)."""
    if column not in DType.__dataclass_fields__:
        raise ValueError(f"the dtype table has no column {column!r}")

    def holds(d: DType) -> bool:
        return getattr(d, column) not in (None, False)
    holds.__qualname__ = f"held_by({column!r})"
    return holds


def by_name(name: str) -> DType:
    """The row for a canonical name or a common alias (``float``, ``half``, ``bf16``...)."""
    key = _ALIASES.get(name.lower(), name.lower())
    try:
        return _BY_NAME[key]
    except KeyError:
        raise UsageError(f"unknown dtype '{name}'; known: {', '.join(_BY_NAME)}") from None


def _lookup(table: dict, key, what: str) -> DType:
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


def from_numpy(dtype) -> DType:
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return STRING
    return _lookup(_by_numpy(), dt.newbyteorder("<") if dt.byteorder == ">" else dt, "NumPy")


@functools.cache
def _by_numpy() -> dict:
    return {d.numpy: d for d in TABLE if d.kind != "string"}
