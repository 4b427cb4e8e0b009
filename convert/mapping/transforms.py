"""Layout transforms of a rule (transpose, reshape, cast, squeeze, unsqueeze) and the split and concat
steps: each computes its result's dtype and shape without data (see :mod:`convert.mapping`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..dtypes import DType
from ..errors import MappingError
from ..lazy import np


class Unbound(Protocol):
    """A value taken from the source when the rules are applied
    (:class:`convert.mapping.references.Reference`)."""

    def resolve(self, metadata) -> object: ...


class _RuleFailure(Exception):
    """A rule does not fit a tensor; turned into a MappingError naming rule and tensor."""


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _axis(axis: int, rank: int, what: str) -> int:
    if not -rank <= axis < rank:
        raise _RuleFailure(f"{what}: axis {axis} is out of range for rank {rank}")
    return axis % rank


@dataclass(frozen=True)
class Transform:
    """One layout step. ``spec`` computes the result's dtype and shape without data."""

    where: str

    def spec(self, dtype: DType, shape: tuple[int, ...]) -> tuple[DType, tuple[int, ...]]:
        raise NotImplementedError

    def __call__(self, array: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Transpose(Transform):
    perm: tuple[int, ...]

    def spec(self, dtype, shape):
        if len(shape) != len(self.perm):
            raise _RuleFailure(f"transpose {list(self.perm)} needs rank {len(self.perm)}, tensor has rank {len(shape)}")
        return dtype, tuple(shape[p] for p in self.perm)

    def __call__(self, array):
        # Contiguous so that reshapes after it follow the logical (C) order, and writers stream it.
        return np.ascontiguousarray(np.transpose(array, self.perm))

    def describe(self):
        return f"transpose{_fmt_shape(self.perm)}"


@dataclass(frozen=True)
class Reshape(Transform):
    """New dims: -1 (at most once) is inferred; 0 copies the input's size at that position (as in ONNX)."""

    dims: tuple[int, ...]

    def _resolved(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        dims = []
        for i, d in enumerate(self.dims):
            if d == 0:
                if i >= len(shape):
                    raise _RuleFailure(f"reshape {list(self.dims)}: 0 at position {i} copies a size, "
                                       f"but shape {_fmt_shape(shape)} has rank {len(shape)}")
                d = shape[i]
            dims.append(d)
        numel = math.prod(shape)
        known = math.prod(d for d in dims if d != -1)
        if -1 in dims:
            if known == 0 or numel % known:
                raise _RuleFailure(f"reshape {list(self.dims)} does not fit shape {_fmt_shape(shape)} ({numel} elements)")
            dims = [numel // known if d == -1 else d for d in dims]
        if math.prod(dims) != numel:
            raise _RuleFailure(f"reshape {list(self.dims)} does not fit shape {_fmt_shape(shape)} ({numel} elements)")
        return tuple(dims)

    def spec(self, dtype, shape):
        return dtype, self._resolved(shape)

    def __call__(self, array):
        return np.reshape(np.ascontiguousarray(array), self._resolved(array.shape))

    def describe(self):
        return f"reshape{_fmt_shape(self.dims)}"


@dataclass(frozen=True)
class Cast(Transform):
    dtype: DType

    def spec(self, dtype, shape):
        if (dtype.kind == "string") != (self.dtype.kind == "string"):
            raise _RuleFailure(f"cannot cast {dtype} to {self.dtype}")
        return self.dtype, shape

    def __call__(self, array):
        return array.astype(self.dtype.numpy)

    def describe(self):
        return f"cast({self.dtype.name})"


@dataclass(frozen=True)
class Squeeze(Transform):
    axes: tuple[int, ...] | None  # None: every axis of size 1

    def _resolved(self, shape) -> tuple[int, ...]:
        if self.axes is None:
            return tuple(i for i, d in enumerate(shape) if d == 1)
        axes = tuple(_axis(a, len(shape), "squeeze") for a in self.axes)
        for a in axes:
            if shape[a] != 1:
                raise _RuleFailure(f"squeeze: axis {a} of shape {_fmt_shape(shape)} has size {shape[a]}, not 1")
        return axes

    def spec(self, dtype, shape):
        axes = self._resolved(shape)
        return dtype, tuple(d for i, d in enumerate(shape) if i not in axes)

    def __call__(self, array):
        return np.squeeze(array, axis=self._resolved(array.shape))

    def describe(self):
        return "squeeze" if self.axes is None else f"squeeze{_fmt_shape(self.axes)}"


@dataclass(frozen=True)
class Unsqueeze(Transform):
    axes: tuple[int, ...]

    def spec(self, dtype, shape):
        rank = len(shape) + len(self.axes)
        axes = sorted(_axis(a, rank, "unsqueeze") for a in self.axes)
        if len(set(axes)) != len(axes):
            raise _RuleFailure(f"unsqueeze: repeated axis in {list(self.axes)}")
        out = list(shape)
        for a in axes:
            out.insert(a, 1)
        return dtype, tuple(out)

    def __call__(self, array):
        return np.expand_dims(array, self.axes)

    def describe(self):
        return f"unsqueeze{_fmt_shape(self.axes)}"


@dataclass(frozen=True)
class Split:
    """Cut the (transformed) tensor along ``axis`` into ``len(targets)`` tensors."""

    axis: int
    targets: tuple[str, ...]
    sizes: tuple[int, ...] | None  # None: equal parts; one entry may be -1 (the rest)

    def bounds(self, shape: tuple[int, ...]) -> tuple[int, list[tuple[int, int]]]:
        axis = _axis(self.axis, len(shape), "split")
        dim = shape[axis]
        n = len(self.targets)
        if self.sizes is None:
            if dim % n:
                raise _RuleFailure(f"split: axis {axis} of shape {_fmt_shape(shape)} has size {dim}, not divisible into {n} equal parts")
            sizes = [dim // n] * n
        else:
            rest = dim - sum(s for s in self.sizes if s != -1)
            sizes = [rest if s == -1 else s for s in self.sizes]
            if sum(sizes) != dim or min(sizes) < 0:
                raise _RuleFailure(f"split: sizes {list(self.sizes)} do not add up to size {dim} of axis {axis} (shape {_fmt_shape(shape)})")
        out, start = [], 0
        for s in sizes:
            out.append((start, start + s))
            start += s
        return axis, out


@dataclass(frozen=True)
class Concat:
    """Join every tensor the rule matches with the same target along ``axis``."""

    axis: int
    part: int | str | None  # regex group telling each piece's place in ``order``
    order: tuple[str, ...] | None


@dataclass(frozen=True)
class PermuteRope(Transform):
    """llama.cpp's row order for rotary q/k projections (``permute`` in its convert_hf_to_gguf.py):
    rows ``(heads, 2, half)`` become ``(heads, half, 2)``; ``reverse`` undoes it (transformers'
    GGUF loader's ``reverse_permute``). ``heads`` is a number or a :class:`Reference`."""

    heads: int | Unbound  # a Reference (convert.mapping.references) until bound
    reverse: bool = False

    def bind(self, metadata) -> PermuteRope:
        """This transform with ``heads`` taken from the source's metadata (when a reference)."""
        if isinstance(self.heads, int):
            return self
        heads = self.heads.resolve(metadata)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise MappingError(f"{self.where}: permute_rope: heads must be a positive integer, got {heads!r}")
        return PermuteRope(self.where, heads, self.reverse)

    def spec(self, dtype, shape):
        if not isinstance(self.heads, int):  # pragma: no cover - apply() binds references first
            raise _RuleFailure("permute_rope: heads not resolved")
        if not shape or shape[0] % (2 * self.heads):
            raise _RuleFailure(f"permute_rope: {shape[0] if shape else 'a scalar'} rows are not {self.heads} heads "
                               f"of an even number of rows")
        return dtype, shape

    def __call__(self, array):
        rows, rest = array.shape[0], array.shape[1:]
        pair = (2, rows // self.heads // 2) if not self.reverse else (rows // self.heads // 2, 2)
        return np.ascontiguousarray(array.reshape(self.heads, *pair, *rest).swapaxes(1, 2).reshape(array.shape))

    def describe(self):
        return f"permute_rope(heads={self.heads}{', reverse' if self.reverse else ''})"
