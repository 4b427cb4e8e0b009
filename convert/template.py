"""Resolving tensors against a template's variables: which output tensor is which template variable.

A writer given a template (an existing graph whose variables the weights must fill) asks
:func:`resolve` to rename the TensorDict it is about to write onto the template's names. The
engine knows no format: both sides are TensorDicts (the template's tensors give names, dtypes,
shapes and ``attrs["role"]``; their data is read only to fill what the source lacks). Each
template variable is matched, in this order:

1. **exact name**;
2. **the usual naming conventions of the same variable**: two names match when they differ
   only in tokens (the parts between ``/`` and ``.``) that name the same thing in TF1 code:
   ``w``/``weights``/``kernel``, ``b``/``biases``/``bias``, ``gamma``/``scale``,
   ``beta``/``offset``, ``moving_mean``/``mean``/``pop_mean``,
   ``moving_variance``/``variance``/``pop_var``. So ``conv1/kernel`` is ``conv1/w``, and its
   slot ``conv1/kernel/Adam`` is ``conv1/w/Adam``;
3. **a unique match by dtype and shape within the same scope** (the name up to its last
   separator): ``dense/W`` is ``dense/kernel_0`` when no other tensor of that scope has its shape.

A match must be unique both ways at each step; every matched tensor must have the template's
dtype and shape (the mapping's layout transforms are applied before). What is ambiguous, a
mismatch, missing, or left over is reported in one :class:`~convert.errors.WriteError` that lists
every case. Template variables of an *optional* role (``optimizer``, ``step``: slots and step
counters a converted model rarely has) that the source lacks are not errors: they are listed in
the :class:`Resolution`, and with ``fill`` written from the template's own values.

Example:
    >>> out, res = resolve(td, template_td, path="new/", template="model1/")  # doctest: +SKIP
    >>> [(m.source, m.target, m.how) for m in res.matches][:1]                  # doctest: +SKIP
    [('conv1/kernel', 'conv1/w', 'convention')]
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import WriteError
from .ir import Tensor, TensorDict

OPTIONAL_ROLES = ("optimizer", "step")

#: Tokens that name the same variable in TF1-era code; a token belongs to at most one class.
CONVENTIONS: tuple[tuple[str, ...], ...] = (
    ("w", "weights", "kernel"),
    ("b", "biases", "bias"),
    ("gamma", "scale"),
    ("beta", "offset"),
    ("moving_mean", "mean", "pop_mean"),
    ("moving_variance", "variance", "pop_var"),
)
_CLASS_OF = {token: group[0] for group in CONVENTIONS for token in group}
_TOKENS = re.compile(r"([/.])")


@dataclass(frozen=True)
class Match:
    """A source tensor resolved to a template variable; ``how``: exact, convention or shape."""

    source: str
    target: str
    how: str

    def to_dict(self) -> dict:
        return {"source": self.source, "target": self.target, "how": self.how}


@dataclass(frozen=True)
class Resolution:
    """What :func:`resolve` decided: the matches (in template order), and the template's
    optional variables the source lacks, written from the template (``filled``) or not."""

    template: str
    template_variables: int
    matches: tuple[Match, ...]
    filled: tuple[str, ...] = ()
    unfilled: tuple[str, ...] = ()

    @property
    def notes(self) -> list[str]:
        """One line each for the summary, when something was not a plain exact match."""
        out = []
        renamed = [m for m in self.matches if m.how != "exact"]
        if renamed:
            out.append(f"resolved {len(renamed)} names against template {self.template}: "
                       + ", ".join(f"{m.source} -> {m.target}" for m in renamed[:6])
                       + (" ..." if len(renamed) > 6 else ""))
        if self.filled:
            out.append(f"wrote {len(self.filled)} template variables the source lacks from the template "
                       f"(--template-fill): {_some(self.filled)}")
        if self.unfilled:
            out.append(f"left out {len(self.unfilled)} optimizer/step variables of the template the source lacks "
                       f"({_some(self.unfilled)}); --template-fill writes them from the template")
        return out

    def facts(self) -> dict:
        """For the ``--json`` summary."""
        return {"template": self.to_dict()}

    def to_dict(self) -> dict:
        return {"template": self.template, "template_variables": self.template_variables,
                "matches": [m.to_dict() for m in self.matches], "filled": list(self.filled),
                "unfilled": list(self.unfilled)}

    def to_text(self) -> str:
        """The ``--plan`` table: each source name, the template variable it becomes, and how."""
        header = ("SOURCE", "TEMPLATE VARIABLE", "HOW")
        rows = [(m.source, m.target, m.how) for m in self.matches]
        rows += [("(template value)", name, "filled") for name in self.filled]
        rows += [("(left out)", name, "not in the source") for name in self.unfilled]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
        lines = [f"template {self.template}: {self.template_variables} variables, {len(self.matches)} matched "
                 f"({_count(self.matches, 'exact')} exact, {_count(self.matches, 'convention')} by naming "
                 f"convention, {_count(self.matches, 'shape')} by shape), {len(self.filled)} filled from the "
                 f"template, {len(self.unfilled)} left out", ""]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
        return "\n".join(lines) + "\n"


def _count(matches, how: str) -> int:
    return sum(m.how == how for m in matches)


def _some(names: Sequence[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def _spec(t: Tensor) -> str:
    return f"{t.dtype} {list(t.shape)}"


def _key(name: str) -> tuple[str, ...]:
    return tuple(_CLASS_OF.get(tok, tok) for tok in _TOKENS.split(name))


def _scope(name: str) -> str:
    parts = _TOKENS.split(name)
    return "".join(parts[:-1])


def _is_optional(t: Tensor) -> bool:
    return t.attrs.get("role") in OPTIONAL_ROLES


def resolve(td: TensorDict, template: TensorDict, *, path: os.PathLike | str | None = None, template_name: str | None = None,
            fill: bool = False, optional: Callable[[Tensor], bool] = _is_optional,
            problems: Sequence[str] = ()) -> tuple[TensorDict, Resolution]:
    """Rename ``td``'s tensors onto ``template``'s variables (see the module docstring).

    Args:
        td: the tensors about to be written (after mapping, selection and casts).
        template: the template's variables; their data is read only for ``fill``.
        path: the output, named by the error.
        template_name: how messages name the template (default: its metadata's ``local.template``).
        fill: write template variables the source lacks, of an optional role, from the template.
        optional: which template variables may be missing (default: role optimizer or step).
        problems: cases the caller found in the template itself, listed in the same error.

    Returns:
        The TensorDict to write (in template order, each tensor under its template name, its data
        untouched so that a byte copy stays a byte copy, with ``td``'s metadata) and the
        :class:`Resolution`.

    Raises:
        WriteError: listing every ambiguous, mismatched, missing and left-over tensor.
    """
    name = template_name or template.metadata.get("local.template", "")
    target_of: dict[str, tuple[str, str]] = {}  # template name -> (source name, how)
    problems = list(problems)
    # 1. exact names
    left = [n for n in td if n not in template]
    for n in td:
        if n in template:
            target_of[n] = (n, "exact")

    def open_targets(key) -> dict[str, tuple]:
        return {n: key(t) for n, t in template.items() if n not in target_of}

    # 2. naming conventions: equal keys, unique both ways
    left = _pair({n: _key(n) for n in left}, open_targets(lambda t: _key(t.name)), "convention",
                 "are the same variable by naming convention", target_of, problems)
    # 3. dtype and shape within a scope, unique both ways, roles alike (a weight never fills a slot)
    left = _pair({n: (_scope(n), td[n].dtype.name, td[n].shape, _is_optional(td[n])) for n in left},
                 open_targets(lambda t: (_scope(t.name), t.dtype.name, t.shape, optional(t))), "shape",
                 "have the same scope, dtype and shape", target_of, problems)

    tensors, matches, filled, unfilled = [], [], [], []
    for tname, want in template.items():
        source, how = target_of.get(tname, ("", ""))
        if how == "ambiguous":
            continue
        if not how:
            if not optional(want):
                problems.append(f"missing '{tname}' ({_spec(want)})")
            elif fill:
                filled.append(tname)
                tensors.append(want)
            else:
                unfilled.append(tname)
            continue
        t = td[source]
        if t.dtype != want.dtype or t.shape != want.shape:
            alias = "" if source == tname else f" (as '{tname}', by {how})"
            problems.append(f"'{source}'{alias} is {_spec(t)}, the template wants {_spec(want)}")
            continue
        matches.append(Match(source, tname, how))
        tensors.append(t if source == tname else t.renamed(tname))
    problems += [f"extra '{n}' ({_spec(td[n])}) is not in the template" for n in left]
    if problems:
        count = len(problems)
        raise WriteError(path, f"tensors do not fit template {name} ({count} problem{'s' if count > 1 else ''}; drop or rename "
                         "with a mapping, or leave tensors out with --exclude / --weights-only): " + "; ".join(problems))
    return td.replace(tensors), Resolution(name, len(template), tuple(matches), tuple(filled), tuple(unfilled))


def _pair(sources: dict[str, tuple], targets: dict[str, tuple], how: str, why: str,
          target_of: dict[str, tuple[str, str]], problems: list[str]) -> list[str]:
    """Match each source to the target of the same key when that pairing is unique both ways
    (into ``target_of``); a group of several is one problem, and its members are settled as
    ambiguous. Returns the sources still unmatched."""
    groups: dict[tuple, tuple[list[str], list[str]]] = {}
    for name, key in sources.items():
        groups.setdefault(key, ([], []))[0].append(name)
    for name, key in targets.items():
        if key in groups:
            groups[key][1].append(name)
    settled = set()
    for group_sources, group_targets in groups.values():
        if not group_targets:
            continue
        settled.update(group_sources)
        if len(group_sources) == 1 and len(group_targets) == 1:
            target_of[group_targets[0]] = (group_sources[0], how)
        else:
            problems.append(f"ambiguous: {_names(group_sources)} (source) and {_names(group_targets)} (template) "
                            f"{why}; rename with a mapping")
            target_of.update({t: ("", "ambiguous") for t in group_targets})
    return [n for n in sources if n not in settled]


def _names(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names) or "(none)"
