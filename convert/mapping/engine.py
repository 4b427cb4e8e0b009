"""Applying rule sets to a TensorDict: renames without I/O, lazy transforms, splits and concats,
with the lineage of every output for the report (see :mod:`convert.mapping`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..dtypes import FLOAT32
from ..errors import MappingError
from ..ir import ArraySource, Tensor, TensorDict, derived
from ..lazy import np
from .references import bind_references, with_metadata
from .report import Dropped, MappingReport, MappingRow
from .rules import Rule, RuleSet
from .transforms import Cast, Concat, Transform, _axis, _fmt_shape, _RuleFailure


@dataclass(frozen=True)
class _Lineage:
    sources: tuple[str, ...]
    before: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape) of each original
    steps: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    matched: bool = False


def apply(td: TensorDict, rule_sets: Sequence[RuleSet]) -> tuple[TensorDict, MappingReport]:
    """Apply rule sets in order, each on the previous result.

    Args:
        td: the input; not modified, and no tensor data is read.
        rule_sets: from :func:`load`.

    Returns:
        The mapped TensorDict (same metadata) and a :class:`MappingReport`.

    Raises:
        MappingError: names no rule matched (``unmatched: error``; all listed at
            once), several sources mapped to one target, or a transform that does
            not fit a tensor's shape or dtype (all problems of a rule set at once).
    """
    if isinstance(rule_sets, RuleSet):
        rule_sets = [rule_sets]
    lineage = {name: _Lineage((name,), ((name, t.dtype.name, t.shape),)) for name, t in td.items()}
    dropped: list[Dropped] = []
    cur = td
    for rs in rule_sets:
        cur, lineage = _apply_set(cur, rs, lineage, dropped)
    rows, kept = [], []
    for name, t in cur.items():
        lin = lineage[name]
        if lin.matched:
            rows.append(MappingRow(lin.sources, name, lin.steps, lin.before, t.dtype.name, t.shape, lin.rules))
        else:
            kept.append(name)
    return cur, MappingReport(tuple(rows), tuple(dropped), tuple(kept), tuple(rs.path for rs in rule_sets), len(td))


def _merge_steps(parts: list[_Lineage]) -> tuple[str, ...]:
    steps = [p.steps for p in parts]
    if all(s == steps[0] for s in steps):
        return steps[0]
    return tuple(f"({src}: {' '.join(s) or 'as is'})" for p, s in zip(parts, steps, strict=False) for src in p.sources[:1])


def _chain(transforms: tuple[Transform, ...]) -> Callable[[np.ndarray], np.ndarray]:
    def run(array: np.ndarray) -> np.ndarray:
        for tr in transforms:
            array = tr(array)
        return array
    return run


def _spec(transforms, dtype, shape):
    for tr in transforms:
        if dtype.is_quantized and not isinstance(tr, Cast):
            dtype = FLOAT32  # a quantized tensor is transformed as its dequantized float32 values
        dtype, shape = tr.spec(dtype, shape)
    return dtype, shape


def _slice(axis: int, start: int, stop: int, then: Callable) -> Callable[[np.ndarray], np.ndarray]:
    index = (slice(None),) * axis + (slice(start, stop),)

    def run(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(then(array)[index])
    return run


def _apply_set(td: TensorDict, rs: RuleSet, lineage: dict[str, _Lineage],
               dropped: list[Dropped]) -> tuple[TensorDict, dict[str, _Lineage]]:
    rs = bind_references(rs, td.metadata)
    names = frozenset(td)
    errors: list[str] = []
    unmatched: list[str] = []
    # Outputs in input order; a concat group sits where its first piece was.
    slots: list = []
    groups: dict[tuple[int, str], list[tuple[Tensor, re.Match]]] = {}

    for name, t in td.items():
        found = _first_match(rs, t, names)
        if found is None:
            unmatched.append(name)
            if rs.unmatched == "keep":
                slots.append(("keep", t))
            elif rs.unmatched == "drop":
                dropped.append(Dropped(lineage[name].sources, f"{rs.path}: no rule matched (unmatched: drop)"))
            continue
        index, rule, m = found
        if rule.drop:
            dropped.append(Dropped(lineage[name].sources, f"dropped by rule at {rule.where}"))
            continue
        try:
            if rule.concat is not None:
                key = (index, rule.target(m))
                if key not in groups:
                    groups[key] = []
                    slots.append(("concat", rule, key))
                groups[key].append((t, m))
            elif rule.split is not None:
                slots.append(("made", rule, [name], _split(t, rule, m)))
            else:
                slots.append(("made", rule, [name], [_transformed(t, rule, rule.target(m))]))
        except _RuleFailure as e:
            errors.append(f"{rule.where}: tensor '{name}' {t.dtype.name}{_fmt_shape(t.shape)}: {e}")

    if unmatched and rs.unmatched == "error":
        listing = "".join(f"\n  {n}" for n in unmatched)
        errors.insert(0, f"{rs.path}: {len(unmatched)} tensor name(s) match no rule (the file says "
                         f"'unmatched: error'; add rules, or set 'unmatched: keep' or 'drop'):{listing}")

    out: list[Tensor] = []
    producers: dict[str, list[str]] = {}
    new_lineage: dict[str, _Lineage] = {}
    for slot in slots:
        step: tuple[str, ...]
        if slot[0] == "keep":
            t = slot[1]
            out.append(t)
            producers.setdefault(t.name, []).append(f"'{t.name}' (no rule matched, kept)")
            new_lineage.setdefault(t.name, lineage[t.name])
            continue
        if slot[0] == "concat":
            _, rule, key = slot
            members = groups[key]
            try:
                made = [_concat(members, rule, key[1])]
            except _RuleFailure as e:
                errors.append(f"{rule.where}: concat into '{key[1]}' of {', '.join(repr(t.name) for t, _ in members)}: {e}")
                continue
            inputs = [t.name for t, _ in _ordered(members, rule.concat)] if rule.concat.order else [t.name for t, _ in members]
            step = (f"concat(axis={rule.concat.axis})",)
        else:
            _, rule, inputs, made = slot
            step = ()
        parts = [lineage[n] for n in inputs]
        base = _Lineage(tuple(s for p in parts for s in p.sources), tuple(b for p in parts for b in p.before),
                        _merge_steps(parts) + step, tuple(dict.fromkeys(r for p in parts for r in p.rules)) + (rule.where,),
                        True)
        for i, t in enumerate(made):
            out.append(t)
            label = " + ".join(repr(n) for n in inputs)
            producers.setdefault(t.name, []).append(f"{label} (rule at {rule.where})")
            extra = []
            if rule.split is not None:
                extra.append(f"split(axis={rule.split.axis}, part {i + 1}/{len(made)})")
            tr = tuple(x.describe() for x in rule.transforms)
            if slot[0] == "concat":
                new_lineage[t.name] = _Lineage(base.sources, base.before, base.steps + tr, base.rules, True)
            else:
                new_lineage[t.name] = _Lineage(base.sources, base.before, base.steps + tr + tuple(extra), base.rules, True)

    clashes = {k: v for k, v in producers.items() if len(v) > 1}
    for target, who in clashes.items():
        errors.append(f"{rs.path}: {len(who)} tensors map to '{target}': {'; '.join(who)}")
    if errors:
        raise MappingError("\n".join(errors))
    return TensorDict(out, with_metadata(td.metadata, rs)), new_lineage


def _first_match(rs: RuleSet, t: Tensor, names: frozenset[str]) -> tuple[int, Rule, re.Match] | None:
    for index, rule in enumerate(rs.rules):
        m = rule.match(t, names)
        if m is not None:
            return index, rule, m
    return None


def _transformed(t: Tensor, rule: Rule, target: str) -> Tensor:
    if not rule.transforms:
        return t if target == t.name else t.renamed(target)
    dtype, shape = _spec(rule.transforms, t.dtype, t.shape)
    return derived(t, _chain(rule.transforms), dtype, shape, name=target)


def _split(t: Tensor, rule: Rule, m: re.Match) -> list[Tensor]:
    assert rule.split is not None  # a split rule's
    dtype, shape = _spec(rule.transforms, t.dtype, t.shape)
    axis, bounds = rule.split.bounds(shape)
    run = _chain(rule.transforms)
    out = []
    for template, (start, stop) in zip(rule.split.targets, bounds, strict=False):
        part_shape = shape[:axis] + (stop - start,) + shape[axis + 1:]
        # Each part reads the source again: memory stays at one tensor, not all parts at once.
        out.append(derived(t, _slice(axis, start, stop, run), dtype, part_shape, name=rule.expand(m, template)))
    return out


def _ordered(members: list[tuple[Tensor, re.Match]], concat: Concat) -> list[tuple[Tensor, re.Match]]:
    if concat.order is None:
        return members
    assert concat.part is not None  # the schema requires part: with order:
    placed: dict[str, tuple[Tensor, re.Match]] = {}
    for t, m in members:
        value = m.group(concat.part)
        if value not in concat.order:
            raise _RuleFailure(f"'{t.name}' has part '{value}', which is not in order {list(concat.order)}")
        placed[value] = (t, m)
    missing = [v for v in concat.order if v not in placed]
    if missing:
        raise _RuleFailure(f"no piece for part(s) {', '.join(missing)} of order {list(concat.order)}")
    return [placed[v] for v in concat.order]


def _concat(members: list[tuple[Tensor, re.Match]], rule: Rule, target: str) -> Tensor:
    assert rule.concat is not None  # a concat rule's
    pieces = [t for t, _ in _ordered(members, rule.concat)]
    first = pieces[0]
    rank = len(first.shape)
    axis = _axis(rule.concat.axis, rank, "concat")
    for p in pieces[1:]:
        if p.dtype != first.dtype:
            raise _RuleFailure(f"pieces have different dtypes ({first.dtype}, {p.dtype}); cast them first")
        if len(p.shape) != rank or any(a != b for i, (a, b) in enumerate(zip(p.shape, first.shape, strict=False)) if i != axis):
            raise _RuleFailure(f"shapes {_fmt_shape(first.shape)} and {_fmt_shape(p.shape)} differ outside axis {axis}")
    shape = first.shape[:axis] + (sum(p.shape[axis] for p in pieces),) + first.shape[axis + 1:]
    dtype, shape = _spec(rule.transforms, first.dtype, shape)
    run = _chain(rule.transforms)

    def produce() -> np.ndarray:
        out = np.asarray(run(np.concatenate([p.numpy() for p in pieces], axis=axis)))
        return out if out.dtype == dtype.numpy or dtype.kind == "string" else out.astype(dtype.numpy)
    return Tensor(target, dtype, shape, ArraySource(produce), first.attrs)
