"""Compare two TensorDicts tensor by tensor: names, dtypes, shapes and values.

Used by ``convert diff A B [--map X] [--atol --rtol]`` and :func:`convert.diff`. Values are read one tensor
at a time and compared in slices, so memory stays of the order of the largest tensor.
Two values agree when ``|a - b| <= atol + rtol * |b|`` (NumPy's ``isclose``; NaN
agrees with NaN in the same place). With the defaults (0, 0) only equal values agree.

Example::

    report = compare.diff(convert.read("a.ckpt"), convert.read("b.safetensors"), atol=1e-6)
    if not report.ok:
        print(report.to_text())
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from .ir import Tensor, TensorDict
from .lazy import np

_SLICE = 1 << 20  # elements compared at once (8 MB per float64 operand)


@dataclass(frozen=True)
class TensorDiff:
    """The comparison of one name present in both inputs."""

    name: str
    dtype_a: str
    dtype_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    max_abs: float | None = None  # None when values were not compared (shape or kind mismatch)
    max_rel: float | None = None
    mismatched: int = 0  # elements outside the tolerance
    note: str = ""
    mean_abs: float | None = None  # mean over the elements of |a - b|
    mean_rel: float | None = None  # mean of |a - b| / |b| (inf where b is 0 and a is not)

    @property
    def ok(self) -> bool:
        return (self.dtype_a == self.dtype_b and self.shape_a == self.shape_b
                and self.max_abs is not None and self.mismatched == 0)

    @property
    def status(self) -> str:
        if self.shape_a != self.shape_b:
            return "shape differs"
        if self.dtype_a != self.dtype_b:
            return "dtype differs" + ("" if self.mismatched == 0 and self.max_abs is not None else ", values differ")
        if self.max_abs is None:
            return "not comparable"
        if self.mismatched:
            return "values differ"
        return "equal" if self.max_abs == 0 else "close"

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "ok": self.ok,
                "dtype_a": self.dtype_a, "dtype_b": self.dtype_b,
                "shape_a": list(self.shape_a), "shape_b": list(self.shape_b),
                "max_abs": self.max_abs, "max_rel": self.max_rel, "mean_abs": self.mean_abs, "mean_rel": self.mean_rel,
                "mismatched": self.mismatched,
                **({"note": self.note} if self.note else {})}


@dataclass(frozen=True)
class DiffReport:
    """Everything :func:`convert.diff` found. ``ok`` is True when the inputs agree."""

    tensors: tuple[TensorDiff, ...]
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return not self.only_in_a and not self.only_in_b and all(t.ok for t in self.tensors)

    @property
    def differing(self) -> tuple[TensorDiff, ...]:
        return tuple(t for t in self.tensors if not t.ok)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "atol": self.atol, "rtol": self.rtol,
                "compared": len(self.tensors), "differing": len(self.differing),
                "only_in_a": list(self.only_in_a), "only_in_b": list(self.only_in_b),
                "tensors": [t.to_dict() for t in self.tensors]}

    def to_text(self, all_tensors: bool = False) -> str:
        """A plain-text table of the differing tensors (every tensor with ``all_tensors``)."""
        lines = []
        rows = [t for t in self.tensors if all_tensors or not t.ok]
        if rows:
            header = ("NAME", "STATUS", "A", "B", "MAX ABS", "MAX REL", "MISMATCHED")
            table = [header]
            for t in rows:
                table.append((t.name, t.status, _spec(t.dtype_a, t.shape_a), _spec(t.dtype_b, t.shape_b),
                              _num(t.max_abs), _num(t.max_rel), str(t.mismatched) if t.max_abs is not None else "-"))
            widths = [max(len(r[i]) for r in table) for i in range(len(header))]
            lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in table]
        for label, names in (("only in A", self.only_in_a), ("only in B", self.only_in_b)):
            if names:
                lines.append(f"{label} ({len(names)}):")
                lines += [f"  {n}" for n in names]
        worst = max((t.max_abs for t in self.tensors if t.max_abs is not None), default=0.0)
        verdict = "agree" if self.ok else "differ"
        lines.append(f"{len(self.tensors)} tensors compared, {len(self.differing)} differ, "
                     f"{len(self.only_in_a)} only in A, {len(self.only_in_b)} only in B; "
                     f"max abs error {_num(worst)} (atol {self.atol:g}, rtol {self.rtol:g}): {verdict}")
        return "\n".join(lines) + "\n"


def _spec(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def diff(a: TensorDict, b: TensorDict, atol: float = 0.0, rtol: float = 0.0) -> DiffReport:
    """Compare ``a`` with ``b`` name by name.

    Args:
        a, b: the two checkpoints (map one first to compare across naming schemes).
        atol, rtol: tolerance, as in ``numpy.isclose(a, b, rtol, atol)``.

    Returns:
        A :class:`DiffReport`; names only one side has are listed, never compared.
    """
    only_a = tuple(n for n in a if n not in b)
    only_b = tuple(n for n in b if n not in a)
    results = tuple(compare(a[n], b[n], atol, rtol) for n in a if n in b)
    return DiffReport(results, only_a, only_b, float(atol), float(rtol))


def compare(ta: Tensor, tb: Tensor, atol: float = 0.0, rtol: float = 0.0) -> TensorDiff:
    """Compare two tensors' values (the name is ``ta``'s)."""
    diff = functools.partial(TensorDiff, name=ta.name, dtype_a=ta.dtype.name, dtype_b=tb.dtype.name,
                             shape_a=ta.shape, shape_b=tb.shape)
    if ta.shape != tb.shape:
        return diff()
    kinds = {ta.dtype.kind, tb.dtype.kind}
    if "string" in kinds:
        if kinds != {"string"}:
            return diff(note="string and numeric tensors cannot be compared")
        va, vb = ta.numpy().reshape(-1), tb.numpy().reshape(-1)
        bad = int(sum(x != y for x, y in zip(va, vb, strict=False)))
        worst = 0.0 if not bad else float("inf")
        return diff(max_abs=worst, max_rel=worst, mismatched=bad, mean_abs=worst, mean_rel=worst)
    max_abs = max_rel = sum_abs = sum_rel = 0.0
    bad = size = 0
    for err, rel, y in errors(ta, tb):
        if err.size:
            max_abs = max(max_abs, float(err.max()))
            max_rel = max(max_rel, float(rel.max()))
            sum_abs += float(err.sum())
            sum_rel += float(rel.sum())
        size += err.size
        with np.errstate(invalid="ignore", over="ignore"):
            bad += int(np.count_nonzero(~((err == 0) | (err <= atol + rtol * np.abs(y)))))
    n = max(size, 1)
    return diff(max_abs=max_abs, max_rel=max_rel, mismatched=bad, mean_abs=sum_abs / n,
                      mean_rel=sum_rel / n)


def errors(ta: Tensor, tb: Tensor) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The element-wise errors of two numeric tensors of one shape, in slices of at most ``_SLICE``
    elements: ``(|a - b|, |a - b| / |b|, b)`` as float64 (complex: the modulus). Equal values
    (NaN beside NaN, equal infinities included) have error 0; any other NaN or infinity, inf."""
    va, vb = ta.numpy().reshape(-1), tb.numpy().reshape(-1)
    wide = np.complex128 if "complex" in {ta.dtype.kind, tb.dtype.kind} else np.float64
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for start in range(0, va.size, _SLICE):
            x = va[start:start + _SLICE].astype(wide)
            y = vb[start:start + _SLICE].astype(wide)
            both_nan = np.isnan(x) & np.isnan(y)
            err = np.abs(x - y)
            same = (x == y) | both_nan  # equal infinities give err = nan
            err = np.where(same, 0.0, err)
            err = np.where(np.isnan(err), np.inf, err)
            rel = np.where(same, 0.0, err / np.abs(y))
            rel = np.where(np.isnan(rel), np.inf, rel)
            yield err, rel, y
