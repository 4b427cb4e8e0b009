"""Propose a rule file that maps checkpoint A's names onto checkpoint B's (``convert map suggest A B``).

Every pair (a, b) whose shapes fit -- equal, or equal after a transpose (the usual
TF<->torch kernel layouts are tried first) -- is scored by name similarity (after
folding synonyms: w/weights/kernel/gamma -> weight, b/biases/beta -> bias,
moving_mean -> running_mean...), by relative position in each checkpoint, and by how
ordinary the layout change is. Pairs are taken best score first. A pair is flagged
AMBIGUOUS when another candidate for the same tensor scored almost as well; names
with no partner are listed too. Optimizer state (what the ``drop-optimizer`` preset
drops) is proposed as dropped. The result is a valid rule file, meant to be reviewed.

Example::

    text, ambiguities = suggest(convert.read("model.ckpt"), convert.read("model.pt"))
"""

from __future__ import annotations

import difflib
import itertools
import re

from .ir import Tensor, TensorDict

MARGIN = 0.05  # a rival within this score of the chosen pair makes it ambiguous

_SYNONYMS = [
    (r"moving_mean", "running_mean"), (r"moving_variance", "running_var"),
    (r"(?<![a-z])(?:w|weights|kernel|gamma|embeddings|output_weights)(?![a-z])", "weight"),
    (r"(?<![a-z])(?:b|biases|beta|output_bias)(?![a-z])", "bias"),
]
# Layout changes between TF and torch, most usual first: dense, conv1d, conv2d both ways, conv3d both ways.
_KNOWN_PERMS: dict[int, list[tuple[int, ...]]] = {2: [(1, 0)], 3: [(2, 1, 0)], 4: [(3, 2, 0, 1), (2, 3, 1, 0)], 5: [(4, 3, 0, 1, 2), (2, 3, 4, 1, 0)]}


def _tokens(name: str) -> list[str]:
    s = re.sub(r":\d+$", "", name).lower()
    for pattern, repl in _SYNONYMS:
        s = re.sub(pattern, repl, s)
    return [t for t in re.split(r"[^a-z0-9]+|(?<=[a-z])(?=[0-9])|(?<=[0-9])(?=[a-z])", s) if t]


def _name_similarity(a: list[str], b: list[str]) -> float:
    sa, sb = set(a), set(b)
    jaccard = len(sa & sb) / len(sa | sb) if sa | sb else 0.0
    return 0.5 * jaccard + 0.5 * difflib.SequenceMatcher(None, "/".join(a), "/".join(b)).ratio()


def _layout(ta: Tensor, tb: Tensor) -> tuple[list[dict], float] | None:
    """Transforms turning a's shape into b's, and a bonus for how ordinary they are; None if none fit."""
    sa, sb = ta.shape, tb.shape
    steps: list[dict]
    if sa == sb:
        steps, bonus = [], 0.1
    elif len(sa) == len(sb) and sorted(sa) == sorted(sb):
        perm = next((p for p in _KNOWN_PERMS.get(len(sa), []) if tuple(sa[i] for i in p) == sb), None)
        bonus = 0.08
        if perm is None and len(sa) <= 6:
            perm = next(p for p in itertools.permutations(range(len(sa))) if tuple(sa[i] for i in p) == sb)
            bonus = 0.03
        if perm is None:
            return None
        steps = [{"transpose": list(perm)}]
    else:
        return None
    if ta.dtype != tb.dtype:
        if (ta.dtype.kind == "string") != (tb.dtype.kind == "string"):
            return None
        steps.append({"cast": tb.dtype.name})
        bonus -= 0.05
    return steps, bonus


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _spec(t: Tensor) -> str:
    return f"{t.dtype.name}[{','.join(map(str, t.shape))}]"


def _flow(steps: list[dict]) -> str:
    return "[" + ", ".join(f"{{{k}: {v if isinstance(v, str) else '[' + ', '.join(map(str, v)) + ']'}}}"
                           for s in steps for k, v in s.items()) + "]"


def suggest(a: TensorDict, b: TensorDict) -> tuple[str, list[str]]:
    """Propose a rule file mapping ``a``'s names onto ``b``'s.

    Args:
        a: the checkpoint to be mapped (reads no tensor data: shapes, dtypes and names only).
        b: the checkpoint whose names are wanted.

    Returns:
        The rule file's YAML text, and one line per ambiguous or unmatched name (also
        written into the file as comments).
    """
    from . import mapping

    optimizer_rules = [r for r in mapping.load("drop-optimizer").rules if r.drop]
    names_a = frozenset(a)
    optimizer = [n for n in a if n not in b and any(r.match(a[n], names_a) for r in optimizer_rules)]
    cand_a = [n for n in a if n not in optimizer]
    cand_b = list(b)
    tok_a = {n: _tokens(n) for n in cand_a}
    tok_b = {n: _tokens(n) for n in cand_b}

    scored: list[tuple[float, int, int, list[dict]]] = []
    similarity: dict[tuple[int, int], float] = {}
    for i, na in enumerate(cand_a):
        for j, nb in enumerate(cand_b):
            fit = _layout(a[na], b[nb])
            if fit is None:
                continue
            steps, bonus = fit
            order = 1.0 - abs(i / max(len(cand_a) - 1, 1) - j / max(len(cand_b) - 1, 1))
            similarity[i, j] = _name_similarity(tok_a[na], tok_b[nb])
            score = 0.6 * similarity[i, j] + 0.3 * order + bonus
            scored.append((score, i, j, steps))
    scored.sort(key=lambda s: (-s[0], s[1], s[2]))

    chosen: dict[int, tuple[int, float, list[dict]]] = {}
    used_b: set[int] = set()
    for score, i, j, steps in scored:
        if i not in chosen and j not in used_b:
            chosen[i] = (j, score, steps)
            used_b.add(j)

    ambiguities: list[str] = []
    notes: dict[int, str] = {}
    for i, (j, score, _) in chosen.items():
        # A rival close in score, or one whose name fits as well (so that only the order decided).
        rivals = [(s, ii, jj) for s, ii, jj, _ in scored
                  if (jj == j) != (ii == i) and (s >= score - MARGIN or similarity[ii, jj] >= similarity[i, j])]
        if rivals:
            s, ii, jj = max(rivals)
            other = f"'{cand_b[j]}' could also come from '{cand_a[ii]}'" if jj == j else \
                f"'{cand_a[i]}' could also go to '{cand_b[jj]}'"
            msg = f"'{cand_a[i]}' -> '{cand_b[j]}' (score {score:.2f}): {other} (score {s:.2f})"
            ambiguities.append(msg)
            notes[i] = msg

    lines = [
        "# Suggested by `convert map suggest`: maps A's names onto B's by shape, order and name similarity.",
        "# Review it: lines marked AMBIGUOUS had a rival almost as good; NO MATCH names are dropped here.",
        "# Shapes cannot tell everything: a flatten between NHWC and NCHW layers, for example, fits",
        "# by shape with a plain transpose but needs a reshape-transpose-reshape (see mappings/README.md).",
        "schema: 1",
        "unmatched: error",
        "rules:",
    ]
    for i, na in enumerate(cand_a):
        ta = a[na]
        if i in chosen:
            j, score, steps = chosen[i]
            tb = b[cand_b[j]]
            if i in notes:
                lines.append(f"  # AMBIGUOUS: {notes[i]}")
            lines.append(f"  - match: {_q(re.escape(na))}  # {_spec(ta)} -> {_spec(tb)}, score {score:.2f}")
            lines.append(f"    to: {_q(cand_b[j].replace(chr(92), chr(92) * 2))}")
            if steps:
                lines.append(f"    transforms: {_flow(steps)}")
        else:
            msg = f"'{na}' {_spec(ta)}: nothing in B fits (NO MATCH; dropped)"
            ambiguities.append(msg)
            lines.append(f"  # {msg}")
            lines.append(f"  - match: {_q(re.escape(na))}")
            lines.append("    drop: true")
    for na in optimizer:
        lines.append(f"  - match: {_q(re.escape(na))}  # optimizer state")
        lines.append("    drop: true")
    for j, nb in enumerate(cand_b):
        if j not in used_b:
            msg = f"B's '{nb}' {_spec(b[nb])}: nothing in A fits (NO SOURCE)"
            ambiguities.append(msg)
            lines.append(f"# {msg}")
    return "\n".join(lines) + "\n", ambiguities
