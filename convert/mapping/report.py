"""What :func:`convert.mapping.apply` did, as rows, drops and names kept (the ``--plan`` table)."""

from __future__ import annotations

from dataclasses import dataclass

from .transforms import _fmt_shape


@dataclass(frozen=True)
class MappingRow:
    """How one output tensor was made."""

    sources: tuple[str, ...]
    target: str
    transforms: tuple[str, ...]
    before: tuple[tuple[str, str, tuple[int, ...]], ...]
    dtype: str
    shape: tuple[int, ...]
    rules: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "sources": list(self.sources), "target": self.target, "transforms": list(self.transforms),
            "before": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in self.before],
            "after": {"dtype": self.dtype, "shape": list(self.shape)}, "rules": list(self.rules),
        }


@dataclass(frozen=True)
class Dropped:
    sources: tuple[str, ...]
    reason: str  # "file:line" of the drop rule, or "file: unmatched"

    def to_dict(self) -> dict:
        return {"sources": list(self.sources), "reason": self.reason}


@dataclass(frozen=True)
class MappingReport:
    """What :func:`apply` did: one row per mapped output, the drops, the untouched names."""

    rows: tuple[MappingRow, ...]
    dropped: tuple[Dropped, ...]
    kept_unmatched: tuple[str, ...]
    rule_files: tuple[str, ...] = ()
    tensors_in: int = 0

    def to_dict(self) -> dict:
        return {
            "rule_files": list(self.rule_files),
            "tensors_in": self.tensors_in,
            "tensors_out": len(self.rows) + len(self.kept_unmatched),
            "rows": [r.to_dict() for r in self.rows],
            "dropped": [d.to_dict() for d in self.dropped],
            "kept_unmatched": list(self.kept_unmatched),
        }

    def to_text(self) -> str:
        """The ``--plan`` table: plain text, aligned columns."""
        def spec(d, s):
            return f"{d}{_fmt_shape(s)}"

        lines = []
        header = ("SOURCE", "TARGET", "TRANSFORMS", "BEFORE", "AFTER")
        table = []
        for r in self.rows:
            before = " + ".join(spec(d, s) for _, d, s in r.before)
            renamed_only = not r.transforms
            table.append((", ".join(r.sources), r.target,
                          "(rename)" if renamed_only else " ".join(r.transforms), before, spec(r.dtype, r.shape)))
        if table:
            widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
            for row in [header, *table]:
                lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
        else:
            lines.append("no tensor matched a rule")
        if self.dropped:
            lines.append("")
            lines.append(f"dropped ({len(self.dropped)}):")
            w = max(len(", ".join(d.sources)) for d in self.dropped)
            for d in self.dropped:
                lines.append(f"  {', '.join(d.sources).ljust(w)}  {d.reason}")
        if self.kept_unmatched:
            lines.append("")
            lines.append(f"kept unchanged, no rule matched ({len(self.kept_unmatched)}):")
            lines.extend(f"  {n}" for n in self.kept_unmatched)
        lines.append("")
        out = len(self.rows) + len(self.kept_unmatched)
        lines.append(f"{self.tensors_in} tensors in, {out} out: {len(self.rows)} mapped, "
                     f"{len(self.kept_unmatched)} kept unchanged, {len(self.dropped)} dropped")
        return "\n".join(lines) + "\n"
